//! Parameter-efficient fine-tuning methods. Each module holds one method whole: its
//! configuration, its parameters, the closed-form count of its trainable parameters, and how it
//! attaches to the backbone through the intervention points.

pub mod adalora;
pub mod adapter;
pub mod defaults;
pub mod error;
pub mod full_finetune;
pub mod head_only;
pub mod lora;
pub mod lstm;
pub mod p_tuning;
pub mod p_tuning_v2;
pub mod peft;
pub mod prefix_kv;
pub mod prefix_tuning;
pub mod prompt_tuning;

pub use adalora::{AdaLora, AdaLoraConfig};
pub use adapter::{Adapter, AdapterConfig, AdapterVariant};
pub use error::{MethodError, Result};
pub use full_finetune::FullFinetune;
pub use head_only::HeadOnly;
pub use lora::{Lora, LoraConfig};
pub use p_tuning::{PTuning, PTuningConfig, PromptEncoderType};
pub use p_tuning_v2::{PTuningV2, PTuningV2Config};
pub use prefix_tuning::{PrefixTable, PrefixTuning, PrefixTuningConfig};
pub use prompt_tuning::{PromptInit, PromptTuning, PromptTuningConfig};

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use peftbench_backbone::{
    Initializer, Intervention, ModelConfig, Proj, Site, TextTokenizer, TrainableParams, Transformer,
};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a method needs while attaching: the model (some methods change it), a seeded
/// initializer, and the tokenizer for text-initialised prompts.
pub struct AttachContext<'a> {
    /// The model the method attaches to.
    pub model: &'a mut Transformer,
    /// Draws initial values.
    pub init: Initializer,
    /// The seed `init` was made from (for per-method streams such as dropout).
    pub seed: u64,
    /// Tokenizer, for methods initialised from text.
    pub tokenizer: Option<&'a TextTokenizer>,
}

impl<'a> AttachContext<'a> {
    /// A context with a seeded initializer.
    pub fn new(model: &'a mut Transformer, seed: u64) -> Self {
        Self {
            model,
            init: Initializer::new(seed),
            seed,
            tokenizer: None,
        }
    }
}

/// A method attached to a model.
pub trait Method: Intervention {
    /// The method's name, as in configs.
    fn name(&self) -> &'static str;
    /// The variables it trains (not counting the task head).
    fn params(&self) -> &TrainableParams;
    /// Switches training-only behaviour (dropout) on or off.
    fn set_training(&self, _training: bool) {}
    /// A term added to the task loss (AdaLoRA's orthogonality regulariser).
    fn extra_loss(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Called after each optimizer step with that step's gradients (AdaLoRA's rank allocation).
    fn after_step(&mut self, _step: usize, _grads: &GradStore) -> Result<()> {
        Ok(())
    }
    /// Folds the method into the base weights for inference; false if it cannot.
    fn merge_into(&self, _model: &mut Transformer) -> Result<bool> {
        Ok(false)
    }
    /// Undoes [`Method::merge_into`]; false if the method never merges.
    fn unmerge_from(&self, _model: &mut Transformer) -> Result<bool> {
        Ok(false)
    }
    /// Writes what must be kept of the method (its parameters, or an exported form).
    fn save(&self, path: &Path) -> Result<()> {
        Ok(self.params().save(path)?)
    }
    /// Restores what [`Method::save`] wrote.
    fn load(&mut self, path: &Path) -> Result<()> {
        Ok(self.params().load(path)?)
    }
    /// Method-specific facts for the run record (AdaLoRA's final ranks).
    fn summary(&self) -> Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
    /// What PEFT's on-disk format keeps of the method ([`peft::write`] names and writes it);
    /// None for a method the format cannot express (full fine-tuning, the head alone).
    fn peft_state(
        &self,
        _model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<peft::PeftState>> {
        Ok(None)
    }
}

/// The projections a method targets, by name (`query`, `value`, `q_proj`, … or `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Targets(pub Vec<String>);

impl Default for Targets {
    /// Query and value, PEFT's default for BERT-, GPT-2- and Llama-style models.
    fn default() -> Self {
        Targets(vec!["query".into(), "value".into()])
    }
}

impl Targets {
    /// Every (layer, projection) site named, checked against the model.
    pub fn sites(&self, model: &ModelConfig, method: &'static str) -> Result<Vec<Site>> {
        if self.0.is_empty() {
            return Err(error::invalid(method, "target_modules is empty"));
        }
        let has_gate = model.family == peftbench_backbone::Family::Llama;
        let mut projs = Vec::new();
        for name in &self.0 {
            if name == "all-linear" {
                projs.extend(
                    Proj::ALL
                        .iter()
                        .copied()
                        .filter(|p| *p != Proj::Gate || has_gate),
                );
                continue;
            }
            let p = Proj::parse(name).ok_or_else(|| {
                error::invalid(method, format!("unknown target module `{name}` (query, key, value, attn_out, up, gate, down, all-linear)"))
            })?;
            if p == Proj::Gate && !has_gate {
                return Err(error::invalid(
                    method,
                    format!("target module `{name}`: this model has no gate projection"),
                ));
            }
            projs.push(p);
        }
        projs.sort();
        projs.dedup();
        Ok((0..model.num_layers)
            .flat_map(|layer| projs.iter().map(move |&proj| Site { layer, proj }))
            .collect())
    }
}

/// `(in, out)` of a projection in a model of this shape.
pub fn site_shape(model: &ModelConfig, proj: Proj) -> (usize, usize) {
    let h = model.hidden_size;
    let kv = model.num_kv_heads * model.head_dim();
    let f = model.intermediate_size;
    match proj {
        Proj::Query | Proj::AttnOut => (h, h),
        Proj::Key | Proj::Value => (h, kv),
        Proj::Up | Proj::Gate => (h, f),
        Proj::Down => (f, h),
    }
}

/// Any method's configuration, tagged by `method` in TOML or JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MethodConfig {
    /// LoRA.
    Lora(LoraConfig),
    /// AdaLoRA.
    Adalora(AdaLoraConfig),
    /// Bottleneck adapters (Houlsby or Pfeiffer).
    Adapter(AdapterConfig),
    /// Prefix tuning with MLP reparametrisation.
    PrefixTuning(PrefixTuningConfig),
    /// Prompt tuning.
    PromptTuning(PromptTuningConfig),
    /// P-Tuning (v1).
    PTuning(PTuningConfig),
    /// P-Tuning v2 (deep prompts).
    PTuningV2(PTuningV2Config),
    /// Full fine-tuning: every weight trainable.
    FullFinetune,
    /// The control with nothing trainable but the task head; not among [`MethodConfig::defaults`].
    HeadOnly,
}

