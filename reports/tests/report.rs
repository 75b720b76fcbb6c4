//! End-to-end tests of the report: synthetic records in a temporary results directory, then
//! checks on every file `write_report` writes.

use peftbench_reports::plots::{
    ADALORA_RANKS_SIZE, CURVES_SIZE, SCORE_VS_BUDGET_SIZE, SCORE_VS_PARAMS_SIZE, TIME_MEMORY_SIZE,
};
use peftbench_reports::summary::{budget_order, mean, sample_std};
use peftbench_reports::{write_report, CurvePoint, Environment, ReportError, RunRecord, RunStatus};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const BASE: usize = 1_000_000;

struct Spec<'a> {
    task: &'a str,
    method: &'a str,
    budget: &'a str,
    seed: u64,
    score: f64,
    status: RunStatus,
}

fn metric_of(task: &str) -> &'static str {
    if task == "cola" {
        "matthews"
    } else {
        "accuracy"
    }
}

fn target_of(budget: &str) -> Option<usize> {
    match budget {
        "0.1%" => Some(BASE / 1000),
        "1%" => Some(BASE / 100),
        _ => None,
    }
}

fn record(s: Spec) -> RunRecord {
    let metric = metric_of(s.task);
    let target = target_of(s.budget);
    let trainable = target.map_or(BASE, |t| t + 7 * (s.method.len() % 3));
    let ok = s.status == RunStatus::Ok;
    let curve = match &s.status {
        RunStatus::Ok => (0..3)
            .map(|i| CurvePoint {
                step: i * 10,
                train_loss: 1.0 / (1.0 + i as f64) + s.seed as f64 * 0.01,
                metrics: if i == 0 {
                    BTreeMap::new()
                } else {
                    BTreeMap::from([(metric.to_string(), s.score - 0.01 * (2 - i) as f64)])
                },
            })
            .collect(),
        RunStatus::Diverged { .. } => vec![
            CurvePoint {
                step: 0,
                train_loss: 1.0,
                metrics: BTreeMap::new(),
            },
            CurvePoint {
                step: 10,
                train_loss: f64::NAN,
                metrics: BTreeMap::new(),
            },
        ],
        _ => Vec::new(),
    };
    let mut latency = BTreeMap::from([("unmerged".to_string(), 10.0 + s.seed as f64)]);
    if s.method.contains("lora") {
        latency.insert("merged".to_string(), 8.0);
    }
    let extra = if s.method == "adalora" {
        serde_json::json!({
            "final_ranks": {
                "layer0.query": 4, "layer0.value": 2,
                "layer1.query": 1, "layer1.value": 5,
                "layer10.query": 3, "layer10.value": 0,
            },
            "target_budget": 15
        })
    } else {
        serde_json::Value::Null
    };
    RunRecord {
        run_id: format!("{}__{}__{}__{}", s.task, s.method, s.budget, s.seed),
        suite: "synthetic".into(),
        task: s.task.into(),
        method: s.method.into(),
        budget: s.budget.into(),
        budget_target: target,
        seed: s.seed,
        config: serde_json::json!({}),
        config_hash: None,
        adapter_path: None,
        knob: target.map(|_| ("r".to_string(), 4)),
        trainable_params: trainable,
        head_params: 1538,
        base_params: BASE,
        trainable_percent: 100.0 * trainable as f64 / BASE as f64,
        budget_deviation: target.map(|t| (trainable as f64 - t as f64) / t as f64),
        adapter_bytes: 4 * trainable as u64,
        primary_metric: metric.into(),
        metrics_best: if ok {
            BTreeMap::from([(metric.to_string(), s.score)])
        } else {
            BTreeMap::new()
        },
        metrics_final: if ok {
            BTreeMap::from([(metric.to_string(), s.score - 0.005)])
        } else {
            BTreeMap::new()
        },
        train_seconds: if ok {
            100.0 + s.seed as f64 * 10.0
        } else {
            0.0
        },
        phase_seconds: BTreeMap::new(),
        steps: 20,
        steps_per_second: 0.2,
        tokens_per_second: 500.0,
        peak_memory_bytes: 2_000_000_000 + s.seed * 1_000_000,
        latency_ms: if ok { latency } else { BTreeMap::new() },
        curve,
        status: s.status,
        extra,
        env: Environment {
            git_revision: Some("abc1234".into()),
            cpu: "Test CPU 9000".into(),
            threads: 2,
            candle_version: "0.11.1".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            kernels: "fused".into(),
            os: "linux".into(),
            finished_at: 1_700_000_000,
        },
        update_analysis: None,
        selected: None,
        dev_outcomes: None,
        memory: None,
    }
}

