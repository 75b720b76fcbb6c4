//! Parameter-efficient fine-tuning methods. Each module holds one method whole: its
//! configuration, its parameters, the closed-form count of its trainable parameters, and how it
//! attaches to the backbone through the intervention points.

pub mod adalora;
pub mod adapter;
pub mod bitfit;
pub mod defaults;
mod dense_delta;
pub mod dora;
pub mod error;
pub mod full_finetune;
pub mod head_only;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lora_init;
pub mod lstm;
pub mod p_tuning;
pub mod p_tuning_v2;
pub mod peft;
pub mod prefix_kv;
pub mod prefix_tuning;
pub mod prompt_tuning;
mod registry;
#[cfg(test)]
mod test_util;
pub mod vera;

pub use adalora::{AdaLora, AdaLoraConfig};
pub use adapter::{Adapter, AdapterConfig, AdapterVariant};
pub use bitfit::{BitFit, BitFitConfig};
pub use dora::{Dora, DoraConfig};
pub use error::{MethodError, Result};
pub use full_finetune::{FullFinetune, FullFinetuneConfig};
pub use head_only::{HeadOnly, HeadOnlyConfig};
pub use ia3::{Ia3, Ia3Config};
pub use ln_tuning::{LnTuning, LnTuningConfig};
pub use loha::{Loha, LohaConfig};
pub use lokr::{Lokr, LokrConfig};
pub use lora::{Lora, LoraConfig, LoraPlusConfig};
pub use lora_init::LoraInit;
pub use p_tuning::{PTuning, PTuningConfig, PromptEncoderType};
pub use p_tuning_v2::{PTuningV2, PTuningV2Config};
pub use prefix_tuning::{PrefixTable, PrefixTuning, PrefixTuningConfig};
pub use prompt_tuning::{PromptInit, PromptTuning, PromptTuningConfig};
pub use registry::{Knob, MethodConfig, MethodSpec};
pub use vera::{Vera, VeraConfig};

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
    /// The trained variables in optimizer groups, each with its multiple of the learning
    /// rate (LoRA+ trains B faster than A). Every variable of [`Method::params`] is in exactly
    /// one group.
    fn lr_groups(&self) -> Vec<(Vec<candle_core::Var>, f64)> {
        vec![(self.params().vars(), 1.0)]
    }
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
