//! The LoRA paper's questions about a fine-tuned update ΔW (Hu et al. 2021, §7), asked of
//! every projection a run changed: how many directions hold its energy (the effective rank,
//! beside LoRA's r: does the low-rank hypothesis hold?), and how strongly it amplifies
//! directions that W itself barely uses (the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F).
//! The third analysis, subspace similarity between two adapters, needs two runs and lives in
//! `subspace.rs`.

use crate::linalg::{energy_rank, orthonormal_columns, singular_values, svd_top, Mat};
use crate::HarnessError;
use candle_core::Tensor;
use peftbench_backbone::Transformer;
use peftbench_reports::{Amplification, MatrixUpdate, UpdateAnalysis};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// An analysis a suite can ask for (`analyses = ["subspace_similarity", …]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Analysis {
    /// φ between the `A` matrices (and ΔW's input directions) of two LoRA adapters: two
    /// ranks at one seed, two seeds at one rank. Drawn in the report from saved adapters.
    SubspaceSimilarity,
    /// ‖ΔW‖_F / ‖UᵀWV‖_F per matrix, recorded by each LoRA, AdaLoRA or full fine-tuning run.
    Amplification,
    /// The singular values of ΔW and how many hold 90% of its energy, per matrix.
    EffectiveRank,
}

impl Analysis {
    /// The name a suite writes.
    pub fn name(self) -> &'static str {
        match self {
            Analysis::SubspaceSimilarity => "subspace_similarity",
            Analysis::Amplification => "amplification",
            Analysis::EffectiveRank => "effective_rank",
        }
    }
}

/// The share of ΔW's energy Σσ² its effective rank holds.
pub const ENERGY_FRACTION: f64 = 0.9;
/// How many of ΔW's singular values a record keeps.
const KEPT_SINGULAR_VALUES: usize = 32;

