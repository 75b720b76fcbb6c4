//! Full fine-tuning: every backbone weight becomes trainable. The reference the PEFT methods
//! are measured against.

use crate::error::Result;
use crate::{AttachContext, Method};
use peftbench_backbone::{Intervention, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};

/// Full fine-tuning has nothing to configure but its optimizer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullFinetuneConfig {}

impl crate::MethodSpec for FullFinetuneConfig {
    fn name(&self) -> &'static str {
        "full_finetune"
    }
    fn formula(&self) -> &'static str {
        "every backbone weight"
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        Ok(model.num_parameters())
    }
    fn fixed_budget(&self) -> Option<&'static str> {
        Some("full")
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(FullFinetune::attach(ctx)?))
    }
}

/// Full fine-tuning attached to a model (its weights are now variables).
pub struct FullFinetune {
    params: TrainableParams,
}

impl FullFinetune {
    /// Turns every weight of the model into a variable.
    pub fn attach(ctx: &mut AttachContext) -> Result<Self> {
        let mut params = TrainableParams::new();
        let mut failed = None;
        ctx.model.for_each_weight_mut(&mut |name, t| {
            if failed.is_some() {
                return;
            }
            match params.add(name, t.clone()) {
                Ok(v) => *t = v,
                Err(e) => failed = Some(e),
            }
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(Self { params })
    }
}

impl Intervention for FullFinetune {}

impl Method for FullFinetune {
    fn name(&self) -> &'static str {
        "full_finetune"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
}
