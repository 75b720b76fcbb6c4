//! Fused f32 CPU kernels, each with its own fused backward, behind the ops in [`crate::ops`].
//!
//! Composed from candle primitives, softmax, the norms and GELU allocate a tensor per
//! primitive and run single-threaded, and their backward is a longer chain still. Here each
//! forward and each backward is one pass over the rows, split across rayon tasks.
//!
//! Backward kernels read their inputs directly and build the gradients with
//! `Tensor::from_vec`, so they record no graph: candle detaches gradients anyway, and
//! second-order derivatives are out of scope as they are for candle itself.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D,
};
use rayon::prelude::*;

/// Elements per rayon task: smaller tensors run as one task on the calling thread, where
/// waking the pool would cost more than the work.
pub(crate) const GRAIN: usize = 1 << 14;

/// Whether the fused path applies: every tensor f32 on the CPU, the fused kernels chosen
/// ([`crate::kernels`]), and `x` (the first) at least 1-D and non-empty (the kernels chunk by
/// rows of its last dimension). Anything else takes the composite path.
pub(crate) fn eligible(tensors: &[&Tensor]) -> bool {
    let x = tensors[0];
    tensors
        .iter()
        .all(|t| crate::kernels::fused_on(t.dtype(), t.device()))
        && x.rank() >= 1
        && x.elem_count() > 0
}

/// Whether `p` is a `[d]` vector matching `x`'s last dimension (what the fused norms accept;
/// other broadcastable shapes take the composite path).
pub(crate) fn is_row_vector(p: &Tensor, x: &Tensor) -> bool {
    p.rank() == 1 && x.dims().last() == Some(&p.dims()[0])
}

// ---- helpers -------------------------------------------------------------------------------

/// The contiguous f32 slice a CPU op argument covers.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("fused op: input must be contiguous");
    };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Runs `f` on the f32 slices of contiguous CPU tensors (as backward passes get them).
pub(crate) fn with_slices<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("fused op: tensor is not on the CPU");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            bail!("fused op: tensor must be contiguous");
        };
        slices.push(&cpu.as_slice::<f32>()?[a..b]);
    }
    f(&slices)
}

/// Elements per task for rows of length `d`: whole rows, about [`GRAIN`] elements.
pub(crate) fn step(d: usize) -> usize {
    (GRAIN / d).max(1) * d
}

/// `out[row] = f(a[row])` for every row of length `d`, in parallel over chunks of rows.
fn map_rows(a: &[f32], d: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    // Every caller's `f` writes its whole row.
    let mut out = uninit(a.len());
    let s = step(d);
    out.par_chunks_mut(s)
        .zip(a.par_chunks(s))
        .for_each(|(o, a)| {
            for (o, a) in o.chunks_exact_mut(d).zip(a.chunks_exact(d)) {
                f(a, o);
            }
        });
    out
}

/// `out[row] = f(a[row], b[row])` for every row of length `d`, in parallel over chunks of rows.
fn map_rows2(
    a: &[f32],
    b: &[f32],
    d: usize,
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    // Every caller's `f` writes its whole row.
    let mut out = uninit(a.len());
    let s = step(d);
    out.par_chunks_mut(s)
        .zip(a.par_chunks(s))
        .zip(b.par_chunks(s))
        .for_each(|((o, a), b)| {
            for ((o, a), b) in o
                .chunks_exact_mut(d)
                .zip(a.chunks_exact(d))
                .zip(b.chunks_exact(d))
            {
                f(a, b, o);
            }
        });
    out
}