fn ok(task: &str, method: &str, budget: &str, seed: u64, score: f64) -> RunRecord {
    record(Spec {
        task,
        method,
        budget,
        seed,
        score,
        status: RunStatus::Ok,
    })
}

fn failed(task: &str, method: &str, budget: &str, seed: u64, status: RunStatus) -> RunRecord {
    record(Spec {
        task,
        method,
        budget,
        seed,
        score: 0.0,
        status,
    })
}

/// 19 runs: sst2 has full fine-tuning (0.90, 0.92), lora and adalora within one std at 1 %,
/// adapter with one diverged and one unreachable run; cola has no ok full fine-tuning.
fn synthetic() -> Vec<RunRecord> {
    vec![
        ok("sst2", "full_finetune", "full", 0, 0.90),
        ok("sst2", "full_finetune", "full", 1, 0.92),
        ok("sst2", "lora", "0.1%", 0, 0.85),
        ok("sst2", "lora", "0.1%", 1, 0.87),
        ok("sst2", "lora", "1%", 0, 0.905),
        ok("sst2", "lora", "1%", 1, 0.915),
        ok("sst2", "adalora", "0.1%", 0, 0.80),
        ok("sst2", "adalora", "0.1%", 1, 0.82),
        ok("sst2", "adalora", "1%", 0, 0.90),
        ok("sst2", "adalora", "1%", 1, 0.91),
        ok("sst2", "adapter", "1%", 0, 0.70),
        failed(
            "sst2",
            "adapter",
            "1%",
            1,
            RunStatus::Diverged {
                step: 10,
                message: "loss is NaN".into(),
            },
        ),
        failed(
            "sst2",
            "adapter",
            "0.1%",
            0,
            RunStatus::BudgetUnreachable {
                message: "smallest bottleneck exceeds budget".into(),
            },
        ),
        ok("sst2", "adapter", "0.1%", 1, 0.60),
        ok("cola", "lora", "0.1%", 0, 0.30),
        ok("cola", "lora", "1%", 0, 0.40),
        ok("cola", "adalora", "0.1%", 0, 0.35),
        ok("cola", "adalora", "1%", 0, 0.45),
        failed(
            "cola",
            "full_finetune",
            "full",
            0,
            RunStatus::Error {
                message: "out of memory".into(),
            },
        ),
    ]
}

fn write_records(dir: &Path, records: &[RunRecord]) {
    for r in records {
        r.write_atomic(&dir.join(format!("{}.json", r.run_id)))
            .unwrap();
    }
}

/// Writes `records` into `dir` and reports them into `dir/report`; returns REPORT.md.
fn report_of(dir: &Path, records: &[RunRecord]) -> String {
    write_records(dir, records);
    let out = dir.join("report");
    write_report(dir, &out).unwrap();
    std::fs::read_to_string(out.join("REPORT.md")).unwrap()
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let rows = reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            header
                .iter()
                .cloned()
                .zip(r.iter().map(str::to_string))
                .collect()
        })
        .collect();
    (header, rows)
}

fn find<'a>(
    rows: &'a [HashMap<String, String>],
    task: &str,
    method: &str,
    budget: &str,
) -> &'a HashMap<String, String> {
    rows.iter()
        .find(|r| r["task"] == task && r["method"] == method && r["budget"] == budget)
        .unwrap_or_else(|| panic!("no summary row {task} {method} {budget}"))
}

fn num(row: &HashMap<String, String>, col: &str) -> f64 {
    row[col]
        .parse()
        .unwrap_or_else(|e| panic!("{col} = {:?}: {e}", row[col]))
}

/// Width and height from a PNG's signature and IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert!(bytes.len() > 24, "{} too short", path.display());
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

