//! AdamW with warmup then linear or cosine decay, global-norm clipping and gradient
//! accumulation.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use peftbench_backbone::kernels::{self, Kernels};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Learning-rate decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Linear to zero at the last step.
    Linear,
    /// Half-cosine to zero at the last step.
    Cosine,
    /// Constant after warmup.
    Constant,
}

/// Optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Peak learning rate of the task head, when it should differ from the method's: a fresh
    /// head on a frozen base may need a faster rate than a prompt beside it. Same schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_lr: Option<f64>,
    /// Decoupled weight decay (matrices only; biases, norms and 1-D vectors are not decayed).
    #[serde(default)]
    pub weight_decay: f64,
    /// Fraction of steps spent warming up linearly from 0.
    #[serde(default = "d_warmup")]
    pub warmup_ratio: f64,
    /// Decay after warmup.
    #[serde(default = "d_decay")]
    pub decay: Decay,
    /// Clip the global gradient norm to this (0 disables).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Micro-batches summed into one step.
    #[serde(default = "d_accum")]
    pub grad_accumulation: usize,
    /// Adam β1.
    #[serde(default = "d_b1")]
    pub beta1: f64,
    /// Adam β2.
    #[serde(default = "d_b2")]
    pub beta2: f64,
    /// Adam ε.
    #[serde(default = "d_eps")]
    pub eps: f64,
}

fn d_warmup() -> f64 {
    0.06
}
fn d_decay() -> Decay {
    Decay::Linear
}
fn d_clip() -> f64 {
    1.0
}
fn d_accum() -> usize {
    1
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            head_lr: None,
            weight_decay: 0.0,
            warmup_ratio: d_warmup(),
            decay: d_decay(),
            max_grad_norm: d_clip(),
            grad_accumulation: d_accum(),
            beta1: d_b1(),
            beta2: d_b2(),
            eps: d_eps(),
        }
    }
}

impl OptimConfig {
    /// Checks every setting, naming the offending key: a value outside its range would
    /// otherwise surface only as a NaN loss, blamed on nothing.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = |key: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((key, format!("`{key}` must be a positive number, got {v}")))
            }
        };
        positive("lr", self.lr)?;
        if let Some(h) = self.head_lr {
            positive("head_lr", h)?;
        }
        positive("eps", self.eps)?;
        for (key, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err((key, format!("`{key}` must be in [0, 1), got {v}")));
            }
        }
        for (key, v) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err((
                    key,
                    format!("`{key}` must be a finite number >= 0, got {v}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.warmup_ratio) {
            return Err((
                "warmup_ratio",
                format!(
                    "`warmup_ratio` must be in [0, 1], got {}",
                    self.warmup_ratio
                ),
            ));
        }
        if self.grad_accumulation == 0 {
            return Err((
                "grad_accumulation",
                "`grad_accumulation` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (1-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = (self.warmup_ratio * total as f64).round() as usize;
        if step <= warm && warm > 0 {
            return self.lr * step as f64 / warm as f64;
        }
        let rest = total.saturating_sub(warm).max(1) as f64;
        let done = (step - warm.min(step)) as f64 / rest;
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr * (1.0 - done).max(0.0),
            Decay::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * done.min(1.0)).cos()),
        }
    }
}

struct Slot {
    var: Var,
    moments: Moments,
    decay: bool,
    acc: Option<Tensor>,
    /// This variable's learning rate as a multiple of the scheduled one.
    lr_scale: f64,
}

/// A variable's first and second moments.
enum Moments {
    /// Plain memory for the fused CPU update, one pass over weight, gradient and moments.
    Host(Vec<f32>, Vec<f32>),
    /// Tensors beside the variable, stepped by candle ops (any device; the composite path).
    Device(Tensor, Tensor),
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    t: usize,
    micro: usize,
}

impl AdamW {
    /// Creates zeroed moments for every variable (f32, on any device).
    pub fn new(vars: Vec<Var>, cfg: OptimConfig) -> Result<Self> {
        Self::with_groups(vec![(vars, 1.0)], cfg)
    }

    /// Like [`AdamW::new`], with each group of variables stepped at its own multiple of the
    /// scheduled learning rate (the weight decay scales with it, as in PyTorch's groups).
    pub fn with_groups(groups: Vec<(Vec<Var>, f64)>, cfg: OptimConfig) -> Result<Self> {
        Self::with_kernels(groups, cfg, kernels::kernels())
    }

