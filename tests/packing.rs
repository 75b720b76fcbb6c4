//! Packed rows (several examples end to end, attention kept within each, positions restarting)
//! against the same examples each in its own padded row: every token's hidden state and every
//! method parameter's gradient agree, for every method on the three families, under both the
//! fused kernels and the composite graph. For decoders, a shared prompt with two continuations
//! in one row (a preference pair's tree) agrees with the two full conversations.

mod common;

use candle_core::{Device, Tensor};
use common::{attach_perturbed as attach, random_rows, tiny_model};
use peftbench_backbone::{
    pad_rows, with_kernels, Initializer, Inputs, Kernels, Packing, Transformer,
};
use peftbench_methods::*;
use proptest::prelude::*;

const FAMILIES: [&str; 3] = ["bert", "gpt2", "llama"];

fn methods() -> Vec<MethodConfig> {
    common::small_methods()
}

/// `rows` laid end to end in one row: `(segment, position)` per token given.
fn packed(tokens: &[u32], segments: &[u32], positions: &[u32]) -> Inputs {
    let n = tokens.len();
    let t = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, n), &Device::Cpu).unwrap();
    Inputs {
        input_ids: t(tokens),
        attention_mask: t(&vec![1; n]),
        token_type_ids: None,
        packing: Some(Packing {
            segments: t(segments),
            positions: t(positions),
            prompt: None,
        }),
    }
}

/// Hidden states `[tokens, hidden]` of `picks` ((row, position) pairs) and the gradients of
/// `Σ hidden · probe` over them with respect to the method's variables.
fn hidden_and_grads(
    model: &Transformer,
    method: &dyn Method,
    x: &Inputs,
    picks: &[(usize, usize)],
    probe: &Tensor,
) -> std::result::Result<(Tensor, Vec<Tensor>), String> {
    let enc = model.forward(x, method).map_err(|e| e.to_string())?;
    let rows: Vec<Tensor> = picks
        .iter()
        .map(|&(r, p)| enc.hidden.get(r).unwrap().get(p).unwrap())
        .collect();
    let h = Tensor::stack(&rows, 0).unwrap();
    let grads = (&h * probe).unwrap().sum_all().unwrap().backward().unwrap();
    Ok((h, common::grads_of(&grads, &method.params().vars())))
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b) / rel_scale(b).max(1e-6)
}

