//! Task heads read from the backbone's final hidden states.

use crate::error::Result;
use crate::init::Initializer;
use crate::linear::Linear;
use crate::model::{Encoded, Transformer};
use crate::params::TrainableParams;
use crate::read::Read;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Which position(s) summarise a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first position (BERT's [CLS], or the first virtual token with an input prefix, as in PEFT).
    First,
    /// The last non-padding position (decoders, reward models).
    LastToken,
    /// Mean over the input's non-padding tokens (sentence embeddings). Input-prefix vectors are
    /// left out, as KV prefixes are by construction, so every method pools the same positions.
    Mean,
}

/// Pools `[batch, len, hidden]` into `[batch, hidden]`.
pub fn pool(enc: &Encoded, pooling: Pooling) -> Result<Tensor> {
    match (&enc.read, pooling) {
        (Read::All, _) => {}
        // The forward computed just the pooled position.
        (Read::First, Pooling::First) | (Read::Last, Pooling::LastToken) => {
            return Ok(enc.hidden.squeeze(1)?.to_dtype(DType::F32)?)
        }
        (read, _) => return Err(unpoolable(read, pooling)),
    }
    let (b, s, h) = enc.hidden.dims3()?;
    // Heads, losses and metrics run in f32 whatever the base's dtype.
    let hidden = &enc.hidden;
    let pooled = match pooling {
        Pooling::First => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::LastToken => {
            let idx = last_token_positions(&enc.mask)?;
            let rows = Tensor::arange(0u32, b as u32, idx.device())?.affine(s as f64, 0.0)?;
            let flat = (rows + idx)?;
            hidden.reshape((b * s, h))?.index_select(&flat, 0)?
        }
        Pooling::Mean => {
            // Virtual tokens outnumber a short sentence's own (59 against about 10 on CoLA) and
            // would otherwise dominate the mean.
            let p = enc.input_prefix_len;
            let m = enc.mask.narrow(1, p, s - p)?.unsqueeze(2)?;
            let kept = hidden.narrow(1, p, s - p)?.to_dtype(DType::F32)?;
            let sum = kept.broadcast_mul(&m)?.sum(1)?;
            sum.broadcast_div(&m.sum(1)?.maximum(1e-9)?)?
        }
    };
    Ok(pooled.to_dtype(DType::F32)?)
}

fn unpoolable(read: &Read, pooling: Pooling) -> crate::BackboneError {
    crate::BackboneError::Input(format!(
        "hidden states read at {read:?} cannot be pooled {pooling:?}"
    ))
}

/// Index of the last non-padding position of each row of a `[batch, len]` 0/1 mask, as a
/// `[batch]` u32 tensor where the mask lives (0 for an all-padding row).
pub fn last_token_positions(mask: &Tensor) -> Result<Tensor> {
    let s = mask.dim(1)?;
    // Position + 1 at real tokens, 0 at padding: the largest is the last real token.
    let pos = Tensor::arange(1u32, s as u32 + 1, mask.device())?.to_dtype(DType::F32)?;
    Ok(mask
        .to_dtype(DType::F32)?
        .broadcast_mul(&pos.unsqueeze(0)?)?
        .argmax(1)?)
}

/// Index of the last non-padding position of each row of a `[batch, len]` 0/1 mask.
pub fn last_token_index(mask: &Tensor) -> Result<Vec<usize>> {
    let rows: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .iter()
        .map(|r| r.iter().rposition(|&v| v > 0.0).unwrap_or(0))
        .collect())
}

/// What a sequence head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadKind {
    /// `num_labels` class logits.
    Classifier {
        /// Number of classes.
        num_labels: usize,
    },
    /// One real-valued output (STS-B).
    Regression,
    /// One scalar reward, read at the last non-padding token.
    Reward,
}

impl HeadKind {
    /// Output width.
    pub fn outputs(self) -> usize {
        match self {
            HeadKind::Classifier { num_labels } => num_labels,
            HeadKind::Regression | HeadKind::Reward => 1,
        }
    }
}

/// A trainable linear head on a pooled representation. For encoders with a pooler it reads
/// `tanh(pooler(first))`, as Hugging Face's sequence classifiers do.
#[derive(Debug, Clone)]
pub struct SequenceHead {
    /// What it predicts.
    pub kind: HeadKind,
    /// How the sequence is summarised.
    pub pooling: Pooling,
    /// The trainable projection `[outputs, hidden]`.
    pub out: Linear,
}

impl SequenceHead {
    /// Creates the head's variables in `params` (normal(0, 0.02) weight, zero bias, as HF).
    /// Decoders' heads have no bias, as transformers' `score` (and so TRL's reward models).
    pub fn new(
        model: &Transformer,
        kind: HeadKind,
        params: &mut TrainableParams,
        init: &mut Initializer,
    ) -> Result<Self> {
        let h = model.config.hidden_size;
        let dev = model.device();
        let n = kind.outputs();
        let weight = params.add("head.weight", init.normal((n, h), 0.02, dev)?)?;
        let bias = match model.config.is_causal() {
            true => None,
            false => Some(params.add("head.bias", Tensor::zeros(n, DType::F32, dev)?)?),
        };
        let pooling = match (kind, model.config.is_causal()) {
            (HeadKind::Reward, _) | (_, true) => Pooling::LastToken,
            _ => Pooling::First,
        };
        Ok(Self {
            kind,
            pooling,
            out: Linear::new(weight, bias),
        })
    }

