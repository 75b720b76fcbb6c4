//! The few dense decompositions the analyses need, in f64: a symmetric eigendecomposition by
//! cyclic Jacobi rotations, and singular values and vectors through it. Matrices here are at
//! most a few thousand wide (a projection of the base model), where Jacobi is accurate and fast
//! enough, and needs no LAPACK on the machine.

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows × cols` values, row-major.
    pub data: Vec<f64>,
}

impl Mat {
    /// A matrix from row-major values.
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "{rows}x{cols} matrix from {} values",
            data.len()
        );
        Self { rows, cols, data }
    }

    /// Value at (i, j).
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        let mut d = vec![0.0; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                d[j * self.rows + i] = self.at(i, j);
            }
        }
        Mat::new(self.cols, self.rows, d)
    }

    /// self · other.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows);
        let mut d = vec![0.0; self.rows * other.cols];
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(i, k);
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                let out = &mut d[i * other.cols..(i + 1) * other.cols];
                for (o, b) in out.iter_mut().zip(row) {
                    *o += a * b;
                }
            }
        }
        Mat::new(self.rows, other.cols, d)
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        let k = k.min(self.cols);
        let mut d = Vec::with_capacity(self.rows * k);
        for i in 0..self.rows {
            d.extend_from_slice(&self.data[i * self.cols..i * self.cols + k]);
        }
        Mat::new(self.rows, k, d)
    }

    /// Squared Frobenius norm.
    pub fn fro2(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }
}

/// Eigenvalues (descending) and eigenvectors (as the columns of the returned matrix, in the
/// same order) of a symmetric matrix.
pub fn sym_eigen(a: &Mat) -> (Vec<f64>, Mat) {
    assert_eq!(a.rows, a.cols, "eigendecomposition of a non-square matrix");
    let n = a.rows;
    let mut m = a.data.clone();
    // Eigenvectors as rows (Vᵀ), so each rotation updates two contiguous rows.
    let mut vt = vec![0.0; n * n];
    for i in 0..n {
        vt[i * n + i] = 1.0;
    }
    let scale: f64 = m.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum();
        if off <= 1e-26 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                if apq.abs() <= 1e-300 || apq.abs() <= 1e-18 * (app.abs() + aqq.abs()) {
                    continue;
                }
                let theta = (aqq - app) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // m stays symmetric: rotate rows p and q, then copy them into the columns.
                for k in 0..n {
                    if k == p || k == q {
                        continue;
                    }
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    let (np, nq) = (c * mpk - s * mqk, s * mpk + c * mqk);
                    m[p * n + k] = np;
                    m[q * n + k] = nq;
                    m[k * n + p] = np;
                    m[k * n + q] = nq;
                }
                m[p * n + p] = app - t * apq;
                m[q * n + q] = aqq + t * apq;
                m[p * n + q] = 0.0;
                m[q * n + p] = 0.0;
                let (rp, rq) = (p * n, q * n);
                for k in 0..n {
                    let (vp, vq) = (vt[rp + k], vt[rq + k]);
                    vt[rp + k] = c * vp - s * vq;
                    vt[rq + k] = s * vp + c * vq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[j * n + j].total_cmp(&m[i * n + i]));
    let values = order.iter().map(|&i| m[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + col] = vt[i * n + k];
        }
    }
    (values, Mat::new(n, n, vecs))
}

/// Singular values of `a`, descending, from the eigenvalues of the smaller Gram matrix.
pub fn singular_values(a: &Mat) -> Vec<f64> {
    let g = if a.rows <= a.cols {
        a.matmul(&a.t())
    } else {
        a.t().matmul(a)
    };
    sym_eigen(&g)
        .0
        .into_iter()
        .map(|e| e.max(0.0).sqrt())
        .collect()
}

/// The top-`k` right singular vectors of `a` (`cols × k`, orthonormal columns) and their
/// singular values.
pub fn right_singular_vectors(a: &Mat, k: usize) -> (Mat, Vec<f64>) {
    let (vals, vecs) = if a.rows < a.cols {
        // Through the small side: V = Aᵀ·U·Σ⁻¹.
        let (vals, u) = sym_eigen(&a.matmul(&a.t()));
        let k = k.min(a.rows);
        let s: Vec<f64> = vals.iter().take(k).map(|e| e.max(0.0).sqrt()).collect();
        let mut v = a.t().matmul(&u.first_cols(k));
        for i in 0..v.rows {
            for (j, sj) in s.iter().enumerate() {
                v.data[i * k + j] /= sj.max(1e-300);
            }
        }
        return (v, s);
    } else {
        sym_eigen(&a.t().matmul(a))
    };
    let k = k.min(a.cols);
    (
        vecs.first_cols(k),
        vals.iter().take(k).map(|e| e.max(0.0).sqrt()).collect(),
    )
}

/// The smallest k whose top-k singular values hold `fraction` of the energy Σσ².
pub fn energy_rank(singular: &[f64], fraction: f64) -> usize {
    let total: f64 = singular.iter().map(|s| s * s).sum();
    if total == 0.0 {
        return 0;
    }
    let mut acc = 0.0;
    for (i, s) in singular.iter().enumerate() {
        acc += s * s;
        if acc >= fraction * total {
            return i + 1;
        }
    }
    singular.len()
}

/// The top-`k` singular triplets of `a`: `U` (`rows × k`), σ, and `V` (`cols × k`), with
/// `a·v_j = σ_j·u_j`. Directions with σ = 0 get a zero column in `U`.
pub fn svd_top(a: &Mat, k: usize) -> (Mat, Vec<f64>, Mat) {
    let (v, s) = right_singular_vectors(a, k);
    let mut u = a.matmul(&v);
    let k = s.len();
    for i in 0..u.rows {
        for (j, sj) in s.iter().enumerate() {
            u.data[i * k + j] = if *sj > 0.0 {
                u.data[i * k + j] / sj
            } else {
                0.0
            };
        }
    }
    (u, s, v)
}

/// Orthonormal columns spanning the columns of `a` (modified Gram–Schmidt, twice for
/// accuracy); columns that are (numerically) dependent on earlier ones are dropped.
pub fn orthonormal_columns(a: &Mat) -> Mat {
    let n = a.rows;
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for j in 0..a.cols {
        let mut v: Vec<f64> = (0..n).map(|i| a.at(i, j)).collect();
        let norm0 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        for _ in 0..2 {
            for q in &cols {
                let d: f64 = q.iter().zip(&v).map(|(x, y)| x * y).sum();
                for (vi, qi) in v.iter_mut().zip(q) {
                    *vi -= d * qi;
                }
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-10 * norm0.max(f64::MIN_POSITIVE) && norm > 0.0 {
            cols.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    let k = cols.len();
    let mut d = vec![0.0; n * k];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..n {
            d[i * k + j] = c[i];
        }
    }
    Mat::new(n, k, d)
}

/// The LoRA paper's normalised subspace similarity (Hu et al. 2021, §7.2) for every prefix
/// pair: `phi[i-1][j-1] = ‖U₁[:, :i]ᵀ·U₂[:, :j]‖²_F / min(i, j)`, in [0, 1], for orthonormal
/// columns `u1` (`d × r₁`) and `u2` (`d × r₂`).
pub fn subspace_similarity(u1: &Mat, u2: &Mat) -> Vec<Vec<f64>> {
    assert_eq!(u1.rows, u2.rows, "subspaces of different spaces");
    let m = u1.t().matmul(u2);
    let (r1, r2) = (m.rows, m.cols);
    // Prefix sums of the squared overlaps: c[i][j] = Σ_{a<i, b<j} m_ab².
    let mut c = vec![vec![0.0; r2 + 1]; r1 + 1];
    for i in 0..r1 {
        for j in 0..r2 {
            c[i + 1][j + 1] = c[i][j + 1] + c[i + 1][j] - c[i][j] + m.at(i, j).powi(2);
        }
    }
    (1..=r1)
        .map(|i| {
            (1..=r2)
                .map(|j| (c[i][j] / i.min(j) as f64).clamp(0.0, 1.0))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data = (0..rows * cols)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Mat::new(rows, cols, data)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// V·diag(λ)·Vᵀ rebuilds the matrix and V is orthonormal.
        #[test]
        fn sym_eigen_reconstructs_and_is_orthonormal(n in 1usize..24, seed in 0u64..1000) {
            let r = random(n, n, seed);
            let a = r.matmul(&r.t());
            let (vals, v) = sym_eigen(&a);
            let mut d = vec![0.0; n * n];
            for i in 0..n { d[i * n + i] = vals[i]; }
            let back = v.matmul(&Mat::new(n, n, d)).matmul(&v.t());
            let scale = a.fro2().sqrt().max(1.0);
            for (x, y) in back.data.iter().zip(&a.data) {
                prop_assert!((x - y).abs() <= 1e-9 * scale, "{x} vs {y}");
            }
            let eye = v.t().matmul(&v);
            for i in 0..n { for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                prop_assert!((eye.at(i, j) - want).abs() <= 1e-9);
            }}
            prop_assert!(vals.windows(2).all(|w| w[0] >= w[1]));
        }

        /// A·v = σ·u for each right singular vector, and a rank-r product has r non-zero
        /// singular values.
        #[test]
        fn singular_vectors_satisfy_the_definition(rows in 1usize..20, cols in 1usize..20, r in 1usize..6, seed in 0u64..1000) {
            let r = r.min(rows).min(cols);
            let a = random(rows, r, seed).matmul(&random(r, cols, seed + 7));
            let s = singular_values(&a);
            let big = s[0].max(1e-12);
            prop_assert!(s.iter().skip(r).all(|x| *x <= 1e-6 * big), "{s:?}");
            let (v, sv) = right_singular_vectors(&a, r);
            let av = a.matmul(&v);
            for j in 0..r {
                let norm: f64 = (0..rows).map(|i| av.at(i, j).powi(2)).sum::<f64>().sqrt();
                prop_assert!((norm - sv[j]).abs() <= 1e-7 * big, "{norm} vs {}", sv[j]);
                prop_assert!((sv[j] - s[j]).abs() <= 1e-7 * big);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// U·diag(σ)·Vᵀ rebuilds a rank-r matrix from its top r triplets, with orthonormal U.
        #[test]
        fn svd_top_rebuilds_a_low_rank_matrix(rows in 1usize..18, cols in 1usize..18, r in 1usize..5, seed in 0u64..1000) {
            let r = r.min(rows).min(cols);
            let a = random(rows, r, seed).matmul(&random(r, cols, seed + 3));
            let (u, s, v) = svd_top(&a, r);
            let mut us = u.clone();
            for i in 0..rows { for (j, sj) in s.iter().enumerate().take(r) { us.data[i * r + j] *= sj; } }
            let back = us.matmul(&v.t());
            let scale = a.fro2().sqrt().max(1.0);
            for (x, y) in back.data.iter().zip(&a.data) {
                prop_assert!((x - y).abs() <= 1e-7 * scale, "{x} vs {y}");
            }
            let eye = u.t().matmul(&u);
            for i in 0..r { for j in 0..r {
                let want = if i == j { 1.0 } else { 0.0 };
                prop_assert!((eye.at(i, j) - want).abs() <= 1e-6);
            }}
        }

        /// Gram–Schmidt gives orthonormal columns whose span holds every input column.
        #[test]
        fn orthonormal_columns_span_the_input(rows in 1usize..20, cols in 1usize..8, seed in 0u64..1000) {
            let a = random(rows, cols, seed);
            let q = orthonormal_columns(&a);
            prop_assert_eq!(q.cols, cols.min(rows));
            let eye = q.t().matmul(&q);
            for i in 0..q.cols { for j in 0..q.cols {
                let want = if i == j { 1.0 } else { 0.0 };
                prop_assert!((eye.at(i, j) - want).abs() <= 1e-9);
            }}
            let back = q.matmul(&q.t().matmul(&a));
            for (x, y) in back.data.iter().zip(&a.data) {
                prop_assert!((x - y).abs() <= 1e-9, "{x} vs {y}");
            }
        }

        /// φ lies in [0, 1], is 1 everywhere for a subspace against itself, is symmetric under
        /// swapping the two (φ(A, B, i, j) = φ(B, A, j, i)), and is 0 for orthogonal subspaces.
        #[test]
        fn subspace_similarity_is_normalised_and_symmetric(d in 2usize..24, r1 in 1usize..6, r2 in 1usize..6, seed in 0u64..1000) {
            let (r1, r2) = (r1.min(d), r2.min(d));
            let u1 = orthonormal_columns(&random(d, r1, seed));
            let u2 = orthonormal_columns(&random(d, r2, seed + 1));
            let phi = subspace_similarity(&u1, &u2);
            let back = subspace_similarity(&u2, &u1);
            for i in 0..u1.cols { for j in 0..u2.cols {
                prop_assert!((0.0..=1.0).contains(&phi[i][j]));
                prop_assert!((phi[i][j] - back[j][i]).abs() <= 1e-12);
            }}
            for row in subspace_similarity(&u1, &u1) {
                for x in row { prop_assert!((x - 1.0).abs() <= 1e-9, "{x}"); }
            }
            // Split one orthonormal basis into two orthogonal halves.
            if d >= 2 {
                let q = orthonormal_columns(&random(d, d, seed + 2));
                let h = d / 2;
                let left = q.first_cols(h);
                let right = Mat::new(d, d - h, (0..d).flat_map(|i| (h..d).map(move |j| (i, j))).map(|(i, j)| q.at(i, j)).collect());
                for row in subspace_similarity(&left, &right) {
                    for x in row { prop_assert!(x.abs() <= 1e-9, "{x}"); }
                }
            }
        }
    }

    #[test]
    fn energy_rank_counts_the_top_values_holding_the_fraction() {
        assert_eq!(energy_rank(&[3.0, 1.0, 1.0], 0.9), 2);
        assert_eq!(energy_rank(&[1.0, 1.0, 1.0, 1.0], 0.9), 4);
        assert_eq!(energy_rank(&[5.0, 0.0], 0.9), 1);
        assert_eq!(energy_rank(&[], 0.9), 0);
    }
}