    /// Like [`AdamW::with_groups`] with the update's implementation named: `Fused` steps f32
    /// CPU variables in one pass (others still take the composite update), `Composite` steps
    /// every variable with tensor ops, as on a GPU.
    pub fn with_kernels(
        groups: Vec<(Vec<Var>, f64)>,
        cfg: OptimConfig,
        choice: Kernels,
    ) -> Result<Self> {
        let mut slots = Vec::new();
        for (vars, lr_scale) in groups {
            if !(lr_scale.is_finite() && lr_scale >= 0.0) {
                candle_core::bail!(
                    "AdamW: learning-rate multiple must be finite and >= 0, got {lr_scale}"
                );
            }
            for var in vars {
                if var.dtype() != DType::F32 {
                    candle_core::bail!(
                        "AdamW: variables must be f32 (master weights), got {:?}",
                        var.dtype()
                    );
                }
                let n = var.elem_count();
                let moments = if choice == Kernels::Fused && var.device().is_cpu() {
                    Moments::Host(vec![0.0; n], vec![0.0; n])
                } else {
                    let zeros = || var.zeros_like();
                    Moments::Device(zeros()?, zeros()?)
                };
                slots.push(Slot {
                    moments,
                    decay: var.rank() >= 2,
                    acc: None,
                    lr_scale,
                    var,
                });
            }
        }
        Ok(Self {
            cfg,
            slots,
            t: 0,
            micro: 0,
        })
    }

    /// Adds one micro-batch's gradients; returns true when enough micro-batches were summed
    /// for a step.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<bool> {
        for s in &mut self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                let g = g.detach();
                s.acc = Some(match s.acc.take() {
                    None => g,
                    Some(a) => (a + g)?,
                });
            }
        }
        self.micro += 1;
        Ok(self.micro >= self.cfg.grad_accumulation.max(1))
    }

    /// Global L2 norm of the accumulated (averaged) gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        let n = self.micro.max(1) as f64;
        let mut sq = 0f64;
        // Device-side sums are added up there and read back once.
        let mut on_device: Option<Tensor> = None;
        for s in &self.slots {
            if let Some(a) = &s.acc {
                if a.device().is_cpu() && a.dtype() == DType::F32 {
                    // Chunk sums added in chunk order: rayon's `sum` combines them in whatever
                    // order the threads finish, and the bits would differ run to run.
                    sq += with_f32_slice(&a.contiguous()?, |g| {
                        let parts: Vec<f64> = g.par_chunks(CHUNK).map(sum_of_squares).collect();
                        parts.iter().sum::<f64>()
                    })?;
                } else {
                    let part = a.sqr()?.sum_all()?;
                    on_device = Some(match on_device {
                        None => part,
                        Some(t) => (t + part)?,
                    });
                }
            }
        }
        if let Some(t) = on_device {
            sq += t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(sq.sqrt() / n)
    }

    /// Applies one AdamW step with learning rate `lr` to the accumulated gradients, clipping
    /// their global norm first. Returns the norm before clipping.
    pub fn step(&mut self, lr: f64) -> Result<f64> {
        let norm = self.grad_norm()?;
        let n = self.micro.max(1) as f64;
        let clip = if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / norm
        } else {
            1.0
        };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for s in &mut self.slots {
            let Some(g) = s.acc.take() else { continue };
            let lr = lr * s.lr_scale;
            let shrink = if s.decay {
                1.0 - lr * self.cfg.weight_decay
            } else {
                1.0
            };
            let (bias1, bias2) = (1.0 - b1.powi(self.t as i32), 1.0 - b2.powi(self.t as i32));
            let grad_scale = clip / n;
            match &mut s.moments {
                Moments::Host(m, v) => {
                    let update = Update {
                        grad_scale: grad_scale as f32,
                        beta1: b1 as f32,
                        beta2: b2 as f32,
                        bias1: bias1 as f32,
                        bias2: bias2 as f32,
                        eps: self.cfg.eps as f32,
                        lr: lr as f32,
                        shrink: shrink as f32,
                        grad: g.contiguous()?,
                        moments: Mutex::new((m, v)),
                    };
                    s.var.as_tensor().inplace_op1(&update)?;
                }
                Moments::Device(m, v) => {
                    // The same arithmetic as the fused update, as tensor ops.
                    let g = (g.to_dtype(DType::F32)? * grad_scale)?;
                    *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?;
                    *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                    let denom = ((&*v / bias2)?.sqrt()? + self.cfg.eps)?;
                    let step = ((&*m / bias1)? / denom)?;
                    let w = ((s.var.as_tensor() * shrink)? - (step * lr)?)?;
                    s.var.set(&w)?;
                }
            }
        }
        self.micro = 0;
        Ok(norm)
    }
}

