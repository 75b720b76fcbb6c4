//! Every bad input found so far, each refused with an error naming the file, line, key or
//! tensor before it costs compute, and every stale or broken record redone rather than reused.
//! New cases go into the tables below.

mod common;

use candle_core::{Device, Tensor};
use peftbench_backbone::{load_model_dir, save_model_dir, TextTokenizer};
use peftbench_harness::grid::{record_state, RecordState};
use peftbench_harness::{run_grid, synthetic, Shard, Suite};
use peftbench_reports::RunStatus;

const SUITE: &str = r#"name = "tiny"
model = "synthetic"
seeds = [0, 1]
budgets = ["3%"]
max_budget_deviation = 0.3

[train]
steps = 6
batch_size = 8
eval_every = 3
eval_batch_size = 32

[methods.lora]
lr = 5e-3

[methods.head_only]
lr = 5e-3

[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"
"#;

/// (what is wrong, text replaced, replacement, words the error must contain, the line it
/// must name as it reads after the replacement).
type BadSuite = (
    &'static str,
    &'static str,
    &'static str,
    &'static [&'static str],
    Option<&'static str>,
);

const BAD_SUITES: &[BadSuite] = &[
    (
        "batch_size = 0 (panicked after the model loaded)",
        "batch_size = 8",
        "batch_size = 0",
        &["train.batch_size must be at least 1"],
        Some("batch_size = 0"),
    ),
    (
        "eval_batch_size = 0",
        "eval_batch_size = 32",
        "eval_batch_size = 0",
        &["train.eval_batch_size must be at least 1"],
        Some("eval_batch_size = 0"),
    ),
    (
        "an unknown key in a task table (ignored)",
        "objective = \"classification\"",
        "objective = \"classification\"\ntrain_limt = 10",
        &["task `polarity`", "unknown key `train_limt`"],
        Some("train_limt = 10"),
    ),
    (
        "a seed listed twice (two runs under one run id)",
        "seeds = [0, 1]",
        "seeds = [0, 0]",
        &["seed 0 is listed twice"],
        Some("seeds = [0, 0]"),
    ),
    (
        "two tasks with one name (records overwrote each other)",
        "objective = \"classification\"",
        "objective = \"classification\"\n\n[[tasks]]\nname = \"polarity\"\nkind = \"synthetic\"\nobjective = \"reward\"",
        &["two tasks are named `polarity`"],
        Some("name = \"polarity\""),
    ),
    (
        "max_budget_deviation = nan (accepted every size)",
        "max_budget_deviation = 0.3",
        "max_budget_deviation = nan",
        &["max_budget_deviation must be a finite number >= 0", "NaN"],
        Some("max_budget_deviation = nan"),
    ),
    (
        "a negative max_budget_deviation",
        "max_budget_deviation = 0.3",
        "max_budget_deviation = -0.1",
        &["max_budget_deviation"],
        Some("max_budget_deviation = -0.1"),
    ),
    (
        "max_len = 0",
        "objective = \"classification\"",
        "objective = \"classification\"\nmax_len = 0",
        &["task `polarity`", "max_len must be at least 1"],
        None,
    ),
    (
        "train_limit = 0 (an empty training set)",
        "objective = \"classification\"",
        "objective = \"classification\"\ntrain_limit = 0",
        &["train_limit and dev_limit must be at least 1"],
        None,
    ),
    (
        "budgets = [] (an empty grid and exit 0)",
        "budgets = [\"3%\"]",
        "budgets = []",
        &["budgets is empty"],
        Some("budgets = []"),
    ),
    (
        "a budget listed twice",
        "budgets = [\"3%\"]",
        "budgets = [\"3%\", \"3%\"]",
        &["budget `3%` is listed twice"],
        Some("budgets = [\"3%\", \"3%\"]"),
    ),
    (
        "beta1 = 1 (recorded as a NaN loss)",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\nbeta1 = 1.0",
        &["methods.lora", "`beta1` must be in [0, 1)"],
        Some("beta1 = 1.0"),
    ),
    (
        "beta2 above 1",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\nbeta2 = 1.5",
        &["`beta2` must be in [0, 1)"],
        Some("beta2 = 1.5"),
    ),
    (
        "eps = 0",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\neps = 0.0",
        &["`eps` must be a positive number"],
        Some("eps = 0.0"),
    ),
    (
        "a warmup ratio over 1",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\nwarmup_ratio = 2.0",
        &["`warmup_ratio` must be in [0, 1]"],
        Some("warmup_ratio = 2.0"),
    ),
    (
        "grad_accumulation = 0",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\ngrad_accumulation = 0",
        &["`grad_accumulation` must be at least 1"],
        Some("grad_accumulation = 0"),
    ),
    (
        "a negative weight decay",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\nweight_decay = -1.0",
        &["`weight_decay` must be a finite number >= 0"],
        Some("weight_decay = -1.0"),
    ),
    (
        "a NaN head_lr",
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 5e-3\nhead_lr = nan",
        &["`head_lr` must be a positive number"],
        Some("head_lr = nan"),
    ),
    (
        "an unknown analysis",
        "max_budget_deviation = 0.3",
        "max_budget_deviation = 0.3\nanalyses = [\"subspace\"]",
        &["unknown variant `subspace`", "subspace_similarity"],
        Some("analyses = [\"subspace\"]"),
    ),
    (
        "a validation split without best_on_validation",
        "eval_batch_size = 32",
        "eval_batch_size = 32\nvalidation_size = 10",
        &["validation_size is set but train.selection is not"],
        Some("validation_size = 10"),
    ),
    (
        "an empty validation split",
        "eval_batch_size = 32",
        "eval_batch_size = 32\nselection = \"best_on_validation\"\nvalidation_size = 0",
        &["train.validation_size must be at least 1"],
        Some("validation_size = 0"),
    ),
    (
        "an unknown selection rule",
        "eval_batch_size = 32",
        "eval_batch_size = 32\nselection = \"best_on_dev\"",
        &["unknown variant `best_on_dev`", "best_on_validation"],
        Some("selection = \"best_on_dev\""),
    ),
    (
        "eval_every = 0 in a task",
        "objective = \"classification\"",
        "objective = \"classification\"\neval_every = 0",
        &["eval_every must be at least 1"],
        None,
    ),
];

