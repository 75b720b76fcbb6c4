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

/// Causal-LM examples laid end to end in rows (first fit, longest first), no row longer than
/// the longest example: each token carries its example (from 1) and its position in it, and
/// no example's last token is asked for the next one's first. The loss over the batch is the
/// padded batch's ([`make_batch`]), without the padding's compute.
pub fn pack_lm_batch(
    examples: &[&Example],
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
        parts.push((ids, *response_start));
    }
    let (rows, cap) = first_fit(&parts.iter().map(|(ids, _)| ids.len()).collect::<Vec<_>>());
    let (b, t) = (rows.len(), cap);
    let mut ids = vec![pad_id; b * t];
    let mut attention = vec![0u32; b * t];
    let mut segments = vec![0u32; b * t];
    let mut positions = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut next = vec![0u32; b * t];
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * t;
        for (k, &i) in row.iter().enumerate() {
            let (tokens, start) = parts[i];
            for (pos, &id) in tokens.iter().enumerate() {
                ids[at] = id;
                attention[at] = 1;
                segments[at] = k as u32 + 1;
                positions[at] = pos as u32;
                if pos + 1 < tokens.len() && pos + 1 >= start {
                    mask[at] = 1.0;
                    next[at] = tokens[pos + 1];
                }
                at += 1;
            }
        }
    }
    let u = |v: Vec<u32>| Tensor::from_vec(v, (b, t), device);
    Ok(Batch::Lm {
        inputs: Inputs {
            input_ids: u(ids)?,
            attention_mask: u(attention)?,
            token_type_ids: None,
            packing: Some(peftbench_backbone::Packing {
                segments: u(segments)?,
                positions: u(positions)?,
            }),
        },
        loss_mask: Tensor::from_vec(mask, (b, t), device)?,
        next: u(next)?,
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

/// Classification or regression examples laid end to end in rows as [`pack_lm_batch`] lays
/// them, segment ids kept: each example attends only to itself with positions from 0, so a
/// head reading its span sees what it sees in a padded row of its own.
pub fn pack_text_batch(
    examples: &[&Example],
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<Batch> {
    let mut parts = Vec::with_capacity(examples.len());
    let mut targets = Vec::with_capacity(examples.len());
    for e in examples {
        let Example::Text { ids, types, target } = e else {
            candle_core::bail!("a text batch mixes example kinds");
        };
        parts.push((ids, types));
        targets.push(*target);
    }
    let (rows, cap) = first_fit(&parts.iter().map(|(ids, _)| ids.len()).collect::<Vec<_>>());
    let (b, t) = (rows.len(), cap);
    let mut ids = vec![pad_id; b * t];
    let mut attention = vec![0u32; b * t];
    let mut types = vec![0u32; b * t];
    let mut segments = vec![0u32; b * t];
    let mut positions = vec![0u32; b * t];
    let mut spans = vec![(0, 0); examples.len()];
    for (r, row) in rows.iter().enumerate() {
        let mut at = r * t;
        for (k, &i) in row.iter().enumerate() {
            let (tokens, tys) = parts[i];
            let n = tokens.len();
            spans[i] = (at, n);
            ids[at..at + n].copy_from_slice(tokens);
            attention[at..at + n].fill(1);
            types[at..at + tys.len().min(n)].copy_from_slice(&tys[..tys.len().min(n)]);
            segments[at..at + n].fill(k as u32 + 1);
            for (p, v) in positions[at..at + n].iter_mut().enumerate() {
                *v = p as u32;
            }
            at += n;
        }
    }
    let u = |v: Vec<u32>| Tensor::from_vec(v, (b, t), device);
    Ok(Batch::Text {
        inputs: Inputs {
            input_ids: u(ids)?,
            attention_mask: u(attention)?,
            token_type_ids: Some(u(types)?),
            packing: Some(peftbench_backbone::Packing {
                segments: u(segments)?,
                positions: u(positions)?,
            }),
        },
        targets,
        spans: Some(spans),
    })
}

/// Number of non-padding tokens in a batch's inputs.
pub fn batch_tokens(b: &Batch) -> candle_core::Result<usize> {
    let count = |i: &Inputs| -> candle_core::Result<usize> {
        Ok(i.attention_mask
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()? as usize)
    };
    match b {
        Batch::Text { inputs, .. } | Batch::Lm { inputs, .. } => count(inputs),
        Batch::Pair { chosen, rejected } => Ok(count(chosen)? + count(rejected)?),
    }
}
