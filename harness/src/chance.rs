//! The chance level of a task: the primary dev metric of a predictor that ignores its input,
//! with its standard error, recorded with every run so a report can say which runs beat it.

use crate::data::{Example, Target};
use crate::metrics;
use crate::objective::Objective;
use peftbench_datasets::GlueMetric;
use peftbench_reports::chance::Chance;

/// The chance level of `obj` on `dev`, given the `train` labels; None for causal-LM tasks,
/// whose baseline is the untrained model's own score.
pub fn chance_level(obj: &Objective, train: &[Example], dev: &[Example]) -> Option<Chance> {
    let n = dev.len();
    if n == 0 {
        return None;
    }
    let sqrt_n = (n as f64).sqrt();
    let chance = |metric: &str, value: f64, std_error: Option<f64>, rule: String| Chance {
        metric: metric.to_string(),
        value,
        std_error,
        dev_examples: n,
        rule,
    };
    match obj {
        Objective::Classification { metric, .. } => {
            let gold: Vec<usize> = dev.iter().filter_map(class).collect();
            let majority = majority_class(train.iter().filter_map(class))?;
            let pred = vec![majority; gold.len()];
            let rule = format!("class {majority}, the training labels' majority, for every input");
            Some(match metric {
                GlueMetric::Accuracy => {
                    let p = metrics::accuracy(&pred, &gold);
                    chance("accuracy", p, Some((p * (1.0 - p)).sqrt() / sqrt_n), rule)
                }
                // A constant prediction has no correlation with the labels; √n·φ is about
                // standard normal for a predictor independent of them.
                GlueMetric::Matthews => chance("matthews", 0.0, Some(1.0 / sqrt_n), rule),
                GlueMetric::PearsonSpearman => chance("pearson", 0.0, correlation_se(n), rule),
                // Of the constant predictors, "always positive" has the highest F1: 2q/(1+q)
                // for a positive share q, whose spread over dev sets of n follows from q's
                // binomial one by the delta method: |dF1/dq| = 2/(1+q)².
                GlueMetric::F1Accuracy => {
                    let q =
                        gold.iter().filter(|g| **g == 1).count() as f64 / gold.len().max(1) as f64;
                    let ones = vec![1; gold.len()];
                    let se = 2.0 / (1.0 + q).powi(2) * (q * (1.0 - q)).sqrt() / sqrt_n;
                    chance(
                        "f1",
                        metrics::f1_binary(&ones, &gold),
                        Some(se),
                        "class 1 for every input (the constant prediction with the highest F1)"
                            .into(),
                    )
                }
            })
        }
        Objective::Regression => Some(chance(
            "pearson",
            0.0,
            correlation_se(n),
            "a prediction uncorrelated with the gold scores".into(),
        )),
        Objective::Reward => Some(chance(
            "pair_accuracy",
            0.5,
            Some(0.5 / sqrt_n),
            "a coin flip between chosen and rejected".into(),
        )),
        Objective::CausalLm => None,
    }
}

fn class(e: &Example) -> Option<usize> {
    match e {
        Example::Text {
            target: Target::Class(c),
            ..
        } => Some(*c),
        _ => None,
    }
}

/// The most frequent class, the smallest on a tie; None for no labels.
fn majority_class(labels: impl Iterator<Item = usize>) -> Option<usize> {
    let mut counts: Vec<usize> = Vec::new();
    for c in labels {
        if counts.len() <= c {
            counts.resize(c + 1, 0);
        }
        counts[c] += 1;
    }
    let best = *counts.iter().max()?;
    counts.iter().position(|&k| k == best)
}

/// Standard error of a Pearson correlation at zero: √(n − 2)·r/√(1 − r²) is t-distributed.
fn correlation_se(n: usize) -> Option<f64> {
    (n > 2).then(|| 1.0 / ((n - 2) as f64).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: usize) -> Example {
        Example::Text {
            ids: vec![1, 2],
            types: vec![0, 0],
            target: Target::Class(c),
        }
    }

    #[test]
    fn accuracy_chance_is_the_training_majority_scored_on_dev() {
        let obj = Objective::Classification {
            num_labels: 2,
            metric: GlueMetric::Accuracy,
        };
        // Train majority is class 1; dev has 3 of class 1 among 4.
        let train: Vec<Example> = [1, 1, 0].map(text).to_vec();
        let dev: Vec<Example> = [1, 1, 1, 0].map(text).to_vec();
        let c = chance_level(&obj, &train, &dev).unwrap();
        assert_eq!(c.metric, "accuracy");
        assert!((c.value - 0.75).abs() < 1e-12);
        assert!((c.std_error.unwrap() - (0.75f64 * 0.25).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(c.dev_examples, 4);
        // The training majority, not the dev one: class 0 would score 0.25 here.
        let train0: Vec<Example> = [0, 0, 1].map(text).to_vec();
        let c0 = chance_level(&obj, &train0, &dev).unwrap();
        assert!((c0.value - 0.25).abs() < 1e-12);
    }

    #[test]
    fn correlation_and_pair_chance_are_zero_and_one_half() {
        let dev: Vec<Example> = [0, 1, 0, 1, 1, 0].map(text).to_vec();
        let m = Objective::Classification {
            num_labels: 2,
            metric: GlueMetric::Matthews,
        };
        let c = chance_level(&m, &dev, &dev).unwrap();
        assert_eq!((c.metric.as_str(), c.value), ("matthews", 0.0));
        assert!((c.std_error.unwrap() - 1.0 / 6f64.sqrt()).abs() < 1e-12);
        let r = chance_level(&Objective::Reward, &[], &dev).unwrap();
        assert_eq!((r.metric.as_str(), r.value), ("pair_accuracy", 0.5));
        assert!(chance_level(&Objective::CausalLm, &dev, &dev).is_none());
        assert!(chance_level(&Objective::Regression, &dev, &[]).is_none());
    }

    /// F1's chance is "always positive": 2q/(1+q), with the delta-method standard error.
    #[test]
    fn f1_chance_is_always_positive_with_a_standard_error() {
        let obj = Objective::Classification {
            num_labels: 2,
            metric: GlueMetric::F1Accuracy,
        };
        // A negative majority in training does not matter: F1 of "always 0" is 0.
        let train: Vec<Example> = [0, 0, 0, 1].map(text).to_vec();
        let dev: Vec<Example> = [1, 1, 1, 0].map(text).to_vec();
        let c = chance_level(&obj, &train, &dev).unwrap();
        let q: f64 = 0.75;
        assert_eq!(c.metric, "f1");
        assert!((c.value - 2.0 * q / (1.0 + q)).abs() < 1e-12, "{c:?}");
        let se = 2.0 / (1.0 + q).powi(2) * (q * (1.0 - q)).sqrt() / 2.0;
        assert!((c.std_error.unwrap() - se).abs() < 1e-12, "{c:?}");
    }

    #[test]
    fn majority_ties_go_to_the_smallest_class_and_no_labels_give_none() {
        assert_eq!(majority_class([2, 0, 2, 0].into_iter()), Some(0));
        assert_eq!(majority_class([3, 3, 1].into_iter()), Some(3));
        assert_eq!(majority_class(std::iter::empty()), None);
    }
}
