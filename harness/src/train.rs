//! One run: size the method to its budget, attach it, train, evaluate, record.

use crate::budget::{check_method, match_budget, Budget};
use crate::chance::chance_level;
use crate::data::{batch_tokens, make_batch, Example};
use crate::objective::{
    evaluate, evaluate_outcomes, loss, packed_prompt, EvalBatches, Objective, Scorer,
};
use crate::optim::{AdamW, OptimConfig};
use crate::task::{TaskConfig, TaskData};
use crate::{env, HarnessError};
use candle_core::Device;
use peftbench_backbone::{
    HfTask, Initializer, SequenceHead, TextTokenizer, TrainableParams, Transformer,
};
use peftbench_methods::peft::HeadWeights;
use peftbench_methods::{AttachContext, Method, MethodConfig};
use peftbench_reports::chance::CHANCE_KEY;
use peftbench_reports::outcomes::lower_is_better;
use peftbench_reports::{CurvePoint, RunRecord, RunStatus, Selected, Selection};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// How long and in what batches to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Examples per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Evaluate on dev every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    /// Examples per evaluation batch.
    #[serde(default = "d_eval_batch")]
    pub eval_batch_size: usize,
    /// Which evaluation a run reports: `final` (after the last step) or `best_on_validation`
    /// (the one best on a validation split carved from the training data).
    #[serde(default)]
    pub selection: Selection,
    /// Validation examples carved from the training data for `best_on_validation` (default:
    /// a tenth of it, at most 1,000). The split is the same for every method and seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_size: Option<usize>,
    /// Precision: `f32`, or `bf16` (the frozen base's weights and activations in bf16; trained
    /// parameters, gradients, AdamW state, losses and metrics in f32). Left out of the
    /// configuration hash at f32, so records made before it existed stay current.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub dtype: Precision,
    /// Batch examples of similar length, as the Hugging Face Trainer's `group_by_length`
    /// (see [`Order::grouped`]). Left out of the configuration hash when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub group_by_length: bool,
    /// Lay a batch's examples end to end in as few rows as hold them (none longer than its
    /// longest example), attention kept within each example and the method's virtual tokens
    /// (prompt tuning, P-Tuning) opening each: the same examples and loss as the padded
    /// batch, without computing the padding. Causal LM and classification / regression,
    /// training and evaluation; reward pairs share their prompt whenever they can, asked or
    /// not. Left out of the hash when off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packing: bool,
}

/// A run's numeric precision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: the frozen base in bf16, trained parameters in f32.
    Bf16,
    /// A GGUF base's quantized projections kept in their blocks, dequantized per use (a
    /// QLoRA-style base); everything else f32.
    Quantized,
}

impl Precision {
    /// Whether this is plain f32.
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The base's dtype on `device`: on the CPU a bf16 run keeps its weights and activations
    /// f32 and runs the frozen projections' products in bf16 (see [`bf16_on_cpu`]).
    pub fn dtype_on(self, device: &Device) -> candle_core::DType {
        match self {
            Precision::Bf16 if device.is_cpu() => candle_core::DType::F32,
            p => p.dtype(),
        }
    }

    /// The base's dtype.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 | Precision::Quantized => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// The name used in suites and records.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Quantized => "quantized",
        }
    }
}

impl TrainConfig {
    /// Examples of a training set of `n` held out for validation; an error when they would
    /// leave nothing to train on, or are asked for without `best_on_validation`.
    pub fn validation_examples(&self, n: usize) -> Result<usize, String> {
        match (self.selection, self.validation_size) {
            (Selection::Final, None) => Ok(0),
            (Selection::Final, Some(_)) => Err(
                "train.validation_size is set but train.selection is not \"best_on_validation\""
                    .into(),
            ),
            (Selection::BestOnValidation, size) => {
                let v = size.unwrap_or((n / 10).clamp(1, 1000));
                if v == 0 || v >= n {
                    Err(format!(
                        "train.validation_size = {v} leaves no training examples of {n} (it must be between 1 and {})",
                        n.saturating_sub(1)
                    ))
                } else {
                    Ok(v)
                }
            }
        }
    }
}

fn d_batch() -> usize {
    16
}
fn d_eval_batch() -> usize {
    64
}

