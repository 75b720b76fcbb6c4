//! Builds a [`Transformer`] from Hugging Face weight names, and writes one back.

use crate::config::{Family, ModelConfig, QkvLayout};
use crate::error::{BackboneError, Result};
use crate::linear::Linear;
use crate::model::{gated, Embeddings, Layer, Norm, Transformer};
use crate::weights::WeightFile;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Loads `config.json` and `model.safetensors` from a Hugging Face model directory.
pub fn load_model_dir(dir: &Path, device: &Device) -> Result<Transformer> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let mut weights = WeightFile::open(&dir.join("model.safetensors"), device)?;
    from_weights(config, &mut weights)
}

/// Loads a model directory, or a `.gguf` file (dequantized to f32).
pub fn load_model(path: &Path, device: &Device) -> Result<Transformer> {
    if crate::gguf::is_gguf(path) {
        crate::gguf::GgufFile::open(path)?.load_model(device)
    } else {
        load_model_dir(path, device)
    }
}

/// Builds the model from a weight file whose tensors use Hugging Face names.
pub fn from_weights(config: ModelConfig, w: &mut WeightFile) -> Result<Transformer> {
    let model = match config.family {
        Family::Bert => load_bert(config, w),
        Family::Gpt2 => load_gpt2(config, w),
        Family::Llama => load_llama(config, w),
    }?;
    w.ensure_all_used()?;
    Ok(model)
}

