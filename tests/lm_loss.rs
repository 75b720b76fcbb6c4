//! The fused LM head + next-token loss: the same per-position NLL, argmax hits and gradients
//! (for the hidden states and for a trained head) as the composed logits → log-softmax →
//! gather, over random shapes, vocabularies, blocks and masked positions.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{grads_of, grads_rel_diff, max_abs_diff};
use peftbench_backbone::lm_loss::{token_nll, token_nll_composite};
use peftbench_backbone::{no_grad, Initializer};
use proptest::prelude::*;

/// Random hidden states, head and targets; `outside` of the targets are out of the loss.
fn case(n: usize, h: usize, vocab: usize, outside: f64, seed: u64) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut init = Initializer::new(seed);
    let hidden = init.normal((n, h), 1.0, &dev).unwrap();
    let weight = init.normal((vocab, h), 1.5, &dev).unwrap();
    let targets: Vec<u32> = (0..n)
        .map(|_| {
            if (init.index(1000) as f64) < outside * 1000.0 {
                // Both spellings of "outside": the vocabulary size itself and u32::MAX.
                [vocab as u32, u32::MAX][init.index(2)]
            } else {
                init.index(vocab) as u32
            }
        })
        .collect();
    (hidden, weight, Tensor::new(targets, &dev).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn fused_token_nll_equals_the_composed_loss_and_its_gradients(
        n in 1usize..300,
        h in 1usize..24,
        vocab in 2usize..400,
        outside in 0.0f64..0.6,
        train_head in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let (hidden, weight, targets) = case(n, h, vocab, outside, seed);
        let hv = Var::from_tensor(&hidden).unwrap();
        let wv = Var::from_tensor(&weight).unwrap();
        let w = if train_head { wv.as_tensor().clone() } else { weight.clone() };
        // A random weight per position, so each row's incoming gradient differs.
        let c = Initializer::new(seed + 1).normal(n, 1.0, &Device::Cpu).unwrap();
        let run = |f: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let stats = f(hv.as_tensor(), &w, &targets).unwrap();
            let loss = (stats.narrow(1, 0, 1).unwrap().squeeze(1).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            (stats, grads_of(&grads, &[hv.clone(), wv.clone()]))
        };
        let (got, got_g) = run(token_nll);
        let (want, want_g) = run(token_nll_composite);
        let nll = |s: &Tensor| s.narrow(1, 0, 1).unwrap();
        let hits = |s: &Tensor| s.narrow(1, 1, 1).unwrap();
        prop_assert!(max_abs_diff(&nll(&got), &nll(&want)) < 1e-4,
            "nll differs by {}", max_abs_diff(&nll(&got), &nll(&want)));
        prop_assert_eq!(max_abs_diff(&hits(&got), &hits(&want)), 0.0);
        let rel = grads_rel_diff(&got_g, &want_g);
        prop_assert!(rel < 1e-4, "gradients differ by {rel} of the largest");
        if !train_head {
            // A frozen head gets no gradient.
            prop_assert_eq!(common::largest(&got_g[1..]), 0.0);
        }
        // Without a graph the forward gives the same numbers.
        let eval = no_grad(|| token_nll(hv.as_tensor(), &w, &targets)).unwrap();
        prop_assert_eq!(max_abs_diff(&eval, &got), 0.0);
    }
}

#[test]
fn token_nll_names_mismatched_shapes() {
    let dev = Device::Cpu;
    let hidden = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
    let weight = Tensor::zeros((10, 9), candle_core::DType::F32, &dev).unwrap();
    let targets = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
    let err = token_nll(&hidden, &weight, &targets)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("token-nll") && err.contains("[10, 9]"),
        "{err}"
    );
}

#[test]
fn a_position_outside_the_loss_costs_nothing_and_counts_as_no_hit() {
    let (hidden, weight, _) = case(3, 4, 5, 0.0, 9);
    let targets = Tensor::new(&[u32::MAX, 5, 2], &Device::Cpu).unwrap();
    let stats: Vec<Vec<f32>> = token_nll(&hidden, &weight, &targets)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(stats[0], [0.0, 0.0]);
    assert_eq!(stats[1], [0.0, 0.0]);
    assert!(stats[2][0] > 0.0);
}
