//! P-Tuning v2 (Liu et al. 2022): trainable prompts in every layer ("deep prompts") as
//! key/value prefixes, without reparametrisation by default.

use crate::error::Result;
use crate::peft::PeftState;
use crate::prefix_kv::{split_table, table_width, PrefixMlp};
use crate::{AttachContext, Method};
use candle_core::Tensor;
use peftbench_backbone::{Intervention, KvPrefix, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};

/// P-Tuning v2 configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningV2Config {
    /// Prompt length p per layer.
    #[serde(default = "crate::defaults::num_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Produce the prompts through prefix tuning's MLP while training.
    #[serde(default)]
    pub prefix_projection: bool,
    /// Hidden width of that MLP.
    #[serde(default = "d_mid")]
    pub encoder_hidden_size: usize,
}

fn d_mid() -> usize {
    128
}

impl Default for PTuningV2Config {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            prefix_projection: false,
            encoder_hidden_size: d_mid(),
        }
    }
}

impl PTuningV2Config {
    /// Checks the configuration.
    pub fn validate(&self, _model: &ModelConfig) -> Result<()> {
        if self.prefix_projection && self.encoder_hidden_size == 0 {
            return Err(crate::error::invalid(
                "p_tuning_v2",
                "encoder_hidden_size must be at least 1",
            ));
        }
        Ok(())
    }

    /// Closed form: p·2·layers·kv_dim (plus the MLP with `prefix_projection`).
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        if self.prefix_projection {
            PrefixMlp::num_parameters(model, self.num_virtual_tokens, self.encoder_hidden_size)
        } else {
            self.num_virtual_tokens * table_width(model)
        }
    }
}

enum Prompts {
    Direct(Tensor),
    Mlp(PrefixMlp),
}

/// P-Tuning v2 attached to a model.
pub struct PTuningV2 {
    model: ModelConfig,
    prompts: Prompts,
    p: usize,
    params: TrainableParams,
}

impl PTuningV2 {
    /// Creates the per-layer prompts (N(0, 1), as PEFT's prefix embedding).
    pub fn attach(config: &PTuningV2Config, ctx: &mut AttachContext) -> Result<Self> {
        let dev = ctx.model.device().clone();
        let model = ctx.model.config.clone();
        let p = config.num_virtual_tokens;
        let mut params = TrainableParams::new();
        let prompts = if config.prefix_projection {
            Prompts::Mlp(PrefixMlp::new(
                &model,
                p,
                config.encoder_hidden_size,
                &mut params,
                &mut ctx.init,
                &dev,
            )?)
        } else {
            Prompts::Direct(params.add(
                "prompts",
                ctx.init.normal((p, table_width(&model)), 1.0, &dev)?,
            )?)
        };
        Ok(Self {
            model,
            prompts,
            p,
            params,
        })
    }
}

impl Intervention for PTuningV2 {
    fn kv_prefixes(&self) -> candle_core::Result<Option<Vec<KvPrefix>>> {
        if self.p == 0 {
            return Ok(None);
        }
        let table = match &self.prompts {
            Prompts::Direct(t) => t.clone(),
            Prompts::Mlp(m) => m.table()?,
        };
        split_table(&table, &self.model).map(Some)
    }
}

impl Method for PTuningV2 {
    fn name(&self) -> &'static str {
        "p_tuning_v2"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    /// PEFT's P-Tuning v2 is its prefix tuning: the computed table is what it keeps.
    fn peft_state(
        &self,
        model: &ModelConfig,
        task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let table = match &self.prompts {
            Prompts::Direct(t) => t.detach(),
            Prompts::Mlp(m) => m.table()?.detach(),
        };
        let mut state = crate::prefix_tuning::PrefixTable::new(model, table)
            .peft_state(model, task)?
            .expect("a table exports");
        if let Prompts::Mlp(m) = &self.prompts {
            state.config.insert("prefix_projection".into(), true.into());
            state.config.insert(
                "encoder_hidden_size".into(),
                m.first.weight.dims()[0].into(),
            );
        }
        Ok(Some(state))
    }
}

impl crate::MethodSpec for PTuningV2Config {
    fn name(&self) -> &'static str {
        "p_tuning_v2"
    }
    fn formula(&self) -> &'static str {
        "p·2·layers·kv_dim"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        PTuningV2Config::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        Ok(PTuningV2Config::num_trainable(self, &model.config))
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "num_virtual_tokens",
            value: self.num_virtual_tokens,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.num_virtual_tokens = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn crate::Method>> {
        Ok(Box::new(PTuningV2::attach(self, ctx)?))
    }
}
