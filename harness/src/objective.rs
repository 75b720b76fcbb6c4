//! Losses and dev metrics of the three objectives; every method plugs in unchanged.

use crate::data::{make_batch, Batch, Example, Target};
use crate::metrics;
use candle_core::{DType, Device, Tensor, D};
use peftbench_backbone::ops::{cross_entropy, log_softmax_last_dim};
use peftbench_backbone::{lm_logits, Intervention, SequenceHead, Transformer};
use peftbench_datasets::GlueMetric;
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

/// Per-example LM statistics: summed NLL, counted tokens, whether every argmax was right.
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
    let (_, t) = inputs.input_ids.dims2()?;
    let logits = lm_logits(s.model, &enc).map_err(candle_core::Error::wrap)?;
    // Positions of real tokens sit after any input prefix.
    let logits = logits.narrow(1, enc.input_prefix_len, t)?;
    let logp = log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&next.unsqueeze(2)?, 2)?.squeeze(2)?;
    let nll = (picked.neg()? * mask)?;
    let argmax = logits.argmax(D::Minus1)?;
    let wrong = (argmax.ne(next)?.to_dtype(DType::F32)? * mask)?.sum(1)?;
    Ok((nll, mask.clone(), wrong))
}

fn scores(s: &Scorer, inputs: &peftbench_backbone::Inputs) -> candle_core::Result<Tensor> {
    let enc = s
        .model
        .forward(inputs, s.method)
        .map_err(candle_core::Error::wrap)?;
    let head = s
        .head
        .ok_or_else(|| candle_core::Error::Msg("objective needs a head".into()))?;
    head.forward(s.model, &enc)
        .map_err(candle_core::Error::wrap)
}

fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    // log(1 + e^x) = max(x, 0) + log(1 + e^−|x|), stable for large |x|.
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// The training loss of one batch.
pub fn loss(obj: &Objective, s: &Scorer, batch: &Batch) -> candle_core::Result<Tensor> {
    match (obj, batch) {
        (Objective::Classification { .. }, Batch::Text { inputs, targets }) => {
            let logits = scores(s, inputs)?;
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
        (Objective::Regression, Batch::Text { inputs, targets }) => {
            let pred = scores(s, inputs)?.squeeze(1)?;
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
            },
        ) => {
            let (nll, mask, _) = lm_stats(s, inputs, loss_mask, next)?;
            nll.sum_all()? / (mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64)
        }
        (Objective::Reward, Batch::Pair { chosen, rejected }) => {
            let rc = scores(s, chosen)?.squeeze(1)?;
            let rr = scores(s, rejected)?.squeeze(1)?;
            softplus(&(rr - rc)?)?.mean_all()
        }
        _ => Err(candle_core::Error::Msg(
            "batch does not fit the objective".into(),
        )),
    }
}

/// Dev metrics over `examples`, in batches of `batch_size`.
pub fn evaluate(
    obj: &Objective,
    s: &Scorer,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> candle_core::Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    let mut pred_cls = Vec::new();
    let mut gold_cls = Vec::new();
    let mut pred_val = Vec::new();
    let mut gold_val = Vec::new();
    let (mut nll_sum, mut tok, mut exact, mut n) = (0f64, 0f64, 0usize, 0usize);
    let mut wrong_tokens = 0f64;
    let mut margins = Vec::new();
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = make_batch(&refs, pad_id, device)?;
        match (obj, &batch) {
            (Objective::Classification { .. }, Batch::Text { inputs, targets }) => {
                let p: Vec<u32> = scores(s, inputs)?.argmax(D::Minus1)?.to_vec1()?;
                pred_cls.extend(p.iter().map(|x| *x as usize));
                gold_cls.extend(targets.iter().map(|t| match t {
                    Target::Class(c) => *c,
                    Target::Score(v) => *v as usize,
                }));
            }
            (Objective::Regression, Batch::Text { inputs, targets }) => {
                let p: Vec<f32> = scores(s, inputs)?.squeeze(1)?.to_vec1()?;
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
                },
            ) => {
                let (nll, mask, wrong) = lm_stats(s, inputs, loss_mask, next)?;
                nll_sum += nll.sum_all()?.to_scalar::<f32>()? as f64;
                tok += mask.sum_all()?.to_scalar::<f32>()? as f64;
                let w: Vec<f32> = wrong.to_vec1()?;
                wrong_tokens += w.iter().map(|x| *x as f64).sum::<f64>();
                exact += w.iter().filter(|x| **x == 0.0).count();
                n += w.len();
            }
            (Objective::Reward, Batch::Pair { chosen, rejected }) => {
                let rc: Vec<f32> = scores(s, chosen)?.squeeze(1)?.to_vec1()?;
                let rr: Vec<f32> = scores(s, rejected)?.squeeze(1)?.to_vec1()?;
                margins.extend(rc.iter().zip(&rr).map(|(a, b)| (*a - *b) as f64));
            }
            _ => {
                return Err(candle_core::Error::Msg(
                    "dev example does not fit the objective".into(),
                ))
            }
        }
    }
    match obj {
        Objective::Classification { metric, .. } => {
            out.insert("accuracy".into(), metrics::accuracy(&pred_cls, &gold_cls));
            match metric {
                GlueMetric::Matthews => {
                    out.insert("matthews".into(), metrics::matthews(&pred_cls, &gold_cls));
                }
                GlueMetric::F1Accuracy => {
                    out.insert("f1".into(), metrics::f1_binary(&pred_cls, &gold_cls));
                }
                GlueMetric::PearsonSpearman => {
                    let p: Vec<f64> = pred_cls.iter().map(|x| *x as f64).collect();
                    let g: Vec<f64> = gold_cls.iter().map(|x| *x as f64).collect();
                    out.insert("pearson".into(), metrics::pearson(&p, &g));
                    out.insert("spearman".into(), metrics::spearman(&p, &g));
                }
                GlueMetric::Accuracy => {}
            }
        }
        Objective::Regression => {
            out.insert("pearson".into(), metrics::pearson(&pred_val, &gold_val));
            out.insert("spearman".into(), metrics::spearman(&pred_val, &gold_val));
        }
        Objective::CausalLm => {
            let nll = nll_sum / tok.max(1.0);
            out.insert("response_nll".into(), nll);
            out.insert("perplexity".into(), nll.exp());
            out.insert("exact_match".into(), exact as f64 / n.max(1) as f64);
            out.insert("token_accuracy".into(), 1.0 - wrong_tokens / tok.max(1.0));
        }
        Objective::Reward => {
            let k = margins.len().max(1) as f64;
            out.insert(
                "pair_accuracy".into(),
                margins.iter().filter(|m| **m > 0.0).count() as f64 / k,
            );
            out.insert("mean_margin".into(), margins.iter().sum::<f64>() / k);
        }
    }
    Ok(out)
}