/// Everything that defines one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSpec {
    /// Suite name.
    pub suite: String,
    /// Task name.
    pub task: String,
    /// The task as the suite declares it (data, limits, lengths): part of what a record was
    /// made with.
    pub task_config: TaskConfig,
    /// The base model as the suite names it.
    pub model: String,
    /// The method as configured (before budget matching).
    pub method: MethodConfig,
    /// Its optimiser.
    pub optim: OptimConfig,
    /// Budget label as written.
    pub budget_label: String,
    /// The budget.
    pub budget: Budget,
    /// Largest accepted relative budget deviation.
    pub max_budget_deviation: f64,
    /// Seed for init, data order and dropout.
    pub seed: u64,
    /// Training length and batches.
    pub train: TrainConfig,
    /// Train on the same architecture from random initialisation instead of the base.
    pub random_init: bool,
    /// Analyses of the trained update to record (absent from the JSON, and so from the
    /// config hash, when none are asked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub analyses: Vec<crate::analysis::Analysis>,
}

impl RunSpec {
    /// `task__method__budget__seed`, safe as a file name.
    pub fn run_id(&self) -> String {
        let b: String = self
            .budget_label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else if c == '%' {
                    'p'
                } else {
                    '_'
                }
            })
            .collect();
        format!(
            "{}__{}__{}__s{}",
            self.task,
            self.method_label(),
            b,
            self.seed
        )
    }

    /// A hash of everything that defines the run (16 hex digits, FNV-1a 64 of its canonical
    /// JSON): a recorded run is reused only while its suite still gives the same hash.
    pub fn config_hash(&self) -> String {
        let text = serde_json::to_value(self)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The method's name in records: `lora`, or `lora-random-init` for a random-init control.
    pub fn method_label(&self) -> String {
        if self.random_init {
            format!("{}-random-init", self.method.name())
        } else {
            self.method.name().to_string()
        }
    }
}

/// The base model a suite fine-tunes, loaded once and cloned per run.
pub struct Base {
    /// The pretrained model.
    pub model: Transformer,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
}

/// A seeded permutation stream over `n` items (epochs reshuffle).
pub struct Order {
    rng: Initializer,
    n: usize,
    perm: Vec<usize>,
    pos: usize,
    /// With `group_by_length`: each item's length and the megabatch size.
    grouping: Option<(Vec<usize>, usize)>,
}

impl Order {
    /// A plain shuffle.
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            rng: Initializer::new(seed ^ 0xda7a),
            n,
            perm: Vec::new(),
            pos: 0,
            grouping: None,
        }
    }

    /// The Hugging Face Trainer's `group_by_length`: each epoch's shuffle is cut into
    /// megabatches of up to 50 batches, each sorted longest first, so a batch holds examples
    /// of similar length (little padding) while the epoch stays random at the megabatch scale.
    pub fn grouped(lengths: Vec<usize>, batch_size: usize, seed: u64) -> Self {
        let n = lengths.len();
        let batches_per_mega = (n / (4 * batch_size.max(1))).clamp(1, 50);
        let mut order = Self::new(n, seed);
        order.grouping = Some((lengths, batches_per_mega * batch_size.max(1)));
        order
    }

    fn reshuffle(&mut self) {
        self.perm = (0..self.n).collect();
        for i in (1..self.n).rev() {
            let j = self.rng.index(i + 1);
            self.perm.swap(i, j);
        }
        if let Some((lengths, mega)) = &self.grouping {
            for chunk in self.perm.chunks_mut(*mega) {
                chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            }
        }
        self.pos = 0;
    }
    /// The next `size` items (an epoch boundary continues into the next shuffle).
    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size.min(self.n) {
            if self.pos == self.perm.len() {
                self.reshuffle();
            }
            out.push(self.perm[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// A one-line progress display (step, loss, steps per second, time left) rewritten in place
/// about once a second, only when stderr is a terminal: logs and CI get the grid's plain
/// lines alone.
struct Progress {
    on: bool,
    shown: bool,
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new() -> Self {
        use std::io::IsTerminal;
        let now = Instant::now();
        Self {
            on: std::io::stderr().is_terminal(),
            shown: false,
            started: now,
            last: now,
        }
    }

    fn show(&mut self, step: usize, total: usize, loss: f64) {
        if !self.on || (self.last.elapsed().as_secs_f64() < 1.0 && step != total) {
            return;
        }
        self.last = Instant::now();
        if !self.shown {
            // Below the grid's line for this run, which the run's result then ends.
            eprintln!();
            self.shown = true;
        }
        let rate = step as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let left = (total - step) as f64 / rate.max(1e-9);
        eprint!("\r  step {step}/{total}  loss {loss:.4}  {rate:.2} steps/s  {left:.0}s left   ");
    }

    fn clear(&self) {
        if self.shown {
            eprint!("\r{:70}\r", "");
        }
    }
}

/// The seed of a task's validation split: its name's FNV-1a hash.
fn task_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    }) ^ 0x7a11d
}

