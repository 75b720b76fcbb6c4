//! Per-example dev outcomes, kept in each record so that intervals and paired tests can
//! resample the dev set: every metric is a function of these, computed here for any subset.

use crate::metrics;
use serde::{Deserialize, Serialize};

/// What each dev example gave at the reported evaluation, in dev order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcomes {
    /// Classification: gold and predicted class per example.
    Classes {
        /// Gold labels.
        gold: Vec<u32>,
        /// Predicted labels.
        pred: Vec<u32>,
    },
    /// Regression: gold and predicted value per example.
    Values {
        /// Gold values.
        gold: Vec<f64>,
        /// Predictions.
        pred: Vec<f64>,
    },
    /// Preference pairs: reward(chosen) − reward(rejected) per pair.
    Pairs {
        /// Margins.
        margins: Vec<f64>,
    },
    /// Causal LM on responses: per example, the summed NLL of its scored tokens, how many
    /// there were, and how many the argmax got wrong.
    Tokens {
        /// Σ NLL over the example's scored tokens.
        nll: Vec<f64>,
        /// Scored tokens.
        tokens: Vec<u32>,
        /// Of those, argmax mispredictions.
        wrong: Vec<u32>,
    },
}

fn pick<T: Copy>(v: &[T], idx: &[usize]) -> Vec<T> {
    idx.iter().map(|&i| v[i]).collect()
}

impl Outcomes {
    /// Dev examples.
    pub fn len(&self) -> usize {
        match self {
            Outcomes::Classes { gold, .. } => gold.len(),
            Outcomes::Values { gold, .. } => gold.len(),
            Outcomes::Pairs { margins } => margins.len(),
            Outcomes::Tokens { nll, .. } => nll.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `other` scores the same examples (same kind, count and gold labels), so the
    /// two can be compared example by example.
    pub fn pairs_with(&self, other: &Outcomes) -> bool {
        match (self, other) {
            (Outcomes::Classes { gold: a, .. }, Outcomes::Classes { gold: b, .. }) => a == b,
            (Outcomes::Values { gold: a, .. }, Outcomes::Values { gold: b, .. }) => a == b,
            (Outcomes::Pairs { margins: a }, Outcomes::Pairs { margins: b }) => a.len() == b.len(),
            (Outcomes::Tokens { tokens: a, .. }, Outcomes::Tokens { tokens: b, .. }) => a == b,
            _ => false,
        }
    }

    /// The metric `name` on the examples `idx` (repeats allowed: a bootstrap resample); None
    /// for a metric these outcomes cannot give. NaN where the metric is undefined (a constant
    /// prediction's correlation).
    pub fn metric_on(&self, name: &str, idx: &[usize]) -> Option<f64> {
        let k = idx.len().max(1) as f64;
        Some(match self {
            Outcomes::Classes { gold, pred } => {
                let g: Vec<usize> = idx.iter().map(|&i| gold[i] as usize).collect();
                let p: Vec<usize> = idx.iter().map(|&i| pred[i] as usize).collect();
                match name {
                    "accuracy" => metrics::accuracy(&p, &g),
                    "f1" => metrics::f1_binary(&p, &g),
                    "matthews" => metrics::matthews(&p, &g),
                    "pearson" | "spearman" => {
                        let pf: Vec<f64> = p.iter().map(|x| *x as f64).collect();
                        let gf: Vec<f64> = g.iter().map(|x| *x as f64).collect();
                        if name == "pearson" {
                            metrics::pearson(&pf, &gf)
                        } else {
                            metrics::spearman(&pf, &gf)
                        }
                    }
                    _ => return None,
                }
            }
            Outcomes::Values { gold, pred } => {
                let (g, p) = (pick(gold, idx), pick(pred, idx));
                match name {
                    "pearson" => metrics::pearson(&p, &g),
                    "spearman" => metrics::spearman(&p, &g),
                    _ => return None,
                }
            }
            Outcomes::Pairs { margins } => match name {
                "pair_accuracy" => idx.iter().filter(|&&i| margins[i] > 0.0).count() as f64 / k,
                "mean_margin" => idx.iter().map(|&i| margins[i]).sum::<f64>() / k,
                _ => return None,
            },
            Outcomes::Tokens { nll, tokens, wrong } => {
                let t: f64 = idx.iter().map(|&i| tokens[i] as f64).sum::<f64>().max(1.0);
                let nll_mean = idx.iter().map(|&i| nll[i]).sum::<f64>() / t;
                match name {
                    "response_nll" => nll_mean,
                    "perplexity" => nll_mean.exp(),
                    "token_accuracy" => 1.0 - idx.iter().map(|&i| wrong[i] as f64).sum::<f64>() / t,
                    "exact_match" => idx.iter().filter(|&&i| wrong[i] == 0).count() as f64 / k,
                    _ => return None,
                }
            }
        })
    }

    /// The metric on every example.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let all: Vec<usize> = (0..self.len()).collect();
        self.metric_on(name, &all)
    }
}

/// Whether lower values of the metric are better.
pub fn lower_is_better(metric: &str) -> bool {
    matches!(metric, "response_nll" | "perplexity")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_on_subsets_and_resamples() {
        let o = Outcomes::Classes {
            gold: vec![1, 0, 0, 1],
            pred: vec![1, 0, 1, 1],
        };
        assert_eq!(o.metric("accuracy"), Some(0.75));
        assert_eq!(o.metric_on("accuracy", &[0, 0, 2]), Some(2.0 / 3.0));
        assert!((o.metric("f1").unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(o.metric("pair_accuracy"), None);
        let t = Outcomes::Tokens {
            nll: vec![2.0, 6.0],
            tokens: vec![2, 2],
            wrong: vec![0, 1],
        };
        assert_eq!(t.metric("response_nll"), Some(2.0));
        assert_eq!(t.metric("token_accuracy"), Some(0.75));
        assert_eq!(t.metric("exact_match"), Some(0.5));
        assert_eq!(t.metric_on("response_nll", &[1, 1]), Some(3.0));
        let p = Outcomes::Pairs {
            margins: vec![0.5, -1.0, 2.0],
        };
        assert_eq!(p.metric("pair_accuracy"), Some(2.0 / 3.0));
        assert!(!o.pairs_with(&p));
        assert!(o.pairs_with(&o.clone()));
    }
}
