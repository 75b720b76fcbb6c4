//! The low-rank update `scale·x·Aᵀ·Bᵀ`: its value and the gradients of `x`, `A` and `B`
//! equal the same products taken in f64 by candle, over random leading shapes, widths, ranks
//! (the fused op's and the GEMM path's), scales and incoming gradients; the fused op gives
//! the same bits every run; an input that does not train gets no gradient.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{grads_of, grads_rel_diff, max_abs_diff};
use peftbench_backbone::ops::low_rank_delta;
use peftbench_backbone::Initializer;
use proptest::prelude::*;

/// `Σ c ⊙ (scale·x·Aᵀ·Bᵀ)` and its gradients for `x`, `A`, `B` (zeros for `x` when it is
/// passed as a plain tensor), with the delta itself.
fn run(
    x: &Var,
    a: &Var,
    b: &Var,
    c: &Tensor,
    scale: f64,
    x_trains: bool,
    f: impl Fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<Tensor>,
) -> (Tensor, Vec<Tensor>, bool) {
    let xin = if x_trains {
        x.as_tensor().clone()
    } else {
        x.as_tensor().detach()
    };
    let y = f(&xin, a.as_tensor(), b.as_tensor(), scale).unwrap();
    let grads = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
    let x_got_grad = grads.get(x.as_tensor()).is_some();
    (
        y,
        grads_of(&grads, &[x.clone(), a.clone(), b.clone()]),
        x_got_grad,
    )
}

/// The same products in f64, composed from candle matmuls.
fn reference(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    x.broadcast_matmul(&a.t()?)?.broadcast_matmul(&b.t()?)? * scale
}

fn f64_var(t: &Tensor) -> Var {
    Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap()
}

fn to_f32(ts: Vec<Tensor>) -> Vec<Tensor> {
    ts.into_iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn the_low_rank_delta_and_its_gradients_equal_the_f64_products(
        batch in 1usize..5,
        len in 1usize..90,
        inp in 1usize..70,
        out in 1usize..70,
        rank in 1usize..24,
        scale in -4.0f64..4.0,
        x_trains in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let x = init.normal((batch, len, inp), 1.0, &dev).unwrap();
        let a = init.normal((rank, inp), 0.5, &dev).unwrap();
        let b = init.normal((out, rank), 0.5, &dev).unwrap();
        let c = init.normal((batch, len, out), 1.0, &dev).unwrap();
        let (xv, av, bv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&a).unwrap(),
            Var::from_tensor(&b).unwrap(),
        );
        let (y, g, x_got) = run(&xv, &av, &bv, &c, scale, x_trains, low_rank_delta);
        let (y2, g2, _) = run(&xv, &av, &bv, &c, scale, x_trains, low_rank_delta);
        let (want_y, want_g, _) = run(
            &f64_var(&x),
            &f64_var(&a),
            &f64_var(&b),
            &c.to_dtype(DType::F64).unwrap(),
            scale,
            x_trains,
            reference,
        );
        let want_y = want_y.to_dtype(DType::F32).unwrap();
        let want_g = to_f32(want_g);
        prop_assert_eq!(y.dims(), want_y.dims());
        let y_scale = common::largest(std::slice::from_ref(&want_y)).max(1e-3);
        prop_assert!(max_abs_diff(&y, &want_y) / y_scale < 1e-5,
            "value off by {}", max_abs_diff(&y, &want_y) / y_scale);
        // x's gradient only when x trains; A's and B's always.
        prop_assert_eq!(x_got, x_trains);
        let (got, want) = if x_trains { (&g[..], &want_g[..]) } else { (&g[1..], &want_g[1..]) };
        let d = grads_rel_diff(got, want);
        prop_assert!(d < 1e-5, "gradients off by {d}");
        // The same bits on a second run (task partials are summed in a fixed order).
        prop_assert_eq!(max_abs_diff(&y, &y2), 0.0);
        for (p, q) in g.iter().zip(&g2) {
            prop_assert_eq!(max_abs_diff(p, q), 0.0);
        }
    }
}

#[test]
fn mismatched_factors_are_refused_naming_the_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
    let a = Tensor::zeros((4, 7), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
    let e = low_rank_delta(&x, &a, &b, 1.0).unwrap_err().to_string();
    assert!(e.contains("[2, 3, 8]") && e.contains("[4, 7]"), "{e}");
    let a = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
    let e = low_rank_delta(&x, &a, &b, 1.0).unwrap_err().to_string();
    assert!(e.contains("[5, 3]"), "{e}");
}