fn linear(w: &mut WeightFile, name: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
    let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
    let bias = if bias {
        Some(w.take(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias))
}

fn layer_norm(w: &mut WeightFile, name: &str, size: usize, eps: f64) -> Result<Norm> {
    Ok(Norm::Layer {
        weight: w.take(&format!("{name}.weight"), &[size])?,
        bias: w.take(&format!("{name}.bias"), &[size])?,
        eps,
    })
}

fn load_bert(cfg: ModelConfig, w: &mut WeightFile) -> Result<Transformer> {
    w.detect_prefix(
        "embeddings.word_embeddings.weight",
        &["", "bert.", "roberta.", "model."],
    );
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let embeddings = Embeddings {
        word: w.take("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?,
        position: Some(w.take(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?),
        token_type: Some(w.take(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?),
        norm: Some(layer_norm(w, "embeddings.LayerNorm", h, cfg.norm_eps)?),
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("encoder.layer.{i}");
        layers.push(Layer {
            query: linear(w, &format!("{p}.attention.self.query"), h, h, true)?,
            key: linear(w, &format!("{p}.attention.self.key"), h, h, true)?,
            value: linear(w, &format!("{p}.attention.self.value"), h, h, true)?,
            attn_out: linear(w, &format!("{p}.attention.output.dense"), h, h, true)?,
            attn_norm: layer_norm(
                w,
                &format!("{p}.attention.output.LayerNorm"),
                h,
                cfg.norm_eps,
            )?,
            up: linear(w, &format!("{p}.intermediate.dense"), f, h, true)?,
            gate: None,
            down: linear(w, &format!("{p}.output.dense"), h, f, true)?,
            ffn_norm: layer_norm(w, &format!("{p}.output.LayerNorm"), h, cfg.norm_eps)?,
        });
    }
    let pooler = if w.contains("pooler.dense.weight") {
        Some(linear(w, "pooler.dense", h, h, true)?)
    } else {
        None
    };
    Ok(Transformer::from_parts(
        cfg, embeddings, layers, None, pooler, None,
    ))
}

/// Reads a GPT-2 Conv1D (`[in, out]`) or BigCode Linear (`[out, in]`) as a `[out, in]` Linear.
fn gpt2_linear(
    w: &mut WeightFile,
    cfg: &ModelConfig,
    name: &str,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    let weight = match cfg.qkv_layout {
        QkvLayout::Gpt2Conv1d => w
            .take(&format!("{name}.weight"), &[inp, out])?
            .t()?
            .contiguous()?,
        QkvLayout::BigCodeLinear => w.take(&format!("{name}.weight"), &[out, inp])?,
    };
    let bias = w.take(&format!("{name}.bias"), &[out])?;
    Ok(Linear::new(weight, Some(bias)))
}

/// Splits the fused c_attn into separate query, key and value projections.
fn split_qkv(cfg: &ModelConfig, fused: Linear) -> Result<(Linear, Linear, Linear)> {
    let (h, d, nkv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_kv_heads);
    let kv = nkv * d;
    let bias = fused.bias.expect("c_attn has a bias");
    let (w, b) = if cfg.qkv_layout == QkvLayout::BigCodeLinear && nkv == cfg.num_heads {
        // Multi-head BigCode interleaves q, k, v per head: regroup rows to [q | k | v].
        let w = fused
            .weight
            .reshape((cfg.num_heads, 3, d, h))?
            .transpose(0, 1)?
            .reshape((3 * h, h))?;
        let b = bias
            .reshape((cfg.num_heads, 3, d))?
            .transpose(0, 1)?
            .reshape(3 * h)?;
        (w.contiguous()?, b.contiguous()?)
    } else {
        (fused.weight, bias)
    };
    let part = |start: usize, len: usize| -> Result<Linear> {
        Ok(Linear::new(
            w.narrow(0, start, len)?.contiguous()?,
            Some(b.narrow(0, start, len)?.contiguous()?),
        ))
    };
    Ok((part(0, h)?, part(h, kv)?, part(h + kv, kv)?))
}

fn load_gpt2(cfg: ModelConfig, w: &mut WeightFile) -> Result<Transformer> {
    w.detect_prefix("wte.weight", &["", "transformer."]);
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_kv_heads * cfg.head_dim();
    let embeddings = Embeddings {
        word: w.take("wte.weight", &[cfg.vocab_size, h])?,
        position: Some(w.take("wpe.weight", &[cfg.max_position_embeddings, h])?),
        token_type: None,
        norm: None,
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("h.{i}");
        let fused = gpt2_linear(w, &cfg, &format!("{p}.attn.c_attn"), h + 2 * kv, h)?;
        let (query, key, value) = split_qkv(&cfg, fused)?;
        layers.push(Layer {
            query,
            key,
            value,
            attn_out: gpt2_linear(w, &cfg, &format!("{p}.attn.c_proj"), h, h)?,
            attn_norm: layer_norm(w, &format!("{p}.ln_1"), h, cfg.norm_eps)?,
            up: gpt2_linear(w, &cfg, &format!("{p}.mlp.c_fc"), f, h)?,
            gate: None,
            down: gpt2_linear(w, &cfg, &format!("{p}.mlp.c_proj"), h, f)?,
            ffn_norm: layer_norm(w, &format!("{p}.ln_2"), h, cfg.norm_eps)?,
        });
    }
    let final_norm = Some(layer_norm(w, "ln_f", h, cfg.norm_eps)?);
    let lm_head = untied_head(&cfg, w)?;
    Ok(Transformer::from_parts(
        cfg, embeddings, layers, final_norm, None, lm_head,
    ))
}

fn untied_head(cfg: &ModelConfig, w: &mut WeightFile) -> Result<Option<Tensor>> {
    if cfg.tie_word_embeddings {
        return Ok(None);
    }
    // The head sits outside the backbone's prefix (`lm_head.weight`, not `model.lm_head`).
    let shape = [cfg.vocab_size, cfg.hidden_size];
    let old = w.swap_prefix(String::new());
    let head = w.take_optional("lm_head.weight", &shape);
    w.swap_prefix(old);
    match head? {
        Some(t) => Ok(Some(t)),
        None => Err(BackboneError::MissingTensor {
            path: w.path().to_path_buf(),
            name: "lm_head.weight".into(),
        }),
    }
}

fn load_llama(cfg: ModelConfig, w: &mut WeightFile) -> Result<Transformer> {
    w.detect_prefix("embed_tokens.weight", &["model.", ""]);
    let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_kv_heads * cfg.head_dim();
    let rms = |w: &mut WeightFile, name: &str| -> Result<Norm> {
        Ok(Norm::Rms {
            weight: w.take(&format!("{name}.weight"), &[h])?,
            eps: cfg.norm_eps,
        })
    };
    let embeddings = Embeddings {
        word: w.take("embed_tokens.weight", &[cfg.vocab_size, h])?,
        position: None,
        token_type: None,
        norm: None,
    };
    let has_gate = gated(cfg.activation, cfg.family);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = format!("layers.{i}");
        layers.push(Layer {
            query: linear(w, &format!("{p}.self_attn.q_proj"), h, h, false)?,
            key: linear(w, &format!("{p}.self_attn.k_proj"), kv, h, false)?,
            value: linear(w, &format!("{p}.self_attn.v_proj"), kv, h, false)?,
            attn_out: linear(w, &format!("{p}.self_attn.o_proj"), h, h, false)?,
            attn_norm: rms(w, &format!("{p}.input_layernorm"))?,
            gate: if has_gate {
                Some(linear(w, &format!("{p}.mlp.gate_proj"), f, h, false)?)
            } else {
                None
            },
            up: linear(w, &format!("{p}.mlp.up_proj"), f, h, false)?,
            down: linear(w, &format!("{p}.mlp.down_proj"), h, f, false)?,
            ffn_norm: rms(w, &format!("{p}.post_attention_layernorm"))?,
        });
    }
    let final_norm = Some(rms(w, "norm")?);
    let lm_head = untied_head(&cfg, w)?;
    Ok(Transformer::from_parts(
        cfg, embeddings, layers, final_norm, None, lm_head,
    ))
}

/// The model's tensors under Hugging Face names, ready for `model.safetensors`.
pub fn to_hf_tensors(m: &Transformer) -> Result<HashMap<String, Tensor>> {
    let cfg = &m.config;
    let mut out = HashMap::new();
    let mut put = |k: String, t: &Tensor| -> Result<()> {
        out.insert(k, t.detach().contiguous()?);
        Ok(())
    };
    let lin = |put: &mut dyn FnMut(String, &Tensor) -> Result<()>,
               name: &str,
               l: &Linear|
     -> Result<()> {
        put(format!("{name}.weight"), &l.weight_f32()?)?;
        if let Some(b) = &l.bias {
            put(format!("{name}.bias"), b)?;
        }
        Ok(())
    };
    let norm =
        |put: &mut dyn FnMut(String, &Tensor) -> Result<()>, name: &str, n: &Norm| -> Result<()> {
            match n {
                Norm::Layer { weight, bias, .. } => {
                    put(format!("{name}.weight"), weight)?;
                    put(format!("{name}.bias"), bias)
                }
                Norm::Rms { weight, .. } => put(format!("{name}.weight"), weight),
            }
        };
    let e = &m.embeddings;
    match cfg.family {
        Family::Bert => {
            put("embeddings.word_embeddings.weight".into(), &e.word)?;
            put(
                "embeddings.position_embeddings.weight".into(),
                e.position.as_ref().expect("bert positions"),
            )?;
            put(
                "embeddings.token_type_embeddings.weight".into(),
                e.token_type.as_ref().expect("bert types"),
            )?;
            norm(
                &mut put,
                "embeddings.LayerNorm",
                e.norm.as_ref().expect("bert embedding norm"),
            )?;
            for (i, l) in m.layers.iter().enumerate() {
                let p = format!("encoder.layer.{i}");
                lin(&mut put, &format!("{p}.attention.self.query"), &l.query)?;
                lin(&mut put, &format!("{p}.attention.self.key"), &l.key)?;
                lin(&mut put, &format!("{p}.attention.self.value"), &l.value)?;
                lin(
                    &mut put,
                    &format!("{p}.attention.output.dense"),
                    &l.attn_out,
                )?;
                norm(
                    &mut put,
                    &format!("{p}.attention.output.LayerNorm"),
                    &l.attn_norm,
                )?;
                lin(&mut put, &format!("{p}.intermediate.dense"), &l.up)?;
                lin(&mut put, &format!("{p}.output.dense"), &l.down)?;
                norm(&mut put, &format!("{p}.output.LayerNorm"), &l.ffn_norm)?;
            }
            if let Some(p) = &m.pooler {
                lin(&mut put, "pooler.dense", p)?;
            }
        }
        Family::Gpt2 => {
            if cfg.qkv_layout != QkvLayout::Gpt2Conv1d {
                return Err(BackboneError::Input(
                    "only GPT-2 (Conv1D) layout is written".into(),
                ));
            }
            put("wte.weight".into(), &e.word)?;
            put(
                "wpe.weight".into(),
                e.position.as_ref().expect("gpt2 positions"),
            )?;
            let conv = |put: &mut dyn FnMut(String, &Tensor) -> Result<()>,
                        name: &str,
                        w: &Tensor,
                        b: &Tensor|
             -> Result<()> {
                put(format!("{name}.weight"), &w.t()?.contiguous()?)?;
                put(format!("{name}.bias"), b)
            };
            for (i, l) in m.layers.iter().enumerate() {
                let p = format!("h.{i}");
                let w = Tensor::cat(
                    &[
                        &l.query.weight_f32()?,
                        &l.key.weight_f32()?,
                        &l.value.weight_f32()?,
                    ],
                    0,
                )?;
                let bias = |l: &Linear| l.bias.clone().expect("gpt2 bias");
                let b = Tensor::cat(&[&bias(&l.query), &bias(&l.key), &bias(&l.value)], 0)?;
                conv(&mut put, &format!("{p}.attn.c_attn"), &w, &b)?;
                conv(
                    &mut put,
                    &format!("{p}.attn.c_proj"),
                    &l.attn_out.weight,
                    &bias(&l.attn_out),
                )?;
                norm(&mut put, &format!("{p}.ln_1"), &l.attn_norm)?;
                conv(
                    &mut put,
                    &format!("{p}.mlp.c_fc"),
                    &l.up.weight,
                    &bias(&l.up),
                )?;
                conv(
                    &mut put,
                    &format!("{p}.mlp.c_proj"),
                    &l.down.weight,
                    &bias(&l.down),
                )?;
                norm(&mut put, &format!("{p}.ln_2"), &l.ffn_norm)?;
            }
            norm(&mut put, "ln_f", m.final_norm.as_ref().expect("gpt2 ln_f"))?;
        }
        Family::Llama => {
            put("model.embed_tokens.weight".into(), &e.word)?;
            for (i, l) in m.layers.iter().enumerate() {
                let p = format!("model.layers.{i}");
                lin(&mut put, &format!("{p}.self_attn.q_proj"), &l.query)?;
                lin(&mut put, &format!("{p}.self_attn.k_proj"), &l.key)?;
                lin(&mut put, &format!("{p}.self_attn.v_proj"), &l.value)?;
                lin(&mut put, &format!("{p}.self_attn.o_proj"), &l.attn_out)?;
                if let Some(g) = &l.gate {
                    lin(&mut put, &format!("{p}.mlp.gate_proj"), g)?;
                }
                lin(&mut put, &format!("{p}.mlp.up_proj"), &l.up)?;
                lin(&mut put, &format!("{p}.mlp.down_proj"), &l.down)?;
                norm(&mut put, &format!("{p}.input_layernorm"), &l.attn_norm)?;
                norm(
                    &mut put,
                    &format!("{p}.post_attention_layernorm"),
                    &l.ffn_norm,
                )?;
            }
            norm(
                &mut put,
                "model.norm",
                m.final_norm.as_ref().expect("llama norm"),
            )?;
        }
    }
    if let Some(head) = &m.lm_head {
        put("lm_head.weight".into(), head)?;
    }
    Ok(out)
}

/// Writes `config.json` and `model.safetensors` for `m` into `dir`.
pub fn save_model_dir(m: &Transformer, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BackboneError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&m.config.to_hf_json()).expect("config serialises");
    std::fs::write(&cfg_path, text).map_err(io(&cfg_path))?;
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&to_hf_tensors(m)?, &st)?;
    Ok(())
}
