//! `peftbench eval --run RECORD`: reloads a run's saved adapter and head onto its base, scores
//! the task's dev set again, and checks the recorded score comes back.

use anyhow::{bail, Context, Result};
use candle_core::Device;
use peftbench_backbone::{Linear, SequenceHead};
use peftbench_harness::objective::{evaluate_outcomes, EvalBatches, Scorer};
use peftbench_harness::TaskConfig;
use peftbench_methods::peft;
use peftbench_reports::RunRecord;
use std::path::{Path, PathBuf};

/// Largest difference between a recorded and a re-scored metric that still counts as the same
/// score: the forward pass is deterministic, but threads may sum in another order.
pub const TOLERANCE: f64 = 1e-6;

/// How `run` loads a base and its tasks (suite name, model, data root, task declarations).
pub type LoadTasks<'a> = &'a dyn Fn(
    &str,
    &str,
    Option<PathBuf>,
    &[TaskConfig],
) -> Result<(
    peftbench_harness::Base,
    std::collections::HashMap<String, peftbench_harness::TaskData>,
)>;

/// Re-scores the run recorded at `record`; an error when the saved weights do not give the
/// recorded dev metrics back.
pub fn eval(record: &Path, data_root: Option<PathBuf>, load: LoadTasks) -> Result<()> {
    let rec = RunRecord::read(record)?;
    let Some(adapter) = rec.adapter_path.as_deref() else {
        bail!(
            "{}: run `{}` kept no weights to evaluate ({})",
            record.display(),
            rec.run_id,
            if rec.method.starts_with("full_finetune") {
                "full fine-tuning saves no copy of the model"
            } else {
                "it did not finish"
            }
        );
    };
    let runs_dir = record.parent().unwrap_or(Path::new("."));
    let dir = runs_dir.join(adapter);
    let task_config: TaskConfig = serde_json::from_value(rec.config["task_config"].clone())
        .with_context(|| format!("{}: config.task_config", record.display()))?;
    let model = rec.config["model"]
        .as_str()
        .with_context(|| format!("{}: config.model is missing", record.display()))?;
    let eval_batch = rec.config["train"]["eval_batch_size"]
        .as_u64()
        .unwrap_or(64) as usize;
    // Scored as the run scored it: packed rows round differently from padded ones.
    let packed = rec.config["train"]["packing"].as_bool().unwrap_or(false);
    let (base, tasks) = load(
        &rec.suite,
        model,
        data_root,
        std::slice::from_ref(&task_config),
    )?;
    let task = &tasks[&task_config.name];
    if !dir.is_dir() {
        bail!(
            "{}: `{}` is not a PEFT-format adapter directory; only those can be re-scored",
            record.display(),
            dir.display()
        );
    }
    let a = peft::read(&dir, &base.model)?;
    let head = match (task.objective.head_kind(), &a.head) {
        (Some(kind), Some(h)) => Some(SequenceHead {
            kind,
            pooling: h.pooling.unwrap_or(peft::hf_pooling(&base.model.config)),
            out: Linear::new(h.weight.clone(), h.bias.clone()),
        }),
        (Some(_), None) => bail!("{}: the adapter has no task head", dir.display()),
        (None, _) => None,
    };
    let scorer = Scorer {
        model: &base.model,
        method: a.method.as_ref(),
        head: head.as_ref(),
    };
    let (now, _) = evaluate_outcomes(
        &task.objective,
        &scorer,
        &task.dev,
        EvalBatches {
            size: eval_batch,
            pad_id: base.tokenizer.pad_id,
            pack: packed,
        },
        &Device::Cpu,
    )?;
    let recorded = match &rec.selected {
        Some(s) => &s.metrics,
        None => &rec.metrics_final,
    };
    let mut worst: f64 = 0.0;
    for (k, v) in &now {
        let was = recorded.get(k).copied();
        println!(
            "{k}: recorded {}, now {v:.6}",
            was.map_or("–".into(), |w| format!("{w:.6}"))
        );
        if let Some(w) = was {
            worst = worst.max((w - v).abs());
        }
    }
    if worst > TOLERANCE {
        bail!(
            "{}: the saved run does not reproduce its recorded dev metrics (largest difference {worst:.3e})",
            record.display()
        );
    }
    println!(
        "reproduced: {} (largest difference {worst:.1e})",
        rec.run_id
    );
    Ok(())
}
