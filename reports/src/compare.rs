//! Paired comparisons of a task's method × budget groups with a reference group (full
//! fine-tuning, the head-only floor) on the same dev examples: a paired bootstrap of the
//! difference per group, Holm-corrected across the task's groups.

use crate::outcomes::{lower_is_better, Outcomes};
use crate::stats::{holm, paired_test, seed_of, PairedTest, RESAMPLES};
use crate::{RunRecord, RunStatus};
use std::collections::BTreeMap;

/// Significance level of every test in the report, after Holm's correction.
pub const ALPHA: f64 = 0.05;

/// One group against the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Paired {
    /// Method.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// group − reference.
    pub test: PairedTest,
    /// Holm-adjusted p-value.
    pub p_holm: f64,
}

/// Which way a group lies from the reference, after correction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Better than the reference (higher, or lower for a loss-like metric).
    Better,
    /// Not distinguishable from it at [`ALPHA`].
    Indistinguishable,
    /// Worse.
    Worse,
}

impl Paired {
    /// Where the group lies, given the metric's direction.
    pub fn verdict(&self, metric: &str) -> Verdict {
        if self.p_holm >= ALPHA {
            return Verdict::Indistinguishable;
        }
        let higher = self.test.difference > 0.0;
        if higher != lower_is_better(metric) {
            Verdict::Better
        } else {
            Verdict::Worse
        }
    }
}

/// A task's groups against `reference` (a method name).
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The metric compared.
    pub metric: String,
    /// The reference's mean score.
    pub reference_mean: f64,
    /// Seeds of the reference.
    pub reference_runs: usize,
    /// One per other group with outcomes, in method then budget order.
    pub groups: Vec<Paired>,
}

/// The ok runs of a task with outcomes, by (method, budget).
fn groups<'a>(
    records: &'a [RunRecord],
    task: &str,
) -> BTreeMap<(String, String), Vec<&'a Outcomes>> {
    let mut out: BTreeMap<(String, String), Vec<&Outcomes>> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r.task == task && r.status == RunStatus::Ok)
    {
        if let Some(o) = &r.dev_outcomes {
            out.entry((r.method.clone(), r.budget.clone()))
                .or_default()
                .push(o);
        }
    }
    out
}

/// Every other group of `task` against the `reference` method's runs, or None when the
/// reference (or every other group) kept no outcomes. `exclude` names methods left out of the
/// family (e.g. the other reference).
pub fn compare_with(
    records: &[RunRecord],
    task: &str,
    reference: &str,
    exclude: &[&str],
) -> Option<Comparison> {
    let metric = records
        .iter()
        .find(|r| r.task == task)?
        .primary_metric
        .clone();
    let all = groups(records, task);
    let (_, ref_runs) = all.iter().find(|((m, _), _)| m == reference)?;
    let mean = ref_runs
        .iter()
        .filter_map(|o| o.metric(&metric))
        .sum::<f64>()
        / ref_runs.len() as f64;
    let mut tests = Vec::new();
    for ((method, budget), runs) in &all {
        if method == reference || exclude.contains(&method.as_str()) {
            continue;
        }
        let seed = seed_of(&format!("{task}/{method}/{budget} vs {reference}"));
        if let Some(t) = paired_test(runs, ref_runs, &metric, RESAMPLES, seed) {
            tests.push((method.clone(), budget.clone(), t));
        }
    }
    if tests.is_empty() {
        return None;
    }
    let adjusted = holm(&tests.iter().map(|t| t.2.p).collect::<Vec<_>>());
    Some(Comparison {
        metric,
        reference_mean: mean,
        reference_runs: ref_runs.len(),
        groups: tests
            .into_iter()
            .zip(adjusted)
            .map(|((method, budget, test), p_holm)| Paired {
                method,
                budget,
                test,
                p_holm,
            })
            .collect(),
    })
}

/// `lora 0.1% (−0.0040 [−0.0210, 0.0120], p = 0.61)`; `p ≤ 0.008` where no resample crossed
/// zero, since the bootstrap cannot resolve a smaller p.
pub fn describe(p: &Paired) -> String {
    let p_value = if p.test.p_at_floor {
        format!("p ≤ {:.3}", p.p_holm)
    } else {
        format!("p = {:.2}", p.p_holm)
    };
    format!(
        "{} {} ({:+.4} [{:+.4}, {:+.4}], {p_value})",
        p.method, p.budget, p.test.difference, p.test.interval.lo, p.test.interval.hi
    )
}
