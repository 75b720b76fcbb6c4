//! `peftbench plan`: the grid as a table, with totals per state and per shard.

use anyhow::{bail, Result};
use peftbench_harness::grid::{format_duration, RecordState};
use peftbench_harness::plan::{plan, PlannedRun};
use peftbench_harness::{Shard, Suite};
use std::path::Path;

fn state_label(p: &PlannedRun) -> String {
    let base = match &p.state {
        RecordState::Current => "recorded".to_string(),
        RecordState::Missing => "pending".to_string(),
        RecordState::Failed(why) => format!("retry (error: {why})"),
        RecordState::Stale(why) => format!("stale ({why})"),
    };
    match &p.claimed_by {
        Some(who) => format!("{base}; claimed: {who}"),
        None => base,
    }
}

/// Prints every run of `suite`, then one line of totals (and one per shard with `shards`).
pub fn print_plan(suite: &Suite, results: &Path, shards: Option<usize>) -> Result<()> {
    let runs = plan(suite, results);
    let width = runs
        .iter()
        .map(|p| p.spec.run_id().len())
        .max()
        .unwrap_or(6);
    println!("{:<width$}  {:>10}  state", "run", "estimate");
    for p in &runs {
        let est = p.estimate_seconds.map_or("?".to_string(), format_duration);
        println!("{:<width$}  {est:>10}  {}", p.spec.run_id(), state_label(p));
    }
    let todo: Vec<&PlannedRun> = runs
        .iter()
        .filter(|p| p.state != RecordState::Current)
        .collect();
    let known: f64 = todo.iter().filter_map(|p| p.estimate_seconds).sum();
    let unknown = todo.iter().filter(|p| p.estimate_seconds.is_none()).count();
    let claimed = runs.iter().filter(|p| p.claimed_by.is_some()).count();
    println!(
        "grid: {} runs, {} recorded, {} to run ({} claimed now); estimated training {}{}",
        runs.len(),
        runs.len() - todo.len(),
        todo.len(),
        claimed,
        format_duration(known),
        match unknown {
            0 => String::new(),
            n => format!(" plus {n} runs with no recorded run of their method to go by"),
        }
    );
    if let Some(n) = shards {
        if n == 0 {
            bail!("--shards must be at least 1");
        }
        for i in 0..n {
            let shard = Shard { index: i, count: n };
            let mine: Vec<&PlannedRun> = runs
                .iter()
                .enumerate()
                .filter(|(k, p)| shard.owns(*k) && p.state != RecordState::Current)
                .map(|(_, p)| p)
                .collect();
            let secs: f64 = mine.iter().filter_map(|p| p.estimate_seconds).sum();
            println!(
                "shard {shard} (array index {i}): {} to run, estimated {}",
                mine.len(),
                format_duration(secs)
            );
        }
    }
    Ok(())
}