/// Σ x² in f64 over eight running sums: one running sum is a chain of dependent adds
/// (a full fine-tuning step's 22.7M gradients took ~15 ms that way).
fn sum_of_squares(c: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = c.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    for v in chunks {
        for l in 0..8 {
            acc[l] += (v[l] as f64) * (v[l] as f64);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Elements per parallel task of the fused update.
const CHUNK: usize = 1 << 14;

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
fn with_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("AdamW: gradient is not on the CPU");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        candle_core::bail!("AdamW: gradient is not contiguous");
    };
    Ok(f(&cpu.as_slice::<f32>()?[a..b]))
}

/// One AdamW update of a variable, in place and in one pass over weight, gradient and
/// moments (a chain of tensor ops reads and writes every element a dozen times).
struct Update<'a> {
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
    bias1: f32,
    bias2: f32,
    eps: f32,
    lr: f32,
    shrink: f32,
    grad: Tensor,
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW: variable is not contiguous");
        };
        let CpuStorage::F32(w) = storage else {
            candle_core::bail!("AdamW: variable is not f32");
        };
        let w = &mut w[a..b];
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("AdamW: moment buffers poisoned".into()))?;
        let (m, v) = &mut *guard;
        if m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!("AdamW: variable changed size ({} vs {})", w.len(), m.len());
        }
        with_f32_slice(&self.grad, |g| {
            if g.len() != w.len() {
                candle_core::bail!(
                    "AdamW: gradient has {} elements, variable {}",
                    g.len(),
                    w.len()
                );
            }
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (m, v))| {
                    for i in 0..w.len() {
                        let gi = g[i] * self.grad_scale;
                        m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * gi;
                        v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * gi * gi;
                        let step = (m[i] / self.bias1) / ((v[i] / self.bias2).sqrt() + self.eps);
                        w[i] = w[i] * self.shrink - self.lr * step;
                    }
                });
            Ok(())
        })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let c = OptimConfig {
            lr: 1.0,
            warmup_ratio: 0.1,
            ..Default::default()
        };
        assert!((c.lr_at(5, 100) - 0.5).abs() < 1e-12);
        assert!((c.lr_at(10, 100) - 1.0).abs() < 1e-12);
        assert!(c.lr_at(100, 100).abs() < 1e-12);
        let cos = OptimConfig {
            decay: Decay::Cosine,
            ..c.clone()
        };
        assert!((cos.lr_at(55, 100) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn adamw_minimises_a_quadratic_and_clips() {
        let dev = candle_core::Device::Cpu;
        let x = Var::new(&[3.0f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![x.clone()],
            OptimConfig {
                lr: 0.1,
                max_grad_norm: 1.0,
                warmup_ratio: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            assert!(opt.accumulate(&g).unwrap());
            opt.step(0.05).unwrap();
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|a| a.abs() < 0.05), "{v:?}");
    }

    /// A group at a multiple of the rate follows exactly the path of its own optimiser run at
    /// that multiple, weight decay included; the other group is untouched by the multiple.
    #[test]
    fn groups_step_at_their_own_multiple_of_the_rate() {
        let dev = candle_core::Device::Cpu;
        let init = [[0.5f32, -1.0], [2.0, 0.25]];
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.1,
            max_grad_norm: 0.0,
            ..Default::default()
        };
        let (a, b) = (
            Var::new(&init, &dev).unwrap(),
            Var::new(&init, &dev).unwrap(),
        );
        let mut grouped = AdamW::with_groups(
            vec![(vec![a.clone()], 1.0), (vec![b.clone()], 0.25)],
            cfg.clone(),
        )
        .unwrap();
        let (ra, rb) = (
            Var::new(&init, &dev).unwrap(),
            Var::new(&init, &dev).unwrap(),
        );
        let mut alone_a = AdamW::new(vec![ra.clone()], cfg.clone()).unwrap();
        let mut alone_b = AdamW::new(vec![rb.clone()], cfg).unwrap();
        let sq = |v: &Var| v.as_tensor().sqr().unwrap().sum_all().unwrap();
        for step in 1..=5 {
            let lr = 0.02 * step as f64;
            grouped
                .accumulate(&(sq(&a) + sq(&b)).unwrap().backward().unwrap())
                .unwrap();
            grouped.step(lr).unwrap();
            alone_a.accumulate(&sq(&ra).backward().unwrap()).unwrap();
            alone_a.step(lr).unwrap();
            alone_b.accumulate(&sq(&rb).backward().unwrap()).unwrap();
            alone_b.step(lr * 0.25).unwrap();
        }
        let flat = |v: &Var| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(flat(&a), flat(&ra));
        assert_eq!(flat(&b), flat(&rb));
        assert_ne!(
            flat(&a),
            flat(&b),
            "the two rates must give different paths"
        );
    }

    #[test]
    fn a_negative_or_nan_rate_multiple_is_refused() {
        let x = Var::new(&[1.0f32], &candle_core::Device::Cpu).unwrap();
        for bad in [-1.0, f64::NAN] {
            let e = AdamW::with_groups(vec![(vec![x.clone()], bad)], OptimConfig::default());
            assert!(e.is_err(), "{bad} accepted");
        }
    }

    /// Two steps of the fused update against AdamW written out in f64: gradient averaging over
    /// micro-batches, global-norm clipping, bias correction, decoupled decay on matrices only.
    #[test]
    fn fused_and_composite_updates_match_the_adamw_formula() {
        for choice in [Kernels::Fused, Kernels::Composite] {
            adamw_matches_the_formula(choice);
        }
    }

    fn adamw_matches_the_formula(choice: Kernels) {
        let dev = candle_core::Device::Cpu;
        let w0 = [[0.5f32, -1.0, 2.0], [0.25, 3.0, -0.75]];
        let b0 = [0.1f32, -0.2];
        let w = Var::new(&w0, &dev).unwrap();
        let b = Var::new(&b0, &dev).unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            weight_decay: 0.3,
            max_grad_norm: 2.0,
            grad_accumulation: 2,
            ..Default::default()
        };
        let mut opt =
            AdamW::with_kernels(vec![(vec![w.clone(), b.clone()], 1.0)], cfg.clone(), choice)
                .unwrap();
        // loss = Σ c·w + Σ d·b per micro-batch: the gradient is the coefficients.
        let gw = [
            [[1.0f32, -2.0, 0.5], [3.0, 0.0, -1.0]],
            [[0.5, 1.0, 1.5], [-1.0, 2.0, 0.25]],
        ];
        let gb = [[2.0f32, -1.0], [0.0, 4.0]];
        let (mut wr, mut br): (Vec<f64>, Vec<f64>) = (
            w0.iter().flatten().map(|&x| x as f64).collect(),
            b0.iter().map(|&x| x as f64).collect(),
        );
        let (mut m, mut v) = (vec![0f64; 8], vec![0f64; 8]);
        for t in 1..=2 {
            let lr = 0.05 * t as f64;
            for k in 0..2 {
                let cw = Tensor::new(&gw[k], &dev).unwrap();
                let cb = Tensor::new(&gb[k], &dev).unwrap();
                let loss = ((w.as_tensor() * &cw).unwrap().sum_all().unwrap()
                    + (b.as_tensor() * &cb).unwrap().sum_all().unwrap())
                .unwrap();
                opt.accumulate(&loss.backward().unwrap()).unwrap();
            }
            let norm = opt.step(lr).unwrap();
            // Reference: mean gradient, clipped by the global norm.
            let g: Vec<f64> = (0..8)
                .map(|i| {
                    (0..2)
                        .map(|k| if i < 6 { gw[k][i / 3][i % 3] } else { gb[k][i - 6] } as f64)
                        .sum::<f64>()
                        / 2.0
                })
                .collect();
            let gnorm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((norm - gnorm).abs() < 1e-5, "{norm} vs {gnorm}");
            let clip = if gnorm > 2.0 { 2.0 / gnorm } else { 1.0 };
            for i in 0..8 {
                let gi = g[i] * clip;
                m[i] = 0.9 * m[i] + 0.1 * gi;
                v[i] = 0.999 * v[i] + 0.001 * gi * gi;
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                let x = if i < 6 { &mut wr[i] } else { &mut br[i - 6] };
                let decay = if i < 6 { 1.0 - lr * 0.3 } else { 1.0 };
                *x = *x * decay - lr * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got: Vec<f32> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for (a, e) in got.iter().zip(&wr) {
            assert!((*a as f64 - e).abs() < 1e-5, "weight {got:?} vs {wr:?}");
        }
        let got: Vec<f32> = b.as_tensor().to_vec1().unwrap();
        for (a, e) in got.iter().zip(&br) {
            assert!((*a as f64 - e).abs() < 1e-5, "bias {got:?} vs {br:?}");
        }
    }
}
