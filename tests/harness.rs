//! The harness end to end on the embedded synthetic language: suites parse (and fail with the
//! key and line), budgets are matched or refused, the grid resumes and shards.

mod common;

use candle_core::Device;
use peftbench_backbone::Transformer;
use peftbench_harness::synthetic;
use peftbench_harness::{match_budget, run_grid, Shard, Suite};
use peftbench_methods::{MethodConfig, PromptTuningConfig};

const SUITE: &str = r#"
name = "tiny"
model = "synthetic"
seeds = [0, 1]
budgets = ["3%"]
max_budget_deviation = 0.3
random_init_controls = ["lora"]

[train]
steps = 6
batch_size = 8
eval_every = 3
eval_batch_size = 32

[methods.lora]
lr = 5e-3

[methods.adapter]
lr = 5e-3

[methods.full_finetune]
lr = 1e-3

[methods.head_only]
lr = 5e-3

[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"

[[tasks]]
name = "agreement"
kind = "synthetic"
objective = "reward"
"#;

use common::{synthetic_base as base, synthetic_tasks as tasks};

#[test]
fn suite_expands_to_tasks_methods_budgets_seeds_and_controls() {
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let runs = suite.runs();
    // 2 tasks × (lora + lora control + adapter + full fine-tuning + head only) × 2 seeds.
    assert_eq!(runs.len(), 2 * 5 * 2);
    let ids: std::collections::HashSet<String> = runs.iter().map(|r| r.run_id()).collect();
    assert_eq!(ids.len(), runs.len(), "run ids are unique");
    assert!(ids.contains("polarity__lora-random-init__3p__s1"));
    assert!(ids.contains("agreement__full_finetune__full__s0"));
    assert!(ids.contains("polarity__head_only__none__s1"));
}

#[test]
fn suite_errors_name_the_file_line_and_key() {
    let bad = SUITE.replace(
        "[methods.adapter]\nlr = 5e-3",
        "[methods.adapter]\nlr = 5e-3\nbottleneck = \"wide\"",
    );
    let e = Suite::parse(&bad, "tiny.toml").unwrap_err().to_string();
    assert!(e.starts_with("tiny.toml:"), "{e}");
    assert!(
        e.contains("methods.adapter") && e.contains("bottleneck"),
        "{e}"
    );
    let line: usize = e.split(':').nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(bad.lines().nth(line - 1).unwrap(), "bottleneck = \"wide\"");

    let e = Suite::parse(&SUITE.replace("lr = 1e-3", "rate = 1e-3"), "tiny.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing key `lr`"), "{e}");
    let e = Suite::parse(&SUITE.replace("\"3%\"", "\"lots\""), "tiny.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("budget `lots`"), "{e}");
    let e = Suite::parse(
        &SUITE.replace("steps = 6", "steps = 6\nstepz = 1"),
        "tiny.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("stepz") && e.starts_with("tiny.toml:"), "{e}");
}

#[test]
fn budget_matching_picks_the_closest_size_or_refuses() {
    let m = Transformer::random(synthetic::base_config(), 1, &Device::Cpu).unwrap();
    let lora = MethodConfig::Lora(Default::default());
    let got = match_budget(&lora, &m, Some(2000), 0.25).unwrap();
    // LoRA on query and value of this model: r · 2 layers · ((64+64) + (64+32)) = 448 r.
    assert_eq!(got.achieved, 448 * 4);
    assert_eq!(got.knob.unwrap().value, 4);
    for r in [3usize, 5] {
        assert!((448usize * r).abs_diff(2000) >= got.achieved.abs_diff(2000));
    }
    // Prompt tuning moves in steps of 64: 100 parameters is unreachable within 10%.
    let prompt = MethodConfig::PromptTuning(PromptTuningConfig::default());
    let e = match_budget(&prompt, &m, Some(100), 0.1).unwrap_err();
    assert!(e.contains("cannot reach 100"), "{e}");
}

#[test]
fn grid_skips_recorded_runs_and_shards_split_the_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let results = tmp.path().join("results");
    let total = suite.runs().len();

    let a = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard::parse("1/2").unwrap(),
    )
    .unwrap();
    assert_eq!(
        (a.ran, a.skipped, a.other_shards),
        (total / 2, 0, total / 2)
    );
    let b = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard::parse("2/2").unwrap(),
    )
    .unwrap();
    assert_eq!(b.ran, total / 2);
    // Everything is recorded now: a full run does nothing.
    let c = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard { index: 0, count: 1 },
    )
    .unwrap();
    assert_eq!((c.ran, c.skipped), (0, total));

    // A lost record (a run killed mid-way) is the only one redone.
    let dir = results.join("tiny/runs");
    std::fs::remove_file(dir.join("polarity__adapter__3p__s1.json")).unwrap();
    let d = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard { index: 0, count: 1 },
    )
    .unwrap();
    assert_eq!((d.ran, d.skipped), (1, total - 1));

    let records = peftbench_reports::load::load_records(&dir).unwrap();
    assert_eq!(records.len(), total);
    let mut chance_of_task = std::collections::BTreeMap::new();
    for r in &records {
        assert_eq!(
            r.status,
            peftbench_reports::RunStatus::Ok,
            "{}: {:?}",
            r.run_id,
            r.status
        );
        assert_eq!(r.steps, 6);
        // Step 0 (the untrained model), a loss point every step, dev metrics at 0, 3 and 6.
        let steps: Vec<usize> = r.curve.iter().map(|p| p.step).collect();
        assert_eq!(steps, [0, 1, 2, 3, 4, 5, 6]);
        let evaluated: Vec<usize> = r
            .curve
            .iter()
            .filter(|p| !p.metrics.is_empty())
            .map(|p| p.step)
            .collect();
        assert_eq!(evaluated, [0, 3, 6]);
        assert!(r.metrics_best.contains_key(&r.primary_metric));
        // The untrained model's dev metrics are kept as the baseline to beat.
        assert!(
            r.extra["initial_metrics"].get(&r.primary_metric).is_some(),
            "{}: {}",
            r.run_id,
            r.extra
        );
        // So is the chance level, the same for every run of the task.
        let chance = peftbench_reports::chance::recorded_chance(r)
            .unwrap_or_else(|| panic!("{}: no chance level in {}", r.run_id, r.extra));
        assert_eq!(chance.metric, r.primary_metric);
        assert!(chance.std_error.is_some_and(|se| se > 0.0), "{chance:?}");
        let first = chance_of_task
            .entry(r.task.clone())
            .or_insert(chance.clone());
        assert_eq!(*first, chance, "{}", r.run_id);
        // The head-only control trains the head alone.
        assert_eq!(
            r.trainable_params == 0,
            r.method == "head_only",
            "{}",
            r.run_id
        );
        assert!(r.head_params > 0);
        // The phases of the run's wall time are each measured, and together fit inside it.
        let phase = |k: &str| {
            *r.phase_seconds
                .get(k)
                .unwrap_or_else(|| panic!("{}: no {k} in {:?}", r.run_id, r.phase_seconds))
        };
        let parts = r.train_seconds
            + ["evaluation", "latency", "analysis", "save"]
                .iter()
                .map(|k| phase(k))
                .sum::<f64>();
        assert!(phase("evaluation") > 0.0 && phase("latency") > 0.0);
        assert!(
            parts <= phase("wall"),
            "{}: {parts} > {:?}",
            r.run_id,
            r.phase_seconds
        );
        if r.method == "lora" {
            assert!(
                r.latency_ms.contains_key("merged"),
                "LoRA records merged latency"
            );
        }
    }
    assert_eq!(chance_of_task.len(), 2);
    let report = peftbench_reports::write_report(&dir, &tmp.path().join("report")).unwrap();
    assert_eq!(report.records, total);
    let md = std::fs::read_to_string(&report.report).unwrap();
    assert!(
        md.contains("Chance on **agreement**: pair_accuracy 0.5000"),
        "{md}"
    );
}

