//! The GEMM floor of a piece of work: the f32 GEMM calls it made (candle's matmuls and the
//! backbone's own kernels), recorded by `candle_core::gemm_trace` and replayed alone with the
//! same shapes, strides and threading on buffers of their own. A step can take no less.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::time::Instant;

use crate::attention::SendPtr;

pub use candle_core::gemm_trace::Gemm;

/// Runs `f` and returns what it returned with the GEMM calls it made, in order.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Gemm>) {
    candle_core::gemm_trace::start();
    let out = f();
    (out, candle_core::gemm_trace::stop())
}

/// [`record`], also returning the shapes `[m, k, n]` of the bf16 products (packed frozen
/// weights, `bf16_gemm.rs`) it made.
pub fn record_with_bf16<R>(f: impl FnOnce() -> R) -> (R, Vec<Gemm>, Vec<[usize; 3]>) {
    crate::bf16_gemm::trace_start();
    let (out, calls) = record(f);
    (out, calls, crate::bf16_gemm::trace_stop())
}

/// Elements an operand spans: its last batch's last element, plus one.
fn extent(batch: usize, skip: usize, rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    (batch - 1) * skip + (rows - 1) * rs.unsigned_abs() + (cols - 1) * cs.unsigned_abs() + 1
}

/// Recorded calls ready to replay: operands big enough for the largest, so replaying
/// allocates nothing.
pub struct Replay {
    calls: Vec<Gemm>,
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    dst: Vec<f32>,
    /// bf16 products: rows and a packed weight of ones of the recorded shape.
    bf16: Vec<(usize, std::sync::Arc<crate::bf16_gemm::PackedB>)>,
}

impl Replay {
    /// Buffers for `calls` (calls with an empty dimension are dropped: they compute nothing).
    pub fn new(calls: Vec<Gemm>) -> Self {
        let calls: Vec<Gemm> = calls
            .into_iter()
            .filter(|c| c.batch * c.m * c.n * c.k > 0)
            .collect();
        let lhs = calls
            .iter()
            .map(|c| extent(c.batch, c.lhs_skip, c.m, c.k, c.lhs_rs, c.lhs_cs))
            .max()
            .unwrap_or(0);
        let rhs = calls
            .iter()
            .map(|c| extent(c.batch, c.rhs_skip, c.k, c.n, c.rhs_rs, c.rhs_cs))
            .max()
            .unwrap_or(0);
        // Every call of the largest parallel group writes its own destination.
        let dst = groups(&calls)
            .map(|g| g.iter().map(|c| c.batch * c.m * c.n).sum::<usize>())
            .max()
            .unwrap_or(0);
        Self {
            calls,
            lhs: vec![1.0; lhs],
            rhs: vec![1.0; rhs],
            dst: vec![0.0; dst],
            bf16: Vec::new(),
        }
    }

    /// Adds bf16 products `[m, k, n]` to the replay, each on a weight packed once per shape
    /// (a frozen weight is packed once, outside the step).
    pub fn with_bf16(mut self, shapes: Vec<[usize; 3]>) -> Self {
        let mut packed: std::collections::BTreeMap<(usize, usize), _> = Default::default();
        for [m, k, n] in shapes {
            if m * k * n == 0 {
                continue;
            }
            let b = packed
                .entry((k, n))
                .or_insert_with(|| {
                    std::sync::Arc::new(crate::bf16_gemm::PackedB::pack(
                        &vec![1.0; k * n],
                        k,
                        n,
                        n,
                        1,
                    ))
                })
                .clone();
            self.lhs.resize(self.lhs.len().max(m * k), 1.0);
            self.dst.resize(self.dst.len().max(m * n), 0.0);
            self.bf16.push((m, b));
        }
        self
    }

    /// Multiply-adds of one replay.
    pub fn flops(&self) -> f64 {
        let bf16: f64 = self
            .bf16
            .iter()
            .map(|(m, b)| 2.0 * (m * b.k() * b.n()) as f64)
            .sum();
        self.calls.iter().map(Gemm::flops).sum::<f64>() + bf16
    }

    /// Replays every call once, in order; returns the seconds taken.
    pub fn run(&mut self) -> f64 {
        let threads = candle_core::utils::get_num_threads();
        let (lhs, rhs) = (self.lhs.as_slice(), self.rhs.as_slice());
        let dst = SendPtr(self.dst.as_mut_ptr());
        let t0 = Instant::now();
        for group in groups(&self.calls) {
            if group[0].threaded {
                // SAFETY: the buffers span every operand (see `new`); one call at a time.
                unsafe { call(&group[0], lhs, rhs, dst.0, par(threads)) };
                continue;
            }
            let offsets: Vec<usize> = group
                .iter()
                .scan(0, |at, c| {
                    let o = *at;
                    *at += c.batch * c.m * c.n;
                    Some(o)
                })
                .collect();
            group.par_iter().zip(offsets).for_each(|(c, o)| {
                // SAFETY: each task writes its own `batch·m·n` destination slice.
                unsafe { call(c, lhs, rhs, dst.at(o), Parallelism::None) }
            });
        }
        for (m, b) in &self.bf16 {
            let (k, n) = (b.k(), b.n());
            crate::bf16_gemm::matmul(&self.lhs[..m * k], *m, b, &mut self.dst[..m * n]);
        }
        t0.elapsed().as_secs_f64()
    }
}

fn par(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// Calls in replay units: each threaded call alone, and each run of consecutive calls made
/// from inside one parallel loop together.
fn groups(calls: &[Gemm]) -> impl Iterator<Item = &[Gemm]> {
    calls.chunk_by(|a, b| !a.threaded && !b.threaded)
}

/// One recorded call on the replay's buffers, its destination contiguous.
///
/// # Safety
/// `lhs` and `rhs` must span the call's operands and `dst` its `batch·m·n` outputs.
unsafe fn call(c: &Gemm, lhs: &[f32], rhs: &[f32], dst: *mut f32, parallelism: Parallelism) {
    for step in 0..c.batch {
        gemm(
            c.m,
            c.n,
            c.k,
            dst.add(step * c.m * c.n),
            1,
            c.n as isize,
            false,
            lhs.as_ptr().add(step * c.lhs_skip),
            c.lhs_cs,
            c.lhs_rs,
            rhs.as_ptr().add(step * c.rhs_skip),
            c.rhs_cs,
            c.rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}
