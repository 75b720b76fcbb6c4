//! Helpers for the unit tests of the method modules.

use candle_core::Tensor;

/// Largest absolute difference between two tensors of one shape.
pub(crate) fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Whether `a` is within `tol` of `b`, relative to `b`'s largest magnitude (at least 1).
pub(crate) fn close(a: &Tensor, b: &Tensor, tol: f32) -> bool {
    max_abs(a, b) <= tol * (1.0 + max_abs(b, &b.zeros_like().unwrap()))
}
