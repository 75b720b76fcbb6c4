//! The GEMM floor records every GEMM a forward pass makes: over random shapes, with the fused
//! kernels and with candle's composites, the recorded multiply-adds are exactly the model's
//! projections and attention products, and the replay runs them.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_model;
use peftbench_backbone::gemm_floor::{record, Replay};
use peftbench_backbone::kernels::{with_kernels, Kernels};
use peftbench_backbone::{Inputs, NoIntervention};
use proptest::prelude::*;

/// 2·(multiply-adds) of one forward of `b` rows of `t` tokens.
fn forward_flops(family: &str, b: usize, t: usize) -> f64 {
    let c = common::tiny_config(family);
    let (h, i, heads) = (c.hidden_size, c.intermediate_size, c.num_heads);
    let d = h / heads;
    let kv = c.num_kv_heads * d;
    let rows = b * t;
    let per_layer = match family {
        // query, key, value, output; intermediate and output dense.
        "bert" => rows * (4 * h * h + 2 * h * i),
        // query and output full width, key and value at the KV width; gate, up and down.
        _ => rows * (2 * h * h + 2 * h * kv + 3 * h * i),
    } + 2 * b * heads * t * t * d;
    2.0 * (c.num_layers * per_layer) as f64
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_forward_records_exactly_its_projections_and_attention_products(
        llama in any::<bool>(),
        composite in any::<bool>(),
        b in 1usize..4,
        t in 1usize..12,
        seed in any::<u64>(),
    ) {
        let family = if llama { "llama" } else { "bert" };
        let model = tiny_model(family, seed % 5);
        let ids: Vec<u32> = (0..b * t).map(|x| 1 + (x as u32 * 7 + seed as u32) % 40).collect();
        let inputs = Inputs {
            input_ids: Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap(),
            attention_mask: Tensor::ones((b, t), DType::U32, &Device::Cpu).unwrap(),
            token_type_ids: None,
            packing: None,
        };
        let kernels = if composite { Kernels::Composite } else { Kernels::Fused };
        let (out, calls) = with_kernels(kernels, || record(|| model.forward(&inputs, &NoIntervention)));
        out.unwrap();
        let recorded: f64 = calls.iter().map(|c| c.flops()).sum();
        prop_assert_eq!(recorded, forward_flops(family, b, t));
        // Nothing is recorded once stopped.
        let (_, after) = record(|| ());
        prop_assert!(after.is_empty());
        model.forward(&inputs, &NoIntervention).unwrap();
        let mut replay = Replay::new(calls);
        prop_assert_eq!(replay.flops(), recorded);
        prop_assert!(replay.run() > 0.0);
    }
}
