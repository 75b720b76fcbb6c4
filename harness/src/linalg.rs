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
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
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
                if apq.abs() <= 1e-300 {
                    continue;
                }
                let (app, aqq) = (m[p * n + p], m[q * n + q]);
                let theta = (aqq - app) / (2.0 * apq);
                let sign = if theta >= 0.0 { 1.0 } else { -1.0 };
                let t = sign / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // Rotate rows and columns p, q of m, and columns p, q of v.
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
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
            vecs[k * n + col] = v[k * n + i];
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

    #[test]
    fn energy_rank_counts_the_top_values_holding_the_fraction() {
        assert_eq!(energy_rank(&[3.0, 1.0, 1.0], 0.9), 2);
        assert_eq!(energy_rank(&[1.0, 1.0, 1.0, 1.0], 0.9), 4);
        assert_eq!(energy_rank(&[5.0, 0.0], 0.9), 1);
        assert_eq!(energy_rank(&[], 0.9), 0);
    }
}
