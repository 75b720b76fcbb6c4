//! `x·(s·W1 ⊗ W2)ᵀ` (what a Kronecker-factored update adds to a projection) as one f32 CPU
//! op with its own backward, without building the `[out, in]` matrix.
//!
//! An input row seen as a `[c, d]` block X gives the output block `[a, b]` = s·W1·X·W2ᵀ for
//! `W1 [a, c]` and `W2 [b, d]`: `d·b·c + c·b·a` multiply-adds a row instead of `a·b·c·d`.
//! As candle ops the same products are skinny GEMMs joined by strided copies of every row
//! (a transpose of the last two axes each way), which cost more than the dense product at
//! MiniLM's widths. Here a block of rows goes through both factors while it is in cache, and
//! the backward reads the input and the incoming gradient once for all three gradients;
//! every product is `small_gemm`'s register-blocked tiles (plain loops over these short
//! rows were bound by loads and stores).

use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor, D};

use crate::attention::SendPtr;
use crate::fused::{simd, slice, uninit, with_slices};
use crate::gemm_floor::{Own, Pass};
use crate::low_rank::{for_blocks, input_grad, sum_over_blocks, transposed, BLOCK};
use crate::small_gemm::{small_gemm, Strided};

/// `x [.., c·d]·(scale·w1 ⊗ w2)ᵀ` for `w1 [a, c]`, `w2 [b, d]`; returns `[.., a·b]`. Element
/// `(i·b + k, j·d + l)` of the Kronecker product is `w1[i, j]·w2[k, l]`.
pub fn kronecker_product(x: &Tensor, w1: &Tensor, w2: &Tensor, scale: f64) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, d) = w2.dims2()?;
    let inp = x.dim(D::Minus1)?;
    if inp != c * d {
        bail!(
            "Kronecker product: input {:?} against factors {:?} ⊗ {:?}",
            x.dims(),
            w1.dims(),
            w2.dims()
        );
    }
    let rows = x.elem_count() / inp.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = a * b;
    let x2 = x.contiguous()?.reshape((rows, inp))?;
    let y = if crate::fused::eligible(&[x, w1, w2]) && a * b * c * d > 0 {
        x2.apply_op3(
            &w1.contiguous()?,
            &w2.contiguous()?,
            Kronecker {
                scale: scale as f32,
            },
        )?
    } else {
        // X·W2ᵀ for every row's c blocks, then W1 over the c axis.
        let t = x2.reshape((rows * c, d))?.matmul(&w2.t()?)?;
        let t = t.reshape((rows, c, b))?.transpose(1, 2)?.contiguous()?;
        let y = t.reshape((rows * b, c))?.matmul(&w1.t()?)?;
        let y = y.reshape((rows, b, a))?.transpose(1, 2)?.contiguous()?;
        (y.reshape((rows, a * b))? * scale)?
    };
    y.reshape(dims)
}

struct Kronecker {
    scale: f32,
}

/// Sizes of one op: `w1 [a, c]`, `w2 [b, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Rows of `w1`.
    pub a: usize,
    /// Rows of `w2`.
    pub b: usize,
    /// Columns of `w1`.
    pub c: usize,
    /// Columns of `w2`.
    pub d: usize,
}

simd! {
    /// `n` rows: `t = x·w2ᵀ` (`[n·c, b]`, kept for the caller) and, unless `y` is empty,
    /// `y = s·w1·t` per row.
    fn forward_rows(x: &[f32], w1: &[f32], w2t: &[f32], k: Dims, s: f32, t: &mut [f32], y: &mut [f32]) {
        let rows = x.len() / (k.c * k.d);
        small_gemm((rows * k.c, k.d, k.b), Strided::rows(x, k.d), w2t, k.b, 1.0, t, k.b, false);
        for (ti, yi) in t.chunks_exact(k.c * k.b).zip(y.chunks_exact_mut(k.a * k.b)) {
            small_gemm((k.a, k.c, k.b), Strided::rows(w1, k.c), ti, k.b, s, yi, k.b, false);
        }
    }
}

