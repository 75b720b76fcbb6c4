//! Tasks described by data: where the examples come from, how long they may be, how many to
//! use. Loading tokenises them for the model at hand.

use crate::data::{clip_left, Example, Target};
use crate::objective::Objective;
use crate::HarnessError;
use peftbench_backbone::{Pooling, TextTokenizer};
use peftbench_datasets::{
    load_alpaca, load_preferences, load_text_task, subset, Label, LoadOptions, Split, TextTaskSpec,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where a task's examples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskSource {
    /// A built-in GLUE task (sst2, rte, cola, stsb) under the data root's `glue/`.
    Glue {
        /// GLUE task name.
        glue_task: String,
    },
    /// Any GLUE-style TSV task, declared in full.
    Tsv(TextTaskSpec),
    /// Alpaca-format instruction data (SFT).
    Alpaca {
        /// The JSON file (relative paths are under the data root).
        path: PathBuf,
        /// Fraction held out for dev.
        #[serde(default = "d_dev_fraction")]
        dev_fraction: f64,
        /// Lay each example out with the model's own chat template (the instruction, and its
        /// input, as the user's turn; the output as the assistant's) instead of the Alpaca
        /// prompt, with the loss on the assistant's tokens (its end-of-turn included), as
        /// TRL's assistant-only loss.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chat_template: bool,
    },
    /// prompt / chosen / rejected JSONL (reward modelling).
    Preference {
        /// The JSONL file (relative paths are under the data root).
        path: PathBuf,
        /// Fraction held out for dev.
        #[serde(default = "d_dev_fraction")]
        dev_fraction: f64,
        /// Render each HH-RLHF conversation (`Human:` / `Assistant:` turns, the chosen or
        /// rejected reply last) with the model's chat template instead of scoring the raw text.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        chat_template: bool,
    },
    /// A task of the embedded synthetic suite.
    Synthetic {
        /// classification, sft or reward.
        objective: String,
    },
}

impl TaskSource {
    /// Whether examples are laid out with the model's chat template.
    pub fn uses_chat_template(&self) -> bool {
        matches!(
            self,
            TaskSource::Alpaca {
                chat_template: true,
                ..
            } | TaskSource::Preference {
                chat_template: true,
                ..
            }
        )
    }
}

/// The tokenizer's chat template when the task asks for one; an error when it asks and the
/// model has none.
fn chat_template_of<'a>(
    cfg: &TaskConfig,
    tok: &'a TextTokenizer,
    wanted: bool,
) -> Result<Option<&'a peftbench_backbone::chat::ChatTemplate>, HarnessError> {
    match (wanted, &tok.chat_template) {
        (false, _) => Ok(None),
        (true, Some(t)) => Ok(Some(t)),
        (true, None) => Err(HarnessError::Config(format!(
            "task `{}`: chat_template = true, but the model's tokenizer carries no chat template",
            cfg.name
        ))),
    }
}

fn d_dev_fraction() -> f64 {
    0.1
}

/// A task as a suite declares it. (Unknown keys cannot be rejected here: serde's `flatten`
/// of the source does not combine with `deny_unknown_fields`.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskConfig {
    /// Name used in run ids and reports.
    pub name: String,
    /// Data source.
    #[serde(flatten)]
    pub source: TaskSource,
    /// Use at most this many training examples (a seeded subset).
    #[serde(default)]
    pub train_limit: Option<usize>,
    /// Use at most this many dev examples (a seeded subset).
    #[serde(default)]
    pub dev_limit: Option<usize>,
    /// Longest tokenised example.
    #[serde(default = "d_max_len")]
    pub max_len: usize,
    /// Skip and count malformed rows instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,
    /// How the sequence head summarises a sequence (`first`, `last_token`, `mean`). Unset:
    /// Hugging Face's choice (the pooled first token for encoders, the last token for decoders
    /// and reward models). `mean` suits sentence-embedding encoders such as all-MiniLM-L6-v2,
    /// which were trained with mean pooling and whose first-token pooler was never tuned; the
    /// mean leaves out input-prefix (virtual token) positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// Training steps for this task, overriding the suite's `[train] steps` (small or hard
    /// tasks such as RTE need more updates than large easy ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Evaluation interval for this task, overriding the suite's `[train] eval_every`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<usize>,
    /// Learning rates for this task by method name, overriding that method's `lr`
    /// (`lr = { lora = 1e-3 }`): a step size that suits a short task can wreck a long one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub lr: BTreeMap<String, f64>,
    /// Greedy generations on the first dev prompts of an SFT task, scored with ROUGE-L
    /// against the references (before training and after) and shown in the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateConfig>,
}

