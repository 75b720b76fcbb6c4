//! The LoRA paper's subspace similarity (Hu et al. 2021, §7.2) between saved LoRA adapters of
//! one task: two ranks at one seed (does the small adapter's subspace lie in the large
//! one's?) and two seeds at one rank (do independent runs find the same directions?). Read
//! from the adapters the runs saved, so the report can be made again without training.

use crate::analysis::{to_mat, Analysis};
use crate::linalg::{orthonormal_columns, right_singular_vectors, subspace_similarity, Mat};
use crate::HarnessError;
use peftbench_methods::peft::PeftFiles;
use peftbench_reports::analyses::{ModuleSimilarity, SubspaceComparison, SubspaceKind};
use peftbench_reports::{RunRecord, RunStatus};
use std::collections::BTreeMap;
use std::path::Path;

/// One adapted matrix of a LoRA adapter: `A` (`r × in`) and `B` (`out × r`).
struct Factors {
    a: Mat,
    b: Mat,
}

/// `encoder.layer.5.attention.self.query` → `layer5.query`; `model.layers.0.self_attn.q_proj`
/// → `layer0.q_proj`; GPT-2's `transformer.h.3.attn.c_attn` → `layer3.c_attn`.
pub fn short_module_name(path: &str) -> String {
    let parts: Vec<&str> = path.split('.').collect();
    let layer = parts
        .windows(2)
        .find(|w| matches!(w[0], "layer" | "layers" | "h") && w[1].parse::<usize>().is_ok())
        .map(|w| w[1]);
    let last = parts.last().copied().unwrap_or(path);
    match layer {
        Some(l) => format!("layer{l}.{last}"),
        None => last.to_string(),
    }
}

/// Every `lora_A` / `lora_B` pair of a LoRA adapter directory, by short module name.
fn read_factors(dir: &Path) -> Result<BTreeMap<String, Factors>, HarnessError> {
    let mut files = PeftFiles::read(dir)?;
    let peft_type = files.config.get("peft_type").and_then(|v| v.as_str());
    if peft_type != Some("LORA") {
        return Err(HarnessError::Config(format!(
            "{}: subspace similarity needs a LORA adapter, found peft_type {:?}",
            dir.display(),
            peft_type.unwrap_or("(none)")
        )));
    }
    let names: Vec<String> = files
        .names()
        .filter(|k| k.ends_with(".lora_A.weight"))
        .map(str::to_string)
        .collect();
    let mut out = BTreeMap::new();
    for a_key in names {
        let module = a_key.trim_end_matches(".lora_A.weight");
        let b_key = format!("{module}.lora_B.weight");
        let a = to_mat(&files.take(&a_key, None)?)?;
        let b = to_mat(&files.take(&b_key, None)?)?;
        out.insert(short_module_name(module), Factors { a, b });
    }
    Ok(out)
}

/// Orthonormal input directions of a factor pair: `A`'s top right singular vectors, or ΔW =
/// B·A's. For ΔW a small core is enough: with Q an orthonormal basis of A's rows,
/// B·A = (B·A·Q)·Qᵀ, so ΔW's right singular vectors are Q times those of B·A·Q (`out × r`).
fn directions(f: &Factors, kind: SubspaceKind) -> Mat {
    match kind {
        SubspaceKind::A => right_singular_vectors(&f.a, f.a.rows).0,
        SubspaceKind::Update => {
            let q = orthonormal_columns(&f.a.t());
            let core = f.b.matmul(&f.a.matmul(&q));
            let (vc, s) = right_singular_vectors(&core, q.cols);
            // Only the directions ΔW uses: B may leave some of A's rows unused.
            let top = s.first().copied().unwrap_or(0.0);
            let k = s.iter().filter(|x| **x > 1e-12 * top).count();
            q.matmul(&vc).first_cols(k.max(1))
        }
    }
}

/// φ for each matrix the two adapters share.
fn compare(
    left: &BTreeMap<String, Factors>,
    right: &BTreeMap<String, Factors>,
    kind: SubspaceKind,
) -> Vec<ModuleSimilarity> {
    left.iter()
        .filter_map(|(name, l)| {
            let r = right.get(name)?;
            if l.a.cols != r.a.cols {
                return None;
            }
            let (u1, u2) = (directions(l, kind), directions(r, kind));
            Some(ModuleSimilarity {
                module: name.clone(),
                dim: l.a.cols,
                phi: subspace_similarity(&u1, &u2),
            })
        })
        .collect()
}

fn wants_subspace(r: &RunRecord) -> bool {
    r.config
        .get("analyses")
        .and_then(|v| v.as_array())
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.as_str() == Some(Analysis::SubspaceSimilarity.name()))
        })
}

