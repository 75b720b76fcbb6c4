//! A frozen-or-trainable affine map `y = x·Wᵀ + b`.

use candle_core::quantized::QTensor;
use candle_core::{DType, Result, Tensor};
use std::sync::Arc;

/// A linear projection with weight `[out, in]` (PyTorch layout) and optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`. A plain tensor when frozen, a variable's tensor when trained.
    pub weight: Tensor,
    /// Bias `[out]`.
    pub bias: Option<Tensor>,
    /// The frozen weight in its GGUF blocks, when the base is kept quantized; `weight` is then
    /// a shape-only stand-in and every read goes through [`Linear::weight_f32`].
    quantized: Option<Arc<QTensor>>,
    /// The frozen weight packed for the bf16 GEMM, when the run asks for bf16 matmuls.
    packed: Option<Arc<crate::bf16_matmul::PackedWeight>>,
    /// The run asks for bf16 products and this CPU has a kernel for them: a frozen weight's
    /// go through `packed`, a trained weight's through a packing made per product.
    bf16: bool,
}

impl Linear {
    /// Wraps a weight and bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            quantized: None,
            packed: None,
            bf16: false,
        }
    }

    /// Packs a frozen f32 CPU weight for the bf16 GEMM, so its products (forward and input
    /// gradient) run in bf16 with f32 sums. Returns whether it did: a trained, quantized or
    /// non-f32 weight, a CPU without a bf16 kernel, or the composite kernels keep the f32 GEMM
    /// (see [`crate::bf16_matmul::PackedWeight::for_frozen`]). Once the weight trains (full
    /// fine-tuning), its products run in bf16 too, from its f32 values at each product, and
    /// its gradient in f32 (autocast's mixed precision, with the weight gradient kept f32).
    pub fn pack_bf16(&mut self) -> Result<bool> {
        if self.quantized.is_some() {
            return Ok(false);
        }
        self.bf16 = self.weight.dtype() == DType::F32
            && crate::kernels::fused_on(DType::F32, self.weight.device())
            && crate::bf16_gemm::available();
        self.packed = crate::bf16_matmul::PackedWeight::for_frozen(&self.weight)?.map(Arc::new);
        Ok(self.packed.is_some())
    }

    /// Whether the weight's products run through its bf16 packing.
    pub fn is_packed_bf16(&self) -> bool {
        self.packed.as_ref().is_some_and(|p| p.packs(&self.weight))
    }

    /// Keeps the frozen weight in its quantized blocks (dequantized per use).
    pub fn quantize(&mut self, q: QTensor) -> Result<()> {
        let (out, inp) = q.shape().dims2()?;
        if (out, inp) != (self.out_features(), self.in_features()) {
            candle_core::bail!(
                "quantized weight [{out}, {inp}] for a [{}, {}] projection",
                self.out_features(),
                self.in_features()
            );
        }
        self.weight = crate::quantized::placeholder(out, inp)?;
        self.quantized = Some(Arc::new(q));
        self.packed = None;
        Ok(())
    }

    /// Bytes the weight occupies: its quantized blocks, or the dense tensor.
    pub fn weight_bytes(&self) -> usize {
        let packed = match &self.packed {
            Some(p) if self.is_packed_bf16() => p.bytes(),
            _ => 0,
        };
        packed
            + match &self.quantized {
                Some(q) => q.storage_size_in_bytes(),
                None => self.weight.elem_count() * self.weight.dtype().size_in_bytes(),
            }
    }

    /// Whether the weight is held quantized.
    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    /// Replaces the weight with a dense tensor (a merge's result).
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = weight;
        self.quantized = None;
        self.packed = None;
    }

    /// Adds `delta` to the weight (a merge, or its undoing with `-delta`), in f32, keeping
    /// the weight's own dtype. A quantized weight becomes dense.
    pub fn add_to_weight(&mut self, delta: &Tensor) -> Result<()> {
        let dtype = self.weight.dtype();
        let sum = (self.weight_f32()? + delta.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        self.set_weight(sum);
        Ok(())
    }

    /// The weight in f32, dequantized if it is held quantized (methods that read the base's
    /// weight compute in f32).
    pub fn weight_f32(&self) -> Result<Tensor> {
        match &self.quantized {
            Some(q) => q.dequantize(self.weight.device()),
            None => self.weight.to_dtype(DType::F32),
        }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Whether [`Linear::forward_plus`] can fold a delta into this weight for input `x`: a
    /// dense f32 CPU weight (not quantized, not packed for bf16) and an f32 input.
    pub fn takes_delta(&self, x: &Tensor) -> bool {
        self.quantized.is_none()
            && !self.is_packed_bf16()
            && crate::fused::eligible(&[x, &self.weight])
            && self.weight.is_contiguous()
    }

    /// `x·(W + ΔW)ᵀ + b`: one product by the summed weight instead of `x·Wᵀ + x·ΔWᵀ`, with
    /// `ΔW [out, in]` getting its gradient through the sum (see [`Linear::takes_delta`]).
    pub fn forward_plus(&self, x: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let w = (&self.weight + delta)?;
        let mut y = crate::ops::matmul_t(x, &w)?;
        if let Some(b) = &self.bias {
            y = crate::ops::add_bias(&y, b)?;
        }
        Ok(y)
    }

    /// Applies the map to `x [.., in]`; leading dims are flattened into one GEMM. It runs in
    /// `x`'s dtype: an f32 weight (a trained master weight) meets bf16 activations as a
    /// differentiable cast, as autocast does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, inp) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, inp[0]))?;
        let frozen = !self.weight.is_variable()
            && crate::kernels::fused_on(self.weight.dtype(), self.weight.device())
            && x.dtype() == self.weight.dtype()
            && self.weight.is_contiguous();
        let packed = self.packed.as_ref().filter(|p| {
            p.packs(&self.weight)
                && x.dtype() == DType::F32
                && crate::kernels::fused_on(DType::F32, x.device())
        });
        let trained_bf16 = self.bf16
            && self.weight.is_variable()
            && self.weight.dtype() == DType::F32
            && x.dtype() == DType::F32
            && crate::kernels::fused_on(DType::F32, x.device())
            && self.weight.is_contiguous();
        let mut y = if let Some(p) = packed {
            crate::bf16_matmul::bf16_matmul(&x2, p)?
        } else if let Some(q) = &self.quantized {
            crate::quantized::quantized_matmul(&x2, q)?
        } else if frozen {
            crate::frozen_matmul::frozen_matmul(&x2, &self.weight)?
        } else if trained_bf16 {
            crate::trained_matmul::trained_matmul(&x2, &self.weight, true)?
        } else {
            crate::ops::matmul_t(&x2, &self.weight.to_dtype(x.dtype())?)?
        };
        if let Some(b) = &self.bias {
            y = crate::ops::add_bias(&y, &b.to_dtype(y.dtype())?)?;
        }
        let mut out = lead.to_vec();
        out.push(self.out_features());
        y.reshape(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::Initializer;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_weight_matches_plain_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let mut init = Initializer::new(3);
        let w = init.normal((7, 5), 1.0, &dev).unwrap();
        let b = init.normal(7, 1.0, &dev).unwrap();
        let x = Var::from_tensor(&init.normal((2, 3, 5), 1.0, &dev).unwrap()).unwrap();
        let probe = init.normal((2, 3, 7), 1.0, &dev).unwrap();

        let frozen = Linear::new(w.clone(), Some(b.clone()));
        let y1 = frozen.forward(x.as_tensor()).unwrap();
        let g1 = (&y1 * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let y2 = x
            .as_tensor()
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let g2 = (&y2 * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&y1, &y2) < 1e-5);
        assert!(
            diff(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap()
            ) < 1e-5
        );
        assert!(g1.get(&w).is_none(), "the frozen weight got a gradient");
    }
}
