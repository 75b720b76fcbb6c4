//! The only ways a method may touch the backbone.
//!
//! The backbone calls these hooks at fixed points of its forward pass and knows nothing of
//! what a method does in them. Every hook defaults to "no change".

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

/// A linear projection inside a transformer layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proj {
    /// Attention query.
    Query,
    /// Attention key.
    Key,
    /// Attention value.
    Value,
    /// Attention output projection.
    AttnOut,
    /// Feed-forward up (first) projection.
    Up,
    /// Feed-forward gate projection (Llama's SwiGLU only).
    Gate,
    /// Feed-forward down (second) projection.
    Down,
}

impl Proj {
    /// All projections, in forward order.
    pub const ALL: [Proj; 7] = [
        Proj::Query,
        Proj::Key,
        Proj::Value,
        Proj::AttnOut,
        Proj::Up,
        Proj::Gate,
        Proj::Down,
    ];

    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Query => "query",
            Proj::Key => "key",
            Proj::Value => "value",
            Proj::AttnOut => "attn_out",
            Proj::Up => "up",
            Proj::Gate => "gate",
            Proj::Down => "down",
        }
    }

    /// Parses a name, accepting the common Hugging Face spellings too.
    pub fn parse(name: &str) -> Option<Proj> {
        Some(match name {
            "query" | "q" | "q_proj" => Proj::Query,
            "key" | "k" | "k_proj" => Proj::Key,
            "value" | "v" | "v_proj" => Proj::Value,
            "attn_out" | "o_proj" | "dense" | "c_proj" => Proj::AttnOut,
            "up" | "up_proj" | "intermediate" | "c_fc" => Proj::Up,
            "gate" | "gate_proj" => Proj::Gate,
            "down" | "down_proj" | "output" => Proj::Down,
            _ => return None,
        })
    }
}

/// One projection of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Site {
    /// Layer index, from 0.
    pub layer: usize,
    /// Which projection.
    pub proj: Proj,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "layer{}.{}", self.layer, self.proj.name())
    }
}

/// A sublayer whose output a method may transform before the residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Block {
    /// Self-attention.
    Attention,
    /// Feed-forward.
    Ffn,
}

/// One normalisation layer of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NormSite {
    /// After the embeddings (BERT-style encoders).
    Embeddings,
    /// Around a layer's attention.
    Attention(usize),
    /// Around a layer's feed-forward block.
    Ffn(usize),
    /// After the last layer (pre-norm decoders).
    Final,
}

impl std::fmt::Display for NormSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NormSite::Embeddings => write!(f, "embeddings.norm"),
            NormSite::Attention(l) => write!(f, "layer{l}.attn_norm"),
            NormSite::Ffn(l) => write!(f, "layer{l}.ffn_norm"),
            NormSite::Final => write!(f, "final_norm"),
        }
    }
}

/// Parameters that stand in for a norm's own: its gain, and its bias where it has one.
#[derive(Debug, Clone)]
pub struct NormParams {
    /// Gain `[hidden]`.
    pub weight: Tensor,
    /// Bias `[hidden]` (LayerNorm only).
    pub bias: Option<Tensor>,
}

/// Key and value vectors prepended to one layer's attention, each `[len, kv_heads·head_dim]`
/// (shared by the batch) or `[batch, len, kv_heads·head_dim]`.
#[derive(Debug, Clone)]
pub struct KvPrefix {
    /// Prefix keys (not rotated: they sit before every position).
    pub key: Tensor,
    /// Prefix values.
    pub value: Tensor,
}

impl KvPrefix {
    /// Number of prefix positions.
    pub fn len(&self) -> usize {
        let d = self.key.dims();
        d[d.len() - 2]
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hooks a method implements; the backbone calls them during forward.
pub trait Intervention {
    /// Transforms the input of projection `site` before the projection sees it ((IA)³'s
    /// feed-forward scaling). The default passes it through untouched.
    fn project_input(&self, _site: Site, input: &Tensor) -> Result<Tensor> {
        Ok(input.clone())
    }

    /// Transforms the output of projection `site`, given that projection's (transformed) input.
    fn project(&self, _site: Site, _input: &Tensor, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }

    /// The update of projection `site` for this `input` as a dense `ΔW [out, in]`, when the
    /// method's `project` does nothing but add `x·ΔWᵀ` (and building ΔW is the cheaper way
    /// for this many input rows). Where the weight is a plain f32 CPU tensor the backbone
    /// multiplies by `W + ΔW` once and skips `project` for the site (one product each way
    /// instead of two); elsewhere it calls `project` as usual.
    fn weight_delta(&self, _site: Site, _input: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Parameters to use in place of norm `site`'s own (LN tuning's trained copies), if any.
    fn norm_params(&self, _site: NormSite) -> Option<NormParams> {
        None
    }

    /// Transforms a sublayer's output before its residual add.
    fn after_block(&self, _layer: usize, _block: Block, output: Tensor) -> Result<Tensor> {
        Ok(output)
    }

    /// Per-layer key/value prefixes (one per layer, all the same length), if any.
    fn kv_prefixes(&self) -> Result<Option<Vec<KvPrefix>>> {
        Ok(None)
    }

    /// Vectors `[len, hidden]` prepended to the input embeddings, if any.
    fn input_prefix(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Whether the input prefix takes the first positions, moving the input's own tokens
    /// along by its length (PEFT's concatenation of prompt and input embeddings). When false
    /// the input keeps the positions it has without a prefix and the prefix vectors carry
    /// none; only models with learned absolute positions support that.
    fn input_prefix_shifts_positions(&self) -> bool {
        true
    }
}

/// The unmodified model.
pub struct NoIntervention;

impl Intervention for NoIntervention {}
