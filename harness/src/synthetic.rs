//! The embedded default suite: a generated language, a decoder pretrained on it (cached after
//! the first run), and classification, SFT and reward tasks derived from it. It needs no files.
//!
//! Words carry a hidden polarity (positive / negative). Pretraining text shows every adjective
//! in sentences whose verbs and other adjectives share its polarity, and states every antonym
//! pair. Each downstream task labels only half of the adjectives and is evaluated on the other
//! half, so a model can only generalise through what pretraining taught it: that is what makes
//! the pretrained base beat the same architecture from random initialisation.

use crate::data::Example;
use crate::objective::Objective;
use crate::optim::{Decay, OptimConfig};
use crate::pretrain::{pretrain, PretrainConfig};
use crate::task::TaskData;
use crate::train::Base;
use crate::HarnessError;
use candle_core::Device;
use peftbench_backbone::{
    load_model_dir, save_model_dir, Initializer, ModelConfig, TextTokenizer, Transformer,
};
use std::path::{Path, PathBuf};

const NOUNS: [&str; 12] = [
    "cat", "dog", "bird", "tree", "house", "river", "child", "horse", "ship", "road", "garden",
    "lamp",
];
const POS_ADJ: [&str; 12] = [
    "bright", "kind", "warm", "calm", "brave", "sweet", "clean", "gentle", "happy", "rich",
    "fresh", "proud",
];
const NEG_ADJ: [&str; 12] = [
    "dark", "cruel", "cold", "wild", "timid", "bitter", "dirty", "harsh", "sad", "poor", "stale",
    "humble",
];
const POS_VERB: [&str; 6] = ["loves", "helps", "greets", "feeds", "praises", "saves"];
const NEG_VERB: [&str; 6] = ["hates", "hurts", "scares", "bites", "mocks", "robs"];
const FUNCTION: [&str; 7] = ["the", "is", "of", "opposite", ".", "review", ":"];
const SPECIALS: [&str; 3] = ["[PAD]", "[UNK]", "</s>"];

/// Adjectives with index below this are seen in task training data; the rest only in dev.
const SEEN: usize = 6;

/// The language's vocabulary in id order.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v: Vec<&str> = SPECIALS.to_vec();
    for list in [
        &FUNCTION[..],
        &NOUNS,
        &POS_ADJ,
        &NEG_ADJ,
        &POS_VERB,
        &NEG_VERB,
    ] {
        v.extend_from_slice(list);
    }
    v
}

/// A word-level `tokenizer.json` for the language (whitespace split, `[UNK]` for the rest).
pub fn tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = vocabulary()
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), (i as u64).into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

struct Gen {
    rng: Initializer,
}

impl Gen {
    fn pick<'a>(&mut self, list: &[&'a str]) -> &'a str {
        list[self.rng.index(list.len())]
    }
    fn index_in(&mut self, range: std::ops::Range<usize>) -> usize {
        range.start + self.rng.index(range.len())
    }
    fn words(positive: bool) -> (&'static [&'static str; 12], &'static [&'static str; 6]) {
        if positive {
            (&POS_ADJ, &POS_VERB)
        } else {
            (&NEG_ADJ, &NEG_VERB)
        }
    }
    /// A pretraining sentence: one polarity throughout, with 10% of words flipped as noise.
    fn mood_sentence(&mut self) -> String {
        let mood = self.rng.unit() < 0.5;
        let mut w = |kind: usize| -> String {
            let m = if self.rng.unit() < 0.1 { !mood } else { mood };
            let (adjs, verbs) = Self::words(m);
            if kind == 0 {
                self.pick(adjs).to_string()
            } else {
                self.pick(verbs).to_string()
            }
        };
        let (a1, v, a2) = (w(0), w(1), w(0));
        format!(
            "the {a1} {} {v} the {a2} {} .",
            self.pick(&NOUNS),
            self.pick(&NOUNS)
        )
    }
}

/// The pretraining corpus: polarity sentences and antonym statements.
pub fn pretraining_corpus(n: usize, seed: u64) -> Vec<String> {
    let mut g = Gen {
        rng: Initializer::new(seed),
    };
    (0..n)
        .map(|_| {
            if g.rng.unit() < 0.2 {
                let i = g.rng.index(POS_ADJ.len());
                if g.rng.unit() < 0.5 {
                    format!("{} is the opposite of {} .", POS_ADJ[i], NEG_ADJ[i])
                } else {
                    format!("{} is the opposite of {} .", NEG_ADJ[i], POS_ADJ[i])
                }
            } else {
                g.mood_sentence()
            }
        })
        .collect()
}

/// The base model's shape: a small Llama-style decoder.
pub fn base_config() -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "llama", "vocab_size": vocabulary().len(), "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": true, "pad_token_id": 0
    });
    ModelConfig::from_json(&v, Path::new("synthetic/config.json"))
        .expect("built-in config is valid")
}

/// Where the pretrained base is cached.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PEFTBENCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/peftbench")))
        .unwrap_or_else(|| PathBuf::from(".peftbench-cache"))
        .join("synthetic-base-v1")
}

fn encode(tok: &TextTokenizer, s: &str) -> Result<Vec<u32>, HarnessError> {
    let mut ids = tok.encode_ids(s, false)?;
    ids.push(tok.eos_id().unwrap_or(2));
    Ok(ids)
}

