//! Each malformed-input case on small files in a temp dir: the error names the file and
//! the right line, and `skip_bad_rows` skips and records the row instead.

use std::fs;
use std::path::{Path, PathBuf};

use peftbench_datasets::{
    load_alpaca, load_preferences, load_text, load_text_task, DataError, Label, LoadOptions, Split,
    Target, TextTaskSpec,
};

/// Writes `body` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    path
}

/// An RTE-shaped spec (header, 4 columns) reading `path` as its train split.
fn pair_spec(path: &Path) -> TextTaskSpec {
    let mut spec = TextTaskSpec::glue("rte", Path::new("/unused")).unwrap();
    spec.train = path.to_path_buf();
    spec
}

/// An STS-B-shaped spec (header, 3 columns, score last) reading `path`.
fn score_spec(path: &Path) -> TextTaskSpec {
    TextTaskSpec {
        columns: 3,
        text_a: 0,
        text_b: Some(1),
        label: 2,
        train: path.to_path_buf(),
        ..TextTaskSpec::glue("stsb", Path::new("/unused")).unwrap()
    }
}

/// Asserts that `err` is about `path` at `line` and that its message contains `needle`.
fn assert_names(err: &DataError, path: &Path, line: usize, needle: &str) {
    let msg = err.to_string();
    let prefix = format!("{}:{line}: ", path.display());
    assert!(
        msg.starts_with(&prefix),
        "{msg:?} should start with {prefix:?}"
    );
    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
    assert_eq!(err.line(), Some(line));
    assert_eq!(err.path(), Some(path));
}

const RTE_HEADER: &str = "index\tsentence1\tsentence2\tlabel\n";

#[test]
fn tsv_wrong_column_count() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "{RTE_HEADER}0\tA \"quoted\" premise.\tA hypothesis.\tentailment\n1\tonly two\tnot_entailment\n2\ta\tb\tnot_entailment\n"
    );
    let path = write(dir.path(), "train.tsv", &body);
    let spec = pair_spec(&path);
    let err = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 3, "expected 4 columns, found 3");
    assert!(matches!(err, DataError::Malformed { .. }));

    let ok = load_text_task(&spec, Split::Train, &LoadOptions::skipping()).unwrap();
    assert_eq!(ok.examples.len(), 2);
    // Quoting is off: the quotes stay in the text and do not swallow the tab.
    assert_eq!(ok.examples[0].text_a, "A \"quoted\" premise.");
    assert_eq!(ok.examples[1].label, Label::Class(1));
    assert_eq!(ok.skipped.len(), 1);
    assert_eq!(ok.skipped[0].line, 3);
    assert_eq!(ok.skipped[0].reason, "expected 4 columns, found 3");
}

#[test]
fn tsv_unknown_label() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{RTE_HEADER}0\ta\tb\tcontradiction\n1\ta\tb\tentailment\n");
    let path = write(dir.path(), "train.tsv", &body);
    let spec = pair_spec(&path);
    let err = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap_err();
    assert_names(
        &err,
        &path,
        2,
        "unknown label \"contradiction\" (expected one of: entailment, not_entailment)",
    );
    match &err {
        DataError::UnknownLabel { label, known, .. } => {
            assert_eq!(label, "contradiction");
            assert_eq!(known.len(), 2);
        }
        other => panic!("wrong variant {other:?}"),
    }
    let ok = load_text_task(&spec, Split::Train, &LoadOptions::skipping()).unwrap();
    assert_eq!(ok.examples.len(), 1);
    assert_eq!(ok.skipped.len(), 1);
    assert_eq!(ok.skipped[0].line, 2);
    assert!(ok.skipped[0].reason.contains("contradiction"));
}

