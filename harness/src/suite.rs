//! A suite (TOML) and its expansion into runs: tasks × methods × budgets × seeds.

use crate::budget::{check_method, Budget};
use crate::objective::Objective;
use crate::optim::OptimConfig;
use crate::task::TaskData;
use crate::task::{TaskConfig, TaskSource};
use crate::train::causal_lm_on_encoder;
use crate::train::{RunSpec, TrainConfig};
use crate::HarnessError;
use peftbench_backbone::ModelConfig;
use peftbench_methods::MethodConfig;
use peftbench_reports::Selection;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Optimiser keys allowed in a method's table beside its own configuration.
const OPTIM_KEYS: [&str; 10] = [
    "lr",
    "head_lr",
    "weight_decay",
    "warmup_ratio",
    "decay",
    "max_grad_norm",
    "grad_accumulation",
    "beta1",
    "beta2",
    "eps",
];

/// A parsed suite.
#[derive(Debug, Clone)]
pub struct Suite {
    /// Suite name (results go to `<results>/<name>/`).
    pub name: String,
    /// The base model: a Hugging Face directory, or `minilm` for the fetched all-MiniLM-L6-v2.
    pub model: String,
    /// Seeds; every run is repeated once per seed.
    pub seeds: Vec<u64>,
    /// Budget labels, as written.
    pub budgets: Vec<String>,
    /// Largest accepted relative deviation from a budget.
    pub max_budget_deviation: f64,
    /// Training length and batches.
    pub train: TrainConfig,
    /// Methods with their optimisers, in suite order.
    pub methods: Vec<(MethodConfig, OptimConfig)>,
    /// Tasks.
    pub tasks: Vec<TaskConfig>,
    /// Data root for relative task paths.
    pub data_root: Option<PathBuf>,
    /// Methods also run on the same architecture from random initialisation, as a control
    /// showing what pretraining contributes.
    pub random_init_controls: Vec<String>,
    /// The weight-update analyses to record and report (the LoRA paper's §7).
    pub analyses: Vec<crate::analysis::Analysis>,
    /// The device to train on (`cpu`, `cuda`, `cuda:N`) unless `--device` names one; not part
    /// of a run's configuration hash, since a run's result should not depend on it.
    pub device: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    model: String,
    #[serde(default = "d_seeds")]
    seeds: Vec<u64>,
    #[serde(default = "d_budgets")]
    budgets: Vec<String>,
    #[serde(default = "d_dev")]
    max_budget_deviation: f64,
    train: TrainConfig,
    #[serde(default)]
    data_root: Option<PathBuf>,
    methods: toml::Table,
    tasks: Vec<toml::Table>,
    #[serde(default)]
    random_init_controls: Vec<String>,
    #[serde(default)]
    analyses: Vec<crate::analysis::Analysis>,
    #[serde(default)]
    device: Option<String>,
}

fn d_seeds() -> Vec<u64> {
    vec![0]
}
fn d_budgets() -> Vec<String> {
    vec!["default".into()]
}
fn d_dev() -> f64 {
    0.25
}

/// 1-based line of the first occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    line_of_nth(text, needle, 0)
}

/// 1-based line of occurrence `n` (0-based) of `needle` in `text`.
fn line_of_nth(text: &str, needle: &str, n: usize) -> Option<usize> {
    text.match_indices(needle)
        .nth(n)
        .map(|(i, _)| text[..i].matches('\n').count() + 1)
}

/// Task keys that serialise only when set, so the check below cannot see them in the
/// re-serialised task.
const OPTIONAL_TASK_KEYS: [&str; 5] = ["pooling", "steps", "eval_every", "lr", "generate"];

/// Keys of a `[[tasks]]` table that the parsed task does not use. `TaskConfig` flattens its
/// source, which serde cannot combine with `deny_unknown_fields`; a key is known when it comes
/// back out of the parsed task.
fn unknown_task_keys(table: &toml::Table, task: &TaskConfig) -> Vec<String> {
    let known = serde_json::to_value(task).unwrap_or_default();
    table
        .keys()
        .filter(|k| known.get(k.as_str()).is_none() && !OPTIONAL_TASK_KEYS.contains(&k.as_str()))
        .cloned()
        .collect()
}

