//! Scaled dot-product attention as one f32 CPU op with its own backward.
//!
//! Composed from candle primitives, attention is a copy per head split, two batched matmuls
//! that run each (batch, head) pair as its own small multi-threaded GEMM, a scale, a bias add
//! and a softmax, and a backward twice as long, and it keeps every `t × s` probability of every
//! head for the backward. Here the work is tiled over queries: each (batch, head, query tile)
//! is one rayon task doing single-threaded GEMMs on strided views of the token-major
//! projections, with the scale, bias and softmax applied in place on a `tile × s` block, and
//! the backward recomputes each tile's probabilities (the same function, so the same bits)
//! instead of keeping them. What attention holds between forward and backward is then linear
//! in length: q, k, v and the one additive mask the whole model shares. A query tile's row of
//! scores is whole (`s` floats), so the softmax needs no online rescaling at these lengths.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::fused::{gemm_output, slice, softmax_bwd_row, softmax_row, with_slices};
use crate::ops::Visible;

/// `softmax(q·kᵀ·scale + bias)·v` over token-major `q [b, t, heads·d]` and
/// `k, v [b, s, kv_heads·d]`; the result is token-major `[b, t, heads·d]`.
struct Attention {
    /// Which keys each query sees (contiguous); carries no gradient.
    visible: Visible,
    /// The packed rows' example per key, `[b, s]` flat, read on the host.
    segments: Option<Vec<u32>>,
    /// Each query's own key, `[b, t]` flat, when not the last `t` keys in order.
    queries: Option<Vec<u32>>,
    heads: usize,
    kv_heads: usize,
    scale: f32,
}

/// Sizes shared by the forward and backward kernels.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    s: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    bias_b: usize,
}

impl Dims {
    /// Row strides of the token-major q (and output) and k/v.
    fn q_rs(&self) -> usize {
        self.heads * self.d
    }
    fn kv_rs(&self) -> usize {
        self.kv_heads * self.d
    }
    /// Offset of head `h` of batch `bi` in q, and of kv head `g` in k/v.
    fn q_at(&self, bi: usize, h: usize) -> usize {
        bi * self.t * self.q_rs() + h * self.d
    }
    fn kv_at(&self, bi: usize, g: usize) -> usize {
        bi * self.s * self.kv_rs() + g * self.d
    }
    fn bias_rows(&self, bi: usize) -> usize {
        (if self.bias_b == 1 { 0 } else { bi }) * self.t * self.s
    }
}

/// A strided f32 matrix view for [`mm`]: pointer, row stride, column stride.
#[derive(Clone, Copy)]
struct View(*const f32, isize, isize);

/// `dst[m, n] (= or +=) scale · lhs[m, k] · rhs[k, n]`, single-threaded (the caller
/// parallelises over heads).
///
/// # Safety
/// Every view must cover its matrix and `dst` must be valid for writes.
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    scale: f32,
) {
    candle_core::gemm_trace::record(candle_core::gemm_trace::Gemm {
        batch: 1,
        m,
        n,
        k,
        lhs_skip: 0,
        rhs_skip: 0,
        lhs_cs: lhs.2,
        lhs_rs: lhs.1,
        rhs_cs: rhs.2,
        rhs_rs: rhs.1,
        threaded: false,
    });
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2,
        lhs.1,
        rhs.0,
        rhs.2,
        rhs.1,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        Parallelism::None,
    )
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// A method, so closures capture the whole `SendPtr` rather than its raw field.
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, t, qw) = q.shape().dims3()?;
        let (kb, s, kw) = k.shape().dims3()?;
        if v.shape().dims() != k.shape().dims() || kb != b {
            bail!(
                "fused attention: q {:?}, k {:?}, v {:?} do not agree",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || qw % heads != 0 {
            bail!("fused attention: {heads} heads over {kv_heads} kv heads, width {qw}");
        }
        let d = qw / heads;
        if kw != kv_heads * d {
            bail!("fused attention: k width {kw}, expected {kv_heads} × {d}");
        }
        let bias_b = match &self.visible {
            Visible::Bias(bias) => {
                let dims = bias.dims();
                let bb = dims.first().copied().unwrap_or(0);
                if dims.len() != 4 || !(bb == 1 || bb == b) || dims[1..] != [1, t, s] {
                    bail!("fused attention: bias {dims:?} does not fit [{b}, 1, {t}, {s}]");
                }
                bb
            }
            Visible::Keys { keys, .. } => {
                if keys.dims() != [b, s] || s < t {
                    bail!(
                        "fused attention: key mask {:?} does not fit [{b}, {s}] for {t} queries",
                        keys.dims()
                    );
                }
                if self.segments.as_ref().is_some_and(|g| g.len() != b * s) {
                    bail!("fused attention: segment ids do not fit [{b}, {s}]");
                }
                if let Some(q) = &self.queries {
                    if q.len() != b * t || q.iter().any(|&j| j as usize >= s) {
                        bail!(
                            "fused attention: query positions do not fit [{b}, {t}] over {s} keys"
                        );
                    }
                }
                b
            }
        };
        Ok(Dims {
            b,
            t,
            s,
            heads,
            kv_heads,
            d,
            bias_b,
        })
    }
}

