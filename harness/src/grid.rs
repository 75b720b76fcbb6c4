//! Runs a suite's grid: skips runs already recorded with the same configuration, honours
//! `--shard i/n | auto`, claims each run so processes sharing a results directory never run
//! one twice, and reports progress.

use crate::claim::{try_claim, ClaimOutcome, ClaimPolicy};
use crate::suite::Suite;
use crate::task::TaskData;
use crate::train::{run, Base, RunSpec};
use crate::HarnessError;
use peftbench_reports::{RunRecord, RunStatus};
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
    /// The whole grid.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n` with a 1-based `i` (`1/4` … `4/4`). `0/n` is refused rather than read as
    /// the first shard: a 0-based array (`--array=0-3`) would then run one slice twice and
    /// never the last; such arrays use `--shard auto`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('/')
            .ok_or_else(|| format!("shard `{s}`: expected i/n (1-based, e.g. 1/4) or `auto`"))?;
        let i: usize = a
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: bad index"))?;
        let n: usize = b
            .trim()
            .parse()
            .map_err(|_| format!("shard `{s}`: bad count"))?;
        if n == 0 {
            return Err(format!("shard `{s}`: the count must be at least 1"));
        }
        if i == 0 {
            return Err(format!(
                "shard `{s}`: shard indices are 1-based (1/{n} … {n}/{n}); for a 0-based job array use `--shard auto`"
            ));
        }
        if i > n {
            return Err(format!("shard `{s}`: index must be in 1..={n}"));
        }
        Ok(Self {
            index: i - 1,
            count: n,
        })
    }

    /// The shard a job-array task is, from its scheduler's environment: Slurm's
    /// `SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_MIN` and `SLURM_ARRAY_TASK_COUNT` (or
    /// `SLURM_ARRAY_TASK_MAX`), or a Kubernetes Indexed Job's 0-based `JOB_COMPLETION_INDEX`
    /// with the count in `PEFTBENCH_SHARD_COUNT` (Kubernetes exports no count of its own).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let num = |name: &str| -> Result<Option<usize>, String> {
            match var(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("--shard auto: {name}=`{v}` is not a whole number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.ok_or(
                "--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_MIN is not",
            )?;
            let count = match (num("SLURM_ARRAY_TASK_COUNT")?, num("SLURM_ARRAY_TASK_MAX")?) {
                (Some(c), _) => c,
                (None, Some(max)) if max >= min => max - min + 1,
                _ => {
                    return Err("--shard auto: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX".into())
                }
            };
            // A stepped array (`--array=0-6:2`) numbers its tasks with gaps: the index is then
            // not id − min, and guessing would run slices twice.
            if let Some(step) = num("SLURM_ARRAY_TASK_STEP")?.filter(|&s| s > 1) {
                return Err(format!(
                    "--shard auto: stepped arrays (step {step}) are not supported; use --array=0-{}",
                    count.saturating_sub(1)
                ));
            }
            return Self::checked(id.checked_sub(min), count, "SLURM_ARRAY_TASK_ID");
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("PEFTBENCH_SHARD_COUNT")?.ok_or(
                "--shard auto: JOB_COMPLETION_INDEX is set but PEFTBENCH_SHARD_COUNT (the Job's completions) is not",
            )?;
            return Self::checked(Some(index), count, "JOB_COMPLETION_INDEX");
        }
        Err("--shard auto: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set".into())
    }

    fn checked(index: Option<usize>, count: usize, from: &str) -> Result<Self, String> {
        match index {
            Some(index) if index < count => Ok(Self { index, count }),
            _ => Err(format!(
                "--shard auto: {from} gives shard {} of {count}, outside 0..{count}",
                index.map_or("below the minimum".to_string(), |i| i.to_string())
            )),
        }
    }

    /// `i/n` (1-based) or `auto`, reading the process environment for `auto`.
    pub fn from_arg(s: &str) -> Result<Self, String> {
        if s.trim() == "auto" {
            Self::from_env(|k| std::env::var(k).ok())
        } else {
            Self::parse(s)
        }
    }

    /// Whether run number `k` of the grid belongs to this shard.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
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
    /// Runs found already recorded with the same configuration.
    pub skipped: usize,
    /// Runs belonging to other shards.
    pub other_shards: usize,
    /// Runs another live process held a claim on.
    pub held_elsewhere: usize,
    /// Records set aside (to `runs/superseded/`) and run again: written with another
    /// configuration, unreadable, or an error.
    pub superseded: usize,
    /// Runs of the whole grid (every shard).
    pub grid_runs: usize,
    /// Of those, runs with a record of their current configuration (errors included) once
    /// this process finished.
    pub recorded: usize,
}

impl GridSummary {
    /// Whether every run of the grid has a record of its current configuration.
    pub fn complete(&self) -> bool {
        self.recorded == self.grid_runs
    }
}

/// What the results directory holds for one run.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordState {
    /// A record made with this configuration (errors excepted: they are retried).
    Current,
    /// No record.
    Missing,
    /// An error record made with this configuration: retried, since its cause (a missing
    /// file, memory) may be fixed by now.
    Failed(String),
    /// A record that must be redone, and why.
    Stale(String),
}

/// The record file of a run.
pub fn record_path(runs_dir: &Path, spec: &RunSpec) -> PathBuf {
    runs_dir.join(format!("{}.json", spec.run_id()))
}

