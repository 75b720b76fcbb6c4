//! Tokenised examples for the three objectives, and batching them.

use candle_core::{DType, Device, Tensor};
use peftbench_backbone::{pad_rows, Inputs};

/// What a classification / regression example is labelled with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// Class index.
    Class(usize),
    /// Real-valued score.
    Score(f32),
}

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A text (or pair) with a label.
    Text {
        /// Token ids with special tokens.
        ids: Vec<u32>,
        /// Segment ids.
        types: Vec<u32>,
        /// Label.
        target: Target,
    },
    /// A prompt and response for causal-LM training; loss only on the response.
    Lm {
        /// Prompt then response token ids.
        ids: Vec<u32>,
        /// Index of the first response token: tokens before it are never predicted.
        response_start: usize,
    },
    /// A preference pair, each side prompt + response.
    Pair {
        /// Prompt + chosen response.
        chosen: Vec<u32>,
        /// Prompt + rejected response.
        rejected: Vec<u32>,
    },
}

impl Example {
    /// Non-padding tokens the example feeds the model.
    pub fn num_tokens(&self) -> usize {
        match self {
            Example::Text { ids, .. } | Example::Lm { ids, .. } => ids.len(),
            Example::Pair { chosen, rejected } => chosen.len() + rejected.len(),
        }
    }
}

/// A batch ready for the model.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Classification or regression.
    Text {
        /// Inputs.
        inputs: Inputs,
        /// Labels.
        targets: Vec<Target>,
        /// Packed rows: where each example lies, as its first token's flat index
        /// (`row · len + position`) and its length, in `targets`' order.
        spans: Option<Vec<(usize, usize)>>,
    },
    /// Causal LM with its loss mask.
    Lm {
        /// Inputs.
        inputs: Inputs,
        /// `[batch, len]` 1.0 where position t's next token (t+1) is a response token.
        loss_mask: Tensor,
        /// `[batch, len]` u32 next-token targets (0 where masked).
        next: Tensor,
        /// Packed rows: where each example lies, as its first position's flat index
        /// (`row · len + position`) and its length, in the examples' order.
        spans: Option<Vec<(usize, usize)>>,
    },
    /// Preference pairs.
    Pair {
        /// Chosen sides.
        chosen: Inputs,
        /// Rejected sides.
        rejected: Inputs,
    },
}

/// Keeps at most `max_len` tokens, cutting the prompt from the left so the response survives.
pub fn clip_left(ids: &[u32], max_len: usize) -> Vec<u32> {
    ids[ids.len().saturating_sub(max_len)..].to_vec()
}

/// Batches examples of one kind (mixing kinds is a programming error).
pub fn make_batch(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let err = || candle_core::Error::Msg("a batch mixes example kinds".into());
    match examples[0] {
        Example::Text { .. } => {
            let mut ids = Vec::new();
            let mut types = Vec::new();
            let mut targets = Vec::new();
            for e in examples {
                let Example::Text {
                    ids: i,
                    types: t,
                    target,
                } = e
                else {
                    return Err(err());
                };
                ids.push(i.clone());
                types.push(t.clone());
                targets.push(*target);
            }
            let inputs =
                pad_rows(&ids, Some(&types), pad_id, device).map_err(candle_core::Error::wrap)?;
            Ok(Batch::Text {
                inputs,
                targets,
                spans: None,
            })
        }
        Example::Lm { .. } => {
            let mut rows = Vec::new();
            let mut starts = Vec::new();
            for e in examples {
                let Example::Lm {
                    ids,
                    response_start,
                } = e
                else {
                    return Err(err());
                };
                rows.push(ids.clone());
                starts.push(*response_start);
            }
            let inputs = pad_rows(&rows, None, pad_id, device).map_err(candle_core::Error::wrap)?;
            let (b, t) = inputs.input_ids.dims2()?;
            let mut mask = vec![0f32; b * t];
            let mut next = vec![0u32; b * t];
            for (i, r) in rows.iter().enumerate() {
                for pos in 0..r.len().saturating_sub(1) {
                    if pos + 1 >= starts[i] {
                        mask[i * t + pos] = 1.0;
                        next[i * t + pos] = r[pos + 1];
                    }
                }
            }
            Ok(Batch::Lm {
                inputs,
                loss_mask: Tensor::from_vec(mask, (b, t), device)?,
                next: Tensor::from_vec(next, (b, t), device)?,
                spans: None,
            })
        }
        Example::Pair { .. } => {
            let mut c = Vec::new();
            let mut r = Vec::new();
            for e in examples {
                let Example::Pair { chosen, rejected } = e else {
                    return Err(err());
                };
                c.push(chosen.clone());
                r.push(rejected.clone());
            }
            Ok(Batch::Pair {
                chosen: pad_rows(&c, None, pad_id, device).map_err(candle_core::Error::wrap)?,
                rejected: pad_rows(&r, None, pad_id, device).map_err(candle_core::Error::wrap)?,
            })
        }
    }
}

