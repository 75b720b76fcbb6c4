//! Every committed suite parses and expands into the runs it promises.

use peftbench_harness::Suite;

fn suite(name: &str) -> Suite {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("suites")
        .join(format!("{name}.toml"));
    Suite::from_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn committed_suites_parse_and_cover_the_eight_mission_methods() {
    let mission = [
        "lora",
        "adalora",
        "adapter",
        "prefix_tuning",
        "prompt_tuning",
        "p_tuning",
        "p_tuning_v2",
        "full_finetune",
    ];
    for name in [
        "default",
        "glue-minilm-quick",
        "glue-minilm",
        "objectives-minilm-quick",
        "alpaca-sft-quick",
        "rte-minilm",
        "cola-minilm",
        "hh-minilm",
    ] {
        let s = suite(name);
        assert_eq!(s.name, name);
        let methods: std::collections::BTreeSet<&str> = s
            .methods
            .iter()
            .map(|(m, _)| m.name())
            .filter(|m| *m != "head_only")
            .collect();
        for m in mission {
            assert!(methods.contains(m), "{name} lacks {m}: {methods:?}");
        }
    }
    // glue-minilm-quick runs every method; the default suite every one a Llama-style base
    // takes (BitFit needs biases).
    let names = |name: &str| -> std::collections::BTreeSet<&'static str> {
        suite(name).methods.iter().map(|(m, _)| m.name()).collect()
    };
    let all: std::collections::BTreeSet<&str> = peftbench_methods::MethodConfig::defaults()
        .iter()
        .map(|m| m.name())
        .collect();
    assert_eq!(names("glue-minilm-quick"), all);
    let default = names("default");
    let every: std::collections::BTreeSet<&str> =
        all.iter().copied().filter(|m| *m != "bitfit").collect();
    assert_eq!(default, every);
    // The single-task suites add the head-only floor: one run per seed, budget `none`.
    for name in ["rte-minilm", "cola-minilm"] {
        let runs = suite(name).runs();
        let floor: Vec<_> = runs
            .iter()
            .filter(|r| r.method.name() == "head_only")
            .collect();
        assert_eq!(floor.len(), 1, "{name}");
        assert_eq!(floor[0].budget_label, "none");
    }
}

#[test]
fn glue_suites_have_the_promised_grid() {
    // glue-minilm: 4 tasks × (7 PEFT methods × 2 budgets + full fine-tuning) × 3 seeds.
    assert_eq!(suite("glue-minilm").runs().len(), 4 * (7 * 2 + 1) * 3);
    // glue-minilm-quick: 2 tasks × 16 methods × 2 seeds.
    assert_eq!(suite("glue-minilm-quick").runs().len(), 2 * 16 * 2);
    // default: 3 tasks × (15 methods + the LoRA random-init control), one seed.
    assert_eq!(suite("default").runs().len(), 3 * 16);
}

#[test]
fn a_task_can_override_steps_and_pooling() {
    let s = suite("glue-minilm-quick");
    let runs = s.runs();
    let steps = |task: &str| {
        runs.iter()
            .filter(|r| r.task == task)
            .map(|r| r.train.steps)
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(steps("sst2"), [s.train.steps].into());
    assert_eq!(steps("rte"), [120].into());
    assert!(s
        .tasks
        .iter()
        .all(|t| t.pooling == Some(peftbench_backbone::Pooling::Mean)));

    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("suites/glue-minilm-quick.toml"),
    )
    .unwrap();
    let e = Suite::parse(&text.replace("steps = 120", "steps = 0"), "q.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("q.toml") && e.contains("`rte`: steps must be > 0"),
        "{e}"
    );
    let e = Suite::parse(
        &text.replacen("pooling = \"mean\"", "pooling = \"max\"", 1),
        "q.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("q.toml") && e.contains("max"), "{e}");
}

#[test]
fn a_task_can_override_a_methods_learning_rate() {
    let s = suite("objectives-minilm-quick");
    let lr = |task: &str, method: &str| {
        s.runs()
            .iter()
            .find(|r| r.task == task && r.method.name() == method)
            .map(|r| r.optim.lr)
            .unwrap()
    };
    let suite_lr = |method: &str| {
        s.methods
            .iter()
            .find(|(m, _)| m.name() == method)
            .map(|(_, o)| o.lr)
            .unwrap()
    };
    // CoLA's long run takes LoRA's smaller step; the short tasks keep the suite's.
    assert_eq!(lr("cola", "lora"), 1e-3);
    assert_eq!(lr("stsb", "lora"), suite_lr("lora"));
    assert_ne!(suite_lr("lora"), 1e-3);
    assert_eq!(lr("cola", "adapter"), suite_lr("adapter"));

    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("suites/objectives-minilm-quick.toml"),
    )
    .unwrap();
    let e = Suite::parse(&text.replace("lr = { lora = ", "lr = { lorra = "), "o.toml")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("o.toml") && e.contains("`cola`: lr names `lorra`"),
        "{e}"
    );
    let e = Suite::parse(
        &text.replace("lr = { lora = 1e-3", "lr = { lora = -1e-3"),
        "o.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`cola`: lr for `lora` must be a positive number"),
        "{e}"
    );
}

