//! Batching for speed changes no result: `group_by_length` still visits every training
//! example once an epoch, and evaluation in length order (little padding) gives every
//! example the outcome it gets alone, in the examples' own order.

mod common;

use candle_core::Device;
use common::tiny_model;
use peftbench_backbone::{HeadKind, Initializer, NoIntervention, SequenceHead, TrainableParams};
use peftbench_datasets::GlueMetric;
use peftbench_harness::data::{Example, Target};
use peftbench_harness::objective::{
    evaluate_outcomes, longest_first, EvalBatches, Objective, Scorer,
};
use peftbench_harness::train::Order;
use peftbench_reports::outcomes::Outcomes;
use proptest::prelude::*;

fn ids(init: &mut Initializer, len: usize) -> Vec<u32> {
    (0..len).map(|_| 1 + init.index(49) as u32).collect()
}

/// Random examples of the objective, 1 to 12 tokens each.
fn examples(obj: &Objective, n: usize, seed: u64) -> Vec<Example> {
    let mut init = Initializer::new(seed);
    (0..n)
        .map(|_| {
            let len = 1 + init.index(12);
            match obj {
                Objective::Classification { .. } => Example::Text {
                    ids: ids(&mut init, len),
                    types: vec![0; len],
                    target: Target::Class(init.index(2)),
                },
                Objective::Regression => Example::Text {
                    ids: ids(&mut init, len),
                    types: vec![0; len],
                    target: Target::Score(init.index(5) as f32),
                },
                Objective::CausalLm => Example::Lm {
                    ids: ids(&mut init, len + 1),
                    response_start: 1 + init.index(len),
                },
                Objective::Reward => {
                    let other = 1 + init.index(12);
                    Example::Pair {
                        chosen: ids(&mut init, len),
                        rejected: ids(&mut init, other),
                    }
                }
            }
        })
        .collect()
}

/// Per-example outcomes as one flat list of numbers.
fn flat(o: &Outcomes) -> Vec<f64> {
    match o {
        Outcomes::Classes { gold, pred } => gold.iter().chain(pred).map(|&x| x as f64).collect(),
        Outcomes::Values { gold, pred } => gold.iter().chain(pred).copied().collect(),
        Outcomes::Pairs { margins } => margins.clone(),
        Outcomes::Tokens { nll, tokens, wrong } => nll
            .iter()
            .copied()
            .chain(tokens.iter().map(|&x| x as f64))
            .chain(wrong.iter().map(|&x| x as f64))
            .collect(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn grouped_order_visits_each_example_once_an_epoch_in_sorted_megabatches(
        n in 1usize..400,
        batch in 1usize..20,
        seed in any::<u64>(),
        epochs in 1usize..3,
    ) {
        let mut init = Initializer::new(seed);
        let lengths: Vec<usize> = (0..n).map(|_| 1 + init.index(300)).collect();
        let mut order = Order::grouped(lengths.clone(), batch, seed);
        let mega = (n / (4 * batch)).clamp(1, 50) * batch;
        for _ in 0..epochs {
            let epoch = order.next_batch(n);
            let mut seen = epoch.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..n).collect::<Vec<_>>());
            for chunk in epoch.chunks(mega) {
                prop_assert!(chunk.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
            }
        }
        // Grouping only reorders the same shuffle within megabatches, which are whole
        // batches: over the epoch's full batches, the padded size cannot exceed the plain
        // order's (sorted chunks minimise the sum of batch maxima of a fixed set).
        let padded = |o: &mut Order| -> usize {
            (0..n / batch)
                .map(|_| {
                    let b = o.next_batch(batch);
                    b.iter().map(|&i| lengths[i]).max().unwrap() * b.len()
                })
                .sum()
        };
        let grouped = padded(&mut Order::grouped(lengths.clone(), batch, seed));
        let plain = padded(&mut Order::new(n, seed));
        prop_assert!(grouped <= plain, "grouped {} > plain {}", grouped, plain);
    }

    /// Batched (padded or packed) evaluation gives each example the outcome it has alone.
    #[test]
    fn evaluation_in_length_order_gives_each_example_its_own_outcome(
        kind in 0usize..4,
        n in 1usize..20,
        batch in 1usize..9,
        seed in any::<u64>(),
        packed in any::<bool>(),
    ) {
        let (obj, family) = match kind {
            0 => (Objective::Classification { num_labels: 2, metric: GlueMetric::Matthews }, "bert"),
            1 => (Objective::Regression, "bert"),
            2 => (Objective::CausalLm, "llama"),
            _ => (Objective::Reward, "llama"),
        };
        let model = tiny_model(family, seed % 7);
        let mut params = TrainableParams::new();
        let head = obj
            .head_kind()
            .map(|k: HeadKind| {
                SequenceHead::new(&model, k, &mut params, &mut Initializer::new(seed)).unwrap()
            });
        let scorer = Scorer { model: &model, method: &NoIntervention, head: head.as_ref() };
        let data = examples(&obj, n, seed);
        // Packed rows too (reward pairs share their prompt either way).
        let batches = EvalBatches { size: batch, pad_id: 0, pack: packed };
        let (_, batched) = evaluate_outcomes(&obj, &scorer, &data, batches, &Device::Cpu).unwrap();
        // Each example scored on its own, padded, in the examples' order.
        let alone: Vec<Vec<f64>> = data
            .chunks(1)
            .map(|one| flat(&evaluate_outcomes(&obj, &scorer, one, EvalBatches::padded(1, 0), &Device::Cpu).unwrap().1))
            .collect();
        let a = flat(&batched);
        let fields = alone[0].len();
        let b: Vec<f64> = (0..fields).flat_map(|f| alone.iter().map(move |v| v[f])).collect();
        prop_assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            prop_assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{} vs {}", x, y);
        }
        // Evaluation really ran in length order: the longest example leads.
        let order = longest_first(&data);
        prop_assert!(order.windows(2).all(|w| data[w[0]].num_tokens() >= data[w[1]].num_tokens()));
    }
}