/// How many dev prompts an SFT task generates for, and how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    /// Dev examples to generate for (the first ones, in the task's dev order).
    pub examples: usize,
    /// Most new tokens per generation (decoding also stops at EOS).
    pub max_new_tokens: usize,
    /// Generations kept in the record and shown in the report.
    #[serde(default = "d_show")]
    pub show: usize,
}

fn d_show() -> usize {
    3
}

fn d_max_len() -> usize {
    128
}

/// A task's tokenised examples.
#[derive(Debug, Clone)]
pub struct TaskData {
    /// Task name.
    pub name: String,
    /// What it trains for.
    pub objective: Objective,
    /// Training examples.
    pub train: Vec<Example>,
    /// Dev examples.
    pub dev: Vec<Example>,
    /// Rows skipped as malformed.
    pub skipped_rows: usize,
    /// The head's pooling, where the task overrides the default.
    pub pooling: Option<Pooling>,
}

/// Subset seed: the data subset is the same for every run of a suite.
const SUBSET_SEED: u64 = 0x5eed;

fn limit<T: Clone>(v: Vec<T>, n: Option<usize>) -> Vec<T> {
    match n {
        Some(n) if n < v.len() => subset(&v, n, SUBSET_SEED),
        _ => v,
    }
}

fn resolve(path: &Path, root: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    }
}

fn split_dev<T: Clone>(all: Vec<T>, fraction: f64) -> (Vec<T>, Vec<T>) {
    let shuffled = subset(&all, all.len(), SUBSET_SEED);
    let n_dev = ((shuffled.len() as f64 * fraction).round() as usize)
        .clamp(1, shuffled.len().saturating_sub(1).max(1));
    let (dev, train) = shuffled.split_at(n_dev.min(shuffled.len()));
    (train.to_vec(), dev.to_vec())
}