fn record_base(spec: &RunSpec, base_params: usize, task: &TaskData) -> RunRecord {
    RunRecord {
        run_id: spec.run_id(),
        suite: spec.suite.clone(),
        task: spec.task.clone(),
        method: spec.method_label(),
        budget: spec.budget_label.clone(),
        budget_target: spec.budget.target(base_params),
        seed: spec.seed,
        config: serde_json::to_value(spec).unwrap_or_default(),
        config_hash: Some(spec.config_hash()),
        knob: None,
        trainable_params: 0,
        head_params: 0,
        base_params,
        trainable_percent: 0.0,
        budget_deviation: None,
        adapter_bytes: 0,
        adapter_path: None,
        primary_metric: task.objective.primary_metric().into(),
        metrics_best: BTreeMap::new(),
        metrics_final: BTreeMap::new(),
        train_seconds: 0.0,
        phase_seconds: BTreeMap::new(),
        steps: 0,
        steps_per_second: 0.0,
        tokens_per_second: 0.0,
        peak_memory_bytes: 0,
        latency_ms: BTreeMap::new(),
        curve: Vec::new(),
        status: RunStatus::Ok,
        extra: serde_json::Value::Null,
        env: env::environment(),
        update_analysis: None,
        selected: None,
        dev_outcomes: None,
        memory: None,
    }
}

/// A training loss this many times the first step's (the untrained model's) is divergence,
/// even while finite: a learning rate that blows the loss from 0.69 to 1e6 has not trained.
pub const DIVERGENCE_FACTOR: f64 = 100.0;

/// Why the loss `value` counts as diverged, given the first step's `first`, if it does.
fn divergence(value: f64, first: f64) -> Option<String> {
    if !value.is_finite() {
        return Some(format!("training loss is {value}"));
    }
    // The floor keeps a near-zero first loss from flagging ordinary noise.
    let limit = DIVERGENCE_FACTOR * first.abs().max(0.1);
    (value > limit).then(|| {
        format!(
            "training loss {value:.4e} is over {DIVERGENCE_FACTOR}x the first step's {first:.4}: the run diverged (lower the learning rate)"
        )
    })
}

/// Why a causal-LM objective cannot train on a bidirectional encoder.
pub fn causal_lm_on_encoder(task: &str, model: &str) -> String {
    format!(
        "task `{task}`: a causal-LM objective (SFT) needs a causal decoder, but `{model}` is a bidirectional encoder, where every position sees the token it must predict"
    )
}

/// Runs one spec to a record. Failures become records (status error / diverged /
/// budget_unreachable); only I/O on the results directory is an `Err`.
pub fn run(spec: &RunSpec, base: &Base, task: &TaskData, adapters_dir: &Path) -> RunRecord {
    let base_params = base.model.num_parameters();
    let mut rec = record_base(spec, base_params, task);
    env::reset_peak_memory();
    let started = Instant::now();
    if let Err(e) = run_inner(spec, base, task, adapters_dir, &mut rec) {
        rec.status = RunStatus::Error {
            message: e.to_string(),
        };
    }
    rec.phase_seconds
        .insert("wall".into(), started.elapsed().as_secs_f64());
    rec.peak_memory_bytes = env::peak_memory_bytes();
    rec.memory = Some(memory_use(&base.model, &rec));
    rec.env = env::environment();
    rec.env.device = peftbench_backbone::device_name(base.model.device());
    rec.env.dtype = spec.train.dtype.name().to_string();
    // The fused kernels run only for f32 on the CPU; anything else ran the composites.
    let device = base.model.device();
    let fused = peftbench_backbone::kernels::fused_on(spec.train.dtype.dtype_on(device), device);
    rec.env.kernels = if fused { "fused" } else { "composite" }.to_string();
    if spec.train.dtype == Precision::Bf16 && device.is_cpu() {
        match (fused, peftbench_backbone::bf16_gemm::best()) {
            (true, Some(k)) => {
                rec.env.kernels = format!("fused; projection products in bf16 ({})", k.name())
            }
            (false, _) => {
                rec.env.dtype =
                    "f32 (bf16 asked; the composite kernels have no bf16 products)".into()
            }
            (true, None) => {
                rec.env.dtype = "f32 (bf16 asked; this CPU has neither AMX nor AVX-512-BF16)".into()
            }
        }
    }
    rec
}

