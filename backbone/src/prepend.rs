//! Virtual rows placed before every sequence: `[p; x[b]]` for each example `b` (prefix
//! tuning's and P-Tuning v2's keys and values in front of the tokens').
//!
//! As candle ops the shared prefix is broadcast over the batch and copied, then concatenated
//! with the tokens in a single-threaded copy; the backward narrows the gradient back apart
//! (two more copies) and sums the broadcast with a strided single-threaded reduction. Here
//! one parallel pass writes each example's rows, and the backward reads the gradient once.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{slice, uninit, with_slices};

/// `[p; x[b]]` along dim 1 for `x [b, t, w]` and `p [len, w]` (shared by every example) or
/// `[b, len, w]` (one per example); returns `[b, len + t, w]`.
pub fn prepend_rows(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (b, _, w) = x.dims3()?;
    let len = match *p.dims() {
        [len, pw] if pw == w => len,
        [pb, len, pw] if pb == b && pw == w => len,
        _ => bail!("prepend rows: rows {:?} before {:?}", p.dims(), x.dims()),
    };
    if crate::fused::eligible(&[x, p]) && len * w > 0 {
        return x.contiguous()?.apply_op2(&p.contiguous()?, Prepend);
    }
    let p = match p.rank() {
        2 => p.unsqueeze(0)?.broadcast_as((b, len, w))?.contiguous()?,
        _ => p.clone(),
    };
    Tensor::cat(&[&p, x], 1)
}

struct Prepend;

/// Sizes of one call: batch, prefix rows, token rows, width, whether `p` is shared.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    len: usize,
    t: usize,
    w: usize,
    shared: bool,
}

impl Dims {
    fn of(x: &[usize], p: &[usize]) -> Self {
        Dims {
            b: x[0],
            len: p[p.len() - 2],
            t: x[1],
            w: x[2],
            shared: p.len() == 2,
        }
    }

    /// The prefix rows example `e` gets, from `p`'s slice.
    fn prefix<'a>(&self, p: &'a [f32], e: usize) -> &'a [f32] {
        let n = self.len * self.w;
        if self.shared {
            p
        } else {
            &p[e * n..(e + 1) * n]
        }
    }
}

impl CustomOp2 for Prepend {
    fn name(&self) -> &'static str {
        "prepend-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, p) = (slice(s1, l1)?, slice(s2, l2)?);
        let k = Dims::of(l1.dims(), l2.dims());
        let (head, tail) = (k.len * k.w, k.t * k.w);
        let mut out = uninit(k.b * (head + tail));
        out.par_chunks_mut(head + tail)
            .zip(x.par_chunks(tail.max(1)))
            .enumerate()
            .for_each(|(e, (o, x))| {
                o[..head].copy_from_slice(k.prefix(p, e));
                o[head..].copy_from_slice(&x[..tail]);
            });
        Ok((CpuStorage::F32(out), Shape::from((k.b, k.len + k.t, k.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let k = Dims::of(x.dims(), p.dims());
        let (head, tail) = (k.len * k.w, k.t * k.w);
        let dx = if x.track_op() {
            let dx = with_slices(&[&g], |s| {
                let mut dx = uninit(k.b * tail);
                dx.par_chunks_mut(tail.max(1))
                    .zip(s[0].par_chunks(head + tail))
                    .for_each(|(dx, g)| dx.copy_from_slice(&g[head..]));
                Ok(dx)
            })?;
            Some(Tensor::from_vec(dx, x.shape(), x.device())?)
        } else {
            None
        };
        let dp = if p.track_op() {
            let dp = with_slices(&[&g], |s| {
                let examples = s[0].par_chunks(head + tail).map(|g| &g[..head]);
                Ok(if k.shared {
                    // Per-example rows summed in example order (a parallel reduction pairs
                    // them as its threads split the work, and the bits would vary run to run).
                    sum_in_order(examples.collect::<Vec<_>>(), head)
                } else {
                    let mut dp = uninit(k.b * head);
                    dp.par_chunks_mut(head)
                        .zip(examples)
                        .for_each(|(d, g)| d.copy_from_slice(g));
                    dp
                })
            })?;
            Some(Tensor::from_vec(dp, p.shape(), p.device())?)
        } else {
            None
        };
        Ok((dx, dp))
    }
}

/// Σ of `rows` (each `n` long), in their order, split over columns in parallel.
fn sum_in_order(rows: Vec<&[f32]>, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    out.par_chunks_mut(crate::fused::GRAIN)
        .enumerate()
        .for_each(|(c, o)| {
            let cols = c * crate::fused::GRAIN..c * crate::fused::GRAIN + o.len();
            for r in &rows {
                for (o, &g) in o.iter_mut().zip(&r[cols.clone()]) {
                    *o += g;
                }
            }
        });
    out
}
