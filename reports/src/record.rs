//! One record per run: what the harness writes and the reports read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RunStatus {
    /// Trained and evaluated.
    Ok,
    /// The loss became NaN or infinite.
    Diverged {
        /// Step at which it happened.
        step: usize,
        /// What was seen.
        message: String,
    },
    /// The method cannot reach the requested parameter budget; nothing was trained.
    BudgetUnreachable {
        /// Why.
        message: String,
    },
    /// The run failed.
    Error {
        /// The error.
        message: String,
    },
}

impl RunStatus {
    /// Short label for tables: ok, diverged, unreachable, error.
    pub fn label(&self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Diverged { .. } => "diverged",
            RunStatus::BudgetUnreachable { .. } => "unreachable",
            RunStatus::Error { .. } => "error",
        }
    }
}

/// One evaluation point of the training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Optimizer step.
    pub step: usize,
    /// Mean training loss since the previous point.
    pub train_loss: f64,
    /// Dev metrics at this step (empty where only the loss was logged).
    pub metrics: BTreeMap<String, f64>,
}

/// Where and with what a run was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// The git revision of the checkout the binary was built from, if known.
    pub git_revision: Option<String>,
    /// CPU model name.
    pub cpu: String,
    /// Threads the run used.
    pub threads: usize,
    /// candle version.
    pub candle_version: String,
    /// Device (cpu, cuda:0 …).
    pub device: String,
    /// Precision the run trained at (`f32`, or `bf16` for the mixed-precision base); empty in
    /// records made before it was kept, which were all f32.
    #[serde(default)]
    pub dtype: String,
    /// Which implementation the custom ops ran (`fused` or `composite`); empty in older
    /// records, which ran fused on the CPU.
    #[serde(default)]
    pub kernels: String,
    /// Operating system.
    pub os: String,
    /// When the run finished (seconds since the Unix epoch).
    pub finished_at: u64,
}

/// Everything recorded about one (task, method, budget, seed) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// `task__method__budget__seed`, unique within a suite.
    pub run_id: String,
    /// Suite name.
    pub suite: String,
    /// Task name.
    pub task: String,
    /// Method name (lora, adalora, adapter, prefix_tuning, prompt_tuning, p_tuning, p_tuning_v2, full_finetune).
    pub method: String,
    /// Budget label as written in the suite (`0.5%`, `20000`, `full`).
    pub budget: String,
    /// The budget in parameters, when one was set.
    pub budget_target: Option<usize>,
    /// Seed.
    pub seed: u64,
    /// The resolved run configuration (method config with its size knob set, optimiser, data).
    pub config: serde_json::Value,
    /// The hash of the run's configuration (`RunSpec::config_hash`); absent in records made
    /// before it was kept, which are therefore run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Name and value of the size knob chosen for the budget.
    pub knob: Option<(String, usize)>,
    /// Trainable parameters of the method (task head excluded).
    pub trainable_params: usize,
    /// Trainable parameters of the task head (the same for every method).
    pub head_params: usize,
    /// Parameters of the base model.
    pub base_params: usize,
    /// trainable_params as a percentage of base_params.
    pub trainable_percent: f64,
    /// (achieved − target) / target, when a budget was set.
    pub budget_deviation: Option<f64>,
    /// Bytes of the saved method (what a user would ship).
    pub adapter_bytes: u64,
    /// Where the saved method is, relative to the suite's `runs/` folder: a PEFT-format
    /// directory (`adapters/<run id>/`), or a safetensors file for what that format cannot
    /// hold; absent when nothing was kept (full fine-tuning, a failed run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_path: Option<String>,
    /// The metric that ranks runs for this task (accuracy, matthews, pearson, …).
    pub primary_metric: String,
    /// Best dev value of each metric over evaluations.
    pub metrics_best: BTreeMap<String, f64>,
    /// Dev metrics after the last step.
    pub metrics_final: BTreeMap<String, f64>,
    /// Training wall time in seconds.
    pub train_seconds: f64,
    /// Where the run's wall time went, in seconds: `wall` (the whole run), `evaluation` (dev
    /// and validation scoring, and generation), `latency`, `analysis`, `save`; the rest of
    /// `wall` beyond these and `train_seconds` is set-up. Absent in older records.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub phase_seconds: BTreeMap<String, f64>,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Optimizer steps per second.
    pub steps_per_second: f64,
    /// Training tokens (non-padding) per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of the process during the run, in bytes.
    pub peak_memory_bytes: u64,
    /// Inference latency in milliseconds per batch: `unmerged`, and `merged` for the LoRA family.
    pub latency_ms: BTreeMap<String, f64>,
    /// Loss / metric curve.
    pub curve: Vec<CurvePoint>,
    /// How the run ended.
    pub status: RunStatus,
    /// Method-specific facts (AdaLoRA's final rank per matrix under `final_ranks`).
    pub extra: serde_json::Value,
    /// Environment.
    pub env: Environment,
    /// The weight update's analyses, when the suite asked for them (`analyses = [...]`) and
    /// the method's update is a matrix ΔW per projection (LoRA, AdaLoRA, full fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_analysis: Option<UpdateAnalysis>,
    /// Which evaluation the reported dev score comes from; absent in records made before
    /// selection was kept, whose reported score is the best dev evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected: Option<Selected>,
    /// Per-example dev outcomes at the selected evaluation, which intervals and paired tests
    /// resample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev_outcomes: Option<crate::outcomes::Outcomes>,
    /// What `peak_memory_bytes` measured and what the known tensors take of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryUse>,
}

