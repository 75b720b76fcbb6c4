//! The device-generic path: the composite graph every non-CPU device runs gives the fused CPU
//! kernels' losses and gradients, and mixed precision (a bf16 base under f32 master weights)
//! trains every method and tracks f32. On the CPU by default; `PEFTBENCH_TEST_DEVICE=cuda`
//! runs the composite and bf16 sides on a GPU (scripts/gpu-check.sh).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{largest, max_rel_diff, tiny_model};
use peftbench_backbone::{
    pad_rows, with_kernels, HeadKind, Initializer, Inputs, Kernels, SequenceHead, TrainableParams,
    Transformer,
};
use peftbench_harness::optim::{AdamW, OptimConfig};
use peftbench_methods::*;

const FAMILIES: [&str; 3] = ["bert", "gpt2", "llama"];

/// The device under test: `PEFTBENCH_TEST_DEVICE`, else the CPU.
fn device() -> Device {
    let name = std::env::var("PEFTBENCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    peftbench_backbone::parse_device(&name).unwrap()
}

/// Agreement asked of f32 on the CPU (sums in another order); a GPU's reductions and GEMMs
/// differ more, so there 1e-4.
fn f32_tolerance() -> f32 {
    if device().is_cpu() {
        1e-5
    } else {
        1e-4
    }
}

fn methods() -> Vec<MethodConfig> {
    common::small_methods()
}

fn batch(seed: u64, device: &Device) -> Inputs {
    let mut init = Initializer::new(seed);
    let rows: Vec<Vec<u32>> = [5usize, 3, 4]
        .iter()
        .map(|&n| (0..n).map(|_| 1 + init.index(45) as u32).collect())
        .collect();
    pad_rows(&rows, None, 0, device).unwrap()
}

struct Attached {
    model: Transformer,
    method: Box<dyn Method>,
    head: SequenceHead,
    head_params: TrainableParams,
}

/// `config` attached to a copy of `base` in `dtype`, with a classifier head; `None` when the
/// method refuses this family (BitFit on bias-free Llama).
fn attach(
    base: &Transformer,
    config: &MethodConfig,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Option<Attached> {
    config.validate(&base.config).ok()?;
    let mut model = base.to(device, dtype).unwrap();
    let method = config
        .attach(&mut AttachContext::new(&mut model, seed))
        .unwrap();
    let mut head_params = TrainableParams::new();
    let head = SequenceHead::new(
        &model,
        HeadKind::Classifier { num_labels: 2 },
        &mut head_params,
        &mut Initializer::new(seed ^ 1),
    )
    .unwrap();
    Some(Attached {
        model,
        method,
        head,
        head_params,
    })
}

impl Attached {
    fn loss(&self, x: &Inputs) -> Tensor {
        let enc = self.model.forward(x, self.method.as_ref()).unwrap();
        let logits = self.head.forward(&self.model, &enc).unwrap();
        let labels = Tensor::new(&[0u32, 1, 1], self.model.device()).unwrap();
        let mut loss = peftbench_backbone::ops::cross_entropy(&logits, &labels, None).unwrap();
        if let Some(extra) = self.method.extra_loss().unwrap() {
            loss = (loss + extra).unwrap();
        }
        loss
    }

    fn vars(&self) -> Vec<candle_core::Var> {
        let mut v = self.method.params().vars();
        v.extend(self.head_params.vars());
        v
    }

    /// The loss and every variable's gradient at the current parameters.
    fn loss_and_grads(&self, x: &Inputs) -> (f32, Vec<Tensor>) {
        let loss = self.loss(x);
        let grads = loss.backward().unwrap();
        let g = self
            .vars()
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.zeros_like().unwrap(),
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), g)
    }

    /// Sets the method's variables away from their identity start, so every gradient is live.
    fn perturb(&self, seed: u64) {
        let mut init = Initializer::new(seed);
        for v in self.method.params().vars() {
            let noise = init.normal(v.shape(), 0.05, v.device()).unwrap();
            v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
        }
    }

    /// `steps` AdamW steps with the given update implementation; the losses seen.
    fn train(&mut self, steps: usize, kernels: Kernels) -> Vec<f32> {
        let cfg = OptimConfig {
            lr: 1e-2,
            ..Default::default()
        };
        let mut opt = AdamW::with_kernels(vec![(self.vars(), 1.0)], cfg, kernels).unwrap();
        let x = batch(3, self.model.device());
        let mut losses = Vec::new();
        self.method.set_training(true);
        for step in 1..=steps {
            let loss = self.loss(&x);
            losses.push(loss.to_scalar::<f32>().unwrap());
            let grads = loss.backward().unwrap();
            opt.accumulate(&grads).unwrap();
            opt.step(1e-2).unwrap();
            self.method.after_step(step, &grads).unwrap();
        }
        losses
    }
}

#[test]
fn composite_path_gives_the_fused_losses_and_gradients_for_every_method() {
    let mut worst = (0f32, String::new());
    for family in FAMILIES {
        let base = tiny_model(family, 11);
        for config in methods() {
            // The fused kernels exist on the CPU only; the composite runs on the device.
            let run = |k: Kernels, dev: &Device| {
                with_kernels(k, || {
                    let a = attach(&base, &config, dev, DType::F32, 7)?;
                    a.perturb(9);
                    let (loss, grads) = a.loss_and_grads(&batch(5, dev));
                    let grads = grads.iter().map(|g| g.to_device(&Device::Cpu).unwrap());
                    Some((loss, grads.collect::<Vec<_>>()))
                })
            };
            let fused = run(Kernels::Fused, &Device::Cpu);
            let (Some((lf, gf)), Some((lc, gc))) = (fused, run(Kernels::Composite, &device()))
            else {
                continue;
            };
            let what = format!("{family} {}", config.name());
            let e = (lf - lc).abs() / lc.abs().max(1e-6);
            assert!(
                e <= f32_tolerance(),
                "{what}: loss {lf} fused vs {lc} composite"
            );
            // Relative to the largest gradient of the run: some are exactly zero in exact
            // arithmetic (a key bias under softmax's shift invariance) and are f32 noise in both.
            let scale = largest(&gc);
            for (i, (a, b)) in gf.iter().zip(&gc).enumerate() {
                let e = largest(&[(a - b).unwrap()]) / scale;
                assert!(
                    e <= f32_tolerance(),
                    "{what}: gradient {i} differs by {e:e} of the largest"
                );
                if e > worst.0 {
                    worst = (e, what.clone());
                }
            }
        }
    }
    eprintln!(
        "largest relative gradient difference: {:e} ({})",
        worst.0, worst.1
    );
}