#[test]
fn nan_loss_marks_the_run_diverged_and_the_grid_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let text = SUITE.replace(
        "[methods.lora]\nlr = 5e-3",
        "[methods.lora]\nlr = 1e38\nmax_grad_norm = 0.0",
    );
    let suite = Suite::parse(&text, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let results = tmp.path().join("results");
    let s = run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        Shard { index: 0, count: 1 },
    )
    .unwrap();
    assert_eq!(s.ran, suite.runs().len());
    let records = peftbench_reports::load::load_records(&results.join("tiny/runs")).unwrap();
    let lora: Vec<_> = records.iter().filter(|r| r.method == "lora").collect();
    assert!(
        lora.iter()
            .all(|r| matches!(r.status, peftbench_reports::RunStatus::Diverged { .. })),
        "{:?}",
        lora.iter().map(|r| &r.status).collect::<Vec<_>>()
    );
    assert!(records
        .iter()
        .filter(|r| r.method == "adapter")
        .all(|r| r.status == peftbench_reports::RunStatus::Ok));
}

/// `head_lr` reaches the head: at a vanishing rate the head-only run's dev metrics never move;
/// set equal to `lr` it changes nothing.
#[test]
fn head_lr_sets_the_task_heads_own_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let spec = suite
        .runs()
        .into_iter()
        .find(|r| r.method.name() == "head_only" && r.task == "polarity" && r.seed == 0)
        .unwrap();
    let run = |head_lr: Option<f64>| {
        let mut s = spec.clone();
        s.optim.head_lr = head_lr;
        let r = peftbench_harness::run(&s, &base, &tasks["polarity"], tmp.path());
        assert_eq!(r.status, peftbench_reports::RunStatus::Ok, "{:?}", r.status);
        // The evaluations only (loss-only points carry no metrics).
        r.curve
            .iter()
            .filter(|p| !p.metrics.is_empty())
            .map(|p| p.metrics.clone())
            .collect::<Vec<_>>()
    };
    let default = run(None);
    assert_eq!(run(Some(spec.optim.lr)), default);
    let frozen = run(Some(1e-30));
    assert!(frozen.len() >= 2, "{frozen:?}");
    assert!(frozen.iter().all(|m| m == &frozen[0]), "{frozen:?}");
    assert_ne!(frozen, default, "the head learns at the method's rate");
}