/// Σ f(xᵢ) over eight lanes: the compiler can vectorise it, and it rounds less than a
/// running sum.
#[inline(always)]
pub(crate) fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ f(xᵢ) in f64 over four lanes, for the per-row statistics of the norms: their backward
/// subtracts nearly equal terms (a length-1 RMS row's gradient is `1 − x²/(x²+ε)` times the
/// incoming one), so the row scalars need more than f32's precision.
#[inline(always)]
fn sum_f64(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; 4];
    let chunks = x.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v as f64)).sum();
    for c in chunks {
        for k in 0..4 {
            acc[k] += f(c[k] as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Σ f(aᵢ, bᵢ) over eight lanes (see [`sum_by`]).
#[inline(always)]
fn sum_by2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The largest element (NaNs ignored, as `f32::max`), over eight lanes so it vectorises.
#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().copied().fold(tail, f32::max)
}

/// The last dimension of a layout.
fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

/// `g` as a contiguous tensor (gradients arriving from broadcasts are strided).
fn contiguous_grad(g: &Tensor) -> Result<Tensor> {
    g.contiguous()
}

/// A buffer for a GEMM to write every element of without reading it (`read_dst` false):
/// zero-filling it first would be a wasted pass over memory.
pub(crate) fn gemm_output(len: usize) -> Vec<f32> {
    uninit(len)
}

/// A buffer whose producer writes every element before anything reads it (zero-filling it
/// first is a single-threaded pass over memory: ~5% of a MiniLM step went to it).
pub(crate) fn uninit(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller (GEMMs, row and elementwise
    // kernels over the whole buffer) writes all `len` elements before anything reads them.
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(len)
    };
    v
}

// ---- vectorisable math ---------------------------------------------------------------------
//
// libm's expf/erff/tanhf are opaque calls, one element at a time, and they dominate these
// kernels. The versions here are branch-free (selects, bit casts), so loops over them
// vectorise; `simd!` compiles such loops again for AVX2 + FMA and for AVX-512 + FMA and picks
// at run time. The polynomials step with explicit fused multiply-adds (`mad`): one rounding
// per step on every build (the baseline build calls libm's correctly rounded `fmaf`, slow but
// equal), so all give bit-identical results; nothing else contracts (Rust does not).

/// Defines `fn $name` whose body is compiled three times, baseline, AVX2 and AVX-512,
/// dispatching on the CPU.
macro_rules! simd {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX-512F and FMA, the features `avx512` was
                    // built with.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA, the features `avx2` was built
                    // with.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use simd;

/// a·b + c with one rounding: a single instruction in the FMA builds of `simd!`.
#[inline(always)]
pub(crate) fn mad(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// e^r for |r| ≤ ln2/2 (Cephes' expf polynomial, about 1 ulp).
#[inline(always)]
fn exp_poly(r: f32) -> f32 {
    let p = 1.987_569_1e-4;
    let p = mad(p, r, 1.398_199_9e-3);
    let p = mad(p, r, 8.333_452e-3);
    let p = mad(p, r, 4.166_579_6e-2);
    let p = mad(p, r, 0.166_666_65);
    let p = mad(p, r, 0.5);
    mad(p, r * r, r) + 1.0
}

/// 2ⁿ for −126 ≤ n ≤ 127, built from its exponent bits.
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    f32::from_bits((n.wrapping_add(127) << 23) as u32)
}

/// Above this e^x overflows 2¹²⁷·√2 (libm still returns its top octave; we return ∞).
const EXP_HI: f32 = 88.376_26;
/// Below this e^x is denormal (libm returns the denormal; we return 0).
const EXP_LO: f32 = -87.336_55;

/// e^x to about 1 ulp (2ⁿ·e^r with n = round(x/ln2)), branch-free; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer.
    let xc = if x > EXP_HI { EXP_HI } else { x };
    let xc = if xc < EXP_LO { EXP_LO } else { xc };
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // r = x − n·ln2, with ln2 split in two so the product is exact.
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let y = exp_poly(r) * pow2i(ni);
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// Φ(x), the standard normal CDF, branch-free, from erfc(|x|/√2) (Numerical Recipes'
/// `erfcc`: relative error < 1.2e-7 for every argument). Working from erfc keeps the lower
/// tail accurate in relative terms, where candle's 1 + erf(z) cancels.
#[inline(always)]
fn phi_fast(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77;
    let p = mad(p, t, -0.822_152_23);
    let p = mad(p, t, 1.488_515_9);
    let p = mad(p, t, -1.135_204);
    let p = mad(p, t, 0.278_868_07);
    let p = mad(p, t, -0.186_288_06);
    let p = mad(p, t, 0.096_784_18);
    let p = mad(p, t, 0.374_091_96);
    let p = mad(p, t, 1.000_023_7);
    let p = mad(p, t, -1.265_512_2);
    let half_erfc = 0.5 * t * exp_fast(p - 0.5 * x * x);
    if x < 0.0 {
        half_erfc
    } else {
        1.0 - half_erfc
    }
}

/// tanh(x) = sign(x)·(1 − 2/(e^{2|x|}+1)), branch-free. Computing the magnitude from the
/// small term 2/(e^{2|x|}+1) keeps 1 + tanh(x) (what GELU uses) accurate as x → −∞; the
/// absolute error is about 1e-7 (relative error grows for |x| ≪ 1, harmless in GELU).
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    let m = 1.0 - 2.0 / (exp_fast(2.0 * x.abs()) + 1.0);
    m.copysign(x)
}

// ---- softmax / log-softmax -----------------------------------------------------------------

simd! {
    /// One row of softmax: max-subtract, exp, normalise.
    pub(crate) fn softmax_row(x: &[f32], y: &mut [f32]) {
        let max = max_of(x);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = exp_fast(x - max);
        }
        let sum = sum_by(y, |v| v);
        for y in y.iter_mut() {
            *y /= sum;
        }
    }
}

simd! {
    /// dx = y ⊙ (g − Σ g⊙y).
    pub(crate) fn softmax_bwd_row(g: &[f32], y: &[f32], dx: &mut [f32]) {
        let s = sum_by2(g, y, |g, y| g * y);
        for ((dx, &g), &y) in dx.iter_mut().zip(g).zip(y) {
            *dx = y * (g - s);
        }
    }
}

simd! {
    /// One row of log-softmax: x − max − ln Σ e^(x − max).
    fn log_softmax_row(x: &[f32], y: &mut [f32]) {
        let max = max_of(x);
        let lse = sum_by(x, |v| exp_fast(v - max)).ln();
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x - max - lse;
        }
    }
}

