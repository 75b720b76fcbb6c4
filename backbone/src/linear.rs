//! A frozen-or-trainable affine map `y = x·Wᵀ + b`.

use candle_core::{Result, Tensor};

/// A linear projection with weight `[out, in]` (PyTorch layout) and optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// Weight `[out, in]`. A plain tensor when frozen, a variable's tensor when trained.
    pub weight: Tensor,
    /// Bias `[out]`.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Wraps a weight and bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the map to `x [.., in]`; leading dims are flattened into one GEMM.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (lead, inp) = dims.split_at(dims.len() - 1);
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, inp[0]))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out = lead.to_vec();
        out.push(self.out_features());
        y.reshape(out)
    }
}
