//! Aggregation of ok runs over seeds: the numbers the tables, plots and Markdown share.

use crate::{RunRecord, RunStatus};
use std::collections::BTreeMap;

/// The method name of full fine-tuning, the reference every other method is compared to.
pub const FULL_FINETUNE: &str = "full_finetune";

/// The method name of the head-only control, the floor every method should clear.
pub const HEAD_ONLY: &str = "head_only";

/// Bytes per MB in every table and plot (SI megabyte, 10^6 bytes).
pub const BYTES_PER_MB: f64 = 1e6;

/// One task × method × budget group of ok runs, averaged over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// Task name.
    pub task: String,
    /// Method name.
    pub method: String,
    /// Budget label.
    pub budget: String,
    /// Budget in parameters, when the suite set one.
    pub budget_target: Option<usize>,
    /// The group's learning rates ([`RunRecord::rate_label`]); distinct labels are joined
    /// with ` / ` so a group mixing rates says so. Empty when no record has one.
    pub lr: String,
    /// Name of the primary metric of the task.
    pub primary_metric: String,
    /// Ok runs (seeds) in the group.
    pub n_seeds: usize,
    /// Mean over seeds of the reported dev value of the primary metric
    /// ([`RunRecord::primary_reported`]; None when no run has a finite one).
    pub primary_mean: Option<f64>,
    /// Sample standard deviation (n − 1) of the same values; 0 for a single seed.
    pub primary_std: Option<f64>,
    /// 95% bootstrap interval of the mean over dev examples (and seeds), when every run kept
    /// its per-example outcomes.
    pub primary_ci: Option<crate::stats::Interval>,
    /// Mean trainable parameters (head excluded).
    pub trainable_params: f64,
    /// Mean trainable parameters as a percentage of the base model.
    pub trainable_percent: f64,
    /// Mean training wall time in seconds.
    pub train_seconds: f64,
    /// Mean peak resident memory in MB.
    pub peak_memory_mb: f64,
    /// Mean unmerged inference latency (ms per batch), over runs that measured it.
    pub latency_unmerged_ms: Option<f64>,
    /// Mean merged inference latency (ms per batch), over runs that measured it.
    pub latency_merged_ms: Option<f64>,
}

/// Best dev value of the run's primary metric, if it is finite (NaN or missing gives None).
pub fn primary_best(r: &RunRecord) -> Option<f64> {
    r.metrics_best
        .get(&r.primary_metric)
        .copied()
        .filter(|v| v.is_finite())
}

/// Dev value of the run's primary metric after the last step, if finite.
pub fn primary_final(r: &RunRecord) -> Option<f64> {
    r.metrics_final
        .get(&r.primary_metric)
        .copied()
        .filter(|v| v.is_finite())
}

/// Mean of the finite values, None when there are none.
pub fn mean(values: &[f64]) -> Option<f64> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        None
    } else {
        Some(finite.iter().sum::<f64>() / finite.len() as f64)
    }
}

/// Sample standard deviation (n − 1 denominator) of the finite values; 0 for one value,
/// None for none, so a single seed reads as "no spread measured" rather than an error.
pub fn sample_std(values: &[f64]) -> Option<f64> {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let m = mean(&finite)?;
    if finite.len() < 2 {
        return Some(0.0);
    }
    let ss: f64 = finite.iter().map(|v| (v - m) * (v - m)).sum();
    Some((ss / (finite.len() - 1) as f64).sqrt())
}

/// Budget labels in display order: by parameter target ascending (labels like `10000` and
/// `2000` would sort wrongly as text), then labels without a target (e.g. `full`) in the
/// order they first appear.
pub fn budget_order(records: &[RunRecord]) -> Vec<String> {
    let mut seen: Vec<(String, Option<usize>)> = Vec::new();
    for r in records {
        match seen.iter_mut().find(|(b, _)| *b == r.budget) {
            Some((_, target)) => {
                // The smallest target a label resolved to stands for the label.
                *target = match (*target, r.budget_target) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            None => seen.push((r.budget.clone(), r.budget_target)),
        }
    }
    // Stable sort keeps first-appearance order among equal keys.
    seen.sort_by_key(|(_, t)| (t.is_none(), t.unwrap_or(0)));
    seen.into_iter().map(|(b, _)| b).collect()
}

/// Position of a budget label in `order` (unknown labels last).
pub fn budget_rank(order: &[String], budget: &str) -> usize {
    order
        .iter()
        .position(|b| b == budget)
        .unwrap_or(order.len())
}

/// Groups the ok runs by task × method × budget, sorted by task, method, then budget order.
/// Groups without any ok run are left out: their runs appear in the failure list instead.
pub fn summarize(records: &[RunRecord]) -> Vec<SummaryRow> {
    let order = budget_order(records);
    let mut groups: BTreeMap<(String, String, usize, String), Vec<&RunRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.status == RunStatus::Ok) {
        let key = (
            r.task.clone(),
            r.method.clone(),
            budget_rank(&order, &r.budget),
            r.budget.clone(),
        );
        groups.entry(key).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((task, method, _, budget), runs)| summarize_group(task, method, budget, &runs))
        .collect()
}

