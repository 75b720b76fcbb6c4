//! A projection whose weight trains (a variable, or a weight computed from one): its value and the gradients of its input and weight
//! equal candle's f64 matmul and its gradients, over random leading shapes and widths, with
//! and without a trained input; the weight's gradient comes back in the weight's layout.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{grads_of, grads_rel_diff, max_abs_diff};
use peftbench_backbone::{Initializer, Linear};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn a_trained_projection_and_its_gradients_equal_the_f64_matmul(
        batch in 1usize..4,
        len in 1usize..70,
        inp in 1usize..60,
        out in 1usize..60,
        x_trains in any::<bool>(),
        computed_weight in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let x = init.normal((batch, len, inp), 1.0, &dev).unwrap();
        let w = init.normal((out, inp), 0.5, &dev).unwrap();
        let c = init.normal((batch, len, out), 1.0, &dev).unwrap();
        let run = |dtype: DType| {
            let (xv, wv) = (
                Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap(),
                Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap(),
            );
            let xin = if x_trains { xv.as_tensor().clone() } else { xv.as_tensor().detach() };
            // A variable through `Linear`, or a weight computed from one (a dense delta)
            // through `ops::matmul_t`.
            let y = if computed_weight {
                peftbench_backbone::ops::matmul_t(&xin, &(wv.as_tensor() * 1.0).unwrap()).unwrap()
            } else {
                Linear::new(wv.as_tensor().clone(), None).forward(&xin).unwrap()
            };
            let grads = (&y * c.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
            let x_got = grads.get(xv.as_tensor()).is_some();
            let w_grad = grads.get(wv.as_tensor()).unwrap().clone();
            let gs: Vec<Tensor> = grads_of(&grads, &[xv, wv])
                .into_iter()
                .map(|g| g.to_dtype(DType::F32).unwrap())
                .collect();
            (y.to_dtype(DType::F32).unwrap(), gs, x_got, w_grad)
        };
        let (y, g, x_got, w_grad) = run(DType::F32);
        let (want_y, want_g, _, _) = run(DType::F64);
        prop_assert_eq!(y.dims(), &[batch, len, out][..]);
        let scale = common::largest(std::slice::from_ref(&want_y)).max(1e-3);
        prop_assert!(max_abs_diff(&y, &want_y) / scale < 1e-5);
        prop_assert_eq!(x_got, x_trains);
        let (got, want) = if x_trains { (&g[..], &want_g[..]) } else { (&g[1..], &want_g[1..]) };
        let d = grads_rel_diff(got, want);
        prop_assert!(d < 1e-5, "gradients off by {d}");
        prop_assert_eq!(w_grad.dims(), &[out, inp][..]);
        if !computed_weight {
            prop_assert!(w_grad.is_contiguous());
        }
    }
}
