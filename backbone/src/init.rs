//! Seeded parameter initialisation.
//!
//! candle's CPU `randn` draws from an unseeded thread RNG; reproducible runs need their own.

use candle_core::{Device, Result, Shape, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A seeded source of initial values.
pub struct Initializer {
    rng: StdRng,
}

impl Initializer {
    /// An initializer whose draws depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// A uniform draw in `[0, 1)`.
    pub fn unit(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Values drawn from N(0, std²).
    pub fn normal<S: Into<Shape>>(
        &mut self,
        shape: S,
        std: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let n = shape.elem_count();
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            // Box-Muller: two uniforms give two independent normals.
            let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let th = 2.0 * std::f64::consts::PI * u2;
            v.push((r * th.cos() * std) as f32);
            if v.len() < n {
                v.push((r * th.sin() * std) as f32);
            }
        }
        Tensor::from_vec(v, shape, device)
    }

    /// Values drawn uniformly from `[-bound, bound)`.
    pub fn uniform<S: Into<Shape>>(
        &mut self,
        shape: S,
        bound: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    /// PyTorch's `kaiming_uniform_(a = √5)` for a `[out, in]` weight: bound `1/√in`
    /// (the default of `nn.Linear`, and PEFT's init of LoRA's A).
    pub fn kaiming_uniform(&mut self, out: usize, inp: usize, device: &Device) -> Result<Tensor> {
        self.uniform((out, inp), 1.0 / (inp as f64).sqrt(), device)
    }

    /// A random index in `0..n`.
    pub fn index(&mut self, n: usize) -> usize {
        self.rng.random_range(0..n)
    }
}