simd! {
    /// `n` rows of the backward: `u = w1ᵀ·g` per row, the input's gradient `s·u·w2` when
    /// `dx` is not empty, and `dw1 += g·tᵀ`, `dw2 += uᵀ·x` (unscaled); `tt` holds one row's
    /// `tᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn backward_rows(x: &[f32], g: &[f32], t: &[f32], w1: &[f32], w2: &[f32], k: Dims, s: f32,
                     u: &mut [f32], tt: &mut [f32], dx: &mut [f32], dw1: &mut [f32],
                     dw2: &mut [f32]) {
        let (cb, ab) = (k.c * k.b, k.a * k.b);
        for ((gi, ti), ui) in g.chunks_exact(ab).zip(t.chunks_exact(cb)).zip(u.chunks_exact_mut(cb)) {
            small_gemm((k.c, k.a, k.b), Strided::transposed(w1, k.c), gi, k.b, 1.0, ui, k.b, false);
            // dw1 [a, c] += g·tᵀ: the right factor must be row-major, so this row's t is transposed.
            for (j, tr) in ti.chunks_exact(k.b).enumerate() {
                for (kk, &v) in tr.iter().enumerate() {
                    tt[kk * k.c + j] = v;
                }
            }
            small_gemm((k.a, k.b, k.c), Strided::rows(gi, k.b), tt, k.c, 1.0, dw1, k.c, true);
        }
        let rows = u.len() / k.b;
        if !dx.is_empty() {
            small_gemm((rows, k.b, k.d), Strided::rows(u, k.b), w2, k.d, s, dx, k.d, false);
        }
        // dw2 [b, d] += uᵀ·x over the block's c-rows.
        small_gemm((k.b, rows, k.d), Strided::transposed(u, k.b), x, k.d, 1.0, dw2, k.d, true);
    }
}

/// The forward on slices: `x [rows, c·d]·(scale·w1 ⊗ w2)ᵀ`, `[rows, a·b]`.
pub(crate) fn forward(
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    rows: usize,
    k: Dims,
    scale: f32,
) -> Vec<f32> {
    let Dims { a, b, c, d } = k;
    let (inp, out) = (c * d, a * b);
    let w2t = transposed(w2, b, d);
    let mut y = uninit(rows * out);
    let yp = SendPtr(y.as_mut_ptr());
    for_blocks(rows, |lo, n| {
        let mut t = vec![0f32; n * c * b];
        // SAFETY: blocks are disjoint row ranges of `y`, which spans `rows · out`.
        let yb = unsafe { std::slice::from_raw_parts_mut(yp.at(lo * out), n * out) };
        forward_rows(&x[lo * inp..(lo + n) * inp], w1, &w2t, k, scale, &mut t, yb);
    });
    y
}

/// The backward on slices, for the incoming gradient `g [rows, a·b]`: the input's gradient
/// (when `need_dx`) and the factors' gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    g: &[f32],
    rows: usize,
    k: Dims,
    s: f32,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let Dims { a, b, c, d } = k;
    let (inp, out) = (c * d, a * b);
    let w2t = transposed(w2, b, d);
    let mut dx = input_grad(need_dx, rows * inp);
    let dxp = SendPtr(dx.as_mut_ptr());
    // The factors' gradients, unscaled.
    let start = || {
        let scratch = (
            vec![0f32; BLOCK * c * b],
            vec![0f32; BLOCK * c * b],
            vec![0f32; c * b],
        );
        (scratch, [vec![0f32; a * c], vec![0f32; b * d]])
    };
    let [mut dw1, mut dw2] = sum_over_blocks(rows, start, |(t, u, tt), lo, n, [dw1, dw2]| {
        let (xb, gb) = (&x[lo * inp..(lo + n) * inp], &g[lo * out..(lo + n) * out]);
        let (t, u) = (&mut t[..n * c * b], &mut u[..n * c * b]);
        forward_rows(xb, w1, &w2t, k, s, t, &mut []);
        let dxb: &mut [f32] = if need_dx {
            // SAFETY: blocks are disjoint row ranges of `dx` (`rows · in`).
            unsafe { std::slice::from_raw_parts_mut(dxp.at(lo * inp), n * inp) }
        } else {
            &mut []
        };
        backward_rows(xb, gb, t, w1, w2, k, s, u, tt, dxb, dw1, dw2);
    });
    dw1.iter_mut().chain(dw2.iter_mut()).for_each(|v| *v *= s);
    (need_dx.then_some(dx), dw1, dw2)
}

impl CustomOp3 for Kronecker {
    fn name(&self) -> &'static str {
        "kronecker-product"
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
        let (x, w1, w2) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (rows, _) = l1.shape().dims2()?;
        let (a, c) = l2.shape().dims2()?;
        let (b, d) = l3.shape().dims2()?;
        let k = Dims { a, b, c, d };
        crate::gemm_floor::note(Own::Kronecker(rows, k, Pass::Forward));
        let y = forward(x, w1, w2, rows, k, self.scale);
        let out = a * b;
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w1: &Tensor,
        w2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (a, c) = w1.dims2()?;
        let (b, d) = w2.dims2()?;
        let k = Dims { a, b, c, d };
        let grad = grad.contiguous()?;
        let need_dx = x.track_op();
        let s = self.scale;
        crate::gemm_floor::note(Own::Kronecker(rows, k, Pass::Backward { dx: need_dx }));
        let (dx, dw1, dw2) = with_slices(&[x, w1, w2, &grad], |v| {
            Ok(backward(v[0], v[1], v[2], v[3], rows, k, s, need_dx))
        })?;
        let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu);
        Ok((
            dx.map(|dx| t(dx, (rows, inp))).transpose()?,
            Some(t(dw1, (a, c))?),
            Some(t(dw2, (b, d))?),
        ))
    }
}
