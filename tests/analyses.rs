//! The LoRA paper's §7 analyses end to end on the synthetic base: a suite asks for them, LoRA
//! and full fine-tuning runs record ΔW's effective rank and amplification, and the report
//! draws and describes the subspace similarity of the saved adapters.

mod common;

use common::{synthetic_base, synthetic_tasks};
use peftbench_harness::subspace::subspace_comparisons;
use peftbench_harness::{grid, run_grid, Shard, Suite};
use peftbench_reports::analyses::SubspaceKind;
use peftbench_reports::{load_records, RunStatus};

// LoRA on query and value of the synthetic base: 64·(64+64) + 64·(64+32) = 224 per rank and
// layer, 448·r in all; r = 2 and r = 8.
const SUITE: &str = r#"
name = "analyses"
model = "synthetic"
seeds = [0, 1]
budgets = ["896", "3584"]
max_budget_deviation = 0.15
analyses = ["subspace_similarity", "amplification", "effective_rank"]

[train]
steps = 6
batch_size = 8
eval_every = 3
eval_batch_size = 32

[methods.lora]
lr = 1e-2
target_modules = ["query", "value"]

[methods.adapter]
lr = 5e-3

[methods.full_finetune]
lr = 1e-3

[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"
"#;

#[test]
fn runs_record_update_analyses_and_the_report_draws_subspace_similarity() {
    let tmp = tempfile::tempdir().unwrap();
    let base = synthetic_base(tmp.path());
    let suite = Suite::parse(SUITE, "analyses.toml").unwrap();
    let tasks = synthetic_tasks(&suite, &base);
    let results = tmp.path().join("results");
    run_grid(&suite, &base, &tasks, &results, Shard::ALL).unwrap();
    let runs = grid::runs_dir(&results, "analyses");
    let records = load_records(&runs).unwrap();
    assert!(!records.is_empty());
    for r in &records {
        assert_eq!(r.status, RunStatus::Ok, "{}: {:?}", r.run_id, r.status);
        let a = r.update_analysis.as_ref();
        match r.method.as_str() {
            // An adapter's update is not a weight matrix: nothing to analyse.
            "adapter" => assert!(a.is_none(), "{}", r.run_id),
            "lora" => {
                let a = a.unwrap_or_else(|| panic!("{}: no analysis", r.run_id));
                let rank = r.knob.as_ref().unwrap().1;
                // Only the adapted matrices changed; each ΔW = B·A has rank ≤ r.
                assert_eq!(a.matrices.len(), 4, "{}", r.run_id);
                for m in &a.matrices {
                    assert!(
                        m.matrix.ends_with(".query") || m.matrix.ends_with(".value"),
                        "{}",
                        m.matrix
                    );
                    assert!(m.effective_rank >= 1 && m.effective_rank <= rank, "{m:?}");
                    let top = m.singular_values[0];
                    assert!(
                        m.singular_values
                            .iter()
                            .skip(rank)
                            .all(|s| *s <= 1e-4 * top),
                        "{}: more than r non-zero singular values: {:?}",
                        m.matrix,
                        m.singular_values
                    );
                    let amp = m.amplification.as_ref().unwrap();
                    assert_eq!(amp.rank, rank);
                    assert!(amp.factor.is_finite() && amp.factor > 0.0, "{amp:?}");
                    assert!(amp.projected_norm <= amp.base_top_norm * (1.0 + 1e-9));
                }
            }
            "full_finetune" => {
                let a = a.unwrap_or_else(|| panic!("{}: no analysis", r.run_id));
                // Every projection of both layers moved.
                assert_eq!(a.matrices.len(), 2 * 7, "{:?}", a.matrices);
                assert!(a.matrices.iter().all(|m| m.delta_norm > 0.0));
            }
            other => panic!("unexpected method {other}"),
        }
    }
    let (comparisons, problems) = subspace_comparisons(&runs, &records);
    assert!(problems.is_empty(), "{problems:?}");
    // r=2 vs r=8 at seed 0, and seed 0 vs seed 1 at r=8; each for A and for ΔW.
    let labels: Vec<(&str, SubspaceKind)> = comparisons
        .iter()
        .map(|c| (c.label.as_str(), c.kind))
        .collect();
    assert_eq!(
        labels,
        [
            ("r=2 vs r=8, seed 0", SubspaceKind::A),
            ("r=2 vs r=8, seed 0", SubspaceKind::Update),
            ("seed 0 vs seed 1, r=8", SubspaceKind::A),
            ("seed 0 vs seed 1, r=8", SubspaceKind::Update),
        ]
    );
    for c in &comparisons {
        assert_eq!(c.modules.len(), 4);
        for m in &c.modules {
            assert_eq!(m.dim, 64);
            assert!(m.phi.iter().flatten().all(|x| (0.0..=1.0).contains(x)));
        }
    }
    // The rank comparison's grid is r₁ × r₂.
    assert_eq!(comparisons[0].modules[0].phi.len(), 2);
    assert_eq!(comparisons[0].modules[0].phi[0].len(), 8);

    let out = tmp.path().join("report");
    let subspace = |rs: &[peftbench_reports::RunRecord]| subspace_comparisons(&runs, rs);
    let summary = peftbench_reports::write_report_with(&runs, &out, &subspace).unwrap();
    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(md.contains("## The weight updates"), "{md}");
    assert!(
        md.contains("**Effective rank**: full fine-tuning's ΔW needs a median of"),
        "{md}"
    );
    assert!(
        md.contains("**Amplification**, LoRA at 896 (r = 2)"),
        "{md}"
    );
    assert!(
        md.contains("**Subspace similarity of A (r=2 vs r=8, seed 0)**"),
        "{md}"
    );
    let heatmaps: Vec<_> = summary
        .plots
        .iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("subspace_")
        })
        .collect();
    assert_eq!(heatmaps.len(), 4);
    for p in heatmaps {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(md.contains(&format!("]({name})")), "{name} not embedded");
        assert!(
            std::fs::metadata(p).unwrap().len() > 10_000,
            "{name} is empty"
        );
    }

    // A damaged adapter is named and left out; the rest of the report stands.
    let victim = records
        .iter()
        .find(|r| r.method == "lora" && r.seed == 1)
        .and_then(|r| r.adapter_path.clone())
        .unwrap();
    std::fs::write(
        runs.join(&victim).join("adapter_model.safetensors"),
        b"junk",
    )
    .unwrap();
    let records = load_records(&runs).unwrap();
    let (comparisons, problems) = subspace_comparisons(&runs, &records);
    assert_eq!(
        comparisons.len(),
        2,
        "the seed comparison needs the damaged adapter"
    );
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("adapter_model.safetensors"),
        "{problems:?}"
    );
    let summary = peftbench_reports::write_report_with(&runs, &out, &subspace).unwrap();
    let md = std::fs::read_to_string(&summary.report).unwrap();
    assert!(
        md.contains("Adapters left out of the subspace similarity"),
        "{md}"
    );
}

#[test]
fn a_suite_without_analyses_keeps_its_config_hashes() {
    let plain = SUITE.replace(
        "analyses = [\"subspace_similarity\", \"amplification\", \"effective_rank\"]\n",
        "",
    );
    let suite = Suite::parse(&plain, "plain.toml").unwrap();
    for spec in suite.runs() {
        let v = serde_json::to_value(&spec).unwrap();
        assert!(v.get("analyses").is_none(), "{v}");
    }
    let with = Suite::parse(SUITE, "analyses.toml").unwrap();
    assert_ne!(
        with.runs()[0].config_hash(),
        suite.runs()[0].config_hash(),
        "asking for analyses changes what a record holds, so its hash"
    );
}
