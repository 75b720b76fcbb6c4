//! Grids shared by several processes, as job-array tasks on one results directory: every run
//! is trained exactly once, a killed claimer's run is taken over after the claim timeout,
//! `--shard auto` reads the scheduler's index, and `plan` shows the grid.

use candle_core::Device;
use peftbench_backbone::{save_model_dir, Transformer};
use peftbench_harness::synthetic;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A synthetic suite of `seeds × 3 methods × 1 task` runs.
fn suite(name: &str, seeds: &str, steps: usize) -> String {
    format!(
        r#"
name = "{name}"
model = "synthetic"
seeds = {seeds}
budgets = ["3%"]
max_budget_deviation = 0.5

[train]
steps = {steps}
batch_size = 8
eval_every = 0
eval_batch_size = 32

[methods.lora]
lr = 5e-3

[methods.prompt_tuning]
lr = 3e-2

[methods.head_only]
lr = 5e-3

[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"
train_limit = 32
dev_limit = 16
"#
    )
}

/// A results folder, a suite file, and a cache holding a random synthetic base (so no
/// process pretrains one).
struct Setup {
    _tmp: tempfile::TempDir,
    cache: PathBuf,
    results: PathBuf,
    suite: PathBuf,
}

fn setup(name: &str, seeds: &str, steps: usize) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let base = cache.join("synthetic-base-v1");
    let model = Transformer::random(synthetic::base_config(), 3, &Device::Cpu).unwrap();
    save_model_dir(&model, &base).unwrap();
    std::fs::write(base.join("tokenizer.json"), synthetic::tokenizer_json()).unwrap();
    let path = tmp.path().join(format!("{name}.toml"));
    std::fs::write(&path, suite(name, seeds, steps)).unwrap();
    Setup {
        results: tmp.path().join("results"),
        cache,
        suite: path,
        _tmp: tmp,
    }
}

fn peftbench(s: &Setup, args: &[&str], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peftbench"));
    c.args(args)
        .env("PEFTBENCH_CACHE", &s.cache)
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_BACKTRACE", "0")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("JOB_COMPLETION_INDEX")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run_args(s: &Setup) -> Vec<String> {
    vec![
        "run".into(),
        "--config".into(),
        s.suite.display().to_string(),
        "--results".into(),
        s.results.display().to_string(),
    ]
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// How often each run id was started, from the `[i/n] <run id> (ETA …)` progress lines.
fn started_runs(logs: &[String]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in logs.iter().flat_map(|l| l.lines()) {
        if let Some(rest) = line.strip_prefix('[') {
            if let Some((_, after)) = rest.split_once("] ") {
                if let Some((id, _)) = after.split_once(" (ETA") {
                    *seen.entry(id.to_string()).or_insert(0) += 1;
                }
            }
        }
    }
    seen
}

fn records(runs: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(runs)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension().is_some_and(|x| x == "json"))
                .then(|| p.file_stem().unwrap().to_string_lossy().to_string())
        })
        .collect();
    ids.sort();
    ids
}

fn leftover_claims(runs: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(runs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "claim"))
        .collect()
}

#[test]
fn concurrent_processes_on_one_results_dir_run_every_run_exactly_once() {
    // Runs long enough (a fraction of a second) that the processes overlap.
    let s = setup("shared", "[0, 1, 2]", 150);
    let args = run_args(&s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Four processes over the whole grid (a re-launched job beside the original), none sharded.
    let children: Vec<Child> = (0..4)
        .map(|_| peftbench(&s, &args, &[]).spawn().unwrap())
        .collect();
    let logs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let (ok, log) = finish(c);
            assert!(ok, "{log}");
            log
        })
        .collect();
    let runs = s.results.join("shared/runs");
    let recorded = records(&runs);
    assert_eq!(recorded.len(), 9, "{recorded:?}");
    let started = started_runs(&logs);
    assert_eq!(
        started.keys().cloned().collect::<Vec<_>>(),
        recorded,
        "{logs:#?}"
    );
    assert!(
        started.values().all(|&n| n == 1),
        "a run trained twice: {started:?}\n{logs:#?}"
    );
    let busy = logs
        .iter()
        .filter(|l| !started_runs(&[l.to_string()]).is_empty())
        .count();
    assert!(
        busy >= 2,
        "the grid was shared, not run by one process: {logs:#?}"
    );
    assert!(leftover_claims(&runs).is_empty());
    // A process that saw the grid complete wrote the report.
    let reported = logs.iter().filter(|l| l.contains("report: ")).count();
    assert!(reported >= 1, "{logs:#?}");
    assert!(s.results.join("shared/report/REPORT.md").exists());
}