/// Examples laid end to end in rows (first fit, longest first), no row longer than the
/// longest example, each opened by `prompt` slots that the method's virtual tokens fill:
/// every position carries its example (from 1) and its position in it (slots and tokens each
/// counted from 0; the backbone moves the tokens past the slots where they take positions).
struct Layout {
    rows: usize,
    len: usize,
    ids: Vec<u32>,
    attention: Vec<u32>,
    segments: Vec<u32>,
    positions: Vec<u32>,
    slots: Vec<u32>,
    /// Each example's first position (its first slot) as a flat index `row · len + position`.
    starts: Vec<usize>,
    prompt: usize,
}

impl Layout {
    fn new(examples: &[&[u32]], prompt: usize, pad_id: u32) -> Self {
        let lens: Vec<usize> = examples.iter().map(|e| prompt + e.len()).collect();
        let (rows, len) = first_fit(&lens);
        let n = rows.len() * len;
        let mut l = Layout {
            rows: rows.len(),
            len,
            ids: vec![pad_id; n],
            attention: vec![0; n],
            segments: vec![0; n],
            positions: vec![0; n],
            slots: vec![0; n],
            starts: vec![0; examples.len()],
            prompt,
        };
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * len;
            for (k, &i) in row.iter().enumerate() {
                l.starts[i] = at;
                let (tokens, m) = (examples[i], lens[i]);
                l.attention[at..at + m].fill(1);
                l.segments[at..at + m].fill(k as u32 + 1);
                for j in 0..prompt {
                    (l.slots[at + j], l.positions[at + j]) = (j as u32 + 1, j as u32);
                }
                let own = at + prompt;
                l.ids[own..at + m].copy_from_slice(tokens);
                for (p, v) in l.positions[own..at + m].iter_mut().enumerate() {
                    *v = p as u32;
                }
                at += m;
            }
        }
        l
    }

    fn inputs(self, types: Option<Vec<u32>>, device: &Device) -> candle_core::Result<Inputs> {
        let u = |v: Vec<u32>| Tensor::from_vec(v, (self.rows, self.len), device);
        Ok(Inputs {
            input_ids: u(self.ids)?,
            attention_mask: u(self.attention)?,
            token_type_ids: types.map(u).transpose()?,
            packing: Some(peftbench_backbone::Packing {
                segments: u(self.segments)?,
                positions: u(self.positions)?,
                prompt: match self.prompt {
                    0 => None,
                    _ => Some(u(self.slots)?),
                },
            }),
        })
    }
}

/// A batch of `examples`: packed into rows with `prompt` virtual tokens opening each example
/// when given (causal LM, classification, regression), else padded ([`make_batch`]; pairs
/// always, as [`crate::objective::pair_scores`] packs them itself).
pub fn batch(
    examples: &[&Example],
    prompt: Option<usize>,
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    match (prompt, examples.first()) {
        (Some(p), Some(Example::Lm { .. })) => pack_lm_batch(examples, p, pad_id, device),
        (Some(p), Some(Example::Text { .. })) => pack_text_batch(examples, p, pad_id, device),
        _ => make_batch(examples, pad_id, device),
    }
}

