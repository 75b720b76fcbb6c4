//! Rotary position embedding as one fused f32 CPU op on the token-major projections.
//!
//! Composed from candle primitives, RoPE on `[b, t, heads·d]` needs a transpose to
//! `[b, heads, t, d]`, a `rotate_half` (two narrows, a negation and a concatenation), two
//! broadcast products, a sum and a transpose back, each a pass over q or k, and its backward
//! is longer. Here each token's heads are rotated in place of a copy, forward and backward in
//! one pass each. No FMA contraction: the results equal the composite's bit for bit.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{slice, step, with_slices};

crate::fused::simd! {
    /// One token's heads (`x` is `heads·d` long). Forward: `x·cos + rotate_half(x)·sin`;
    /// backward: that map's transpose applied to the gradient.
    fn rope_row(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [f32], backward: bool) {
        let d = cos.len();
        let half = d / 2;
        let (c1, c2) = cos.split_at(half);
        let (s1, s2) = sin.split_at(half);
        for (x, y) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            let lanes = y1.iter_mut().zip(y2.iter_mut()).zip(x1.iter().zip(x2));
            let tables = c1.iter().zip(c2).zip(s1.iter().zip(s2));
            for (((y1, y2), (&a, &b)), ((&c1, &c2), (&s1, &s2))) in lanes.zip(tables) {
                if backward {
                    *y1 = a * c1 + b * s2;
                    *y2 = b * c2 - a * s1;
                } else {
                    *y1 = a * c1 - b * s1;
                    *y2 = b * c2 + a * s2;
                }
            }
        }
    }
}

/// The op: tables `[rows, d]` where `rows` is the sequence length (shared by the batch) or
/// batch × length (a position per token).
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    d: usize,
    len: usize,
}

impl Rope {
    /// Rotates every token row of `x` (`[b·t, heads·d]` flat).
    fn run(&self, x: &[f32], width: usize, backward: bool) -> Vec<f32> {
        let mut y = vec![0f32; x.len()];
        let per_token = self.cos.len() / self.d != self.len;
        let rows_per_task = step(width) / width;
        y.par_chunks_mut(rows_per_task * width)
            .zip(x.par_chunks(rows_per_task * width))
            .enumerate()
            .for_each(|(task, (y, x))| {
                for (k, (y, x)) in y
                    .chunks_exact_mut(width)
                    .zip(x.chunks_exact(width))
                    .enumerate()
                {
                    let row = task * rows_per_task + k;
                    let at = if per_token { row } else { row % self.len } * self.d;
                    let (c, s) = (&self.cos[at..at + self.d], &self.sin[at..at + self.d]);
                    rope_row(x, c, s, y, backward);
                }
            });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = *l.dims().last().unwrap_or(&0);
        let y = self.run(slice(s, l)?, width, false);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !arg.track_op() {
            return Ok(None);
        }
        let g = grad.contiguous()?;
        let width = arg.dim(2)?;
        let dx = with_slices(&[&g], |s| Ok(self.run(s[0], width, true)))?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// RoPE on token-major `x [b, t, heads·d]` with `cos`/`sin` `[t, d]` or `[b·t, d]` (f32, CPU).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let (rows, d) = cos.dims2()?;
    if sin.dims() != cos.dims() || heads == 0 || width != heads * d || d % 2 != 0 {
        bail!(
            "rope: x {:?} with {heads} heads, cos {:?}, sin {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        );
    }
    if rows != t && rows != b * t {
        bail!("rope: {rows} table rows for {b} × {t} tokens");
    }
    let table = |v: &Tensor| v.flatten_all()?.to_vec1::<f32>();
    let op = Rope {
        cos: table(cos)?,
        sin: table(sin)?,
        d,
        len: t,
    };
    x.contiguous()?.apply_op1(op)
}
