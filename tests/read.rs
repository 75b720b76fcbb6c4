//! A forward that computes the last layer only at the positions its caller reads (one per
//! row for a sequence head, one per example for packed rows) against the whole forward: the
//! same hidden states there and the same gradients for every method's variables, on the
//! three families, padded and packed rows, the fused kernels and the composite graph.

mod common;

use candle_core::{Device, Tensor};
use common::{attach_perturbed as attach, random_rows, tiny_model};
use peftbench_backbone::{
    pad_rows, with_kernels, Encoded, Initializer, Inputs, Kernels, Packing, Read, Transformer,
};
use peftbench_methods::*;
use proptest::prelude::*;

/// The flat `row · seq + position` indices `read` names in the whole forward's output.
fn positions(read: &Read, whole: &Encoded) -> Vec<u32> {
    let seq = whole.hidden.dim(1).unwrap();
    let mask: Vec<Vec<f32>> = whole.mask.to_vec2().unwrap();
    match read {
        Read::All => (0..(mask.len() * seq) as u32).collect(),
        Read::First => (0..mask.len()).map(|r| (r * seq) as u32).collect(),
        Read::Last => mask
            .iter()
            .enumerate()
            .map(|(r, m)| (r * seq + m.iter().rposition(|&v| v > 0.0).unwrap_or(0)) as u32)
            .collect(),
        Read::At(at) => at.clone(),
    }
}

