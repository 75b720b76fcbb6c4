//! A record of the f32 GEMM calls a stretch of code makes, off unless started, so a caller can
//! time those same calls alone (peftbench's "GEMM floor" of a training step). Not upstream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One `gemm` call: `batch` products `dst[m, n] = lhs[m, k] · rhs[k, n]` with the operands'
/// strides (in elements) and batch offsets, as the caller passed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lhs_skip: usize,
    pub rhs_skip: usize,
    pub lhs_cs: isize,
    pub lhs_rs: isize,
    pub rhs_cs: isize,
    pub rhs_rs: isize,
    /// Whether the call ran on the rayon pool itself; `false` for calls made from inside a
    /// parallel loop (one per task), which are replayed in parallel with their neighbours.
    pub threaded: bool,
}

impl Gemm {
    /// Multiply-adds.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static CALLS: Mutex<Vec<Gemm>> = Mutex::new(Vec::new());

/// Starts recording (clearing any earlier record).
pub fn start() {
    CALLS.lock().unwrap().clear();
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording and returns the calls in the order they were made.
pub fn stop() -> Vec<Gemm> {
    ON.store(false, Ordering::SeqCst);
    std::mem::take(&mut *CALLS.lock().unwrap())
}

/// Records a call when recording is on (one relaxed load otherwise).
#[inline]
pub fn record(call: Gemm) {
    if ON.load(Ordering::Relaxed) {
        CALLS.lock().unwrap().push(call);
    }
}
