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
        let (got, got_g) = run(|h, w, t| token_nll(h, w, t, None));
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
        let eval = no_grad(|| token_nll(hv.as_tensor(), &w, &targets, None)).unwrap();
        prop_assert_eq!(max_abs_diff(&eval, &got), 0.0);
    }
}

#[test]
fn token_nll_names_mismatched_shapes() {
    let dev = Device::Cpu;
    let hidden = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
    let weight = Tensor::zeros((10, 9), candle_core::DType::F32, &dev).unwrap();
    let targets = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
    let err = token_nll(&hidden, &weight, &targets, None)
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
    let stats: Vec<Vec<f32>> = token_nll(&hidden, &weight, &targets, None)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(stats[0], [0.0, 0.0]);
    assert_eq!(stats[1], [0.0, 0.0]);
    assert!(stats[2][0] > 0.0);
}

/// A frozen head packed for the bf16 GEMM: the NLL is the composed loss of the bf16-rounded
/// hidden states and head, the gradient within bf16 rounding of the f32 one.
#[test]
fn a_packed_head_gives_the_loss_of_the_rounded_operands() {
    use peftbench_backbone::bf16_gemm::available;
    use peftbench_backbone::bf16_matmul::PackedWeight;
    if !available() {
        eprintln!("skipped: no bf16 kernel on this CPU");
        return;
    }
    let rounded = common::bf16_rounded;
    let (hidden, weight, targets) = case(700, 24, 333, 0.3, 17);
    let packed = std::sync::Arc::new(PackedWeight::new(&weight).unwrap());
    let hv = Var::from_tensor(&hidden).unwrap();
    let got = token_nll(hv.as_tensor(), &weight, &targets, Some(&packed)).unwrap();
    let want = token_nll_composite(&rounded(&hidden), &rounded(&weight), &targets).unwrap();
    let nll = |s: &Tensor| s.narrow(1, 0, 1).unwrap();
    assert!(max_abs_diff(&nll(&got), &nll(&want)) < 1e-4);
    let grads = nll(&got).sum_all().unwrap().backward().unwrap();
    let g16 = grads.get(hv.as_tensor()).unwrap();
    // What the packed backward computes: (softmax − onehot) of the rounded logits, itself
    // rounded, times the rounded head.
    let (hr, wr) = (rounded(&hidden), rounded(&weight));
    let p =
        peftbench_backbone::ops::softmax_last_dim(&hr.matmul(&wr.t().unwrap()).unwrap()).unwrap();
    let t: Vec<u32> = targets.to_vec1().unwrap();
    let (n, vocab) = p.dims2().unwrap();
    let mut d: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    for (i, &ti) in t.iter().enumerate() {
        let row = &mut d[i * vocab..(i + 1) * vocab];
        match (ti as usize) < vocab {
            true => row[ti as usize] -= 1.0,
            false => row.fill(0.0),
        }
    }
    let d = Tensor::from_vec(d, (n, vocab), &Device::Cpu).unwrap();
    let want = rounded(&d).matmul(&wr).unwrap();
    let rel = max_abs_diff(g16, &want) / common::largest(std::slice::from_ref(&want));
    assert!(
        rel < 1e-3,
        "packed head gradient off by {rel} of the largest"
    );
}
