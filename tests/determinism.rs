//! Gradients that are sums over rows (a bias's, a column scale's, a norm's weight and bias)
//! come out with the same bits every time: the rows are split across threads, and the
//! partial sums must be added in a fixed order, not in whatever order the threads finish.

use candle_core::{Device, Tensor, Var};
use peftbench_backbone::ops;
use peftbench_backbone::Initializer;

/// Enough rows for many chunks on every thread, so a thread-dependent order shows.
const ROWS: usize = 8192;
const WIDTH: usize = 384;
const REPEATS: usize = 12;

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The gradients of `Σ (f(x, v...) ⊙ g)` with respect to every `v`, as bits.
fn grads(
    f: &dyn Fn(&Tensor, &[Var]) -> Tensor,
    x: &Tensor,
    vs: &[Var],
    g: &Tensor,
) -> Vec<Vec<u32>> {
    let gs = (f(x, vs) * g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    vs.iter().map(|v| bits(gs.get(v).unwrap())).collect()
}

#[test]
fn row_summed_gradients_repeat_bit_for_bit() {
    let dev = Device::Cpu;
    let mut init = Initializer::new(3);
    let x = init.normal(&[ROWS, WIDTH], 1.0, &dev).unwrap();
    let g = init.normal(&[ROWS, WIDTH], 1.0, &dev).unwrap();
    let vector = |init: &mut Initializer| {
        Var::from_tensor(&(init.normal(&[WIDTH], 0.1, &dev).unwrap() + 1.0).unwrap()).unwrap()
    };
    let (w, b) = (vector(&mut init), vector(&mut init));
    type Op = Box<dyn Fn(&Tensor, &[Var]) -> Tensor>;
    let cases: Vec<(&str, Op, Vec<Var>)> = vec![
        (
            "bias",
            Box::new(|x, v| ops::add_bias(x, v[0].as_tensor()).unwrap()),
            vec![b.clone()],
        ),
        (
            "column scale",
            Box::new(|x, v| ops::scale_columns(x, v[0].as_tensor()).unwrap()),
            vec![w.clone()],
        ),
        (
            "layer norm",
            Box::new(|x, v| ops::layer_norm(x, v[0].as_tensor(), v[1].as_tensor(), 1e-5).unwrap()),
            vec![w.clone(), b.clone()],
        ),
        (
            "RMS norm",
            Box::new(|x, v| ops::rms_norm(x, v[0].as_tensor(), 1e-6).unwrap()),
            vec![w.clone()],
        ),
    ];
    for (name, f, vs) in &cases {
        let first = grads(f.as_ref(), &x, vs, &g);
        for _ in 1..REPEATS {
            assert!(
                grads(f.as_ref(), &x, vs, &g) == first,
                "{name}: a gradient's bits changed between identical backward passes"
            );
        }
    }
}
