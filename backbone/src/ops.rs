//! Differentiable building blocks.
//!
//! candle_nn's fused layer_norm, rms_norm, softmax_last_dim and sdpa record no backward op,
//! so a model built from them trains nothing. For f32 on the CPU the ops here run fused
//! kernels that carry their own backward ([`crate::fused`]); other dtypes and devices use
//! compositions of candle primitives that do carry a backward.

use crate::config::Activation;
use crate::fused;
use candle_core::{DType, Result, Tensor, D};

pub use crate::kronecker::kronecker_product;
pub use crate::low_rank::low_rank_delta;
pub use crate::prepend::prepend_rows;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::eligible(&[x]) {
        return fused::softmax(x);
    }
    softmax_composite(x)
}

/// Softmax from candle primitives. The max is detached: softmax is shift-invariant, so the
/// gradient is unchanged and the backward graph is smaller.
fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Log-softmax over the last dimension, stable for large logits.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::eligible(&[x]) {
        return fused::log_softmax(x);
    }
    log_softmax_composite(x)
}

/// Log-softmax from candle primitives (max-shifted, as the fused kernel).
fn log_softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// `x [.., in] · wᵀ` for `w [out, in]`, the leading dims flattened into one product. For f32
/// on the CPU the backward takes only the gradients whose operand trains, `w`'s in `w`'s own
/// layout ([`crate::trained_matmul`]); elsewhere candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (lead, inp) = x.dims().split_at(x.rank().max(1) - 1);
    let rows = lead.iter().product::<usize>();
    let x2 = x.reshape((rows, *inp.first().unwrap_or(&1)))?;
    let y = if fused::eligible(&[&x2, w]) && w.rank() == 2 && w.is_contiguous() {
        crate::trained_matmul::trained_matmul(&x2, w, false)?
    } else {
        x2.matmul(&w.t()?)?
    };
    let mut dims = lead.to_vec();
    dims.push(y.dim(1)?);
    y.reshape(dims)
}

/// `y [.., n] + b [n]`, a bias broadcast over the leading dims.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused::eligible(&[y, b]) && fused::is_row_vector(b, y) {
        return fused::add_bias(y, b);
    }
    y.broadcast_add(b)
}

/// `x [.., n] ⊙ l [n]`: a vector scaling the last dimension ((IA)³).
pub fn scale_columns(x: &Tensor, l: &Tensor) -> Result<Tensor> {
    if fused::eligible(&[x, l]) && fused::is_row_vector(l, x) {
        return fused::scale_columns(x, l);
    }
    x.broadcast_mul(l)
}

/// LayerNorm over the last dimension.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::eligible(&[x, weight, bias])
        && fused::is_row_vector(weight, x)
        && fused::is_row_vector(bias, x)
    {
        return fused::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// LayerNorm from candle primitives.
fn layer_norm_composite(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

/// RMSNorm over the last dimension (Llama).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::eligible(&[x, weight]) && fused::is_row_vector(weight, x) {
        return fused::rms_norm(x, weight, eps);
    }
    rms_norm_composite(x, weight, eps)
}

/// RMSNorm from candle primitives.
fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)
}

/// The fused kernel of an activation, where there is one.
fn fused_act(act: Activation) -> Option<fused::Act> {
    match act {
        Activation::GeluErf => Some(fused::Act::GeluErf),
        Activation::GeluTanh => Some(fused::Act::GeluTanh),
        Activation::Silu => Some(fused::Act::Silu),
        // candle's relu backward is already a single mask-multiply.
        Activation::Relu => None,
    }
}

/// Applies an (ungated) activation.
pub fn activate(x: &Tensor, act: Activation) -> Result<Tensor> {
    match fused_act(act) {
        Some(a) if fused::eligible(&[x]) => fused::activate(x, a),
        _ => activate_composite(x, act),
    }
}

/// A gated feed-forward's `act(gate) ⊙ up` (SwiGLU and its kin).
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    match fused_act(act) {
        Some(a) if fused::eligible(&[gate, up]) && gate.dims() == up.dims() => {
            crate::gated::gated(gate, up, a)
        }
        _ => activate(gate, act)? * up,
    }
}

/// The activation as candle's unary ops (whose backward is composed of primitives).
fn activate_composite(x: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::GeluErf => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
    }
}

/// Mean cross-entropy of `logits [n, classes]` against `targets [n]` (u32), skipping rows
/// whose `weights [n]` are 0 (weights are 1 for counted rows).
pub fn cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
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

