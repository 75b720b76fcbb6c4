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

/// candle's GEMM record is one per process (calls are made from the rayon pool's threads):
/// tests that record take turns.
static RECORDING: std::sync::Mutex<()> = std::sync::Mutex::new(());

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
        let _turn = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The low-rank and Kronecker deltas' own kernels are recorded once each way with the
    /// sizes they ran at (the input's gradient only when the input trains), and replayed.
    #[test]
    fn own_kernel_products_are_recorded_each_way_and_replayed(
        rows in 1usize..150,
        r in 1usize..17,
        (a, b, c, d) in (1usize..6, 1usize..9, 1usize..6, 1usize..9),
        input_trains in any::<bool>(),
        seed in any::<u64>(),
    ) {
        use candle_core::Var;
        use peftbench_backbone::gemm_floor::{record_all, KroneckerDims, LowRankSize, Own, Pass};
        use peftbench_backbone::init::Initializer;
        use peftbench_backbone::ops::{kronecker_product, low_rank_delta};

        let _turn = RECORDING.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let (inp, out) = (c * d, a * b);
        let x = init.normal((rows, inp), 1.0, &dev).unwrap();
        let x = if input_trains { Var::from_tensor(&x).unwrap().as_tensor().clone() } else { x };
        let var = |shape: (usize, usize), init: &mut Initializer| {
            Var::from_tensor(&init.normal(shape, 1.0, &dev).unwrap()).unwrap()
        };
        let (la, lb) = (var((r, inp), &mut init), var((out, r), &mut init));
        let (w1, w2) = (var((a, c), &mut init), var((b, d), &mut init));
        let ((), rec) = record_all(|| {
            let y = low_rank_delta(&x, la.as_tensor(), lb.as_tensor(), 0.5).unwrap();
            let z = kronecker_product(&x, w1.as_tensor(), w2.as_tensor(), 2.0).unwrap();
            (y + z).unwrap().sum_all().unwrap().backward().unwrap();
        });
        let size = LowRankSize { rows, inp, r, out };
        let dims = KroneckerDims { a, b, c, d };
        let back = Pass::Backward { dx: input_trains };
        let mut own = rec.own.clone();
        own.sort_by_key(|p| format!("{p:?}"));
        let mut want = vec![
            Own::LowRank(size, Pass::Forward),
            Own::LowRank(size, back),
            Own::Kronecker(rows, dims, Pass::Forward),
            Own::Kronecker(rows, dims, back),
        ];
        want.sort_by_key(|p| format!("{p:?}"));
        prop_assert_eq!(own, want);
        // Nothing is recorded once stopped.
        let ((), after) = record_all(|| ());
        prop_assert!(after.own.is_empty());
        // The forward's count is the composite path's: the same two products as candle
        // matmuls, recorded as GEMM calls.
        let (_, composite) = with_kernels(Kernels::Composite, || record(|| {
            low_rank_delta(&x, la.as_tensor(), lb.as_tensor(), 0.5).unwrap();
            kronecker_product(&x, w1.as_tensor(), w2.as_tensor(), 2.0).unwrap();
        }));
        let forward: f64 = rec.own.iter().filter(|p| matches!(p, Own::LowRank(_, Pass::Forward) | Own::Kronecker(_, _, Pass::Forward))).map(Own::flops).sum();
        prop_assert_eq!(forward, composite.iter().map(|c| c.flops()).sum::<f64>());
        let flops: f64 = rec.own.iter().map(Own::flops).sum();
        let mut replay = Replay::new(Vec::new()).with_own(rec.own);
        prop_assert_eq!(replay.own_flops(), flops);
        let [library, own_s] = replay.run_split();
        prop_assert!(library >= 0.0 && own_s > 0.0);
    }
}
