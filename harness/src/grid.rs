//! Runs a suite's grid: skips runs already recorded, honours `--shard i/n`, reports progress.

use crate::suite::Suite;
use crate::task::TaskData;
use crate::train::{run, Base, RunSpec};
use crate::HarnessError;
use peftbench_reports::RunRecord;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which slice of the grid this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 0-based index.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// Parses `i/n` (1-based i, as Slurm array ids usually are: `1/4` … `4/4`; `0/4` is also
    /// accepted as the first).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}`: expected i/n"))?;
        let i: usize = a
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: bad index"))?;
        let n: usize = b
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: bad count"))?;
        if n == 0 || i > n {
            return Err(format!("shard `{s}`: index must be in 1..={n}"));
        }
        Ok(Self {
            index: if i == 0 { 0 } else { i - 1 },
            count: n,
        })
    }

    /// Whether run number `k` of the grid belongs to this shard.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

/// Where a suite's records and adapters go.
pub fn runs_dir(results: &Path, suite: &str) -> PathBuf {
    results.join(suite).join("runs")
}

/// What a grid run did.
#[derive(Debug, Default)]
pub struct GridSummary {
    /// Runs executed now.
    pub ran: usize,
    /// Runs found already recorded.
    pub skipped: usize,
    /// Runs belonging to other shards.
    pub other_shards: usize,
}

/// Runs every pending run of `suite` in this shard. `tasks` maps task names to loaded data;
/// each record is written atomically as soon as its run ends, so killing the process loses at
/// most the run in flight.
pub fn run_grid(
    suite: &Suite,
    base: &Base,
    tasks: &HashMap<String, TaskData>,
    results: &Path,
    shard: Shard,
) -> Result<GridSummary, HarnessError> {
    let dir = runs_dir(results, &suite.name);
    std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
        path: dir.clone(),
        source,
    })?;
    let all = suite.runs();
    let mut summary = GridSummary::default();
    let mut pending: Vec<RunSpec> = Vec::new();
    for (k, spec) in all.into_iter().enumerate() {
        if !shard.owns(k) {
            summary.other_shards += 1;
        } else if dir.join(format!("{}.json", spec.run_id())).exists() {
            summary.skipped += 1;
        } else {
            pending.push(spec);
        }
    }
    eprintln!(
        "suite {}: {} to run, {} already recorded, {} in other shards",
        suite.name,
        pending.len(),
        summary.skipped,
        summary.other_shards
    );
    let started = Instant::now();
    for (i, spec) in pending.iter().enumerate() {
        let task = tasks
            .get(&spec.task)
            .ok_or_else(|| HarnessError::Config(format!("task `{}` was not loaded", spec.task)))?;
        let eta = if i == 0 {
            "?".to_string()
        } else {
            let per = started.elapsed().as_secs_f64() / i as f64;
            format_duration(per * (pending.len() - i) as f64)
        };
        eprint!(
            "[{}/{}] {} (ETA {eta}) ... ",
            i + 1,
            pending.len(),
            spec.run_id()
        );
        let _ = std::io::stderr().flush();
        let rec: RunRecord = run(spec, base, task, &dir.join("adapters"));
        let path = dir.join(format!("{}.json", spec.run_id()));
        rec.write_atomic(&path).map_err(|source| HarnessError::Io {
            path: path.clone(),
            source,
        })?;
        let score = rec
            .metrics_best
            .get(&rec.primary_metric)
            .map_or("-".to_string(), |v| format!("{v:.4}"));
        eprintln!(
            "{} {}={score} in {:.1}s",
            rec.status.label(),
            rec.primary_metric,
            rec.train_seconds
        );
        summary.ran += 1;
    }
    Ok(summary)
}

/// `1h02m`, `3m05s`, `12s`.
pub fn format_duration(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
