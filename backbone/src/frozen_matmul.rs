//! `x·Wᵀ` for a frozen `W` whose backward returns only the input gradient.
//!
//! candle's matmul backward computes both operands' gradients; for a frozen weight the second
//! is a full GEMM thrown away. With every projection frozen (all PEFT methods) that is a third
//! of the backward's matrix work.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};

/// The op: holds the frozen weight `[out, in]`.
pub(crate) struct FrozenMatmul {
    pub(crate) weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = layout.shape().dims2()?;
        let (out, w_in) = self.weight.dims2()?;
        if w_in != inp {
            candle_core::bail!(
                "frozen-matmul: input width {inp}, weight {:?}",
                self.weight.dims()
            );
        }
        let Some((x_start, x_end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: input must be contiguous");
        };
        let x = &storage.as_slice::<f32>()?[x_start..x_end];
        let (w_storage, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(w_cpu) = &*w_storage else {
            candle_core::bail!("frozen-matmul: weight is not on the CPU");
        };
        let Some((w_start, w_end)) = w_layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul: weight must be contiguous");
        };
        let w = &w_cpu.as_slice::<f32>()?[w_start..w_end];
        let dst = x_wt(x, rows, inp, w, out);
        Ok((CpuStorage::F32(dst), Shape::from((rows, out))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx (x·Wᵀ) = grad·W; no gradient for W.
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `dst [rows, out] = x [rows, in] · Wᵀ` for a row-major `W [out, in]`, on the rayon pool.
pub(crate) fn x_wt(x: &[f32], rows: usize, inp: usize, w: &[f32], out: usize) -> Vec<f32> {
    let mut dst = crate::fused::gemm_output(rows * out);
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    candle_core::gemm_trace::record(candle_core::gemm_trace::Gemm {
        batch: 1,
        m: rows,
        n: out,
        k: inp,
        lhs_skip: 0,
        rhs_skip: 0,
        lhs_cs: 1,
        lhs_rs: inp as isize,
        rhs_cs: inp as isize,
        rhs_rs: 1,
        threaded: threads > 1,
    });
    // W `[out, in]` is read through transposed strides.
    unsafe {
        gemm(
            rows,
            out,
            inp,
            dst.as_mut_ptr(),
            1,
            out as isize,
            false,
            x.as_ptr(),
            1,
            inp as isize,
            w.as_ptr(),
            inp as isize,
            1,
            0f32,
            1f32,
            false,
            false,
            false,
            parallelism,
        )
    }
    dst
}

/// `x [rows, in] · Wᵀ` for a frozen, contiguous f32 CPU weight.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}
