//! A bidirectional multi-layer LSTM over one sequence, built from differentiable ops
//! (PyTorch's gate order i, f, g, o and its two bias vectors).

use crate::error::Result;
use candle_core::{Device, Tensor};
use peftbench_backbone::{Initializer, TrainableParams};

/// One direction of one layer.
struct Cell {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

/// A bidirectional LSTM.
pub struct BiLstm {
    layers: Vec<[Cell; 2]>,
    hidden: usize,
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    // σ(x) = (tanh(x/2) + 1) / 2: tanh carries a backward.
    ((x * 0.5)?.tanh()? + 1.0)? * 0.5
}

impl BiLstm {
    /// Creates the weights (U(−1/√e, 1/√e), as PyTorch) under `name` in `params`.
    pub fn new(
        name: &str,
        input: usize,
        hidden: usize,
        num_layers: usize,
        params: &mut TrainableParams,
        init: &mut Initializer,
        dev: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let inp = if l == 0 { input } else { 2 * hidden };
            let mut cell = |dir: &str| -> Result<Cell> {
                let p = format!("{name}.l{l}{dir}");
                Ok(Cell {
                    w_ih: params.add(
                        format!("{p}.weight_ih"),
                        init.uniform((4 * hidden, inp), bound, dev)?,
                    )?,
                    w_hh: params.add(
                        format!("{p}.weight_hh"),
                        init.uniform((4 * hidden, hidden), bound, dev)?,
                    )?,
                    b_ih: params.add(
                        format!("{p}.bias_ih"),
                        init.uniform(4 * hidden, bound, dev)?,
                    )?,
                    b_hh: params.add(
                        format!("{p}.bias_hh"),
                        init.uniform(4 * hidden, bound, dev)?,
                    )?,
                })
            };
            layers.push([cell("")?, cell("_reverse")?]);
        }
        Ok(Self { layers, hidden })
    }

    /// Closed form: Σ_layers 2 · 4e·(in_l + e + 2), in_0 = input, in_l = 2e after.
    pub fn num_parameters(input: usize, hidden: usize, num_layers: usize) -> usize {
        (0..num_layers)
            .map(|l| {
                let inp = if l == 0 { input } else { 2 * hidden };
                2 * 4 * hidden * (inp + hidden + 2)
            })
            .sum()
    }

    fn run(&self, cell: &Cell, x: &Tensor, reverse: bool) -> candle_core::Result<Tensor> {
        let (p, _) = x.dims2()?;
        let e = self.hidden;
        // Input contributions for every step in one GEMM.
        let xi = x
            .matmul(&cell.w_ih.t()?)?
            .broadcast_add(&cell.b_ih)?
            .broadcast_add(&cell.b_hh)?;
        let mut h = Tensor::zeros((1, e), x.dtype(), x.device())?;
        let mut c = h.clone();
        let mut out = vec![None; p];
        let order: Vec<usize> = if reverse {
            (0..p).rev().collect()
        } else {
            (0..p).collect()
        };
        for t in order {
            let gates = (xi.narrow(0, t, 1)? + h.matmul(&cell.w_hh.t()?)?)?;
            let i = sigmoid(&gates.narrow(1, 0, e)?)?;
            let f = sigmoid(&gates.narrow(1, e, e)?)?;
            let g = gates.narrow(1, 2 * e, e)?.tanh()?;
            let o = sigmoid(&gates.narrow(1, 3 * e, e)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            out[t] = Some(h.clone());
        }
        let out: Vec<Tensor> = out
            .into_iter()
            .map(|o| o.expect("every step ran"))
            .collect();
        Tensor::cat(&out, 0)
    }

    /// Runs `[len, input]` through every layer, returning `[len, 2·hidden]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for [fwd, bwd] in &self.layers {
            let a = self.run(fwd, &x, false)?;
            let b = self.run(bwd, &x, true)?;
            x = Tensor::cat(&[&a, &b], 1)?;
        }
        Ok(x)
    }
}
