//! A low-rank update `scale·x·Aᵀ·Bᵀ` (what a low-rank adapter adds to a projection) as one
//! f32 CPU op with its own backward.
//!
//! At adapter ranks these products are skinny (`r` of 8 or 16 against hundreds of columns):
//! GEMM libraries run them far below their rate (the `gemm` crate ~30 GFLOP/s for
//! `[1024, 384]·[384, 8]`), and candle composes the delta from two matmuls batched per row of
//! a 3-D input, a scale pass each way and a batch sum of the factors' gradients. Here a block
//! of rows at a time goes through both factors while it is in cache: the forward reads `x`
//! once, the backward reads `x` and the incoming gradient once and yields all three gradients
//! (the input's only when something upstream trains). The products are plain loops compiled
//! per CPU (`simd!`); the GEMM floor records their sizes and replays them with these same
//! functions. Their multiply-adds are `2·r·(in + out)` per row each way, under 1% of a
//! projection's.

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::attention::SendPtr;
use crate::fused::{mad, simd, slice, uninit, with_slices};
use crate::gemm_floor::{Own, Pass};

/// Ranks the fused op takes; above it the products are wide enough for the GEMM library
/// (`[1024, 384]` rows fused vs as GEMMs, forward and backward: r 8 2.4 vs 4.1 ms, r 16 3.0
/// vs 3.7, r 32 4.6 vs 4.8, r 64 7.9 vs 4.1).
const MAX_RANK: usize = 16;

/// Rows per task: a block's `x` and gradient rows stay in L2 between the passes over them.
pub(crate) const BLOCK: usize = 64;

/// `scale·x·Aᵀ·Bᵀ` for `x [.., in]`, `a [r, in]`, `b [out, r]`; returns `[.., out]`.
pub fn low_rank_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let (r, inp) = a.dims2()?;
    let (out, rb) = b.dims2()?;
    if rb != r || x.dim(candle_core::D::Minus1)? != inp {
        bail!(
            "low-rank delta: input {:?}, A {:?}, B {:?}",
            x.dims(),
            a.dims(),
            b.dims()
        );
    }
    let mut dims = x.dims().to_vec();
    let rows = x.elem_count() / inp;
    let x2 = x.contiguous()?.reshape((rows, inp))?;
    let y = if crate::fused::eligible(&[x, a, b]) && (1..=MAX_RANK).contains(&r) && inp * out > 0 {
        x2.apply_op3(
            &a.contiguous()?,
            &b.contiguous()?,
            LowRank {
                scale: scale as f32,
            },
        )?
    } else {
        (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?
    };
    *dims.last_mut().expect("rank ≥ 1") = out;
    y.reshape(dims)
}

struct LowRank {
    scale: f32,
}

/// x·y with sixteen running sums (one AVX-512 register, two AVX2 ones).
#[inline(always)]
fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (cx, cy) = (x.chunks_exact(16), y.chunks_exact(16));
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cy.remainder())
        .fold(0.0, |s, (&a, &b)| mad(a, b, s));
    for (a, b) in cx.zip(cy) {
        for l in 0..16 {
            acc[l] = mad(a[l], b[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

simd! {
    /// `out [rows, r] = scale · x [rows, k] · wᵀ` for `w [r, k]`.
    fn dots(x: &[f32], w: &[f32], k: usize, scale: f32, out: &mut [f32]) {
        let r = w.len() / k;
        for (xi, oi) in x.chunks_exact(k).zip(out.chunks_exact_mut(r)) {
            for (wj, o) in w.chunks_exact(k).zip(oi) {
                *o = scale * dot(xi, wj);
            }
        }
    }
}

simd! {
    /// `y [rows, n] = scale · c [rows, r] · w` for `w [r, n]`.
    fn combine(c: &[f32], w: &[f32], n: usize, scale: f32, y: &mut [f32]) {
        let r = w.len() / n;
        for (ci, yi) in c.chunks_exact(r).zip(y.chunks_exact_mut(n)) {
            let mut rows = ci.iter().zip(w.chunks_exact(n));
            if let Some((&c0, w0)) = rows.next() {
                let a = scale * c0;
                for (y, &w) in yi.iter_mut().zip(w0) {
                    *y = a * w;
                }
            }
            for (&cj, wj) in rows {
                let a = scale * cj;
                for (y, &w) in yi.iter_mut().zip(wj) {
                    *y = mad(a, w, *y);
                }
            }
        }
    }
}

simd! {
    /// `acc [r, n] += c [rows, r]ᵀ · x [rows, n]`.
    fn outer_acc(c: &[f32], x: &[f32], n: usize, acc: &mut [f32]) {
        let r = acc.len() / n;
        for (ci, xi) in c.chunks_exact(r).zip(x.chunks_exact(n)) {
            for (&cj, aj) in ci.iter().zip(acc.chunks_exact_mut(n)) {
                for (a, &x) in aj.iter_mut().zip(xi) {
                    *a = mad(cj, x, *a);
                }
            }
        }
    }
}

/// `[cols, rows]` from a row-major `[rows, cols]`.
pub(crate) fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for (i, row) in m.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + i] = v;
        }
    }
    t
}

/// Runs `f` on each block of `rows` (its first row and length): on the rayon pool when
/// there is more than one block.
pub(crate) fn for_blocks(rows: usize, f: impl Fn(usize, usize) + Sync) {
    let blocks = rows.div_ceil(BLOCK);
    let run = |i: usize| {
        let lo = i * BLOCK;
        f(lo, BLOCK.min(rows - lo))
    };
    if blocks > 1 {
        (0..blocks).into_par_iter().for_each(run);
    } else {
        (0..blocks).for_each(run);
    }
}

