//! CSV tables: one row per run, one per summary group, one per curve point.

use crate::chance::recorded_chance;
use crate::summary::{SummaryRow, BYTES_PER_MB};
use crate::{ReportError, RunRecord};
use std::collections::BTreeSet;
use std::path::Path;

/// Columns of `runs.csv`.
pub const RUNS_HEADER: [&str; 39] = [
    "run_id",
    "suite",
    "task",
    "method",
    "budget",
    "seed",
    "status",
    "knob_name",
    "knob_value",
    "trainable_params",
    "trainable_percent",
    "budget_deviation",
    "head_params",
    "adapter_bytes",
    "primary_metric",
    "primary_initial",
    "primary_best",
    "primary_final",
    "chance",
    "chance_std_error",
    "train_seconds",
    "steps_per_second",
    "tokens_per_second",
    "peak_memory_mb",
    "latency_unmerged_ms",
    "latency_merged_ms",
    "base_params",
    "lr",
    "head_lr",
    "selection",
    "selected_step",
    "primary_reported",
    "memory_source",
    "memory_base_weights_mb",
    "memory_trainable_mb",
    "memory_optimizer_mb",
    "memory_other_mb",
    "eval_seconds",
    "wall_seconds",
];

/// Columns of `summary.csv`.
pub const SUMMARY_HEADER: [&str; 17] = [
    "task",
    "method",
    "budget",
    "budget_target",
    "primary_metric",
    "n_seeds",
    "primary_mean",
    "primary_std",
    "trainable_params_mean",
    "trainable_percent_mean",
    "train_seconds_mean",
    "peak_memory_mb_mean",
    "latency_unmerged_ms_mean",
    "latency_merged_ms_mean",
    "lr",
    "primary_ci_lo",
    "primary_ci_hi",
];

/// Fixed leading columns of `curves.csv`; one column per metric name follows.
pub const CURVES_HEADER: [&str; 7] = [
    "run_id",
    "task",
    "method",
    "budget",
    "seed",
    "step",
    "train_loss",
];

fn mb(bytes: u64) -> f64 {
    bytes as f64 / BYTES_PER_MB
}

/// Empty cell for a missing value, so spreadsheets see a blank rather than a sentinel.
fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

struct Table<'a> {
    path: &'a Path,
    writer: csv::Writer<std::fs::File>,
}

impl<'a> Table<'a> {
    fn create(path: &'a Path) -> Result<Self, ReportError> {
        let file = std::fs::File::create(path).map_err(|source| ReportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path,
            writer: csv::Writer::from_writer(file),
        })
    }

    fn row<I: IntoIterator<Item = S>, S: AsRef<[u8]>>(
        &mut self,
        cells: I,
    ) -> Result<(), ReportError> {
        self.writer
            .write_record(cells)
            .map_err(|e| ReportError::Csv {
                path: self.path.to_path_buf(),
                message: e.to_string(),
            })
    }

    fn finish(mut self) -> Result<(), ReportError> {
        self.writer.flush().map_err(|source| ReportError::Io {
            path: self.path.to_path_buf(),
            source,
        })
    }
}