/// Largest magnitude in `b`.
fn rel_scale(b: &Tensor) -> f32 {
    b.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Compares the packed run with the reference for one method; `Ok(false)` where it refuses.
fn agree(
    what: &str,
    base: &Transformer,
    config: &MethodConfig,
    reference: (&Inputs, &[(usize, usize)]),
    pack: (&Inputs, &[(usize, usize)]),
) -> bool {
    let Some((model, method)) = attach(base, config) else {
        return false;
    };
    let hidden = model.config.hidden_size;
    let probe = Initializer::new(3)
        .normal(&[reference.1.len(), hidden], 1.0, &Device::Cpu)
        .unwrap();
    let (h_ref, g_ref) =
        hidden_and_grads(&model, method.as_ref(), reference.0, reference.1, &probe).unwrap();
    let packed = hidden_and_grads(&model, method.as_ref(), pack.0, pack.1, &probe);
    if method.input_prefix().unwrap().is_some() {
        // Virtual tokens open a row, not an example, without slots for them: refused.
        let e = packed.expect_err(what);
        assert!(e.contains("virtual tokens"), "{what}: {e}");
        return false;
    }
    let (h, g) = packed.unwrap_or_else(|e| panic!("{what}: {e}"));
    let e = rel(&h, &h_ref);
    assert!(e <= 1e-5, "{what}: hidden states differ by {e}");
    let e = common::grads_rel_diff(&g, &g_ref);
    assert!(e <= 1e-4, "{what}: gradients differ by {e}");
    true
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Examples packed into one row equal the same examples padded, one per row.
    #[test]
    fn packed_rows_equal_padded_rows(
        lens in proptest::collection::vec(1usize..7, 1..4),
        seed in 0u64..1000,
        composite in any::<bool>(),
    ) {
        let rows = random_rows(&lens, seed);
        let padded = pad_rows(&rows, None, 0, &Device::Cpu).unwrap();
        let mut picks_ref = Vec::new();
        let (mut tokens, mut segments, mut positions, mut picks) = (vec![], vec![], vec![], vec![]);
        for (r, row) in rows.iter().enumerate() {
            for (p, &id) in row.iter().enumerate() {
                picks_ref.push((r, p));
                picks.push((0, tokens.len()));
                tokens.push(id);
                segments.push(r as u32 + 1);
                positions.push(p as u32);
            }
        }
        let pack = packed(&tokens, &segments, &positions);
        let kernels = if composite { Kernels::Composite } else { Kernels::Fused };
        let mut compared = 0;
        for family in FAMILIES {
            let base = tiny_model(family, 11);
            for config in methods() {
                let what = format!("{family} {} {lens:?} {kernels:?}", config.name());
                compared += with_kernels(kernels, || {
                    agree(&what, &base, &config, (&padded, &picks_ref), (&pack, &picks))
                }) as usize;
            }
        }
        prop_assert!(compared > 20, "only {compared} method × family runs compared");
    }

    /// A decoder's shared prompt with two continuations in one row (the prompt as example 0,
    /// each continuation's positions going on from it) equals the two whole conversations.
    #[test]
    fn a_shared_prompt_with_two_branches_equals_both_conversations(
        prompt in 1usize..6,
        a in 1usize..5,
        b in 1usize..5,
        seed in 0u64..1000,
    ) {
        let parts = random_rows(&[prompt, a, b], seed);
        let full = |branch: &Vec<u32>| [parts[0].clone(), branch.clone()].concat();
        let padded = pad_rows(&[full(&parts[1]), full(&parts[2])], None, 0, &Device::Cpu).unwrap();
        let (mut tokens, mut segments, mut positions) = (vec![], vec![], vec![]);
        for (seg, part) in parts.iter().enumerate() {
            let start = if seg == 0 { 0 } else { prompt };
            for (p, &id) in part.iter().enumerate() {
                tokens.push(id);
                segments.push(seg as u32);
                positions.push((start + p) as u32);
            }
        }
        let pack = packed(&tokens, &segments, &positions);
        // Every position of both conversations, the prompt's read from the first branch.
        let mut picks_ref = Vec::new();
        let mut picks = Vec::new();
        for p in 0..prompt + a {
            picks_ref.push((0, p));
            picks.push((0, p));
        }
        for p in prompt..prompt + b {
            picks_ref.push((1, p));
            picks.push((0, prompt + a + (p - prompt)));
        }
        let mut compared = 0;
        for family in ["gpt2", "llama"] {
            let base = tiny_model(family, 5);
            for config in methods() {
                let what = format!("{family} {} tree {prompt}/{a}/{b}", config.name());
                compared += agree(&what, &base, &config, (&padded, &picks_ref), (&pack, &picks)) as usize;
            }
        }
        prop_assert!(compared > 10, "only {compared} method × family runs compared");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Preference pairs scored with their shared prefix packed once give the rewards and the
    /// gradients (method and head) of the pairs scored as separate rows, for every method a
    /// decoder's packing admits; pairs with no common prefix, or where one reply is a prefix
    /// of the other, included.
    #[test]
    fn packed_pairs_score_as_separate_rows(
        shapes in proptest::collection::vec((0usize..5, 0usize..4, 0usize..4), 1..4),
        seed in 0u64..1000,
    ) {
        use peftbench_backbone::{HeadKind, SequenceHead, TrainableParams};
        use peftbench_harness::objective::{pair_packing, pair_scores, Scorer};
        let mut chosen = Vec::new();
        let mut rejected = Vec::new();
        for (i, &(p, a, b)) in shapes.iter().enumerate() {
            let parts = random_rows(&[p, a.max(usize::from(p == 0)), b.max(usize::from(p == 0))], seed + i as u64);
            chosen.push([parts[0].clone(), parts[1].clone()].concat());
            rejected.push([parts[0].clone(), parts[2].clone()].concat());
        }
        let chosen = pad_rows(&chosen, None, 0, &Device::Cpu).unwrap();
        let rejected = pad_rows(&rejected, None, 0, &Device::Cpu).unwrap();
        let (mut compared, mut with_prompt) = (0, 0);
        for family in ["gpt2", "llama"] {
            let base = tiny_model(family, 5);
            for config in methods() {
                let Some((model, method)) = attach(&base, &config) else { continue };
                let mut head_params = TrainableParams::new();
                let head = SequenceHead::new(&model, HeadKind::Reward, &mut head_params, &mut Initializer::new(4)).unwrap();
                let s = Scorer { model: &model, method: method.as_ref(), head: Some(&head) };
                let what = format!("{family} {} {shapes:?}", config.name());
                let Some(prompt) = pair_packing(&s).unwrap() else {
                    continue;
                };
                let mut vars = method.params().vars();
                vars.extend(head_params.vars());
                let run = |packed: Option<usize>| {
                    let (c, r) = pair_scores(&s, &chosen, &rejected, packed).unwrap();
                    // Linear in the rewards: (c − r)² has a gradient ∝ c − r, which is near zero
                    // for pairs that differ by a token or two, leaving rounding as its whole size.
                    let loss = (&c + (&r * 0.5).unwrap()).unwrap().sum_all().unwrap();
                    let grads = loss.backward().unwrap();
                    let g = common::grads_of(&grads, &vars);
                    (Tensor::cat(&[c, r], 0).unwrap(), g)
                };
                let ((y, g), (y_ref, g_ref)) = (run(Some(prompt)), run(None));
                // A reward can cancel to ~1e-4 while its terms are ~1e-2 (head weights of
                // std 0.02 on unit-scale states): the error is relative to the terms.
                let e = common::max_abs_diff(&y, &y_ref) / rel_scale(&y_ref).max(1e-2);
                prop_assert!(e <= 1e-5, "{}: rewards differ by {}: {} vs {}", what, e, y, y_ref);
                let e = common::grads_rel_diff(&g, &g_ref);
                prop_assert!(e <= 1e-4, "{}: gradients differ by {}", what, e);
                compared += 1;
                with_prompt += usize::from(prompt > 0);
            }
        }
        prop_assert!(compared > 10, "only {compared} method × family runs compared");
        prop_assert!(with_prompt >= 2, "only {with_prompt} runs with virtual tokens");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// A causal-LM batch packed into rows gives the padded batch's loss and gradients for
    /// every method that admits packing, in no more rows.
    #[test]
    fn a_packed_lm_batch_trains_as_the_padded_one(
        shapes in proptest::collection::vec((2usize..9, 0usize..4), 1..6),
        seed in 0u64..1000,
    ) {
        use peftbench_harness::data::{batch_tokens, make_batch, pack_lm_batch, Batch, Example};
        use peftbench_harness::objective::{loss, packed_prompt, Objective, Scorer};
        let lens: Vec<usize> = shapes.iter().map(|s| s.0).collect();
        let examples: Vec<Example> = random_rows(&lens, seed)
            .into_iter()
            .zip(&shapes)
            .map(|(ids, &(n, start))| Example::Lm { ids, response_start: start.min(n - 1) })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let padded = make_batch(&refs, 0, &Device::Cpu).unwrap();
        let rows = |b: &Batch| match b {
            Batch::Lm { inputs, .. } => inputs.input_ids.dim(0).unwrap(),
            _ => unreachable!(),
        };
        let (mut compared, mut with_prompt) = (0, 0);
        for family in ["gpt2", "llama"] {
            let base = tiny_model(family, 5);
            for config in methods() {
                let Some((model, method)) = attach(&base, &config) else { continue };
                let s = Scorer { model: &model, method: method.as_ref(), head: None };
                let prompt = packed_prompt(&s).unwrap().expect("one prompt for every example");
                let packed = pack_lm_batch(&refs, prompt, 0, &Device::Cpu).unwrap();
                prop_assert!(rows(&packed) <= rows(&padded));
                prop_assert_eq!(batch_tokens(&packed).unwrap(), batch_tokens(&padded).unwrap());
                let vars = method.params().vars();
                let run = |b: &Batch| {
                    let l = loss(&Objective::CausalLm, &s, b).unwrap();
                    let grads = l.backward().unwrap();
                    let g = common::grads_of(&grads, &vars);
                    (l.to_scalar::<f32>().unwrap(), g)
                };
                let what = format!("{family} {} {shapes:?}", config.name());
                let ((l, g), (l_ref, g_ref)) = (run(&packed), run(&padded));
                prop_assert!((l - l_ref).abs() <= 1e-5 * l_ref.abs().max(1.0), "{}: loss {} vs {}", what, l, l_ref);
                let e = common::grads_rel_diff(&g, &g_ref);
                prop_assert!(e <= 1e-4, "{}: gradients differ by {}", what, e);
                compared += 1;
                with_prompt += usize::from(prompt > 0);
            }
        }
        prop_assert!(compared > 10, "only {compared} method × family runs compared");
        prop_assert!(with_prompt >= 2, "only {with_prompt} runs with virtual tokens");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// A classification or regression batch packed into rows gives every example the head
    /// output it has in a padded row, and the padded batch's gradients (method and head), for
    /// each pooling and every method that admits packing, in no more rows; BERT's segment ids
    /// travel with their tokens.
    #[test]
    fn a_packed_text_batch_trains_as_the_padded_one(
        lens in proptest::collection::vec(2usize..9, 1..6),
        pooling in 0usize..3,
        regression in any::<bool>(),
        seed in 0u64..1000,
    ) {
        use peftbench_backbone::{HeadKind, Pooling, SequenceHead, TrainableParams};
        use peftbench_datasets::GlueMetric;
        use peftbench_harness::data::{
            batch_tokens, make_batch, pack_text_batch, Batch, Example, Target,
        };
        use peftbench_harness::objective::{loss, packed_prompt, Objective, Scorer};
        let pooling = [Pooling::First, Pooling::LastToken, Pooling::Mean][pooling];
        let (obj, kind) = match regression {
            true => (Objective::Regression, HeadKind::Regression),
            false => (
                Objective::Classification { num_labels: 3, metric: GlueMetric::Accuracy },
                HeadKind::Classifier { num_labels: 3 },
            ),
        };
        let mut init = Initializer::new(seed + 1);
        let examples: Vec<Example> = random_rows(&lens, seed)
            .into_iter()
            .enumerate()
            .map(|(i, ids)| {
                // A sentence pair: the second part's tokens carry segment 1.
                let split = init.index(ids.len());
                let types = (0..ids.len()).map(|p| u32::from(p >= split)).collect();
                let target = match regression {
                    true => Target::Score(i as f32 * 0.7 - 1.0),
                    false => Target::Class(i % 3),
                };
                Example::Text { ids, types, target }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let padded = make_batch(&refs, 0, &Device::Cpu).unwrap();
        let rows = |b: &Batch| match b {
            Batch::Text { inputs, .. } => inputs.input_ids.dim(0).unwrap(),
            _ => unreachable!(),
        };
        let outputs = |s: &Scorer, b: &Batch| {
            let Batch::Text { inputs, spans, .. } = b else { unreachable!() };
            let enc = s.model.forward(inputs, s.method).unwrap();
            let head = s.head.unwrap();
            match spans {
                Some(spans) => head.forward_spans(s.model, &enc, spans).unwrap(),
                None => head.forward(s.model, &enc).unwrap(),
            }
        };
        // The prompt at no positions, the input at its own, as well as the default.
        let mut configs = methods();
        configs.push(MethodConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: 2,
            input_keeps_positions: true,
            ..Default::default()
        }));
        let (mut compared, mut with_prompt) = (0, 0);
        for family in FAMILIES {
            let base = tiny_model(family, 5);
            for config in &configs {
                let Some((model, method)) = attach(&base, config) else { continue };
                let mut head_params = TrainableParams::new();
                let head = SequenceHead::new(&model, kind, &mut head_params, &mut Initializer::new(4))
                    .unwrap()
                    .with_pooling(pooling);
                let s = Scorer { model: &model, method: method.as_ref(), head: Some(&head) };
                let prompt = packed_prompt(&s).unwrap().expect("one prompt for every example");
                let packed = pack_text_batch(&refs, prompt, 0, &Device::Cpu).unwrap();
                prop_assert!(rows(&packed) <= rows(&padded));
                prop_assert_eq!(batch_tokens(&packed).unwrap(), batch_tokens(&padded).unwrap());
                let mut vars = method.params().vars();
                vars.extend(head_params.vars());
                let run = |b: &Batch| {
                    let l = loss(&obj, &s, b).unwrap();
                    let g = common::grads_of(&l.backward().unwrap(), &vars);
                    (outputs(&s, b), l.to_scalar::<f32>().unwrap(), g)
                };
                let what = format!("{family} {} {pooling:?} {lens:?}", config.name());
                let ((y, l, g), (y_ref, l_ref, g_ref)) = (run(&packed), run(&padded));
                // Relative to the head's terms, as for rewards.
                let e = common::max_abs_diff(&y, &y_ref) / rel_scale(&y_ref).max(1e-2);
                prop_assert!(e <= 1e-5, "{}: head outputs differ by {}", what, e);
                prop_assert!((l - l_ref).abs() <= 1e-5 * l_ref.abs().max(1.0), "{}: loss {} vs {}", what, l, l_ref);
                let e = common::grads_rel_diff(&g, &g_ref);
                prop_assert!(e <= 1e-4, "{}: gradients differ by {}", what, e);
                compared += 1;
                with_prompt += usize::from(prompt > 0);
            }
        }
        prop_assert!(compared > 20, "only {compared} method × family runs compared");
        prop_assert!(with_prompt >= 5, "only {with_prompt} runs with virtual tokens");
    }
}
