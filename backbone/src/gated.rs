//! A gated feed-forward's `act(gate) ⊙ up` (Llama's SwiGLU) as one fused f32 CPU op.
//!
//! As two ops, the product keeps `act(gate)` alive for its backward beside `gate` (which the
//! activation's backward reads) and `up`: one more `[tokens, ffn]` tensor per layer, and one
//! more pass each way. Here the backward recomputes `act(gate)` from `gate`, with the same
//! kernels as the separate ops, so the results are theirs bit for bit.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fused::{act_bwd, act_fwd, slice, with_slices, Act, GRAIN};

struct Gated(Act);

impl CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "fused-gated"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, up) = (slice(s1, l1)?, slice(s2, l2)?);
        // act_fwd writes all of y.
        let mut y = crate::fused::uninit(g.len());
        y.par_chunks_mut(GRAIN)
            .zip(g.par_chunks(GRAIN).zip(up.par_chunks(GRAIN)))
            .for_each(|(y, (g, up))| {
                act_fwd(self.0, g, y);
                for (y, &u) in y.iter_mut().zip(up) {
                    *y *= u;
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let act = self.0;
        let (dg, du) = with_slices(&[gate, up, &grad], |s| {
            let (g, u, dy) = (s[0], s[1], s[2]);
            // act_fwd writes all of du, act_bwd all of dg.
            let mut dg = crate::fused::uninit(g.len());
            let mut du = crate::fused::uninit(g.len());
            dg.par_chunks_mut(GRAIN)
                .zip(du.par_chunks_mut(GRAIN))
                .zip(g.par_chunks(GRAIN).zip(u.par_chunks(GRAIN)))
                .zip(dy.par_chunks(GRAIN))
                .for_each(|(((dg, du), (g, u)), dy)| {
                    // d up = dy ⊙ act(gate); d act(gate) = dy ⊙ up, through act'.
                    act_fwd(act, g, du);
                    for (du, &dy) in du.iter_mut().zip(dy) {
                        *du *= dy;
                    }
                    let mut dact = vec![0f32; g.len()];
                    for ((d, &dy), &u) in dact.iter_mut().zip(dy).zip(u) {
                        *d = dy * u;
                    }
                    act_bwd(act, g, &dact, dg);
                });
            Ok((dg, du))
        })?;
        let wrap = |x: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            Ok(if like.track_op() {
                Some(Tensor::from_vec(x, like.shape(), like.device())?)
            } else {
                None
            })
        };
        Ok((wrap(dg, gate)?, wrap(du, up)?))
    }
}

/// `act(gate) ⊙ up` (f32, CPU; same shapes).
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Gated(act))
}