/// A method's size knob: the one integer the harness turns to match a parameter budget.
/// Prefix tuning's is the MLP width, which dominates its trainable count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Knob {
    /// The knob's name (`rank`, `bottleneck`, `num_virtual_tokens`, …).
    pub name: &'static str,
    /// Its current value.
    pub value: usize,
}

impl MethodConfig {
    /// Every method with its default configuration.
    pub fn defaults() -> Vec<MethodConfig> {
        vec![
            MethodConfig::Lora(LoraConfig::default()),
            MethodConfig::Adalora(AdaLoraConfig::default()),
            MethodConfig::Adapter(AdapterConfig::default()),
            MethodConfig::PrefixTuning(PrefixTuningConfig::default()),
            MethodConfig::PromptTuning(PromptTuningConfig::default()),
            MethodConfig::PTuning(PTuningConfig::default()),
            MethodConfig::PTuningV2(PTuningV2Config::default()),
            MethodConfig::FullFinetune,
        ]
    }

    /// The budget label of a method whose size no budget sets (`full`, `none`), if it is one.
    pub fn fixed_budget(&self) -> Option<&'static str> {
        match self {
            MethodConfig::FullFinetune => Some("full"),
            MethodConfig::HeadOnly => Some("none"),
            _ => None,
        }
    }

    /// The method's name, as in configs.
    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "lora",
            MethodConfig::Adalora(_) => "adalora",
            MethodConfig::Adapter(_) => "adapter",
            MethodConfig::PrefixTuning(_) => "prefix_tuning",
            MethodConfig::PromptTuning(_) => "prompt_tuning",
            MethodConfig::PTuning(_) => "p_tuning",
            MethodConfig::PTuningV2(_) => "p_tuning_v2",
            MethodConfig::FullFinetune => "full_finetune",
            MethodConfig::HeadOnly => "head_only",
        }
    }

    /// The closed-form trainable-parameter count, as text.
    pub fn formula(&self) -> &'static str {
        match self {
            MethodConfig::Lora(_) => "Σ_targets r·(in + out)",
            MethodConfig::Adalora(_) => "Σ_targets init_r·(in + out + 1)",
            MethodConfig::Adapter(c) => match c.variant {
                AdapterVariant::Houlsby => "layers · 2 · (2·hidden·bottleneck + bottleneck + hidden)",
                AdapterVariant::Pfeiffer => "layers · (2·hidden·bottleneck + bottleneck + hidden)",
            },
            MethodConfig::PrefixTuning(_) => {
                "p·hidden + (hidden·mid + mid) + (mid·2·layers·kv_dim + 2·layers·kv_dim); kept: p·2·layers·kv_dim"
            }
            MethodConfig::PromptTuning(_) => "p·hidden",
            MethodConfig::PTuning(c) => match c.encoder_type {
                PromptEncoderType::Lstm => {
                    "p·hidden + LSTM(2 layers, 2 directions, e) + 2·e·e + e + e·hidden + hidden"
                }
                PromptEncoderType::Mlp => "p·hidden + (hidden·e + e) + (e·e + e) + (e·hidden + hidden)",
            },
            MethodConfig::PTuningV2(_) => "p·2·layers·kv_dim",
            MethodConfig::FullFinetune => "every backbone weight",
            MethodConfig::HeadOnly => "0 (only the task head trains)",
        }
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        match self {
            MethodConfig::Lora(c) => c.validate(model),
            MethodConfig::Adalora(c) => c.validate(model),
            MethodConfig::Adapter(c) => c.validate(model),
            MethodConfig::PrefixTuning(c) => c.validate(model),
            MethodConfig::PromptTuning(c) => c.validate(model),
            MethodConfig::PTuning(c) => c.validate(model),
            MethodConfig::PTuningV2(c) => c.validate(model),
            MethodConfig::FullFinetune | MethodConfig::HeadOnly => Ok(()),
        }
    }

    /// The closed-form number of trainable parameters on a model of this shape.
    pub fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        let cfg = &model.config;
        match self {
            MethodConfig::Lora(c) => c.num_trainable(cfg),
            MethodConfig::Adalora(c) => c.num_trainable(cfg),
            MethodConfig::Adapter(c) => Ok(c.num_trainable(cfg)),
            MethodConfig::PrefixTuning(c) => Ok(c.num_trainable(cfg)),
            MethodConfig::PromptTuning(c) => Ok(c.num_trainable(cfg)),
            MethodConfig::PTuning(c) => Ok(c.num_trainable(cfg)),
            MethodConfig::PTuningV2(c) => Ok(c.num_trainable(cfg)),
            MethodConfig::FullFinetune => Ok(model.num_parameters()),
            MethodConfig::HeadOnly => Ok(0),
        }
    }

    /// Attaches the method, creating its variables.
    pub fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        self.validate(&ctx.model.config)?;
        Ok(match self {
            MethodConfig::Lora(c) => Box::new(Lora::attach(c, ctx)?),
            MethodConfig::Adalora(c) => Box::new(AdaLora::attach(c, ctx)?),
            MethodConfig::Adapter(c) => Box::new(Adapter::attach(c, ctx)?),
            MethodConfig::PrefixTuning(c) => Box::new(PrefixTuning::attach(c, ctx)?),
            MethodConfig::PromptTuning(c) => Box::new(PromptTuning::attach(c, ctx)?),
            MethodConfig::PTuning(c) => Box::new(PTuning::attach(c, ctx)?),
            MethodConfig::PTuningV2(c) => Box::new(PTuningV2::attach(c, ctx)?),
            MethodConfig::FullFinetune => Box::new(FullFinetune::attach(ctx)?),
            MethodConfig::HeadOnly => Box::new(HeadOnly::attach(ctx)),
        })
    }

    /// The size knob, if the method has one.
    pub fn knob(&self) -> Option<Knob> {
        let k = |name, value| Some(Knob { name, value });
        match self {
            MethodConfig::Lora(c) => k("rank", c.rank),
            MethodConfig::Adalora(c) => k("target_r", c.target_r),
            MethodConfig::Adapter(c) => k("bottleneck", c.bottleneck),
            MethodConfig::PrefixTuning(c) => k("encoder_hidden_size", c.encoder_hidden_size),
            MethodConfig::PromptTuning(c) => k("num_virtual_tokens", c.num_virtual_tokens),
            MethodConfig::PTuning(c) => k("encoder_hidden_size", c.encoder_hidden_size),
            MethodConfig::PTuningV2(c) => k("num_virtual_tokens", c.num_virtual_tokens),
            MethodConfig::FullFinetune | MethodConfig::HeadOnly => None,
        }
    }

    /// The same configuration with its size knob set to `value`.
    pub fn with_knob(&self, value: usize) -> MethodConfig {
        let mut c = self.clone();
        match &mut c {
            MethodConfig::Lora(x) => x.rank = value,
            MethodConfig::Adalora(x) => {
                // The budget falls from init_r to target_r; keep PEFT's 1.5× head room.
                x.target_r = value;
                x.init_r = (value * 3).div_ceil(2).max(value + 1);
            }
            MethodConfig::Adapter(x) => x.bottleneck = value,
            MethodConfig::PrefixTuning(x) => x.encoder_hidden_size = value,
            MethodConfig::PromptTuning(x) => x.num_virtual_tokens = value,
            MethodConfig::PTuning(x) => x.encoder_hidden_size = value,
            MethodConfig::PTuningV2(x) => x.num_virtual_tokens = value,
            MethodConfig::FullFinetune | MethodConfig::HeadOnly => {}
        }
        c
    }
}
