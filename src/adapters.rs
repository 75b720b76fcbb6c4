//! `peftbench merge` and `peftbench score`: a saved adapter (PEFT's format) folded into its
//! base, or applied to texts.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use peftbench_backbone::hf_names::head_module;
use peftbench_backbone::{
    lm_logits, load_model, pad_rows, Family, HeadKind, HfTask, Inputs, Linear, SequenceHead,
    TextTokenizer, Transformer,
};
use peftbench_methods::peft::{self, LoadedAdapter};
use std::path::Path;

fn load(model_dir: &Path, adapter: &Path) -> Result<(Transformer, LoadedAdapter)> {
    let model = load_model(model_dir, &Device::Cpu)
        .with_context(|| format!("loading the base model from {}", model_dir.display()))?;
    let a = peft::read(adapter, &model)?;
    Ok((model, a))
}

/// The head as transformers' `*ForSequenceClassification` applies it.
fn head(model: &Transformer, a: &LoadedAdapter) -> Option<SequenceHead> {
    let h = a.head.as_ref()?;
    let n = h.weight.dims()[0];
    let pooling = h.pooling.unwrap_or(peft::hf_pooling(&model.config));
    Some(SequenceHead {
        kind: HeadKind::Classifier { num_labels: n },
        pooling,
        out: Linear::new(h.weight.clone(), h.bias.clone()),
    })
}

/// The base's tokenizer beside a merged model: a directory's `tokenizer.json` and
/// `tokenizer_config.json` copied; for a GGUF base, the tokenizer built from its metadata and
/// a `tokenizer_config.json` with its chat template, so a merged SFT model keeps its layout.
fn write_tokenizer(model_dir: &Path, out: &Path) -> Result<()> {
    if !peftbench_backbone::is_gguf(model_dir) {
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            let from = model_dir.join(name);
            if from.exists() {
                std::fs::copy(&from, out.join(name))
                    .with_context(|| format!("copying {}", from.display()))?;
            } else if name == "tokenizer.json" {
                eprintln!("{} has no tokenizer.json; none copied", model_dir.display());
            }
        }
        return Ok(());
    }
    let tok = TextTokenizer::for_model(model_dir, 512)?;
    let path = out.join("tokenizer.json");
    tok.inner()
        .save(&path, false)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    if let Some(t) = &tok.chat_template {
        let cfg = serde_json::json!({
            "chat_template": t.source,
            "bos_token": t.bos_token,
            "eos_token": t.eos_token,
        });
        std::fs::write(
            out.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&cfg)?,
        )?;
    }
    Ok(())
}

