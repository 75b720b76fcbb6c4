//! Head only: nothing in the backbone trains, only the task head (a linear probe of the frozen
//! base). Not a PEFT method but the floor every method must clear: a score a method shares
//! with it was learnt by the head, not by the method.

use crate::{AttachContext, Method};
use peftbench_backbone::{Intervention, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};

/// Head-only has nothing to configure but its optimizer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadOnlyConfig {}

impl crate::MethodSpec for HeadOnlyConfig {
    fn name(&self) -> &'static str {
        "head_only"
    }
    fn formula(&self) -> &'static str {
        "0 (only the task head trains)"
    }
    fn num_trainable(&self, _model: &Transformer) -> crate::Result<usize> {
        Ok(0)
    }
    fn fixed_budget(&self) -> Option<&'static str> {
        Some("none")
    }
    fn in_defaults(&self) -> bool {
        false
    }
    fn attach(&self, ctx: &mut AttachContext) -> crate::Result<Box<dyn Method>> {
        Ok(Box::new(HeadOnly::attach(ctx)))
    }
}

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

/// The `peft_type` of a saved head-only run: this project's own, holding only the head.
pub const PEFT_TYPE: &str = "PEFTBENCH_HEAD_ONLY";

impl Method for HeadOnly {
    fn name(&self) -> &'static str {
        "head_only"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    /// Nothing of its own: the saved head (`modules_to_save`) is the whole run.
    fn peft_state(
        &self,
        _model: &peftbench_backbone::ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> crate::Result<Option<crate::peft::PeftState>> {
        Ok(Some(crate::peft::PeftState {
            peft_type: PEFT_TYPE.into(),
            config: serde_json::Map::new(),
            tensors: Vec::new(),
        }))
    }
}
