//! The LM head and the next-token loss as one op, a block of positions at a time.
//!
//! Composed, a step holds the `[tokens, vocab]` logits, their log-softmax and its gradient:
//! at SmolLM2's 49,152-token vocabulary and 8 × 256 tokens, three 400 MB buffers, mapped and
//! zeroed by the kernel each step (glibc serves blocks that large with mmap), and several
//! single-threaded passes over them. Here a block of 512 positions is projected, reduced to
//! its NLL and argmax, and turned into its input gradient `(softmax − onehot)·W` while it is
//! still in memory; positions outside the loss are not projected at all. The gradient for
//! the head's weight (full fine-tuning of a tied embedding) projects the blocks again in the
//! backward, weighted by the incoming gradient.

use std::sync::{Arc, Mutex};

use crate::bf16_matmul::PackedWeight;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::frozen_matmul::gemm_traced as matmul;
use crate::fused::{gemm_output, simd, slice, with_slices};

/// Positions projected at once: a 100 MB block of logits at a 49K vocabulary. At SmolLM2's
/// shapes 128 rows made the GEMMs ~8% slower; 2,048 (a whole 8 × 256 batch) saved no more.
const BLOCK: usize = 512;

/// Per position `[n, 2]`: the NLL of `targets[i]` under `softmax(hidden[i]·Wᵀ)` and 1.0 where
/// the argmax is the target. `hidden [n, h]`, `weight [vocab, h]` (the LM head), `targets [n]`
/// u32; a target ≥ vocab marks a position outside the loss (NLL 0, not correct, no
/// gradient). The gradient flows into the first column only. With `packed` (the frozen
/// head's bf16 packing) both products run in bf16 with f32 sums.
pub fn token_nll(
    hidden: &Tensor,
    weight: &Tensor,
    targets: &Tensor,
    packed: Option<&Arc<PackedWeight>>,
) -> Result<Tensor> {
    let fused = crate::fused::eligible(&[hidden, weight])
        && hidden.rank() == 2
        && weight.is_contiguous()
        && targets.dtype() == candle_core::DType::U32;
    if !fused {
        return token_nll_composite(hidden, weight, targets);
    }
    let grad = crate::grad_enabled();
    let op = TokenNll {
        need_dh: grad && hidden.track_op(),
        need_dw: grad && weight.track_op(),
        dh: Mutex::new(None),
        packed: packed.filter(|p| p.packs(weight)).cloned(),
    };
    hidden
        .contiguous()?
        .apply_op3(weight, &targets.contiguous()?, op)
}

/// The same from candle primitives (other devices and dtypes; the reference in tests).
pub fn token_nll_composite(hidden: &Tensor, weight: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let vocab = weight.dim(0)?;
    let logits = crate::linear::Linear::new(weight.clone(), None)
        .forward(hidden)?
        .to_dtype(candle_core::DType::F32)?;
    let active = targets.lt(vocab as u32)?;
    let safe = active.where_cond(targets, &targets.zeros_like()?)?;
    let logp = crate::ops::log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let active = active.to_dtype(candle_core::DType::F32)?;
    let nll = (picked.neg()? * &active)?;
    let correct = (logits
        .argmax(D::Minus1)?
        .eq(&safe)?
        .to_dtype(candle_core::DType::F32)?
        * active)?;
    Tensor::stack(&[nll, correct], 1)
}

/// The op. The input gradient per unit of incoming gradient is made in the forward, while
/// each block's probabilities exist, and kept until the backward scales it.
struct TokenNll {
    need_dh: bool,
    need_dw: bool,
    dh: Mutex<Option<Vec<f32>>>,
    packed: Option<Arc<PackedWeight>>,
}

simd! {
    /// One position: `stats = [NLL of target, 1 if the argmax is the target]`; with `grad`,
    /// the logits row becomes `softmax − onehot(target)`, scaled by `scale`.
    fn nll_row(x: &mut [f32], target: usize, grad: bool, scale: f32, stats: &mut [f32]) {
        let max = crate::fused::max_of(x);
        // The first maximum, as candle's argmax; a NaN row has none and is never correct.
        let argmax = x.iter().position(|&v| v == max);
        let picked = x[target];
        let sum = if grad {
            // e^(x − max) kept in place: the gradient pass only scales it.
            for v in x.iter_mut() {
                *v = crate::fused::exp_fast(*v - max);
            }
            crate::fused::sum_by(x, |v| v)
        } else {
            crate::fused::sum_by(x, |v| crate::fused::exp_fast(v - max))
        };
        stats[0] = max + sum.ln() - picked;
        stats[1] = if argmax == Some(target) { 1.0 } else { 0.0 };
        if grad {
            let inv = scale / sum;
            for v in x.iter_mut() {
                *v *= inv;
            }
            x[target] -= scale;
        }
    }
}

