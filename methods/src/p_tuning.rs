//! P-Tuning (Liu et al. 2021): virtual-token embeddings produced by a prompt encoder
//! (bidirectional LSTM + MLP, or an MLP alone) and prepended to the input, as PEFT's
//! `PromptEncoder`.

use crate::error::{invalid, Result};
use crate::lstm::BiLstm;
use crate::peft::{PeftKey, PeftState};
use crate::prompt_tuning::{check_positions, initial_prompt, PromptInit};
use crate::{AttachContext, Method};
use candle_core::Tensor;
use peftbench_backbone::{Intervention, Linear, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};

/// The prompt encoder's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptEncoderType {
    /// 2-layer bidirectional LSTM, then Linear(2e→2e) → ReLU → Linear(2e→hidden).
    Lstm,
    /// Linear(hidden→e) → ReLU → Linear(e→e) → ReLU → Linear(e→hidden).
    Mlp,
}

/// P-Tuning configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PTuningConfig {
    /// Number of virtual tokens p.
    #[serde(default = "crate::defaults::num_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Encoder kind.
    #[serde(default = "d_kind")]
    pub encoder_type: PromptEncoderType,
    /// Encoder width e.
    #[serde(default = "d_e")]
    pub encoder_hidden_size: usize,
    /// Keep the input at its own positions and give the virtual tokens none (see
    /// prompt tuning's option of the same name); by default they take the first positions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_keeps_positions: bool,
}

fn d_kind() -> PromptEncoderType {
    PromptEncoderType::Mlp
}
fn d_e() -> usize {
    128
}

impl Default for PTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            encoder_type: d_kind(),
            encoder_hidden_size: d_e(),
            input_keeps_positions: false,
        }
    }
}

const LSTM_LAYERS: usize = 2;

impl PTuningConfig {
    /// Checks the configuration.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.encoder_hidden_size == 0 {
            return Err(invalid(
                "p_tuning",
                "encoder_hidden_size must be at least 1",
            ));
        }
        check_positions("p_tuning", self.input_keeps_positions, model)
    }

    /// Closed form of embedding plus encoder.
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        let (h, e, p) = (
            model.hidden_size,
            self.encoder_hidden_size,
            self.num_virtual_tokens,
        );
        let encoder = match self.encoder_type {
            PromptEncoderType::Lstm => {
                BiLstm::num_parameters(h, e, LSTM_LAYERS)
                    + (2 * e * 2 * e + 2 * e)
                    + (2 * e * h + h)
            }
            PromptEncoderType::Mlp => (h * e + e) + (e * e + e) + (e * h + h),
        };
        p * h + encoder
    }
}

/// P-Tuning attached to a model.
pub struct PTuning {
    embedding: Tensor,
    lstm: Option<BiLstm>,
    mlp: Vec<Linear>,
    keeps_positions: bool,
    encoder_type: PromptEncoderType,
    encoder_hidden_size: usize,
    params: TrainableParams,
}

impl PTuning {
    /// Creates the virtual-token embedding (N(0, 1), as PEFT) and the encoder.
    pub fn attach(config: &PTuningConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let dev = ctx.model.device().clone();
        let (h, e) = (ctx.model.config.hidden_size, config.encoder_hidden_size);
        let mut params = TrainableParams::new();
        let init = initial_prompt(
            &PromptInit::Random,
            config.num_virtual_tokens,
            ctx,
            "p_tuning",
        )?;
        let embedding = params.add("embedding", init)?;
        let mut linear =
            |name: &str, inp: usize, out: usize, params: &mut TrainableParams| -> Result<Linear> {
                Ok(Linear::new(
                    params.add(
                        format!("{name}.weight"),
                        ctx.init.kaiming_uniform(out, inp, &dev)?,
                    )?,
                    Some(params.add(
                        format!("{name}.bias"),
                        ctx.init.uniform(out, 1.0 / (inp as f64).sqrt(), &dev)?,
                    )?),
                ))
            };
        let (lstm, mlp) = match config.encoder_type {
            PromptEncoderType::Lstm => {
                let mlp = vec![
                    linear("mlp_head.0", 2 * e, 2 * e, &mut params)?,
                    linear("mlp_head.2", 2 * e, h, &mut params)?,
                ];
                let lstm = BiLstm::new(
                    "lstm_head",
                    h,
                    e,
                    LSTM_LAYERS,
                    &mut params,
                    &mut ctx.init,
                    &dev,
                )?;
                (Some(lstm), mlp)
            }
            PromptEncoderType::Mlp => (
                None,
                vec![
                    linear("mlp_head.0", h, e, &mut params)?,
                    linear("mlp_head.2", e, e, &mut params)?,
                    linear("mlp_head.4", e, h, &mut params)?,
                ],
            ),
        };
        Ok(Self {
            embedding,
            lstm,
            mlp,
            keeps_positions: config.input_keeps_positions,
            encoder_type: config.encoder_type,
            encoder_hidden_size: config.encoder_hidden_size,
            params,
        })
    }

    /// The encoded virtual tokens `[p, hidden]`.
    pub fn virtual_tokens(&self) -> candle_core::Result<Tensor> {
        let mut x = match &self.lstm {
            Some(l) => l.forward(&self.embedding)?,
            None => self.embedding.clone(),
        };
        let last = self.mlp.len() - 1;
        for (i, lin) in self.mlp.iter().enumerate() {
            x = lin.forward(&x)?;
            if i < last {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

impl Intervention for PTuning {
    fn input_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        if self.embedding.dims()[0] == 0 {
            return Ok(None);
        }
        self.virtual_tokens().map(Some)
    }

    fn input_prefix_shifts_positions(&self) -> bool {
        !self.keeps_positions
    }
}

impl Method for PTuning {
    fn name(&self) -> &'static str {
        "p_tuning"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    /// PEFT keeps the encoder's output, not the encoder: the prompt inference needs.
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if self.keeps_positions {
            return Ok(None);
        }
        let prompt = self.virtual_tokens()?.detach();
        let mut config = crate::peft::prompt_config(model, prompt.dims()[0]);
        let (kind, e) = (&self.encoder_type, self.encoder_hidden_size);
        config.insert(
            "encoder_reparameterization_type".into(),
            match kind {
                PromptEncoderType::Lstm => "LSTM",
                PromptEncoderType::Mlp => "MLP",
            }
            .into(),
        );
        config.insert("encoder_hidden_size".into(), e.into());
        config.insert("encoder_num_layers".into(), LSTM_LAYERS.into());
        config.insert("encoder_dropout".into(), 0.0.into());
        Ok(Some(PeftState {
            peft_type: "P_TUNING".into(),
            config,
            tensors: vec![(PeftKey::Top("prompt_embeddings".into()), prompt)],
        }))
    }
}

impl crate::MethodSpec for PTuningConfig {
    fn name(&self) -> &'static str {
        "p_tuning"
    }
    fn formula(&self) -> &'static str {
        match self.encoder_type {
            PromptEncoderType::Lstm => {
                "p·hidden + LSTM(2 layers, 2 directions, e) + 2·e·e + e + e·hidden + hidden"
            }
            PromptEncoderType::Mlp => "p·hidden + (hidden·e + e) + (e·e + e) + (e·hidden + hidden)",
        }
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        PTuningConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        Ok(PTuningConfig::num_trainable(self, &model.config))
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "encoder_hidden_size",
            value: self.encoder_hidden_size,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.encoder_hidden_size = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn crate::Method>> {
        Ok(Box::new(PTuning::attach(self, ctx)?))
    }
}