/// Which keys each query of an attention may see.
#[derive(Debug, Clone)]
pub enum Visible {
    /// An additive bias `[b or 1, 1, t, s]`: 0 where a query may attend, f32::MIN elsewhere.
    Bias(Tensor),
    /// An additive bias per key `[b, s]` (0 or f32::MIN; f32), and, for decoders, the causal
    /// rule: query `i` of `t` sees key `j` only when `j ≤ i + s − t` (keys before the queries,
    /// a prefix or a cache, are visible to all). The fused kernel reads it as is, so nothing
    /// of size `t × s` is ever made.
    Keys {
        /// `[b, s]` additive.
        keys: Tensor,
        /// Whether later keys are hidden.
        causal: bool,
        /// Packed rows: the example each key belongs to, `[b, s]` u32 (the queries are the
        /// last `t` keys). A query sees keys of its own example and keys of example 0, which
        /// is shared: a method's prefix keys, or a prompt several continuations branch from.
        segments: Option<Tensor>,
        /// Where each query sits among the keys, `[b, t]` u32, when the queries are not the
        /// last `t` keys in order (a layer that computes only the positions its caller reads).
        queries: Option<Tensor>,
    },
}

impl Visible {
    /// The dense `[b or 1, 1, t, s]` bias this stands for.
    pub fn dense(&self, t: usize) -> Result<Tensor> {
        match self {
            Visible::Bias(b) => Ok(b.clone()),
            Visible::Keys {
                keys,
                causal,
                segments,
                queries,
            } => {
                let (b, s) = keys.dims2()?;
                let mut bias = keys.reshape((b, 1, 1, s))?.broadcast_as((b, 1, t, s))?;
                let dev = keys.device();
                let hide = |bias: &Tensor, hidden: Tensor| -> Result<Tensor> {
                    // MIN where hidden: the smaller of two biases (their sum would be −inf).
                    let min = hidden.to_dtype(DType::F32)?.affine(f32::MIN as f64, 0.0)?;
                    bias.broadcast_minimum(&min)
                };
                // Each query's own key: the last t keys in order unless given.
                let at = match queries {
                    Some(q) => q.clone(),
                    None => Tensor::arange((s - t) as u32, s as u32, dev)?
                        .unsqueeze(0)?
                        .broadcast_as((b, t))?
                        .contiguous()?,
                };
                if *causal {
                    // Key j is later than query i when j > its own key.
                    let j = Tensor::arange(0u32, s as u32, dev)?.reshape((1, 1, 1, s))?;
                    let later = j.broadcast_gt(&at.reshape((b, 1, t, 1))?)?;
                    bias = hide(&bias, later)?;
                }
                if let Some(seg) = segments {
                    let key = seg.reshape((b, 1, 1, s))?.broadcast_as((b, 1, t, s))?;
                    let query = seg
                        .contiguous()?
                        .gather(&at, 1)?
                        .reshape((b, 1, t, 1))?
                        .broadcast_as((b, 1, t, s))?;
                    let other = key.ne(&query)?.to_dtype(DType::F32)?;
                    let private = key.ne(0u32)?.to_dtype(DType::F32)?;
                    bias = hide(&bias, (other * private)?.gt(0.5)?)?;
                }
                bias.contiguous()
            }
        }
    }

    /// The same visibility for queries at the given keys only, `at [b, k]` u32 (key indices,
    /// prefix keys counted): what a layer computing only some positions attends with.
    pub fn at(&self, at: &Tensor) -> Result<Visible> {
        let (b, k) = at.dims2()?;
        Ok(match self {
            Visible::Bias(bias) => {
                let (bb, _, t, s) = bias.dims4()?;
                // Bias rows are numbered by query: key index minus the keys before them.
                let rows = (at.to_dtype(DType::F32)? - (s - t) as f64)?.to_dtype(DType::U32)?;
                let rows = rows.reshape((b, 1, k, 1))?.broadcast_as((b, 1, k, s))?;
                let bias = match bb {
                    1 => bias.broadcast_as((b, 1, t, s))?.contiguous()?,
                    _ => bias.clone(),
                };
                Visible::Bias(bias.gather(&rows.contiguous()?, 2)?)
            }
            Visible::Keys {
                keys,
                causal,
                segments,
                queries: None,
            } => Visible::Keys {
                keys: keys.clone(),
                causal: *causal,
                segments: segments.clone(),
                queries: Some(at.contiguous()?),
            },
            Visible::Keys { .. } => candle_core::bail!("queries chosen twice"),
        })
    }
}

