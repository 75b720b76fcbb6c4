//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): x + up(act(down(x)))
//! on a sublayer's output. The up-projection starts at zero, so the model starts unchanged.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method};
use candle_core::{DType, Tensor};
use peftbench_backbone::{Block, Intervention, Linear, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `peft_type` of this project's own adapter format: PEFT has no bottleneck adapter, so
/// they are written in PEFT's layout (adapter_config.json + adapter_model.safetensors, keys
/// `base_model.model.<backbone><layer>.adapter_{attn,ffn}.{down,up}.{weight,bias}`) under this
/// type, which PEFT itself does not read.
pub const PEFT_TYPE: &str = "PEFTBENCH_BOTTLENECK_ADAPTER";

/// Where adapters sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterVariant {
    /// After attention and after the feed-forward block of every layer.
    Houlsby,
    /// After the feed-forward block only.
    Pfeiffer,
}

/// The adapter's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterActivation {
    /// ReLU.
    Relu,
    /// Exact GELU.
    Gelu,
    /// tanh.
    Tanh,
}

/// Adapter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Bottleneck width m.
    #[serde(default = "crate::defaults::bottleneck")]
    pub bottleneck: usize,
    /// Placement.
    #[serde(default = "default_variant")]
    pub variant: AdapterVariant,
    /// Nonlinearity between the projections.
    #[serde(default = "default_act")]
    pub activation: AdapterActivation,
}

fn default_variant() -> AdapterVariant {
    AdapterVariant::Houlsby
}
fn default_act() -> AdapterActivation {
    AdapterActivation::Relu
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            bottleneck: 16,
            variant: default_variant(),
            activation: default_act(),
        }
    }
}

impl AdapterConfig {
    /// The blocks an adapter follows.
    pub fn blocks(&self) -> &'static [Block] {
        match self.variant {
            AdapterVariant::Houlsby => &[Block::Attention, Block::Ffn],
            AdapterVariant::Pfeiffer => &[Block::Ffn],
        }
    }

    /// Checks the configuration.
    pub fn validate(&self, _model: &ModelConfig) -> Result<()> {
        if self.bottleneck == 0 {
            return Err(invalid("adapter", "bottleneck must be at least 1"));
        }
        Ok(())
    }

    /// Closed form: adapters · (2·h·m + m + h).
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        let (h, m) = (model.hidden_size, self.bottleneck);
        model.num_layers * self.blocks().len() * (2 * h * m + m + h)
    }
}

/// One adapter's projections.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// `[m, h]` down-projection.
    pub down: Linear,
    /// `[h, m]` up-projection, zero at init.
    pub up: Linear,
}

/// Adapters attached to a model.
pub struct Adapter {
    config: AdapterConfig,
    modules: BTreeMap<(usize, u8), AdapterModule>,
    params: TrainableParams,
}

fn block_key(block: Block) -> u8 {
    match block {
        Block::Attention => 0,
        Block::Ffn => 1,
    }
}

impl Adapter {
    /// Creates one adapter after each chosen block of every layer.
    pub fn attach(config: &AdapterConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let (h, m) = (ctx.model.config.hidden_size, config.bottleneck);
        let dev = ctx.model.device().clone();
        let mut params = TrainableParams::new();
        let mut modules = BTreeMap::new();
        for layer in 0..ctx.model.config.num_layers {
            for &block in config.blocks() {
                let name = format!(
                    "layer{layer}.{}",
                    if block == Block::Attention {
                        "attn"
                    } else {
                        "ffn"
                    }
                );
                let down = Linear::new(
                    params.add(
                        format!("{name}.down.weight"),
                        ctx.init.kaiming_uniform(m, h, &dev)?,
                    )?,
                    Some(params.add(
                        format!("{name}.down.bias"),
                        Tensor::zeros(m, DType::F32, &dev)?,
                    )?),
                );
                let up = Linear::new(
                    params.add(
                        format!("{name}.up.weight"),
                        Tensor::zeros((h, m), DType::F32, &dev)?,
                    )?,
                    Some(params.add(
                        format!("{name}.up.bias"),
                        Tensor::zeros(h, DType::F32, &dev)?,
                    )?),
                );
                modules.insert((layer, block_key(block)), AdapterModule { down, up });
            }
        }
        Ok(Self {
            config: config.clone(),
            modules,
            params,
        })
    }

