//! The command line: subcommands are listed, `methods` shows all eight and the head-only
//! control, bad suites fail clearly.

use std::process::Command;

fn peftbench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_peftbench"))
        .args(args)
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

#[test]
fn help_lists_the_subcommands() {
    let (ok, text) = peftbench(&["--help"]);
    assert!(ok, "{text}");
    for sub in ["run", "report", "methods", "pretrain"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(sub)),
            "missing `{sub}` in:\n{text}"
        );
    }
}

#[test]
fn methods_lists_all_eight_and_the_head_only_control_with_knobs_and_formulas() {
    let (ok, text) = peftbench(&["methods"]);
    assert!(ok, "{text}");
    for (name, knob) in [
        ("lora", "rank="),
        ("adalora", "target_r="),
        ("adapter", "bottleneck="),
        ("prefix_tuning", "encoder_hidden_size="),
        ("prompt_tuning", "num_virtual_tokens="),
        ("p_tuning ", "encoder_hidden_size="),
        ("p_tuning_v2", "num_virtual_tokens="),
        ("full_finetune", "every backbone weight"),
        ("head_only", "only the task head trains"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no `{name}` in:\n{text}"));
        assert!(line.contains(knob), "{line}");
    }
}

#[test]
fn a_bad_suite_file_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"x\"\nmodel = \"minilm\"\nseeds = [0\n").unwrap();
    let (ok, text) = peftbench(&[
        "run",
        "--config",
        path.to_str().unwrap(),
        "--results",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(text.contains("bad.toml:"), "{text}");
}
