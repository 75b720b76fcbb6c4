//! Head only: nothing in the backbone trains, only the task head (a linear probe of the frozen
//! base). Not a PEFT method but the floor every method must clear: a score a method shares
//! with it was learnt by the head, not by the method.

use crate::{AttachContext, Method};
use peftbench_backbone::{Intervention, TrainableParams};

/// The frozen base with no trainable parameters of its own.
#[derive(Default)]
pub struct HeadOnly {
    params: TrainableParams,
}

impl HeadOnly {
    /// Attaches nothing.
    pub fn attach(_ctx: &mut AttachContext) -> Self {
        Self::default()
    }
}

impl Intervention for HeadOnly {}

impl Method for HeadOnly {
    fn name(&self) -> &'static str {
        "head_only"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
}
