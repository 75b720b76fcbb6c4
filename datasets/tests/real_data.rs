//! Loads the real shared data sets in place and checks counts against their SOURCE.md.
//! Each test prints a message and returns if the shared folder is absent.

use std::path::PathBuf;

use peftbench_datasets::{
    load_alpaca, load_preferences, load_text, load_text_task, shared_datasets_root,
    split_train_val, subset, DataError, Label, LoadOptions, Split, TextExample, TextTaskSpec,
};

fn root() -> Option<PathBuf> {
    let root = shared_datasets_root().filter(|p| p.is_dir());
    if root.is_none() {
        eprintln!("SKIPPED: shared datasets folder not found (set PEFTBENCH_DATA)");
    }
    root
}

fn load(task: &str, split: Split) -> Vec<TextExample> {
    let spec = TextTaskSpec::glue(task, &root().unwrap().join("glue")).unwrap();
    let loaded = load_text_task(&spec, split, &LoadOptions::strict()).unwrap();
    assert!(loaded.skipped.is_empty());
    loaded.examples
}

fn class_counts(examples: &[TextExample], n: usize) -> Vec<usize> {
    let mut counts = vec![0; n];
    for ex in examples {
        counts[ex.label.class().expect("class label")] += 1;
    }
    counts
}

#[test]
fn sst2() {
    if root().is_none() {
        return;
    }
    let train = load("SST-2", Split::Train);
    assert_eq!(train.len(), 67_349);
    assert_eq!(class_counts(&train, 2), [29_780, 37_569]);
    assert_eq!(
        train[0].text_a,
        "hide new secretions from the parental units"
    );
    assert!(train
        .iter()
        .all(|e| e.text_b.is_none() && e.text_a == e.text_a.trim()));
    let dev = load("sst2", Split::Dev);
    assert_eq!(dev.len(), 872);
    assert_eq!(class_counts(&dev, 2), [428, 444]);
}

#[test]
fn rte() {
    if root().is_none() {
        return;
    }
    let train = load("rte", Split::Train);
    assert_eq!(train.len(), 2_490);
    // 0 = entailment, 1 = not_entailment.
    assert_eq!(class_counts(&train, 2), [1_249, 1_241]);
    assert_eq!(train[0].label, Label::Class(1));
    assert_eq!(
        train[0].text_b.as_deref(),
        Some("Weapons of Mass Destruction Found in Iraq.")
    );
    let dev = load("RTE", Split::Dev);
    assert_eq!(dev.len(), 277);
    assert_eq!(class_counts(&dev, 2), [146, 131]);
}

#[test]
fn cola() {
    if root().is_none() {
        return;
    }
    let train = load("CoLA", Split::Train);
    assert_eq!(train.len(), 8_551);
    assert_eq!(class_counts(&train, 2), [2_528, 6_023]);
    // No header: the very first line is an example.
    assert_eq!(
        train[0].text_a,
        "Our friends won't buy this analysis, let alone the next one we propose."
    );
    let dev = load("cola", Split::Dev);
    assert_eq!(dev.len(), 1_043);
    assert_eq!(class_counts(&dev, 2), [322, 721]);
}

#[test]
fn stsb() {
    if root().is_none() {
        return;
    }
    let mean = |xs: &[TextExample]| {
        xs.iter()
            .map(|e| e.label.score().unwrap() as f64)
            .sum::<f64>()
            / xs.len() as f64
    };
    let train = load("STS-B", Split::Train);
    assert_eq!(train.len(), 5_749);
    assert_eq!(train[0].label, Label::Score(5.0));
    assert_eq!(train[0].text_a, "A plane is taking off.");
    assert!((mean(&train) - 2.70).abs() < 0.01, "{}", mean(&train));
    let dev = load("stsb", Split::Dev);
    assert_eq!(dev.len(), 1_500);
    assert!((mean(&dev) - 2.36).abs() < 0.01, "{}", mean(&dev));
}

#[test]
fn glue_limit_and_subset() {
    let Some(root) = root() else { return };
    let spec = TextTaskSpec::glue("sst2", &root.join("glue")).unwrap();
    let opts = LoadOptions::strict().with_limit(100);
    let head = load_text_task(&spec, Split::Train, &opts).unwrap();
    assert_eq!(head.examples.len(), 100);
    let all = load("sst2", Split::Train);
    assert_eq!(head.examples[..], all[..100]);
    let a = subset(&all, 2_000, 1);
    assert_eq!(a.len(), 2_000);
    assert_eq!(a, subset(&all, 2_000, 1));
}

#[test]
fn alpaca() {
    let Some(root) = root() else { return };
    let path = root.join("alpaca-5000/alpaca_5000.json");
    let err = load_alpaca(&path, &LoadOptions::strict()).unwrap_err();
    assert!(
        matches!(err, DataError::Malformed { line: 1, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("alpaca_5000.json:1: item 2335: empty output"),
        "{msg}"
    );

    let loaded = load_alpaca(&path, &LoadOptions::skipping()).unwrap();
    assert_eq!(loaded.examples.len(), 4_998);
    assert_eq!(loaded.skipped.len(), 2);
    assert!(loaded.skipped[0].reason.starts_with("item 2335:"));
    assert!(loaded.skipped[1].reason.starts_with("item 4658:"));
    // No placeholder survives normalisation.
    assert!(loaded
        .examples
        .iter()
        .all(|e| !e.input.to_lowercase().contains("noinput")));
    let with_input = loaded
        .examples
        .iter()
        .filter(|e| !e.input.is_empty())
        .count();
    assert!((1_850..1_943).contains(&with_input), "{with_input}");
    let first = &loaded.examples[0];
    assert!(first.prompt().contains("### Input:\nSentence 1:"));
    assert_eq!(first.response(), "No");
}

#[test]
fn hh_rlhf() {
    let Some(root) = root() else { return };
    let path = root.join("hh-rlhf-harmless/test.prompt_chosen_rejected.jsonl");
    let err = load_preferences(&path, &LoadOptions::strict()).unwrap_err();
    assert_eq!(err.line(), Some(87));
    assert!(
        err.to_string().contains(".jsonl:87: chosen is empty"),
        "{err}"
    );

    let loaded = load_preferences(&path, &LoadOptions::skipping()).unwrap();
    assert_eq!(loaded.examples.len(), 2_303);
    let lines: Vec<usize> = loaded.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [87, 517, 926, 1104]);
    assert!(loaded
        .examples
        .iter()
        .all(|p| p.prompt.ends_with("\n\nAssistant:") && p.chosen.starts_with(' ')));
}

#[test]
fn tinyshakespeare() {
    let Some(root) = root() else { return };
    let text = load_text(&root.join("tinyshakespeare/input.txt")).unwrap();
    assert_eq!(text.len(), 1_115_394);
    let (train, val) = split_train_val(&text, 0.1);
    // nanoGPT: int(1115394 * 0.9) = 1003854.
    assert_eq!(train.len(), 1_003_854);
    assert_eq!(val.len(), 1_115_394 - 1_003_854);
}
