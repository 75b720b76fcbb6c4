//! The GEMM floor with bf16 products. Its own binary: the f32 GEMM trace is process-wide,
//! so no other test may run GEMMs while this one records.

mod common;

use candle_core::Device;
use common::tiny_config;
use peftbench_backbone::bf16_gemm::available;
use peftbench_backbone::{pad_rows, Transformer};

/// The GEMM floor sees the bf16 products: a packed model's forward records every
/// projection's shape there (and none among the f32 calls), and the replay runs them.
#[test]
fn the_gemm_floor_records_and_replays_the_bf16_products() {
    use peftbench_backbone::gemm_floor::{record, record_with_bf16, Replay};
    if !available() {
        eprintln!("skipped: no bf16 kernel on this CPU");
        return;
    }
    let rows: Vec<Vec<u32>> = vec![(1..9).collect(), (3..11).collect()];
    let x = pad_rows(&rows, None, 0, &Device::Cpu).unwrap();
    let base = Transformer::random(tiny_config("llama"), 3, &Device::Cpu).unwrap();
    let mut packed = base.clone();
    packed.pack_frozen_bf16().unwrap();
    let none = peftbench_backbone::NoIntervention;
    let (_, f32_calls) = record(|| base.forward(&x, &none).unwrap());
    let (_, rest, bf16) = record_with_bf16(|| packed.forward(&x, &none).unwrap());
    let flops = |calls: &[peftbench_backbone::gemm_floor::Gemm]| -> f64 {
        calls.iter().map(|c| c.flops()).sum()
    };
    let bf16_flops: f64 = bf16.iter().map(|[m, k, n]| 2.0 * (m * k * n) as f64).sum();
    // The same work, the projections moved from the f32 calls to the bf16 ones.
    assert!(bf16_flops > 0.0);
    assert_eq!(flops(&rest) + bf16_flops, flops(&f32_calls));
    assert!(bf16.iter().all(|&[m, _, _]| m == 2 * 8), "{bf16:?}");
    let mut replay = Replay::new(rest).with_bf16(bf16);
    assert_eq!(replay.flops(), flops(&f32_calls));
    assert!(replay.run() > 0.0);
}