/// Walks the positions in the loss a block at a time: gathers their hidden rows, projects
/// them onto the vocabulary, and hands each block's rows, logits and gathered hidden states
/// to `f` (the logits already passed through `nll_row` with `scales`, when given).
#[allow(clippy::too_many_arguments)]
fn blocks(
    hidden: &[f32],
    weight: &[f32],
    targets: &[u32],
    h: usize,
    vocab: usize,
    scales: Option<&[f32]>,
    packed: Option<&PackedWeight>,
    stats: &mut [f32],
    mut f: impl FnMut(&[usize], &mut [f32], &[f32]),
) {
    let active: Vec<usize> = (0..targets.len())
        .filter(|&i| (targets[i] as usize) < vocab)
        .collect();
    let rows = BLOCK.min(active.len().max(1));
    let mut logits = gemm_output(rows * vocab);
    let mut xs = vec![0f32; rows * h];
    let mut block_stats = vec![0f32; rows * 2];
    for block in active.chunks(BLOCK) {
        let c = block.len();
        for (dst, &i) in xs.chunks_exact_mut(h).zip(block) {
            dst.copy_from_slice(&hidden[i * h..(i + 1) * h]);
        }
        // logits [c, vocab] = xs [c, h] · Wᵀ (W [vocab, h] read through transposed strides).
        match packed {
            Some(p) => crate::bf16_gemm::matmul(&xs[..c * h], c, p.transposed(), &mut logits),
            None => matmul(
                (c, vocab, h),
                &mut logits,
                vocab,
                false,
                &xs,
                (h, 1),
                weight,
                (1, h),
            ),
        }
        logits[..c * vocab]
            .par_chunks_mut(vocab)
            .zip(block_stats[..c * 2].par_chunks_mut(2))
            .zip(block)
            .for_each(|((row, st), &i)| {
                let (grad, scale) = match scales {
                    Some(s) => (true, s[i]),
                    None => (false, 1.0),
                };
                nll_row(row, targets[i] as usize, grad, scale, st);
            });
        for (st, &i) in block_stats.chunks_exact(2).zip(block) {
            stats[i * 2..i * 2 + 2].copy_from_slice(st);
        }
        f(block, &mut logits[..c * vocab], &xs[..c * h]);
    }
}

impl CustomOp3 for TokenNll {
    fn name(&self) -> &'static str {
        "token-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = l1.shape().dims2()?;
        let (vocab, wh) = l2.shape().dims2()?;
        if wh != h || l3.shape().dims() != [n] {
            bail!(
                "token-nll: hidden {:?}, weight {:?}, targets {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (hidden, weight) = (slice(s1, l1)?, slice(s2, l2)?);
        let Some((a, b)) = l3.contiguous_offsets() else {
            bail!("token-nll: targets must be contiguous");
        };
        let targets = &s3.as_slice::<u32>()?[a..b];
        let mut stats = vec![0f32; n * 2];
        let ones;
        let scales = if self.need_dh {
            ones = vec![1f32; n];
            Some(ones.as_slice())
        } else {
            None
        };
        let mut dh = if self.need_dh {
            vec![0f32; n * h]
        } else {
            Vec::new()
        };
        let mut block_dh = if self.need_dh {
            gemm_output(BLOCK * h)
        } else {
            Vec::new()
        };
        let packed = self.packed.as_deref();
        blocks(
            hidden,
            weight,
            targets,
            h,
            vocab,
            scales,
            packed,
            &mut stats,
            |block, g, _| {
                if !self.need_dh {
                    return;
                }
                // dh [c, h] = (softmax − onehot) [c, vocab] · W [vocab, h].
                let c = block.len();
                match packed {
                    Some(p) => crate::bf16_gemm::matmul(g, c, p.plain(), &mut block_dh),
                    None => matmul(
                        (c, h, vocab),
                        &mut block_dh,
                        h,
                        false,
                        g,
                        (vocab, 1),
                        weight,
                        (h, 1),
                    ),
                }
                for (src, &i) in block_dh.chunks_exact(h).zip(block) {
                    dh[i * h..(i + 1) * h].copy_from_slice(src);
                }
            },
        );
        if self.need_dh {
            *self.dh.lock().unwrap() = Some(dh);
        }
        Ok((CpuStorage::F32(stats), Shape::from((n, 2))))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.narrow(1, 0, 1)?.contiguous()?;
        let dh = match self.dh.lock().unwrap().take() {
            Some(dh) => {
                Some(Tensor::from_vec(dh, hidden.dims(), hidden.device())?.broadcast_mul(&g)?)
            }
            None => None,
        };
        let dw = if self.need_dw {
            Some(self.weight_grad(hidden, weight, targets, &g)?)
        } else {
            None
        };
        Ok((dh, dw, None))
    }
}

impl TokenNll {
    /// dW [vocab, h] = Σ over blocks of (g ⊙ (softmax − onehot))ᵀ · hidden, the blocks
    /// projected again.
    fn weight_grad(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        targets: &Tensor,
        g: &Tensor,
    ) -> Result<Tensor> {
        let (n, h) = hidden.dims2()?;
        let vocab = weight.dim(0)?;
        let targets: Vec<u32> = targets.to_vec1()?;
        let hidden = hidden.contiguous()?;
        let mut dw = vec![0f32; vocab * h];
        with_slices(&[&hidden, weight, g], |s| {
            let (hidden, weight, g) = (s[0], s[1], s[2]);
            let mut stats = vec![0f32; n * 2];
            blocks(
                hidden,
                weight,
                &targets,
                h,
                vocab,
                Some(g),
                // A trained head is never packed (its packing would be stale).
                None,
                &mut stats,
                |block, d, xs| {
                    // dW [vocab, h] += dᵀ [vocab, c] · xs [c, h].
                    let c = block.len();
                    matmul((vocab, h, c), &mut dw, h, true, d, (1, vocab), xs, (h, 1));
                },
            );
            Ok(())
        })?;
        Tensor::from_vec(dw, (vocab, h), weight.device())
    }
}