/// Folds a LoRA or AdaLoRA adapter into its base and writes a plain Hugging Face model
/// directory: config.json, model.safetensors (with the head, when the adapter has one, as
/// `*ForSequenceClassification` names it), and the base's tokenizer.json.
pub fn merge(model_dir: &Path, adapter: &Path, out: &Path) -> Result<()> {
    let (mut model, a) = load(model_dir, adapter)?;
    if !a.method.merge_into(&mut model)? {
        bail!(
            "{}: a {} adapter does not fold into the weights (only LORA, DoRA, ADALORA, VERA, LOHA, LOKR, IA3, LN_TUNING and PEFTBENCH_BITFIT do)",
            adapter.display(),
            a.peft_type
        );
    }
    peftbench_backbone::save_model_dir(&model, out)?;
    if let Some(h) = &a.head {
        let st = out.join("model.safetensors");
        // A task model's checkpoint nests the backbone under its prefix (`bert.`, …):
        // transformers refuses a file that mixes a bare backbone with a head.
        let prefix = peftbench_backbone::hf_names::base_prefix(&model.config, HfTask::SeqCls);
        let mut tensors: std::collections::HashMap<String, Tensor> =
            candle_core::safetensors::load(&st, &Device::Cpu)?
                .into_iter()
                .map(|(k, v)| {
                    let k = if k.starts_with(&prefix) {
                        k
                    } else {
                        format!("{prefix}{k}")
                    };
                    (k, v)
                })
                .collect();
        let name = head_module(&model.config);
        tensors.insert(format!("{name}.weight"), h.weight.clone());
        if let Some(b) = &h.bias {
            tensors.insert(format!("{name}.bias"), b.clone());
        }
        candle_core::safetensors::save(&tensors, &st)?;
        let cfg_path = out.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
        let class = match model.config.family {
            Family::Bert if model.config.model_type == "bert" => "BertForSequenceClassification",
            Family::Bert => "RobertaForSequenceClassification",
            Family::Gpt2 => "GPT2ForSequenceClassification",
            Family::Llama => "LlamaForSequenceClassification",
        };
        cfg["architectures"] = serde_json::json!([class]);
        let n = h.weight.dims()[0];
        cfg["id2label"] = (0..n)
            .map(|i| (i.to_string(), format!("LABEL_{i}").into()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        cfg["label2id"] = (0..n)
            .map(|i| (format!("LABEL_{i}"), i.into()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
    }
    write_tokenizer(model_dir, out)?;
    eprintln!(
        "merged {} ({}) into {}: wrote {}",
        adapter.display(),
        a.peft_type,
        model_dir.display(),
        out.display()
    );
    Ok(())
}

/// Prints, as JSON, the token ids of each text and the adapter's logits: the head's for a
/// SEQ_CLS adapter, the next-token logits at the last position otherwise.
pub fn score(model_dir: &Path, adapter: Option<&Path>, texts: &[String]) -> Result<()> {
    if texts.is_empty() {
        bail!("give at least one --text");
    }
    let model = load_model(model_dir, &Device::Cpu)
        .with_context(|| format!("loading the base model from {}", model_dir.display()))?;
    let a = adapter.map(|p| peft::read(p, &model)).transpose()?;
    let tok = TextTokenizer::for_model(model_dir, 512)?;
    let rows: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| tok.encode_ids(t, true))
        .collect::<Result<_, _>>()?;
    let x: Inputs = pad_rows(&rows, None, tok.pad_id, &Device::Cpu)?;
    let none = peftbench_backbone::NoIntervention;
    let iv: &dyn peftbench_backbone::Intervention = match &a {
        Some(a) => a.method.as_ref(),
        None => &none,
    };
    let enc = model.forward(&x, iv)?;
    let logits: Tensor = match a.as_ref().and_then(|a| head(&model, a)) {
        Some(h) if a.as_ref().is_some_and(|a| a.task == HfTask::SeqCls) => {
            h.forward(&model, &enc)?
        }
        _ => {
            let l = lm_logits(&model, &enc)?;
            let last = peftbench_backbone::heads::last_token_index(&enc.mask)?;
            let picked: Vec<Tensor> = last
                .iter()
                .enumerate()
                .map(|(b, &i)| l.get(b).and_then(|r| r.get(i)))
                .collect::<candle_core::Result<_>>()?;
            Tensor::stack(&picked, 0)?
        }
    };
    let out = serde_json::json!({
        "input_ids": rows,
        "logits": logits.to_dtype(DType::F32)?.to_vec2::<f32>()?,
    });
    println!("{out}");
    Ok(())
}

/// Prints, as JSON, greedy continuations of each prompt under a causal base and, optionally,
/// an adapter (PEFT's format), decoded with the base's tokenizer.
pub fn generate(
    model_dir: &Path,
    adapter: Option<&Path>,
    prompts: &[String],
    max_new_tokens: usize,
) -> Result<()> {
    if prompts.is_empty() {
        bail!("give at least one --prompt");
    }
    let model = load_model(model_dir, &Device::Cpu)
        .with_context(|| format!("loading the base model from {}", model_dir.display()))?;
    let a = adapter.map(|p| peft::read(p, &model)).transpose()?;
    let tok = TextTokenizer::for_model(model_dir, model.config.max_position_embeddings)?;
    let none = peftbench_backbone::NoIntervention;
    let iv: &dyn peftbench_backbone::Intervention = match &a {
        Some(a) => a.method.as_ref(),
        None => &none,
    };
    let mut out = Vec::new();
    for p in prompts {
        let ids = tok.encode_ids(p, true)?;
        let new =
            peftbench_harness::generate::greedy(&model, iv, &ids, max_new_tokens, tok.eos_id())?;
        out.push(serde_json::json!({
            "prompt": p,
            "generated_ids": new,
            "generated": tok.decode(&new)?,
        }));
    }
    println!("{}", serde_json::Value::Array(out));
    Ok(())
}