/// A 2-D tensor as an f64 matrix.
pub(crate) fn to_mat(t: &Tensor) -> Result<Mat, HarnessError> {
    let (rows, cols) = t.dims2()?;
    let data = t
        .to_dtype(candle_core::DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    Ok(Mat::new(rows, cols, data))
}

/// A `rows × k` matrix with orthonormal columns drawn uniformly (Gaussian, then
/// Gram–Schmidt), from a seeded stream so records are reproducible.
pub fn random_orthonormal(rows: usize, k: usize, seed: u64) -> Mat {
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut uniform = || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data = (0..rows * k)
        .map(|_| {
            // Box–Muller.
            let (u1, u2) = (uniform(), uniform());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    orthonormal_columns(&Mat::new(rows, k, data))
}

/// ‖UᵀWV‖_F.
fn projected_norm(u: &Mat, w: &Mat, v: &Mat) -> f64 {
    u.t().matmul(&w.matmul(v)).fro2().sqrt()
}

/// The analysis of one matrix: `w` the base weight, `delta` its update. `rank` is the rank of
/// the amplification comparison (None: the update's effective rank); `amplification` whether
/// to compute it at all.
pub fn matrix_update(
    name: &str,
    w: &Mat,
    delta: &Mat,
    rank: Option<usize>,
    amplification: bool,
    seed: u64,
) -> MatrixUpdate {
    let small = w.rows.min(w.cols);
    let (u, s, v) = svd_top(delta, small);
    let effective = energy_rank(&s, ENERGY_FRACTION);
    let amplification = amplification.then(|| {
        let r = rank.unwrap_or(effective).clamp(1, small);
        let projected = projected_norm(&u.first_cols(r), w, &v.first_cols(r));
        let base_top = singular_values(w)
            .iter()
            .take(r)
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        let random = projected_norm(
            &random_orthonormal(w.rows, r, seed),
            w,
            &random_orthonormal(w.cols, r, seed.wrapping_add(1)),
        );
        let delta_norm = delta.fro2().sqrt();
        Amplification {
            rank: r,
            projected_norm: projected,
            base_top_norm: base_top,
            random_norm: random,
            factor: if projected > 0.0 {
                delta_norm / projected
            } else {
                f64::INFINITY
            },
        }
    });
    MatrixUpdate {
        matrix: name.to_string(),
        shape: [w.rows, w.cols],
        delta_norm: delta.fro2().sqrt(),
        base_norm: w.fro2().sqrt(),
        effective_rank: effective,
        singular_values: s.into_iter().take(KEPT_SINGULAR_VALUES).collect(),
        amplification,
    }
}

/// Analyses every projection whose weight differs between `initial` (the model before
/// training) and `tuned` (after, with any adapter merged in). None when no projection changed
/// (a method whose update is not a weight matrix).
pub fn update_analysis(
    initial: &Transformer,
    tuned: &Transformer,
    rank: Option<usize>,
    amplification: bool,
    seed: u64,
) -> Result<Option<UpdateAnalysis>, HarnessError> {
    let mut pairs = Vec::new();
    for site in initial.sites() {
        let (Some(a), Some(b)) = (initial.linear(site), tuned.linear(site)) else {
            continue;
        };
        let w = to_mat(&a.weight_f32()?)?;
        let after = to_mat(&b.weight_f32()?)?;
        let delta = Mat::new(
            w.rows,
            w.cols,
            after.data.iter().zip(&w.data).map(|(x, y)| x - y).collect(),
        );
        if delta.data.iter().any(|x| *x != 0.0) {
            pairs.push((
                format!("layer{}.{}", site.layer, site.proj.name()),
                w,
                delta,
            ));
        }
    }
    if pairs.is_empty() {
        return Ok(None);
    }
    // Matrices are independent; Jacobi on each is the cost.
    let matrices = pairs
        .par_iter()
        .enumerate()
        .map(|(i, (name, w, delta))| {
            matrix_update(
                name,
                w,
                delta,
                rank,
                amplification,
                seed.wrapping_add(i as u64),
            )
        })
        .collect();
    Ok(Some(UpdateAnalysis {
        energy_fraction: ENERGY_FRACTION,
        matrices,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn outer(u: &[f64], v: &[f64]) -> Mat {
        Mat::new(
            u.len(),
            v.len(),
            u.iter()
                .flat_map(|a| v.iter().map(move |b| a * b))
                .collect(),
        )
    }

    /// A rank-1 update along W's weakest direction is amplified by ‖ΔW‖ / σ_min; along W's
    /// strongest one by ‖ΔW‖ / σ_max.
    #[test]
    fn amplification_of_a_rank_one_update_along_a_singular_direction() {
        // W = diag(10, 1) in a rotated basis is still diag here: singular directions e1, e2.
        let w = Mat::new(2, 2, vec![10.0, 0.0, 0.0, 1.0]);
        let weak = outer(&[0.0, 3.0], &[0.0, 1.0]);
        let m = matrix_update("weak", &w, &weak, Some(1), true, 1);
        let a = m.amplification.unwrap();
        assert_eq!(m.effective_rank, 1);
        assert!((a.projected_norm - 1.0).abs() < 1e-9, "{a:?}");
        assert!((a.factor - 3.0).abs() < 1e-9, "{a:?}");
        assert!((a.base_top_norm - 10.0).abs() < 1e-9);
        let strong = outer(&[3.0, 0.0], &[1.0, 0.0]);
        let a = matrix_update("strong", &w, &strong, Some(1), true, 1)
            .amplification
            .unwrap();
        assert!((a.factor - 0.3).abs() < 1e-9, "{a:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        /// A rank-r update has effective rank at most r, its kept singular values are ΔW's,
        /// and ‖UᵀWV‖ never exceeds W's own top-r norm (the largest any rank-r U, V reach).
        #[test]
        fn low_rank_update_is_seen_as_low_rank(rows in 2usize..14, cols in 2usize..14, r in 1usize..4, seed in 0u64..500) {
            let r = r.min(rows).min(cols);
            let w = Mat::new(rows, cols, random_orthonormal(rows * cols, 1, seed).data);
            let b = random_orthonormal(rows, r, seed + 1);
            let a = random_orthonormal(cols, r, seed + 2);
            let delta = b.matmul(&a.t());
            let m = matrix_update("m", &w, &delta, Some(r), true, seed);
            prop_assert!(m.effective_rank <= r);
            prop_assert!((m.delta_norm - (r as f64).sqrt()).abs() < 1e-9);
            for s in m.singular_values.iter().take(r) {
                prop_assert!((s - 1.0).abs() < 1e-7, "{s}");
            }
            let amp = m.amplification.unwrap();
            prop_assert!(amp.projected_norm <= amp.base_top_norm + 1e-9);
            prop_assert!(amp.random_norm <= amp.base_top_norm + 1e-9);
        }
    }
}