/// The first value that appears twice.
fn first_duplicate<T: PartialEq + Clone>(items: &[T]) -> Option<T> {
    items
        .iter()
        .enumerate()
        .find(|(i, x)| items[..*i].contains(x))
        .map(|(_, x)| x.clone())
}

impl Suite {
    /// Reads a suite file.
    pub fn from_file(path: &Path) -> Result<Self, HarnessError> {
        let text = std::fs::read_to_string(path).map_err(|source| HarnessError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses suite text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, HarnessError> {
        let err = |line: Option<usize>, msg: String| HarnessError::Suite {
            origin: origin.to_string(),
            line,
            message: msg,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
            err(line, e.message().to_string())
        })?;
        let mut tasks: Vec<TaskConfig> = Vec::new();
        for (i, table) in raw.tasks.iter().enumerate() {
            let name = table.get("name").and_then(|v| v.as_str()).unwrap_or("");
            let at =
                line_of(text, &format!("\"{name}\"")).or_else(|| line_of_nth(text, "[[tasks]]", i));
            let mut task: TaskConfig =
                toml::Value::Table(table.clone())
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        let which = match name {
                            "" => format!("task {}", i + 1),
                            n => format!("task `{n}`"),
                        };
                        err(at, format!("{which}: {}", e.message()))
                    })?;
            if let TaskSource::Tsv(spec) = &mut task.source {
                spec.name = task.name.clone();
            }
            if let Some(key) = unknown_task_keys(table, &task).first() {
                return Err(err(
                    line_of(
                        &text[text.find(&format!("\"{name}\"")).unwrap_or(0)..],
                        &format!("{key} ="),
                    )
                    .map(|l| l + at.unwrap_or(1) - 1)
                    .or(at),
                    format!("task `{}`: unknown key `{key}`", task.name),
                ));
            }
            let problem = if task.max_len == 0 {
                Some("max_len must be at least 1".to_string())
            } else if task.train_limit == Some(0) || task.dev_limit == Some(0) {
                Some("train_limit and dev_limit must be at least 1 where set".to_string())
            } else if task.eval_every == Some(0) {
                Some("eval_every must be at least 1 where set (0 evaluates only at the end: leave it out)".to_string())
            } else {
                match &task.source {
                    TaskSource::Alpaca { dev_fraction, .. }
                    | TaskSource::Preference { dev_fraction, .. }
                        if !(*dev_fraction > 0.0 && *dev_fraction < 1.0) =>
                    {
                        Some(format!(
                            "dev_fraction must be in (0, 1), got {dev_fraction}"
                        ))
                    }
                    _ => None,
                }
            };
            if let Some(message) = problem {
                return Err(err(at, format!("task `{}`: {message}", task.name)));
            }
            tasks.push(task);
        }
        let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
        if let Some(dup) = first_duplicate(&names) {
            return Err(err(
                line_of_nth(text, &format!("\"{dup}\""), 1),
                format!("two tasks are named `{dup}`: run ids and records would collide"),
            ));
        }
        let mut methods = Vec::new();
        for (name, value) in &raw.methods {
            let header = format!("[methods.{name}]");
            let line = line_of(text, &header).or_else(|| line_of(text, name));
            // The line of `key =` within this method's table, else the table's own line.
            let key_line = |key: &str| {
                line_of(
                    &text[text.find(&header).unwrap_or(0)..],
                    &format!("{key} ="),
                )
                .map(|l| l + line.unwrap_or(1) - 1)
                .or(line)
            };
            let toml::Value::Table(table) = value else {
                return Err(err(line, format!("methods.{name} must be a table")));
            };
            let mut optim = toml::Table::new();
            let mut cfg = toml::Table::new();
            for (k, v) in table {
                if OPTIM_KEYS.contains(&k.as_str()) {
                    optim.insert(k.clone(), v.clone());
                } else {
                    cfg.insert(k.clone(), v.clone());
                }
            }
            if !optim.contains_key("lr") {
                return Err(err(
                    line,
                    format!(
                        "methods.{name}: missing key `lr` (each method sets its own learning rate)"
                    ),
                ));
            }
            let optim: OptimConfig =
                toml::Value::Table(optim)
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        err(line, format!("methods.{name}: {}", e.message()))
                    })?;
            if let Err((key, message)) = optim.validate() {
                return Err(err(key_line(key), format!("methods.{name}: {message}")));
            }
            cfg.insert("method".into(), toml::Value::String(name.clone()));
            let method: MethodConfig =
                toml::Value::Table(cfg.clone())
                    .try_into()
                    .map_err(|e: toml::de::Error| {
                        // Name the offending key: re-check each one alone against the method's defaults.
                        let key = cfg.keys().find(|k| {
                            let mut one = toml::Table::new();
                            one.insert("method".into(), toml::Value::String(name.clone()));
                            one.insert((*k).clone(), cfg[*k].clone());
                            k.as_str() != "method"
                                && toml::Value::Table(one).try_into::<MethodConfig>().is_err()
                        });
                        let at = key.map_or(String::new(), |k| format!(" key `{k}`:"));
                        let line = key.map_or(line, |k| key_line(k));
                        err(line, format!("methods.{name}:{at} {}", e.message()))
                    })?;
            methods.push((method, optim));
        }
        for m in &raw.random_init_controls {
            if !methods.iter().any(|(c, _)| c.name() == m) {
                return Err(err(
                    line_of(text, "random_init_controls"),
                    format!("random_init_controls names `{m}`, which is not among the methods"),
                ));
            }
        }
        if methods.is_empty() {
            return Err(err(None, "no [methods.*] tables".into()));
        }
        if raw.budgets.is_empty() {
            return Err(err(
                line_of(text, "budgets"),
                "budgets is empty: the grid would have no parameter-efficient runs (leave it out for the methods' own sizes)".into(),
            ));
        }
        for b in &raw.budgets {
            Budget::parse(b).map_err(|m| err(line_of(text, "budgets"), m))?;
        }
        if let Some(dup) = first_duplicate(&raw.budgets) {
            return Err(err(
                line_of(text, "budgets"),
                format!("budget `{dup}` is listed twice"),
            ));
        }
        if let Some(dup) = first_duplicate(&raw.seeds) {
            return Err(err(
                line_of(text, "seeds"),
                format!("seed {dup} is listed twice: its runs would share one run id"),
            ));
        }
        if !(raw.max_budget_deviation.is_finite() && raw.max_budget_deviation >= 0.0) {
            return Err(err(
                line_of(text, "max_budget_deviation"),
                format!(
                    "max_budget_deviation must be a finite number >= 0, got {}",
                    raw.max_budget_deviation
                ),
            ));
        }
        for (key, value) in [
            ("batch_size", raw.train.batch_size),
            ("eval_batch_size", raw.train.eval_batch_size),
        ] {
            if value == 0 {
                return Err(err(
                    line_of(text, &format!("{key} =")),
                    format!("train.{key} must be at least 1"),
                ));
            }
        }
        if raw.train.validation_size == Some(0) {
            return Err(err(
                line_of(text, "validation_size ="),
                "train.validation_size must be at least 1".into(),
            ));
        }
        if raw.train.validation_size.is_some() && raw.train.selection == Selection::Final {
            return Err(err(
                line_of(text, "validation_size ="),
                "train.validation_size is set but train.selection is not \"best_on_validation\""
                    .into(),
            ));
        }
        if let Some(t) = tasks.iter().find(|t| t.steps == Some(0)) {
            return Err(err(
                line_of(text, &format!("\"{}\"", t.name)),
                format!("task `{}`: steps must be > 0", t.name),
            ));
        }
        for t in &tasks {
            for (m, &lr) in &t.lr {
                let at = line_of(text, &format!("\"{}\"", t.name));
                if !methods.iter().any(|(c, _)| c.name() == m) {
                    return Err(err(
                        at,
                        format!(
                            "task `{}`: lr names `{m}`, which is not among the methods",
                            t.name
                        ),
                    ));
                }
                if !(lr.is_finite() && lr > 0.0) {
                    return Err(err(
                        at,
                        format!(
                            "task `{}`: lr for `{m}` must be a positive number, got {lr}",
                            t.name
                        ),
                    ));
                }
            }
        }
        if raw.seeds.is_empty() || tasks.is_empty() || raw.train.steps == 0 {
            return Err(err(
                None,
                "a suite needs seeds, tasks and train.steps > 0".into(),
            ));
        }
        if let Some(d) = &raw.device {
            // Only the spelling is checked here: a CUDA device is opened when the suite runs,
            // where `--device` may still override it.
            let known = d == "cpu"
                || d == "cuda"
                || d.strip_prefix("cuda:")
                    .is_some_and(|n| n.parse::<usize>().is_ok());
            if !known {
                return Err(err(
                    line_of(text, "device"),
                    format!("device `{d}`: expected `cpu`, `cuda` or `cuda:N`"),
                ));
            }
        }
        Ok(Self {
            name: raw.name,
            model: raw.model,
            seeds: raw.seeds,
            budgets: raw.budgets,
            max_budget_deviation: raw.max_budget_deviation,
            train: raw.train,
            methods,
            tasks,
            data_root: raw.data_root,
            random_init_controls: raw.random_init_controls,
            analyses: {
                let mut a = raw.analyses;
                a.dedup();
                a
            },
            device: raw.device,
        })
    }

    /// Refuses, before any run costs compute, what the base model makes impossible: a method
    /// configuration invalid at every size, or a causal-LM task on a bidirectional encoder.
    pub fn check_against(
        &self,
        model: &ModelConfig,
        tasks: &HashMap<String, TaskData>,
    ) -> Result<(), HarnessError> {
        for (method, _) in &self.methods {
            check_method(method, model).map_err(|e| {
                HarnessError::Config(format!(
                    "suite {}: methods.{}: {e}",
                    self.name,
                    method.name()
                ))
            })?;
        }
        for t in &self.tasks {
            let causal = tasks
                .get(&t.name)
                .is_some_and(|d| d.objective == Objective::CausalLm);
            if causal && !model.is_causal() {
                return Err(HarnessError::Config(format!(
                    "suite {}: {}",
                    self.name,
                    causal_lm_on_encoder(&t.name, &self.model)
                )));
            }
        }
        Ok(())
    }

    /// The suite's training settings with the task's overrides applied.
    pub fn train_for(&self, task: &TaskConfig) -> TrainConfig {
        let mut train = self.train.clone();
        if let Some(steps) = task.steps {
            train.steps = steps;
        }
        if let Some(every) = task.eval_every {
            train.eval_every = every;
        }
        train
    }

    /// Every run of the suite, in a stable order. Full fine-tuning and the head-only control
    /// ignore budgets: they are reference rows and run once per task and seed.
    pub fn runs(&self) -> Vec<RunSpec> {
        let mut out = Vec::new();
        for task in &self.tasks {
            for (method, optim) in &self.methods {
                let fixed = method.fixed_budget();
                let budgets: Vec<String> = match fixed {
                    Some(label) => vec![label.into()],
                    None => self.budgets.clone(),
                };
                for label in &budgets {
                    let budget = if fixed.is_some() {
                        Budget::Default
                    } else {
                        Budget::parse(label).expect("checked at parse")
                    };
                    let control = self.random_init_controls.iter().any(|m| m == method.name());
                    for (&seed, random_init) in self.seeds.iter().flat_map(|s| {
                        std::iter::once((s, false)).chain(control.then_some((s, true)))
                    }) {
                        out.push(RunSpec {
                            random_init,
                            suite: self.name.clone(),
                            task: task.name.clone(),
                            task_config: task.clone(),
                            model: self.model.clone(),
                            method: method.clone(),
                            optim: OptimConfig {
                                lr: task.lr.get(method.name()).copied().unwrap_or(optim.lr),
                                ..optim.clone()
                            },
                            budget_label: label.clone(),
                            budget: budget.clone(),
                            max_budget_deviation: self.max_budget_deviation,
                            seed,
                            train: self.train_for(task),
                            analyses: self.analyses.clone(),
                        });
                    }
                }
            }
        }
        out
    }
}