/// Scaled dot-product attention over token-major projections: `q [b, t, heads·d]`,
/// `k, v [b, s, kv_heads·d]` (kv heads shared by `heads / kv_heads` query heads), which keys
/// each query sees (no gradient). Returns `[b, t, heads·d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    visible: &Visible,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let mask = match visible {
        Visible::Bias(b) => b,
        Visible::Keys { keys, .. } => keys,
    };
    if fused::eligible(&[q, k, v, mask]) {
        return crate::attention::attention(q, k, v, visible, heads, kv_heads, scale);
    }
    let bias = visible.dense(q.dim(1)?)?;
    attention_composite(q, k, v, &bias, heads, kv_heads, scale)
}

fn attention_composite(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, width) = q.dims3()?;
    let s = k.dim(1)?;
    let d = width / heads;
    let split = |y: &Tensor, len: usize, n: usize| -> Result<Tensor> {
        y.reshape((b, len, n, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, mut k, mut v) = (
        split(q, t, heads)?,
        split(k, s, kv_heads)?,
        split(v, s, kv_heads)?,
    );
    if kv_heads != heads {
        let rep = heads / kv_heads;
        let expand = |y: Tensor| -> Result<Tensor> {
            y.unsqueeze(2)?
                .broadcast_as((b, kv_heads, rep, s, d))?
                .reshape((b, heads, s, d))
        };
        k = expand(k)?;
        v = expand(v)?;
    }
    // Scores and their softmax in f32 whatever q's dtype (as transformers' eager attention).
    let dt = q.dtype();
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?.broadcast_add(bias)?;
    softmax_last_dim(&scores)?
        .to_dtype(dt)?
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, t, heads * d))
}

/// Rotary position embedding on token-major `x [b, t, heads·d]` (as the projections leave
/// it) with `cos`/`sin` `[t, d]`, or `[b·t, d]` for a position per token.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    if fused::eligible(&[x, cos, sin]) {
        return crate::rope::rope(x, cos, sin, heads);
    }
    rope_composite(x, cos, sin, heads)
}

/// RoPE from candle primitives, through the head-major layout.
fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let d = width / heads;
    let (cos, sin) = if cos.dim(0)? == t {
        (cos.clone(), sin.clone())
    } else {
        // A row per token: [b, 1, t, d] against the head-major [b, heads, t, d].
        (cos.reshape((b, 1, t, d))?, sin.reshape((b, 1, t, d))?)
    };
    let y = x.reshape((b, t, heads, d))?.transpose(1, 2)?;
    apply_rope(&y, &cos, &sin)?
        .transpose(1, 2)?
        .reshape((b, t, width))
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
    rope_tables_at(start..start + len, head_dim, theta, device)
}

/// The cos/sin tables `[n, head_dim]` for the given positions, one row each.
pub fn rope_tables_at(
    positions: impl ExactSizeIterator<Item = usize>,
    head_dim: usize,
    theta: f64,
    device: &candle_core::Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64) as f32)
        .collect();
    let len = positions.len();
    let mut angles = Vec::with_capacity(len * head_dim);
    for p in positions {
        for j in 0..head_dim {
            angles.push(p as f32 * inv[j % half]);
        }
    }
    let a = Tensor::from_vec(angles, (len, head_dim), device)?;
    Ok((a.cos()?, a.sin()?))
}

#[cfg(test)]
mod tests {
    //! The fused kernels against the composites they replace: forward values and the
    //! gradients of `sum(out ⊙ probe)` with respect to every input.

    use super::*;
    use crate::init::Initializer;
    use candle_core::{Device, Var};

    /// Shapes with rows of length 1, odd widths, 3-D and 4-D inputs, and enough elements to
    /// split across several rayon tasks.
    const SHAPES: &[&[usize]] = &[
        &[1, 1],
        &[3, 1],
        &[5, 7],
        &[2, 3, 17],
        &[4, 33],
        &[2, 3, 5, 64],
        &[64, 385],
        &[40, 1000],
        &[3, 70_000],
    ];

    fn randn(init: &mut Initializer, shape: &[usize], std: f64) -> Tensor {
        init.normal(shape, std, &Device::Cpu).unwrap()
    }