#[test]
fn composite_adamw_trains_as_the_fused_one() {
    let base = tiny_model("llama", 3);
    let config = MethodConfig::defaults()[0].with_knob(4);
    assert_eq!(config.name(), "lora");
    let mut a = attach(&base, &config, &Device::Cpu, DType::F32, 1).unwrap();
    let mut b = attach(&base, &config, &device(), DType::F32, 1).unwrap();
    let la = a.train(5, Kernels::Fused);
    let lb = with_kernels(Kernels::Composite, || b.train(5, Kernels::Composite));
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x - y).abs() <= f32_tolerance() * y.abs().max(1.0),
            "{la:?} vs {lb:?}"
        );
    }
    // Adam divides by √v, so last-bit differences in near-zero moments grow a little over
    // the steps: ten times the tolerance of each parameter's scale after five.
    for (va, vb) in a.vars().iter().zip(&b.vars()) {
        let e = max_rel_diff(va.as_tensor(), vb.as_tensor());
        assert!(
            e <= 10.0 * f32_tolerance(),
            "{:?}: parameters differ by {e:e} relative",
            va.dims()
        );
    }
}

#[test]
fn every_method_trains_on_a_bf16_base_with_f32_master_weights() {
    for family in FAMILIES {
        let base = tiny_model(family, 21);
        for config in methods() {
            let Some(mut a) = attach(&base, &config, &device(), DType::BF16, 4) else {
                continue;
            };
            let what = format!("{family} {}", config.name());
            for (name, v) in a.method.params().entries() {
                assert_eq!(
                    v.dtype(),
                    DType::F32,
                    "{what}: {name} is not an f32 variable"
                );
            }
            let mut frozen_before = Vec::new();
            a.model.for_each_weight(&mut |n, t| {
                if !t.is_variable() {
                    assert_eq!(t.dtype(), DType::BF16, "{what}: frozen {n} is not bf16");
                    frozen_before.push(t.to_dtype(DType::F32).unwrap());
                }
            });
            let losses = a.train(4, Kernels::Fused);
            assert!(losses.iter().all(|l| l.is_finite()), "{what}: {losses:?}");
            assert!(
                losses.last() < losses.first(),
                "{what}: four steps did not lower the loss: {losses:?}"
            );
            let mut i = 0;
            a.model.for_each_weight(&mut |n, t| {
                if !t.is_variable() {
                    let now = t.to_dtype(DType::F32).unwrap();
                    assert_eq!(
                        max_rel_diff(&now, &frozen_before[i]),
                        0.0,
                        "{what}: {n} moved"
                    );
                    i += 1;
                }
            });
        }
    }
}

#[test]
fn bf16_base_tracks_f32_and_keeps_the_identity_and_merge_invariants() {
    let mut worst = (0f32, String::new());
    for family in FAMILIES {
        let base = tiny_model(family, 31);
        let dev = device();
        let x = batch(8, &dev);
        for config in methods() {
            let (Some(a32), Some(mut a16)) = (
                attach(&base, &config, &dev, DType::F32, 2),
                attach(&base, &config, &dev, DType::BF16, 2),
            ) else {
                continue;
            };
            let what = format!("{family} {}", config.name());
            let plain = base.to(&dev, DType::BF16).unwrap();
            let bare = plain
                .forward(&x, &peftbench_backbone::NoIntervention)
                .unwrap()
                .hidden;
            let at_init = a16.model.forward(&x, a16.method.as_ref()).unwrap().hidden;
            // Methods that start as the identity stay so: their f32 zeros add nothing to bf16.
            let identity = !matches!(
                config.name(),
                "prefix_tuning" | "prompt_tuning" | "p_tuning" | "p_tuning_v2"
            );
            if identity {
                assert!(
                    max_rel_diff(&at_init, &bare) <= 1e-2,
                    "{what}: not the identity at init"
                );
            }
            a32.perturb(5);
            a16.perturb(5);
            let h32 = a32.model.forward(&x, a32.method.as_ref()).unwrap().hidden;
            let h16 = a16.model.forward(&x, a16.method.as_ref()).unwrap().hidden;
            // bf16 keeps 8 bits of mantissa: a few 2⁻⁸ over two layers.
            let e = max_rel_diff(&h16, &h32);
            assert!(
                e <= 3e-2,
                "{what}: bf16 hidden states off f32 by {e} relative"
            );
            if e > worst.0 {
                worst = (e, what.clone());
            }
            if a16.method.merge_into(&mut a16.model).unwrap() {
                let merged = a16.model.forward(&x, a16.method.as_ref()).unwrap().hidden;
                let e = max_rel_diff(&merged, &h16);
                assert!(
                    e <= 3e-2,
                    "{what}: merged differs from unmerged by {e} in bf16"
                );
            }
        }
    }
    eprintln!(
        "largest bf16 vs f32 difference: {:e} ({})",
        worst.0, worst.1
    );
}
