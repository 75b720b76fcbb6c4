//! Reported scores a reviewer can check, through the CLI: the evaluation is chosen on a
//! validation split carved from the training data, each record keeps its per-example dev
//! outcomes (the report's intervals and paired tests resample them), its peak memory is its
//! own, and `peftbench eval` reloads a saved run and gives its recorded score back.

use candle_core::Device;
use peftbench_backbone::{save_model_dir, Transformer};
use peftbench_harness::synthetic;
use peftbench_reports::{load_records, RunStatus, Selection};
use std::path::Path;
use std::process::Command;

fn suite(selection: &str) -> String {
    format!(
        r#"
name = "selection"
model = "synthetic"
seeds = [0, 1]
budgets = ["3%"]
max_budget_deviation = 0.3

[train]
steps = 8
batch_size = 8
eval_every = 2
eval_batch_size = 16
{selection}

[methods.lora]
lr = 1e-2

[methods.head_only]
lr = 1e-2

[methods.full_finetune]
lr = 1e-3

[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"
train_limit = 64
dev_limit = 48
"#
    )
}

fn peftbench(cache: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peftbench"))
        .args(args)
        .env("PEFTBENCH_CACHE", cache)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs the suite text through `peftbench run`; returns the results folder.
fn run_suite(dir: &Path, cache: &Path, text: &str, extra: &[&str]) -> std::path::PathBuf {
    let file = dir.join("suite.toml");
    std::fs::write(&file, text).unwrap();
    let results = dir.join("results");
    let mut args = vec![
        "run",
        "--config",
        file.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (ok, out) = peftbench(cache, &args);
    assert!(ok, "{out}");
    results
}

/// A cache holding a random synthetic base, so no process pretrains one.
fn cache(dir: &Path) -> std::path::PathBuf {
    let cache = dir.join("cache");
    let base = cache.join("synthetic-base-v1");
    let model = Transformer::random(synthetic::base_config(), 3, &Device::Cpu).unwrap();
    save_model_dir(&model, &base).unwrap();
    std::fs::write(base.join("tokenizer.json"), synthetic::tokenizer_json()).unwrap();
    cache
}

#[test]
fn best_on_validation_runs_keep_outcomes_and_eval_reproduces_them() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache(tmp.path());
    let results = run_suite(
        tmp.path(),
        &cache,
        &suite("selection = \"best_on_validation\""),
        &[],
    );
    let runs = results.join("selection").join("runs");
    let records = load_records(&runs).unwrap();
    assert_eq!(records.len(), 6);
    for r in &records {
        assert_eq!(r.status, RunStatus::Ok, "{}", r.run_id);
        let s = r.selected.as_ref().expect("selection recorded");
        assert_eq!(s.rule, Selection::BestOnValidation);
        // A tenth of the 64 training examples is held out; the dev set stays whole.
        assert_eq!(s.validation_examples, 6);
        assert!(s.validation_metrics.contains_key("accuracy"));
        assert!([2, 4, 6, 8].contains(&s.step), "{}", s.step);
        let o = r.dev_outcomes.as_ref().expect("outcomes recorded");
        assert_eq!(o.len(), 48);
        assert_eq!(o.metric("accuracy"), s.metrics.get("accuracy").copied());
        // The CLI counts heap bytes: the peak is this run's own, and holds the base weights.
        let m = r.memory.as_ref().unwrap();
        assert_eq!(m.source, "heap");
        assert!(r.peak_memory_bytes >= m.base_weights_bytes, "{m:?}");
    }
    let report = std::fs::read_to_string(results.join("selection/report/REPORT.md")).unwrap();
    for words in [
        "95% CI",
        "by a paired bootstrap of the difference on the same 48 dev examples",
        "`selection = \"best_on_validation\"`",
        "Against the task head trained alone",
    ] {
        assert!(report.contains(words), "`{words}` not in:\n{report}");
    }

    // Every saved run gives its recorded score back; full fine-tuning keeps nothing to load.
    for r in &records {
        let path = runs.join(format!("{}.json", r.run_id));
        let (ok, text) = peftbench(&cache, &["eval", "--run", path.to_str().unwrap()]);
        if r.method == "full_finetune" {
            assert!(!ok && text.contains("kept no weights"), "{text}");
        } else {
            assert!(ok && text.contains("reproduced"), "{}: {text}", r.run_id);
        }
    }
}

#[test]
fn final_selection_reports_the_last_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = cache(tmp.path());
    let results = run_suite(tmp.path(), &cache, &suite(""), &["--no-report"]);
    for r in load_records(&results.join("selection").join("runs")).unwrap() {
        let s = r.selected.unwrap();
        assert_eq!(
            (s.rule, s.step, s.validation_examples),
            (Selection::Final, 8, 0)
        );
        assert_eq!(s.metrics, r.metrics_final);
    }
}