simd! {
    /// dx = g − exp(y) · Σ g.
    fn log_softmax_bwd_row(g: &[f32], y: &[f32], dx: &mut [f32]) {
        let s = sum_by(g, |v| v);
        for ((dx, &g), &y) in dx.iter_mut().zip(g).zip(y) {
            *dx = g - exp_fast(y) * s;
        }
    }
}

/// A row-wise op over the last dimension whose backward needs only the output gradient and
/// the result (softmax, log-softmax).
struct RowOp {
    name: &'static str,
    fwd: fn(&[f32], &mut [f32]),
    bwd: fn(&[f32], &[f32], &mut [f32]),
}

impl CustomOp1 for RowOp {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = map_rows(slice(s, l)?, last_dim(l), self.fwd);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let g = contiguous_grad(grad)?;
        let d = res.dim(D::Minus1)?;
        let dx = with_slices(&[&g, res], |s| Ok(map_rows2(s[0], s[1], d, self.bwd)))?;
        Ok(Some(Tensor::from_vec(dx, res.shape(), res.device())?))
    }
}

/// Fused softmax over the last dimension (f32, CPU).
pub(crate) fn softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RowOp {
        name: "fused-softmax",
        fwd: softmax_row,
        bwd: softmax_bwd_row,
    })
}

/// Fused log-softmax over the last dimension (f32, CPU).
pub(crate) fn log_softmax(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(RowOp {
        name: "fused-log-softmax",
        fwd: log_softmax_row,
        bwd: log_softmax_bwd_row,
    })
}

// ---- layer norm ----------------------------------------------------------------------------

/// LayerNorm over the last dimension: args `(x, weight [d], bias [d])`.
struct LayerNorm {
    eps: f64,
}

