//! The transformer: embeddings, attention, feed-forward and norms, with intervention points.

use crate::bf16_matmul::PackedWeight;
use crate::config::{Activation, Family, ModelConfig};
use crate::error::{BackboneError, Result};
use crate::intervention::{Block, Intervention, KvPrefix, NormParams, NormSite, Proj, Site};
use crate::linear::Linear;
use crate::ops;
use crate::read::{Read, Rows};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// A normalisation layer.
#[derive(Debug, Clone)]
pub enum Norm {
    /// LayerNorm with weight and bias.
    Layer {
        /// Scale.
        weight: Tensor,
        /// Shift.
        bias: Tensor,
        /// Epsilon.
        eps: f64,
    },
    /// RMSNorm with weight.
    Rms {
        /// Scale.
        weight: Tensor,
        /// Epsilon.
        eps: f64,
    },
}

impl Norm {
    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Norm::Layer { weight, bias, .. } => self.normalise(x, weight, Some(bias)),
            Norm::Rms { weight, .. } => self.normalise(x, weight, None),
        }
    }

    /// Normalises with the given gain (and bias, for LayerNorm). The statistics are taken in
    /// f32 whatever the activations' dtype, as transformers does for bf16; the result comes
    /// back in `x`'s dtype.
    fn normalise(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let y = match (self, bias) {
            (Norm::Layer { eps, .. }, Some(b)) => {
                ops::layer_norm(&f32(x)?, &f32(weight)?, &f32(b)?, *eps)?
            }
            (Norm::Layer { .. }, None) => candle_core::bail!("a LayerNorm needs a bias"),
            (Norm::Rms { eps, .. }, _) => ops::rms_norm(&f32(x)?, &f32(weight)?, *eps)?,
        };
        y.to_dtype(x.dtype())
    }

    /// Normalises with the intervention's parameters for `site` when it has some.
    fn apply(
        &self,
        iv: &dyn Intervention,
        site: NormSite,
        x: &Tensor,
    ) -> candle_core::Result<Tensor> {
        match (iv.norm_params(site), self) {
            (None, _) => self.forward(x),
            (Some(NormParams { weight, bias }), Norm::Layer { bias: own, .. }) => {
                self.normalise(x, &weight, Some(bias.as_ref().unwrap_or(own)))
            }
            (Some(p), Norm::Rms { .. }) => self.normalise(x, &p.weight, None),
        }
    }

    /// The norm's tensors, mutably, with their names (weight, bias).
    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        match self {
            Norm::Layer { weight, bias, .. } => vec![("weight", weight), ("bias", bias)],
            Norm::Rms { weight, .. } => vec![("weight", weight)],
        }
    }
}

/// One transformer layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Query projection `[heads·d, hidden]`.
    pub query: Linear,
    /// Key projection `[kv_heads·d, hidden]`.
    pub key: Linear,
    /// Value projection `[kv_heads·d, hidden]`.
    pub value: Linear,
    /// Attention output projection.
    pub attn_out: Linear,
    /// Feed-forward up projection.
    pub up: Linear,
    /// Feed-forward gate projection (SwiGLU only).
    pub gate: Option<Linear>,
    /// Feed-forward down projection.
    pub down: Linear,
    /// Norm around attention (before it in pre-norm, after the residual in post-norm).
    pub attn_norm: Norm,
    /// Norm around the feed-forward block.
    pub ffn_norm: Norm,
}

impl Layer {
    /// The projection at `proj`, if this layer has one.
    pub fn proj(&self, proj: Proj) -> Option<&Linear> {
        match proj {
            Proj::Query => Some(&self.query),
            Proj::Key => Some(&self.key),
            Proj::Value => Some(&self.value),
            Proj::AttnOut => Some(&self.attn_out),
            Proj::Up => Some(&self.up),
            Proj::Gate => self.gate.as_ref(),
            Proj::Down => Some(&self.down),
        }
    }

    /// The projection at `proj`, mutably.
    pub fn proj_mut(&mut self, proj: Proj) -> Option<&mut Linear> {
        match proj {
            Proj::Query => Some(&mut self.query),
            Proj::Key => Some(&mut self.key),
            Proj::Value => Some(&mut self.value),
            Proj::AttnOut => Some(&mut self.attn_out),
            Proj::Up => Some(&mut self.up),
            Proj::Gate => self.gate.as_mut(),
            Proj::Down => Some(&mut self.down),
        }
    }
}

/// Token, position and segment embeddings.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// Word embeddings `[vocab, hidden]`.
    pub word: Tensor,
    /// Learned absolute positions `[max_pos, hidden]` (none with RoPE).
    pub position: Option<Tensor>,
    /// Segment embeddings `[types, hidden]` (BERT).
    pub token_type: Option<Tensor>,
    /// Norm applied to the embedding sum (BERT).
    pub norm: Option<Norm>,
}

