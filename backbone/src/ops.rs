//! Differentiable building blocks.
//!
//! candle_nn's fused layer_norm, rms_norm, softmax_last_dim and sdpa record no backward op,
//! so a model built from them trains nothing. Everything here is composed from candle
//! primitives that do carry a backward.

use crate::config::Activation;
use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension. The max is detached: softmax is shift-invariant, so the
/// gradient is unchanged and the backward graph is smaller.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, stable for large logits.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm over the last dimension (Llama).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)
}

/// Applies an (ungated) activation.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

/// Mean cross-entropy of `logits [n, classes]` against `targets [n]` (u32), skipping rows
/// whose `weights [n]` are 0 (weights are 1 for counted rows).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp
        .gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?
        .squeeze(1)?;
    match weights {
        None => picked.mean_all()?.neg(),
        Some(w) => {
            let total = w.sum_all()?;
            (picked * w)?.sum_all()?.neg()?.div(&total.maximum(1.0)?)
        }
    }
}

/// Rotates the two halves of the last dimension (`rotate_half` in Hugging Face Llama).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies rotary position embedding to `x [b, heads, t, d]` with `cos`/`sin` `[t, d]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?
}

/// The cos/sin tables for positions `start..start+len` (non-interleaved halves, as Llama).
pub fn rope_tables(
    start: usize,
    len: usize,
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
        .collect();
    let mut angles = Vec::with_capacity(len * head_dim);
    for p in start..start + len {
        for j in 0..head_dim {
            angles.push(p as f32 * inv[j % half]);
        }
    }
    let a = Tensor::from_vec(angles, (len, head_dim), device)?;
    Ok((a.cos()?, a.sin()?))
}