#[test]
fn tsv_bad_scores() {
    let dir = tempfile::tempdir().unwrap();
    let body = "s1\ts2\tscore\na\tb\t6.5\nc\td\tabc\ne\tf\t-0.1\ng\th\t2.500\ni\tj\tNaN\n";
    let path = write(dir.path(), "train.tsv", body);
    let spec = score_spec(&path);
    let err = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 2, "score 6.5 is outside [0, 5]");

    let ok = load_text_task(&spec, Split::Train, &LoadOptions::skipping()).unwrap();
    assert_eq!(ok.examples.len(), 1);
    assert_eq!(ok.examples[0].label, Label::Score(2.5));
    let lines: Vec<usize> = ok.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [2, 3, 4, 6]);
    assert_eq!(ok.skipped[1].reason, "score \"abc\" is not a number");
    assert!(ok.skipped[3].reason.contains("NaN"));

    // The non-numeric case on its own, strict: named at its own line.
    let path = write(
        dir.path(),
        "dev.tsv",
        "s1\ts2\tscore\na\tb\t1.0\nc\td\tfive\n",
    );
    let spec = TextTaskSpec {
        dev: path.clone(),
        ..spec
    };
    let err = load_text_task(&spec, Split::Dev, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 3, "score \"five\" is not a number");
}

#[test]
fn tsv_bom_at_file_start() {
    let dir = tempfile::tempdir().unwrap();
    // No header and the label first: a BOM left in place would make "\u{feff}1" unknown.
    let path = write(
        dir.path(),
        "train.tsv",
        "\u{feff}1\tgood movie\n0\tbad movie\n",
    );
    let spec = TextTaskSpec {
        header: false,
        columns: 2,
        text_a: 1,
        label: 0,
        train: path,
        ..TextTaskSpec::glue("sst2", Path::new("/unused")).unwrap()
    };
    let ok = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap();
    assert_eq!(ok.examples.len(), 2);
    assert_eq!(ok.examples[0].label, Label::Class(1));
    assert_eq!(ok.examples[0].text_a, "good movie");

    // With a header the BOM would otherwise sit in the header; data still loads.
    let path = write(dir.path(), "dev.tsv", "\u{feff}sentence\tlabel\nfine \t1\n");
    let spec = TextTaskSpec {
        dev: path,
        ..TextTaskSpec::glue("sst2", Path::new("/unused")).unwrap()
    };
    let ok = load_text_task(&spec, Split::Dev, &LoadOptions::strict()).unwrap();
    assert_eq!(ok.examples[0].text_a, "fine");
}

#[test]
fn tsv_line_numbers_survive_blank_lines_and_crlf() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{RTE_HEADER}0\ta\tb\tentailment\r\n\r\n1\ta\tb\tnope\r\n");
    let path = write(dir.path(), "train.tsv", &body);
    let spec = pair_spec(&path);
    let err = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 4, "unknown label \"nope\"");
}

#[test]
fn tsv_empty_file_and_header_only() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("empty.tsv", ""),
        ("header.tsv", RTE_HEADER),
        ("bom.tsv", "\u{feff}"),
    ] {
        let path = write(dir.path(), name, body);
        let err =
            load_text_task(&pair_spec(&path), Split::Train, &LoadOptions::skipping()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{name}: {err:?}");
        assert!(err
            .to_string()
            .starts_with(&format!("{}: ", path.display())));
    }
}

#[test]
fn tsv_bad_header_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "train.tsv", "a\tb\n0\ta\tb\tentailment\n");
    let err =
        load_text_task(&pair_spec(&path), Split::Train, &LoadOptions::skipping()).unwrap_err();
    assert_names(&err, &path, 1, "header: expected 4 columns, found 2");

    let missing = dir.path().join("nope.tsv");
    let err =
        load_text_task(&pair_spec(&missing), Split::Train, &LoadOptions::strict()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().contains("nope.tsv"), "{err}");
}

