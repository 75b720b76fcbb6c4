//! Rows placed before every sequence (prefix tuning's and P-Tuning v2's keys and values): the
//! fused op gives the composite path's output and gradients, bit for bit, for a prefix shared
//! by the batch or one per example, over random batch sizes, lengths, widths and seeds; an
//! input that does not train gets no gradient; mismatched shapes are refused by name.

use candle_core::{Device, Tensor, Var};
use peftbench_backbone::ops::prepend_rows;
use peftbench_backbone::{with_kernels, Initializer, Kernels};
use proptest::prelude::*;

/// `Σ c ⊙ [p; x]` under `kernels`: the output and the gradients of `p` and `x` (`None` where
/// that input does not train).
fn run(
    kernels: Kernels,
    p: &Var,
    x: &Var,
    c: &Tensor,
    x_trains: bool,
) -> (Vec<f32>, Option<Vec<f32>>, Option<Vec<f32>>) {
    with_kernels(kernels, || {
        let xin = if x_trains {
            x.as_tensor().clone()
        } else {
            x.as_tensor().detach()
        };
        let y = prepend_rows(p.as_tensor(), &xin).unwrap();
        let grads = (&y * c).unwrap().sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (
            flat(&y),
            grads.get(p.as_tensor()).map(flat),
            grads.get(x.as_tensor()).map(flat),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn fused_prepend_equals_the_composite_path(
        batch in 1usize..6,
        len in 1usize..30,
        t in 1usize..40,
        w in 1usize..70,
        shared in any::<bool>(),
        x_trains in any::<bool>(),
        seed in 0u64..1000,
    ) {
        let dev = Device::Cpu;
        let mut init = Initializer::new(seed);
        let p = match shared {
            true => init.normal((len, w), 1.0, &dev).unwrap(),
            false => init.normal((batch, len, w), 1.0, &dev).unwrap(),
        };
        let x = init.normal((batch, t, w), 1.0, &dev).unwrap();
        let c = init.normal((batch, len + t, w), 1.0, &dev).unwrap();
        let (p, x) = (Var::from_tensor(&p).unwrap(), Var::from_tensor(&x).unwrap());
        let fused = run(Kernels::Fused, &p, &x, &c, x_trains);
        let composite = run(Kernels::Composite, &p, &x, &c, x_trains);
        prop_assert_eq!(&fused, &composite);
        // Each example starts with the prefix rows, then its own.
        let (pv, xv) = (
            p.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let row = (len + t) * w;
        for e in 0..batch {
            let head = if shared { &pv[..] } else { &pv[e * len * w..(e + 1) * len * w] };
            prop_assert_eq!(&fused.0[e * row..e * row + len * w], head);
            prop_assert_eq!(&fused.0[e * row + len * w..(e + 1) * row], &xv[e * t * w..(e + 1) * t * w]);
        }
        prop_assert!(fused.1.is_some());
        prop_assert_eq!(fused.2.is_some(), x_trains);
    }
}

#[test]
fn mismatched_rows_are_refused_with_both_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 5, 8), candle_core::DType::F32, &dev).unwrap();
    for p in [
        Tensor::zeros((3, 7), candle_core::DType::F32, &dev).unwrap(),
        Tensor::zeros((3, 3, 8), candle_core::DType::F32, &dev).unwrap(),
    ] {
        let err = prepend_rows(&p, &x).unwrap_err().to_string();
        assert!(err.contains(&format!("{:?}", p.dims())), "{err}");
        assert!(err.contains("[2, 5, 8]"), "{err}");
    }
}
