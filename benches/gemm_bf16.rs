//! The frozen projections' GEMMs in f32 (candle's matmul, the gemm crate) and in bf16 (the
//! AVX-512-BF16 kernel, weight packed once), at the step shapes of all-MiniLM-L6-v2
//! (16 × 64 tokens) and SmolLM2-135M (8 × 256): forward `x·Wᵀ` and the input gradient
//! `g·W`. Prints GFLOP/s and the ratio, median of interleaved repetitions.
//! `cargo bench --bench gemm_bf16`.

use candle_core::{Device, Tensor};
use peftbench_backbone::bf16_gemm::{matmul_with, Kernel, PackedB};
use peftbench_backbone::Initializer;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let kernels: Vec<Kernel> = [Kernel::Avx512Bf16, Kernel::Amx]
        .into_iter()
        .filter(|k| k.runs_here())
        .collect();
    if kernels.is_empty() {
        println!("this CPU has neither AMX nor AVX-512-BF16: nothing to compare");
        return;
    }
    let dev = Device::Cpu;
    let mut init = Initializer::new(0);
    println!("threads {}", candle_core::utils::get_num_threads());
    let names: Vec<&str> = kernels.iter().map(|k| k.name()).collect();
    println!(
        "| shape (tokens × in → out) | pass | f32 GFLOP/s | {} |",
        names
            .iter()
            .map(|n| format!("{n} GFLOP/s (time vs f32)"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|---:|{}", "---:|".repeat(kernels.len()));
    let shapes = [
        ("MiniLM q/k/v/o", 1024, 384, 384),
        ("MiniLM up", 1024, 384, 1536),
        ("MiniLM down", 1024, 1536, 384),
        ("SmolLM2 q/o", 2048, 576, 576),
        ("SmolLM2 k/v", 2048, 576, 192),
        ("SmolLM2 gate/up", 2048, 576, 1536),
        ("SmolLM2 down", 2048, 1536, 576),
    ];
    for (name, m, inp, out) in shapes {
        let w = init.normal((out, inp), 0.05, &dev).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        // Forward x·Wᵀ: B = Wᵀ [in, out]; backward g·W: B = W [out, in].
        for (pass, k, n, rs, cs) in [("x·Wᵀ", inp, out, 1, inp), ("g·W", out, inp, inp, 1)] {
            let x = init.normal((m, k), 1.0, &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let b: Tensor = if pass == "x·Wᵀ" {
                w.t().unwrap()
            } else {
                w.clone()
            };
            let packed = PackedB::pack(&wv, k, n, rs, cs);
            let mut c = vec![0f32; m * n];
            let mut f32s = Vec::new();
            let mut bf16s = vec![Vec::new(); kernels.len()];
            for _ in 0..15 {
                let t0 = Instant::now();
                let y = x.matmul(&b).unwrap();
                f32s.push(t0.elapsed().as_secs_f64());
                drop(y);
                for (i, &kernel) in kernels.iter().enumerate() {
                    let t0 = Instant::now();
                    matmul_with(kernel, &xv, m, &packed, &mut c);
                    bf16s[i].push(t0.elapsed().as_secs_f64());
                }
            }
            let flop = 2.0 * (m * k * n) as f64;
            let f = median(f32s);
            let cells: Vec<String> = bf16s
                .into_iter()
                .map(|t| {
                    let h = median(t);
                    format!("{:.0} ({:.2})", flop / h / 1e9, h / f)
                })
                .collect();
            println!(
                "| {name} ({m} × {k} → {n}) | {pass} | {:.0} | {} |",
                flop / f / 1e9,
                cells.join(" | ")
            );
        }
    }
}