/// LoRA+ in the optimizer: on the first AdamW step (each element moves by about the rate),
/// B's largest move is `loraplus_lr_ratio` times A's.
#[test]
fn lora_plus_moves_b_at_the_ratio_times_as_its_rate() {
    use peftbench_harness::optim::{AdamW, OptimConfig};
    use peftbench_methods::{AttachContext, LoraConfig, LoraPlusConfig};
    let mut m = common::tiny_model("bert", 4);
    let cfg = MethodConfig::LoraPlus(LoraPlusConfig(LoraConfig {
        rank: 2,
        loraplus_lr_ratio: Some(8.0),
        ..Default::default()
    }));
    let method = cfg.attach(&mut AttachContext::new(&mut m, 4)).unwrap();
    // B starts at zero, which leaves A without a gradient: move B off zero first.
    let mut init = peftbench_backbone::Initializer::new(9);
    for (name, v) in method.params().entries() {
        if name.ends_with(".lora_B") {
            v.set(&init.normal(v.shape(), 0.1, v.device()).unwrap())
                .unwrap();
        }
    }
    let before = method.params().snapshot().unwrap();
    let x = peftbench_backbone::pad_rows(&[vec![3, 5, 7, 9], vec![4, 6, 8]], None, 0, &Device::Cpu)
        .unwrap();
    let loss = m
        .forward(&x, method.as_ref())
        .unwrap()
        .hidden
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let optim = OptimConfig {
        lr: 1e-3,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        // |Δ| = rate · |g| / (|g| + eps): a tiny eps makes every step the rate itself.
        eps: 1e-20,
        ..Default::default()
    };
    let mut opt = AdamW::with_groups(method.lr_groups(), optim).unwrap();
    opt.accumulate(&grads).unwrap();
    opt.step(1e-3).unwrap();
    let mut largest = std::collections::HashMap::new();
    for (name, v) in method.params().entries() {
        let d = common::max_abs_diff(v.as_tensor(), &before[name]);
        let kind = if name.ends_with(".lora_B") { "B" } else { "A" };
        let e = largest.entry(kind).or_insert(0f32);
        *e = e.max(d);
    }
    let ratio = largest["B"] / largest["A"];
    assert!((ratio - 8.0).abs() < 0.01, "B moved {ratio}× as far as A");
}