#[test]
fn tsv_limit_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{RTE_HEADER}0\ta\tb\tentailment\n1\ta\tb\tentailment\n2\tbroken\n");
    let path = write(dir.path(), "train.tsv", &body);
    // The broken row lies past the limit, so it is never read.
    let opts = LoadOptions::strict().with_limit(2);
    let ok = load_text_task(&pair_spec(&path), Split::Train, &opts).unwrap();
    assert_eq!(ok.examples.len(), 2);
    let opts = LoadOptions::strict().with_limit(0);
    let ok = load_text_task(&pair_spec(&path), Split::Train, &opts).unwrap();
    assert!(ok.examples.is_empty());
}

#[test]
fn tsv_invalid_spec_is_config_error() {
    let spec = TextTaskSpec {
        target: Target::Classes {
            names: vec!["a".into()],
        },
        ..TextTaskSpec::glue("rte", Path::new("/unused")).unwrap()
    };
    let err = load_text_task(&spec, Split::Train, &LoadOptions::strict()).unwrap_err();
    assert!(matches!(err, DataError::Config { .. }), "{err:?}");
}

/// A pretty-printed Alpaca file: item 0 starts on line 2, item 1 on line 7, item 2 on line 12.
fn alpaca_body(item1: &str) -> String {
    format!(
        "[\n  {{\n    \"instruction\": \"Say hi\",\n    \"input\": \"<No Input>\",\n    \"output\": \"hi\"\n  }},\n  {item1},\n  {{\n    \"instruction\": \"Add\",\n    \"input\": \"1 2\",\n    \"output\": \"3\"\n  }}\n]\n"
    )
    .replace("  {{", "  {")
}

const GOOD_ITEM1: &str =
    "{\n    \"instruction\": \"x\",\n    \"input\": \"\",\n    \"output\": \"y\"\n  }";

#[test]
fn alpaca_bad_json_is_fatal_even_when_skipping() {
    let dir = tempfile::tempdir().unwrap();
    let broken = "{\n    \"instruction\": \"x\",\n    \"input\": \"\"\n    \"output\": \"y\"\n  }";
    let path = write(dir.path(), "a.json", &alpaca_body(broken));
    for opts in [LoadOptions::strict(), LoadOptions::skipping()] {
        // A JSON array cannot be resynchronised after a syntax error, so this is fatal.
        let err = load_alpaca(&path, &opts).unwrap_err();
        assert_names(&err, &path, 10, "invalid JSON");
    }
}

#[test]
fn alpaca_item_problems_name_index_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "{\n    \"instruction\": \"x\",\n    \"input\": \"\"\n  }",
            "item 1: missing key \"output\"",
        ),
        (
            "{\n    \"instruction\": \"x\",\n    \"input\": 3,\n    \"output\": \"y\"\n  }",
            "item 1: key \"input\" is not a string: 3",
        ),
        (
            "{\n    \"instruction\": \"x\",\n    \"input\": \"\",\n    \"output\": \"  \"\n  }",
            "item 1: empty output",
        ),
        ("\"just a string\"", "item 1: expected a JSON object"),
    ];
    for (item1, needle) in cases {
        let path = write(dir.path(), "a.json", &alpaca_body(item1));
        let err = load_alpaca(&path, &LoadOptions::strict()).unwrap_err();
        assert_names(&err, &path, 7, needle);

        let ok = load_alpaca(&path, &LoadOptions::skipping()).unwrap();
        assert_eq!(ok.examples.len(), 2, "{needle}");
        assert_eq!(ok.skipped.len(), 1);
        assert_eq!(ok.skipped[0].line, 7);
        assert_eq!(ok.skipped[0].reason, needle);
        // The placeholder input of item 0 was normalised to "".
        assert_eq!(ok.examples[0].input, "");
        assert!(!ok.examples[0].prompt().contains("### Input:"));
        assert!(ok.examples[1]
            .prompt()
            .contains("### Input:\n1 2\n\n### Response:\n"));
    }
    let path = write(dir.path(), "a.json", &alpaca_body(GOOD_ITEM1));
    assert_eq!(
        load_alpaca(&path, &LoadOptions::strict())
            .unwrap()
            .examples
            .len(),
        3
    );
}

