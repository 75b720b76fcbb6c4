//! The GEMM floor of a piece of work: the f32 GEMM calls it made (candle's matmuls and the
//! backbone's own kernels), recorded by `candle_core::gemm_trace` and replayed alone with the
//! same shapes, strides and threading on buffers of their own; the bf16 products; and the
//! small products of the low-rank and Kronecker deltas, replayed by their own kernels. A step
//! can take no less.

use gemm::{gemm, Parallelism};
use rayon::prelude::*;
use std::time::Instant;

use crate::attention::SendPtr;

pub use candle_core::gemm_trace::Gemm;

pub use crate::kronecker::Dims as KroneckerDims;
pub use crate::low_rank::Size as LowRankSize;

/// Which way a delta's products ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The forward.
    Forward,
    /// The backward, with the input's gradient or without.
    Backward {
        /// Whether the input's gradient was computed.
        dx: bool,
    },
}

/// Products made by the backbone's own small-product kernels rather than a GEMM library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Own {
    /// `ops::low_rank_delta`'s fused op.
    LowRank(LowRankSize, Pass),
    /// `ops::kronecker_product`'s fused op over this many rows.
    Kronecker(usize, KroneckerDims, Pass),
}

impl Own {
    /// 2 × the multiply-adds of the products.
    pub fn flops(&self) -> f64 {
        let (rows, per_row) = match *self {
            // x·Aᵀ, then ·Bᵀ; back: x·Aᵀ again, g·B, the two factors' gradients, and the
            // input's.
            Own::LowRank(LowRankSize { rows, inp, r, out }, pass) => (
                rows,
                match pass {
                    Pass::Forward => r * (inp + out),
                    Pass::Backward { dx } => r * (2 * inp + 2 * out) + usize::from(dx) * r * inp,
                },
            ),
            // x·w2ᵀ per c-row then w1 over them; back: x·w2ᵀ again, w1ᵀ·g, dw1, dw2 and the
            // input's gradient.
            Own::Kronecker(rows, KroneckerDims { a, b, c, d }, pass) => (
                rows,
                match pass {
                    Pass::Forward => c * d * b + a * c * b,
                    Pass::Backward { dx } => {
                        2 * c * d * b + 2 * a * b * c + usize::from(dx) * c * b * d
                    }
                },
            ),
        };
        2.0 * (rows * per_row) as f64
    }

    /// Elements the largest operand spans (every operand of a replay is a slice of one
    /// buffer of ones).
    fn span(&self) -> usize {
        match *self {
            Own::LowRank(LowRankSize { rows, inp, r, out }, _) => {
                (rows * inp.max(out)).max(r * inp.max(out))
            }
            Own::Kronecker(rows, KroneckerDims { a, b, c, d }, _) => {
                (rows * (c * d).max(a * b)).max(a * c).max(b * d)
            }
        }
    }

    /// Runs the products once on `ones`.
    fn replay(&self, ones: &[f32]) {
        match *self {
            Own::LowRank(k, Pass::Forward) => {
                std::hint::black_box(crate::low_rank::forward(ones, ones, ones, k, 1.0));
            }
            Own::LowRank(k, Pass::Backward { dx }) => {
                std::hint::black_box(crate::low_rank::backward(
                    ones, ones, ones, ones, k, 1.0, dx,
                ));
            }
            Own::Kronecker(rows, k, Pass::Forward) => {
                std::hint::black_box(crate::kronecker::forward(ones, ones, ones, rows, k, 1.0));
            }
            Own::Kronecker(rows, k, Pass::Backward { dx }) => {
                std::hint::black_box(crate::kronecker::backward(
                    ones, ones, ones, ones, rows, k, 1.0, dx,
                ));
            }
        }
    }
}

thread_local! {
    /// This thread's own-kernel products since recording started (ops run on the thread
    /// running the forward or backward).
    static OWN: std::cell::RefCell<Option<Vec<Own>>> = const { std::cell::RefCell::new(None) };
}

/// Notes an own-kernel product, when this thread is recording.
pub(crate) fn note(product: Own) {
    OWN.with(|t| {
        if let Some(t) = t.borrow_mut().as_mut() {
            t.push(product);
        }
    });
}

/// Everything a piece of work multiplied: GEMM calls, bf16 products `[m, k, n]` and
/// own-kernel products, each in order.
#[derive(Debug, Default)]
pub struct Record {
    /// f32 GEMM calls.
    pub gemms: Vec<Gemm>,
    /// bf16 products (packed frozen weights, `bf16_gemm.rs`).
    pub bf16: Vec<[usize; 3]>,
    /// Low-rank and Kronecker products.
    pub own: Vec<Own>,
}

/// Runs `f` and returns what it returned with every product it made.
pub fn record_all<R>(f: impl FnOnce() -> R) -> (R, Record) {
    OWN.with(|t| *t.borrow_mut() = Some(Vec::new()));
    let (out, gemms, bf16) = record_with_bf16(f);
    let own = OWN.with(|t| t.borrow_mut().take().unwrap_or_default());
    (out, Record { gemms, bf16, own })
}

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
    /// Own-kernel products, every operand a slice of `ones`.
    own: Vec<Own>,
    ones: Vec<f32>,
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
            own: Vec::new(),
            ones: Vec::new(),
        }
    }

    /// A replay of everything in `record`.
    pub fn of(record: Record) -> Self {
        Self::new(record.gemms)
            .with_bf16(record.bf16)
            .with_own(record.own)
    }

    /// Adds own-kernel products to the replay.
    pub fn with_own(mut self, own: Vec<Own>) -> Self {
        let span = own.iter().map(Own::span).max().unwrap_or(0);
        self.ones.resize(self.ones.len().max(span), 1.0);
        self.own.extend(own);
        self
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
        let own: f64 = self.own.iter().map(Own::flops).sum();
        self.calls.iter().map(Gemm::flops).sum::<f64>() + bf16 + own
    }

    /// Multiply-adds of the own-kernel products alone.
    pub fn own_flops(&self) -> f64 {
        self.own.iter().map(Own::flops).sum()
    }

    /// Replays every product once, in order; returns the seconds taken.
    pub fn run(&mut self) -> f64 {
        let [library, own] = self.run_split();
        library + own
    }

    /// [`Replay::run`], returning the seconds of the library's and bf16 products and of the
    /// own-kernel products apart.
    pub fn run_split(&mut self) -> [f64; 2] {
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
        let library = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for p in &self.own {
            p.replay(&self.ones);
        }
        [library, t1.elapsed().as_secs_f64()]
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