    /// f(x) = up(act(down(x))), the adapter's residual branch.
    pub fn branch(
        &self,
        layer: usize,
        block: Block,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = self.modules.get(&(layer, block_key(block))) else {
            return Ok(None);
        };
        let d = m.down.forward(x)?;
        let a = match self.config.activation {
            AdapterActivation::Relu => d.relu()?,
            AdapterActivation::Gelu => d.gelu_erf()?,
            AdapterActivation::Tanh => d.tanh()?,
        };
        Ok(Some(m.up.forward(&a)?))
    }
}

impl Intervention for Adapter {
    fn after_block(
        &self,
        layer: usize,
        block: Block,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.branch(layer, block, &output)? {
            Some(f) => output + f,
            None => Ok(output),
        }
    }
}

fn module_key(model: &ModelConfig, layer: usize, block: Block, part: &str) -> PeftKey {
    let b = match block {
        Block::Attention => "attn",
        Block::Ffn => "ffn",
    };
    PeftKey::Module(format!(
        "{}.adapter_{b}.{part}",
        peftbench_backbone::hf_names::layer_path(model, layer)
    ))
}

impl Method for Adapter {
    fn name(&self) -> &'static str {
        "adapter"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let mut tensors = Vec::new();
        for (&(layer, b), m) in &self.modules {
            let block = if b == 0 { Block::Attention } else { Block::Ffn };
            for (part, lin) in [("down", &m.down), ("up", &m.up)] {
                tensors.push((
                    module_key(model, layer, block, &format!("{part}.weight")),
                    lin.weight.detach(),
                ));
                if let Some(bias) = &lin.bias {
                    tensors.push((
                        module_key(model, layer, block, &format!("{part}.bias")),
                        bias.detach(),
                    ));
                }
            }
        }
        let serde_json::Value::Object(config) = serde_json::json!({
            "bottleneck": self.config.bottleneck,
            "variant": self.config.variant,
            "activation": self.config.activation,
        }) else {
            unreachable!("a JSON object")
        };
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl Adapter {
    /// Adapters read from this project's PEFT-layout format.
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        let config = AdapterConfig {
            bottleneck: r.files.usize("bottleneck")?,
            variant: r.files.parse("variant")?,
            activation: r.files.parse("activation")?,
        };
        config.validate(model)?;
        let (h, m) = (model.hidden_size, config.bottleneck);
        let mut params = TrainableParams::new();
        let mut modules = BTreeMap::new();
        for layer in 0..model.num_layers {
            for &block in config.blocks() {
                let mut lin = |part: &str,
                               out: usize,
                               inp: usize,
                               params: &mut TrainableParams|
                 -> Result<Linear> {
                    let w = r.take(
                        &module_key(model, layer, block, &format!("{part}.weight")),
                        Some(&[out, inp]),
                    )?;
                    let b = r.take(
                        &module_key(model, layer, block, &format!("{part}.bias")),
                        Some(&[out]),
                    )?;
                    let name = format!(
                        "layer{layer}.{}.{part}",
                        if block == Block::Attention {
                            "attn"
                        } else {
                            "ffn"
                        }
                    );
                    Ok(Linear::new(
                        params.add(format!("{name}.weight"), w)?,
                        Some(params.add(format!("{name}.bias"), b)?),
                    ))
                };
                let down = lin("down", m, h, &mut params)?;
                let up = lin("up", h, m, &mut params)?;
                modules.insert((layer, block_key(block)), AdapterModule { down, up });
            }
        }
        Ok(Self {
            config,
            modules,
            params,
        })
    }
}

impl crate::MethodSpec for AdapterConfig {
    fn name(&self) -> &'static str {
        "adapter"
    }
    fn formula(&self) -> &'static str {
        match self.variant {
            AdapterVariant::Houlsby => "layers · 2 · (2·hidden·bottleneck + bottleneck + hidden)",
            AdapterVariant::Pfeiffer => "layers · (2·hidden·bottleneck + bottleneck + hidden)",
        }
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        AdapterConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        Ok(AdapterConfig::num_trainable(self, &model.config))
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "bottleneck",
            value: self.bottleneck,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.bottleneck = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn crate::Method>> {
        Ok(Box::new(Adapter::attach(self, ctx)?))
    }
}
