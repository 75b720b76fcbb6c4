//! Frozen projections kept in their GGUF blocks (a QLoRA-style base): the weight is
//! dequantized inside the op, in the forward and again in the backward, so the base costs its
//! quantized size between steps instead of f32's.

use crate::frozen_matmul::x_wt;
use candle_core::quantized::QTensor;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// `x·Wᵀ` for a quantized frozen `W [out, in]`; its backward returns only the input gradient.
struct QuantMatmul {
    weight: Arc<QTensor>,
}

impl CustomOp1 for QuantMatmul {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = layout.shape().dims2()?;
        let (out, w_in) = self.weight.shape().dims2()?;
        if w_in != inp {
            candle_core::bail!("quantized-matmul: input width {inp}, weight [{out}, {w_in}]");
        }
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("quantized-matmul: input must be contiguous");
        };
        let x = &storage.as_slice::<f32>()?[a..b];
        // The dense tile lives only for this product.
        let w = self.weight.dequantize(&Device::Cpu)?.flatten_all()?;
        let w = w.to_vec1::<f32>()?;
        Ok((
            CpuStorage::F32(x_wt(x, rows, inp, &w, out)),
            Shape::from((rows, out)),
        ))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx (x·Wᵀ) = grad·W, with W dequantized again rather than kept from the forward.
        let w = self.weight.dequantize(grad.device())?;
        Ok(Some(grad.matmul(&w)?))
    }
}

/// `x [rows, in] · Wᵀ` for a quantized weight (f32 CPU input).
pub(crate) fn quantized_matmul(x: &Tensor, weight: &Arc<QTensor>) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        candle_core::bail!(
            "a quantized base runs on the CPU in f32 (got {:?} on {:?})",
            x.dtype(),
            x.device()
        );
    }
    x.contiguous()?.apply_op1(QuantMatmul {
        weight: weight.clone(),
    })
}

/// A stand-in for a quantized weight's dense tensor: the right shape (so counts and sizes
/// hold) in one stored element. Its value is NaN, so any code that reads it as the weight
/// instead of through [`crate::Linear::weight_f32`] shows up as a non-finite loss.
pub(crate) fn placeholder(out: usize, inp: usize) -> Result<Tensor> {
    Tensor::new(&[f32::NAN], &Device::Cpu)?.broadcast_as((out, inp))
}
