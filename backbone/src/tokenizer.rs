//! Text to padded id batches through a Hugging Face `tokenizer.json`.

use crate::chat::ChatTemplate;
use crate::error::{BackboneError, Result};
use crate::model::Inputs;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use tokenizers::{EncodeInput, Tokenizer};

/// The chat template of `tokenizer_config.json` beside `tokenizer.json`, if there is one: a
/// string, or the entry named `default` of a list of `{name, template}`.
fn chat_template_beside(tokenizer: &Path) -> Result<Option<ChatTemplate>> {
    let path = tokenizer.with_file_name("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let err = |message: String| BackboneError::Tokenizer {
        path: path.clone(),
        message,
    };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let source = match &v["chat_template"] {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(list) => match list.iter().find(|t| t["name"] == "default") {
            Some(t) => t["template"].as_str().unwrap_or_default().to_string(),
            None => {
                return Err(err(
                    "`chat_template` is a list without a `default` entry".into()
                ))
            }
        },
        _ => return Err(err("`chat_template` is neither a string nor a list".into())),
    };
    // A special token is written as a string or as `{"content": ...}`.
    let token = |key: &str| -> String {
        match &v[key] {
            serde_json::Value::String(s) => s.clone(),
            other => other["content"].as_str().unwrap_or_default().to_string(),
        }
    };
    Ok(Some(ChatTemplate {
        source,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        origin: format!("{}: `chat_template`", path.display()),
    }))
}

/// A loaded tokenizer with the padding id and length cap the harness uses.
pub struct TextTokenizer {
    inner: Tokenizer,
    /// The same tokenizer with longest-first truncation to `max_len`, for over-long inputs.
    truncating: Tokenizer,
    path: PathBuf,
    /// Id written at padding positions.
    pub pad_id: u32,
    /// Longest sequence produced; longer inputs are truncated.
    pub max_len: usize,
    /// The end-of-sequence id where the source says it (a GGUF file's metadata); otherwise
    /// found by the usual token names.
    pub eos: Option<u32>,
    /// The model's chat template, where its files carry one (`tokenizer_config.json`'s
    /// `chat_template`, a GGUF file's `tokenizer.chat_template`).
    pub chat_template: Option<ChatTemplate>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`. Its own padding/truncation settings are dropped (MiniLM's pads
    /// every input to 128): batches are padded to their longest row instead.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let err = |message: String| BackboneError::Tokenizer {
            path: path.to_path_buf(),
            message,
        };
        if !path.exists() {
            return Err(err("file not found".into()));
        }
        let mut inner = Tokenizer::from_file(path).map_err(|e| err(e.to_string()))?;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| inner.token_to_id("[PAD]"))
            .or_else(|| inner.token_to_id("<pad>"))
            .or_else(|| inner.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| err(e.to_string()))?;
        let truncating = truncating(&inner, max_len).map_err(err)?;
        let chat_template = chat_template_beside(path)?;
        // A chat model ends its turns with the template's EOS (`<|im_end|>`), not the
        // vocabulary's first end-of-text token.
        let eos = chat_template
            .as_ref()
            .and_then(|t| inner.token_to_id(&t.eos_token));
        Ok(Self {
            inner,
            truncating,
            path: path.to_path_buf(),
            pad_id,
            max_len,
            eos,
            chat_template,
        })
    }

    /// The tokenizer of a model: `tokenizer.json` in its directory, or the one a `.gguf` file
    /// carries in its metadata.
    pub fn for_model(model: &Path, max_len: usize) -> Result<Self> {
        if crate::gguf::is_gguf(model) {
            crate::gguf::GgufFile::open(model)?.tokenizer(max_len)
        } else {
            Self::from_file(&model.join("tokenizer.json"), max_len)
        }
    }

    /// Wraps a tokenizer built in memory (e.g. one just trained).
    pub fn from_tokenizer(
        inner: Tokenizer,
        path: &Path,
        pad_id: u32,
        max_len: usize,
    ) -> Result<Self> {
        let truncating =
            truncating(&inner, max_len).map_err(|message| BackboneError::Tokenizer {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(Self {
            inner,
            truncating,
            path: path.to_path_buf(),
            pad_id,
            max_len,
            eos: None,
            chat_template: None,
        })
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn err(&self, e: impl std::fmt::Display) -> BackboneError {
        BackboneError::Tokenizer {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Token ids of one text.
    pub fn encode_ids(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The end-of-sequence id, where the vocabulary has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.or_else(|| {
            ["</s>", "<|endoftext|>", "<eos>", "[SEP]"]
                .iter()
                .find_map(|t| self.inner.token_to_id(t))
        })
    }

    /// Encodes texts or pairs with special tokens, truncated to `max_len`, as id and segment
    /// rows (unpadded).
    pub fn encode_pairs(&self, rows: &[(&str, Option<&str>)]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        rows.iter()
            .map(|(a, b)| {
                let input: EncodeInput = match b {
                    Some(b) => (*a, *b).into(),
                    None => (*a).into(),
                };
                let mut enc = self.inner.encode(input, true).map_err(|e| self.err(e))?;
                if enc.len() > self.max_len {
                    enc = self.truncate(a, *b)?;
                }
                Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
            })
            .collect()
    }

    /// Decodes ids back to text.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Encodes single texts or `(text_a, text_b)` pairs with special tokens, truncated to
    /// `max_len` (longest-first) and right-padded to the longest row.
    pub fn encode_batch(&self, rows: &[(&str, Option<&str>)], device: &Device) -> Result<Inputs> {
        let (ids, types): (Vec<_>, Vec<_>) = self.encode_pairs(rows)?.into_iter().unzip();
        pad_rows(&ids, Some(&types), self.pad_id, device)
    }

    fn truncate(&self, a: &str, b: Option<&str>) -> Result<tokenizers::Encoding> {
        let input: EncodeInput = match b {
            Some(b) => (a, b).into(),
            None => a.into(),
        };
        self.truncating.encode(input, true).map_err(|e| self.err(e))
    }
}

fn truncating(inner: &Tokenizer, max_len: usize) -> std::result::Result<Tokenizer, String> {
    let mut t = inner.clone();
    t.with_truncation(Some(tokenizers::TruncationParams {
        max_length: max_len,
        strategy: tokenizers::TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    Ok(t)
}

/// Right-pads id rows into a batch with its attention mask (and segment ids when given).
pub fn pad_rows(
    rows: &[Vec<u32>],
    types: Option<&[Vec<u32>]>,
    pad_id: u32,
    device: &Device,
) -> Result<Inputs> {
    let b = rows.len();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![0u32; b * t];
    let mut tys = vec![0u32; b * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
        mask[i * t..i * t + r.len()].fill(1);
        if let Some(ty) = types {
            tys[i * t..i * t + ty[i].len()].copy_from_slice(&ty[i]);
        }
    }
    Ok(Inputs {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(mask, (b, t), device)?,
        token_type_ids: match types {
            Some(_) => Some(Tensor::from_vec(tys, (b, t), device)?),
            None => None,
        },
        packing: None,
    })
}
