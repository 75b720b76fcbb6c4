//! Causal-LM pretraining of a small decoder from scratch (the base for SFT when no pretrained
//! decoder can be downloaded, and for the embedded synthetic suite).

use crate::data::{make_batch, Example};
use crate::objective::{loss, Objective, Scorer};
use crate::optim::{AdamW, OptimConfig};
use crate::HarnessError;
use candle_core::{DType, Device};
use peftbench_backbone::{Initializer, Transformer};
use peftbench_methods::{AttachContext, MethodConfig};

/// Pretraining length and optimiser.
#[derive(Debug, Clone)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch_size: usize,
    /// Optimiser.
    pub optim: OptimConfig,
    /// Seed for the data order.
    pub seed: u64,
}

/// Trains every weight of `model` on next-token prediction over `sequences` and returns the
/// mean loss of the first and last tenth of the steps.
pub fn pretrain(
    model: &mut Transformer,
    sequences: &[Vec<u32>],
    pad_id: u32,
    cfg: &PretrainConfig,
) -> Result<(f64, f64), HarnessError> {
    if sequences.is_empty() {
        return Err(HarnessError::Config("pretraining corpus is empty".into()));
    }
    let method = MethodConfig::full_finetune().attach(&mut AttachContext::new(model, cfg.seed))?;
    let mut opt = AdamW::new(method.params().vars(), cfg.optim.clone())?;
    let examples: Vec<Example> = sequences
        .iter()
        .map(|ids| Example::Lm {
            ids: ids.clone(),
            response_start: 1,
        })
        .collect();
    let mut rng = Initializer::new(cfg.seed ^ 0x9e7);
    let tenth = (cfg.steps / 10).max(1);
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for step in 1..=cfg.steps {
        let batch: Vec<&Example> = (0..cfg.batch_size)
            .map(|_| &examples[rng.index(examples.len())])
            .collect();
        let b = make_batch(&batch, pad_id, model.device())?;
        let s = Scorer {
            model,
            method: method.as_ref(),
            head: None,
        };
        let l = loss(&Objective::CausalLm, &s, &b)?;
        let v = l.to_scalar::<f32>()? as f64;
        if !v.is_finite() {
            return Err(HarnessError::Config(format!(
                "pretraining diverged at step {step}: loss {v}"
            )));
        }
        if step <= tenth {
            first.push(v);
        }
        if step > cfg.steps - tenth {
            last.push(v);
        }
        opt.accumulate(&l.backward()?)?;
        opt.step(cfg.optim.lr_at(step, cfg.steps))?;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // The weights stay variables; callers save them (the saved model loads frozen).
    Ok((mean(&first), mean(&last)))
}

/// What `peftbench pretrain` builds: a tokenizer and decoder from a plain-text corpus.
#[derive(Debug, Clone)]
pub struct CorpusPretrain {
    /// `gpt2` or `llama`.
    pub family: String,
    /// BPE vocabulary size.
    pub vocab_size: usize,
    /// Hidden width.
    pub hidden_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Training sequence length (and position table size).
    pub max_len: usize,
    /// Pretraining length and optimiser.
    pub train: PretrainConfig,
}

/// What pretraining measured.
#[derive(Debug, Clone)]
pub struct PretrainReport {
    /// Mean training loss over the first tenth of the steps.
    pub first_loss: f64,
    /// Mean training loss over the last tenth of the steps.
    pub last_loss: f64,
    /// Held-out (last 10% of the corpus) token perplexity of the trained model.
    pub val_perplexity: f64,
    /// Held-out perplexity of the same architecture untrained.
    pub val_perplexity_untrained: f64,
    /// Training sequences.
    pub sequences: usize,
}

const EOS: &str = "<|endoftext|>";

/// Trains a byte-level BPE tokenizer on `text` (GPT-2's scheme, with `<|endoftext|>`).
pub fn train_bpe(text: &str, vocab_size: usize) -> Result<tokenizers::Tokenizer, HarnessError> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    let err = |e: tokenizers::Error| HarnessError::Config(format!("tokenizer training: {e}"));
    let mut tok = Tokenizer::new(BPE::default());
    // No prefix space, as GPT-2: decoding gives back exactly the text.
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    let mut trainer = tokenizers::models::TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(vec![AddedToken::from(EOS, true)])
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    // Paragraph-sized pieces keep the trainer's word counts meaningful.
    let pieces: Vec<&str> = text.split("\n\n").collect();
    tok.train(&mut trainer, pieces.into_iter()).map_err(err)?;
    Ok(tok)
}