/// Causal-LM examples packed into rows ([`Layout`], `prompt` virtual tokens opening each):
/// no example's last token is asked for the next one's first and no virtual token predicts
/// anything. The loss over the batch is the padded batch's ([`make_batch`]), without the
/// padding's compute.
pub fn pack_lm_batch(
    examples: &[&Example],
    prompt: usize,
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let mut parts = Vec::with_capacity(examples.len());
    for e in examples {
        let Example::Lm {
            ids,
            response_start,
        } = e
        else {
            candle_core::bail!("only causal-LM examples are packed");
        };
        parts.push((ids.as_slice(), *response_start));
    }
    let layout = Layout::new(
        &parts.iter().map(|(ids, _)| *ids).collect::<Vec<_>>(),
        prompt,
        pad_id,
    );
    let (b, t) = (layout.rows, layout.len);
    let mut mask = vec![0f32; b * t];
    let mut next = vec![0u32; b * t];
    let mut spans = Vec::with_capacity(parts.len());
    for (&(tokens, start), &at) in parts.iter().zip(&layout.starts) {
        spans.push((at, prompt + tokens.len()));
        let own = at + prompt;
        for pos in 0..tokens.len().saturating_sub(1) {
            if pos + 1 >= start {
                mask[own + pos] = 1.0;
                next[own + pos] = tokens[pos + 1];
            }
        }
    }
    Ok(Batch::Lm {
        inputs: layout.inputs(None, device)?,
        loss_mask: Tensor::from_vec(mask, (b, t), device)?,
        next: Tensor::from_vec(next, (b, t), device)?,
        spans: Some(spans),
    })
}

/// Rows of examples laid end to end, first fit in order of decreasing length, no row longer
/// than the longest example: the rows (example indices) and that length.
fn first_fit(lens: &[usize]) -> (Vec<Vec<usize>>, usize) {
    let cap = lens.iter().copied().max().unwrap_or(1).max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    // Rows as lists of examples, and the room each has left.
    let mut rows: Vec<(Vec<usize>, usize)> = Vec::new();
    for i in order {
        match rows.iter_mut().find(|(_, room)| *room >= lens[i]) {
            Some((row, room)) => {
                row.push(i);
                *room -= lens[i];
            }
            None => rows.push((vec![i], cap - lens[i])),
        }
    }
    (rows.into_iter().map(|(row, _)| row).collect(), cap)
}

/// Classification or regression examples packed into rows ([`Layout`], `prompt` virtual
/// tokens opening each), segment ids kept: each example attends only to itself, positioned
/// as in a row of its own, so a head reading its span sees what it sees padded.
pub fn pack_text_batch(
    examples: &[&Example],
    prompt: usize,
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let mut parts = Vec::with_capacity(examples.len());
    let mut targets = Vec::with_capacity(examples.len());
    for e in examples {
        let Example::Text { ids, types, target } = e else {
            candle_core::bail!("a text batch mixes example kinds");
        };
        parts.push((ids.as_slice(), types));
        targets.push(*target);
    }
    let layout = Layout::new(
        &parts.iter().map(|(ids, _)| *ids).collect::<Vec<_>>(),
        prompt,
        pad_id,
    );
    // Virtual tokens and padding are segment 0, as before a row of its own.
    let mut types = vec![0u32; layout.rows * layout.len];
    let mut spans = Vec::with_capacity(parts.len());
    for (&(tokens, tys), &at) in parts.iter().zip(&layout.starts) {
        let own = at + prompt;
        let n = tys.len().min(tokens.len());
        types[own..own + n].copy_from_slice(&tys[..n]);
        spans.push((at, prompt + tokens.len()));
    }
    Ok(Batch::Text {
        inputs: layout.inputs(Some(types), device)?,
        targets,
        spans: Some(spans),
    })
}

/// Number of the examples' own tokens in a batch's inputs: no padding, and no slot for a
/// virtual token (a padded row's prefix is not in its mask either).
pub fn batch_tokens(b: &Batch) -> candle_core::Result<usize> {
    let count = |i: &Inputs| -> candle_core::Result<usize> {
        let real = i.attention_mask.to_dtype(DType::F32)?.sum_all()?;
        let slots = match i.packing.as_ref().and_then(|pk| pk.prompt.as_ref()) {
            Some(s) => s.gt(0u32)?.to_dtype(DType::F32)?.sum_all()?,
            None => real.zeros_like()?,
        };
        Ok((real - slots)?.to_scalar::<f32>()? as usize)
    };
    match b {
        Batch::Text { inputs, .. } | Batch::Lm { inputs, .. } => count(inputs),
        Batch::Pair { chosen, rejected } => Ok(count(chosen)? + count(rejected)?),
    }
}