impl Attention {
    /// The mask's tensor, whichever form it has.
    fn mask(&self) -> &Tensor {
        match &self.visible {
            Visible::Bias(t) | Visible::Keys { keys: t, .. } => t,
        }
    }
}

/// Queries per tile: a task holds one tile's scores, `QUERY_TILE × s` floats, never `t × s`.
const QUERY_TILE: usize = 64;

impl Attention {
    /// The softmax of one query tile's scores into `p` (`rows × s`): rows `r0..r0 + rows` of
    /// head `h` of batch `bi`, over every key of kv head `g`. The forward and the backward both
    /// call it, so the backward's recomputed probabilities are the forward's, bit for bit.
    ///
    /// # Safety
    /// `q` and `k` must be the checked operands of `n`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_probs(
        &self,
        n: &Dims,
        q: &[f32],
        k: &[f32],
        mask: &[f32],
        (bi, h, g): (usize, usize, usize),
        r0: usize,
        rows: usize,
        p: &mut [f32],
    ) {
        let s = n.s;
        // scores = q_h[r0..] · k_gᵀ · scale
        mm(
            rows,
            s,
            n.d,
            p.as_mut_ptr(),
            s,
            false,
            View(
                q.as_ptr().add(n.q_at(bi, h) + r0 * n.q_rs()),
                n.q_rs() as isize,
                1,
            ),
            View(k.as_ptr().add(n.kv_at(bi, g)), 1, n.kv_rs() as isize),
            self.scale,
        );
        let mut row = vec![0f32; s];
        match &self.visible {
            Visible::Bias(_) => {
                let bias = &mask[n.bias_rows(bi) + r0 * s..][..rows * s];
                for (p, b) in p.chunks_mut(s).zip(bias.chunks(s)) {
                    for ((r, &x), &b) in row.iter_mut().zip(p.iter()).zip(b) {
                        *r = x + b;
                    }
                    softmax_row(&row, p);
                }
            }
            Visible::Keys { causal, .. } => {
                let keys = &mask[bi * s..][..s];
                let segments = self.segments.as_ref().map(|g| &g[bi * s..][..s]);
                let queries = self.queries.as_ref().map(|q| &q[bi * n.t..][..n.t]);
                for (i, p) in p.chunks_mut(s).enumerate() {
                    // The query's own key: the last t keys in order unless given.
                    let own_key = queries.map_or(r0 + i + s - n.t, |q| q[r0 + i] as usize);
                    // Keys after `last` are hidden from query r0 + i in a decoder (the same
                    // f32::MIN the dense bias holds there).
                    let last = if *causal { own_key } else { s - 1 };
                    for (j, ((r, &x), &b)) in row.iter_mut().zip(p.iter()).zip(keys).enumerate() {
                        *r = x + if j > last { f32::MIN } else { b };
                    }
                    if let Some(seg) = segments {
                        // Another example's keys are hidden; example 0's are shared.
                        let own = seg[own_key];
                        for (r, &g) in row.iter_mut().zip(seg) {
                            if g != 0 && g != own {
                                *r = f32::MIN;
                            }
                        }
                    }
                    softmax_row(&row, p);
                }
            }
        }
    }
}

