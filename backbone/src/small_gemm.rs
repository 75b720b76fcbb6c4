//! Products with a short side (a few dozen columns), register-blocked for the calling
//! kernel's SIMD build: the structured deltas' per-row products, too small to amortise a GEMM
//! library's packing, and load- and store-bound as plain loops.
//!
//! `y[m, n] (+)= s·A[m, r]·W[r, n]` with A read through any strides (one broadcast per
//! element, so a transposed A costs nothing) and W row-major: tiles of 4 rows × 32 columns
//! stay in registers for the whole `r` loop. Call it from a `simd!` function so it is
//! compiled for the CPU's vector width.

/// Lanes of one column block (one AVX-512 register, two AVX2 ones).
const LANES: usize = 16;

/// A strided read-only matrix: element `(i, j)` at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> Strided<'a> {
    /// Row-major with row stride `rs`.
    pub fn rows(data: &'a [f32], rs: usize) -> Self {
        Self { data, rs, cs: 1 }
    }

    /// The transpose of a row-major matrix with row stride `rs`.
    pub fn transposed(data: &'a [f32], rs: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rs,
        }
    }
}

/// `y[m, n] = s·a·w` (or `y += s·a·w` with `accumulate`) for `a [m, r]`, `w [r, n]` with row
/// stride `ldw` and `y` with row stride `ldy`. Lanes of `w` past column `n` may be read
/// (they feed only discarded lanes); nothing past `w`'s end is.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_gemm(
    (m, r, n): (usize, usize, usize),
    a: Strided,
    w: &[f32],
    ldw: usize,
    s: f32,
    y: &mut [f32],
    ldy: usize,
    accumulate: bool,
) {
    let mut col = 0;
    while col < n {
        let width = (n - col).min(2 * LANES);
        let mut row = 0;
        while row < m {
            let rows = (m - row).min(4);
            let at = (row, col, width);
            let args = (r, a, w, ldw, s);
            match (rows, width > LANES) {
                (4, true) => tile::<4, 2>(at, args, y, ldy, accumulate),
                (4, false) => tile::<4, 1>(at, args, y, ldy, accumulate),
                (3, true) => tile::<3, 2>(at, args, y, ldy, accumulate),
                (3, false) => tile::<3, 1>(at, args, y, ldy, accumulate),
                (2, true) => tile::<2, 2>(at, args, y, ldy, accumulate),
                (2, false) => tile::<2, 1>(at, args, y, ldy, accumulate),
                (_, true) => tile::<1, 2>(at, args, y, ldy, accumulate),
                (_, false) => tile::<1, 1>(at, args, y, ldy, accumulate),
            }
            row += rows;
        }
        col += width;
    }
}

/// Sixteen lanes of `w` from `at`, zeros past its end.
#[inline(always)]
fn load_tail(w: &[f32], at: usize) -> [f32; LANES] {
    let mut v = [0f32; LANES];
    let tail = w.get(at..).unwrap_or(&[]);
    let len = tail.len().min(LANES);
    v[..len].copy_from_slice(&tail[..len]);
    v
}

/// `acc[i] += A[row + i, j]·wv` for the tile's rows.
#[inline(always)]
fn step<const MR: usize, const NB: usize>(
    a: Strided,
    row: usize,
    j: usize,
    wv: &[[f32; LANES]; NB],
    acc: &mut [[[f32; LANES]; NB]; MR],
) {
    for (i, acc_i) in acc.iter_mut().enumerate() {
        // SAFETY: the caller asserted every A element of the tile is in bounds.
        let c = unsafe { *a.data.get_unchecked((row + i) * a.rs + j * a.cs) };
        for (acc_ib, wb) in acc_i.iter_mut().zip(wv) {
            for (o, &x) in acc_ib.iter_mut().zip(wb) {
                *o = c.mul_add(x, *o);
            }
        }
    }
}