    /// max |a − b| over the reference's largest magnitude.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max).max(1e-6);
        assert!(diff.is_finite(), "non-finite difference");
        diff / scale
    }

    /// Runs `fused` and `composite` on fresh variables holding `inputs` (the first through
    /// `view`, e.g. a transpose), and checks the outputs and every input's gradient.
    ///
    /// Gradients must agree to 1e-4 of the reference's scale. Where f32 itself cannot resolve
    /// the gradient that finely (a length-1 RMS row, whose gradient is a cancellation
    /// `1 − x²/(x²+ε)`; near-one-hot softmax rows), both are compared with the composite run
    /// in f64 instead, and the fused kernel must be within 1e-4 of that or no less accurate
    /// than the composite.
    fn check(
        what: &str,
        inputs: &[Tensor],
        view: impl Fn(&Tensor) -> Tensor,
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composite: impl Fn(&[Tensor]) -> Result<Tensor>,
        probe_seed: u64,
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>, dtype: DType| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap())
                .collect();
            let mut args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            args[0] = view(&args[0]);
            let out = f(&args).unwrap();
            let probe = randn(&mut Initializer::new(probe_seed), out.dims(), 1.0);
            let probe = probe.to_dtype(dtype).unwrap();
            let grads = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<Tensor> = vars
                .iter()
                .map(|v| {
                    let g = grads.get(v.as_tensor()).expect("missing gradient");
                    g.to_dtype(DType::F32).unwrap()
                })
                .collect();
            (out.to_dtype(DType::F32).unwrap(), g)
        };
        let (out_f, grads_f) = run(&fused, DType::F32);
        let (out_c, grads_c) = run(&composite, DType::F32);
        let mut exact = None;
        let e = rel_err(&out_f, &out_c);
        if e > 1e-5 {
            let (out_r, _) = exact.get_or_insert_with(|| run(&composite, DType::F64));
            let (ef, ec) = (rel_err(&out_f, out_r), rel_err(&out_c, out_r));
            assert!(
                ef <= ec.max(1e-5),
                "{what}: forward error {e} vs composite; vs f64 fused {ef}, composite {ec}"
            );
        }
        for (i, (gf, gc)) in grads_f.iter().zip(&grads_c).enumerate() {
            let e = rel_err(gf, gc);
            if e <= 1e-4 {
                continue;
            }
            // f64 inputs take the composite path, which is then the ground truth.
            let (_, grads_r) = exact.get_or_insert_with(|| run(&composite, DType::F64));
            let (ef, ec) = (rel_err(gf, &grads_r[i]), rel_err(gc, &grads_r[i]));
            assert!(
                ef <= ec.max(1e-4),
                "{what}: gradient of input {i}: error {e} vs composite; vs f64 fused {ef}, composite {ec}"
            );
        }
    }

    /// Whether `t` came from a single op on its variables (a fused kernel leaves just the
    /// variables and itself in the graph; a composite leaves one node per primitive), so the
    /// tests are not comparing the composite with itself.
    fn is_fused(t: &Tensor) -> bool {
        t.sorted_nodes().iter().filter(|n| !n.is_variable()).count() == 1
    }

    #[test]
    fn fused_paths_are_taken() {
        let x =
            Var::from_tensor(&Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let x = x.as_tensor();
        let w = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        assert!(is_fused(&softmax_last_dim(x).unwrap()));
        assert!(is_fused(&log_softmax_last_dim(x).unwrap()));
        assert!(is_fused(&layer_norm(x, &w, &w, 1e-5).unwrap()));
        assert!(is_fused(&rms_norm(x, &w, 1e-5).unwrap()));
        assert!(is_fused(&add_bias(x, &w).unwrap()));
        assert!(is_fused(&scale_columns(x, &w).unwrap()));
        for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
            assert!(is_fused(&activate(x, act).unwrap()));
        }
        // Two query heads of width 2 sharing one kv head.
        let kv = Tensor::ones((2, 3, 2), DType::F32, &Device::Cpu).unwrap();
        let bias = Tensor::zeros((2, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let bias = Visible::Bias(bias);
        assert!(is_fused(&attention(x, &kv, &kv, &bias, 2, 1, 0.5).unwrap()));
        let keys = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let keys = Visible::Keys {
            keys,
            causal: true,
            segments: None,
            queries: None,
        };
        assert!(is_fused(&attention(x, &kv, &kv, &keys, 2, 1, 0.5).unwrap()));
        // f64 falls back to the composite.
        let x64 = x.to_dtype(DType::F64).unwrap();
        assert!(!is_fused(&softmax_last_dim(&x64).unwrap()));
    }

    #[test]
    fn softmax_matches_composite() {
        let mut init = Initializer::new(1);
        for (k, shape) in SHAPES.iter().enumerate() {
            for std in [1.0, 1e3] {
                let x = randn(&mut init, shape, std);
                let what = format!("softmax {shape:?} std {std}");
                check(
                    &what,
                    std::slice::from_ref(&x),
                    |t| t.clone(),
                    |a| softmax_last_dim(&a[0]),
                    |a| softmax_composite(&a[0]),
                    k as u64,
                );
                let what = format!("log_softmax {shape:?} std {std}");
                check(
                    &what,
                    &[x],
                    |t| t.clone(),
                    |a| log_softmax_last_dim(&a[0]),
                    |a| log_softmax_composite(&a[0]),
                    k as u64,
                );
            }
        }
    }

    /// An additive attention bias `[bb, 1, t, s]`: about a quarter of the keys masked with
    /// f32::MIN, never a whole row (as padding and causal masks never mask every key).
    fn random_bias(init: &mut Initializer, bb: usize, t: usize, s: usize) -> Tensor {
        let u: Vec<f32> = randn(init, &[bb * t * s], 1.0).to_vec1().unwrap();
        let bias: Vec<f32> = u
            .iter()
            .enumerate()
            .map(|(i, &x)| if i % s != 0 && x > 0.7 { f32::MIN } else { 0.0 })
            .collect();
        Tensor::from_vec(bias, (bb, 1, t, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn attention_matches_composite() {
        let mut init = Initializer::new(4);
        // (batch, queries, prefix keys, heads, kv heads, head dim, bias batch)
        let cases = [
            (1, 1, 0, 1, 1, 1, 1),
            (2, 5, 0, 3, 3, 4, 2),
            (2, 7, 3, 4, 2, 8, 2),
            (3, 4, 0, 6, 1, 5, 1),
            (4, 64, 10, 12, 12, 32, 4),
            (2, 33, 20, 8, 4, 16, 2),
            // Several query tiles, the last one partial.
            (2, 150, 6, 4, 2, 8, 2),
            (1, 129, 0, 3, 1, 4, 1),
        ];
        for (k, &(b, t, pre, heads, kv, d, bb)) in cases.iter().enumerate() {
            let s = t + pre;
            let q = randn(&mut init, &[b, t, heads * d], 1.0);
            let kk = randn(&mut init, &[b, s, kv * d], 1.0);
            let v = randn(&mut init, &[b, s, kv * d], 1.0);
            let bias = random_bias(&mut init, bb, t, s);
            let scale = 1.0 / (d as f64).sqrt();
            let what = format!("attention b{b} t{t} s{s} heads {heads}/{kv} d{d} bias batch {bb}");
            let bias_f = bias.clone();
            check(
                &what,
                &[q, kk, v],
                |t| t.clone(),
                move |a| {
                    attention(
                        &a[0],
                        &a[1],
                        &a[2],
                        &Visible::Bias(bias_f.clone()),
                        heads,
                        kv,
                        scale,
                    )
                },
                |a| {
                    let bias = bias.to_dtype(a[0].dtype())?;
                    attention_composite(&a[0], &a[1], &a[2], &bias, heads, kv, scale)
                },
                k as u64,
            );
        }
    }

    #[test]
    fn attention_with_a_key_mask_matches_composite() {
        let mut init = Initializer::new(6);
        // (batch, queries, keys before the queries, heads, kv heads, head dim, causal)
        let cases = [
            (1, 1, 0, 1, 1, 2, true),
            (2, 5, 0, 3, 3, 4, false),
            (2, 7, 3, 4, 2, 8, true),
            (3, 70, 0, 2, 1, 4, true),
            (2, 130, 9, 4, 2, 8, false),
            (2, 129, 4, 3, 3, 4, true),
        ];
        for (c, &(b, t, pre, heads, kv, d, causal)) in cases.iter().enumerate() {
            let s = t + pre;
            let q = randn(&mut init, &[b, t, heads * d], 1.0);
            let kk = randn(&mut init, &[b, s, kv * d], 1.0);
            let v = randn(&mut init, &[b, s, kv * d], 1.0);
            // Padding at the end of each row (never the first key), as the model's masks.
            let mut keys = vec![0f32; b * s];
            for (r, row) in keys.chunks_mut(s).enumerate() {
                let real = s - (r * 3) % (t.max(2) - 1);
                row[real..].fill(f32::MIN);
            }
            let keys = Tensor::from_vec(keys, (b, s), &Device::Cpu).unwrap();
            let visible = Visible::Keys {
                keys,
                causal,
                segments: None,
                queries: None,
            };
            let dense = visible.dense(t).unwrap();
            let scale = 1.0 / (d as f64).sqrt();
            let what =
                format!("key-mask attention b{b} t{t} s{s} heads {heads}/{kv} causal {causal}");
            check(
                &what,
                &[q, kk, v],
                |t| t.clone(),
                move |a| attention(&a[0], &a[1], &a[2], &visible, heads, kv, scale),
                |a| attention_composite(&a[0], &a[1], &a[2], &dense, heads, kv, scale),
                c as u64,
            );
        }
    }

    #[test]
    fn the_per_key_mask_is_the_dense_bias() {
        let mut init = Initializer::new(7);
        for (b, t, pre) in [(1, 1, 0), (2, 6, 0), (3, 5, 4), (2, 9, 2)] {
            let m: Vec<u32> = (0..b * t)
                .map(|i| u32::from(i % t == 0 || init.index(4) > 0))
                .collect();
            let mask = Tensor::from_vec(m, (b, t), &Device::Cpu).unwrap();
            for causal in [false, true] {
                let keys = crate::model::key_bias(&mask, pre).unwrap();
                let dense = Visible::Keys {
                    keys,
                    causal,
                    segments: None,
                    queries: None,
                }
                .dense(t)
                .unwrap();
                let want = crate::model::attention_bias(&mask, pre, causal).unwrap();
                let (a, w): (Vec<f32>, Vec<f32>) = (
                    dense.flatten_all().unwrap().to_vec1().unwrap(),
                    want.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert_eq!(dense.dims(), want.dims());
                assert!(a == w, "b{b} t{t} prefix {pre} causal {causal}");
            }
        }
    }

    /// The fused RoPE against the composite: output and input gradient equal (the same
    /// products and sums, no contraction), with tables shared by the batch or one row per token.
    #[test]
    fn rope_matches_composite() {
        let mut init = Initializer::new(12);
        // (batch, len, heads, head_dim, a table row per token)
        let cases = [
            (1, 1, 1, 2, false),
            (2, 5, 3, 8, false),
            (3, 7, 9, 64, false),
            (2, 40, 3, 64, true),
            (1, 300, 2, 16, false),
        ];
        for (k, &(b, t, heads, d, per_token)) in cases.iter().enumerate() {
            let x = randn(&mut init, &[b, t, heads * d], 1.0);
            let rows = if per_token { b * t } else { t };
            let (cos, sin) = rope_tables(3, rows, d, 10_000.0, &Device::Cpu).unwrap();
            let probe = randn(&mut Initializer::new(k as u64), x.dims(), 1.0);
            let run = |fused: bool| {
                let v = Var::from_tensor(&x).unwrap();
                let y = if fused {
                    rope(v.as_tensor(), &cos, &sin, heads).unwrap()
                } else {
                    rope_composite(v.as_tensor(), &cos, &sin, heads).unwrap()
                };
                assert_eq!(is_fused(&y), fused);
                let g = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (y, g.get(v.as_tensor()).unwrap().clone())
            };
            let ((yf, gf), (yc, gc)) = (run(true), run(false));
            let what = format!("rope b{b} t{t} h{heads} d{d} per-token {per_token}");
            assert!(rel_err(&yf, &yc) <= 1e-6, "{what}: forward");
            assert!(rel_err(&gf, &gc) <= 1e-6, "{what}: gradient");
        }
    }

    #[test]
    fn gated_matches_composite() {
        let mut init = Initializer::new(13);
        for (k, shape) in SHAPES.iter().enumerate() {
            let g = randn(&mut init, shape, 2.0);
            let up = randn(&mut init, shape, 1.0);
            for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
                check(
                    &format!("gated {act:?} {shape:?}"),
                    &[g.clone(), up.clone()],
                    |t| t.clone(),
                    |a| {
                        let y = gated(&a[0], &a[1], act)?;
                        assert!(is_fused(&y));
                        Ok(y)
                    },
                    |a| activate_composite(&a[0], act)? * &a[1],
                    k as u64,
                );
            }
        }
    }

    #[test]
    fn column_scale_matches_composite() {
        let mut init = Initializer::new(8);
        for (k, shape) in SHAPES.iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = randn(&mut init, shape, 1.0);
            let l = randn(&mut init, &[d], 1.0);
            check(
                &format!("scale_columns {shape:?}"),
                &[x, l],
                |t| t.clone(),
                |a| scale_columns(&a[0], &a[1]),
                |a| a[0].broadcast_mul(&a[1]),
                k as u64,
            );
        }
    }

    #[test]
    fn bias_add_matches_composite() {
        let mut init = Initializer::new(5);
        for (k, shape) in SHAPES.iter().enumerate() {
            let d = *shape.last().unwrap();
            let y = randn(&mut init, shape, 1.0);
            let b = randn(&mut init, &[d], 1.0);
            check(
                &format!("add_bias {shape:?}"),
                &[y, b],
                |t| t.clone(),
                |a| add_bias(&a[0], &a[1]),
                |a| a[0].broadcast_add(&a[1]),
                k as u64,
            );
        }
    }

    #[test]
    fn norms_match_composite() {
        let mut init = Initializer::new(2);
        for (k, shape) in SHAPES.iter().enumerate() {
            let d = *shape.last().unwrap();
            let x = (randn(&mut init, shape, 2.0) + 0.5).unwrap();
            let w = (randn(&mut init, &[d], 0.3) + 1.0).unwrap();
            let b = randn(&mut init, &[d], 0.3);
            for eps in [1e-12, 1e-5] {
                let what = format!("layer_norm {shape:?} eps {eps}");
                let inputs = [x.clone(), w.clone(), b.clone()];
                check(
                    &what,
                    &inputs,
                    |t| t.clone(),
                    |a| layer_norm(&a[0], &a[1], &a[2], eps),
                    |a| layer_norm_composite(&a[0], &a[1], &a[2], eps),
                    k as u64,
                );
                let what = format!("rms_norm {shape:?} eps {eps}");
                check(
                    &what,
                    &inputs[..2],
                    |t| t.clone(),
                    |a| rms_norm(&a[0], &a[1], eps),
                    |a| rms_norm_composite(&a[0], &a[1], eps),
                    k as u64,
                );
            }
        }
    }

    #[test]
    fn activations_match_composite() {
        let mut init = Initializer::new(3);
        for (k, shape) in SHAPES.iter().enumerate() {
            let x = randn(&mut init, shape, 3.0);
            for act in [Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
                let what = format!("{act:?} {shape:?}");
                check(
                    &what,
                    std::slice::from_ref(&x),
                    |t| t.clone(),
                    |a| activate(&a[0], act),
                    |a| activate_composite(&a[0], act),
                    k as u64,
                );
            }
        }
    }

    #[test]
    fn activations_forward_match_candle_closely() {
        // A dense sweep where the activations bend, then a coarse one out to where they are
        // linear or zero; the kernels' exp/erf/tanh are our own, so check them against
        // candle's (libm) everywhere, in absolute terms (≤ 1e-6).
        let mut v: Vec<f32> = (0..200_001).map(|i| -10.0 + i as f32 * 1e-4).collect();
        v.extend((0..=2000).map(|i| -100.0 + i as f32 * 0.1));
        v.extend([
            -1e30, -1e4, -88.5, 88.5, 1e4, 1e30, 0.0, -0.0, 1e-30, -1e-30,
        ]);
        let n = v.len();
        let x = Tensor::from_vec(v, n, &Device::Cpu).unwrap();
        for (act, reference) in [
            (Activation::GeluErf, x.gelu_erf().unwrap()),
            (Activation::GeluTanh, x.gelu().unwrap()),
            (Activation::Silu, x.silu().unwrap()),
        ] {
            let y: Vec<f32> = activate(&x, act).unwrap().to_vec1().unwrap();
            let r: Vec<f32> = reference.to_vec1().unwrap();
            for (i, (a, b)) in y.iter().zip(&r).enumerate() {
                // Beyond ±1e3 only the relative error is meaningful (an ulp of 1e30 is huge).
                let tol = 1e-6f32.max(b.abs() * 1e-7);
                assert!(
                    (a - b).abs() <= tol,
                    "{act:?}({}): {a} vs candle {b}",
                    x.get(i).unwrap()
                );
            }
        }
    }

    #[test]
    fn non_contiguous_inputs() {
        let mut init = Initializer::new(4);
        let x = randn(&mut init, &[3, 9, 5], 1.5);
        let w = (randn(&mut init, &[9], 0.3) + 1.0).unwrap();
        let b = randn(&mut init, &[9], 0.3);
        let tr = |t: &Tensor| t.transpose(1, 2).unwrap();
        check(
            "softmax transposed",
            std::slice::from_ref(&x),
            tr,
            |a| softmax_last_dim(&a[0]),
            |a| softmax_composite(&a[0]),
            5,
        );
        check(
            "log_softmax transposed",
            std::slice::from_ref(&x),
            tr,
            |a| log_softmax_last_dim(&a[0]),
            |a| log_softmax_composite(&a[0]),
            5,
        );
        check(
            "layer_norm transposed",
            &[x.clone(), w.clone(), b],
            tr,
            |a| layer_norm(&a[0], &a[1], &a[2], 1e-5),
            |a| layer_norm_composite(&a[0], &a[1], &a[2], 1e-5),
            5,
        );
        check(
            "rms_norm transposed",
            &[x.clone(), w],
            tr,
            |a| rms_norm(&a[0], &a[1], 1e-6),
            |a| rms_norm_composite(&a[0], &a[1], 1e-6),
            5,
        );
        check(
            "gelu transposed",
            &[x],
            tr,
            |a| activate(&a[0], Activation::GeluErf),
            |a| activate_composite(&a[0], Activation::GeluErf),
            5,
        );
    }

    #[test]
    fn frozen_arguments_get_no_gradient() {
        // Plain-tensor weights stay out of the gradient store, as with the composites.
        let mut init = Initializer::new(6);
        let x = Var::from_tensor(&randn(&mut init, &[4, 8], 1.0)).unwrap();
        let w = randn(&mut init, &[8], 1.0);
        let b = randn(&mut init, &[8], 1.0);
        for out in [
            layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap(),
            rms_norm(x.as_tensor(), &w, 1e-5).unwrap(),
        ] {
            let grads = out.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            assert!(grads.get(x.as_tensor()).is_some());
            assert!(grads.get(&w).is_none() && grads.get(&b).is_none());
        }
        // Trainable weights with a constant input: the input gets none.
        let xc = randn(&mut init, &[4, 8], 1.0);
        let wv = Var::from_tensor(&w).unwrap();
        let out = rms_norm(&xc, wv.as_tensor(), 1e-5).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(wv.as_tensor()).is_some() && grads.get(&xc).is_none());
    }

    /// Median milliseconds of `f` over 10 runs after 2 warm-ups.
    fn median_ms(mut f: impl FnMut()) -> f64 {
        for _ in 0..2 {
            f();
        }
        let mut t: Vec<f64> = (0..10)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (t[4] + t[5]) / 2.0
    }

    /// Composite vs fused, forward and forward+backward of `sum(out ⊙ probe)`, every input a
    /// variable. Run with `cargo test --release -p peftbench-backbone -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing report, not a check"]
    fn time_fused_vs_composite() {
        type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
        let mut init = Initializer::new(7);
        let cases: Vec<(&str, Vec<usize>, Op, Op)> = vec![
            (
                "gelu_erf [16,64,1536]",
                vec![16, 64, 1536],
                Box::new(|a| activate(&a[0], Activation::GeluErf)),
                Box::new(|a| activate_composite(&a[0], Activation::GeluErf)),
            ),
            (
                "gelu_tanh [16,64,1536]",
                vec![16, 64, 1536],
                Box::new(|a| activate(&a[0], Activation::GeluTanh)),
                Box::new(|a| activate_composite(&a[0], Activation::GeluTanh)),
            ),
            (
                "softmax [16,12,64,64]",
                vec![16, 12, 64, 64],
                Box::new(|a| softmax_last_dim(&a[0])),
                Box::new(|a| softmax_composite(&a[0])),
            ),
            (
                "layer_norm [16,64,384]",
                vec![16, 64, 384],
                Box::new(|a| layer_norm(&a[0], &a[1], &a[2], 1e-12)),
                Box::new(|a| layer_norm_composite(&a[0], &a[1], &a[2], 1e-12)),
            ),
            (
                "rms_norm [16,64,384]",
                vec![16, 64, 384],
                Box::new(|a| rms_norm(&a[0], &a[1], 1e-6)),
                Box::new(|a| rms_norm_composite(&a[0], &a[1], 1e-6)),
            ),
        ];
        for (name, shape, fused, composite) in cases {
            let d = *shape.last().unwrap();
            let vars = [
                randn(&mut init, &shape, 1.0),
                randn(&mut init, &[d], 1.0),
                randn(&mut init, &[d], 1.0),
            ]
            .map(|t| Var::from_tensor(&t).unwrap());
            let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let probe = randn(&mut init, &shape, 1.0);
            let mut row = format!("{name:24}");
            for (label, f) in [("composite", &composite), ("fused", &fused)] {
                let fwd = median_ms(|| {
                    f(&args).unwrap();
                });
                let both = median_ms(|| {
                    (f(&args).unwrap() * &probe)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                });
                row += &format!("  {label}: fwd {fwd:7.2} ms, fwd+bwd {both:7.2} ms");
            }
            // The probe product, sum and their backward, included in every fwd+bwd above.
            let harness = median_ms(|| {
                (&args[0] * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
            });
            row += &format!("  (probe harness alone {harness:6.2} ms)");
            println!("{row}");
        }
    }
}
