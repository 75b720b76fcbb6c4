//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use peftbench_backbone::{ModelConfig, Transformer};
use serde_json::json;
use std::path::{Path, PathBuf};

/// The all-MiniLM-L6-v2 directory fetched by scripts/fetch-minilm.sh. In CI its absence is a
/// failure; elsewhere the test is skipped with a message.
pub fn minilm_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PEFTBENCH_MINILM")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/peftbench/all-MiniLM-L6-v2"))
        })?;
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "all-MiniLM-L6-v2 not found at {}: run scripts/fetch-minilm.sh",
            dir.display()
        );
    }
    eprintln!(
        "skipping: all-MiniLM-L6-v2 not found at {} (run scripts/fetch-minilm.sh)",
        dir.display()
    );
    None
}

/// A small config of each family, parsed from Hugging Face-style JSON.
pub fn tiny_config(model_type: &str) -> ModelConfig {
    let v = match model_type {
        "bert" => json!({"model_type": "bert", "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24,
            "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "hidden_act": "gelu", "pad_token_id": 0}),
        "gpt2" => json!({"model_type": "gpt2", "vocab_size": 50, "n_embd": 16, "n_layer": 2,
            "n_head": 4, "n_positions": 64, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new"}),
        "gpt_bigcode" => json!({"model_type": "gpt_bigcode", "vocab_size": 50, "n_embd": 16,
            "n_layer": 2, "n_head": 4, "n_positions": 64, "layer_norm_epsilon": 1e-5,
            "multi_query": true, "activation_function": "gelu_pytorch_tanh"}),
        "llama" => json!({"model_type": "llama", "vocab_size": 50, "hidden_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 24, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false}),
        other => panic!("no tiny config for {other}"),
    };
    ModelConfig::from_json(&v, Path::new("tiny/config.json")).expect("tiny config is valid")
}

/// A random tiny model of the family.
pub fn tiny_model(model_type: &str, seed: u64) -> Transformer {
    Transformer::random(tiny_config(model_type), seed, &Device::Cpu).expect("random model")
}

/// Largest absolute elementwise difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest elementwise difference over the reference's largest magnitude, on the CPU in f32.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .unwrap()
    };
    let (a, b) = (cpu(a), cpu(b));
    let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    max_abs_diff(&a, &b) / scale.max(1e-12)
}

/// A random-weight synthetic base (the embedded suite's architecture and tokenizer, written
/// into `dir`): no pretraining, so tests stay fast.
pub fn synthetic_base(dir: &Path) -> peftbench_harness::Base {
    use peftbench_harness::synthetic;
    let tok_path = dir.join("tokenizer.json");
    std::fs::write(&tok_path, synthetic::tokenizer_json()).unwrap();
    peftbench_harness::Base {
        model: Transformer::random(synthetic::base_config(), 3, &Device::Cpu).unwrap(),
        tokenizer: peftbench_backbone::TextTokenizer::from_file(&tok_path, 64).unwrap(),
    }
}

/// The suite's synthetic tasks (32 training and 16 dev examples each), as `run` builds them.
pub fn synthetic_tasks(
    suite: &peftbench_harness::Suite,
    base: &peftbench_harness::Base,
) -> std::collections::HashMap<String, peftbench_harness::TaskData> {
    suite
        .tasks
        .iter()
        .map(|t| {
            let peftbench_harness::task::TaskSource::Synthetic { objective } = &t.source else {
                panic!("task `{}` is not synthetic", t.name)
            };
            let mut d =
                peftbench_harness::synthetic::task(objective, &base.tokenizer, 32, 16, 1).unwrap();
            d.name = t.name.clone();
            d.pooling = t.pooling;
            (t.name.clone(), d)
        })
        .collect()
}

/// Every method the registry ships, each at a small size that fits the tiny models.
pub fn small_methods() -> Vec<peftbench_methods::MethodConfig> {
    peftbench_methods::MethodConfig::defaults()
        .into_iter()
        .map(|m| match m.knob() {
            Some(_) => m.with_knob(2),
            None => m,
        })
        .collect()
}

/// Each variable's gradient in `grads` (zeros where it got none).
pub fn grads_of(
    grads: &candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
) -> Vec<Tensor> {
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.zeros_like().unwrap(),
        })
        .collect()
}

/// Largest difference between two gradient lists over the reference's largest magnitude.
pub fn grads_rel_diff(got: &[Tensor], reference: &[Tensor]) -> f32 {
    let scale = largest(reference).max(1e-6);
    got.iter()
        .zip(reference)
        .map(|(a, b)| max_abs_diff(a, b) / scale)
        .fold(0f32, f32::max)
}

/// Largest absolute value over a set of tensors.
pub fn largest(ts: &[Tensor]) -> f32 {
    ts.iter()
        .map(|g| {
            g.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max)
}

/// `t` with every element rounded to bf16 (nearest even) and back to f32.
pub fn bf16_rounded(t: &Tensor) -> Tensor {
    use peftbench_backbone::bf16_gemm::{from_bf16, to_bf16};
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let r: Vec<f32> = v.into_iter().map(|x| from_bf16(to_bf16(x))).collect();
    Tensor::from_vec(r, t.dims(), t.device()).unwrap()
}

/// A method attached to a copy of `base` with its parameters moved off their identity start
/// (so every gradient is live); `None` where the method refuses the family.
pub fn attach_perturbed(
    base: &Transformer,
    config: &peftbench_methods::MethodConfig,
) -> Option<(Transformer, Box<dyn peftbench_methods::Method>)> {
    config.validate(&base.config).ok()?;
    let mut model = base.clone();
    let method = config
        .attach(&mut peftbench_methods::AttachContext::new(&mut model, 7))
        .unwrap();
    let mut init = peftbench_backbone::Initializer::new(9);
    for v in method.params().vars() {
        let noise = init.normal(v.shape(), 0.05, v.device()).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    method.set_training(false);
    Some((model, method))
}

/// Rows of random token ids (1..=45, inside the tiny models' vocabulary) of the given lengths.
pub fn random_rows(lens: &[usize], seed: u64) -> Vec<Vec<u32>> {
    let mut init = peftbench_backbone::Initializer::new(seed);
    lens.iter()
        .map(|&n| (0..n).map(|_| 1 + init.index(45) as u32).collect())
        .collect()
}