/// One `MR × NB·16` tile of the output at `(row, col)`, `width` of its columns kept.
#[inline(always)]
fn tile<const MR: usize, const NB: usize>(
    (row, col, width): (usize, usize, usize),
    (r, a, w, ldw, s): (usize, Strided, &[f32], usize, f32),
    y: &mut [f32],
    ldy: usize,
    accumulate: bool,
) {
    // Every A element the tile reads is in bounds (so `step` reads them unchecked).
    assert!(r == 0 || (row + MR - 1) * a.rs + (r - 1) * a.cs < a.data.len());
    // Rows of W whose NB·16 lanes lie inside `w` (read unchecked); the rest, at most the last
    // few, are read with zeros past the end.
    let whole = (w.len() + 1)
        .saturating_sub(col + NB * LANES)
        .div_ceil(ldw.max(1))
        .min(r);
    let mut acc = [[[0f32; LANES]; NB]; MR];
    for j in 0..whole {
        let mut wv = [[0f32; LANES]; NB];
        for (b, v) in wv.iter_mut().enumerate() {
            // SAFETY: j < whole, so j·ldw + col + NB·16 ≤ w.len().
            *v = unsafe {
                std::ptr::read_unaligned(w.as_ptr().add(j * ldw + col + b * LANES).cast())
            };
        }
        step(a, row, j, &wv, &mut acc);
    }
    for j in whole..r {
        let mut wv = [[0f32; LANES]; NB];
        for (b, v) in wv.iter_mut().enumerate() {
            *v = load_tail(w, j * ldw + col + b * LANES);
        }
        step(a, row, j, &wv, &mut acc);
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let out = &mut y[(row + i) * ldy + col..][..width];
        for (o, &v) in out.iter_mut().zip(acc_i.as_flattened()) {
            *o = if accumulate { s.mul_add(v, *o) } else { s * v };
        }
    }
}

#[cfg(test)]
#[allow(clippy::too_many_arguments)]
mod tests {
    use super::*;
    use crate::fused::simd;
    use proptest::prelude::*;

    simd! {
        fn run(dims: (usize, usize, usize), a: Strided, w: &[f32], ldw: usize, s: f32,
               y: &mut [f32], ldy: usize, accumulate: bool) {
            small_gemm(dims, a, w, ldw, s, y, ldy, accumulate)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any shape (every tile and tail), either stride of A, either mode, against f64 sums;
        /// the lanes past `n` in each row of `y` stay as they were.
        #[test]
        fn matches_the_plain_product(
            (m, r, n) in (1usize..40, 0usize..50, 1usize..70),
            (pad_w, pad_y) in (0usize..3, 0usize..3),
            transposed in any::<bool>(),
            accumulate in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            };
            let a: Vec<f32> = (0..m * r).map(|_| next()).collect();
            let (ldw, ldy) = (n + pad_w, n + pad_y);
            let w: Vec<f32> = (0..r * ldw).map(|_| next()).collect();
            let y0: Vec<f32> = (0..m * ldy).map(|_| next()).collect();
            let av = if transposed { Strided::transposed(&a, m) } else { Strided::rows(&a, r) };
            let at = |i: usize, j: usize| av.data[i * av.rs + j * av.cs] as f64;
            let mut y = y0.clone();
            run((m, r, n), av, &w, ldw, 0.75, &mut y, ldy, accumulate);
            for i in 0..m {
                for k in 0..ldy {
                    let old = y0[i * ldy + k] as f64;
                    let want = if k >= n {
                        old
                    } else {
                        let p: f64 = (0..r).map(|j| at(i, j) * w[j * ldw + k] as f64).sum();
                        0.75 * p + if accumulate { old } else { 0.0 }
                    };
                    let got = y[i * ldy + k] as f64;
                    prop_assert!((got - want).abs() < 1e-5, "({}, {}): {} against {}", i, k, got, want);
                }
            }
        }
    }
}
