//! Per-method cost on the all-MiniLM-L6-v2 shape at a matched budget (batch 16 × 64):
//! forward, forward + backward, a full optimizer step; inference latency of merged vs
//! unmerged LoRA vs adapters vs the base model; and steps per second as the budget grows.

mod support;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use peftbench_backbone::NoIntervention;
use peftbench_methods::{AdapterConfig, LoraConfig, MethodConfig};
use std::time::Duration;
use support::*;

fn per_method(c: &mut Criterion) {
    let base = minilm();
    let target = reference_budget(&base);
    let b = batch(16, 64);
    for (group, what) in [("forward", 0), ("forward_backward", 1), ("train_step", 2)] {
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_secs(2))
            .measurement_time(Duration::from_secs(10));
        for m in matched_methods(&base, target) {
            let mut s = setup(&base, &m);
            g.bench_function(BenchmarkId::from_parameter(m.name()), |bench| match what {
                0 => bench.iter(|| s.forward(&b)),
                1 => bench.iter(|| s.forward_backward(&b)),
                _ => bench.iter(|| s.step(&b)),
            });
        }
        g.finish();
    }
}

fn inference(c: &mut Criterion) {
    let base = minilm();
    let lora = MethodConfig::Lora(LoraConfig::default());
    let adapter = MethodConfig::Adapter(AdapterConfig::default());
    for (b, t) in [(1usize, 128usize), (16, 64)] {
        let x = batch(b, t);
        let mut g = c.benchmark_group(format!("inference_{b}x{t}"));
        g.sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        let inputs = match &x {
            peftbench_harness::data::Batch::Text { inputs, .. } => inputs.clone(),
            _ => unreachable!(),
        };
        g.bench_function("base", |bench| {
            bench.iter(|| base.forward(&inputs, &NoIntervention).unwrap())
        });
        let mut s = setup(&base, &lora);
        // Non-zero B so the unmerged path does real work.
        for (n, v) in s.method.params().entries() {
            if n.ends_with("lora_B") {
                v.set(&v.ones_like().unwrap()).unwrap();
            }
        }
        g.bench_function("lora_unmerged", |bench| {
            bench.iter(|| s.model.forward(&inputs, s.method.as_ref()).unwrap())
        });
        s.method.merge_into(&mut s.model).unwrap();
        g.bench_function("lora_merged", |bench| {
            bench.iter(|| s.model.forward(&inputs, s.method.as_ref()).unwrap())
        });
        let a = setup(&base, &adapter);
        g.bench_function("adapter", |bench| {
            bench.iter(|| a.model.forward(&inputs, a.method.as_ref()).unwrap())
        });
        g.finish();
    }
}

fn steps_vs_budget(c: &mut Criterion) {
    let base = minilm();
    let b = batch(16, 64);
    let reference = reference_budget(&base);
    let mut g = c.benchmark_group("train_step_vs_budget");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for mult in [1usize, 4, 16] {
        for m in matched_methods(&base, reference * mult) {
            // Full fine-tuning has no budget; a fixed-size method is timed once, at its size.
            if matches!(m, MethodConfig::FullFinetune(_)) || (mult > 1 && m.knob().is_none()) {
                continue;
            }
            let mut s = setup(&base, &m);
            // Input-prefix methods grow in virtual tokens with the budget; past the model's
            // positions they cannot run at all, which is a property of the method, not a
            // timing.
            if let Err(e) = s.try_forward(&b) {
                println!(
                    "train_step_vs_budget: {} at {} parameters skipped: {e}",
                    m.name(),
                    s.trainable
                );
                continue;
            }
            g.bench_function(BenchmarkId::new(m.name(), s.trainable), |bench| {
                bench.iter(|| s.step(&b))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, per_method, inference, steps_vs_budget);
criterion_main!(benches);
