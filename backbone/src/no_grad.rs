//! Forward passes that keep no graph for a backward (evaluation, generation).
//!
//! candle has no no-grad mode: an op on a variable records its inputs, so a forward through a
//! method's trainable parameters keeps every layer's activations alive until its output is
//! dropped, for a backward that evaluation never runs. Under [`no_grad`] the model detaches
//! each layer's output, so a layer's activations are freed when the next one has run.

use std::cell::Cell;

thread_local! {
    static OFF: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's forward passes keeping no graph between layers.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let before = OFF.with(|o| o.replace(true));
    // Restored even if `f` panics, so a caught panic leaves gradients on.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Whether forward passes on this thread keep their graph (outside [`no_grad`]).
pub fn grad_enabled() -> bool {
    !OFF.with(Cell::get)
}