#[test]
fn every_bad_suite_is_refused_naming_the_line_and_key() {
    for (what, from, to, words, line) in BAD_SUITES {
        assert!(SUITE.contains(from), "{what}: `{from}` is not in the suite");
        let text = SUITE.replacen(from, to, 1);
        let e = match Suite::parse(&text, "bad.toml") {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with("bad.toml"), "{what}: {e}");
        for w in *words {
            assert!(e.contains(w), "{what}: `{w}` not in: {e}");
        }
        if let Some(expected) = line {
            let n: usize = e
                .split(':')
                .nth(1)
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or_else(|| panic!("{what}: no line in {e}"));
            // Duplicated task names point at the second of the two.
            let got = text.lines().nth(n - 1).unwrap_or("");
            assert_eq!(got, *expected, "{what}: {e}");
        }
    }
}

#[test]
fn methods_run_in_the_order_the_suite_lists_them() {
    let text = SUITE.replace(
        "[methods.lora]\nlr = 5e-3\n\n[methods.head_only]\nlr = 5e-3",
        "[methods.prompt_tuning]\nlr = 5e-3\n\n[methods.head_only]\nlr = 5e-3\n\n[methods.adapter]\nlr = 5e-3",
    );
    let suite = Suite::parse(&text, "order.toml").unwrap();
    let order: Vec<&str> = suite.methods.iter().map(|(m, _)| m.name()).collect();
    assert_eq!(order, ["prompt_tuning", "head_only", "adapter"]);
    let mut seen: Vec<String> = Vec::new();
    for r in suite.runs() {
        let m = r.method.name().to_string();
        if seen.last() != Some(&m) {
            seen.push(m);
        }
    }
    assert_eq!(seen, ["prompt_tuning", "head_only", "adapter"]);
}

