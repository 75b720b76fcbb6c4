//! Losses and dev metrics of the three objectives; every method plugs in unchanged.

use crate::data::{Batch, Example, Target};
use candle_core::{Device, Tensor, D};
use peftbench_backbone::lm_loss::token_nll;
use peftbench_backbone::ops::cross_entropy;
use peftbench_backbone::{Intervention, SequenceHead, Transformer};
use peftbench_datasets::GlueMetric;
use peftbench_reports::outcomes::Outcomes;
use std::collections::BTreeMap;

/// What a task trains for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// Cross-entropy over classes, scored with a GLUE metric.
    Classification {
        /// Number of classes.
        num_labels: usize,
        /// The metric.
        metric: GlueMetric,
    },
    /// MSE on a score, scored with Pearson/Spearman.
    Regression,
    /// Causal-LM loss on response tokens only; NLL, perplexity, token accuracy and exact match.
    CausalLm,
    /// −log σ(r_chosen − r_rejected); pair accuracy and margin.
    Reward,
}

impl Objective {
    /// The metric that ranks runs.
    pub fn primary_metric(&self) -> &'static str {
        match self {
            Objective::Classification { metric, .. } => match metric {
                GlueMetric::Accuracy => "accuracy",
                GlueMetric::Matthews => "matthews",
                GlueMetric::PearsonSpearman => "pearson",
                GlueMetric::F1Accuracy => "f1",
            },
            Objective::Regression => "pearson",
            // Open-ended responses rarely match exactly; the share of response tokens the
            // model predicts (teacher-forced argmax) ranks SFT runs, higher is better.
            Objective::CausalLm => "token_accuracy",
            Objective::Reward => "pair_accuracy",
        }
    }

    /// Whether a larger primary metric is better (all of ours are).
    pub fn higher_is_better(&self) -> bool {
        true
    }

    /// The task head this objective needs, if any.
    pub fn head_kind(&self) -> Option<peftbench_backbone::HeadKind> {
        use peftbench_backbone::HeadKind;
        match self {
            Objective::Classification { num_labels, .. } => Some(HeadKind::Classifier {
                num_labels: *num_labels,
            }),
            Objective::Regression => Some(HeadKind::Regression),
            Objective::CausalLm => None,
            Objective::Reward => Some(HeadKind::Reward),
        }
    }
}

/// The model, the method and the head as one scorer.
pub struct Scorer<'a> {
    /// Backbone.
    pub model: &'a Transformer,
    /// Method hooks.
    pub method: &'a dyn Intervention,
    /// Task head (none for causal LM).
    pub head: Option<&'a SequenceHead>,
}

/// Per-position LM statistics `[batch, len]`: NLL, 1 where counted, 1 where the argmax was
/// wrong (all 0 outside the loss).
fn lm_stats(
    s: &Scorer,
    inputs: &peftbench_backbone::Inputs,
    mask: &Tensor,
    next: &Tensor,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let enc = s
        .model
        .forward(inputs, s.method)
        .map_err(candle_core::Error::wrap)?;
    let (b, t) = inputs.input_ids.dims2()?;
    // Positions of real tokens sit after any input prefix.
    let hidden = enc.hidden.narrow(1, enc.input_prefix_len, t)?;
    let hidden = hidden.reshape((b * t, hidden.dim(2)?))?;
    // Positions outside the loss get an out-of-vocabulary target: the op skips them.
    let outside = Tensor::full(u32::MAX, (b, t), next.device())?;
    let targets = mask.gt(0.0)?.where_cond(next, &outside)?.flatten_all()?;
    let stats = token_nll(
        &hidden,
        s.model.lm_head_weight(),
        &targets,
        s.model.lm_head_packed(),
    )?;
    let nll = (stats.narrow(1, 0, 1)?.reshape((b, t))? * mask)?;
    let correct = stats.narrow(1, 1, 1)?.reshape((b, t))?;
    let wrong = (mask - correct)?;
    Ok((nll, mask.clone(), wrong))
}

/// Head outputs, one row per example: read at each example's span when the rows are packed.
fn scores(
    s: &Scorer,
    inputs: &peftbench_backbone::Inputs,
    spans: Option<&[(usize, usize)]>,
) -> candle_core::Result<Tensor> {
    let head = s
        .head
        .ok_or_else(|| candle_core::Error::Msg("objective needs a head".into()))?;
    // The last layer computes only the positions the head reads.
    let enc = s
        .model
        .forward_read(inputs, s.method, &head.read(spans))
        .map_err(candle_core::Error::wrap)?;
    match spans {
        Some(spans) => head.forward_spans(s.model, &enc, spans),
        None => head.forward(s.model, &enc),
    }
    .map_err(candle_core::Error::wrap)
}

