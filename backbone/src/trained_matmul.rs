//! `x·Wᵀ` for a trained `W` with its gradient produced in `W`'s own `[out, in]` layout.
//!
//! candle's matmul of `x` by the view `Wᵀ` returns the weight's gradient as `xᵀ·g` `[in, out]`
//! seen through a transpose, which the optimizer then copies into `[out, in]` on one thread,
//! striding across memory (2% of a MiniLM full fine-tuning step in `perf`). Here the backward
//! writes `gᵀ·x` straight into `[out, in]` with the GEMM, and skips either gradient when
//! its operand does not train.
//!
//! In a bf16 run the forward and the input gradient go through the bf16 GEMM as a frozen
//! weight's do, from a packing of the f32 weight made for that product (the weight changes
//! every step); the weight's gradient stays an f32 product of f32 operands.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};

use crate::bf16_gemm::PackedB;
use crate::frozen_matmul::{gemm_traced, x_wt};
use crate::fused::{gemm_output, slice, with_slices};

/// `bf16`: the forward and input-gradient products in bf16 (see the module's doc).
struct TrainedMatmul {
    bf16: bool,
}

impl CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = l1.shape().dims2()?;
        let (out, w_in) = l2.shape().dims2()?;
        if w_in != inp {
            candle_core::bail!("trained-matmul: input width {inp}, weight [{out}, {w_in}]");
        }
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let dst = if self.bf16 {
            bf16_product(x, rows, &PackedB::pack(w, inp, out, 1, inp))
        } else {
            x_wt(x, rows, inp, w, out)
        };
        Ok((CpuStorage::F32(dst), Shape::from((rows, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, inp) = x.dims2()?;
        let (out, _) = w.dims2()?;
        let g = grad.contiguous()?;
        let (need_dx, need_dw) = (x.track_op(), w.track_op());
        let (dx, dw) = with_slices(&[x, w, &g], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            // dx [rows, in] = g·W.
            let dx = need_dx.then(|| {
                if self.bf16 {
                    return bf16_product(g, rows, &PackedB::pack(w, out, inp, inp, 1));
                }
                let mut dx = gemm_output(rows * inp);
                gemm_traced(
                    (rows, inp, out),
                    &mut dx,
                    inp,
                    false,
                    g,
                    (out, 1),
                    w,
                    (inp, 1),
                );
                dx
            });
            // dW [out, in] = gᵀ·x.
            let dw = need_dw.then(|| {
                let mut dw = gemm_output(out * inp);
                gemm_traced(
                    (out, inp, rows),
                    &mut dw,
                    inp,
                    false,
                    g,
                    (1, out),
                    x,
                    (inp, 1),
                );
                dw
            });
            Ok((dx, dw))
        })?;
        let t = |v: Vec<f32>, shape: (usize, usize)| Tensor::from_vec(v, shape, &Device::Cpu);
        Ok((
            dx.map(|v| t(v, (rows, inp))).transpose()?,
            dw.map(|v| t(v, (out, inp))).transpose()?,
        ))
    }
}

/// `[rows, k] · B` through the bf16 GEMM into a new buffer.
fn bf16_product(a: &[f32], rows: usize, b: &PackedB) -> Vec<f32> {
    let mut dst = gemm_output(rows * b.n());
    crate::bf16_gemm::matmul(a, rows, b, &mut dst);
    dst
}

/// `x [rows, in] · Wᵀ` for a contiguous f32 CPU weight `[out, in]` that trains; with `bf16`
/// (a bf16 kernel must run here: see [`crate::bf16_gemm::available`]) its forward and input
/// gradient run in bf16.
pub(crate) fn trained_matmul(x: &Tensor, weight: &Tensor, bf16: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op2(weight, TrainedMatmul { bf16 })
}