#[test]
fn a_tsv_task_declared_in_a_suite_parses_and_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mrpc");
    std::fs::create_dir_all(&data).unwrap();
    let rows = "label\tone\ttwo\n1\ta good film\tgood movie\n0\tthe rain\ta cat\n1\tbig\tlarge\n";
    std::fs::write(data.join("train.tsv"), rows).unwrap();
    std::fs::write(data.join("dev.tsv"), rows).unwrap();
    let text = SUITE.replace(
        "[[tasks]]\nname = \"polarity\"\nkind = \"synthetic\"\nobjective = \"classification\"",
        "[[tasks]]\nname = \"pairs\"\nkind = \"tsv\"\ntrain = \"mrpc/train.tsv\"\ndev = \"mrpc/dev.tsv\"\nheader = true\ncolumns = 3\ntext_a = 1\ntext_b = 2\nlabel = 0\ntarget = { kind = \"classes\", names = [\"0\", \"1\"] }\nmax_len = 16",
    );
    let suite = Suite::parse(&text, "tsv.toml").unwrap_or_else(|e| panic!("{e}"));
    let task = &suite.tasks[0];
    assert_eq!(task.name, "pairs");
    let peftbench_harness::task::TaskSource::Tsv(spec) = &task.source else {
        panic!("{:?}", task.source)
    };
    assert_eq!(spec.name, "pairs");
    let tok_path = tmp.path().join("tokenizer.json");
    std::fs::write(&tok_path, synthetic::tokenizer_json()).unwrap();
    let tok = TextTokenizer::from_file(&tok_path, 16).unwrap();
    let loaded = peftbench_harness::load_task(task, &tok, tmp.path()).unwrap();
    assert_eq!((loaded.train.len(), loaded.dev.len()), (3, 3));
    // And an unknown key in such a table is named too.
    let typo = text.replace("header = true", "header = true\ncolums = 3");
    let e = Suite::parse(&typo, "tsv.toml").unwrap_err().to_string();
    assert!(e.contains("task `pairs`") && e.contains("`colums`"), "{e}");
}

use common::{synthetic_base as base, synthetic_tasks as tasks};

/// Method configurations that are wrong at every size are configuration errors, named
/// before training, never "budget unreachable".
#[test]
fn an_invalid_method_config_is_a_config_error_not_an_unreachable_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    for (extra, words) in [
        (
            "target_modules = [\"query\", \"kwery\"]",
            &["lora", "kwery"][..],
        ),
        ("lora_dropout = 1.5", &["lora", "lora_dropout 1.5"][..]),
    ] {
        let text = SUITE.replace(
            "[methods.lora]\nlr = 5e-3",
            &format!("[methods.lora]\nlr = 5e-3\n{extra}"),
        );
        let suite = Suite::parse(&text, "m.toml").unwrap();
        let tasks = tasks(&suite, &base);
        let e = suite
            .check_against(&base.model.config, &tasks)
            .unwrap_err()
            .to_string();
        assert!(e.contains("methods.lora"), "{extra}: {e}");
        for w in words {
            assert!(e.contains(w), "{extra}: `{w}` not in {e}");
        }
        // A library caller who skips the check still gets an error record that says so.
        let spec = suite.runs().into_iter().next().unwrap();
        let rec = peftbench_harness::run(&spec, &base, &tasks["polarity"], tmp.path());
        match &rec.status {
            RunStatus::Error { message } => assert!(message.contains(words[1]), "{message}"),
            other => panic!("{extra}: {other:?}"),
        }
    }
}

#[test]
fn a_causal_lm_task_on_a_bidirectional_encoder_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let synthetic_base = base(tmp.path());
    let text = SUITE.replace("objective = \"classification\"", "objective = \"sft\"");
    let suite = Suite::parse(&text, "sft.toml").unwrap();
    let tasks = tasks(&suite, &synthetic_base);
    // The decoder is fine.
    suite
        .check_against(&synthetic_base.model.config, &tasks)
        .unwrap();
    let encoder = common::tiny_model("bert", 1);
    let e = suite
        .check_against(&encoder.config, &tasks)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("task `polarity`") && e.contains("bidirectional encoder"),
        "{e}"
    );
}