/// A batch of token ids with its padding mask.
#[derive(Debug, Clone)]
pub struct Inputs {
    /// Token ids `[batch, len]`, u32.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding, `[batch, len]`, u32.
    pub attention_mask: Tensor,
    /// Segment ids `[batch, len]`, u32 (BERT pairs); zeros when absent.
    pub token_type_ids: Option<Tensor>,
    /// Several examples end to end in each row, when set: attention stays within an example
    /// and positions restart at each.
    pub packing: Option<Packing>,
}

/// Which example of a packed row each token belongs to, and its position in it.
#[derive(Debug, Clone)]
pub struct Packing {
    /// `[batch, len]` u32: the example, from 1. Tokens of example 0 are seen by every later
    /// token of the row (a prompt that several continuations share).
    pub segments: Tensor,
    /// `[batch, len]` u32: each token's position within its example (a continuation goes on
    /// from its shared prompt's last position), not counting the example's virtual tokens;
    /// those are numbered from 0 on their own.
    pub positions: Tensor,
    /// `[batch, len]` u32 where the method puts virtual tokens before the input (prompt
    /// tuning, P-Tuning): `j + 1` at the slot of an example's j-th virtual token (its id a
    /// placeholder, its segment the example's, its token type 0), 0 at a real token. The
    /// method's input prefix fills the slots, so each example opens with it as a row of its
    /// own does. `None`: the rows hold no slots.
    pub prompt: Option<Tensor>,
}

/// What a forward pass returns.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// Final hidden states `[batch, prefix + len, hidden]`, input-prefix positions first.
    pub hidden: Tensor,
    /// 1.0 where `hidden` holds a real token or an input-prefix vector, 0.0 at padding.
    pub mask: Tensor,
    /// How many input-prefix vectors were prepended to every row.
    pub input_prefix_len: usize,
    /// How many input-prefix vectors open each example of packed rows (in its slots).
    pub prompt_per_example: usize,
    /// Which positions `hidden` holds.
    pub read: Read,
}

/// The keys and values a decoder has computed so far, per layer (prefix keys included), so
/// each new token is one forward step over itself alone (greedy generation).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: keys and values `[batch, len, kv_heads·head_dim]`, rotated as attention used them.
    layers: Vec<(Tensor, Tensor)>,
    /// Positions held (prefix keys, input-prefix vectors and tokens).
    len: usize,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A transformer encoder or decoder whose weights are plain tensors.
#[derive(Debug, Clone)]
pub struct Transformer {
    /// Shape and architecture.
    pub config: ModelConfig,
    /// Embedding tables.
    pub embeddings: Embeddings,
    /// The layers.
    pub layers: Vec<Layer>,
    /// Norm after the last layer (pre-norm decoders).
    pub final_norm: Option<Norm>,
    /// BERT's pooler (dense + tanh on the first token), when the checkpoint has one.
    pub pooler: Option<Linear>,
    /// Untied LM head `[vocab, hidden]`; `None` means the word embeddings are reused.
    pub lm_head: Option<Tensor>,
    /// The LM head's weight packed for the bf16 GEMM (see [`Transformer::pack_frozen_bf16`]).
    lm_head_packed: Option<Arc<PackedWeight>>,
    device: Device,
    /// The dtype of activations and frozen weights (trained variables are f32).
    dtype: DType,
}