/// On the CPU, `dtype = "bf16"` packs the frozen projections for the bf16 GEMM (AMX or
/// AVX-512-BF16, picked at run time): their products, forward and input gradient, take
/// bf16 operands and sum in f32 (a projection that trains, in full fine-tuning, packs its
/// f32 weight at each product and keeps its gradient f32); every other op, the trained
/// parameters and the activations stay f32. Without either kernel, or under `PEFTBENCH_KERNELS=composite` (the packed
/// products are a fused CPU kernel), the run is f32, and its record says so.
fn bf16_on_cpu(model: &mut Transformer) -> Result<(), HarnessError> {
    model.pack_frozen_bf16()?;
    Ok(())
}

/// The run's peak split into the tensors it knows (f32 parameters, AdamW's two moments).
fn memory_use(model: &Transformer, rec: &RunRecord) -> peftbench_reports::MemoryUse {
    let base = model.weight_bytes() as u64;
    let trainable = 4 * (rec.trainable_params + rec.head_params) as u64;
    let optimizer = 2 * trainable;
    peftbench_reports::MemoryUse {
        source: env::peak_memory_source().to_string(),
        base_weights_bytes: base,
        trainable_bytes: trainable,
        optimizer_bytes: optimizer,
        other_bytes: rec
            .peak_memory_bytes
            .saturating_sub(base + trainable + optimizer),
    }
}