fn summarize_group(
    task: String,
    method: String,
    budget: String,
    runs: &[&RunRecord],
) -> SummaryRow {
    let field = |f: &dyn Fn(&RunRecord) -> f64| runs.iter().map(|r| f(r)).collect::<Vec<f64>>();
    let latency = |key: &str| {
        let v: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.latency_ms.get(key).copied())
            .collect();
        mean(&v)
    };
    let primary: Vec<f64> = runs.iter().filter_map(|r| r.primary_reported()).collect();
    let outcomes: Option<Vec<&crate::outcomes::Outcomes>> =
        runs.iter().map(|r| r.dev_outcomes.as_ref()).collect();
    let primary_ci = outcomes.and_then(|o| {
        let label = format!("{task}/{method}/{budget}");
        crate::stats::bootstrap_interval(
            &o,
            &runs[0].primary_metric,
            crate::stats::RESAMPLES,
            crate::stats::seed_of(&label),
        )
    });
    let mut rates: Vec<String> = Vec::new();
    for label in runs.iter().filter_map(|r| r.rate_label()) {
        if !rates.contains(&label) {
            rates.push(label);
        }
    }
    SummaryRow {
        task,
        method,
        budget,
        budget_target: runs.iter().find_map(|r| r.budget_target),
        lr: rates.join(" / "),
        primary_metric: runs[0].primary_metric.clone(),
        n_seeds: runs.len(),
        primary_mean: mean(&primary),
        primary_std: sample_std(&primary),
        primary_ci,
        trainable_params: mean(&field(&|r| r.trainable_params as f64)).unwrap_or(0.0),
        trainable_percent: mean(&field(&|r| r.trainable_percent)).unwrap_or(0.0),
        train_seconds: mean(&field(&|r| r.train_seconds)).unwrap_or(0.0),
        peak_memory_mb: mean(&field(&|r| r.peak_memory_bytes as f64 / BYTES_PER_MB)).unwrap_or(0.0),
        latency_unmerged_ms: latency("unmerged"),
        latency_merged_ms: latency("merged"),
    }
}

/// How a task's methods compare with full fine-tuning.
#[derive(Debug, Clone, PartialEq)]
pub enum FullComparison {
    /// Full fine-tuning has no ok run (or no finite score) on the task.
    NoFullFinetune,
    /// Full fine-tuning's score and the method × budget groups within one of its standard deviations.
    Compared {
        /// Full fine-tuning's mean primary metric.
        full_mean: f64,
        /// Full fine-tuning's sample standard deviation.
        full_std: f64,
        /// `(method, budgets)` with |mean − full_mean| ≤ full_std, methods sorted by name.
        within: Vec<(String, Vec<String>)>,
    },
}

/// Compares every non-full group of `task` with full fine-tuning using full fine-tuning's own
/// seed spread as the tolerance (|mean_m − mean_full| ≤ std_full).
pub fn compare_to_full(rows: &[SummaryRow], task: &str) -> FullComparison {
    let full = rows
        .iter()
        .filter(|r| r.task == task && r.method == FULL_FINETUNE)
        .find_map(|r| Some((r.primary_mean?, r.primary_std.unwrap_or(0.0))));
    let Some((full_mean, full_std)) = full else {
        return FullComparison::NoFullFinetune;
    };
    let mut within: Vec<(String, Vec<String>)> = Vec::new();
    for r in rows
        .iter()
        .filter(|r| r.task == task && r.method != FULL_FINETUNE)
    {
        let Some(m) = r.primary_mean else { continue };
        // A tiny slack so that a mean equal to full ± std up to rounding still counts.
        if (m - full_mean).abs() <= full_std + 1e-12 {
            match within.iter_mut().find(|(name, _)| *name == r.method) {
                Some((_, budgets)) => budgets.push(r.budget.clone()),
                None => within.push((r.method.clone(), vec![r.budget.clone()])),
            }
        }
    }
    FullComparison::Compared {
        full_mean,
        full_std,
        within,
    }
}

/// Tasks in name order.
pub fn tasks(records: &[RunRecord]) -> Vec<String> {
    let mut t: Vec<String> = records.iter().map(|r| r.task.clone()).collect();
    t.sort();
    t.dedup();
    t
}

/// Methods in name order.
pub fn methods(records: &[RunRecord]) -> Vec<String> {
    let mut m: Vec<String> = records.iter().map(|r| r.method.clone()).collect();
    m.sort();
    m.dedup();
    m
}