/// Mean and 1/σ of a row, in f64 (two passes: the centred variance does not cancel).
#[inline(always)]
fn mean_rstd(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v) / n;
    let var = sum_f64(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = last_dim(l1);
        if w.len() != d || b.len() != d {
            bail!(
                "fused-layer-norm: width {d}, weight {}, bias {}",
                w.len(),
                b.len()
            );
        }
        let eps = self.eps;
        let y = map_rows(x, d, |x, y| {
            let (mean, rstd) = mean_rstd(x, eps);
            let (mean, rstd) = (mean as f32, rstd as f32);
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = (x - mean) * rstd * w + b;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Untracked arguments (frozen weights, constant inputs) get no gradient: candle would
        // otherwise list them in the gradient store, and their kernels would be wasted work.
        let (need_dx, need_dw, need_db) = (x.track_op(), w.track_op(), b.track_op());
        if !(need_dx || need_dw || need_db) {
            return Ok((None, None, None));
        }
        let g = contiguous_grad(grad)?;
        let d = x.dim(D::Minus1)?;
        let eps = self.eps;
        let (dx, dw, db) = with_slices(&[x, w, &g], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            // One row: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ⊙x̂)) with ĝ = g⊙w; dw += g⊙x̂; db += g.
            let rows = |x: &[f32], g: &[f32], dx: Option<&mut [f32]>| {
                let mut dw = vec![0f32; if need_dw { d } else { 0 }];
                let mut db = vec![0f32; if need_db { d } else { 0 }];
                let mut dx = dx.map(|dx| dx.chunks_exact_mut(d));
                for (x, g) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
                    let (mean, rstd) = mean_rstd(x, eps);
                    if let Some(dx) = dx.as_mut().and_then(|it| it.next()) {
                        layer_norm_dx_row(x, g, w, mean, rstd, dx);
                    }
                    // An empty `dw`/`db` (not asked for) makes its loop a no-op.
                    norm_dw_db_row(x, g, mean as f32, rstd as f32, &mut dw, &mut db);
                }
                (dw, db)
            };
            Ok(run_row_reduction(x, g, d, need_dx, rows))
        })?;
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dw = if need_dw {
            Some(Tensor::from_vec(dw, w.shape(), dev)?)
        } else {
            None
        };
        let db = if need_db {
            Some(Tensor::from_vec(db, b.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

simd! {
    /// One row of LayerNorm's input gradient, dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ⊙x̂)) with
    /// ĝ = g⊙w, x̂ = (x − mean)·rstd; row sums and the subtraction in f64 (see `sum_f64`).
    fn layer_norm_dx_row(x: &[f32], g: &[f32], w: &[f32], mean: f64, rstd: f64, dx: &mut [f32]) {
        let (mut a, mut c) = ([0f64; 4], [0f64; 4]);
        let (xs, gs, ws) = (x.chunks_exact(4), g.chunks_exact(4), w.chunks_exact(4));
        let (xr, gr, wr) = (xs.remainder(), gs.remainder(), ws.remainder());
        for ((x, g), w) in xs.zip(gs).zip(ws) {
            for k in 0..4 {
                let gh = g[k] as f64 * w[k] as f64;
                a[k] += gh;
                c[k] += gh * (x[k] as f64 - mean);
            }
        }
        for (k, ((&x, &g), &w)) in xr.iter().zip(gr).zip(wr).enumerate() {
            let gh = g as f64 * w as f64;
            a[k] += gh;
            c[k] += gh * (x as f64 - mean);
        }
        let n = x.len() as f64;
        let a = a.iter().sum::<f64>() / n;
        let c = c.iter().sum::<f64>() * rstd / n;
        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
            let xh = (x as f64 - mean) * rstd;
            *dx = (rstd * (g as f64 * w as f64 - a - xh * c)) as f32;
        }
    }
}

simd! {
    /// One row's share of a norm's parameter gradients: dw += g⊙(x − mean)·rstd, db += g.
    /// Either may be empty (not wanted); RMSNorm passes mean 0 and its 1/rms.
    fn norm_dw_db_row(x: &[f32], g: &[f32], mean: f32, rstd: f32, dw: &mut [f32], db: &mut [f32]) {
        for ((dw, &x), &g) in dw.iter_mut().zip(x).zip(g) {
            *dw += g * (x - mean) * rstd;
        }
        for (db, &g) in db.iter_mut().zip(g) {
            *db += g;
        }
    }
}

/// Runs a backward kernel over chunks of rows in parallel: `rows(x, g, dx)` writes the
/// chunk's `dx` (when asked for) and returns its partial per-column sums, which are added up.
/// Returns `(dx, sum0, sum1)`.
fn run_row_reduction(
    x: &[f32],
    g: &[f32],
    d: usize,
    need_dx: bool,
    rows: impl Fn(&[f32], &[f32], Option<&mut [f32]>) -> (Vec<f32>, Vec<f32>) + Sync,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let s = step(d);
    // Partial sums added in chunk order (rayon's `reduce_with` pairs them as its threads
    // split the work, and the weight's gradient bits would differ run to run).
    let add = |mut a: (Vec<f32>, Vec<f32>), b: (Vec<f32>, Vec<f32>)| {
        for (a, b) in a.0.iter_mut().zip(&b.0) {
            *a += b;
        }
        for (a, b) in a.1.iter_mut().zip(&b.1) {
            *a += b;
        }
        a
    };
    let chunks = x.par_chunks(s).zip(g.par_chunks(s));
    if need_dx {
        // The norms' `rows` write every row of their chunk.
        let mut dx = uninit(x.len());
        let sums = dx
            .par_chunks_mut(s)
            .zip(chunks)
            .map(|(dx, (x, g))| rows(x, g, Some(dx)))
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(add)
            .unwrap_or_default();
        (Some(dx), sums.0, sums.1)
    } else {
        let sums = chunks
            .map(|(x, g)| rows(x, g, None))
            .collect::<Vec<_>>()
            .into_iter()
            .reduce(add)
            .unwrap_or_default();
        (None, sums.0, sums.1)
    }
}

/// Fused LayerNorm over the last dimension (f32, CPU, `weight`/`bias` of shape `[d]`).
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps })
}

