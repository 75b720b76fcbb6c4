//! llama.cpp's GGUF checkpoints: the model config and tokenizer from the file's metadata, and
//! its tensors dequantized to f32 under Hugging Face names, so a `.gguf` file loads like a
//! model directory. Architectures: llama (SmolLM2, Llama 2/3, Mistral-shaped files).

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{BackboneError, Result};
use crate::load::from_weights;
use crate::model::Transformer;
use crate::tokenizer::TextTokenizer;
use crate::weights::WeightFile;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Architectures whose GGUF tensors map onto the backbone.
const ARCHITECTURES: &[&str] = &["llama"];

/// An opened GGUF file: its metadata and tensor index (the data is read on load).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
}

fn err(path: &Path, message: impl Into<String>) -> BackboneError {
    BackboneError::Gguf {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Whether `path` names a GGUF file (by extension; the magic is checked on open).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

impl GgufFile {
    /// Reads the header, metadata and tensor index.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|source| BackboneError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut f)
            .map_err(|e| err(path, format!("not a readable GGUF file: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, or an error naming the key.
    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| err(&self.path, format!("missing metadata `{key}`")))
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| err(&self.path, format!("metadata `{key}`: {e}")))
    }

    fn number(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => f64::from(*x),
            Value::I8(x) => f64::from(*x),
            Value::U16(x) => f64::from(*x),
            Value::I16(x) => f64::from(*x),
            Value::U32(x) => f64::from(*x),
            Value::I32(x) => f64::from(*x),
            Value::U64(x) => *x as f64,
            Value::I64(x) => *x as f64,
            Value::F32(x) => f64::from(*x),
            Value::F64(x) => *x,
            other => {
                return Err(err(
                    &self.path,
                    format!(
                        "metadata `{key}`: expected a number, found {:?}",
                        other.value_type()
                    ),
                ))
            }
        };
        Ok(n)
    }

    fn count(&self, key: &str) -> Result<usize> {
        let n = self.number(key)?;
        if n < 0.0 || n.fract() != 0.0 {
            return Err(err(
                &self.path,
                format!("metadata `{key}`: {n} is not a count"),
            ));
        }
        Ok(n as usize)
    }

    fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.count(key).map(Some),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .get(key)?
            .to_vec()
            .map_err(|e| err(&self.path, format!("metadata `{key}`: {e}")))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| {
                v.to_string()
                    .map(|s| s.as_str())
                    .map_err(|e| err(&self.path, format!("metadata `{key}`[{i}]: {e}")))
            })
            .collect()
    }

    /// `general.architecture`, checked against what the backbone implements.
    pub fn architecture(&self) -> Result<&str> {
        let arch = self.string("general.architecture")?;
        if !ARCHITECTURES.contains(&arch) {
            return Err(err(
                &self.path,
                format!(
                    "metadata `general.architecture`: `{arch}` is not one the backbone loads from GGUF (supported: {})",
                    ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(arch)
    }

    /// The model's shape from `<arch>.*` metadata, as a Hugging Face `config.json` would give it.
    pub fn config(&self) -> Result<ModelConfig> {
        let a = self.architecture()?.to_string();
        let key = |k: &str| format!("{a}.{k}");
        let heads = self.count(&key("attention.head_count"))?;
        let hidden = self.count(&key("embedding_length"))?;
        let vocab = match self.opt_count(&key("vocab_size"))? {
            Some(v) => v,
            None => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        if let Some(rot) = self.opt_count(&key("rope.dimension_count"))? {
            if heads == 0 || rot != hidden / heads {
                return Err(err(
                    &self.path,
                    format!("metadata `{}`: {rot} rotary dimensions, but the backbone rotates whole heads of {}", key("rope.dimension_count"), hidden / heads.max(1)),
                ));
            }
        }
        let v = serde_json::json!({
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "num_hidden_layers": self.count(&key("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.opt_count(&key("attention.head_count_kv"))?.unwrap_or(heads),
            "intermediate_size": self.count(&key("feed_forward_length"))?,
            "max_position_embeddings": self.count(&key("context_length"))?,
            "rms_norm_eps": self.number(&key("attention.layer_norm_rms_epsilon"))?,
            "rope_theta": match self.content.metadata.get(&key("rope.freq_base")) {
                Some(_) => self.number(&key("rope.freq_base"))?,
                None => 10_000.0,
            },
            // llama.cpp leaves `output.weight` out when the head is the embedding.
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "pad_token_id": self.opt_count("tokenizer.ggml.padding_token_id")?,
        });
        ModelConfig::from_json(&v, &self.path)
    }

    /// One tensor, dequantized to f32.
    fn tensor(&self, reader: &mut std::fs::File, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(reader, name, device)
            .map_err(|e| err(&self.path, format!("tensor `{name}`: {e}")))?;
        q.dequantize(device).map_err(|e| {
            err(
                &self.path,
                format!("tensor `{name}` ({:?}): {e}", q.dtype()),
            )
        })
    }

    /// The model, every tensor dequantized to f32 as a frozen tensor.
    pub fn load_model(&self, device: &Device) -> Result<Transformer> {
        let config = self.config()?;
        let mut reader = std::fs::File::open(&self.path).map_err(|source| BackboneError::Io {
            path: self.path.clone(),
            source,
        })?;
        let mut tensors = HashMap::new();
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let t = self.tensor(&mut reader, name, device)?;
            let (hf, t) = match hf_name(name) {
                Some(hf) if name.ends_with("attn_q.weight") => {
                    (hf, unpermute(&t, config.num_heads)?)
                }
                Some(hf) if name.ends_with("attn_k.weight") => {
                    (hf, unpermute(&t, config.num_kv_heads)?)
                }
                Some(hf) => (hf, t),
                // Kept under its own name: the loader reports it as unused.
                None => (name.clone(), t),
            };
            tensors.insert(hf, t);
        }
        let mut w = WeightFile::from_tensors(&self.path, tensors);
        from_weights(config, &mut w)
    }

    /// Puts the file's quantized projection weights into `model` (loaded from this file) in
    /// their GGUF blocks, as a QLoRA-style base keeps them; f32 / f16 tensors stay dense.
    /// Returns how many projections are now quantized.
    pub fn quantize_projections(&self, model: &mut Transformer) -> Result<usize> {
        use crate::intervention::Proj;
        use candle_core::quantized::GgmlDType;
        let mut reader = std::fs::File::open(&self.path).map_err(|source| BackboneError::Io {
            path: self.path.clone(),
            source,
        })?;
        let (heads, kv_heads) = (model.config.num_heads, model.config.num_kv_heads);
        let mut count = 0;
        for layer in 0..model.layers.len() {
            for proj in Proj::ALL {
                let short = match proj {
                    Proj::Query => "attn_q",
                    Proj::Key => "attn_k",
                    Proj::Value => "attn_v",
                    Proj::AttnOut => "attn_output",
                    Proj::Up => "ffn_up",
                    Proj::Gate => "ffn_gate",
                    Proj::Down => "ffn_down",
                };
                let name = format!("blk.{layer}.{short}.weight");
                let Some(lin) = model.layers[layer].proj_mut(proj) else {
                    continue;
                };
                let q = self
                    .content
                    .tensor(&mut reader, &name, &Device::Cpu)
                    .map_err(|e| err(&self.path, format!("tensor `{name}`: {e}")))?;
                if matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    continue;
                }
                let q = match proj {
                    Proj::Query => unpermute_blocks(&q, heads),
                    Proj::Key => unpermute_blocks(&q, kv_heads),
                    _ => Ok(q),
                }
                .map_err(|e| err(&self.path, format!("tensor `{name}`: {e}")))?;
                lin.quantize(q)
                    .map_err(|e| err(&self.path, format!("tensor `{name}`: {e}")))?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// The tokenizer the file carries (`tokenizer.ggml.*`): byte-level BPE from its tokens and
    /// merges, the pre-tokenizer `tokenizer.ggml.pre` names, its control tokens as special.
    pub fn tokenizer(&self, max_len: usize) -> Result<TextTokenizer> {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::digits::Digits;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::PreTokenizerWrapper;
        use tokenizers::processors::template::TemplateProcessing;
        use tokenizers::{AddedToken, Tokenizer};

        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(
                &self.path,
                format!("metadata `tokenizer.ggml.model`: `{model}` is not read here (only `gpt2`, byte-level BPE)"),
            ));
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let merges = self
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        err(
                            &self.path,
                            format!(
                                "metadata `tokenizer.ggml.merges`[{i}]: `{m}` is not two tokens"
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| err(&self.path, format!("tokenizer: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        // llama.cpp's pre-tokenizer names; `smollm` is GPT-2's split after isolating each digit.
        let byte_level = ByteLevel::new(false, true, true);
        let pre = match self.content.metadata.get("tokenizer.ggml.pre") {
            None => "default",
            Some(_) => self.string("tokenizer.ggml.pre")?,
        };
        let pre: PreTokenizerWrapper = match pre {
            "default" | "gpt2" => byte_level.into(),
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            other => {
                return Err(err(
                    &self.path,
                    format!("metadata `tokenizer.ggml.pre`: pre-tokenizer `{other}` is not implemented here (smollm, gpt2)"),
                ))
            }
        };
        tok.with_pre_tokenizer(Some(pre));
        tok.with_decoder(Some(ByteLevelDecoder::default()));
        // Control tokens (llama.cpp token type 3) are special; user-defined ones (4) are added.
        let types: Vec<i64> = match self.content.metadata.get("tokenizer.ggml.token_type") {
            None => Vec::new(),
            Some(v) => v
                .to_vec()
                .and_then(|a| {
                    a.iter()
                        .map(|t| {
                            t.to_i32()
                                .map(i64::from)
                                .or_else(|_| t.to_u32().map(i64::from))
                        })
                        .collect()
                })
                .map_err(|e| {
                    err(
                        &self.path,
                        format!("metadata `tokenizer.ggml.token_type`: {e}"),
                    )
                })?,
        };
        let pick = |ty: i64, special: bool| -> Vec<AddedToken> {
            types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| **t == ty)
                .map(|(_, s)| AddedToken::from(s.to_string(), special))
                .collect()
        };
        tok.add_special_tokens(&pick(3, true));
        tok.add_tokens(&pick(4, false));
        let id = |key: &str| -> Result<Option<u32>> { Ok(self.opt_count(key)?.map(|i| i as u32)) };
        let add_bos = match self.content.metadata.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v.to_bool().map_err(|e| {
                err(
                    &self.path,
                    format!("metadata `tokenizer.ggml.add_bos_token`: {e}"),
                )
            })?,
            None => false,
        };
        if add_bos {
            let bos = id("tokenizer.ggml.bos_token_id")?
                .ok_or_else(|| err(&self.path, "tokenizer.ggml.add_bos_token is set but `tokenizer.ggml.bos_token_id` is missing"))?;
            let name = tokens.get(bos as usize).ok_or_else(|| {
                err(
                    &self.path,
                    format!("metadata `tokenizer.ggml.bos_token_id`: {bos} is past the vocabulary"),
                )
            })?;
            let t = TemplateProcessing::builder()
                .try_single(format!("{name} $A"))
                .and_then(|b| b.try_pair(format!("{name} $A {name} $B")))
                .map_err(|e| err(&self.path, format!("tokenizer: {e}")))?
                .special_tokens(vec![(name.to_string(), bos)])
                .build()
                .map_err(|e| err(&self.path, format!("tokenizer: {e}")))?;
            tok.with_post_processor(Some(t));
        }
        let pad = id("tokenizer.ggml.padding_token_id")?
            .or(id("tokenizer.ggml.eos_token_id")?)
            .unwrap_or(0);
        let mut t = TextTokenizer::from_tokenizer(tok, &self.path, pad, max_len)?;
        t.eos = id("tokenizer.ggml.eos_token_id")?;
        let name_of = |key: &str| -> Result<String> {
            Ok(id(key)?
                .and_then(|i| tokens.get(i as usize))
                .map_or_else(String::new, |t| t.to_string()))
        };
        t.chat_template = match self.chat_template() {
            Some(source) => Some(ChatTemplate {
                source: source.to_string(),
                bos_token: name_of("tokenizer.ggml.bos_token_id")?,
                eos_token: name_of("tokenizer.ggml.eos_token_id")?,
                origin: format!(
                    "{}: metadata `tokenizer.chat_template`",
                    self.path.display()
                ),
            }),
            None => None,
        };
        Ok(t)
    }

    /// The chat template (`tokenizer.chat_template`), if the file has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
    }
}

/// llama.cpp's tensor names to Hugging Face's (`None`: not a llama tensor).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Undoes llama.cpp's reordering of Q and K rows: its converter interleaves each head's two
/// rotary halves (rows `h·d/2 + j` become `2j + h`) for its own RoPE kernel; Hugging Face's
/// rotate-half RoPE, which the backbone uses, wants them back.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    Ok(w.reshape((heads, half, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

/// [`unpermute`] on a quantized weight: GGUF quantizes each row on its own, so rows move as
/// whole runs of blocks in the raw data.
fn unpermute_blocks(
    q: &candle_core::quantized::QTensor,
    heads: usize,
) -> candle_core::Result<candle_core::quantized::QTensor> {
    let (out, inp) = q.shape().dims2()?;
    let dtype = q.dtype();
    let row = inp / dtype.block_size() * dtype.type_size();
    let data = q.data()?;
    let half = out / heads / 2;
    let mut moved = Vec::with_capacity(data.len());
    // New row (h, a, j) is llama.cpp's row (h, j, a).
    for h in 0..heads {
        for a in 0..2 {
            for j in 0..half {
                let from = h * 2 * half + j * 2 + a;
                moved.extend_from_slice(&data[from * row..(from + 1) * row]);
            }
        }
    }
    candle_core::quantized::ggml_file::qtensor_from_ggml(
        dtype,
        &moved,
        vec![out, inp],
        &Device::Cpu,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpps_row_order() {
        // llama.cpp's permute: rows (head, half, j) → (head, j, half).
        let (heads, d, inp) = (3usize, 8usize, 2usize);
        let hf: Vec<f32> = (0..heads * d * inp).map(|x| x as f32).collect();
        let hf = Tensor::from_vec(hf, (heads * d, inp), &Device::Cpu).unwrap();
        let gguf = hf
            .reshape((heads, 2, d / 2, inp))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((heads * d, inp))
            .unwrap();
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute(&gguf, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn names_map_onto_hugging_faces() {
        assert_eq!(
            hf_name("blk.12.attn_k.weight").unwrap(),
            "model.layers.12.self_attn.k_proj.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(hf_name("blk.x.attn_k.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