impl Transformer {
    /// Assembles a model from its parts.
    pub fn from_parts(
        config: ModelConfig,
        embeddings: Embeddings,
        layers: Vec<Layer>,
        final_norm: Option<Norm>,
        pooler: Option<Linear>,
        lm_head: Option<Tensor>,
    ) -> Self {
        let device = embeddings.word.device().clone();
        let dtype = embeddings.word.dtype();
        Self {
            config,
            embeddings,
            layers,
            final_norm,
            pooler,
            lm_head,
            lm_head_packed: None,
            device,
            dtype,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype activations and frozen weights use.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This model on `device` with its frozen weights and activations in `dtype` (f32, or
    /// bf16 for mixed precision). Variables are left as they are: a method's parameters stay
    /// f32 master weights, cast where the forward pass meets them.
    pub fn to(&self, device: &Device, dtype: DType) -> Result<Self> {
        let mut me = self.clone();
        let mut failed = None;
        me.for_each_weight_mut(&mut |_, t| {
            if failed.is_some() || t.is_variable() {
                return;
            }
            match t.to_device(device).and_then(|t| t.to_dtype(dtype)) {
                Ok(moved) => *t = moved,
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        me.device = device.clone();
        me.dtype = dtype;
        Ok(me)
    }

    /// Every projection site the model has, in layer order.
    pub fn sites(&self) -> Vec<Site> {
        let mut out = Vec::new();
        for (layer, l) in self.layers.iter().enumerate() {
            for proj in Proj::ALL {
                if l.proj(proj).is_some() {
                    out.push(Site { layer, proj });
                }
            }
        }
        out
    }

    /// The projection at `site`.
    pub fn linear(&self, site: Site) -> Option<&Linear> {
        self.layers.get(site.layer).and_then(|l| l.proj(site.proj))
    }

    /// Every norm the model has, in forward order.
    pub fn norm_sites(&self) -> Vec<NormSite> {
        let mut out = Vec::new();
        if self.embeddings.norm.is_some() {
            out.push(NormSite::Embeddings);
        }
        for l in 0..self.layers.len() {
            out.push(NormSite::Attention(l));
            out.push(NormSite::Ffn(l));
        }
        if self.final_norm.is_some() {
            out.push(NormSite::Final);
        }
        out
    }

    /// The norm at `site`.
    pub fn norm(&self, site: NormSite) -> Option<&Norm> {
        match site {
            NormSite::Embeddings => self.embeddings.norm.as_ref(),
            NormSite::Attention(l) => self.layers.get(l).map(|l| &l.attn_norm),
            NormSite::Ffn(l) => self.layers.get(l).map(|l| &l.ffn_norm),
            NormSite::Final => self.final_norm.as_ref(),
        }
    }

    /// The norm at `site`, mutably (LN tuning merges into it).
    pub fn norm_mut(&mut self, site: NormSite) -> Option<&mut Norm> {
        match site {
            NormSite::Embeddings => self.embeddings.norm.as_mut(),
            NormSite::Attention(l) => self.layers.get_mut(l).map(|l| &mut l.attn_norm),
            NormSite::Ffn(l) => self.layers.get_mut(l).map(|l| &mut l.ffn_norm),
            NormSite::Final => self.final_norm.as_mut(),
        }
    }

    /// The projection at `site`, mutably (LoRA merges into it).
    pub fn linear_mut(&mut self, site: Site) -> Option<&mut Linear> {
        self.layers
            .get_mut(site.layer)
            .and_then(|l| l.proj_mut(site.proj))
    }

    /// The LM head matrix `[vocab, hidden]` (tied or not).
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embeddings.word)
    }

    /// The LM head's bf16 packing, while it is the current head weight's.
    pub fn lm_head_packed(&self) -> Option<&Arc<PackedWeight>> {
        self.lm_head_packed
            .as_ref()
            .filter(|p| p.packs(self.lm_head_weight()))
    }

    /// Number of weights in the backbone (tied matrices counted once).
    pub fn num_parameters(&self) -> usize {
        let mut n = 0;
        let mut count = |t: &Tensor| n += t.elem_count();
        self.for_each_weight(&mut |_, t| count(t));
        n
    }

    /// Bytes the weights occupy, quantized projections at their block size, bf16 packings
    /// beside their f32 weights.
    pub fn weight_bytes(&self) -> usize {
        let mut dense = 0;
        self.for_each_weight(&mut |_, t| dense += t.elem_count() * t.dtype().size_in_bytes());
        // A quantized projection's stand-in counted as dense above; its blocks instead.
        for l in &self.layers {
            for proj in Proj::ALL {
                if let Some(lin) = l
                    .proj(proj)
                    .filter(|lin| lin.is_quantized() || lin.is_packed_bf16())
                {
                    dense -= lin.weight.elem_count() * lin.weight.dtype().size_in_bytes();
                    dense += lin.weight_bytes();
                }
            }
        }
        dense + self.lm_head_packed().map_or(0, |p| p.bytes())
    }

    /// Packs every frozen f32 projection for the bf16 GEMM (see [`Linear::pack_bf16`]);
    /// returns how many it packed (none on a CPU without a bf16 kernel).
    pub fn pack_frozen_bf16(&mut self) -> Result<usize> {
        let mut n = 0;
        self.lm_head_packed = PackedWeight::for_frozen(self.lm_head_weight())?.map(Arc::new);
        n += self.lm_head_packed.is_some() as usize;
        for l in &mut self.layers {
            for proj in Proj::ALL {
                if let Some(lin) = l.proj_mut(proj) {
                    n += lin.pack_bf16()? as usize;
                }
            }
        }
        Ok(n)
    }

    /// Whether any projection (or the LM head) runs its products through a bf16 packing.
    pub fn is_packed_bf16(&self) -> bool {
        self.lm_head_packed().is_some()
            || self.layers.iter().any(|l| {
                Proj::ALL
                    .iter()
                    .any(|&p| l.proj(p).is_some_and(Linear::is_packed_bf16))
            })
    }

    /// Whether any projection is held quantized.
    pub fn is_quantized(&self) -> bool {
        self.layers.iter().any(|l| {
            Proj::ALL
                .iter()
                .any(|&p| l.proj(p).is_some_and(Linear::is_quantized))
        })
    }

    /// Visits every weight tensor with its Hugging Face-independent name.
    pub fn for_each_weight(&self, f: &mut dyn FnMut(&str, &Tensor)) {
        let mut me = self.clone();
        me.for_each_weight_mut(&mut |name, t| f(name, t));
    }

    /// Visits every weight tensor mutably (full fine-tuning turns each into a variable).
    pub fn for_each_weight_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor)) {
        let e = &mut self.embeddings;
        f("embeddings.word", &mut e.word);
        if let Some(t) = e.position.as_mut() {
            f("embeddings.position", t);
        }
        if let Some(t) = e.token_type.as_mut() {
            f("embeddings.token_type", t);
        }
        if let Some(n) = e.norm.as_mut() {
            for (k, t) in n.tensors_mut() {
                f(&format!("embeddings.norm.{k}"), t);
            }
        }
        for (i, l) in self.layers.iter_mut().enumerate() {
            for proj in Proj::ALL {
                if let Some(lin) = l.proj_mut(proj) {
                    f(&format!("layer{i}.{}.weight", proj.name()), &mut lin.weight);
                    if let Some(b) = lin.bias.as_mut() {
                        f(&format!("layer{i}.{}.bias", proj.name()), b);
                    }
                }
            }
            for (k, t) in l.attn_norm.tensors_mut() {
                f(&format!("layer{i}.attn_norm.{k}"), t);
            }
            for (k, t) in l.ffn_norm.tensors_mut() {
                f(&format!("layer{i}.ffn_norm.{k}"), t);
            }
        }
        if let Some(n) = self.final_norm.as_mut() {
            for (k, t) in n.tensors_mut() {
                f(&format!("final_norm.{k}"), t);
            }
        }
        if let Some(p) = self.pooler.as_mut() {
            f("pooler.weight", &mut p.weight);
            if let Some(b) = p.bias.as_mut() {
                f("pooler.bias", b);
            }
        }
        if let Some(t) = self.lm_head.as_mut() {
            f("lm_head", t);
        }
    }

    /// Runs the model on `inputs` with a method's hooks.
    pub fn forward(&self, inputs: &Inputs, iv: &dyn Intervention) -> Result<Encoded> {
        self.forward_with(inputs, iv, None, &Read::All)
    }

    /// [`Transformer::forward`] returning only the final hidden states `read` names: the last
    /// layer computes its keys and values at every position and the rest at those alone.
    pub fn forward_read(
        &self,
        inputs: &Inputs,
        iv: &dyn Intervention,
        read: &Read,
    ) -> Result<Encoded> {
        self.forward_with(inputs, iv, None, read)
    }

    /// Runs a causal decoder on `inputs` as the continuation of what `cache` holds and adds
    /// their keys and values to it. The first call (empty cache) takes the method's prefixes,
    /// as [`Transformer::forward`] does; later calls see them through the cache. Rows must be
    /// unpadded (one prompt at a time, or prompts of equal length).
    pub fn forward_cached(
        &self,
        inputs: &Inputs,
        iv: &dyn Intervention,
        cache: &mut KvCache,
    ) -> Result<Encoded> {
        if !self.config.is_causal() {
            return Err(BackboneError::Input(format!(
                "a key/value cache needs a causal decoder; this {:?} model is bidirectional",
                self.config.family
            )));
        }
        let padded = inputs.attention_mask.min_all()?.to_scalar::<u32>()? == 0;
        if padded {
            return Err(BackboneError::Input(
                "a key/value cache takes unpadded rows (the attention mask has zeros)".into(),
            ));
        }
        self.forward_with(inputs, iv, Some(cache), &Read::All)
    }

    fn forward_with(
        &self,
        inputs: &Inputs,
        iv: &dyn Intervention,
        mut cache: Option<&mut KvCache>,
        read: &Read,
    ) -> Result<Encoded> {
        let cfg = &self.config;
        // Positions already in the cache: the prefixes entered with its first call.
        let past = cache.as_ref().map_or(0, |c| c.len);
        let (b, t) = inputs.input_ids.dims2()?;
        if inputs.attention_mask.dims() != [b, t] {
            return Err(BackboneError::Input(format!(
                "attention_mask has shape {:?}, input_ids {:?}",
                inputs.attention_mask.dims(),
                [b, t]
            )));
        }
        let kv = if past == 0 { iv.kv_prefixes()? } else { None };
        if let Some(kv) = &kv {
            if kv.len() != cfg.num_layers {
                return Err(BackboneError::Input(format!(
                    "{} key/value prefixes for {} layers",
                    kv.len(),
                    cfg.num_layers
                )));
            }
        }
        // Keys before this call's tokens: the method's prefix, or everything cached.
        let kv_len = if past > 0 {
            past
        } else {
            kv.as_ref()
                .map_or(0, |k| k.first().map_or(0, KvPrefix::len))
        };
        let prefix = if past == 0 { iv.input_prefix()? } else { None };
        let prompt_slots = inputs.packing.as_ref().and_then(|pk| pk.prompt.as_ref());
        let p_method = prefix.as_ref().map_or(0, |p| p.dims()[p.rank() - 2]);
        // Virtual tokens before every row, or (packed with slots) before every example.
        let (p_in, p_each) = match prompt_slots {
            Some(_) => (0, p_method),
            None => (p_method, 0),
        };
        let seq = p_in + t;
        let shift = iv.input_prefix_shifts_positions();
        if p_method > 0 && !shift && self.embeddings.position.is_none() {
            return Err(BackboneError::Input(format!(
                "an input prefix without positions needs learned absolute positions; this {:?} model has none",
                cfg.family
            )));
        }
        if let Some(pk) = &inputs.packing {
            if p_in > 0 {
                return Err(BackboneError::Input(format!(
                    "packed rows without slots for the method's {p_in} virtual tokens (Packing::prompt): they would open the row, not each example"
                )));
            }
            if let Some(slots) = &pk.prompt {
                if slots.dims() != [b, t] {
                    return Err(BackboneError::Input(format!(
                        "packing prompt has shape {:?}, input_ids {:?}",
                        slots.dims(),
                        [b, t]
                    )));
                }
                let most = slots.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
                let rank = prefix.as_ref().map_or(2, |p| p.rank());
                if most != p_method || rank != 2 {
                    return Err(BackboneError::Input(format!(
                        "packed rows hold {most} virtual-token slots per example; the method gives {p_method} shared by every example"
                    )));
                }
            }
            if past > 0 {
                return Err(BackboneError::Input(
                    "packed rows cannot continue a key/value cache".into(),
                ));
            }
            for (what, x) in [("segments", &pk.segments), ("positions", &pk.positions)] {
                if x.dims() != [b, t] {
                    return Err(BackboneError::Input(format!(
                        "packing {what} has shape {:?}, input_ids {:?}",
                        x.dims(),
                        [b, t]
                    )));
                }
            }
        }
        let positioned = if shift { seq } else { t };
        let positions_needed = cfg.position_offset + kv_len + positioned;
        if positions_needed > cfg.max_position_embeddings {
            return Err(BackboneError::Input(format!(
                "sequence of {seq} (+{kv_len} prefix) needs {positions_needed} positions, model has {}",
                cfg.max_position_embeddings
            )));
        }

        // Token mask over the extended sequence: input-prefix vectors are always visible.
        let token_mask = inputs.attention_mask.to_dtype(DType::F32)?;
        let mask = if p_in > 0 {
            Tensor::cat(
                &[
                    &Tensor::ones((b, p_in), DType::F32, &self.device)?,
                    &token_mask,
                ],
                1,
            )?
        } else {
            token_mask
        };
        let rows = Rows::resolve(read, &mask)?;

        // Each packed token's position: after its example's virtual tokens where they take
        // positions.
        let packed_positions = match &inputs.packing {
            Some(pk) => Some(match (&pk.prompt, shift) {
                (Some(slots), true) => {
                    let own = slots.eq(0u32)?.to_dtype(DType::U32)?;
                    (&pk.positions + (own * p_each as f64)?)?
                }
                _ => pk.positions.clone(),
            }),
            None => None,
        };
        let mut h = self.embed(
            inputs,
            packed_positions.as_ref(),
            prefix.as_ref(),
            shift,
            kv_len,
            iv,
        )?;
        // The fused kernel reads the mask per key; candle's composite needs it dense.
        let fused = crate::kernels::fused_on(self.dtype, &self.device);
        let visible = match &inputs.packing {
            None if !fused => ops::Visible::Bias(attention_bias(&mask, kv_len, cfg.is_causal())?),
            packing => {
                // Prefix keys belong to example 0: every query sees them.
                let segments = match packing {
                    Some(pk) if kv_len > 0 => Some(Tensor::cat(
                        &[
                            &Tensor::zeros((b, kv_len), DType::U32, &self.device)?,
                            &pk.segments,
                        ],
                        1,
                    )?),
                    Some(pk) => Some(pk.segments.clone()),
                    None => None,
                };
                let keys = ops::Visible::Keys {
                    keys: key_bias(&mask, kv_len)?,
                    causal: cfg.is_causal(),
                    segments,
                    queries: None,
                };
                if fused {
                    keys
                } else {
                    ops::Visible::Bias(keys.dense(seq)?)
                }
            }
        };
        let rope = if cfg.family == Family::Llama {
            let (d, theta) = (cfg.head_dim(), cfg.rope_theta);
            let (cos, sin) = match &packed_positions {
                Some(positions) => {
                    let at: Vec<u32> = positions.flatten_all()?.to_vec1()?;
                    let at = at.iter().map(|&p| kv_len + p as usize);
                    ops::rope_tables_at(at, d, theta, &self.device)?
                }
                None => ops::rope_tables(kv_len, seq, d, theta, &self.device)?,
            };
            Some((cos.to_dtype(self.dtype)?, sin.to_dtype(self.dtype)?))
        } else {
            None
        };
        if let Some(c) = cache.as_deref_mut() {
            // Empty entries until the first call fills them.
            let none = Tensor::zeros(0, DType::F32, &self.device)?;
            c.layers
                .resize_with(self.layers.len(), || (none.clone(), none.clone()));
        }
        let last = self.layers.len().saturating_sub(1);
        for (i, layer) in self.layers.iter().enumerate() {
            let prefix_i = kv.as_ref().map(|k| &k[i]);
            let cached = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let step = Step {
                visible: &visible,
                rope: rope.as_ref(),
                prefix: prefix_i,
                cached,
            };
            let rows = rows.as_ref().filter(|_| i == last);
            h = self.layer_forward(i, layer, &h, step, iv, rows)?;
            if !crate::grad_enabled() {
                // Frees this layer's activations once the next layer has read `h`.
                h = h.detach();
            }
        }
        if let Some(c) = cache {
            c.len = kv_len + seq;
        }
        if let Some(n) = &self.final_norm {
            h = n.apply(iv, NormSite::Final, &h)?;
        }
        if let Some(r) = &rows {
            h = r.finish(h)?;
        }
        Ok(Encoded {
            hidden: h,
            mask,
            input_prefix_len: p_in,
            prompt_per_example: p_each,
            read: read.clone(),
        })
    }

    fn embed(
        &self,
        inputs: &Inputs,
        packed_positions: Option<&Tensor>,
        prefix: Option<&Tensor>,
        prefix_shifts: bool,
        kv_len: usize,
        iv: &dyn Intervention,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let e = &self.embeddings;
        let (b, t) = inputs.input_ids.dims2()?;
        let ids = inputs.input_ids.flatten_all()?;
        let max_id = ids.max(0)?.to_scalar::<u32>()? as usize;
        if max_id >= cfg.vocab_size {
            return Err(BackboneError::Input(format!(
                "token id {max_id} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let dt = self.dtype;
        // Casts a looked-up row (a trained embedding is an f32 variable) to the activations' dtype.
        let mut x = e
            .word
            .index_select(&ids, 0)?
            .to_dtype(dt)?
            .reshape((b, t, cfg.hidden_size))?;
        let start = cfg.position_offset + kv_len;
        // Learned positions of `len` tokens from `start`, or of each packed token.
        let positions = |pos: &Tensor, len: usize| -> Result<Tensor> {
            Ok(match packed_positions {
                Some(at) => {
                    let at = (at.to_dtype(DType::F32)? + start as f64)?
                        .to_dtype(DType::U32)?
                        .flatten_all()?;
                    pos.index_select(&at, 0)?
                        .to_dtype(dt)?
                        .reshape((b, len, cfg.hidden_size))?
                }
                None => pos.narrow(0, start, len)?.to_dtype(dt)?.unsqueeze(0)?,
            })
        };
        if let (Some(slots), Some(p)) = (
            inputs.packing.as_ref().and_then(|pk| pk.prompt.as_ref()),
            prefix,
        ) {
            // Each slot takes its virtual token: one gather over the rows and the prefix, so
            // the gradient reaches both.
            let rows = x.reshape((b * t, cfg.hidden_size))?;
            let all = Tensor::cat(&[&rows, &p.to_dtype(dt)?], 0)?;
            let slots: Vec<u32> = slots.flatten_all()?.to_vec1()?;
            let at: Vec<u32> = slots
                .iter()
                .enumerate()
                .map(|(i, &s)| {
                    if s == 0 {
                        i as u32
                    } else {
                        (b * t) as u32 + s - 1
                    }
                })
                .collect();
            x = all
                .index_select(&Tensor::from_vec(at, b * t, &self.device)?, 0)?
                .reshape((b, t, cfg.hidden_size))?;
            if let Some(pos) = &e.position {
                let pos = positions(pos, t)?;
                x = match prefix_shifts {
                    true => (x + pos)?,
                    // The virtual tokens carry no position, as before a row of its own.
                    false => {
                        let own = Tensor::from_vec(
                            slots.iter().map(|&s| f32::from(s == 0)).collect::<Vec<_>>(),
                            (b, t, 1),
                            &self.device,
                        )?
                        .to_dtype(dt)?;
                        (x + pos.broadcast_mul(&own)?)?
                    }
                };
            }
            return self.embed_finish(inputs, x, 0, iv);
        }
        if !prefix_shifts {
            // The input's tokens keep the positions they have without a prefix.
            if let Some(pos) = &e.position {
                x = x.broadcast_add(&positions(pos, t)?)?;
            }
        }
        let mut p_in = 0;
        if let Some(p) = prefix {
            p_in = p.dims()[p.rank() - 2];
            let p = p.to_dtype(dt)?;
            let p = if p.rank() == 2 {
                p.unsqueeze(0)?.broadcast_as((b, p_in, cfg.hidden_size))?
            } else {
                p.clone()
            };
            x = Tensor::cat(&[&p, &x], 1)?;
        }
        let seq = p_in + t;
        if prefix_shifts {
            if let Some(pos) = &e.position {
                x = x.broadcast_add(&positions(pos, seq)?)?;
            }
        }
        self.embed_finish(inputs, x, p_in, iv)
    }

    /// Adds token-type embeddings (0 for the `p_in` input-prefix vectors opening each row)
    /// and applies the embedding norm.
    fn embed_finish(
        &self,
        inputs: &Inputs,
        mut x: Tensor,
        p_in: usize,
        iv: &dyn Intervention,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let e = &self.embeddings;
        let dt = self.dtype;
        let (b, t) = inputs.input_ids.dims2()?;
        let seq = p_in + t;
        if let Some(tt) = &e.token_type {
            let types = match &inputs.token_type_ids {
                Some(ty) => ty.clone(),
                None => Tensor::zeros((b, t), DType::U32, &self.device)?,
            };
            let types = if p_in > 0 {
                Tensor::cat(
                    &[&Tensor::zeros((b, p_in), DType::U32, &self.device)?, &types],
                    1,
                )?
            } else {
                types
            };
            let te = tt
                .index_select(&types.flatten_all()?, 0)?
                .to_dtype(dt)?
                .reshape((b, seq, cfg.hidden_size))?;
            x = (x + te)?;
        }
        if let Some(n) = &e.norm {
            x = n.apply(iv, NormSite::Embeddings, &x)?;
        }
        Ok(x)
    }

    fn layer_forward(
        &self,
        i: usize,
        layer: &Layer,
        h: &Tensor,
        step: Step,
        iv: &dyn Intervention,
        rows: Option<&Rows>,
    ) -> Result<Tensor> {
        let post_norm = self.config.family == Family::Bert;
        let attn_in = if post_norm {
            h.clone()
        } else {
            layer.attn_norm.apply(iv, NormSite::Attention(i), h)?
        };
        let a = self.attention(i, layer, &attn_in, step, iv, rows)?;
        let a = after_block(iv, i, Block::Attention, a)?;
        // The residual at the rows attention computed.
        let h = &match rows {
            Some(r) => r.gather(h)?,
            None => h.clone(),
        };
        let h = if post_norm {
            layer
                .attn_norm
                .apply(iv, NormSite::Attention(i), &(h + a)?)?
        } else {
            (h + a)?
        };
        let ffn_in = if post_norm {
            h.clone()
        } else {
            layer.ffn_norm.apply(iv, NormSite::Ffn(i), &h)?
        };
        let f = self.feed_forward(i, layer, &ffn_in, iv)?;
        let f = after_block(iv, i, Block::Ffn, f)?;
        let h = if post_norm {
            layer.ffn_norm.apply(iv, NormSite::Ffn(i), &(h + f)?)?
        } else {
            (h + f)?
        };
        Ok(h)
    }

    fn attention(
        &self,
        i: usize,
        layer: &Layer,
        x: &Tensor,
        step: Step,
        iv: &dyn Intervention,
        rows: Option<&Rows>,
    ) -> Result<Tensor> {
        let Step {
            visible,
            rope,
            prefix,
            cached,
        } = step;
        let cfg = &self.config;
        let (nh, nkv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
        let site = |proj| Site { layer: i, proj };
        // Queries only where the caller reads; keys and values everywhere.
        let xq = match rows {
            Some(r) => r.gather(x)?,
            None => x.clone(),
        };
        let mut q = project(iv, site(Proj::Query), &layer.query, &xq)?;
        let mut k = project(iv, site(Proj::Key), &layer.key, x)?;
        let mut v = project(iv, site(Proj::Value), &layer.value, x)?;
        // Attention takes token-major [b, len, heads·d]; RoPE works on [b, heads, len, d].
        if let Some((cos, sin)) = rope {
            q = match rows {
                Some(r) => ops::rope(&q, &r.tables(cos)?, &r.tables(sin)?, nh)?,
                None => ops::rope(&q, cos, sin, nh)?,
            };
            k = ops::rope(&k, cos, sin, nkv)?;
        }
        if let Some(p) = prefix.filter(|p| !p.is_empty()) {
            k = ops::prepend_rows(&p.key.to_dtype(self.dtype)?, &k)?;
            v = ops::prepend_rows(&p.value.to_dtype(self.dtype)?, &v)?;
        }
        if let Some((ck, cv)) = cached {
            if ck.elem_count() > 0 {
                k = Tensor::cat(&[&*ck, &k], 1)?;
                v = Tensor::cat(&[&*cv, &v], 1)?;
            }
            (*ck, *cv) = (k.detach(), v.detach());
        }
        let scale = 1.0 / (d as f64).sqrt();
        let restricted;
        let visible = match rows {
            Some(r) => {
                // Keys before this call's tokens (the prefix) come first.
                let before = k.dim(1)? - x.dim(1)?;
                restricted = visible.at(&r.at.affine(1.0, before as f64)?)?;
                &restricted
            }
            None => visible,
        };
        let ctx = ops::attention(&q, &k, &v, visible, nh, nkv, scale)?;
        project(iv, site(Proj::AttnOut), &layer.attn_out, &ctx)
    }

    fn feed_forward(
        &self,
        i: usize,
        layer: &Layer,
        x: &Tensor,
        iv: &dyn Intervention,
    ) -> Result<Tensor> {
        let site = |proj| Site { layer: i, proj };
        let up = project(iv, site(Proj::Up), &layer.up, x)?;
        let inner = match &layer.gate {
            Some(gate) => {
                let g = project(iv, site(Proj::Gate), gate, x)?;
                ops::gated(&g, &up, self.config.activation)?
            }
            None => ops::activate(&up, self.config.activation)?,
        };
        project(iv, site(Proj::Down), &layer.down, &inner)
    }
}

/// What one layer's attention needs beside its input: which keys it sees, the rotary tables, the
/// method's key/value prefix, and the layer's cache entry when decoding incrementally.
struct Step<'a> {
    visible: &'a ops::Visible,
    rope: Option<&'a (Tensor, Tensor)>,
    prefix: Option<&'a KvPrefix>,
    cached: Option<&'a mut (Tensor, Tensor)>,
}

/// Additive bias per key `[batch, kv_len + len]`: 0 at prefix keys and real tokens, f32::MIN
/// at padding (the per-key form of [`attention_bias`]).
pub fn key_bias(mask: &Tensor, kv_len: usize) -> Result<Tensor> {
    let b = mask.dim(0)?;
    let padding = mask
        .to_dtype(DType::F32)?
        .affine(-1.0, 1.0)?
        .affine(f32::MIN as f64, 0.0)?;
    if kv_len == 0 {
        return Ok(padding.contiguous()?);
    }
    let visible = Tensor::zeros((b, kv_len), DType::F32, mask.device())?;
    Ok(Tensor::cat(&[&visible, &padding], 1)?.contiguous()?)
}

/// Additive attention bias `[batch, 1, len, kv_len + len]`: 0 where a query may attend,
/// f32::MIN at padding keys and (for decoders) at later positions. Prefix keys are visible
/// to every query. Built by tensor ops where the mask lives, so a GPU step copies nothing
/// back to the host for it.
pub fn attention_bias(mask: &Tensor, kv_len: usize, causal: bool) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let dev = mask.device();
    // (1 − mask)·MIN: MIN at padding keys, −0 elsewhere (adding −0 changes no score).
    let padding = mask
        .to_dtype(DType::F32)?
        .affine(-1.0, 1.0)?
        .affine(f32::MIN as f64, 0.0)?
        .reshape((b, 1, 1, t))?
        .broadcast_as((b, 1, t, t))?;
    let mut bias = if causal {
        let pos = Tensor::arange(0u32, t as u32, dev)?;
        let later = pos
            .unsqueeze(0)?
            .broadcast_as((t, t))?
            .gt(&pos.unsqueeze(1)?.broadcast_as((t, t))?)?;
        let causal = later
            .to_dtype(DType::F32)?
            .affine(f32::MIN as f64, 0.0)?
            .reshape((1, 1, t, t))?;
        // The smaller of the two: MIN where either masks (their sum would overflow to −inf).
        padding.broadcast_minimum(&causal)?
    } else {
        padding.contiguous()?
    };
    if kv_len > 0 {
        let visible = Tensor::zeros((b, 1, t, kv_len), DType::F32, dev)?;
        bias = Tensor::cat(&[&visible, &bias], 3)?;
    }
    Ok(bias.contiguous()?)
}

/// Whether the family uses SwiGLU.
pub fn gated(act: Activation, family: Family) -> bool {
    family == Family::Llama && act == Activation::Silu
}

/// One projection with the intervention's hooks on its input and its output. Hooks see f32
/// (a method's parameters are f32, and PEFT likewise casts an adapter's input to the
/// adapter's dtype); the projection runs in the activations' dtype.
fn project(iv: &dyn Intervention, site: Site, lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let x = in_f32(x, |x32| iv.project_input(site, x32))?;
    if lin.takes_delta(&x) {
        if let Some(delta) = iv.weight_delta(site, &x)? {
            return Ok(lin.forward_plus(&x, &delta)?);
        }
    }
    let out = lin.forward(&x)?;
    let x32 = x.to_dtype(DType::F32)?;
    Ok(in_f32(&out, |out32| iv.project(site, &x32, out32.clone()))?)
}

/// A sublayer's output through the `after_block` hook, in f32 as [`project`]'s hooks.
fn after_block(iv: &dyn Intervention, layer: usize, block: Block, y: Tensor) -> Result<Tensor> {
    Ok(in_f32(&y, |y32| iv.after_block(layer, block, y32.clone()))?)
}

/// Runs a hook on `x` cast to f32 and casts its result back to `x`'s dtype. A hook that
/// returns its input untouched costs no cast back (and loses no bits) in bf16.
fn in_f32(
    x: &Tensor,
    hook: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F32 {
        return hook(x);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let y = hook(&x32)?;
    if y.id() == x32.id() {
        Ok(x.clone())
    } else {
        y.to_dtype(x.dtype())
    }
}