    /// The same head summarising sequences another way (the pooler is used with `First` only).
    pub fn with_pooling(mut self, pooling: Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// The final positions this head reads, so the forward computes the last layer at those
    /// alone: one per row, or (`spans`, packed rows) one per example as
    /// [`SequenceHead::forward_spans`] pools them; every position for mean pooling.
    pub fn read(&self, spans: Option<&[(usize, usize)]>) -> Read {
        match (self.pooling, spans) {
            (Pooling::Mean, _) => Read::All,
            (Pooling::First, None) => Read::First,
            (Pooling::LastToken, None) => Read::Last,
            (pooling, Some(spans)) => Read::At(span_reads(pooling, spans)),
        }
    }

    /// Closed-form trainable count: `outputs·hidden`, plus `outputs` with a bias (encoders).
    pub fn num_parameters(kind: HeadKind, hidden: usize, bias: bool) -> usize {
        kind.outputs() * (hidden + bias as usize)
    }

    /// Head outputs `[n, outputs]` read at given tokens of `enc` (flat `row · len + position`
    /// u32 indices), for packed rows where examples end inside a row. Last-token pooling only:
    /// the other poolings summarise a whole row.
    pub fn forward_at(&self, enc: &Encoded, at: &Tensor) -> Result<Tensor> {
        if self.pooling != Pooling::LastToken {
            return Err(crate::BackboneError::Input(format!(
                "a head pooling {:?} cannot read packed rows",
                self.pooling
            )));
        }
        let x = match &enc.read {
            Read::All => {
                let (b, s, h) = enc.hidden.dims3()?;
                enc.hidden.reshape((b * s, h))?.index_select(at, 0)?
            }
            Read::At(read) if *read == at.to_vec1::<u32>()? => enc.hidden.squeeze(1)?,
            read => return Err(unpoolable(read, self.pooling)),
        }
        .to_dtype(DType::F32)?;
        Ok(self.out.forward(&x)?)
    }

    /// Head outputs `[n, outputs]` for examples packed end to end in rows: example i is the
    /// `len` positions from flat index `start` (`row · len + position`), its virtual tokens
    /// first when the method has them, pooled as a row of its own is, the pooler included.
    pub fn forward_spans(
        &self,
        model: &Transformer,
        enc: &Encoded,
        spans: &[(usize, usize)],
    ) -> Result<Tensor> {
        // The batch's shape: the mask's, whatever rows `hidden` holds.
        let (b, s) = enc.mask.dims2()?;
        let h = enc.hidden.dim(2)?;
        if enc.input_prefix_len > 0 {
            return Err(crate::BackboneError::Input(
                "packed rows with an input prefix before every row".into(),
            ));
        }
        // Mean pooling leaves the virtual tokens out, as for a row of its own.
        let p = enc.prompt_per_example;
        if let Some(&(start, len)) = spans.iter().find(|(st, l)| *l <= p || st + l > b * s) {
            return Err(crate::BackboneError::Input(format!(
                "packed example at {start} of {len} tokens does not fit [{b}, {s}]"
            )));
        }
        let dev = enc.hidden.device();
        let rows = |at: Vec<u32>| -> Result<Tensor> {
            let n = at.len();
            let flat = enc.hidden.reshape((b * s, h))?;
            Ok(flat.index_select(&Tensor::from_vec(at, n, dev)?, 0)?)
        };
        let mut x = match (&enc.read, self.pooling) {
            (Read::All, Pooling::Mean) => {
                // One averaging row per example: a product whose backward spreads the gradient.
                let mut w = vec![0f32; spans.len() * b * s];
                for (i, &(st, l)) in spans.iter().enumerate() {
                    w[i * b * s + st + p..][..l - p].fill(1.0 / (l - p) as f32);
                }
                let flat = enc.hidden.reshape((b * s, h))?;
                Tensor::from_vec(w, (spans.len(), b * s), dev)?
                    .matmul(&flat.to_dtype(DType::F32)?)?
            }
            (Read::All, pooling) => rows(span_reads(pooling, spans))?,
            // The forward computed these rows alone, in span order.
            (Read::At(read), pooling) if *read == span_reads(pooling, spans) => {
                enc.hidden.squeeze(1)?
            }
            (read, pooling) => return Err(unpoolable(read, pooling)),
        }
        .to_dtype(DType::F32)?;
        if self.pooling == Pooling::First {
            if let Some(p) = &model.pooler {
                x = p.forward(&x)?.tanh()?;
            }
        }
        Ok(self.out.forward(&x)?)
    }

    /// Head outputs `[batch, outputs]`.
    pub fn forward(&self, model: &Transformer, enc: &Encoded) -> Result<Tensor> {
        let mut x = pool(enc, self.pooling)?;
        if self.pooling == Pooling::First {
            if let Some(p) = &model.pooler {
                x = p.forward(&x)?.tanh()?;
            }
        }
        Ok(self.out.forward(&x)?)
    }
}

/// The flat position each packed example is pooled at: its first token or its last.
fn span_reads(pooling: Pooling, spans: &[(usize, usize)]) -> Vec<u32> {
    spans
        .iter()
        .map(|&(st, l)| match pooling {
            Pooling::LastToken => (st + l - 1) as u32,
            _ => st as u32,
        })
        .collect()
}

/// Next-token logits `[batch, len, vocab]` from the (tied or untied) LM head.
pub fn lm_logits(model: &Transformer, enc: &Encoded) -> Result<Tensor> {
    let w = model.lm_head_weight();
    // The vocabulary-wide product runs in the base's dtype; the loss reads f32 logits.
    Ok(Linear::new(w.clone(), None)
        .forward(&enc.hidden)?
        .to_dtype(DType::F32)?)
}