/// Runs `f(scratch, lo, n, sums)` on every block of `rows` (its first row and length), the
/// blocks cut into one contiguous run per thread. Each run starts from `start()` and adds
/// into its own two sums; the runs' sums are added in run order, so the bits repeat.
pub(crate) fn sum_over_blocks<S>(
    rows: usize,
    start: impl Fn() -> (S, [Vec<f32>; 2]) + Sync,
    f: impl Fn(&mut S, usize, usize, &mut [Vec<f32>; 2]) + Sync,
) -> [Vec<f32>; 2] {
    let blocks = rows.div_ceil(BLOCK);
    let runs = rayon::current_num_threads().clamp(1, blocks.max(1));
    let per = blocks.div_ceil(runs);
    let run = |t: usize| {
        let (mut scratch, mut sums) = start();
        for i in t * per..((t + 1) * per).min(blocks) {
            let lo = i * BLOCK;
            f(&mut scratch, lo, BLOCK.min(rows - lo), &mut sums);
        }
        sums
    };
    let parts: Vec<_> = if runs > 1 {
        (0..runs).into_par_iter().map(run).collect()
    } else {
        vec![run(0)]
    };
    let mut parts = parts.into_iter();
    let mut total = parts.next().expect("one run at least");
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            t.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    }
    total
}

/// Sizes of one delta: `x [rows, inp]`, `A [r, inp]`, `B [out, r]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    /// Rows of the input.
    pub rows: usize,
    /// Input width.
    pub inp: usize,
    /// Rank.
    pub r: usize,
    /// Output width.
    pub out: usize,
}

/// The forward on slices: `scale·x·Aᵀ·Bᵀ`, `[rows, out]`.
pub(crate) fn forward(x: &[f32], a: &[f32], b: &[f32], k: Size, scale: f32) -> Vec<f32> {
    let Size { rows, inp, r, out } = k;
    let bt = transposed(b, out, r);
    let mut y = uninit(rows * out);
    let yp = SendPtr(y.as_mut_ptr());
    for_blocks(rows, |lo, n| {
        let mut low = vec![0f32; n * r];
        dots(&x[lo * inp..(lo + n) * inp], a, inp, 1.0, &mut low);
        // SAFETY: blocks are disjoint row ranges of `y`, which spans `rows · out`.
        let yb = unsafe { std::slice::from_raw_parts_mut(yp.at(lo * out), n * out) };
        combine(&low, &bt, out, scale, yb);
    });
    y
}

/// A buffer for the input's gradient, empty when nothing upstream trains.
pub(crate) fn input_grad(need: bool, len: usize) -> Vec<f32> {
    if need {
        uninit(len)
    } else {
        Vec::new()
    }
}

/// The backward on slices, for the incoming gradient `g [rows, out]`: the input's gradient
/// (when `need_dx`), dA and dB.
pub(crate) fn backward(
    x: &[f32],
    a: &[f32],
    b: &[f32],
    g: &[f32],
    k: Size,
    s: f32,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let Size { rows, inp, r, out } = k;
    let bt = transposed(b, out, r);
    let mut dx = input_grad(need_dx, rows * inp);
    let dxp = SendPtr(dx.as_mut_ptr());
    // dA [r, in] and dBᵀ/s [r, out].
    let start = || {
        let scratch = (vec![0f32; BLOCK * r], vec![0f32; BLOCK * r]);
        (scratch, [vec![0f32; r * inp], vec![0f32; r * out]])
    };
    let [da, dbt] = sum_over_blocks(rows, start, |(low, dlow), lo, n, [da, dbt]| {
        let (xb, gb) = (&x[lo * inp..(lo + n) * inp], &g[lo * out..(lo + n) * out]);
        let (low, dlow) = (&mut low[..n * r], &mut dlow[..n * r]);
        dots(xb, a, inp, 1.0, low);
        // d_low = s·g·B.
        dots(gb, &bt, out, s, dlow);
        outer_acc(low, gb, out, dbt);
        outer_acc(dlow, xb, inp, da);
        if need_dx {
            // SAFETY: blocks are disjoint row ranges of `dx` (`rows · in`).
            let dxb = unsafe { std::slice::from_raw_parts_mut(dxp.at(lo * inp), n * inp) };
            combine(dlow, a, inp, 1.0, dxb);
        }
    });
    let mut db = transposed(&dbt, r, out);
    db.iter_mut().for_each(|v| *v *= s);
    (need_dx.then_some(dx), da, db)
}

impl CustomOp3 for LowRank {
    fn name(&self) -> &'static str {
        "low-rank-delta"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (rows, inp) = l1.shape().dims2()?;
        let (r, _) = l2.shape().dims2()?;
        let (out, _) = l3.shape().dims2()?;
        let size = Size { rows, inp, r, out };
        crate::gemm_floor::note(Own::LowRank(size, Pass::Forward));
        let y = forward(x, a, b, size, self.scale);
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (r, _) = a.dims2()?;
        let (out, _) = b.dims2()?;
        let grad = grad.contiguous()?;
        let need_dx = x.track_op();
        let s = self.scale;
        let size = Size { rows, inp, r, out };
        crate::gemm_floor::note(Own::LowRank(size, Pass::Backward { dx: need_dx }));
        let (dx, da, db) = with_slices(&[x, a, b, &grad], |v| {
            Ok(backward(v[0], v[1], v[2], v[3], size, s, need_dx))
        })?;
        let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu);
        Ok((
            dx.map(|dx| t(dx, (rows, inp))).transpose()?,
            Some(t(da, (r, inp))?),
            Some(t(db, (out, r))?),
        ))
    }
}