/// How many virtual tokens open each example of a packed batch: none without an input
/// prefix, its length where one prefix serves every example; `None` where rows cannot be
/// packed (a prefix of its own per row).
pub fn packed_prompt(s: &Scorer) -> candle_core::Result<Option<usize>> {
    Ok(match s.method.input_prefix()? {
        None => Some(0),
        Some(p) if p.rank() == 2 => Some(p.dim(0)?),
        Some(_) => None,
    })
}

/// Whether a pair's shared prompt can run once for both replies, and with how many virtual
/// tokens opening it: a causal model (a prompt's states do not depend on what follows), a
/// head that reads the last token and a batch that packs ([`packed_prompt`]).
pub fn pair_packing(s: &Scorer) -> candle_core::Result<Option<usize>> {
    let fits = s.model.config.is_causal()
        && s.head
            .is_some_and(|h| h.pooling == peftbench_backbone::Pooling::LastToken);
    Ok(if fits { packed_prompt(s)? } else { None })
}

/// The reward of each side of each pair, `([n], [n])`. Packed (with `prompt` virtual
/// tokens, [`pair_packing`]): one row per pair holds the method's virtual tokens and the
/// common prefix of its two conversations once (example 0, seen by both), then the chosen
/// and the rejected tails (examples 1 and 2, positions going on from the prefix), so a
/// prompt shared by both replies is computed once; equal to the two rows apart up to f32
/// rounding (tests/packing.rs).
pub fn pair_scores(
    s: &Scorer,
    chosen: &peftbench_backbone::Inputs,
    rejected: &peftbench_backbone::Inputs,
    packed: Option<usize>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let Some(prompt) = packed else {
        return Ok((
            scores(s, chosen, None)?.squeeze(1)?,
            scores(s, rejected, None)?.squeeze(1)?,
        ));
    };
    let rows = |x: &peftbench_backbone::Inputs| -> candle_core::Result<Vec<Vec<u32>>> {
        let ids: Vec<Vec<u32>> = x.input_ids.to_vec2()?;
        let mask: Vec<Vec<u32>> = x.attention_mask.to_vec2()?;
        Ok(ids
            .into_iter()
            .zip(mask)
            .map(|(ids, m)| ids[..m.iter().filter(|&&v| v > 0).count()].to_vec())
            .collect())
    };
    let (c, r) = (rows(chosen)?, rows(rejected)?);
    let n = c.len();
    let len = c
        .iter()
        .zip(&r)
        .map(|(c, r)| prompt + c.len() + r.len() - common_prefix(c, r))
        .max()
        .unwrap_or(1)
        .max(1);
    // Padding: token 0 under a zero mask.
    let (mut ids, mut mask) = (vec![0u32; n * len], vec![0u32; n * len]);
    // Padding is an example of its own (3), seen by nothing real.
    let (mut seg, mut pos) = (vec![3u32; n * len], vec![0u32; n * len]);
    let mut slots = vec![0u32; n * len];
    let (mut at_c, mut at_r) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, (c, r)) in c.iter().zip(&r).enumerate() {
        let p = common_prefix(c, r);
        let row = i * len;
        // The method's virtual tokens open the shared part.
        for j in 0..prompt {
            (ids[row + j], mask[row + j], seg[row + j]) = (0, 1, 0);
            (pos[row + j], slots[row + j]) = (j as u32, j as u32 + 1);
        }
        let mut k = row + prompt;
        for (example, part, from) in [(0, &c[..p], 0), (1, &c[p..], p), (2, &r[p..], p)] {
            for (j, &id) in part.iter().enumerate() {
                (ids[k], mask[k], seg[k], pos[k]) = (id, 1, example, (from + j) as u32);
                k += 1;
            }
        }
        // Each side's last token: in its tail, or the prefix's last when the tail is empty.
        at_c.push((row + (prompt + c.len()).max(1) - 1) as u32);
        let r_last = if r.len() > p {
            prompt + c.len() + r.len() - p
        } else {
            (prompt + p).max(1)
        };
        at_r.push((row + r_last - 1) as u32);
    }
    let dev = chosen.input_ids.device();
    let t = |v: Vec<u32>| Tensor::from_vec(v, (n, len), dev);
    let inputs = peftbench_backbone::Inputs {
        input_ids: t(ids)?,
        attention_mask: t(mask)?,
        token_type_ids: None,
        packing: Some(peftbench_backbone::Packing {
            segments: t(seg)?,
            positions: t(pos)?,
            prompt: match prompt {
                0 => None,
                _ => Some(t(slots)?),
            },
        }),
    };
    let reads = [at_c, at_r].concat();
    let enc = s
        .model
        .forward_read(
            &inputs,
            s.method,
            &peftbench_backbone::Read::At(reads.clone()),
        )
        .map_err(candle_core::Error::wrap)?;
    let head = s
        .head
        .ok_or_else(|| candle_core::Error::Msg("objective needs a head".into()))?;
    let at = Tensor::from_vec(reads, 2 * n, dev)?;
    let both = head
        .forward_at(&enc, &at)
        .map_err(candle_core::Error::wrap)?
        .squeeze(1)?;
    Ok((both.narrow(0, 0, n)?, both.narrow(0, n, n)?))
}

