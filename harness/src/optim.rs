//! AdamW with warmup then linear or cosine decay, global-norm clipping and gradient
//! accumulation.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

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
    m: Tensor,
    v: Tensor,
    decay: bool,
    acc: Option<Tensor>,
}

/// AdamW over a fixed list of variables.
pub struct AdamW {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    t: usize,
    micro: usize,
}

impl AdamW {
    /// Creates zeroed moments for every variable.
    pub fn new(vars: Vec<Var>, cfg: OptimConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|var| {
                Ok(Slot {
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    decay: var.rank() >= 2,
                    acc: None,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
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
        for s in &self.slots {
            if let Some(a) = &s.acc {
                sq += a.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
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
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for s in &mut self.slots {
            let Some(g) = s.acc.take() else { continue };
            let g = (g * (clip / n))?;
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&s.m / bc1)? / ((&s.v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let mut w = s.var.as_tensor().detach();
            if s.decay && self.cfg.weight_decay > 0.0 {
                w = (w * (1.0 - lr * self.cfg.weight_decay))?;
            }
            s.var.set(&(w - (update * lr)?)?)?;
        }
        self.micro = 0;
        Ok(norm)
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
}