#[test]
fn a_method_may_give_its_task_head_its_own_rate() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("suites/cola-minilm.toml"),
    )
    .unwrap();
    let with = text.replace(
        "[methods.prompt_tuning]\nlr = 5e-2",
        "[methods.prompt_tuning]\nlr = 5e-2\nhead_lr = 1e-2",
    );
    assert_ne!(with, text, "the suite's prompt-tuning table moved");
    let runs = Suite::parse(&with, "c.toml").unwrap().runs();
    let head_lr = |m: &str| {
        runs.iter()
            .find(|r| r.method.name() == m)
            .map(|r| r.optim.head_lr)
            .unwrap()
    };
    assert_eq!(head_lr("prompt_tuning"), Some(1e-2));
    assert_eq!(head_lr("lora"), None);

    let bad = text.replace(
        "[methods.prompt_tuning]\nlr = 5e-2",
        "[methods.prompt_tuning]\nlr = 5e-2\nhead_lr = 0.0",
    );
    let line = bad.lines().position(|l| l == "head_lr = 0.0").unwrap() + 1;
    let e = Suite::parse(&bad, "c.toml").unwrap_err().to_string();
    assert!(
        e.contains(&format!("c.toml:{line}"))
            && e.contains("methods.prompt_tuning: `head_lr` must be a positive number"),
        "{e}"
    );
}

/// The MRPC worked example: a TSV task declared in a suite loads GLUE's MRPC layout, scores
/// F1 and accuracy, and has an F1 chance level with a standard error.
#[test]
fn the_mrpc_example_suite_loads_glue_mrpc_files() {
    use peftbench_backbone::TextTokenizer;
    use peftbench_harness::objective::Objective;
    let s = suite("mrpc-minilm");
    assert_eq!(
        s.train.selection,
        peftbench_reports::Selection::BestOnValidation
    );
    let task = &s.tasks[0];
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("glue/MRPC");
    std::fs::create_dir_all(&dir).unwrap();
    // GLUE's own header and column order.
    let mut rows = String::from("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n");
    for i in 0..20 {
        let label = u8::from(i % 3 != 0);
        rows.push_str(&format!(
            "{label}\t{i}\t{}\tthe cat sat {i}\ta cat sits {i}\n",
            i + 100
        ));
    }
    std::fs::write(dir.join("train.tsv"), &rows).unwrap();
    std::fs::write(dir.join("dev.tsv"), &rows).unwrap();
    let tok_path = tmp.path().join("tokenizer.json");
    std::fs::write(&tok_path, peftbench_harness::synthetic::tokenizer_json()).unwrap();
    let tok = TextTokenizer::from_file(&tok_path, task.max_len).unwrap();
    let data = peftbench_harness::load_task(task, &tok, tmp.path()).unwrap();
    assert_eq!((data.train.len(), data.dev.len()), (20, 20));
    assert!(matches!(
        data.objective,
        Objective::Classification { num_labels: 2, .. }
    ));
    assert_eq!(data.objective.primary_metric(), "f1");
    let chance =
        peftbench_harness::chance::chance_level(&data.objective, &data.train, &data.dev).unwrap();
    // 13 of 20 are paraphrases: F1 of "always 1" is 2·13/(20+13).
    assert!((chance.value - 26.0 / 33.0).abs() < 1e-12, "{chance:?}");
    assert!(chance.std_error.is_some_and(|se| se > 0.0));
    // A missing file names the path it looked for.
    let e = peftbench_harness::load_task(task, &tok, &tmp.path().join("elsewhere"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("elsewhere/glue/MRPC/train.tsv"), "{e}");
}
