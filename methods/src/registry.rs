//! Where methods are registered. Each method's configuration implements [`MethodSpec`] in its
//! own module; [`MethodConfig`], the tagged union configs parse into, delegates to it. Adding a
//! method is its module plus one line in [`methods!`] below.

use crate::{AttachContext, Method, Result};
use peftbench_backbone::{ModelConfig, Transformer};
use serde::{Deserialize, Serialize};

/// What a method's configuration knows about the method: its name, its count formula and
/// closed-form count, its size knob, how to check itself against a model, and how to attach.
pub trait MethodSpec {
    /// The method's name, as in configs (`method = "lora"`).
    fn name(&self) -> &'static str;
    /// The closed-form trainable-parameter count, as text.
    fn formula(&self) -> &'static str;
    /// Checks the configuration against a model.
    fn validate(&self, _model: &ModelConfig) -> Result<()> {
        Ok(())
    }
    /// The closed-form number of trainable parameters on this model (the task head excluded).
    fn num_trainable(&self, model: &Transformer) -> Result<usize>;
    /// The one integer the harness turns to match a parameter budget, if the method has one.
    fn knob(&self) -> Option<Knob> {
        None
    }
    /// Sets the size knob (and whatever must follow it).
    fn set_knob(&mut self, _value: usize) {}
    /// The budget label of a method whose size no budget sets (`full`, `none`).
    fn fixed_budget(&self) -> Option<&'static str> {
        None
    }
    /// Whether the method is in [`MethodConfig::defaults`] (controls such as head-only are not).
    fn in_defaults(&self) -> bool {
        true
    }
    /// Attaches the method to `ctx.model`, creating its variables; the configuration is valid.
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>>;
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