// ---- column ops ----------------------------------------------------------------------------

/// `y + v` (a bias) or `y ⊙ v` ((IA)³'s, DoRA's and VeRA's rescaling) for `y [.., n]` and a
/// vector `v [n]`. candle's backward for the broadcast sums over the leading dims with a
/// strided single-threaded reduction; here the column sums run over row chunks in parallel.
#[derive(Clone, Copy)]
enum ColumnOp {
    Add,
    Mul,
}

/// Σ over rows of `g [rows, n]` (of `g ⊙ x` when `x` is given): partial sums per chunk of
/// rows, then added up.
fn column_sums(g: &[f32], x: Option<&[f32]>, n: usize) -> Vec<f32> {
    let s = step(n);
    (0..g.len().div_ceil(s))
        .into_par_iter()
        .map(|c| {
            let range = c * s..(c * s + s).min(g.len());
            let mut acc = vec![0f32; n];
            match x {
                None => {
                    for row in g[range].chunks_exact(n) {
                        for (a, &g) in acc.iter_mut().zip(row) {
                            *a += g;
                        }
                    }
                }
                Some(x) => {
                    let rows = g[range.clone()]
                        .chunks_exact(n)
                        .zip(x[range].chunks_exact(n));
                    for (g, x) in rows {
                        for ((a, &g), &x) in acc.iter_mut().zip(g).zip(x) {
                            *a += g * x;
                        }
                    }
                }
            }
            acc
        })
        .collect::<Vec<_>>()
        .into_iter()
        // In chunk order: rayon's `reduce` pairs partial sums as its threads happen to split
        // the work, so the bits of a bias's or a scale's gradient would differ run to run.
        .reduce(|mut a, b| {
            for (x, y) in a.iter_mut().zip(&b) {
                *x += y;
            }
            a
        })
        .unwrap_or_else(|| vec![0f32; n])
}

/// `out[row] = y[row] (+ or ⊙) v` for rows of `v.len()`.
fn apply_columns(op: ColumnOp, y: &[f32], v: &[f32]) -> Vec<f32> {
    map_rows(y, v.len(), |r, o| match op {
        ColumnOp::Add => {
            for ((o, &r), &v) in o.iter_mut().zip(r).zip(v) {
                *o = r + v;
            }
        }
        ColumnOp::Mul => {
            for ((o, &r), &v) in o.iter_mut().zip(r).zip(v) {
                *o = r * v;
            }
        }
    })
}

impl CustomOp2 for ColumnOp {
    fn name(&self) -> &'static str {
        match self {
            ColumnOp::Add => "fused-add-bias",
            ColumnOp::Mul => "fused-scale-columns",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = apply_columns(*self, slice(s1, l1)?, slice(s2, l2)?);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = contiguous_grad(grad)?;
        let n = v.elem_count();
        // d/dv: Σ_rows g (bias) or Σ_rows g ⊙ y (scale).
        let dv = if v.track_op() {
            let sums = match self {
                ColumnOp::Add => with_slices(&[&g], |s| Ok(column_sums(s[0], None, n)))?,
                ColumnOp::Mul => with_slices(&[&g, y], |s| Ok(column_sums(s[0], Some(s[1]), n)))?,
            };
            Some(Tensor::from_vec(sums, v.shape(), v.device())?)
        } else {
            None
        };
        // d/dy: g itself (bias) or g ⊙ v (scale).
        let dy = match (y.track_op(), self) {
            (false, _) => None,
            (true, ColumnOp::Add) => Some(g),
            (true, ColumnOp::Mul) => {
                let dy = with_slices(&[&g, v], |s| Ok(apply_columns(*self, s[0], s[1])))?;
                Some(Tensor::from_vec(dy, y.shape(), y.device())?)
            }
        };
        Ok((dy, dv))
    }
}