/// Whether `spec`'s record in `runs_dir` is current, missing or stale.
pub fn record_state(runs_dir: &Path, spec: &RunSpec) -> RecordState {
    let path = record_path(runs_dir, spec);
    if !path.exists() {
        return RecordState::Missing;
    }
    let rec = match peftbench_reports::load::read_record(&path) {
        Ok(r) => r,
        Err(e) => return RecordState::Stale(format!("unreadable record ({e})")),
    };
    match rec.config_hash.as_deref() {
        None => RecordState::Stale("recorded before run configurations were hashed".into()),
        Some(h) if h != spec.config_hash() => RecordState::Stale(format!(
            "recorded with another configuration (hash {h}, the suite now gives {})",
            spec.config_hash()
        )),
        // An error may be fixed since (a missing file, memory): retry it. Divergence and an
        // unreachable budget follow from the configuration, which has not changed.
        Some(_) => match &rec.status {
            RunStatus::Error { message } => RecordState::Failed(message.clone()),
            _ => RecordState::Current,
        },
    }
}

/// Moves a stale record (and its adapter) to `runs/superseded/`, so no result is lost and no
/// report reads it.
fn supersede(runs_dir: &Path, spec: &RunSpec) -> Result<(), HarnessError> {
    let dir = runs_dir.join("superseded");
    std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
        path: dir.clone(),
        source,
    })?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let from = record_path(runs_dir, spec);
    let to = dir.join(format!("{}.{stamp}.json", spec.run_id()));
    match std::fs::rename(&from, &to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(HarnessError::Io { path: from, source }),
    }
}

/// Runs every pending run of `suite` in this shard. `tasks` maps task names to loaded data;
/// each record is written atomically as soon as its run ends, so killing the process loses at
/// most the run in flight, whose claim goes stale and is taken over by the next process.
pub fn run_grid(
    suite: &Suite,
    base: &Base,
    tasks: &HashMap<String, TaskData>,
    results: &Path,
    shard: Shard,
) -> Result<GridSummary, HarnessError> {
    run_grid_with(suite, base, tasks, results, shard, ClaimPolicy::default())
}

/// [`run_grid`] with a claim timeout of the caller's choosing.
pub fn run_grid_with(
    suite: &Suite,
    base: &Base,
    tasks: &HashMap<String, TaskData>,
    results: &Path,
    shard: Shard,
    policy: ClaimPolicy,
) -> Result<GridSummary, HarnessError> {
    let dir = runs_dir(results, &suite.name);
    std::fs::create_dir_all(&dir).map_err(|source| HarnessError::Io {
        path: dir.clone(),
        source,
    })?;
    let all = suite.runs();
    let mut summary = GridSummary {
        grid_runs: all.len(),
        ..Default::default()
    };
    let mut pending: Vec<&RunSpec> = Vec::new();
    for (k, spec) in all.iter().enumerate() {
        if !shard.owns(k) {
            summary.other_shards += 1;
            continue;
        }
        match record_state(&dir, spec) {
            RecordState::Current => summary.skipped += 1,
            RecordState::Missing => pending.push(spec),
            RecordState::Failed(why) => {
                eprintln!("{}: retrying an error record ({why})", spec.run_id());
                pending.push(spec);
            }
            RecordState::Stale(why) => {
                eprintln!("{}: {why}; it will run again", spec.run_id());
                pending.push(spec);
            }
        }
    }
    eprintln!(
        "suite {} (shard {shard}): {} to run, {} already recorded, {} in other shards",
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
        let io = |source| HarnessError::Io {
            path: dir.clone(),
            source,
        };
        let claim = match try_claim(&dir, &spec.run_id(), policy).map_err(io)? {
            ClaimOutcome::Claimed(c) => c,
            ClaimOutcome::TookOver(c, previous) => {
                eprintln!("{}: took over a stale claim from {previous}", spec.run_id());
                c
            }
            ClaimOutcome::Held(holder) => {
                eprintln!("{}: claimed by {holder}; left to it", spec.run_id());
                summary.held_elsewhere += 1;
                continue;
            }
        };
        // Another process may have finished it between the scan and the claim.
        match record_state(&dir, spec) {
            RecordState::Current => {
                summary.skipped += 1;
                continue;
            }
            RecordState::Missing => {}
            RecordState::Stale(_) | RecordState::Failed(_) => {
                supersede(&dir, spec)?;
                summary.superseded += 1;
            }
        }
        let done = summary.ran;
        let eta = if done == 0 {
            "?".to_string()
        } else {
            let per = started.elapsed().as_secs_f64() / done as f64;
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
        let path = record_path(&dir, spec);
        rec.write_atomic(&path).map_err(|source| HarnessError::Io {
            path: path.clone(),
            source,
        })?;
        drop(claim);
        let score = rec
            .primary_reported()
            .map_or("-".to_string(), |v| format!("{v:.4}"));
        eprintln!(
            "{} {}={score} in {:.1}s",
            rec.status.label(),
            rec.primary_metric,
            rec.train_seconds
        );
        summary.ran += 1;
    }
    summary.recorded = all
        .iter()
        .filter(|s| {
            matches!(
                record_state(&dir, s),
                RecordState::Current | RecordState::Failed(_)
            )
        })
        .count();
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