/// Reads an adapter once; false (and a line in `problems`) when it cannot be read.
fn load(
    cache: &mut BTreeMap<String, Option<BTreeMap<String, Factors>>>,
    runs_dir: &Path,
    rel: &str,
    problems: &mut Vec<String>,
) -> bool {
    if !cache.contains_key(rel) {
        let read = read_factors(&runs_dir.join(rel));
        if let Err(e) = &read {
            problems.push(format!("subspace similarity: {e}"));
        }
        cache.insert(rel.to_string(), read.ok());
    }
    cache[rel].is_some()
}

/// The comparisons a report shows, from the records of `runs_dir` that asked for subspace
/// similarity: per task, LoRA at its smallest against its largest rank (the lowest seed both
/// have), and its two lowest seeds at the largest rank that has two. Adapters that cannot be
/// read are named in the second list and left out.
pub fn subspace_comparisons(
    runs_dir: &Path,
    records: &[RunRecord],
) -> (Vec<SubspaceComparison>, Vec<String>) {
    // task → rank → seed → adapter dir
    let mut by_task: BTreeMap<&str, BTreeMap<usize, BTreeMap<u64, &str>>> = BTreeMap::new();
    for r in records {
        let (Some(path), Some((knob, rank))) = (r.adapter_path.as_deref(), r.knob.as_ref()) else {
            continue;
        };
        if r.method == "lora" && knob == "rank" && r.status == RunStatus::Ok && wants_subspace(r) {
            by_task
                .entry(&r.task)
                .or_default()
                .entry(*rank)
                .or_default()
                .insert(r.seed, path);
        }
    }
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut cache: BTreeMap<String, Option<BTreeMap<String, Factors>>> = BTreeMap::new();
    for (task, ranks) in &by_task {
        let mut pairs: Vec<(String, &str, &str)> = Vec::new();
        let (lo, hi) = (ranks.keys().next(), ranks.keys().last());
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo != hi {
                if let Some(seed) = ranks[lo].keys().find(|s| ranks[hi].contains_key(s)) {
                    pairs.push((
                        format!("r={lo} vs r={hi}, seed {seed}"),
                        ranks[lo][seed],
                        ranks[hi][seed],
                    ));
                }
            }
        }
        if let Some((rank, seeds)) = ranks.iter().rev().find(|(_, s)| s.len() >= 2) {
            let mut it = seeds.iter();
            let (s1, p1) = it.next().expect("two seeds");
            let (s2, p2) = it.next().expect("two seeds");
            pairs.push((format!("seed {s1} vs seed {s2}, r={rank}"), p1, p2));
        }
        for (label, p1, p2) in pairs {
            let ok1 = load(&mut cache, runs_dir, p1, &mut problems);
            let ok2 = load(&mut cache, runs_dir, p2, &mut problems);
            if !(ok1 && ok2) {
                continue;
            }
            let (l, r) = (
                cache[p1].as_ref().expect("loaded"),
                cache[p2].as_ref().expect("loaded"),
            );
            for kind in [SubspaceKind::A, SubspaceKind::Update] {
                out.push(SubspaceComparison {
                    task: task.to_string(),
                    label: label.clone(),
                    kind,
                    modules: compare(l, r, kind),
                });
            }
        }
    }
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_shortened_per_family() {
        assert_eq!(
            short_module_name("bert.encoder.layer.5.attention.self.query"),
            "layer5.query"
        );
        assert_eq!(
            short_module_name("model.layers.0.self_attn.q_proj"),
            "layer0.q_proj"
        );
        assert_eq!(
            short_module_name("transformer.h.3.attn.c_attn"),
            "layer3.c_attn"
        );
    }

    /// ΔW's directions from the r×r core agree with a dense SVD of B·A.
    #[test]
    fn update_directions_match_the_dense_product() {
        let a = Mat::new(2, 4, vec![1.0, 2.0, 0.0, -1.0, 0.5, 0.0, 3.0, 1.0]);
        let b = Mat::new(3, 2, vec![1.0, 0.0, 2.0, 1.0, 0.0, -1.0]);
        let dense = right_singular_vectors(&b.matmul(&a), 2).0;
        let f = Factors { a, b };
        let core = directions(&f, SubspaceKind::Update);
        let phi = subspace_similarity(&dense, &core);
        for row in phi {
            for x in row {
                // Same subspace, and each prefix spans the same directions (distinct σ).
                assert!((x - 1.0).abs() < 1e-9, "{x}");
            }
        }
    }
}
