//! Causal-LM pretraining of a small decoder from scratch (the base for SFT when no pretrained
//! decoder can be downloaded, and for the embedded synthetic suite).

use crate::data::{make_batch, Example};
use crate::objective::{loss, Objective, Scorer};
use crate::optim::{AdamW, OptimConfig};
use crate::HarnessError;
use candle_core::Device;
use peftbench_backbone::{Initializer, Transformer};
use peftbench_methods::{AttachContext, MethodConfig};

/// Pretraining length and optimiser.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Seed for the data order.
    pub seed: u64,
}

/// Trains every weight of `model` on next-token prediction over `sequences` and returns the
/// mean loss of the first and last tenth of the steps.
pub fn pretrain(model: &mut Transformer, sequences: &[Vec<u32>], pad_id: u32, cfg: &PretrainConfig) -> Result<(f64, f64), HarnessError> {
    if sequences.is_empty() {
        return Err(HarnessError::Config("pretraining corpus is empty".into()));
    }
    let method = MethodConfig::FullFinetune.attach(&mut AttachContext::new(model, cfg.seed))?;
    let mut opt = AdamW::new(method.params().vars(), cfg.optim.clone())?;
    let examples: Vec<Example> = sequences
        .iter()
        .map(|ids| Example::Lm { ids: ids.clone(), response_start: 1 })
        .collect();
    let mut rng = Initializer::new(cfg.seed ^ 0x9e7);
    let tenth = (cfg.steps / 10).max(1);
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for step in 1..=cfg.steps {
        let batch: Vec<&Example> = (0..cfg.batch_size).map(|_| &examples[rng.index(examples.len())]).collect();
        let b = make_batch(&batch, pad_id, &Device::Cpu)?;
        let s = Scorer { model, method: method.as_ref(), head: None };
        let l = loss(&Objective::CausalLm, &s, &b)?;
        let v = l.to_scalar::<f32>()? as f64;
        if !v.is_finite() {
            return Err(HarnessError::Config(format!("pretraining diverged at step {step}: loss {v}")));
        }
        if step <= tenth {
            first.push(v);
        }
        if step > cfg.steps - tenth {
            last.push(v);
        }
        opt.accumulate(&l.backward()?)?;
        opt.step(cfg.optim.lr_at(step, cfg.steps))?;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // The weights stay variables; callers save them (the saved model loads frozen).
    Ok((mean(&first), mean(&last)))
}