#[test]
fn a_checkpoint_with_unused_tensors_or_non_finite_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    save_model_dir(&common::tiny_model("llama", 1), &dir).unwrap();
    load_model_dir(&dir, &Device::Cpu).unwrap();

    // config.json declares one layer fewer than the checkpoint holds.
    let cfg_path = dir.join("config.json");
    let good_cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&good_cfg).unwrap();
    cfg["num_hidden_layers"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_model_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
    assert!(
        e.contains("the config does not use") && e.contains("layers.1."),
        "{e}"
    );
    std::fs::write(&cfg_path, good_cfg).unwrap();

    // One NaN in one weight.
    let st = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    let w = tensors[name].clone();
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[3] = f32::NAN;
    tensors.insert(
        name.to_string(),
        Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let e = load_model_dir(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("1 non-finite values"), "{e}");
}

#[test]
fn a_finite_loss_explosion_is_divergence_not_a_result() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let text = SUITE.replace(
        "[methods.head_only]\nlr = 5e-3",
        "[methods.head_only]\nlr = 1e6",
    );
    let suite = Suite::parse(&text, "lr.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let spec = suite
        .runs()
        .into_iter()
        .find(|r| r.method.name() == "head_only")
        .unwrap();
    let rec = peftbench_harness::run(&spec, &base, &tasks["polarity"], tmp.path());
    match &rec.status {
        RunStatus::Diverged { message, .. } => {
            assert!(message.contains("first step's"), "{message}")
        }
        other => panic!("lr 1e6 recorded as {other:?}"),
    }
}

/// Records are reused only while they are current: an edited suite, an unreadable file or an
/// error record is redone, with the old record kept under `runs/superseded/`.
#[test]
fn stale_broken_and_error_records_are_run_again_and_kept_aside() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let results = tmp.path().join("results");
    let runs = results.join("tiny/runs");
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let mut tasks = tasks(&suite, &base);
    let total = suite.runs().len();
    let s = run_grid(&suite, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!((s.ran, s.skipped), (total, 0));
    assert!(s.complete());
    let again = run_grid(&suite, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!((again.ran, again.skipped), (0, total));

    // The suite is edited: LoRA's rate changes, so its records are stale; head-only's are not.
    let edited = Suite::parse(
        &SUITE.replace("[methods.lora]\nlr = 5e-3", "[methods.lora]\nlr = 1e-3"),
        "tiny.toml",
    )
    .unwrap();
    let lora = edited
        .runs()
        .into_iter()
        .find(|r| r.method.name() == "lora")
        .unwrap();
    assert!(
        matches!(record_state(&runs, &lora), RecordState::Stale(ref w) if w.contains("another configuration"))
    );
    let s = run_grid(&edited, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!((s.ran, s.superseded, s.skipped), (2, 2, total - 2));
    let kept = std::fs::read_dir(runs.join("superseded")).unwrap().count();
    assert_eq!(kept, 2);
    let rec =
        peftbench_reports::RunRecord::read(&runs.join(format!("{}.json", lora.run_id()))).unwrap();
    assert_eq!(rec.lr(), Some(1e-3));
    assert_eq!(rec.config_hash, Some(lora.config_hash()));

    // A truncated and an empty record are not "already recorded".
    let head = edited
        .runs()
        .into_iter()
        .find(|r| r.method.name() == "head_only")
        .unwrap();
    let path = runs.join(format!("{}.json", head.run_id()));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let other = edited
        .runs()
        .into_iter()
        .rfind(|r| r.method.name() == "head_only")
        .unwrap();
    std::fs::write(runs.join(format!("{}.json", other.run_id())), "").unwrap();
    // Meanwhile the report names the broken files and reports the rest.
    let report = peftbench_reports::write_report(&runs, &tmp.path().join("report")).unwrap();
    assert_eq!((report.records, report.skipped.len()), (total - 2, 2));
    let s = run_grid(&edited, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!((s.ran, s.superseded), (2, 2));
    assert_eq!(peftbench_reports::load_records(&runs).unwrap().len(), total);

    // An error record (here: a task whose data went missing) is retried once the data is back.
    let good = tasks["polarity"].clone();
    tasks.get_mut("polarity").unwrap().train.clear();
    let retry = Suite::parse(&SUITE.replace("seeds = [0, 1]", "seeds = [7]"), "tiny.toml").unwrap();
    let s = run_grid(&retry, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!(s.ran, 2);
    assert!(s.complete(), "an error record is a record of the grid");
    let failed = retry.runs().into_iter().next().unwrap();
    assert!(
        matches!(record_state(&runs, &failed), RecordState::Failed(ref m) if m.contains("no training"))
    );
    tasks.insert("polarity".into(), good);
    let s = run_grid(&retry, &base, &tasks, &results, Shard::ALL).unwrap();
    assert_eq!((s.ran, s.superseded), (2, 2));
    assert_eq!(record_state(&runs, &failed), RecordState::Current);
}

#[test]
fn a_shard_that_finishes_first_knows_the_grid_is_partial() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let results = tmp.path().join("results");
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let first = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard::parse("1/2").unwrap(),
    )
    .unwrap();
    assert_eq!((first.recorded, first.grid_runs), (2, 4));
    assert!(!first.complete());
    let last = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard::parse("2/2").unwrap(),
    )
    .unwrap();
    assert!(last.complete());
}