/// Length of the common prefix of two token sequences.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^−|x|), stable for large |x|.
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The training loss of one batch.
pub fn loss(obj: &Objective, s: &Scorer, batch: &Batch) -> candle_core::Result<Tensor> {
    match (obj, batch) {
        (
            Objective::Classification { .. },
            Batch::Text {
                inputs,
                targets,
                spans,
            },
        ) => {
            let logits = scores(s, inputs, spans.as_deref())?;
            let y: Vec<u32> = targets
                .iter()
                .map(|t| match t {
                    Target::Class(c) => *c as u32,
                    Target::Score(v) => *v as u32,
                })
                .collect();
            let y = Tensor::from_vec(y, targets.len(), logits.device())?;
            cross_entropy(&logits, &y, None)
        }
        (
            Objective::Regression,
            Batch::Text {
                inputs,
                targets,
                spans,
            },
        ) => {
            let pred = scores(s, inputs, spans.as_deref())?.squeeze(1)?;
            let y: Vec<f32> = targets
                .iter()
                .map(|t| match t {
                    Target::Score(v) => *v,
                    Target::Class(c) => *c as f32,
                })
                .collect();
            let y = Tensor::from_vec(y, targets.len(), pred.device())?;
            (pred - y)?.sqr()?.mean_all()
        }
        (
            Objective::CausalLm,
            Batch::Lm {
                inputs,
                loss_mask,
                next,
                ..
            },
        ) => {
            let (nll, mask, _) = lm_stats(s, inputs, loss_mask, next)?;
            // Divided on the device: no read back to the host inside a step.
            nll.sum_all()?.div(&mask.sum_all()?.maximum(1.0)?)
        }
        (Objective::Reward, Batch::Pair { chosen, rejected }) => {
            let (rc, rr) = pair_scores(s, chosen, rejected, pair_packing(s)?)?;
            softplus(&(rr - rc)?)?.mean_all()
        }
        _ => Err(candle_core::Error::Msg(
            "batch does not fit the objective".into(),
        )),
    }
}

/// How dev examples are batched.
#[derive(Debug, Clone, Copy)]
pub struct EvalBatches {
    /// Examples per batch.
    pub size: usize,
    /// Padding token.
    pub pad_id: u32,
    /// Examples laid end to end in rows ([`packed_prompt`]); reward pairs share their
    /// prompt whether or not this is set.
    pub pack: bool,
}

impl EvalBatches {
    /// Padded batches of `size`.
    pub fn padded(size: usize, pad_id: u32) -> Self {
        Self {
            size,
            pad_id,
            pack: false,
        }
    }
}

/// Dev metrics of the scorer on `examples` (see [`evaluate_outcomes`]).
pub fn evaluate(
    obj: &Objective,
    s: &Scorer,
    examples: &[Example],
    batches: EvalBatches,
    device: &Device,
) -> candle_core::Result<BTreeMap<String, f64>> {
    Ok(evaluate_outcomes(obj, s, examples, batches, device)?.0)
}

/// The metrics each objective reports, as [`Outcomes::metric`] names them.
fn metric_names(obj: &Objective) -> &'static [&'static str] {
    match obj {
        Objective::Classification { metric, .. } => match metric {
            GlueMetric::Matthews => &["accuracy", "matthews"],
            GlueMetric::F1Accuracy => &["accuracy", "f1"],
            GlueMetric::PearsonSpearman => &["accuracy", "pearson", "spearman"],
            GlueMetric::Accuracy => &["accuracy"],
        },
        Objective::Regression => &["pearson", "spearman"],
        Objective::CausalLm => &[
            "response_nll",
            "perplexity",
            "exact_match",
            "token_accuracy",
        ],
        Objective::Reward => &["pair_accuracy", "mean_margin"],
    }
}

/// Scores every example and returns the dev metrics with the per-example outcomes they are
/// computed from (the records keep those, so reports can resample them).
pub fn evaluate_outcomes(
    obj: &Objective,
    s: &Scorer,
    examples: &[Example],
    batches: EvalBatches,
    device: &Device,
) -> candle_core::Result<(BTreeMap<String, f64>, Outcomes)> {
    // No backward follows: each layer's activations can go once the next has run.
    peftbench_backbone::no_grad(|| outcomes(obj, s, examples, batches, device))
}