/// Loads the cached pretrained base, pretraining and saving it first if absent. Returns the
/// base and the pretraining loss (first tenth, last tenth) when it was trained now.
pub fn pretrained_base(dir: &Path) -> Result<(Base, Option<(f64, f64)>), HarnessError> {
    let tok_path = dir.join("tokenizer.json");
    let mut trained = None;
    let io = |source| HarnessError::Io {
        path: dir.to_path_buf(),
        source,
    };
    // Array tasks starting together pretrain once: the first holds the lock, the rest wait and
    // then load what it saved.
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io)?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.with_extension("lock"))
        .map_err(io)?;
    lock.lock().map_err(io)?;
    if !dir.join("model.safetensors").exists() {
        std::fs::create_dir_all(dir).map_err(|source| HarnessError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        std::fs::write(&tok_path, tokenizer_json()).map_err(|source| HarnessError::Io {
            path: tok_path.clone(),
            source,
        })?;
        let tok = TextTokenizer::from_file(&tok_path, 64)?;
        let corpus: Vec<Vec<u32>> = pretraining_corpus(6000, 7)
            .iter()
            .map(|s| encode(&tok, s))
            .collect::<Result<_, _>>()?;
        let mut model = Transformer::random(base_config(), 7, &Device::Cpu)?;
        let cfg = PretrainConfig {
            steps: 2000,
            batch_size: 32,
            optim: OptimConfig {
                lr: 3e-3,
                warmup_ratio: 0.05,
                decay: Decay::Cosine,
                weight_decay: 0.01,
                ..Default::default()
            },
            seed: 7,
        };
        trained = Some(pretrain(&mut model, &corpus, tok.pad_id, &cfg)?);
        // Written to a temporary folder first so an interrupted pretraining leaves no cache.
        let tmp = dir.with_extension("tmp");
        save_model_dir(&model, &tmp)?;
        std::fs::rename(tmp.join("model.safetensors"), dir.join("model.safetensors")).map_err(
            |source| HarnessError::Io {
                path: dir.to_path_buf(),
                source,
            },
        )?;
        std::fs::rename(tmp.join("config.json"), dir.join("config.json")).map_err(|source| {
            HarnessError::Io {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        let _ = std::fs::remove_dir_all(&tmp);
    }
    lock.unlock().map_err(io)?;
    let model = load_model_dir(dir, &Device::Cpu)?;
    let tokenizer = TextTokenizer::from_file(&tok_path, 64)?;
    Ok((Base { model, tokenizer }, trained))
}

/// The same architecture from random initialisation (the control for pretraining).
pub fn random_base(pretrained: &Base, seed: u64) -> Result<Base, HarnessError> {
    Ok(Base {
        model: Transformer::random(pretrained.model.config.clone(), seed, &Device::Cpu)?,
        tokenizer: TextTokenizer::from_file(&cache_dir().join("tokenizer.json"), 64)?,
    })
}

/// Builds one synthetic task: `classification`, `sft` or `reward`.
pub fn task(
    objective: &str,
    tok: &TextTokenizer,
    n_train: usize,
    n_dev: usize,
    seed: u64,
) -> Result<TaskData, HarnessError> {
    let mut g = Gen {
        rng: Initializer::new(seed),
    };
    let mut make = |seen: bool| -> Result<Example, HarnessError> {
        let range = if seen { 0..SEEN } else { SEEN..POS_ADJ.len() };
        let positive = g.rng.unit() < 0.5;
        let i = g.index_in(range.clone());
        let (adjs, verbs) = Gen::words(positive);
        Ok(match objective {
            "classification" => {
                let text = format!("review : the {} is {} .", g.pick(&NOUNS), adjs[i]);
                let mut ids = tok.encode_ids(&text, false)?;
                ids.push(tok.eos_id().unwrap_or(2));
                Example::Text {
                    types: vec![0; ids.len()],
                    ids,
                    target: crate::data::Target::Class(positive as usize),
                }
            }
            "sft" => {
                let (from, to) = if positive {
                    (POS_ADJ[i], NEG_ADJ[i])
                } else {
                    (NEG_ADJ[i], POS_ADJ[i])
                };
                // The pretraining text states "X is the opposite of Y ."; the task asks for Y.
                let prompt = tok.encode_ids(&format!("{from} is the opposite of"), false)?;
                let response = encode(tok, &format!("{to} ."))?;
                let mut ids = prompt.clone();
                ids.extend(&response);
                Example::Lm {
                    ids,
                    response_start: prompt.len(),
                }
            }
            "reward" => {
                let (other_adjs, other_verbs) = Gen::words(!positive);
                let noun = g.pick(&NOUNS);
                let prompt = format!("the {} {noun}", adjs[i]);
                let j = g.index_in(range.clone());
                let chosen = format!(
                    "{prompt} {} the {} {} .",
                    g.pick(verbs),
                    adjs[j],
                    g.pick(&NOUNS)
                );
                let rejected = format!(
                    "{prompt} {} the {} {} .",
                    g.pick(other_verbs),
                    other_adjs[j],
                    g.pick(&NOUNS)
                );
                Example::Pair {
                    chosen: encode(tok, &chosen)?,
                    rejected: encode(tok, &rejected)?,
                }
            }
            other => {
                return Err(HarnessError::Config(format!(
                    "unknown synthetic objective `{other}` (classification, sft, reward)"
                )))
            }
        })
    };
    let train = (0..n_train)
        .map(|_| make(true))
        .collect::<Result<Vec<_>, _>>()?;
    let dev = (0..n_dev)
        .map(|_| make(false))
        .collect::<Result<Vec<_>, _>>()?;
    let objective = match objective {
        "classification" => Objective::Classification {
            num_labels: 2,
            metric: peftbench_datasets::GlueMetric::Accuracy,
        },
        "sft" => Objective::CausalLm,
        _ => Objective::Reward,
    };
    Ok(TaskData {
        name: String::new(),
        objective,
        train,
        dev,
        skipped_rows: 0,
        pooling: None,
    })
}