/// Writes `runs.csv` (one row per run, every status); returns the number of data rows.
pub fn write_runs_csv(records: &[RunRecord], path: &Path) -> Result<usize, ReportError> {
    let mut t = Table::create(path)?;
    t.row(RUNS_HEADER)?;
    for r in records {
        let chance = recorded_chance(r);
        t.row([
            r.run_id.clone(),
            r.suite.clone(),
            r.task.clone(),
            r.method.clone(),
            r.budget.clone(),
            r.seed.to_string(),
            r.status.label().to_string(),
            opt(r.knob.as_ref().map(|k| k.0.clone())),
            opt(r.knob.as_ref().map(|k| k.1)),
            r.trainable_params.to_string(),
            r.trainable_percent.to_string(),
            opt(r.budget_deviation),
            r.head_params.to_string(),
            r.adapter_bytes.to_string(),
            r.primary_metric.clone(),
            // Raw values (NaN included) here: this table is the unfiltered record of each run.
            opt(r
                .extra
                .get("initial_metrics")
                .and_then(|m| m.get(&r.primary_metric))
                .and_then(|v| v.as_f64())),
            opt(r.metrics_best.get(&r.primary_metric)),
            opt(r.metrics_final.get(&r.primary_metric)),
            opt(chance.as_ref().map(|c| c.value)),
            opt(chance.as_ref().and_then(|c| c.std_error)),
            r.train_seconds.to_string(),
            r.steps_per_second.to_string(),
            r.tokens_per_second.to_string(),
            (r.peak_memory_bytes as f64 / BYTES_PER_MB).to_string(),
            opt(r.latency_ms.get("unmerged")),
            opt(r.latency_ms.get("merged")),
            r.base_params.to_string(),
            opt(r.lr()),
            opt(r.head_lr()),
            opt(r.selected.as_ref().map(|s| s.rule.name())),
            opt(r.selected.as_ref().map(|s| s.step)),
            opt(r.primary_reported()),
            opt(r.memory.as_ref().map(|m| m.source.clone())),
            opt(r.memory.as_ref().map(|m| mb(m.base_weights_bytes))),
            opt(r.memory.as_ref().map(|m| mb(m.trainable_bytes))),
            opt(r.memory.as_ref().map(|m| mb(m.optimizer_bytes))),
            opt(r.memory.as_ref().map(|m| mb(m.other_bytes))),
            opt(r.phase_seconds.get("evaluation")),
            opt(r.phase_seconds.get("wall")),
        ])?;
    }
    t.finish()?;
    Ok(records.len())
}

/// Writes `summary.csv` (one row per task × method × budget group of ok runs); returns the row count.
pub fn write_summary_csv(rows: &[SummaryRow], path: &Path) -> Result<usize, ReportError> {
    let mut t = Table::create(path)?;
    t.row(SUMMARY_HEADER)?;
    for s in rows {
        t.row([
            s.task.clone(),
            s.method.clone(),
            s.budget.clone(),
            opt(s.budget_target),
            s.primary_metric.clone(),
            s.n_seeds.to_string(),
            opt(s.primary_mean),
            opt(s.primary_std),
            s.trainable_params.to_string(),
            s.trainable_percent.to_string(),
            s.train_seconds.to_string(),
            s.peak_memory_mb.to_string(),
            opt(s.latency_unmerged_ms),
            opt(s.latency_merged_ms),
            s.lr.clone(),
            opt(s.primary_ci.map(|c| c.lo)),
            opt(s.primary_ci.map(|c| c.hi)),
        ])?;
    }
    t.finish()?;
    Ok(rows.len())
}

/// Writes `curves.csv` (one row per curve point of every run, with one column per metric name
/// seen in any curve, blank where a point lacks it); returns the number of data rows.
pub fn write_curves_csv(records: &[RunRecord], path: &Path) -> Result<usize, ReportError> {
    let names: BTreeSet<&str> = records
        .iter()
        .flat_map(|r| {
            r.curve
                .iter()
                .flat_map(|p| p.metrics.keys().map(String::as_str))
        })
        .collect();
    let mut t = Table::create(path)?;
    t.row(CURVES_HEADER.iter().copied().chain(names.iter().copied()))?;
    let mut n = 0;
    for r in records {
        for p in &r.curve {
            let fixed = [
                r.run_id.clone(),
                r.task.clone(),
                r.method.clone(),
                r.budget.clone(),
                r.seed.to_string(),
                p.step.to_string(),
                p.train_loss.to_string(),
            ];
            let metrics = names.iter().map(|m| opt(p.metrics.get(*m)));
            t.row(fixed.into_iter().chain(metrics))?;
            n += 1;
        }
    }
    t.finish()?;
    Ok(n)
}
