//! Model configuration read from a Hugging Face `config.json`.

use crate::error::{BackboneError, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// The architecture family: decides norm placement, positions, activation and weight names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// BERT-style post-norm encoder (BERT, MiniLM, RoBERTa).
    Bert,
    /// GPT-2-style pre-norm decoder with learned positions (GPT-2, GPT-BigCode).
    Gpt2,
    /// Llama-style pre-norm decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.
    Llama,
}

/// The feed-forward nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (BERT's "gelu").
    GeluErf,
    /// Tanh-approximated GELU (GPT-2's "gelu_new").
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU, used gated (SwiGLU) in Llama.
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" | "gelu_python" => Some(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// The name Hugging Face uses for this activation.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::GeluErf => "gelu",
            Self::GeluTanh => "gelu_new",
            Self::Relu => "relu",
            Self::Silu => "silu",
        }
    }
}

/// How the GPT-2 family stores its fused query/key/value projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvLayout {
    /// GPT-2: Conv1D weight `[in, 3·hidden]`, output `[q | k | v]`.
    Gpt2Conv1d,
    /// GPT-BigCode: Linear weight `[out, in]`; multi-head output interleaved per head
    /// `[h0: q k v | h1: q k v | …]`, multi-query output `[q | k | v]`.
    BigCodeLinear,
}