fn run_inner(
    spec: &RunSpec,
    base: &Base,
    task: &TaskData,
    adapters_dir: &Path,
    rec: &mut RunRecord,
) -> Result<(), HarnessError> {
    // The base's device is the run's; batches are made there, once per step. A grid loads its
    // base in the suite's dtype, so this cast is a no-op there (and the f32 weights are not
    // held beside the bf16 ones).
    let device = base.model.device().clone();
    let dtype = spec.train.dtype.dtype_on(&device);
    let mut model = if spec.random_init {
        Transformer::random(base.model.config.clone(), spec.seed ^ 0x7a4d, &Device::Cpu)?
            .to(&device, dtype)?
    } else {
        base.model.to(&device, dtype)?
    };
    if spec.train.dtype == Precision::Bf16 && device.is_cpu() {
        bf16_on_cpu(&mut model)?;
    }
    // Configuration errors are the configuration's, never "budget unreachable".
    check_method(&spec.method, &model.config)?;
    if model.is_quantized() && matches!(spec.method, MethodConfig::FullFinetune(_)) {
        return Err(HarnessError::Config(
            "full fine-tuning trains the base's weights, which a quantized base (dtype = \"quantized\") keeps frozen in their GGUF blocks".into(),
        ));
    }
    if task.objective == crate::objective::Objective::CausalLm && !model.config.is_causal() {
        return Err(HarnessError::Config(causal_lm_on_encoder(
            &spec.task,
            &spec.model,
        )));
    }
    let target = spec.budget.target(rec.base_params);
    let matched = match match_budget(&spec.method, &model, target, spec.max_budget_deviation) {
        Ok(m) => m,
        Err(message) => {
            rec.status = RunStatus::BudgetUnreachable { message };
            return Ok(());
        }
    };
    let mut config = matched.config.clone();
    if let MethodConfig::Adalora(a) = &mut config {
        // AdaLoRA's schedule needs the run's length; keep PEFT's shape (warm-up, then a fixed tail).
        a.total_step = spec.train.steps.max(3);
        if a.tinit + a.tfinal >= a.total_step {
            a.tinit = a.total_step / 10;
            a.tfinal = a.total_step / 5;
        }
    }
    rec.knob = matched.knob.map(|k| (k.name.to_string(), k.value));
    if spec.task_config.source.uses_chat_template() {
        // The layout the model trained on is part of what the record says.
        if let Some(t) = &base.tokenizer.chat_template {
            rec.config["chat_template"] = serde_json::Value::String(t.source.clone());
        }
    }
    rec.trainable_params = matched.achieved;
    rec.trainable_percent = 100.0 * matched.achieved as f64 / rec.base_params as f64;
    rec.budget_deviation = matched.deviation;
    if let Ok(v) = serde_json::to_value(&config) {
        rec.config["method_resolved"] = v;
    }

    // The weights before training, for the update analyses (tensors share storage: cheap).
    let before = model.clone();
    let mut ctx = AttachContext::new(&mut model, spec.seed);
    ctx.tokenizer = Some(&base.tokenizer);
    let mut method = config.attach(&mut ctx)?;
    let mut head_params = TrainableParams::new();
    let head = match task.objective.head_kind() {
        Some(kind) => {
            let head = SequenceHead::new(
                &model,
                kind,
                &mut head_params,
                &mut Initializer::new(spec.seed ^ 0x4ead),
            )?;
            Some(match task.pooling {
                Some(p) => head.with_pooling(p),
                None => head,
            })
        }
        None => None,
    };
    rec.head_params = head_params.count();
    if let Some(h) = &head {
        rec.config["head_pooling"] = serde_json::to_value(h.pooling).unwrap_or_default();
    }
    if method.params().count() != matched.achieved {
        return Err(HarnessError::Config(format!(
            "{}: created {} trainable parameters, formula says {}",
            config.name(),
            method.params().count(),
            matched.achieved
        )));
    }
    // The head's rate is a multiple of the method's, so it follows the same schedule.
    let head_scale = spec.optim.head_lr.map_or(1.0, |h| h / spec.optim.lr);
    let mut groups = method.lr_groups();
    groups.push((head_params.vars(), head_scale));
    let mut opt = AdamW::with_groups(groups, spec.optim.clone())?;

    if task.train.is_empty() || task.dev.is_empty() {
        return Err(HarnessError::Config(format!(
            "task `{}` has no training or dev examples",
            task.name
        )));
    }
    let pad = base.tokenizer.pad_id;
    // The validation split: one seeded shuffle per task, so every method and seed holds out
    // the same examples.
    let n_val = spec
        .train
        .validation_examples(task.train.len())
        .map_err(|e| HarnessError::Config(format!("task `{}`: {e}", task.name)))?;
    let mut shuffled = Order::new(task.train.len(), task_seed(&task.name));
    let perm = shuffled.next_batch(task.train.len());
    let (held, kept) = perm.split_at(n_val);
    let validation: Vec<Example> = held.iter().map(|&i| task.train[i].clone()).collect();
    let train_idx: Vec<usize> = if n_val == 0 {
        (0..task.train.len()).collect()
    } else {
        kept.to_vec()
    };
    let primary = task.objective.primary_metric();
    let mut best_validation: Option<f64> = None;
    // The parameters at the chosen evaluation, when it is not the last: what is saved, so the
    // saved run reproduces its reported score.
    let mut chosen_state = None;
    // AdaLoRA fixes its ranks at step total − tfinal; a state from before that is not the
    // structure its saved adapter (with the final rank_pattern) describes, so it is not chosen.
    let selectable_from = match &config {
        MethodConfig::Adalora(a) => a.total_step.saturating_sub(a.tfinal),
        _ => 0,
    };
    let mut order = if spec.train.group_by_length {
        let lengths = train_idx
            .iter()
            .map(|&i| task.train[i].num_tokens())
            .collect();
        Order::grouped(lengths, spec.train.batch_size, spec.seed)
    } else {
        Order::new(train_idx.len(), spec.seed)
    };
    let accum = spec.optim.grad_accumulation.max(1);
    let total = spec.train.steps;
    let mut tokens = 0usize;
    let mut loss_sum = 0f64;
    let mut loss_n = 0usize;
    let mut first_loss: Option<f64> = None;
    // The dev metrics before any update: the baseline each run must beat (for SFT, the base
    // model's own response perplexity; for a fresh head, chance).
    method.set_training(false);
    let initial_started = Instant::now();
    let eval_batches = EvalBatches {
        size: spec.train.eval_batch_size,
        pad_id: pad,
        pack: spec.train.packing,
    };
    let mut initial = evaluate(
        &task.objective,
        &Scorer {
            model: &model,
            method: method.as_ref(),
            head: head.as_ref(),
        },
        &task.dev,
        eval_batches,
        &device,
    )?;
    initial.retain(|_, v| v.is_finite());
    let generate = spec.task_config.generate.as_ref();
    let initial_generations = match generate {
        Some(g) if task.objective == crate::objective::Objective::CausalLm => {
            let (rouge, shown) = generations(&model, method.as_ref(), base, &task.dev, g)?;
            initial.insert("rouge_l".into(), rouge);
            Some(shown)
        }
        _ => None,
    };
    let mut eval_seconds_total = initial_started.elapsed().as_secs_f64();
    // Packed training batches (with the method's virtual tokens per example): causal LM and
    // the text objectives; reward pairs share their prompt whenever they can, asked or not.
    let pack = match spec.train.packing && task.objective != Objective::Reward {
        true => packed_prompt(&Scorer {
            model: &model,
            method: method.as_ref(),
            head: head.as_ref(),
        })?,
        false => None,
    };
    let started = Instant::now();
    let mut eval_seconds = 0f64;
    let log_every = (total / 50).max(1);
    let mut progress = Progress::new();
    for step in 1..=total {
        method.set_training(true);
        for _ in 0..accum {
            let idx = order.next_batch(spec.train.batch_size);
            let examples: Vec<&Example> = idx.iter().map(|&i| &task.train[train_idx[i]]).collect();
            let batch = crate::data::batch(&examples, pack, pad, &device)?;
            tokens += batch_tokens(&batch)?;
            let scorer = Scorer {
                model: &model,
                method: method.as_ref(),
                head: head.as_ref(),
            };
            let mut l = loss(&task.objective, &scorer, &batch)?;
            let value = l.to_scalar::<f32>()? as f64;
            if first_loss.is_none() {
                // The untrained model's loss on the first batch opens the curve at step 0,
                // beside its dev metrics.
                rec.curve.push(CurvePoint {
                    step: 0,
                    train_loss: value,
                    metrics: initial.clone(),
                });
            }
            let first = *first_loss.get_or_insert(value);
            if let Some(message) = divergence(value, first) {
                rec.status = RunStatus::Diverged { step, message };
                rec.steps = step;
                rec.train_seconds = started.elapsed().as_secs_f64() - eval_seconds;
                return Ok(());
            }
            loss_sum += value;
            loss_n += 1;
            if let Some(extra) = method.extra_loss()? {
                l = (l + extra)?;
            }
            let grads = l.backward()?;
            if opt.accumulate(&grads)? {
                opt.step(spec.optim.lr_at(step, total))?;
                method.after_step(step, &grads)?;
            }
        }
        let eval_now =
            step == total || (spec.train.eval_every > 0 && step % spec.train.eval_every == 0);
        progress.show(step, total, loss_sum / loss_n.max(1) as f64);
        if !eval_now && step % log_every == 0 {
            // Loss alone, about 50 times a run, so a curve is more than its evaluations.
            rec.curve.push(CurvePoint {
                step,
                train_loss: loss_sum / loss_n.max(1) as f64,
                metrics: BTreeMap::new(),
            });
            loss_sum = 0.0;
            loss_n = 0;
        }
        if eval_now {
            let t0 = Instant::now();
            method.set_training(false);
            let scorer = Scorer {
                model: &model,
                method: method.as_ref(),
                head: head.as_ref(),
            };
            let (mut m, outcomes) =
                evaluate_outcomes(&task.objective, &scorer, &task.dev, eval_batches, &device)?;
            // An undefined metric (e.g. Pearson of constant predictions) is left out, not NaN.
            m.retain(|_, v| v.is_finite());
            let mut validation_metrics = BTreeMap::new();
            let chosen = match spec.train.selection {
                Selection::Final => step == total,
                Selection::BestOnValidation => {
                    validation_metrics =
                        evaluate(&task.objective, &scorer, &validation, eval_batches, &device)?;
                    validation_metrics.retain(|_, v| v.is_finite());
                    let v = validation_metrics.get(primary).copied();
                    let better = match (v, best_validation) {
                        (Some(v), Some(b)) => {
                            if lower_is_better(primary) {
                                v < b
                            } else {
                                v > b
                            }
                        }
                        (Some(_), None) => true,
                        (None, _) => rec.selected.is_none(),
                    };
                    let better = (better && step >= selectable_from)
                        || (step == total && rec.selected.is_none());
                    if better {
                        best_validation = v.or(best_validation);
                    }
                    better
                }
            };
            if chosen {
                rec.selected = Some(Selected {
                    rule: spec.train.selection,
                    step,
                    metrics: m.clone(),
                    validation_examples: validation.len(),
                    validation_metrics,
                });
                rec.dev_outcomes = Some(outcomes);
                chosen_state = if step == total {
                    None
                } else {
                    Some((method.params().snapshot()?, head_params.snapshot()?))
                };
            }
            for (k, v) in &m {
                if v.is_finite() {
                    let best = rec.metrics_best.entry(k.clone()).or_insert(*v);
                    let lower_better = lower_is_better(k);
                    if (lower_better && *v < *best) || (!lower_better && *v > *best) {
                        *best = *v;
                    }
                }
            }
            rec.metrics_final = m.clone();
            rec.curve.push(CurvePoint {
                step,
                train_loss: loss_sum / loss_n.max(1) as f64,
                metrics: m,
            });
            loss_sum = 0.0;
            loss_n = 0;
            eval_seconds += t0.elapsed().as_secs_f64();
        }
    }
    progress.clear();
    rec.steps = total;
    rec.train_seconds = started.elapsed().as_secs_f64() - eval_seconds;
    eval_seconds_total += eval_seconds;
    if let Some((m, h)) = &chosen_state {
        method.params().restore(m)?;
        head_params.restore(h)?;
    }
    rec.steps_per_second = total as f64 / rec.train_seconds.max(1e-9);
    rec.tokens_per_second = tokens as f64 / rec.train_seconds.max(1e-9);
    rec.extra = method.summary()?;
    if !rec.extra.is_object() {
        rec.extra = serde_json::json!({});
    }
    rec.extra["initial_metrics"] = serde_json::to_value(&initial).unwrap_or_default();
    if let (Some(g), Some(before)) = (generate, initial_generations) {
        // The reported parameters' generations (the chosen state is restored above).
        method.set_training(false);
        let t0 = Instant::now();
        let (rouge, shown) = generations(&model, method.as_ref(), base, &task.dev, g)?;
        eval_seconds_total += t0.elapsed().as_secs_f64();
        rec.metrics_final.insert("rouge_l".into(), rouge);
        rec.metrics_best.insert("rouge_l".into(), rouge);
        if let Some(sel) = rec.selected.as_mut() {
            sel.metrics.insert("rouge_l".into(), rouge);
        }
        let samples: Vec<serde_json::Value> = shown
            .into_iter()
            .zip(before)
            .map(|(after, before)| {
                serde_json::json!({
                    "prompt": after.prompt,
                    "reference": after.reference,
                    "generated": after.generated,
                    "generated_before_training": before.generated,
                })
            })
            .collect();
        rec.extra["generations"] = serde_json::Value::Array(samples);
    }
    if let Some(chance) = chance_level(&task.objective, &task.train, &task.dev) {
        rec.extra[CHANCE_KEY] = serde_json::to_value(chance).unwrap_or_default();
    }

    rec.phase_seconds
        .insert("evaluation".into(), eval_seconds_total);
    method.set_training(false);
    rec.latency_ms = timed(&mut rec.phase_seconds, "latency", || {
        latency(
            &mut model,
            method.as_ref(),
            head.as_ref(),
            task,
            spec.train.batch_size,
            pad,
        )
    })?;
    rec.update_analysis = timed(&mut rec.phase_seconds, "analysis", || {
        analyse_update(spec, &config, method.as_ref(), &before, &model)
    })?;
    let (saved, bytes) = timed(&mut rec.phase_seconds, "save", || {
        std::fs::create_dir_all(adapters_dir).map_err(|source| HarnessError::Io {
            path: adapters_dir.to_path_buf(),
            source,
        })?;
        save_adapter(
            method.as_ref(),
            &model,
            task,
            head.as_ref(),
            &spec.model,
            adapters_dir,
            &spec.run_id(),
        )
    })?;
    rec.adapter_bytes = bytes;
    if matches!(config, MethodConfig::FullFinetune(_)) {
        // A full copy of the model per run is not worth keeping: its size is recorded.
        let _ = std::fs::remove_file(&saved);
    } else {
        let runs = adapters_dir.parent().unwrap_or(adapters_dir);
        rec.adapter_path = saved
            .strip_prefix(runs)
            .ok()
            .map(|p| p.display().to_string());
    }
    Ok(())
}