#[test]
fn full_report_from_synthetic_records() {
    let results = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("report");
    write_records(results.path(), &synthetic());
    // A half-written record from a killed run must be ignored.
    std::fs::write(results.path().join("sst2__lora__1%__9.json.tmp"), "{ half").unwrap();

    let summary = write_report(results.path(), &out_dir).unwrap();
    assert_eq!(summary.records, 19);
    assert_eq!(summary.ok_runs, 16);
    assert_eq!(summary.summary_rows, 11);
    assert_eq!(summary.curve_rows, 16 * 3 + 2);

    // runs.csv: one row per run, sorted by run id, statuses as labelled.
    let (header, runs) = read_csv(&summary.runs_csv);
    assert_eq!(header[0], "run_id");
    assert_eq!(runs.len(), 19);
    let ids: Vec<&str> = runs.iter().map(|r| r["run_id"].as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    let count = |s: &str| runs.iter().filter(|r| r["status"] == s).count();
    assert_eq!(
        (
            count("ok"),
            count("diverged"),
            count("unreachable"),
            count("error")
        ),
        (16, 1, 1, 1)
    );
    let lora = runs
        .iter()
        .find(|r| r["run_id"] == "sst2__lora__1%__1")
        .unwrap();
    assert_eq!(lora["primary_metric"], "accuracy");
    assert_eq!(num(lora, "primary_best"), 0.915);
    assert_eq!(num(lora, "primary_final"), 0.91);
    assert_eq!(lora["knob_name"], "r");
    assert_eq!(lora["knob_value"], "4");
    assert_eq!(num(lora, "latency_merged_ms"), 8.0);
    assert_eq!(num(lora, "peak_memory_mb"), 2001.0);
    let full = runs
        .iter()
        .find(|r| r["run_id"] == "sst2__full_finetune__full__0")
        .unwrap();
    assert_eq!(full["latency_merged_ms"], "");
    assert_eq!(full["budget_deviation"], "");

    // summary.csv: mean and sample std over the two seeds.
    let (_, rows) = read_csv(&summary.summary_csv);
    assert_eq!(rows.len(), 11);
    let full = find(&rows, "sst2", "full_finetune", "full");
    assert_eq!(full["n_seeds"], "2");
    assert!((num(full, "primary_mean") - 0.91).abs() < 1e-12);
    assert!((num(full, "primary_std") - 0.02f64 / 2f64.sqrt()).abs() < 1e-12);
    assert!((num(full, "train_seconds_mean") - 105.0).abs() < 1e-12);
    assert!((num(full, "peak_memory_mb_mean") - 2000.5).abs() < 1e-9);
    let lora = find(&rows, "sst2", "lora", "1%");
    assert!((num(lora, "primary_mean") - 0.91).abs() < 1e-12);
    assert!((num(lora, "primary_std") - 0.01 / 2f64.sqrt()).abs() < 1e-12);
    assert!((num(lora, "latency_unmerged_ms_mean") - 10.5).abs() < 1e-12);
    assert_eq!(num(lora, "latency_merged_ms_mean"), 8.0);
    // The diverged seed is not in the mean; one seed has std 0.
    let adapter = find(&rows, "sst2", "adapter", "1%");
    assert_eq!(adapter["n_seeds"], "1");
    assert_eq!(num(adapter, "primary_mean"), 0.70);
    assert_eq!(num(adapter, "primary_std"), 0.0);
    assert!(rows
        .iter()
        .all(|r| r["method"] != "full_finetune" || r["task"] != "cola"));
    // Rows ordered task, method, then budget by parameter target.
    let sst2_lora: Vec<&str> = rows
        .iter()
        .filter(|r| r["task"] == "sst2" && r["method"] == "lora")
        .map(|r| r["budget"].as_str())
        .collect();
    assert_eq!(sst2_lora, ["0.1%", "1%"]);

    // curves.csv: one column per metric seen, blank where absent.
    let (header, curves) = read_csv(&summary.curves_csv);
    assert_eq!(
        header,
        [
            "run_id",
            "task",
            "method",
            "budget",
            "seed",
            "step",
            "train_loss",
            "accuracy",
            "matthews"
        ]
    );
    assert_eq!(curves.len(), 50);
    let first = curves
        .iter()
        .find(|r| r["run_id"] == "cola__lora__1%__0" && r["step"] == "20")
        .unwrap();
    assert_eq!(first["accuracy"], "");
    assert_eq!(num(first, "matthews"), 0.40);
    assert!(curves.iter().any(|r| r["train_loss"] == "NaN"));

    // Plots: every expected PNG, of the expected size.
    let expected = [
        ("score_vs_params_sst2.png", SCORE_VS_PARAMS_SIZE),
        ("score_vs_budget_sst2.png", SCORE_VS_BUDGET_SIZE),
        ("curves_sst2.png", CURVES_SIZE),
        ("score_vs_params_cola.png", SCORE_VS_PARAMS_SIZE),
        ("score_vs_budget_cola.png", SCORE_VS_BUDGET_SIZE),
        ("curves_cola.png", CURVES_SIZE),
        ("time_memory.png", TIME_MEMORY_SIZE),
        ("adalora_ranks.png", ADALORA_RANKS_SIZE),
    ];
    assert_eq!(summary.plots.len(), expected.len());
    for (name, size) in expected {
        let path = out_dir.join(name);
        assert!(summary.plots.contains(&path), "{name} not reported");
        assert_eq!(png_size(&path), size, "{name}");
    }

    // REPORT.md
    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(md.starts_with("# peftbench report: synthetic"));
    assert!(md.contains("- CPU: Test CPU 9000"));
    assert!(md.contains("- Git revision: abc1234"));
    assert!(md.contains("- candle: 0.11.1"));
    assert!(md.contains(
        "On **sst2**, methods within one standard deviation of full fine-tuning \
         (accuracy 0.9100 ± 0.0141): adalora (1%), lora (1%)."
    ));
    assert!(md.contains("On **cola**, full fine-tuning has no ok run"));
    assert!(md.contains("- `sst2__adapter__1%__1` (diverged): diverged at step 10: loss is NaN"));
    assert!(md.contains("- `sst2__adapter__0.1%__0` (unreachable): budget unreachable: smallest bottleneck exceeds budget"));
    assert!(md.contains("- `cola__full_finetune__full__0` (error): error: out of memory"));
    assert!(md.contains("| lora | 1% | – | 10007 | 1.0007% | 0.9100 ± 0.0071 | – | 2 |"));
    for (name, _) in expected {
        assert!(md.contains(&format!("]({name})")), "{name} not embedded");
    }
}

#[test]
fn a_malformed_record_is_skipped_and_named_and_the_rest_reported() {
    let results = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_records(results.path(), &synthetic()[..2]);
    std::fs::write(results.path().join("broken.json"), "{ not json").unwrap();
    std::fs::write(results.path().join("empty.json"), "").unwrap();
    let summary = write_report(results.path(), out.path()).unwrap();
    assert_eq!(summary.records, 2);
    assert_eq!(summary.skipped.len(), 2, "{:?}", summary.skipped);
    assert!(
        summary.skipped[0].contains("broken.json"),
        "{:?}",
        summary.skipped
    );
    assert!(
        summary.skipped[1].contains("empty.json"),
        "{:?}",
        summary.skipped
    );
    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(md.contains("## Skipped records"), "{md}");
    assert!(
        md.contains("broken.json") && md.contains("empty.json"),
        "{md}"
    );
    // The strict reader still refuses the directory, naming the file.
    let err = peftbench_reports::load_records(results.path()).unwrap_err();
    match &err {
        ReportError::BadRecord { path, .. } => assert!(path.ends_with("broken.json")),
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn missing_results_dir_is_an_io_error() {
    let out = tempfile::tempdir().unwrap();
    let missing = out.path().join("nope");
    let err = write_report(&missing, out.path()).unwrap_err();
    assert!(matches!(err, ReportError::Io { .. }));
    assert!(err.to_string().contains("nope"));
}

#[test]
fn learning_rates_are_in_every_table() {
    let with_rates = |mut r: RunRecord, lr: f64, head_lr: Option<f64>| {
        r.config = match head_lr {
            Some(h) => serde_json::json!({ "optim": { "lr": lr, "head_lr": h } }),
            None => serde_json::json!({ "optim": { "lr": lr } }),
        };
        r
    };
    let records = vec![
        with_rates(ok("rte", "lora", "0.1%", 0, 0.55), 1e-3, Some(1e-2)),
        with_rates(ok("rte", "lora", "0.1%", 1, 0.56), 1e-3, Some(1e-2)),
        // A group that mixed rates across seeds says so rather than showing one of them.
        with_rates(ok("rte", "adapter", "0.1%", 0, 0.54), 5e-3, None),
        with_rates(ok("rte", "adapter", "0.1%", 1, 0.53), 1e-2, None),
        with_rates(ok("rte", "adapter", "0.1%", 2, 0.52), 5e-3, None),
        // A record without an optimiser section (config `{}`) has no rate to show.
        ok("rte", "full_finetune", "full", 0, 0.59),
    ];
    let results = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_records(results.path(), &records);
    let summary = write_report(results.path(), out.path()).unwrap();

    let (_, runs) = read_csv(&summary.runs_csv);
    let run = |id: &str| runs.iter().find(|r| r["run_id"] == id).unwrap();
    assert_eq!(num(run("rte__lora__0.1%__0"), "lr"), 1e-3);
    assert_eq!(num(run("rte__lora__0.1%__0"), "head_lr"), 1e-2);
    assert_eq!(num(run("rte__adapter__0.1%__1"), "lr"), 1e-2);
    assert_eq!(run("rte__adapter__0.1%__1")["head_lr"], "");
    assert_eq!(run("rte__full_finetune__full__0")["lr"], "");

    let (_, rows) = read_csv(&summary.summary_csv);
    assert_eq!(find(&rows, "rte", "lora", "0.1%")["lr"], "1e-3, head 1e-2");
    assert_eq!(find(&rows, "rte", "adapter", "0.1%")["lr"], "5e-3 / 1e-2");
    assert_eq!(find(&rows, "rte", "full_finetune", "full")["lr"], "");

    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(md.contains("| method | budget | lr | trainable params |"));
    for row in [
        "| lora | 0.1% | 1e-3, head 1e-2 | ",
        "| adapter | 0.1% | 5e-3 / 1e-2 | ",
        "| full_finetune | full | – | ",
    ] {
        assert!(md.contains(row), "no row starting {row:?} in\n{md}");
    }
}

#[test]
fn empty_results_dir_gives_a_report_saying_so() {
    let results = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = write_report(results.path(), out.path()).unwrap();
    assert_eq!(
        (summary.records, summary.ok_runs, summary.summary_rows),
        (0, 0, 0)
    );
    assert!(summary.plots.is_empty());
    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(md.contains("No runs were found"));
    let (header, rows) = read_csv(&summary.runs_csv);
    assert_eq!(header.len(), peftbench_reports::tables::RUNS_HEADER.len());
    assert!(rows.is_empty());
}

#[test]
fn edge_cases_do_not_panic() {
    // One seed of full fine-tuning (std 0), a method with zero trainable parameters (off the
    // log axis), a NaN score, and a task whose only runs failed.
    let mut zero = ok("mrpc", "prompt_tuning", "0.1%", 0, 0.5);
    zero.trainable_params = 0;
    let mut nan = ok("mrpc", "lora", "0.1%", 0, f64::NAN);
    nan.curve.iter_mut().for_each(|p| p.train_loss = f64::NAN);
    let records = vec![
        ok("mrpc", "full_finetune", "full", 0, 0.8),
        zero,
        nan,
        ok("mrpc", "adapter", "1%", 0, 0.8),
        failed(
            "qnli",
            "lora",
            "1%",
            0,
            RunStatus::Error {
                message: "boom".into(),
            },
        ),
    ];
    let results = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_records(results.path(), &records);
    let summary = write_report(results.path(), out.path()).unwrap();
    assert_eq!(summary.records, 5);
    // No AdaLoRA run: no heatmap. Two tasks × 3 plots + time/memory.
    assert_eq!(summary.plots.len(), 7);
    for p in &summary.plots {
        let expected = if p.ends_with("time_memory.png") {
            TIME_MEMORY_SIZE
        } else {
            SCORE_VS_PARAMS_SIZE
        };
        assert_eq!(png_size(p), expected);
    }
    let md = std::fs::read_to_string(&summary.report).unwrap();
    // std 0: only an exactly equal mean is within; the NaN score is no score at all.
    assert!(
        md.contains("(accuracy 0.8000 ± 0.0000): adapter (1%)."),
        "{md}"
    );
    assert!(md.contains("| lora | 0.1% |"));
    assert!(md.contains("On **qnli**, full fine-tuning has no ok run"));
    let (_, rows) = read_csv(&summary.summary_csv);
    let nan_row = find(&rows, "mrpc", "lora", "0.1%");
    assert_eq!(nan_row["primary_mean"], "");
    assert_eq!(nan_row["n_seeds"], "1");
}

#[test]
fn statistics_helpers() {
    assert_eq!(mean(&[]), None);
    assert_eq!(mean(&[1.0, f64::NAN, 3.0]), Some(2.0));
    assert_eq!(sample_std(&[5.0]), Some(0.0));
    assert_eq!(sample_std(&[1.0, 2.0, 3.0]), Some(1.0));
    assert_eq!(sample_std(&[f64::NAN]), None);
    // Budgets by parameter target, untargeted labels last.
    let mut big = ok("t", "lora", "10000", 0, 0.1);
    big.budget_target = Some(10_000);
    let mut small = ok("t", "lora", "2000", 0, 0.1);
    small.budget_target = Some(2_000);
    let full = ok("t", "full_finetune", "full", 0, 0.1);
    assert_eq!(budget_order(&[full, big, small]), ["2000", "10000", "full"]);
}

#[test]
fn pretraining_control_is_compared_with_the_pretrained_run() {
    use peftbench_reports::markdown::pretraining_sentences;
    use peftbench_reports::summary::SummaryRow;
    let row = |method: &str, mean: f64| SummaryRow {
        task: "t".into(),
        method: method.into(),
        budget: "3%".into(),
        budget_target: Some(100),
        lr: "1e-3".into(),
        primary_metric: "accuracy".into(),
        n_seeds: 1,
        primary_mean: Some(mean),
        primary_std: Some(0.0),
        primary_ci: None,
        trainable_params: 100.0,
        trainable_percent: 3.0,
        train_seconds: 1.0,
        peak_memory_mb: 1.0,
        latency_unmerged_ms: None,
        latency_merged_ms: None,
    };
    let s = pretraining_sentences(&[row("lora", 0.9), row("lora-random-init", 0.5)], "t");
    assert_eq!(s, vec!["Pretrained base beats random initialisation under lora (3%): accuracy 0.9000 vs 0.5000.".to_string()]);
    let s = pretraining_sentences(&[row("lora", 0.4), row("lora-random-init", 0.5)], "t");
    assert!(s[0].contains("does not beat"));
}

#[test]
fn mixed_environments_are_listed_per_value() {
    use peftbench_reports::markdown::environment;
    let mut records: Vec<RunRecord> = (0..5)
        .map(|s| ok("cola", "adapter", "1%", s, 0.1))
        .collect();
    let mut one = String::new();
    environment(&mut one, &records);
    assert!(
        one.contains(&format!("- Threads: {}\n", records[0].env.threads)),
        "{one}"
    );
    assert!(!one.contains("not all made in one environment"), "{one}");

    let odd = records[3].run_id.clone();
    records[3].env.threads = records[0].env.threads + 7;
    let mut mixed = String::new();
    environment(&mut mixed, &records);
    let expected = format!(
        "- Threads: {} (4 runs); {} ({odd})",
        records[0].env.threads,
        records[0].env.threads + 7
    );
    assert!(mixed.contains(&expected), "{mixed}");
    assert!(mixed.contains("not all made in one environment"), "{mixed}");
    // Fields that agree are still written once.
    assert!(mixed.contains("- CPU: Test CPU 9000\n"), "{mixed}");
}

#[test]
fn chance_recorded_with_runs_is_reported_with_each_groups_distance_from_it() {
    let chance = serde_json::json!({
        "metric": "accuracy", "value": 0.5, "std_error": 0.02,
        "dev_examples": 625, "rule": "class 1, the training labels' majority, for every input"
    });
    let mut records = vec![
        ok("rte", "full_finetune", "full", 0, 0.60),
        ok("rte", "lora", "1%", 0, 0.53),
        // An older record without a chance level: the report takes it from the others.
        ok("rte", "adapter", "1%", 0, 0.56),
    ];
    for r in &mut records[..2] {
        r.extra = serde_json::json!({ "chance": chance });
    }
    let dir = tempfile::tempdir().unwrap();
    let md = report_of(dir.path(), &records);
    assert!(
        md.contains(
            "Chance on **rte**: accuracy 0.5000 (class 1, the training labels' majority, for every input, \
             over 625 dev examples; one standard error 0.0200). At least 2 standard errors above it: \
             adapter 1% (z = 3.0), full_finetune full (z = 5.0). Not: lora 1% (z = 1.5)."
        ),
        "{md}"
    );
    let (header, rows) = read_csv(&dir.path().join("report/runs.csv"));
    assert!(header.contains(&"chance".to_string()));
    let lora = find(&rows, "rte", "lora", "1%");
    assert_eq!(num(lora, "chance"), 0.5);
    assert_eq!(num(lora, "chance_std_error"), 0.02);
    let adapter = find(&rows, "rte", "adapter", "1%");
    assert_eq!(adapter["chance"], "");
}

#[test]
fn methods_at_or_below_the_head_only_floor_are_named() {
    use peftbench_reports::markdown::floor_sentence;
    let records = vec![
        ok("cola", "head_only", "none", 0, 0.15),
        ok("cola", "lora", "1%", 0, 0.25),
        ok("cola", "p_tuning", "1%", 0, 0.06),
        ok("cola", "prompt_tuning", "1%", 0, 0.15),
        ok("sst2", "p_tuning", "1%", 0, 0.10),
    ];
    let rows = peftbench_reports::summarize(&records);
    assert_eq!(
        floor_sentence(&rows, "cola").unwrap(),
        "The task head alone on the frozen base (head_only) scores matthews 0.1500 on **cola**; \
         methods at or below it, which add nothing the head does not learn alone: p_tuning 1%, \
         prompt_tuning 1%."
    );
    // No floor on a task without the control.
    assert_eq!(floor_sentence(&rows, "sst2"), None);
}

#[test]
fn a_report_without_recorded_chance_says_nothing_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let md = report_of(dir.path(), &synthetic());
    assert!(!md.contains("Chance on"), "{md}");
}

#[test]
fn the_report_says_where_the_runs_wall_time_went() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = synthetic();
    // Two runs kept their phases (train 100 and 110 s from `record`); older records did not.
    let ok: Vec<usize> = (0..records.len())
        .filter(|&i| records[i].status == RunStatus::Ok)
        .take(2)
        .collect();
    for (n, &i) in ok.iter().enumerate() {
        let r = &mut records[i];
        r.train_seconds = 100.0 + 10.0 * n as f64;
        for (k, v) in [("wall", 200.0), ("evaluation", 60.0), ("latency", 20.0)] {
            r.phase_seconds.insert(k.to_string(), v);
        }
    }
    let md = report_of(dir.path(), &records);
    assert!(
        md.contains(
            "Wall time: 2 of the runs recorded theirs, 400 s in all: training 210 s (52%), \
             evaluation 120 s (30%), latency timing 40 s (10%)"
        ),
        "{md}"
    );
    let (header, rows) = read_csv(&dir.path().join("report/runs.csv"));
    assert!(header.contains(&"wall_seconds".to_string()));
    assert_eq!(
        rows.iter().filter(|r| r["wall_seconds"] == "200").count(),
        2
    );
    assert_eq!(rows.iter().filter(|r| r["eval_seconds"] == "60").count(), 2);

    // Without any phases the sentence is left out.
    let plain = tempfile::tempdir().unwrap();
    let md = report_of(plain.path(), &synthetic());
    assert!(!md.contains("Wall time:"), "{md}");
}
