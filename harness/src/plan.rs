//! A suite's grid before it runs: what each run's record says, and how long the pending runs
//! should train, so a job array can be sized before it is submitted.

use crate::claim::{holder, ClaimPolicy};
use crate::grid::{record_state, runs_dir, RecordState};
use crate::suite::Suite;
use crate::train::RunSpec;
use std::collections::HashMap;
use std::path::Path;

/// One run of the grid and where it stands.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// The run.
    pub spec: RunSpec,
    /// Its record's state.
    pub state: RecordState,
    /// Who holds a claim on it now, if anyone.
    pub claimed_by: Option<String>,
    /// Expected training seconds: this method's mean seconds per step over the suite's ok
    /// records, times this run's steps (evaluation comes on top).
    pub estimate_seconds: Option<f64>,
}

/// Every run of `suite` against the records under `results`.
pub fn plan(suite: &Suite, results: &Path) -> Vec<PlannedRun> {
    let dir = runs_dir(results, &suite.name);
    let per_step = seconds_per_step(&dir);
    suite
        .runs()
        .into_iter()
        .map(|spec| PlannedRun {
            state: record_state(&dir, &spec),
            claimed_by: holder(&dir, &spec.run_id(), ClaimPolicy::default()),
            estimate_seconds: per_step
                .get(&spec.method_label())
                .map(|s| s * spec.train.steps as f64),
            spec,
        })
        .collect()
}

/// Mean training seconds per step of each method (by record label) over ok records.
fn seconds_per_step(dir: &Path) -> HashMap<String, f64> {
    let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
    let records = peftbench_reports::load::load_records_skipping_bad(dir)
        .map(|(r, _)| r)
        .unwrap_or_default();
    for r in records
        .iter()
        .filter(|r| r.status == peftbench_reports::RunStatus::Ok && r.steps > 0)
    {
        let e = sums.entry(r.method.clone()).or_default();
        e.0 += r.train_seconds / r.steps as f64;
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(m, (s, n))| (m, s / n as f64))
        .collect()
}
