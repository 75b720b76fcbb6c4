//! The AVX-512-BF16 GEMM against the exact product of the same bf16-rounded operands, over
//! random shapes (partial strips and panels, odd inner sizes, several k blocks) and strides.

use peftbench_backbone::bf16_gemm::{from_bf16, matmul_with, to_bf16, Kernel, PackedB};
use peftbench_backbone::Initializer;
use proptest::prelude::*;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let t = Initializer::new(seed)
        .normal(n.max(1), 1.0, &candle_core::Device::Cpu)
        .unwrap();
    t.to_vec1::<f32>().unwrap()[..n].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn bf16_gemm_equals_the_exact_product_of_rounded_operands(
        m in 1usize..100,
        k in 1usize..700,
        n in 1usize..90,
        transposed in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let kernels: Vec<Kernel> = [Kernel::Amx, Kernel::Avx512Bf16]
            .into_iter()
            .filter(|k| k.runs_here())
            .collect();
        if kernels.is_empty() {
            eprintln!("skipped: this CPU has neither AMX nor AVX-512-BF16");
            return Ok(());
        }
        let a = values(m * k, seed);
        let b = values(k * n, seed + 1);
        // B[i][j] read row-major, or from its transpose (a weight [n, k] used as x·Wᵀ).
        let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
        let packed = PackedB::pack(&b, k, n, rs, cs);
        let r = |x: f32| from_bf16(to_bf16(x)) as f64;
        for kernel in kernels {
        let mut c = vec![f32::NAN; m * n];
        matmul_with(kernel, &a, m, &packed, &mut c);
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut scale) = (0f64, 0f64);
                for p in 0..k {
                    let t = r(a[i * k + p]) * r(b[p * rs + j * cs]);
                    want += t;
                    scale += t.abs();
                }
                let got = c[i * n + j] as f64;
                // f32 accumulation: error grows with the sum of |terms|.
                prop_assert!((got - want).abs() <= 1e-6 * scale + 1e-6,
                    "{}: c[{i}][{j}] = {got}, want {want} (m {m} k {k} n {n})", kernel.name());
            }
        }
        }
    }
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    assert_eq!(to_bf16(1.0), 0x3f80);
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
    assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to the even one, 1 + 2^-6.
    assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
}
