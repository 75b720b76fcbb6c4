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
    // W `[out, in]` is read through transposed strides.
    gemm_traced(
        (rows, out, inp),
        &mut dst,
        out,
        false,
        x,
        (inp, 1),
        w,
        (1, inp),
    );
    dst
}

/// `dst = lhs·rhs` (or `dst += ` with `accumulate`) on the rayon pool, recorded for the
/// GEMM floor. Strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_traced(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let threads = candle_core::utils::get_num_threads();
    candle_core::gemm_trace::record(candle_core::gemm_trace::Gemm {
        batch: 1,
        m,
        n,
        k,
        lhs_skip: 0,
        rhs_skip: 0,
        lhs_cs: lhs_cs as isize,
        lhs_rs: lhs_rs as isize,
        rhs_cs: rhs_cs as isize,
        rhs_rs: rhs_rs as isize,
        threaded: threads > 1,
    });
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    debug_assert!(m == 0 || dst.len() >= (m - 1) * dst_rs + n);
    // SAFETY: the callers' buffers span m×k, k×n and m×n at these strides (asserted above
    // for the destination; the operands are whole blocks of the op's inputs).
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1f32 } else { 0f32 },
            1f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `x [rows, in] · Wᵀ` for a frozen, contiguous f32 CPU weight.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })
}