/// Runs `f`, recording its wall time under `phase`.
fn timed<R>(phases: &mut BTreeMap<String, f64>, phase: &str, f: impl FnOnce() -> R) -> R {
    let t0 = Instant::now();
    let out = f();
    phases.insert(phase.to_string(), t0.elapsed().as_secs_f64());
    out
}

/// One dev prompt's greedy generation beside its reference.
struct Generation {
    prompt: String,
    reference: String,
    generated: String,
}

/// Mean ROUGE-L of greedy generations for the first `cfg.examples` dev prompts, and the first
/// `cfg.show` of them as text.
fn generations(
    model: &Transformer,
    method: &dyn Method,
    base: &Base,
    dev: &[Example],
    cfg: &crate::task::GenerateConfig,
) -> Result<(f64, Vec<Generation>), HarnessError> {
    let tok = &base.tokenizer;
    let eos = tok.eos_id();
    let decode = |ids: &[u32]| -> Result<String, HarnessError> {
        let ids: Vec<u32> = ids.iter().copied().filter(|&i| Some(i) != eos).collect();
        Ok(tok.decode(&ids)?)
    };
    let mut total = 0f64;
    let mut n = 0usize;
    let mut shown = Vec::new();
    for e in dev.iter().take(cfg.examples) {
        let Example::Lm {
            ids,
            response_start,
        } = e
        else {
            continue;
        };
        let (prompt, reference) = ids.split_at((*response_start).min(ids.len()));
        let out = crate::generate::greedy(model, method, prompt, cfg.max_new_tokens, eos)?;
        let (generated, reference) = (decode(&out)?, decode(reference)?);
        total += crate::generate::rouge_l(&generated, &reference);
        n += 1;
        if shown.len() < cfg.show {
            shown.push(Generation {
                prompt: decode(prompt)?,
                reference,
                generated,
            });
        }
    }
    Ok((total / n.max(1) as f64, shown))
}