/// Token ids of `text` with a trailing end-of-sequence token where the tokenizer has one.
fn with_eos(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>, HarnessError> {
    let mut ids = tok.encode_ids(text, false)?;
    if let Some(eos) = tok.eos_id() {
        ids.push(eos);
    }
    Ok(ids)
}

/// Loads and tokenises a real-data task (synthetic tasks are built by [`crate::synthetic`]).
pub fn load_task(
    cfg: &TaskConfig,
    tok: &TextTokenizer,
    data_root: &Path,
) -> Result<TaskData, HarnessError> {
    let opts = LoadOptions {
        skip_bad_rows: cfg.skip_bad_rows,
        limit: None,
    };
    match &cfg.source {
        TaskSource::Glue { .. } | TaskSource::Tsv(_) => {
            let spec = match &cfg.source {
                TaskSource::Glue { glue_task } => {
                    TextTaskSpec::glue(glue_task, &data_root.join("glue")).ok_or_else(|| {
                        HarnessError::Config(format!(
                            "task `{}`: unknown GLUE task `{glue_task}` (sst2, rte, cola, stsb)",
                            cfg.name
                        ))
                    })?
                }
                TaskSource::Tsv(spec) => spec.clone().with_root(data_root),
                _ => unreachable!(),
            };
            let objective = match spec.num_classes() {
                Some(n) => Objective::Classification {
                    num_labels: n,
                    metric: spec.metric(),
                },
                None => Objective::Regression,
            };
            let encode = |split| -> Result<(Vec<Example>, usize), HarnessError> {
                let loaded = load_text_task(&spec, split, &opts)?;
                let rows = limit(
                    loaded.examples,
                    if split == Split::Train {
                        cfg.train_limit
                    } else {
                        cfg.dev_limit
                    },
                );
                let mut out = Vec::with_capacity(rows.len());
                for chunk in rows.chunks(256) {
                    let pairs: Vec<(&str, Option<&str>)> = chunk
                        .iter()
                        .map(|e| (e.text_a.as_str(), e.text_b.as_deref()))
                        .collect();
                    let enc = tok.encode_pairs(&pairs)?;
                    for (e, (ids, types)) in chunk.iter().zip(enc) {
                        let target = match e.label {
                            Label::Class(c) => Target::Class(c),
                            Label::Score(s) => Target::Score(s),
                        };
                        out.push(Example::Text { ids, types, target });
                    }
                }
                Ok((out, loaded.skipped.len()))
            };
            let (train, s1) = encode(Split::Train)?;
            let (dev, s2) = encode(Split::Dev)?;
            Ok(TaskData {
                name: cfg.name.clone(),
                objective,
                train,
                dev,
                skipped_rows: s1 + s2,
                pooling: cfg.pooling,
            })
        }
        TaskSource::Alpaca {
            path,
            dev_fraction,
            chat_template,
        } => {
            let template = chat_template_of(cfg, tok, *chat_template)?;
            let loaded = load_alpaca(&resolve(path, data_root), &opts)?;
            let (train, dev) = split_dev(loaded.examples, *dev_fraction);
            let encode = |rows: Vec<peftbench_datasets::InstructionExample>| -> Result<Vec<Example>, HarnessError> {
                rows.iter()
                    .map(|e| {
                        let (prompt, response) = match template {
                            Some(t) => {
                                let user = match e.input.as_str() {
                                    "" => e.instruction.clone(),
                                    input => format!("{}\n\n{input}", e.instruction),
                                };
                                let (p, reply) = t.prompt_and_reply(&user, &e.response())?;
                                // The template's end-of-turn closes the reply: no EOS added.
                                (tok.encode_ids(&p, false)?, tok.encode_ids(&reply, false)?)
                            }
                            None => (
                                tok.encode_ids(&e.prompt(), false)?,
                                with_eos(tok, &e.response())?,
                            ),
                        };
                        let mut ids = prompt.clone();
                        ids.extend(&response);
                        let keep = clip_left(&ids, cfg.max_len);
                        let response_start = keep.len().saturating_sub(response.len()).max(1);
                        Ok(Example::Lm { ids: keep, response_start })
                    })
                    .collect()
            };
            Ok(TaskData {
                name: cfg.name.clone(),
                objective: Objective::CausalLm,
                train: encode(limit(train, cfg.train_limit))?,
                dev: encode(limit(dev, cfg.dev_limit))?,
                skipped_rows: loaded.skipped.len(),
                pooling: cfg.pooling,
            })
        }
        TaskSource::Preference {
            path,
            dev_fraction,
            chat_template,
        } => {
            let template = chat_template_of(cfg, tok, *chat_template)?;
            let file = resolve(path, data_root);
            let mut loaded = load_preferences(&file, &opts)?;
            let mut skipped = loaded.skipped.len();
            if template.is_some() {
                // A conversation that is not alternating Human/Assistant turns has no rendering.
                let before = loaded.examples.len();
                loaded.examples.retain(|p| {
                    p.hh_turns(&p.chosen).is_some() && p.hh_turns(&p.rejected).is_some()
                });
                let dropped = before - loaded.examples.len();
                if dropped > 0 && !cfg.skip_bad_rows {
                    return Err(HarnessError::Config(format!(
                        "{}: {dropped} pairs are not alternating `\\n\\nHuman:` / `\\n\\nAssistant:` turns ending in an open assistant turn, so the chat template cannot render them (skip_bad_rows = true leaves them out)",
                        file.display()
                    )));
                }
                skipped += dropped;
            }
            let (train, dev) = split_dev(loaded.examples, *dev_fraction);
            let encode = |rows: Vec<peftbench_datasets::PreferencePair>| -> Result<Vec<Example>, HarnessError> {
                rows.iter()
                    .map(|p| {
                        let side = |resp: &str| -> Result<Vec<u32>, HarnessError> {
                            let ids = match template {
                                Some(t) => {
                                    let turns = p.hh_turns(resp).ok_or_else(|| HarnessError::Config(format!(
                                        "{}: a prompt that is not `\\n\\nHuman: … \\n\\nAssistant:` text cannot be rendered with the chat template: {:?}",
                                        file.display(),
                                        p.prompt.chars().take(60).collect::<String>()
                                    )))?;
                                    let messages: Vec<peftbench_backbone::chat::Message> = turns
                                        .iter()
                                        .map(|(role, text)| peftbench_backbone::chat::Message::new(role, text))
                                        .collect();
                                    tok.encode_ids(&t.render(&messages, false)?, false)?
                                }
                                None => tok.encode_ids(&format!("{}{}", p.prompt, resp), true)?,
                            };
                            Ok(clip_left(&ids, cfg.max_len))
                        };
                        Ok(Example::Pair { chosen: side(&p.chosen)?, rejected: side(&p.rejected)? })
                    })
                    .collect()
            };
            Ok(TaskData {
                name: cfg.name.clone(),
                objective: Objective::Reward,
                train: encode(limit(train, cfg.train_limit))?,
                dev: encode(limit(dev, cfg.dev_limit))?,
                skipped_rows: skipped,
                pooling: cfg.pooling,
            })
        }
        TaskSource::Synthetic { .. } => Err(HarnessError::Config(format!(
            "task `{}` is synthetic: build it with the synthetic suite",
            cfg.name
        ))),
    }
}