/// `y [.., n] + b [n]` (f32, CPU).
pub(crate) fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&b.contiguous()?, ColumnOp::Add)
}

/// `x [.., n] ⊙ l [n]` (f32, CPU).
pub(crate) fn scale_columns(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&l.contiguous()?, ColumnOp::Mul)
}

// ---- RMS norm ------------------------------------------------------------------------------

/// RMSNorm over the last dimension: args `(x, weight [d])`.
struct RmsNorm {
    eps: f64,
}

/// 1/rms of a row, in f64.
#[inline(always)]
fn rrms(x: &[f32], eps: f64) -> f64 {
    1.0 / (sum_f64(x, |v| v * v) / x.len() as f64 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let d = last_dim(l1);
        if w.len() != d {
            bail!("fused-rms-norm: width {d}, weight {}", w.len());
        }
        let eps = self.eps;
        let y = map_rows(x, d, |x, y| {
            let r = rrms(x, eps) as f32;
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // As for LayerNorm: no gradient (and no work) for untracked arguments.
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        if !(need_dx || need_dw) {
            return Ok((None, None));
        }
        let g = contiguous_grad(grad)?;
        let d = x.dim(D::Minus1)?;
        let eps = self.eps;
        let (dx, dw, _) = with_slices(&[x, w, &g], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            // One row: dx = r·(ĝ − x̂·mean(ĝ⊙x̂)) with x̂ = r·x, ĝ = g⊙w; dw += g⊙x̂.
            let rows = |x: &[f32], g: &[f32], dx: Option<&mut [f32]>| {
                let mut dw = vec![0f32; if need_dw { d } else { 0 }];
                let mut dx = dx.map(|dx| dx.chunks_exact_mut(d));
                for (x, g) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
                    let r = rrms(x, eps);
                    if let Some(dx) = dx.as_mut().and_then(|it| it.next()) {
                        rms_norm_dx_row(x, g, w, r, dx);
                    }
                    norm_dw_db_row(x, g, 0.0, r as f32, &mut dw, &mut []);
                }
                (dw, Vec::new())
            };
            Ok(run_row_reduction(x, g, d, need_dx, rows))
        })?;
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dw = if need_dw {
            Some(Tensor::from_vec(dw, w.shape(), dev)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

simd! {
    /// One row of RMSNorm's input gradient, dx = r·(ĝ − x̂·mean(ĝ⊙x̂)) with ĝ = g⊙w, x̂ = r·x;
    /// the row sum and the subtraction in f64 (see `sum_f64`).
    fn rms_norm_dx_row(x: &[f32], g: &[f32], w: &[f32], r: f64, dx: &mut [f32]) {
        let mut c = [0f64; 4];
        let (xs, gs, ws) = (x.chunks_exact(4), g.chunks_exact(4), w.chunks_exact(4));
        let (xr, gr, wr) = (xs.remainder(), gs.remainder(), ws.remainder());
        for ((x, g), w) in xs.zip(gs).zip(ws) {
            for k in 0..4 {
                c[k] += g[k] as f64 * w[k] as f64 * x[k] as f64;
            }
        }
        for (k, ((&x, &g), &w)) in xr.iter().zip(gr).zip(wr).enumerate() {
            c[k] += g as f64 * w as f64 * x as f64;
        }
        let k = c.iter().sum::<f64>() * r * r / x.len() as f64;
        for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
            *dx = (r * (g as f64 * w as f64 - x as f64 * k)) as f32;
        }
    }
}

/// Fused RMSNorm over the last dimension (f32, CPU, `weight` of shape `[d]`).
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

// ---- activations ---------------------------------------------------------------------------

/// The elementwise activations with a fused kernel.
#[derive(Clone, Copy)]
pub(crate) enum Act {
    /// GELU with the exact erf, as candle's `gelu_erf`.
    GeluErf,
    /// GELU's tanh approximation, as candle's `gelu`.
    GeluTanh,
    /// x·σ(x), as candle's `silu`.
    Silu,
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_TWO_PI: f32 = 0.398_942_3;
const GELU_C: f32 = 0.044715;

/// GELU with erf: v·Φ(v) = ½v(1 + erf(v/√2)), candle's `gelu_erf`.
#[inline(always)]
fn gelu_erf(v: f32) -> f32 {
    v * phi_fast(v)
}

/// d/dv GELU(v) = Φ(v) + v·φ(v).
#[inline(always)]
fn gelu_erf_grad(v: f32) -> f32 {
    phi_fast(v) + v * INV_SQRT_TWO_PI * exp_fast(-0.5 * v * v)
}

/// GELU's tanh form, as candle's `gelu` expression.
#[inline(always)]
fn gelu_tanh(v: f32) -> f32 {
    0.5 * v * (1.0 + tanh_fast(SQRT_TWO_OVER_PI * v * (1.0 + GELU_C * v * v)))
}

/// ½(1+t) + ½v(1−t²)·c(1+3·0.044715·v²), t = tanh(c(v+0.044715·v³)).
#[inline(always)]
fn gelu_tanh_grad(v: f32) -> f32 {
    let t = tanh_fast(SQRT_TWO_OVER_PI * v * (1.0 + GELU_C * v * v));
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_C * v * v)
}

/// v·σ(v), as candle's `silu` expression.
#[inline(always)]
fn silu(v: f32) -> f32 {
    v / (1.0 + exp_fast(-v))
}

/// σ(v)·(1 + v·(1 − σ(v))).
#[inline(always)]
fn silu_grad(v: f32) -> f32 {
    let s = 1.0 / (1.0 + exp_fast(-v));
    s * (1.0 + v * (1.0 - s))
}

simd! {
    /// y = act(x), elementwise (one loop per activation, so each vectorises).
    pub(crate) fn act_fwd(act: Act, x: &[f32], y: &mut [f32]) {
        // Plain loops: a `for_each` closure may stay out of line, outside the AVX2 build.
        let it = y.iter_mut().zip(x);
        match act {
            Act::GeluErf => {
                for (y, &x) in it {
                    *y = gelu_erf(x);
                }
            }
            Act::GeluTanh => {
                for (y, &x) in it {
                    *y = gelu_tanh(x);
                }
            }
            Act::Silu => {
                for (y, &x) in it {
                    *y = silu(x);
                }
            }
        }
    }
}

simd! {
    /// dx = g · act'(x), elementwise.
    pub(crate) fn act_bwd(act: Act, x: &[f32], g: &[f32], dx: &mut [f32]) {
        let it = dx.iter_mut().zip(x).zip(g);
        match act {
            Act::GeluErf => {
                for ((d, &x), &g) in it {
                    *d = g * gelu_erf_grad(x);
                }
            }
            Act::GeluTanh => {
                for ((d, &x), &g) in it {
                    *d = g * gelu_tanh_grad(x);
                }
            }
            Act::Silu => {
                for ((d, &x), &g) in it {
                    *d = g * silu_grad(x);
                }
            }
        }
    }
}

impl Act {
    fn name(self) -> &'static str {
        match self {
            Act::GeluErf => "fused-gelu-erf",
            Act::GeluTanh => "fused-gelu-tanh",
            Act::Silu => "fused-silu",
        }
    }
}

impl CustomOp1 for Act {
    fn name(&self) -> &'static str {
        Act::name(*self)
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let act = *self;
        // Elementwise: any split works, so chunk the flat buffer.
        let x = slice(s, l)?;
        let mut y = uninit(x.len());
        y.par_chunks_mut(GRAIN)
            .zip(x.par_chunks(GRAIN))
            .for_each(|(y, x)| act_fwd(act, x, y));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let act = *self;
        let g = contiguous_grad(grad)?;
        let dx = with_slices(&[arg, &g], |s| {
            let (x, g) = (s[0], s[1]);
            let mut dx = uninit(x.len());
            dx.par_chunks_mut(GRAIN)
                .zip(x.par_chunks(GRAIN))
                .zip(g.par_chunks(GRAIN))
                .for_each(|((dx, x), g)| act_bwd(act, x, g, dx));
            Ok(dx)
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// Fused elementwise activation (f32, CPU).
pub(crate) fn activate(x: &Tensor, act: Act) -> Result<Tensor> {
    x.contiguous()?.apply_op1(act)
}
