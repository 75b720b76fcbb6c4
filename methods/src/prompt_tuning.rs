//! Prompt tuning (Lester et al. 2021): a trainable soft prompt prepended to the input
//! embeddings, at the input layer only.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method};
use candle_core::Tensor;
use peftbench_backbone::{Intervention, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};

/// How the soft prompt starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PromptInit {
    /// N(0, 1), as PEFT's `RANDOM`.
    Random,
    /// Embeddings of vocabulary tokens drawn at random (PEFT's `SAMPLE_VOCAB`).
    SampleVocab,
    /// Embeddings of a text's tokens, repeated or cut to length (PEFT's `TEXT`).
    Text {
        /// The initialising text.
        text: String,
    },
}

/// Prompt-tuning configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptTuningConfig {
    /// Soft-prompt length p.
    #[serde(default = "crate::defaults::num_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Initialisation.
    #[serde(default = "d_init")]
    pub init: PromptInit,
    /// Keep the input at its own positions and give the prompt none. By default the prompt
    /// takes the first positions, as PEFT concatenates it before the input embeddings, which
    /// moves an absolute-position model's input along by the prompt length.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_keeps_positions: bool,
}

fn d_init() -> PromptInit {
    PromptInit::SampleVocab
}

impl Default for PromptTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            init: d_init(),
            input_keeps_positions: false,
        }
    }
}

impl PromptTuningConfig {
    /// Checks the configuration.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if let PromptInit::Text { text } = &self.init {
            if text.trim().is_empty() {
                return Err(invalid("prompt_tuning", "init text is empty"));
            }
        }
        check_positions("prompt_tuning", self.input_keeps_positions, model)
    }

    /// Closed form: p·hidden.
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        self.num_virtual_tokens * model.hidden_size
    }
}

/// `input_keeps_positions` needs a position table the input can keep (shared with P-Tuning).
pub(crate) fn check_positions(
    method: &'static str,
    input_keeps_positions: bool,
    model: &ModelConfig,
) -> Result<()> {
    if input_keeps_positions && !model.has_learned_positions() {
        return Err(invalid(
            method,
            format!(
                "input_keeps_positions needs learned absolute positions; this {:?} model has rotary ones",
                model.family
            ),
        ));
    }
    Ok(())
}

/// Builds `[p, hidden]` initial prompt vectors (shared with P-Tuning's embedding).
pub(crate) fn initial_prompt(
    init: &PromptInit,
    p: usize,
    ctx: &mut AttachContext,
    method: &'static str,
) -> Result<Tensor> {
    let dev = ctx.model.device().clone();
    let h = ctx.model.config.hidden_size;
    let vocab = ctx.model.config.vocab_size;
    let ids: Vec<u32> = match init {
        PromptInit::Random => return Ok(ctx.init.normal((p, h), 1.0, &dev)?),
        PromptInit::SampleVocab => (0..p).map(|_| ctx.init.index(vocab) as u32).collect(),
        PromptInit::Text { text } => {
            let tok = ctx.tokenizer.ok_or_else(|| {
                invalid(method, "text initialisation needs the model's tokenizer")
            })?;
            let t = tok.encode_ids(text, false)?;
            if t.is_empty() {
                return Err(invalid(method, format!("init text `{text}` has no tokens")));
            }
            (0..p).map(|i| t[i % t.len()]).collect()
        }
    };
    if p == 0 {
        return Ok(Tensor::zeros((0, h), candle_core::DType::F32, &dev)?);
    }
    let ids = Tensor::from_vec(ids, p, &dev)?;
    Ok(ctx.model.embeddings.word.index_select(&ids, 0)?.detach())
}

/// Prompt tuning attached to a model.
pub struct PromptTuning {
    prompt: Tensor,
    keeps_positions: bool,
    params: TrainableParams,
}

impl PromptTuning {
    /// Creates the soft prompt.
    pub fn attach(config: &PromptTuningConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let init = initial_prompt(
            &config.init,
            config.num_virtual_tokens,
            ctx,
            "prompt_tuning",
        )?;
        let mut params = TrainableParams::new();
        let prompt = params.add("prompt", init)?;
        Ok(Self {
            prompt,
            keeps_positions: config.input_keeps_positions,
            params,
        })
    }
}

impl Intervention for PromptTuning {
    fn input_prefix(&self) -> candle_core::Result<Option<Tensor>> {
        Ok((self.prompt.dims()[0] > 0).then(|| self.prompt.clone()))
    }

    fn input_prefix_shifts_positions(&self) -> bool {
        !self.keeps_positions
    }
}

impl Method for PromptTuning {
    fn name(&self) -> &'static str {
        "prompt_tuning"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        // PEFT always moves the input along by the prompt; it has no kept-positions form.
        if self.keeps_positions {
            return Ok(None);
        }
        let mut config = crate::peft::prompt_config(model, self.prompt.dims()[0]);
        config.insert("prompt_tuning_init".into(), "RANDOM".into());
        Ok(Some(PeftState {
            peft_type: "PROMPT_TUNING".into(),
            config,
            tensors: vec![(
                PeftKey::Top("prompt_embeddings".into()),
                self.prompt.detach(),
            )],
        }))
    }
}

impl PromptTuning {
    /// A soft prompt read from PEFT's format: PROMPT_TUNING's embeddings, or P_TUNING's
    /// encoder output (which is what PEFT saves and uses at inference).
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        let prompt = crate::peft::read_prompt_embeddings(r, model.hidden_size)?;
        let mut params = TrainableParams::new();
        let prompt = params.add("prompt", prompt)?;
        Ok(Self {
            prompt,
            keeps_positions: false,
            params,
        })
    }
}

impl crate::MethodSpec for PromptTuningConfig {
    fn name(&self) -> &'static str {
        "prompt_tuning"
    }
    fn formula(&self) -> &'static str {
        "p·hidden"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        PromptTuningConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        Ok(PromptTuningConfig::num_trainable(self, &model.config))
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
        Ok(Box::new(PromptTuning::attach(self, ctx)?))
    }
}
