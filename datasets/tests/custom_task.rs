//! A task declared as data (the shape a suite TOML would have) loads like a built-in.

use std::fs;

use peftbench_datasets::{load_text_task, GlueMetric, Label, LoadOptions, Split, TextTaskSpec};

#[test]
fn custom_classification_task_from_serde() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("nli")).unwrap();
    // No header, 5 columns, label in the middle, three string classes.
    fs::write(
        dir.path().join("nli/train.tsv"),
        "x1\tA man sleeps.\tneutral\tA person rests.\tmeta\n\
         x2\tA dog runs.\tcontradiction\tA cat sits.\tmeta\n\
         x3\tShe sings \"loudly\".\tentailment\tShe sings.\tmeta\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("nli/dev.tsv"),
        "d1\tIt rains.\tentailment\tIt is wet.\tmeta\n",
    )
    .unwrap();
    let value = serde_json::json!({
        "name": "tiny-nli",
        "train": "nli/train.tsv",
        "dev": "nli/dev.tsv",
        "columns": 5,
        "text_a": 1,
        "text_b": 3,
        "label": 2,
        "target": { "kind": "classes", "names": ["entailment", "neutral", "contradiction"] },
        "metric": "f1_accuracy"
    });
    let spec: TextTaskSpec = serde_json::from_value(value).unwrap();
    assert!(!spec.header, "header defaults to false");
    assert_eq!(spec.metric(), GlueMetric::F1Accuracy);
    assert_eq!(spec.num_classes(), Some(3));
    let spec = spec.with_root(dir.path());

    let train = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap();
    let labels: Vec<Label> = train.examples.iter().map(|e| e.label).collect();
    assert_eq!(labels, [Label::Class(1), Label::Class(2), Label::Class(0)]);
    assert_eq!(train.examples[2].text_a, "She sings \"loudly\".");
    assert_eq!(train.examples[0].text_b.as_deref(), Some("A person rests."));
    let dev = load_text_task(&spec, Split::Dev, &LoadOptions::strict()).unwrap();
    assert_eq!(dev.examples.len(), 1);
}

#[test]
fn custom_regression_task_defaults_to_pearson_spearman() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("r.tsv"),
        "score\ttext\n-0.5\tmeh\n1\tgreat\n",
    )
    .unwrap();
    let value = serde_json::json!({
        "name": "sentiment-score",
        "train": dir.path().join("r.tsv"),
        "dev": dir.path().join("r.tsv"),
        "header": true,
        "columns": 2,
        "text_a": 1,
        "label": 0,
        "target": { "kind": "regression", "min": -1.0, "max": 1.0 }
    });
    let spec: TextTaskSpec = serde_json::from_value(value).unwrap();
    assert_eq!(spec.metric(), GlueMetric::PearsonSpearman);
    let ok = load_text_task(&spec, Split::Dev, &LoadOptions::strict()).unwrap();
    let scores: Vec<f32> = ok.examples.iter().filter_map(|e| e.label.score()).collect();
    assert_eq!(scores, [-0.5, 1.0]);
}

#[test]
fn unknown_fields_and_inconsistent_metric_are_rejected() {
    let base = serde_json::json!({
        "name": "t", "train": "a", "dev": "b", "columns": 2, "text_a": 0, "label": 1,
        "target": { "kind": "classes", "names": ["0", "1"] }
    });
    let mut typo = base.clone();
    typo["lable"] = 1.into();
    assert!(serde_json::from_value::<TextTaskSpec>(typo).is_err());
    let mut wrong = base.clone();
    wrong["metric"] = "pearson_spearman".into();
    let err = serde_json::from_value::<TextTaskSpec>(wrong).unwrap_err();
    assert!(
        err.to_string().contains("needs a regression target"),
        "{err}"
    );
    assert!(serde_json::from_value::<TextTaskSpec>(base).is_ok());
}