/// Declares [`MethodConfig`] with one variant per registered method and its delegation.
macro_rules! methods {
    ($($(#[$doc:meta])* $variant:ident($config:ty),)*) => {
        /// Any method's configuration, tagged by `method` in TOML or JSON (the variant's name in
        /// snake case).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "method", rename_all = "snake_case")]
        pub enum MethodConfig {
            $($(#[$doc])* $variant($config),)*
        }

        impl MethodConfig {
            /// The method's own configuration, behind its trait.
            pub fn spec(&self) -> &dyn MethodSpec {
                match self {
                    $(MethodConfig::$variant(c) => c,)*
                }
            }

            fn spec_mut(&mut self) -> &mut dyn MethodSpec {
                match self {
                    $(MethodConfig::$variant(c) => c,)*
                }
            }

            /// Every registered method with its default configuration, in registration order.
            fn registered() -> Vec<MethodConfig> {
                vec![$(MethodConfig::$variant(<$config>::default()),)*]
            }
        }

        $(impl From<$config> for MethodConfig {
            fn from(c: $config) -> Self {
                MethodConfig::$variant(c)
            }
        })*
    };
}

methods! {
    /// LoRA.
    Lora(crate::LoraConfig),
    /// LoRA+: LoRA with B at a multiple of A's learning rate.
    LoraPlus(crate::LoraPlusConfig),
    /// DoRA: LoRA with magnitude and direction trained apart.
    Dora(crate::DoraConfig),
    /// VeRA: shared frozen random factors, trained scaling vectors.
    Vera(crate::VeraConfig),
    /// LoHa: a Hadamard product of two low-rank products.
    Loha(crate::LohaConfig),
    /// LoKr: a Kronecker product of two factors.
    Lokr(crate::LokrConfig),
    /// AdaLoRA.
    Adalora(crate::AdaLoraConfig),
    /// Bottleneck adapters (Houlsby or Pfeiffer).
    Adapter(crate::AdapterConfig),
    /// Prefix tuning with MLP reparametrisation.
    PrefixTuning(crate::PrefixTuningConfig),
    /// Prompt tuning.
    PromptTuning(crate::PromptTuningConfig),
    /// P-Tuning (v1).
    PTuning(crate::PTuningConfig),
    /// P-Tuning v2 (deep prompts).
    PTuningV2(crate::PTuningV2Config),
    /// (IA)³: learned rescaling of keys, values and feed-forward activations.
    Ia3(crate::Ia3Config),
    /// LN tuning: only the norms train.
    LnTuning(crate::LnTuningConfig),
    /// BitFit: only the biases train.
    #[serde(rename = "bitfit")]
    BitFit(crate::BitFitConfig),
    /// Full fine-tuning: every weight trainable.
    FullFinetune(crate::FullFinetuneConfig),
    /// The control with nothing trainable but the task head; not among the defaults.
    HeadOnly(crate::HeadOnlyConfig),
}

impl MethodConfig {
    /// Every method with its default configuration (controls left out).
    pub fn defaults() -> Vec<MethodConfig> {
        Self::registered()
            .into_iter()
            .filter(|m| m.spec().in_defaults())
            .collect()
    }

    /// Every registered method, controls included (for listings).
    pub fn all() -> Vec<MethodConfig> {
        Self::registered()
    }

    /// Full fine-tuning.
    pub fn full_finetune() -> MethodConfig {
        MethodConfig::FullFinetune(crate::FullFinetuneConfig {})
    }

    /// The head-only control.
    pub fn head_only() -> MethodConfig {
        MethodConfig::HeadOnly(crate::HeadOnlyConfig {})
    }

    /// The budget label of a method whose size no budget sets (`full`, `none`), if it is one.
    pub fn fixed_budget(&self) -> Option<&'static str> {
        self.spec().fixed_budget()
    }

    /// The method's name, as in configs.
    pub fn name(&self) -> &'static str {
        self.spec().name()
    }

    /// The closed-form trainable-parameter count, as text.
    pub fn formula(&self) -> &'static str {
        self.spec().formula()
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.spec().validate(model)
    }

    /// The closed-form number of trainable parameters on a model of this shape.
    pub fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        self.spec().num_trainable(model)
    }

    /// Attaches the method, creating its variables.
    pub fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        self.validate(&ctx.model.config)?;
        self.spec().attach(ctx)
    }

    /// The size knob, if the method has one.
    pub fn knob(&self) -> Option<Knob> {
        self.spec().knob()
    }

    /// The same configuration with its size knob set to `value`.
    pub fn with_knob(&self, value: usize) -> MethodConfig {
        let mut c = self.clone();
        c.spec_mut().set_knob(value);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run hashes are taken over this JSON: the fixed-size methods must keep their old form.
    #[test]
    fn fixed_methods_serialise_as_the_tag_alone() {
        let ft = serde_json::to_string(&MethodConfig::full_finetune()).unwrap();
        assert_eq!(ft, r#"{"method":"full_finetune"}"#);
        let ho = serde_json::to_string(&MethodConfig::head_only()).unwrap();
        assert_eq!(ho, r#"{"method":"head_only"}"#);
        let back: MethodConfig = serde_json::from_str(&ft).unwrap();
        assert_eq!(back, MethodConfig::full_finetune());
        let t: MethodConfig = toml::from_str("method = \"head_only\"").unwrap();
        assert_eq!(t, MethodConfig::head_only());
    }

    #[test]
    fn a_fixed_method_refuses_a_size_key() {
        let e = toml::from_str::<MethodConfig>("method = \"full_finetune\"\nrank = 8").unwrap_err();
        assert!(e.to_string().contains("rank"), "{e}");
    }

    /// The tag a config is parsed by is the name the method reports.
    #[test]
    fn each_tag_is_the_methods_name() {
        for m in MethodConfig::all() {
            let v = serde_json::to_value(&m).unwrap();
            assert_eq!(v["method"], m.name(), "{m:?}");
        }
    }

    #[test]
    fn names_are_unique_and_defaults_leave_out_controls() {
        let mut names: Vec<&str> = MethodConfig::all().iter().map(|m| m.name()).collect();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        assert!(MethodConfig::defaults()
            .iter()
            .all(|m| m.name() != "head_only"));
        assert!(MethodConfig::all().iter().any(|m| m.name() == "head_only"));
    }
}
