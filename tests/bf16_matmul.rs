//! Frozen projections packed for the bf16 GEMM: each product equals the f32 product of the
//! bf16-rounded operands (forward and input gradient; a trained projection's too, with its
//! weight's gradient in f32), a replaced weight is never read from a stale packing, and a
//! packed model trains a method like the f32 one within bf16 rounding.

mod common;

use candle_core::{Device, Tensor, Var};
use common::{grads_of, grads_rel_diff, max_abs_diff, tiny_config};
use peftbench_backbone::bf16_gemm::available;
use peftbench_backbone::{pad_rows, Initializer, Linear, Transformer};
use peftbench_methods::{AttachContext, MethodConfig};
use proptest::prelude::*;

use common::bf16_rounded as rounded;

/// Whether this CPU lacks a bf16 kernel (the test then says it is skipped).
fn no_kernel() -> bool {
    let none = !available();
    if none {
        eprintln!("skipped: no bf16 kernel on this CPU");
    }
    none
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn a_packed_projection_is_the_f32_product_of_rounded_operands(
        rows in 1usize..80,
        inp in 1usize..100,
        out in 1usize..100,
        seed in 0u64..1000,
    ) {
        if no_kernel() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let w = init.normal((out, inp), 1.0, &dev).unwrap();
        let x = Var::from_tensor(&init.normal((rows, inp), 1.0, &dev).unwrap()).unwrap();
        let c = init.normal((rows, out), 1.0, &dev).unwrap();
        let mut lin = Linear::new(w.clone(), None);
        prop_assert!(lin.pack_bf16().unwrap());
        let y = lin.forward(x.as_tensor()).unwrap();
        let gx = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = gx.get(x.as_tensor()).unwrap();
        let want_y = rounded(x.as_tensor()).matmul(&rounded(&w).t().unwrap()).unwrap();
        let want_gx = rounded(&c).matmul(&rounded(&w)).unwrap();
        let tol = |t: &Tensor| 1e-5 * common::largest(std::slice::from_ref(t)).max(1.0);
        prop_assert!(max_abs_diff(&y, &want_y) <= tol(&want_y), "forward {}", max_abs_diff(&y, &want_y));
        prop_assert!(max_abs_diff(gx, &want_gx) <= tol(&want_gx), "gradient {}", max_abs_diff(gx, &want_gx));
    }

    /// A projection that trains after packing (full fine-tuning): its forward and input
    /// gradient are the rounded operands' products, its weight's gradient the f32 one.
    #[test]
    fn a_trained_projection_multiplies_in_bf16_and_keeps_an_f32_weight_gradient(
        rows in 1usize..80,
        inp in 1usize..100,
        out in 1usize..100,
        seed in 0u64..1000,
    ) {
        if no_kernel() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let w = Var::from_tensor(&init.normal((out, inp), 1.0, &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&init.normal((rows, inp), 1.0, &dev).unwrap()).unwrap();
        let c = init.normal((rows, out), 1.0, &dev).unwrap();
        let mut lin = Linear::new(w.as_tensor().detach(), None);
        lin.pack_bf16().unwrap();
        // As full fine-tuning's attach: the weight becomes a variable in place.
        lin.weight = w.as_tensor().clone();
        let y = lin.forward(x.as_tensor()).unwrap();
        let g = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gw) = (g.get(x.as_tensor()).unwrap(), g.get(w.as_tensor()).unwrap());
        let want_y = rounded(x.as_tensor()).matmul(&rounded(w.as_tensor()).t().unwrap()).unwrap();
        let want_gx = rounded(&c).matmul(&rounded(w.as_tensor())).unwrap();
        let want_gw = c.t().unwrap().matmul(x.as_tensor()).unwrap();
        let tol = |t: &Tensor| 1e-5 * common::largest(std::slice::from_ref(t)).max(1.0);
        prop_assert!(max_abs_diff(&y, &want_y) <= tol(&want_y), "forward {}", max_abs_diff(&y, &want_y));
        prop_assert!(max_abs_diff(gx, &want_gx) <= tol(&want_gx), "input gradient {}", max_abs_diff(gx, &want_gx));
        prop_assert!(max_abs_diff(gw, &want_gw) <= tol(&want_gw), "weight gradient {}", max_abs_diff(gw, &want_gw));
    }
}