fn outcomes(
    obj: &Objective,
    s: &Scorer,
    examples: &[Example],
    batches: EvalBatches,
    device: &Device,
) -> candle_core::Result<(BTreeMap<String, f64>, Outcomes)> {
    let (batch_size, pad_id) = (batches.size, batches.pad_id);
    let mut pred_cls = Vec::new();
    let mut gold_cls = Vec::new();
    let mut pred_val = Vec::new();
    let mut gold_val = Vec::new();
    let (mut nll, mut tokens, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    let mut margins = Vec::new();
    // Batches of similar length pad little; the outcomes are put back in the examples' order.
    let order = longest_first(examples);
    let packable = match obj {
        Objective::Reward => pair_packing(s)?,
        _ => None,
    };
    let pack = match obj {
        Objective::Reward => None,
        _ if batches.pack => packed_prompt(s)?,
        _ => None,
    };
    for chunk in order.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().map(|&i| &examples[i]).collect();
        let batch = crate::data::batch(&refs, pack, pad_id, device)?;
        match (obj, &batch) {
            (
                Objective::Classification { .. },
                Batch::Text {
                    inputs,
                    targets,
                    spans,
                },
            ) => {
                let p: Vec<u32> = scores(s, inputs, spans.as_deref())?
                    .argmax(D::Minus1)?
                    .to_vec1()?;
                pred_cls.extend(p);
                gold_cls.extend(targets.iter().map(|t| match t {
                    Target::Class(c) => *c as u32,
                    Target::Score(v) => *v as u32,
                }));
            }
            (
                Objective::Regression,
                Batch::Text {
                    inputs,
                    targets,
                    spans,
                },
            ) => {
                let p: Vec<f32> = scores(s, inputs, spans.as_deref())?.squeeze(1)?.to_vec1()?;
                pred_val.extend(p.iter().map(|x| *x as f64));
                gold_val.extend(targets.iter().map(|t| match t {
                    Target::Score(v) => *v as f64,
                    Target::Class(c) => *c as f64,
                }));
            }
            (
                Objective::CausalLm,
                Batch::Lm {
                    inputs,
                    loss_mask,
                    next,
                    spans,
                },
            ) => {
                let (n, m, w) = lm_stats(s, inputs, loss_mask, next)?;
                // Summed per example: over its span in packed rows, else over its row.
                let per_example = |x: Tensor| -> candle_core::Result<Vec<f64>> {
                    Ok(match spans {
                        Some(spans) => {
                            let x: Vec<f32> = x.flatten_all()?.to_vec1()?;
                            spans
                                .iter()
                                .map(|&(at, len)| x[at..at + len].iter().map(|&v| v as f64).sum())
                                .collect()
                        }
                        None => {
                            let x: Vec<f32> = x.sum(1)?.to_vec1()?;
                            x.into_iter().map(f64::from).collect()
                        }
                    })
                };
                nll.extend(per_example(n)?);
                tokens.extend(per_example(m)?.iter().map(|x| x.round() as u32));
                wrong.extend(per_example(w)?.iter().map(|x| x.round() as u32));
            }
            (Objective::Reward, Batch::Pair { chosen, rejected }) => {
                let (rc, rr) = pair_scores(s, chosen, rejected, packable)?;
                let (rc, rr): (Vec<f32>, Vec<f32>) = (rc.to_vec1()?, rr.to_vec1()?);
                margins.extend(rc.iter().zip(&rr).map(|(a, b)| (*a - *b) as f64));
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "dev example does not fit the objective".into(),
                ))
            }
        }
    }
    let back = |v| unpermute(v, &order);
    let outcomes = match obj {
        Objective::Classification { .. } => Outcomes::Classes {
            gold: back(gold_cls),
            pred: back(pred_cls),
        },
        Objective::Regression => Outcomes::Values {
            gold: unpermute(gold_val, &order),
            pred: unpermute(pred_val, &order),
        },
        Objective::CausalLm => Outcomes::Tokens {
            nll: unpermute(nll, &order),
            tokens: back(tokens),
            wrong: back(wrong),
        },
        Objective::Reward => Outcomes::Pairs {
            margins: unpermute(margins, &order),
        },
    };
    let out = metric_names(obj)
        .iter()
        .filter_map(|m| Some((m.to_string(), outcomes.metric(m)?)))
        .collect();
    Ok((out, outcomes))
}

/// Example indices, longest first (ties keep their order), so evaluation batches pad little
/// and the largest batch comes first.
pub fn longest_first(examples: &[Example]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i].num_tokens()));
    order
}

/// Puts values computed in `order` back at their examples' positions.
pub fn unpermute<T: Clone>(values: Vec<T>, order: &[usize]) -> Vec<T> {
    debug_assert_eq!(values.len(), order.len());
    let mut out = values.clone();
    for (v, &i) in values.into_iter().zip(order) {
        out[i] = v;
    }
    out
}