/// `states` and the gradients of `Σ states · probe` for the method's variables.
fn with_grads(states: Tensor, probe: &Tensor, method: &dyn Method) -> (Tensor, Vec<Tensor>) {
    let grads = (&states * probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (states, common::grads_of(&grads, &method.params().vars()))
}

/// The read states `[n, hidden]` from the forward that computes only them, with gradients.
fn states_and_grads(
    model: &Transformer,
    method: &dyn Method,
    x: &Inputs,
    read: &Read,
    probe: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let enc = model.forward_read(x, method, read).unwrap();
    let states = match read {
        Read::All => unreachable!(),
        _ => enc.hidden.squeeze(1).unwrap(),
    };
    with_grads(states, probe, method)
}

/// The same states picked from the whole forward's output, with gradients.
fn whole_at(
    model: &Transformer,
    method: &dyn Method,
    x: &Inputs,
    read: &Read,
    probe: &Tensor,
) -> (Tensor, Vec<Tensor>) {
    let enc = model.forward(x, method).unwrap();
    let at = positions(read, &enc);
    let (b, s, h) = enc.hidden.dims3().unwrap();
    let idx = Tensor::from_vec(at.clone(), at.len(), &Device::Cpu).unwrap();
    let states = enc
        .hidden
        .reshape((b * s, h))
        .unwrap()
        .index_select(&idx, 0)
        .unwrap();
    with_grads(states, probe, method)
}

/// Reads `read` both ways for every method on `family`; returns how many runs compared.
/// Methods with an input prefix are left out where `read` names input positions (their
/// virtual tokens would move them) or the rows are packed (tests/packing.rs covers slots).
fn compare(family: &str, x: &Inputs, read: &Read, n: usize, what: &str) -> usize {
    let base = tiny_model(family, 11);
    let probe = Initializer::new(3)
        .normal(&[n, base.config.hidden_size], 1.0, &Device::Cpu)
        .unwrap();
    let mut compared = 0;
    for config in common::small_methods() {
        let Some((model, method)) = attach(&base, &config) else {
            continue;
        };
        let positional = x.packing.is_some() || matches!(read, Read::At(_));
        if positional && method.input_prefix().unwrap().is_some() {
            continue;
        }
        let what = format!("{what} {family} {}", config.name());
        let (h_ref, g_ref) = whole_at(&model, method.as_ref(), x, read, &probe);
        let (h, g) = states_and_grads(&model, method.as_ref(), x, read, &probe);
        let scale = common::largest(std::slice::from_ref(&h_ref)).max(1e-6);
        let e = common::max_abs_diff(&h, &h_ref) / scale;
        assert!(e <= 1e-5, "{what}: states differ by {e}");
        let e = common::grads_rel_diff(&g, &g_ref);
        assert!(e <= 1e-4, "{what}: gradients differ by {e}");
        compared += 1;
    }
    compared
}

fn kernels(composite: bool) -> Kernels {
    if composite {
        Kernels::Composite
    } else {
        Kernels::Fused
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// Padded rows read at their first, their last real, or arbitrary positions (repeats and
    /// several per row included).
    #[test]
    fn reading_padded_rows_equals_the_whole_forward(
        lens in proptest::collection::vec(1usize..7, 1..4),
        picks in proptest::collection::vec((0usize..4, 0usize..8), 1..6),
        seed in 0u64..1000,
        composite in any::<bool>(),
    ) {
        let rows = random_rows(&lens, seed);
        let x = pad_rows(&rows, None, 0, &Device::Cpu).unwrap();
        let len = lens.iter().copied().max().unwrap();
        let b = rows.len();
        let mut compared = 0;
        for family in ["bert", "gpt2", "llama"] {
            for read in [Read::First, Read::Last] {
                let what = format!("{read:?} {lens:?}");
                compared += with_kernels(kernels(composite), || compare(family, &x, &read, b, &what));
            }
            // Arbitrary positions of the input (no method here adds an input prefix's worth of
            // positions unless it has one; those index the extended row).
            let at: Vec<u32> = picks.iter().map(|&(r, p)| ((r % b) * len + p % len) as u32).collect();
            let base = tiny_model(family, 11);
            let plain = base.forward(&x, &peftbench_backbone::NoIntervention).unwrap();
            let seq = plain.hidden.dim(1).unwrap();
            prop_assert_eq!(seq, len);
            let read = Read::At(at.clone());
            let what = format!("{read:?} {lens:?}");
            compared += with_kernels(kernels(composite), || compare(family, &x, &read, at.len(), &what));
        }
        prop_assert!(compared > 40, "only {compared} method × family runs compared");
    }

    /// Packed rows read at each example's first or last token, as a packed batch's head does.
    #[test]
    fn reading_packed_rows_equals_the_whole_forward(
        lens in proptest::collection::vec(1usize..6, 1..5),
        seed in 0u64..1000,
        last in any::<bool>(),
        composite in any::<bool>(),
    ) {
        let rows = random_rows(&lens, seed);
        let (mut tokens, mut segments, mut positions, mut at) = (vec![], vec![], vec![], vec![]);
        for (r, row) in rows.iter().enumerate() {
            at.push((tokens.len() + if last { row.len() - 1 } else { 0 }) as u32);
            for (p, &id) in row.iter().enumerate() {
                tokens.push(id);
                segments.push(r as u32 + 1);
                positions.push(p as u32);
            }
        }
        let n = tokens.len();
        let t = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, n), &Device::Cpu).unwrap();
        let x = Inputs {
            input_ids: t(&tokens),
            attention_mask: t(&vec![1; n]),
            token_type_ids: None,
            packing: Some(Packing { segments: t(&segments), positions: t(&positions), prompt: None }),
        };
        let read = Read::At(at.clone());
        let mut compared = 0;
        for family in ["bert", "gpt2", "llama"] {
            let what = format!("packed {lens:?} {read:?}");
            compared += with_kernels(kernels(composite), || compare(family, &x, &read, at.len(), &what));
        }
        prop_assert!(compared > 20, "only {compared} method × family runs compared");
    }
}

/// A position outside the batch is refused with the position and the batch's shape.
#[test]
fn a_read_outside_the_batch_is_refused() {
    let base = tiny_model("bert", 1);
    let x = pad_rows(&[vec![1, 2, 3], vec![4]], None, 0, &Device::Cpu).unwrap();
    let e = base
        .forward_read(
            &x,
            &peftbench_backbone::NoIntervention,
            &Read::At(vec![1, 6]),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("read position 6") && e.contains("2 × 3"), "{e}");
}