/// Query tiles of a sequence of `t`: (first row, rows).
fn tiles(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t)
        .step_by(QUERY_TILE)
        .map(move |r0| (r0, QUERY_TILE.min(t - r0)))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.dims(ql, kl, vl)?;
        let (q, k, v) = (slice(qs, ql)?, slice(ks, kl)?, slice(vs, vl)?);
        let (t, s, d) = (n.t, n.s, n.d);
        let rep = n.heads / n.kv_heads;
        let mut out = gemm_output(n.b * t * n.q_rs());
        let out_ptr = SendPtr(out.as_mut_ptr());
        let per_head: Vec<(usize, usize)> = tiles(t).collect();
        with_slices(&[self.mask()], |slices| {
            let bias = slices[0];
            // One task per (batch, head, query tile); nothing of size t × s is kept.
            (0..n.b * n.heads * per_head.len())
                .into_par_iter()
                .for_each(|task| {
                    let (bh, tile) = (task / per_head.len(), task % per_head.len());
                    let (bi, h) = (bh / n.heads, bh % n.heads);
                    let g = h / rep;
                    let (r0, rows) = per_head[tile];
                    let mut p = gemm_output(rows * s);
                    // SAFETY: offsets stay inside q, k, v (checked shapes); rows r0.. of the
                    // output columns h·d.. of batch bi belong to this task alone.
                    unsafe {
                        self.tile_probs(&n, q, k, bias, (bi, h, g), r0, rows, &mut p);
                        // out_h[r0..] = probs · v_g
                        mm(
                            rows,
                            d,
                            s,
                            out_ptr.at(n.q_at(bi, h) + r0 * n.q_rs()),
                            n.q_rs(),
                            false,
                            View(p.as_ptr(), s as isize, 1),
                            View(v.as_ptr().add(n.kv_at(bi, g)), n.kv_rs() as isize, 1),
                            1.0,
                        );
                    }
                });
            Ok(())
        })?;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.dims(q.layout(), k.layout(), v.layout())?;
        let grad = grad.contiguous()?;
        let (t, s, d) = (n.t, n.s, n.d);
        let rep = n.heads / n.kv_heads;
        let mut dq = gemm_output(q.elem_count());
        let mut dk = gemm_output(k.elem_count());
        let mut dv = gemm_output(v.elem_count());
        let (dq_p, dk_p, dv_p) = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        with_slices(&[q, k, v, &grad, self.mask()], |slices| {
            let [qv, kv, vv, gv, bias] = [slices[0], slices[1], slices[2], slices[3], slices[4]];
            // One task per (batch, kv head): the heads sharing a kv head add into the same
            // dk/dv block, so they run in sequence inside the task. Each query tile's
            // probabilities are recomputed rather than kept from the forward.
            (0..n.b * n.kv_heads).into_par_iter().for_each(|bg| {
                let (bi, g) = (bg / n.kv_heads, bg % n.kv_heads);
                let ka = n.kv_at(bi, g);
                let mut p = gemm_output(QUERY_TILE.min(t) * s);
                let mut ds = gemm_output(QUERY_TILE.min(t) * s);
                let mut row = vec![0f32; s];
                let mut first = true;
                for h in g * rep..(g + 1) * rep {
                    for (r0, rows) in tiles(t) {
                        let (p, ds) = (&mut p[..rows * s], &mut ds[..rows * s]);
                        let qa = n.q_at(bi, h) + r0 * n.q_rs();
                        let go = View(gv.as_ptr().wrapping_add(qa), n.q_rs() as isize, 1);
                        // SAFETY: as in the forward; rows r0.. of dq's head-h columns and the
                        // dk/dv block of (bi, g) belong to this task alone.
                        unsafe {
                            self.tile_probs(&n, qv, kv, bias, (bi, h, g), r0, rows, p);
                            // dv_g += probsᵀ · dout
                            mm(
                                s,
                                d,
                                rows,
                                dv_p.at(ka),
                                n.kv_rs(),
                                !first,
                                View(p.as_ptr(), 1, s as isize),
                                go,
                                1.0,
                            );
                            // dprobs = dout · v_gᵀ
                            mm(
                                rows,
                                s,
                                d,
                                ds.as_mut_ptr(),
                                s,
                                false,
                                go,
                                View(vv.as_ptr().add(ka), 1, n.kv_rs() as isize),
                                1.0,
                            );
                        }
                        // dscores = softmax backward of dprobs (the scale goes in below).
                        for (dsr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                            row.copy_from_slice(dsr);
                            softmax_bwd_row(&row, pr, dsr);
                        }
                        unsafe {
                            // dq_h[r0..] = dscores · k_g · scale
                            mm(
                                rows,
                                d,
                                s,
                                dq_p.at(qa),
                                n.q_rs(),
                                false,
                                View(ds.as_ptr(), s as isize, 1),
                                View(kv.as_ptr().add(ka), n.kv_rs() as isize, 1),
                                self.scale,
                            );
                            // dk_g += dscoresᵀ · q_h[r0..] · scale
                            mm(
                                s,
                                d,
                                rows,
                                dk_p.at(ka),
                                n.kv_rs(),
                                !first,
                                View(ds.as_ptr(), 1, s as isize),
                                View(qv.as_ptr().add(qa), n.q_rs() as isize, 1),
                                self.scale,
                            );
                        }
                        first = false;
                    }
                }
            });
            Ok(())
        })?;
        let dev = q.device();
        let wrap = |x: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            Ok(if like.track_op() {
                Some(Tensor::from_vec(x, like.shape(), dev)?)
            } else {
                None
            })
        };
        Ok((wrap(dq, q)?, wrap(dk, k)?, wrap(dv, v)?))
    }
}

/// Fused attention (f32, CPU) over token-major `q [b, t, heads·d]`, `k, v [b, s,
/// kv_heads·d]` and which keys each query sees: `[b, t, heads·d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Visible,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let host = |x: &Option<Tensor>| -> Result<Option<Vec<u32>>> {
        x.as_ref()
            .map(|g| g.flatten_all()?.to_vec1::<u32>())
            .transpose()
    };
    let (visible, segments, queries) = match visible {
        Visible::Bias(b) => (Visible::Bias(b.contiguous()?), None, None),
        Visible::Keys {
            keys,
            causal,
            segments,
            queries,
        } => (
            Visible::Keys {
                keys: keys.contiguous()?,
                causal: *causal,
                segments: None,
                queries: None,
            },
            host(segments)?,
            host(queries)?,
        ),
    };
    let op = Attention {
        visible,
        segments,
        queries,
        heads,
        kv_heads,
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}