/// A run's peak memory, split where the tensors are known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryUse {
    /// `heap`: the most live heap bytes during the run (its own); `rss`: the process's
    /// resident high-water mark, which includes memory earlier runs freed.
    pub source: String,
    /// The frozen base model's weights.
    pub base_weights_bytes: u64,
    /// The trained parameters (method and head; full fine-tuning's copy of the weights).
    pub trainable_bytes: u64,
    /// AdamW's two moments of every trained parameter.
    pub optimizer_bytes: u64,
    /// The rest of the peak: activations, gradients, data and workspace.
    pub other_bytes: u64,
}

/// How a run's reported evaluation is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The evaluation after the last step: nothing is chosen.
    #[default]
    Final,
    /// The evaluation that scored best on a validation split carved from the training data;
    /// the dev set chooses nothing.
    BestOnValidation,
}

impl Selection {
    /// The name a suite writes.
    pub fn name(self) -> &'static str {
        match self {
            Selection::Final => "final",
            Selection::BestOnValidation => "best_on_validation",
        }
    }
}

/// The evaluation a run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selected {
    /// The rule that chose it.
    pub rule: Selection,
    /// Its step.
    pub step: usize,
    /// Dev metrics there: the run's reported scores.
    pub metrics: BTreeMap<String, f64>,
    /// Validation examples carved from the training data (0 for `final`).
    pub validation_examples: usize,
    /// Validation metrics at that step (empty for `final`).
    pub validation_metrics: BTreeMap<String, f64>,
}

/// What the LoRA paper (Hu et al. 2021, §7) asks of a fine-tuned weight update ΔW, per
/// projection matrix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateAnalysis {
    /// The share of ΔW's energy Σσ² the effective rank covers (0.9).
    pub energy_fraction: f64,
    /// One entry per projection whose ΔW is not zero, in layer order.
    pub matrices: Vec<MatrixUpdate>,
}

/// One projection's update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MatrixUpdate {
    /// `layer3.query`.
    pub matrix: String,
    /// `[out, in]`.
    pub shape: [usize; 2],
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// ‖W‖_F of the base weight.
    pub base_norm: f64,
    /// The fewest singular values of ΔW holding `energy_fraction` of its energy.
    pub effective_rank: usize,
    /// ΔW's largest singular values (at most 32), descending.
    pub singular_values: Vec<f64>,
    /// How much ΔW amplifies directions of W, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amplification: Option<Amplification>,
}

/// The LoRA paper's Table 7 for one matrix, at rank `rank`: U, V are ΔW's top-`rank` left and
/// right singular vectors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Amplification {
    /// The rank r of the comparison (LoRA's r; the effective rank for a dense update).
    pub rank: usize,
    /// ‖UᵀWV‖_F: how much of W lies in ΔW's directions.
    pub projected_norm: f64,
    /// ‖U_WᵀWV_W‖_F with W's own top-r singular vectors (= the root of W's top-r σ²).
    pub base_top_norm: f64,
    /// ‖UᵀWV‖_F for random orthonormal U, V of rank r.
    pub random_norm: f64,
    /// ‖ΔW‖_F / ‖UᵀWV‖_F: the paper's amplification factor.
    pub factor: f64,
}

impl RunRecord {
    /// The reported value of the run's primary metric: at the selected evaluation, or (in
    /// records made before selection was kept) the best dev value. None when not finite.
    pub fn primary_reported(&self) -> Option<f64> {
        let m = match &self.selected {
            Some(s) => &s.metrics,
            None => &self.metrics_best,
        };
        m.get(&self.primary_metric)
            .copied()
            .filter(|v| v.is_finite())
    }

    /// The peak learning rate the method's parameters trained at (`config.optim.lr`).
    pub fn lr(&self) -> Option<f64> {
        self.optim_rate("lr")
    }

    /// The task head's own peak rate, when the run set one (`config.optim.head_lr`).
    pub fn head_lr(&self) -> Option<f64> {
        self.optim_rate("head_lr")
    }

    fn optim_rate(&self, key: &str) -> Option<f64> {
        self.config.get("optim")?.get(key)?.as_f64()
    }

    /// The run's rates in one short label: `1e-3`, or `1e-3, head 1e-2` when the head had its
    /// own; None for a record without them.
    pub fn rate_label(&self) -> Option<String> {
        let lr = self.lr()?;
        Some(match self.head_lr() {
            Some(h) => format!("{lr:e}, head {h:e}"),
            None => format!("{lr:e}"),
        })
    }

    /// Writes the record as JSON atomically (temporary file, then rename), so a killed run
    /// never leaves a half-written record.
    pub fn write_atomic(&self, path: &Path) -> std::io::Result<()> {
        // One temporary name per process: two writers never interleave in one file.
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads one record.
    pub fn read(path: &Path) -> Result<Self, crate::ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| crate::ReportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| crate::ReportError::BadRecord {
            path: path.to_path_buf(),
            message: format!("line {}: {e}", e.line()),
        })
    }
}