#[test]
fn a_killed_claimers_run_is_taken_over_after_the_timeout() {
    // Long enough runs that the first process is killed mid-run.
    let s = setup("killed", "[0]", 600);
    let args = run_args(&s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut victim = peftbench(&s, &args, &[]).spawn().unwrap();
    let runs = s.results.join("killed/runs");
    let t0 = Instant::now();
    let claim = loop {
        if let Some(c) = runs
            .exists()
            .then(|| leftover_claims(&runs))
            .and_then(|c| c.into_iter().next())
        {
            break c;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "no claim appeared");
        std::thread::sleep(Duration::from_millis(20));
    };
    victim.kill().unwrap(); // SIGKILL: no cleanup runs, the claim stays behind.
    victim.wait().unwrap();
    assert!(claim.exists());
    let id = claim.file_stem().unwrap().to_string_lossy().to_string();

    // A live-looking claim is respected: with the default timeout the run is left alone.
    let (ok, log) = finish(
        peftbench(&s, &[args.as_slice(), &["--no-report"]].concat(), &[])
            .env("PEFTBENCH_CLAIM_TIMEOUT", "600")
            .spawn()
            .unwrap(),
    );
    assert!(ok, "{log}");
    assert!(log.contains(&format!("{id}: claimed by")), "{log}");
    assert!(!runs.join(format!("{id}.json")).exists());

    // Once the heartbeat is older than the timeout, the next process takes it over.
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, log) = finish(
        peftbench(
            &s,
            &[args.as_slice(), &["--claim-timeout", "1"]].concat(),
            &[],
        )
        .spawn()
        .unwrap(),
    );
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("{id}: took over a stale claim from")),
        "{log}"
    );
    assert!(log.contains("no heartbeat for"), "{log}");
    assert_eq!(records(&runs).len(), 3);
    assert!(leftover_claims(&runs).is_empty());
}

#[test]
fn shard_auto_reads_a_zero_based_slurm_array_and_covers_the_grid_once() {
    let s = setup("array", "[0, 1]", 2);
    let args = run_args(&s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let children: Vec<Child> = (0..3)
        .map(|i| {
            let env = [
                ("SLURM_ARRAY_TASK_ID", i.to_string()),
                ("SLURM_ARRAY_TASK_MIN", "0".into()),
                ("SLURM_ARRAY_TASK_COUNT", "3".into()),
            ];
            peftbench(&s, &[args.as_slice(), &["--shard", "auto"]].concat(), &env)
                .spawn()
                .unwrap()
        })
        .collect();
    let logs: Vec<String> = children
        .into_iter()
        .map(|c| {
            let (ok, log) = finish(c);
            assert!(ok, "{log}");
            log
        })
        .collect();
    for (i, log) in logs.iter().enumerate() {
        assert!(log.contains(&format!("(shard {}/3)", i + 1)), "{log}");
    }
    let started = started_runs(&logs);
    assert_eq!(started.len(), 6, "{logs:#?}");
    assert!(started.values().all(|&n| n == 1), "{started:?}");
    assert_eq!(records(&s.results.join("array/runs")).len(), 6);

    // Kubernetes: JOB_COMPLETION_INDEX needs the count beside it.
    let (ok, log) = finish(
        peftbench(
            &s,
            &[args.as_slice(), &["--shard", "auto"]].concat(),
            &[("JOB_COMPLETION_INDEX", "1".into())],
        )
        .spawn()
        .unwrap(),
    );
    assert!(!ok);
    assert!(log.contains("PEFTBENCH_SHARD_COUNT"), "{log}");
    // 0/n is refused, naming the convention.
    let (ok, log) = finish(
        peftbench(&s, &[args.as_slice(), &["--shard", "0/3"]].concat(), &[])
            .spawn()
            .unwrap(),
    );
    assert!(!ok);
    assert!(
        log.contains("1-based") && log.contains("--shard auto"),
        "{log}"
    );
}

#[test]
fn plan_lists_the_grid_with_states_and_estimates() {
    let s = setup("planned", "[0, 1]", 2);
    let plan_args = [
        "plan",
        "--config",
        s.suite.to_str().unwrap(),
        "--results",
        s.results.to_str().unwrap(),
        "--shards",
        "2",
    ];
    let (ok, before) = finish(peftbench(&s, &plan_args, &[]).spawn().unwrap());
    assert!(ok, "{before}");
    assert!(
        before.contains("grid: 6 runs, 0 recorded, 6 to run"),
        "{before}"
    );
    assert!(
        before.contains("shard 2/2 (array index 1): 3 to run"),
        "{before}"
    );
    // Record shard 1 of 2, then plan again: three recorded, estimates from their times.
    let args = run_args(&s);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, log) = finish(
        peftbench(&s, &[args.as_slice(), &["--shard", "1/2"]].concat(), &[])
            .spawn()
            .unwrap(),
    );
    assert!(ok, "{log}");
    assert!(log.contains("partial: 3 of 6 runs recorded"), "{log}");
    assert!(!s.results.join("planned/report/REPORT.md").exists());
    let (ok, after) = finish(peftbench(&s, &plan_args, &[]).spawn().unwrap());
    assert!(ok, "{after}");
    assert!(
        after.contains("grid: 6 runs, 3 recorded, 3 to run"),
        "{after}"
    );
    assert!(
        after.contains("shard 1/2 (array index 0): 0 to run"),
        "{after}"
    );
    let pending: Vec<&str> = after.lines().filter(|l| l.ends_with("pending")).collect();
    assert_eq!(pending.len(), 3, "{after}");
    // Every method ran in shard 1 (seed 0), so every pending run has an estimate.
    assert!(pending.iter().all(|l| !l.contains(" ? ")), "{after}");
}