/// `dtype = "bf16"` on the CPU: the frozen projections' products run in bf16 where a kernel
/// exists (the record names it) and the run trains to the f32 run's scores within bf16
/// rounding; without a kernel (or under the composite kernels) the run is f32 and its record
/// says bf16 was asked.
#[test]
fn bf16_on_the_cpu_runs_the_frozen_products_in_bf16_and_records_which_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let suite = Suite::parse(SUITE, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    let spec = suite
        .runs()
        .into_iter()
        .find(|r| {
            r.method.name() == "lora" && r.task == "polarity" && r.seed == 0 && !r.random_init
        })
        .unwrap();
    let f32_run = peftbench_harness::run(&spec, &base, &tasks["polarity"], tmp.path());
    let mut s = spec.clone();
    s.train.dtype = peftbench_harness::Precision::Bf16;
    let bf16_run = peftbench_harness::run(&s, &base, &tasks["polarity"], tmp.path());
    assert_eq!(
        bf16_run.status,
        peftbench_reports::RunStatus::Ok,
        "{:?}",
        bf16_run.status
    );
    let fused = peftbench_backbone::kernels::fused_on(candle_core::DType::F32, &Device::Cpu);
    match peftbench_backbone::bf16_gemm::best().filter(|_| fused) {
        Some(k) => {
            assert_eq!(bf16_run.env.dtype, "bf16");
            assert!(
                bf16_run.env.kernels.contains(k.name()),
                "{}",
                bf16_run.env.kernels
            );
            // Not the f32 run bit for bit, but its loss curve within bf16 rounding.
            let losses = |r: &peftbench_reports::RunRecord| -> Vec<f64> {
                r.curve.iter().map(|p| p.train_loss).collect()
            };
            let (a, b) = (losses(&f32_run), losses(&bf16_run));
            assert_ne!(a, b, "the bf16 products did not run");
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() < 0.02 * x.abs().max(1.0),
                    "losses {a:?} vs {b:?}"
                );
            }
        }
        None => assert!(
            bf16_run.env.dtype.starts_with("f32 (bf16 asked"),
            "{}",
            bf16_run.env.dtype
        ),
    }
}

/// `packing = true` on a classification task: the same examples in fewer rows (prompt tuning's
/// virtual tokens opening each), so the loss curve within f32 rounding of the padded run's
/// and the dev metrics (evaluated packed too) equal; the switch changes the run's hash.
#[test]
fn packing_a_classification_run_keeps_its_curve_and_scores() {
    use peftbench_harness::data::{pack_text_batch, Batch, Example};
    let tmp = tempfile::tempdir().unwrap();
    let base = base(tmp.path());
    let text = format!("{SUITE}\n[methods.prompt_tuning]\nlr = 1e-2\n");
    let suite = Suite::parse(&text, "tiny.toml").unwrap();
    let tasks = tasks(&suite, &base);
    // Every third sentence cut to a third (its label kept: the runs are compared, not
    // scored), so rows have room for more than one example.
    let mut task = tasks["polarity"].clone();
    for set in [&mut task.train, &mut task.dev] {
        for e in set.iter_mut().step_by(3) {
            if let Example::Text { ids, types, .. } = e {
                let keep = ids.len().div_ceil(3);
                ids.truncate(keep);
                types.truncate(keep);
            }
        }
    }
    let first: Vec<&Example> = task.train.iter().take(32).collect();
    let rows = |b: Batch| match b {
        Batch::Text { inputs, .. } => inputs.input_ids.dim(0).unwrap(),
        _ => unreachable!(),
    };
    let packed_rows = rows(pack_text_batch(&first, 0, 0, &Device::Cpu).unwrap());
    assert!(packed_rows < 32, "{packed_rows} rows for 32 sentences");
    for method in ["lora", "prompt_tuning"] {
        let spec = suite
            .runs()
            .into_iter()
            .find(|r| {
                r.method.name() == method && r.task == "polarity" && r.seed == 0 && !r.random_init
            })
            .unwrap();
        let padded = peftbench_harness::run(&spec, &base, &task, tmp.path());
        assert_eq!(
            padded.status,
            peftbench_reports::RunStatus::Ok,
            "{:?}",
            padded.status
        );
        let mut s = spec.clone();
        s.train.packing = true;
        assert_ne!(s.config_hash(), spec.config_hash());
        let packed = peftbench_harness::run(&s, &base, &task, tmp.path());
        assert_eq!(
            packed.status,
            peftbench_reports::RunStatus::Ok,
            "{:?}",
            packed.status
        );
        assert_eq!(packed.curve.len(), padded.curve.len());
        for (a, b) in packed.curve.iter().zip(&padded.curve) {
            assert!(
                (a.train_loss - b.train_loss).abs() <= 1e-4 * b.train_loss.abs().max(1.0),
                "{method} step {}: loss {} packed, {} padded",
                a.step,
                a.train_loss,
                b.train_loss
            );
            assert_eq!(
                a.metrics.keys().collect::<Vec<_>>(),
                b.metrics.keys().collect::<Vec<_>>()
            );
            for (k, v) in &a.metrics {
                assert!(
                    (v - b.metrics[k]).abs() <= 1e-4,
                    "step {} {k}: {v} vs {}",
                    a.step,
                    b.metrics[k]
                );
            }
        }
    }
}
