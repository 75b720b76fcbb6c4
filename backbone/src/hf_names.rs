//! Hugging Face module names of the backbone's parts, as transformers' task models nest them:
//! what an adapter saved for (or by) PEFT calls each projection and head.

use crate::config::{Family, ModelConfig};
use crate::intervention::{NormSite, Proj, Site};

/// The transformers model class an adapter belongs to (PEFT's `task_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfTask {
    /// `*ForSequenceClassification`: the backbone plus `classifier` (encoders) or `score`.
    SeqCls,
    /// `*ForCausalLM` / `GPT2LMHeadModel`.
    CausalLm,
    /// The bare backbone (`BertModel`, `GPT2Model`, `LlamaModel`).
    FeatureExtraction,
}

impl HfTask {
    /// PEFT's name for it.
    pub fn peft_name(self) -> &'static str {
        match self {
            HfTask::SeqCls => "SEQ_CLS",
            HfTask::CausalLm => "CAUSAL_LM",
            HfTask::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }

    /// Parses PEFT's `task_type` (a missing one is the bare backbone).
    pub fn from_peft_name(name: Option<&str>) -> Option<Self> {
        match name {
            Some("SEQ_CLS") => Some(HfTask::SeqCls),
            Some("CAUSAL_LM") => Some(HfTask::CausalLm),
            Some("FEATURE_EXTRACTION") | None => Some(HfTask::FeatureExtraction),
            Some(_) => None,
        }
    }
}

/// The attribute under which a task model holds the backbone (`bert.`, `roberta.`,
/// `transformer.`, `model.`), or nothing for the bare backbone.
pub fn base_prefix(cfg: &ModelConfig, task: HfTask) -> String {
    if task == HfTask::FeatureExtraction {
        return String::new();
    }
    match cfg.family {
        Family::Bert => match cfg.model_type.as_str() {
            "bert" => "bert.".into(),
            // RobertaForSequenceClassification and XLMRobertaFor… both call it `roberta`.
            _ => "roberta.".into(),
        },
        Family::Gpt2 => "transformer.".into(),
        Family::Llama => "model.".into(),
    }
}

/// Whether query, key and value live in one fused module (GPT-2's `c_attn`).
pub fn fused_qkv(cfg: &ModelConfig) -> bool {
    cfg.family == Family::Gpt2
}

/// The module's leaf name as `target_modules` lists it (`query`, `c_attn`, `q_proj`).
pub fn target_name(cfg: &ModelConfig, proj: Proj) -> &'static str {
    match (cfg.family, proj) {
        (Family::Bert, Proj::Query) => "query",
        (Family::Bert, Proj::Key) => "key",
        (Family::Bert, Proj::Value) => "value",
        // `output.dense` and `attention.output.dense` share the leaf `dense`.
        (Family::Bert, Proj::AttnOut) | (Family::Bert, Proj::Up) | (Family::Bert, Proj::Down) => {
            "dense"
        }
        (Family::Bert, Proj::Gate) => "gate",
        (Family::Gpt2, Proj::Query | Proj::Key | Proj::Value) => "c_attn",
        (Family::Gpt2, Proj::AttnOut) => "c_proj",
        (Family::Gpt2, Proj::Up) => "c_fc",
        (Family::Gpt2, Proj::Down) => "c_proj",
        (Family::Gpt2, Proj::Gate) => "gate",
        (Family::Llama, Proj::Query) => "q_proj",
        (Family::Llama, Proj::Key) => "k_proj",
        (Family::Llama, Proj::Value) => "v_proj",
        (Family::Llama, Proj::AttnOut) => "o_proj",
        (Family::Llama, Proj::Up) => "up_proj",
        (Family::Llama, Proj::Gate) => "gate_proj",
        (Family::Llama, Proj::Down) => "down_proj",
    }
}

/// The module path of a projection inside the backbone (no task prefix), e.g.
/// `encoder.layer.0.attention.self.query`, `h.0.attn.c_attn`, `layers.0.self_attn.q_proj`.
pub fn module_path(cfg: &ModelConfig, site: Site) -> String {
    let l = site.layer;
    let leaf = target_name(cfg, site.proj);
    match cfg.family {
        Family::Bert => match site.proj {
            Proj::Query | Proj::Key | Proj::Value => {
                format!("encoder.layer.{l}.attention.self.{leaf}")
            }
            Proj::AttnOut => format!("encoder.layer.{l}.attention.output.dense"),
            Proj::Up => format!("encoder.layer.{l}.intermediate.dense"),
            Proj::Down | Proj::Gate => format!("encoder.layer.{l}.output.dense"),
        },
        Family::Gpt2 => match site.proj {
            Proj::Query | Proj::Key | Proj::Value | Proj::AttnOut => format!("h.{l}.attn.{leaf}"),
            Proj::Up | Proj::Down | Proj::Gate => format!("h.{l}.mlp.{leaf}"),
        },
        Family::Llama => match site.proj {
            Proj::Query | Proj::Key | Proj::Value | Proj::AttnOut => {
                format!("layers.{l}.self_attn.{leaf}")
            }
            Proj::Up | Proj::Gate | Proj::Down => format!("layers.{l}.mlp.{leaf}"),
        },
    }
}

/// The module path of a norm inside the backbone (`encoder.layer.0.output.LayerNorm`,
/// `h.0.ln_2`, `layers.0.post_attention_layernorm`); None where the family has no such norm.
pub fn norm_path(cfg: &ModelConfig, site: NormSite) -> Option<String> {
    Some(match (cfg.family, site) {
        (Family::Bert, NormSite::Embeddings) => "embeddings.LayerNorm".into(),
        (Family::Bert, NormSite::Attention(l)) => {
            format!("encoder.layer.{l}.attention.output.LayerNorm")
        }
        (Family::Bert, NormSite::Ffn(l)) => format!("encoder.layer.{l}.output.LayerNorm"),
        (Family::Gpt2, NormSite::Attention(l)) => format!("h.{l}.ln_1"),
        (Family::Gpt2, NormSite::Ffn(l)) => format!("h.{l}.ln_2"),
        (Family::Gpt2, NormSite::Final) => "ln_f".into(),
        (Family::Llama, NormSite::Attention(l)) => format!("layers.{l}.input_layernorm"),
        (Family::Llama, NormSite::Ffn(l)) => format!("layers.{l}.post_attention_layernorm"),
        (Family::Llama, NormSite::Final) => "norm".into(),
        _ => return None,
    })
}

/// The module path of one transformer layer inside the backbone (`encoder.layer.3`, `h.3`,
/// `layers.3`).
pub fn layer_path(cfg: &ModelConfig, layer: usize) -> String {
    match cfg.family {
        Family::Bert => format!("encoder.layer.{layer}"),
        Family::Gpt2 => format!("h.{layer}"),
        Family::Llama => format!("layers.{layer}"),
    }
}

/// The sequence head's module in a `*ForSequenceClassification` model.
pub fn head_module(cfg: &ModelConfig) -> &'static str {
    match cfg.family {
        Family::Bert => "classifier",
        Family::Gpt2 | Family::Llama => "score",
    }
}