/// Everything the backbone needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Architecture family.
    pub family: Family,
    /// The `model_type` string from config.json.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden (model) width.
    pub hidden_size: usize,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Number of query heads.
    pub num_heads: usize,
    /// Number of key/value heads (fewer than `num_heads` for grouped-query attention).
    pub num_kv_heads: usize,
    /// Feed-forward inner width.
    pub intermediate_size: usize,
    /// Longest sequence the position table (or RoPE cache) covers.
    pub max_position_embeddings: usize,
    /// Number of token types (BERT segment ids); 0 where the family has none.
    pub type_vocab_size: usize,
    /// Epsilon of every norm.
    pub norm_eps: f64,
    /// Feed-forward nonlinearity.
    pub activation: Activation,
    /// RoPE base (Llama).
    pub rope_theta: f64,
    /// Whether the LM head reuses the word-embedding matrix.
    pub tie_word_embeddings: bool,
    /// Padding token id, where the config names one.
    pub pad_token_id: Option<u32>,
    /// First position id (RoBERTa starts at `pad_token_id + 1`).
    pub position_offset: usize,
    /// Fused-QKV storage of the GPT-2 family.
    pub qkv_layout: QkvLayout,
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Whether positions come from a learned absolute table (BERT, GPT-2), not RoPE.
    pub fn has_learned_positions(&self) -> bool {
        self.family != Family::Llama
    }

    /// Whether attention is causal (decoders).
    pub fn is_causal(&self) -> bool {
        self.family != Family::Bert
    }

    /// Reads and validates a Hugging Face config.json.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| BackboneError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| BackboneError::Config {
            path: path.to_path_buf(),
            message: format!(
                "invalid JSON at line {} column {}: {e}",
                e.line(),
                e.column()
            ),
        })?;
        Self::from_json(&value, path)
    }

    /// Builds a config from parsed config.json; `path` only names the file in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let cfg = Reader { v, path };
        let model_type = cfg.str("model_type")?;
        let family = match model_type.as_str() {
            "bert" | "roberta" | "xlm-roberta" => Family::Bert,
            "gpt2" | "gpt_bigcode" => Family::Gpt2,
            "llama" | "mistral" => Family::Llama,
            _ => {
                return Err(BackboneError::UnknownArchitecture {
                    path: path.to_path_buf(),
                    found: model_type,
                })
            }
        };
        let config = match family {
            Family::Bert => {
                let pad = cfg.opt_usize("pad_token_id")?;
                let roberta = model_type != "bert";
                Self {
                    family,
                    vocab_size: cfg.usize("vocab_size")?,
                    hidden_size: cfg.usize("hidden_size")?,
                    num_layers: cfg.usize("num_hidden_layers")?,
                    num_heads: cfg.usize("num_attention_heads")?,
                    num_kv_heads: cfg.usize("num_attention_heads")?,
                    intermediate_size: cfg.usize("intermediate_size")?,
                    max_position_embeddings: cfg.usize("max_position_embeddings")?,
                    type_vocab_size: cfg.opt_usize("type_vocab_size")?.unwrap_or(2),
                    norm_eps: cfg.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
                    activation: cfg.activation("hidden_act", "gelu")?,
                    rope_theta: 0.0,
                    tie_word_embeddings: true,
                    pad_token_id: pad.map(|p| p as u32),
                    position_offset: if roberta { pad.unwrap_or(1) + 1 } else { 0 },
                    qkv_layout: QkvLayout::Gpt2Conv1d,
                    model_type,
                }
            }
            Family::Gpt2 => {
                let hidden = cfg.usize_any(&["n_embd", "hidden_size"])?;
                let heads = cfg.usize_any(&["n_head", "num_attention_heads"])?;
                let bigcode = model_type == "gpt_bigcode";
                let multi_query = bigcode && cfg.opt_bool("multi_query")?.unwrap_or(true);
                Self {
                    family,
                    vocab_size: cfg.usize("vocab_size")?,
                    hidden_size: hidden,
                    num_layers: cfg.usize_any(&["n_layer", "num_hidden_layers"])?,
                    num_heads: heads,
                    num_kv_heads: if multi_query { 1 } else { heads },
                    intermediate_size: cfg.opt_usize("n_inner")?.unwrap_or(4 * hidden),
                    max_position_embeddings: cfg
                        .usize_any(&["n_positions", "max_position_embeddings"])?,
                    type_vocab_size: 0,
                    norm_eps: cfg.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
                    activation: cfg.activation("activation_function", "gelu_new")?,
                    rope_theta: 0.0,
                    tie_word_embeddings: cfg.opt_bool("tie_word_embeddings")?.unwrap_or(true),
                    pad_token_id: cfg.opt_usize("pad_token_id")?.map(|p| p as u32),
                    position_offset: 0,
                    qkv_layout: if bigcode {
                        QkvLayout::BigCodeLinear
                    } else {
                        QkvLayout::Gpt2Conv1d
                    },
                    model_type,
                }
            }
            Family::Llama => {
                let heads = cfg.usize("num_attention_heads")?;
                Self {
                    family,
                    vocab_size: cfg.usize("vocab_size")?,
                    hidden_size: cfg.usize("hidden_size")?,
                    num_layers: cfg.usize("num_hidden_layers")?,
                    num_heads: heads,
                    num_kv_heads: cfg.opt_usize("num_key_value_heads")?.unwrap_or(heads),
                    intermediate_size: cfg.usize("intermediate_size")?,
                    max_position_embeddings: cfg.usize("max_position_embeddings")?,
                    type_vocab_size: 0,
                    norm_eps: cfg.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
                    activation: cfg.activation("hidden_act", "silu")?,
                    rope_theta: cfg.opt_f64("rope_theta")?.unwrap_or(10_000.0),
                    tie_word_embeddings: cfg.opt_bool("tie_word_embeddings")?.unwrap_or(false),
                    pad_token_id: cfg.opt_usize("pad_token_id")?.map(|p| p as u32),
                    position_offset: 0,
                    qkv_layout: QkvLayout::Gpt2Conv1d,
                    model_type,
                }
            }
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| {
            Err(BackboneError::Config {
                path: path.to_path_buf(),
                message,
            })
        };
        if self.hidden_size == 0 || self.num_heads == 0 || self.num_layers == 0 {
            return bad("hidden size, heads and layers must be positive".into());
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} heads are not divisible into {} key/value heads",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.family == Family::Llama && !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "RoPE needs an even head size, got {}",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Writes this config as a Hugging Face config.json value that [`Self::from_json`] reads back.
    pub fn to_hf_json(&self) -> Value {
        use serde_json::json;
        match self.family {
            Family::Bert => json!({
                "architectures": ["BertModel"], "model_type": self.model_type,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings,
                "type_vocab_size": self.type_vocab_size, "layer_norm_eps": self.norm_eps,
                "hidden_act": self.activation.hf_name(), "pad_token_id": self.pad_token_id,
            }),
            Family::Gpt2 => json!({
                "architectures": ["GPT2LMHeadModel"], "model_type": self.model_type,
                "vocab_size": self.vocab_size, "n_embd": self.hidden_size,
                "n_layer": self.num_layers, "n_head": self.num_heads,
                "n_inner": self.intermediate_size, "n_positions": self.max_position_embeddings,
                "layer_norm_epsilon": self.norm_eps,
                "activation_function": self.activation.hf_name(),
                "multi_query": self.num_kv_heads == 1 && self.num_heads > 1,
                "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id,
            }),
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"], "model_type": self.model_type,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                "hidden_act": self.activation.hf_name(),
                "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id,
            }),
        }
    }
}

/// Typed access to config.json keys with errors that name the file and key.
struct Reader<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Reader<'_> {
    fn err(&self, message: String) -> BackboneError {
        BackboneError::Config {
            path: self.path.to_path_buf(),
            message,
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<String> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(format!("key `{key}` should be a string, found {other}"))),
            None => Err(self.err(format!("missing key `{key}`"))),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.err(format!(
                    "key `{key}` should be a non-negative integer, found {v}"
                ))
            }),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.err(format!("missing key `{key}`")))
    }

    fn usize_any(&self, keys: &[&str]) -> Result<usize> {
        for key in keys {
            if let Some(n) = self.opt_usize(key)? {
                return Ok(n);
            }
        }
        Err(self.err(format!("missing key `{}`", keys.join("` or `"))))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("key `{key}` should be a number, found {v}"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(format!("key `{key}` should be true or false, found {v}"))),
        }
    }

    fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = match self.get(key) {
            None => default.to_string(),
            Some(_) => self.str(key)?,
        };
        Activation::parse(&name)
            .ok_or_else(|| self.err(format!("unsupported activation `{name}` in key `{key}`")))
    }
}