#[test]
fn a_replaced_weight_is_not_read_from_its_old_packing() {
    if no_kernel() {
        return;
    }
    let dev = Device::Cpu;
    let mut init = Initializer::new(4);
    let w = init.normal((6, 5), 1.0, &dev).unwrap();
    let x = init.normal((3, 5), 1.0, &dev).unwrap();
    let mut lin = Linear::new(w.clone(), None);
    lin.pack_bf16().unwrap();
    assert!(lin.is_packed_bf16());
    // A merge replaces the weight: the product is f32 again, exactly.
    let delta = init.normal((6, 5), 0.1, &dev).unwrap();
    lin.add_to_weight(&delta).unwrap();
    assert!(!lin.is_packed_bf16());
    let want = x.matmul(&(&w + &delta).unwrap().t().unwrap()).unwrap();
    assert_eq!(max_abs_diff(&lin.forward(&x).unwrap(), &want), 0.0);
    // Overwriting the tensor in place (as a device move would) leaves the packing unused.
    let mut lin = Linear::new(w.clone(), None);
    lin.pack_bf16().unwrap();
    lin.weight = delta.clone();
    assert!(!lin.is_packed_bf16());
    let want = x.matmul(&delta.t().unwrap()).unwrap();
    assert_eq!(max_abs_diff(&lin.forward(&x).unwrap(), &want), 0.0);
    // A trained weight is never packed (its products pack per call, see above).
    let mut trained = Linear::new(Var::from_tensor(&w).unwrap().as_tensor().clone(), None);
    assert!(!trained.pack_bf16().unwrap());
}

#[test]
fn a_packed_model_trains_lora_and_full_fine_tuning_like_the_f32_model_within_bf16_rounding() {
    if no_kernel() {
        return;
    }
    let mut init = Initializer::new(5);
    let rows: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..20).map(|_| 1 + init.index(45) as u32).collect())
        .collect();
    let x = pad_rows(&rows, None, 0, &Device::Cpu).unwrap();
    for family in ["bert", "llama"] {
        let base = Transformer::random(tiny_config(family), 3, &Device::Cpu).unwrap();
        let mut packed = base.clone();
        assert!(packed.pack_frozen_bf16().unwrap() > 0);
        assert!(packed.is_packed_bf16() && !base.is_packed_bf16());
        // A device/dtype no-op keeps the packing.
        let packed = packed.to(&Device::Cpu, candle_core::DType::F32).unwrap();
        assert!(packed.is_packed_bf16());
        // Full fine-tuning's weights train, so their products pack per call.
        for name in ["lora", "full_finetune"] {
            let config = MethodConfig::defaults()
                .into_iter()
                .find(|m| m.name() == name)
                .unwrap();
            let run = |model: &Transformer| {
                let mut model = model.clone();
                let method = config
                    .attach(&mut AttachContext::new(&mut model, 7))
                    .unwrap();
                let vars = method.params().vars();
                // B starts at zero: nudge it so A's gradient is not zero too.
                for v in &vars {
                    v.set(&(v.as_tensor() + 0.05).unwrap()).unwrap();
                }
                let h = model.forward(&x, method.as_ref()).unwrap().hidden;
                // A random readout: a post-norm model's Σh² is nearly constant, its gradient all
                // cancellation.
                let c = Initializer::new(11)
                    .normal(h.dims(), 1.0, &Device::Cpu)
                    .unwrap();
                let g = (&h * &c).unwrap().sum_all().unwrap().backward().unwrap();
                (h, grads_of(&g, &vars))
            };
            let (h32, g32) = run(&base);
            let (h16, g16) = run(&packed);
            let dh = max_abs_diff(&h16, &h32) / common::largest(std::slice::from_ref(&h32));
            assert!(dh > 0.0, "{family} {name}: the packing was not used");
            assert!(
                dh < 2e-2,
                "{family} {name}: hidden states differ by {dh} of the largest"
            );
            let dg = grads_rel_diff(&g16, &g32);
            assert!(
                dg < 2e-2,
                "{family} {name}: gradients differ by {dg} of the largest"
            );
        }
    }
}
