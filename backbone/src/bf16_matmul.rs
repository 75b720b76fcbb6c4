//! `x·Wᵀ` for a frozen f32 weight held packed in bf16 ([`crate::bf16_gemm`]): activations
//! rounded to bf16 at the product's input, f32 sums and output, the backward's input gradient
//! `g·W` the same way. Everything around the product stays f32.

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, TensorId};

use crate::bf16_gemm::{self, PackedB};
use crate::fused::{gemm_output, slice, with_slices};

/// A frozen weight `[out, in]` packed both ways: `Wᵀ` for the forward, `W` for the input
/// gradient. Tied to the tensor it was packed from, so a replaced weight is never read stale.
#[derive(Debug)]
pub struct PackedWeight {
    id: TensorId,
    fwd: PackedB,
    bwd: PackedB,
}

impl PackedWeight {
    /// Packs a contiguous f32 CPU weight.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let (out, inp) = weight.dims2()?;
        let (fwd, bwd) = with_slices(&[weight], |w| {
            let w = w[0];
            Ok((
                PackedB::pack(w, inp, out, 1, inp),
                PackedB::pack(w, out, inp, inp, 1),
            ))
        })?;
        Ok(Self {
            id: weight.id(),
            fwd,
            bwd,
        })
    }

    /// The packing of `weight` where its products can run through it: a frozen, contiguous
    /// f32 CPU weight, a bf16 kernel on this CPU, and the fused kernels chosen (the packed
    /// products are one of them; under `PEFTBENCH_KERNELS=composite` nothing is packed).
    pub fn for_frozen(weight: &Tensor) -> Result<Option<Self>> {
        let eligible = !weight.is_variable()
            && weight.dtype() == DType::F32
            && weight.device().is_cpu()
            && weight.is_contiguous()
            && crate::kernels::fused_on(DType::F32, weight.device())
            && bf16_gemm::available();
        eligible.then(|| Self::new(weight)).transpose()
    }

    /// Whether this is `weight`'s packing.
    pub fn packs(&self, weight: &Tensor) -> bool {
        self.id == weight.id()
    }

    /// `Wᵀ` packed: `x·Wᵀ` is a product with it.
    pub(crate) fn transposed(&self) -> &PackedB {
        &self.fwd
    }

    /// `W` packed: `g·W` is a product with it.
    pub(crate) fn plain(&self) -> &PackedB {
        &self.bwd
    }

    /// Bytes of both packings.
    pub fn bytes(&self) -> usize {
        self.fwd.bytes() + self.bwd.bytes()
    }
}

struct Bf16Matmul(Arc<PackedWeight>);

/// `[rows, k] · B` into a new buffer.
fn product(x: &[f32], rows: usize, b: &PackedB) -> Vec<f32> {
    let mut dst = gemm_output(rows * b.n());
    bf16_gemm::matmul(x, rows, b, &mut dst);
    dst
}

impl CustomOp1 for Bf16Matmul {
    fn name(&self) -> &'static str {
        "bf16-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inp) = l.shape().dims2()?;
        if inp != self.0.fwd.k() {
            bail!(
                "bf16-matmul: input width {inp}, weight in {}",
                self.0.fwd.k()
            );
        }
        let y = product(slice(s, l)?, rows, &self.0.fwd);
        Ok((CpuStorage::F32(y), Shape::from((rows, self.0.fwd.n()))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let rows = g.dim(0)?;
        let dx = with_slices(&[&g], |s| Ok(product(s[0], rows, &self.0.bwd)))?;
        Ok(Some(Tensor::from_vec(dx, x.dims(), x.device())?))
    }
}

/// `x [rows, in] · Wᵀ` through the packed weight (a kernel must run here: see
/// [`bf16_gemm::available`]).
pub(crate) fn bf16_matmul(x: &Tensor, w: &Arc<PackedWeight>) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Bf16Matmul(w.clone()))
}