/// The update analyses the suite asked for, of the trained weights (any adapter merged into a
/// copy) against `initial`.
fn analyse_update(
    spec: &RunSpec,
    config: &MethodConfig,
    method: &dyn Method,
    initial: &Transformer,
    model: &Transformer,
) -> Result<Option<peftbench_reports::UpdateAnalysis>, HarnessError> {
    use crate::analysis::Analysis;
    let amplification = spec.analyses.contains(&Analysis::Amplification);
    if !amplification && !spec.analyses.contains(&Analysis::EffectiveRank) {
        return Ok(None);
    }
    let mut tuned = model.clone();
    let merged = method.merge_into(&mut tuned)?;
    let rank = match config {
        MethodConfig::Lora(c) => Some(c.rank),
        MethodConfig::LoraPlus(c) => Some(c.0.rank),
        MethodConfig::Dora(c) => Some(c.0.rank),
        _ => None,
    };
    let analysis =
        crate::analysis::update_analysis(initial, &tuned, rank, amplification, spec.seed)?;
    if merged {
        // The method tracks whether it is merged; leave it unmerged as it was.
        method.unmerge_from(&mut tuned)?;
    }
    Ok(analysis)
}

/// Saves the trained method with its head: in PEFT's format (`<run id>/adapter_config.json`
/// and `adapter_model.safetensors`) where it can hold the method, else the method's own
/// safetensors file. Returns the path and its size on disk.
fn save_adapter(
    method: &dyn Method,
    model: &Transformer,
    task: &TaskData,
    head: Option<&SequenceHead>,
    base_name: &str,
    adapters_dir: &Path,
    run_id: &str,
) -> Result<(std::path::PathBuf, u64), HarnessError> {
    let hf_task = match task.objective {
        crate::objective::Objective::CausalLm => HfTask::CausalLm,
        _ => HfTask::SeqCls,
    };
    let weights = head.map(|h| HeadWeights {
        weight: h.out.weight.detach(),
        bias: h.out.bias.as_ref().map(|b| b.detach()),
        pooling: Some(h.pooling),
    });
    if let Some(state) = method.peft_state(&model.config, hf_task)? {
        let dir = adapters_dir.join(run_id);
        peftbench_methods::peft::write(
            &dir,
            &state,
            &model.config,
            hf_task,
            base_name,
            weights.as_ref(),
        )?;
        let bytes = [
            peftbench_methods::peft::CONFIG_FILE,
            peftbench_methods::peft::WEIGHTS_FILE,
        ]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum();
        return Ok((dir, bytes));
    }
    let path = adapters_dir.join(format!("{run_id}.safetensors"));
    method.save(&path)?;
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    Ok((path, bytes))
}

