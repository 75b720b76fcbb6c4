//! `x·Wᵀ` for a trained `W` with its gradient produced in `W`'s own `[out, in]` layout.
//!
//! candle's matmul of `x` by the view `Wᵀ` returns the weight's gradient as `xᵀ·g` `[in, out]`
//! seen through a transpose, which the optimizer then copies into `[out, in]` on one thread,
//! striding across memory (2% of a MiniLM full fine-tuning step in `perf`). Here the backward
//! writes `gᵀ·x` straight into `[out, in]` with the GEMM, and skips either gradient when
//! its operand does not train.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor};

use crate::frozen_matmul::{gemm_traced, x_wt};
use crate::fused::{gemm_output, slice, with_slices};

struct TrainedMatmul;

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
        let dst = x_wt(slice(s1, l1)?, rows, inp, slice(s2, l2)?, out);
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

/// `x [rows, in] · Wᵀ` for a contiguous f32 CPU weight `[out, in]` that trains.
pub(crate) fn trained_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(weight, TrainedMatmul)
}