#[test]
fn alpaca_empty_and_bom() {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [("e.json", ""), ("ws.json", " \n "), ("arr.json", "[]")] {
        let path = write(dir.path(), name, body);
        let err = load_alpaca(&path, &LoadOptions::skipping()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{name}: {err:?}");
    }
    let path = write(
        dir.path(),
        "bom.json",
        "\u{feff}[{\"instruction\":\"a\",\"input\":\"\",\"output\":\"b\"}]",
    );
    assert_eq!(
        load_alpaca(&path, &LoadOptions::strict())
            .unwrap()
            .examples
            .len(),
        1
    );
    let path = write(dir.path(), "obj.json", "{\"instruction\":\"a\"}");
    let err = load_alpaca(&path, &LoadOptions::skipping()).unwrap_err();
    assert_names(&err, &path, 1, "invalid JSON");
}

#[test]
fn jsonl_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let body = concat!(
        "\u{feff}{\"prompt\":\"P\",\"chosen\":\" a\",\"rejected\":\" b\"}\n",
        "{\"prompt\":\"P\",\"chosen\":\" a\",\n",
        "\n",
        "{\"prompt\":\"P\",\"rejected\":\" b\"}\n",
        "{\"prompt\":\"P\",\"chosen\":\" \",\"rejected\":\" b\"}\n",
        "{\"prompt\":\"P\",\"chosen\":\" a\",\"rejected\":\"\\n\"}\n",
        "{\"prompt\":\"\",\"chosen\":\" c\",\"rejected\":\" d\"}\n",
    );
    let path = write(dir.path(), "p.jsonl", body);
    let err = load_preferences(&path, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 2, "invalid JSON");

    let ok = load_preferences(&path, &LoadOptions::skipping()).unwrap();
    assert_eq!(ok.examples.len(), 2);
    assert_eq!(ok.examples[0].prompt, "P", "BOM stripped");
    assert_eq!(ok.examples[0].chosen, " a", "kept verbatim");
    let lines: Vec<usize> = ok.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [2, 4, 5, 6]);
    assert_eq!(ok.skipped[1].reason, "missing key \"chosen\"");
    assert_eq!(ok.skipped[2].reason, "chosen is empty or whitespace-only");
    assert_eq!(ok.skipped[3].reason, "rejected is empty or whitespace-only");

    // Each problem on its own, strict, at its own line.
    let path = write(
        dir.path(),
        "q.jsonl",
        "{\"prompt\":\"P\",\"chosen\":\" a\",\"rejected\":\" b\"}\n\n{\"prompt\":\"P\",\"chosen\":\" a\"}\n",
    );
    let err = load_preferences(&path, &LoadOptions::strict()).unwrap_err();
    assert_names(&err, &path, 3, "missing key \"rejected\"");
}

#[test]
fn jsonl_and_text_empty() {
    let dir = tempfile::tempdir().unwrap();
    for body in ["", "\n\n  \n"] {
        let path = write(dir.path(), "p.jsonl", body);
        let err = load_preferences(&path, &LoadOptions::skipping()).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        let err = load_text(&path).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err:?}");
        assert!(err.to_string().contains("p.jsonl"));
    }
    let path = write(dir.path(), "t.txt", "\u{feff}To be");
    assert_eq!(load_text(&path).unwrap(), "To be");
}

#[test]
fn tsv_line_numbers_with_many_blank_lines_and_lf() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!("{RTE_HEADER}\n0\ta\tb\tentailment\n\n\n\n1\ta\tb\tnope\n2\tx\n");
    let path = write(dir.path(), "train.tsv", &body);
    let ok = load_text_task(&pair_spec(&path), Split::Train, &LoadOptions::skipping()).unwrap();
    let lines: Vec<usize> = ok.skipped.iter().map(|s| s.line).collect();
    assert_eq!(lines, [7, 8]);
}