/// Median milliseconds of a forward pass on one training-sized dev batch, unmerged and (for
/// methods that can fold into the weights) merged.
/// Untimed forward passes before the latency is measured.
const LATENCY_WARMUP: usize = 2;
/// Timed forward passes; their median is recorded.
const LATENCY_REPEATS: usize = 7;

fn latency(
    model: &mut Transformer,
    method: &dyn Method,
    head: Option<&SequenceHead>,
    task: &TaskData,
    batch: usize,
    pad: u32,
) -> Result<BTreeMap<String, f64>, HarnessError> {
    let examples: Vec<&Example> = task.dev.iter().take(batch).collect();
    let b = make_batch(&examples, pad, &Device::Cpu)?;
    let obj = task.objective;
    let time = |model: &Transformer| -> Result<f64, HarnessError> {
        let mut t = Vec::new();
        // Two untimed passes warm caches and malloc's free lists; the median of the timed
        // ones is the figure.
        for i in 0..LATENCY_WARMUP + LATENCY_REPEATS {
            let s = Scorer {
                model,
                method,
                head,
            };
            let t0 = Instant::now();
            let _ = loss(&obj, &s, &b)?;
            if i >= LATENCY_WARMUP {
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    };
    let mut out = BTreeMap::new();
    out.insert("unmerged".to_string(), time(model)?);
    if method.merge_into(model)? {
        out.insert("merged".to_string(), time(model)?);
        method.unmerge_from(model)?;
    }
    Ok(out)
}