fn perplexity(model: &Transformer, seqs: &[Vec<u32>], pad: u32) -> Result<f64, HarnessError> {
    let examples: Vec<Example> = seqs
        .iter()
        .map(|ids| Example::Lm {
            ids: ids.clone(),
            response_start: 1,
        })
        .collect();
    let s = Scorer {
        model,
        method: &peftbench_backbone::NoIntervention,
        head: None,
    };
    let batches = crate::objective::EvalBatches::padded(16, pad);
    let m =
        crate::objective::evaluate(&Objective::CausalLm, &s, &examples, batches, model.device())?;
    Ok(m["perplexity"])
}

/// Trains a tokenizer and a decoder on `text` and writes a Hugging Face-style directory
/// (config.json, model.safetensors, tokenizer.json) to `out`, training on `device`.
pub fn pretrain_corpus(
    text: &str,
    cfg: &CorpusPretrain,
    out: &std::path::Path,
    device: &Device,
) -> Result<PretrainReport, HarnessError> {
    let (train_text, val_text) = peftbench_datasets::split_train_val(text, 0.1);
    let tok = train_bpe(train_text, cfg.vocab_size)?;
    let eos = tok
        .token_to_id(EOS)
        .ok_or_else(|| HarnessError::Config("tokenizer lacks <|endoftext|>".into()))?;
    let chunk = |t: &str| -> Result<Vec<Vec<u32>>, HarnessError> {
        let ids = tok
            .encode(t, false)
            .map_err(|e| HarnessError::Config(format!("tokenizing the corpus: {e}")))?;
        Ok(ids
            .get_ids()
            .chunks(cfg.max_len)
            .filter(|c| c.len() > 1)
            .map(<[u32]>::to_vec)
            .collect())
    };
    let train = chunk(train_text)?;
    let mut val = chunk(val_text)?;
    val.truncate(64);
    let vocab = tok.get_vocab_size(true);
    let model_type = match cfg.family.as_str() {
        "gpt2" | "llama" => cfg.family.clone(),
        other => {
            return Err(HarnessError::Config(format!(
                "pretrain: unknown family `{other}` (gpt2, llama)"
            )))
        }
    };
    let v = if model_type == "gpt2" {
        serde_json::json!({"model_type": "gpt2", "vocab_size": vocab, "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_positions": cfg.max_len,
            "pad_token_id": eos})
    } else {
        serde_json::json!({"model_type": "llama", "vocab_size": vocab, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": 4 * cfg.hidden_size, "max_position_embeddings": cfg.max_len,
            "tie_word_embeddings": true, "pad_token_id": eos})
    };
    let config = peftbench_backbone::ModelConfig::from_json(
        &v,
        std::path::Path::new("pretrain/config.json"),
    )?;
    let mut model =
        Transformer::random(config, cfg.train.seed, &Device::Cpu)?.to(device, DType::F32)?;
    let untrained = perplexity(&model, &val, eos)?;
    let (first, last) = pretrain(&mut model, &train, eos, &cfg.train)?;
    let trained = perplexity(&model, &val, eos)?;
    peftbench_backbone::save_model_dir(&model, out)?;
    let tok_path = out.join("tokenizer.json");
    tok.save(&tok_path, true)
        .map_err(|e| HarnessError::Config(format!("{}: {e}", tok_path.display())))?;
    Ok(PretrainReport {
        first_loss: first,
        last_loss: last,
        val_perplexity: trained,
        val_perplexity_untrained: untrained,
        sequences: train.len(),
    })
}
