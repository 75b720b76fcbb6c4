//! Shared set-up of the benchmarks: the all-MiniLM-L6-v2 shape, a batch, methods at a
//! matched budget, and one training step.
#![allow(dead_code)]

use candle_core::Device;
use peftbench_backbone::{
    load_model_dir, pad_rows, HeadKind, Initializer, ModelConfig, SequenceHead, TrainableParams,
    Transformer,
};
use peftbench_harness::data::{Batch, Target};
use peftbench_harness::objective::{loss, Objective, Scorer};
use peftbench_harness::optim::{AdamW, OptimConfig};
use peftbench_harness::{match_budget, Budget};
use peftbench_methods::{AttachContext, LoraConfig, Method, MethodConfig};
use std::path::{Path, PathBuf};

/// all-MiniLM-L6-v2: the real checkpoint when fetched, else a random model of its shape.
pub fn minilm() -> Transformer {
    peftbench_backbone::keep_freed_memory();
    let dir = std::env::var_os("PEFTBENCH_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peftbench/all-MiniLM-L6-v2")
        });
    if let Ok(m) = load_model_dir(&dir, &Device::Cpu) {
        return m;
    }
    let v = serde_json::json!({"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
        "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
        "max_position_embeddings": 512, "type_vocab_size": 2});
    let cfg = ModelConfig::from_json(&v, Path::new("minilm/config.json")).unwrap();
    Transformer::random(cfg, 0, &Device::Cpu).unwrap()
}

/// The benchmarked shape's Hugging Face config: `PEFTBENCH_BENCH_SHAPE` = `minilm` (the
/// default), `smollm2` (SmolLM2-135M's shape), `llama-1b` (TinyLlama-1.1B's, for GPUs) or
/// `tiny` (for dry runs).
pub fn bench_shape_config() -> Option<serde_json::Value> {
    match std::env::var("PEFTBENCH_BENCH_SHAPE").as_deref() {
        Err(_) | Ok("") | Ok("minilm") => None,
        Ok("smollm2") => Some(
            serde_json::json!({"model_type": "llama", "vocab_size": 49152,
            "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "intermediate_size": 1536,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "hidden_act": "silu", "tie_word_embeddings": true}),
        ),
        Ok("llama-1b") => Some(
            serde_json::json!({"model_type": "llama", "vocab_size": 32000,
            "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "intermediate_size": 5632,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": false}),
        ),
        Ok("tiny") => Some(
            serde_json::json!({"model_type": "bert", "vocab_size": 30522,
            "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 512, "type_vocab_size": 2}),
        ),
        Ok(other) => {
            panic!("PEFTBENCH_BENCH_SHAPE=`{other}`: expected minilm, smollm2, llama-1b or tiny")
        }
    }
}

/// The benchmarked model: MiniLM (the checkpoint when fetched), or a random model of the
/// shape `PEFTBENCH_BENCH_SHAPE` names, on `PEFTBENCH_BENCH_DEVICE` (default cpu) in
/// `PEFTBENCH_BENCH_DTYPE` (f32 or bf16).
pub fn bench_model() -> Transformer {
    if std::env::var("PEFTBENCH_BENCH_DTYPE").as_deref() == Ok("quantized") {
        return quantized_smollm2();
    }
    let base = match bench_shape_config() {
        None => minilm(),
        Some(v) => {
            let cfg = ModelConfig::from_json(&v, Path::new("bench/config.json")).unwrap();
            Transformer::random(cfg, 0, &Device::Cpu).unwrap()
        }
    };
    let device = bench_device();
    if bench_dtype() == candle_core::DType::BF16 && device.is_cpu() {
        // On the CPU bf16 means the projections' products in bf16 (as `run` does).
        let mut base = base.to(&device, candle_core::DType::F32).unwrap();
        if base.pack_frozen_bf16().unwrap() == 0 {
            eprintln!("no bf16 kernel on this CPU, or composite kernels: the bench runs f32");
        }
        return base;
    }
    base.to(&device, bench_dtype()).unwrap()
}

/// SmolLM2-135M-Instruct from its fetched GGUF file (`PEFTBENCH_SMOLLM2` or the cache) with
/// its projections kept in their Q4_1 blocks: `PEFTBENCH_BENCH_DTYPE=quantized`.
fn quantized_smollm2() -> Transformer {
    let path = std::env::var_os("PEFTBENCH_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peftbench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let mut m = peftbench_backbone::load_model(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-smollm2.sh)"));
    peftbench_backbone::GgufFile::open(&path)
        .unwrap()
        .quantize_projections(&mut m)
        .unwrap();
    m
}

/// `PEFTBENCH_BENCH_DEVICE`: cpu (default), cuda or cuda:N.
pub fn bench_device() -> Device {
    let name = std::env::var("PEFTBENCH_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    peftbench_backbone::parse_device(&name).unwrap_or_else(|e| panic!("{e}"))
}

/// `PEFTBENCH_BENCH_DTYPE`: f32 (default) or bf16.
pub fn bench_dtype() -> candle_core::DType {
    let name = std::env::var("PEFTBENCH_BENCH_DTYPE").unwrap_or_else(|_| "f32".into());
    peftbench_backbone::parse_dtype(&name).unwrap_or_else(|e| panic!("{e}"))
}

/// A number from the environment, or `default`.
pub fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{var}=`{v}` is not a count"))
        })
        .unwrap_or(default)
}

/// A batch of `b` rows of `t` random tokens with binary labels.
pub fn batch(b: usize, t: usize) -> Batch {
    batch_on(b, t, &Device::Cpu)
}

/// Whether the step is next-token prediction (`PEFTBENCH_BENCH_OBJECTIVE=lm`, SFT's loss over
/// the vocabulary, every position a response token) rather than 2-class classification.
pub fn bench_lm() -> bool {
    match std::env::var("PEFTBENCH_BENCH_OBJECTIVE").as_deref() {
        Err(_) | Ok("") | Ok("classification") => false,
        Ok("lm") => true,
        Ok(other) => panic!("PEFTBENCH_BENCH_OBJECTIVE=`{other}`: expected classification or lm"),
    }
}

/// The objective [`bench_lm`] picks.
fn objective() -> Objective {
    if bench_lm() {
        Objective::CausalLm
    } else {
        OBJ
    }
}

/// [`batch`] on `device` (an LM batch of `t` tokens a row under [`bench_lm`]).
pub fn batch_on(b: usize, t: usize, device: &Device) -> Batch {
    let mut init = Initializer::new(1);
    let rows: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..t).map(|_| 1000 + init.index(20000) as u32).collect())
        .collect();
    if bench_lm() {
        let examples: Vec<peftbench_harness::data::Example> = rows
            .into_iter()
            .map(|ids| peftbench_harness::data::Example::Lm {
                ids,
                response_start: 1,
            })
            .collect();
        let refs: Vec<&peftbench_harness::data::Example> = examples.iter().collect();
        return peftbench_harness::data::make_batch(&refs, 0, device).unwrap();
    }
    let inputs = pad_rows(&rows, None, 0, device).unwrap();
    let targets = (0..b).map(|i| Target::Class(i % 2)).collect();
    Batch::Text {
        inputs,
        targets,
        spans: None,
    }
}

/// The budget every PEFT method is matched to: LoRA r = 8 on query and value.
pub fn reference_budget(model: &Transformer) -> usize {
    MethodConfig::Lora(LoraConfig::default())
        .num_trainable(model)
        .unwrap()
}

/// Every method's default configuration sized to `target` parameters (full fine-tuning as is).
pub fn matched_methods(model: &Transformer, target: usize) -> Vec<MethodConfig> {
    MethodConfig::defaults()
        .into_iter()
        .filter_map(|m| {
            match_budget(&m, model, Some(target).filter(|_| m.knob().is_some()), 0.5)
                .ok()
                .map(|x| x.config)
        })
        .collect()
}

/// A model with a method and a 2-class head attached, and its optimiser.
pub struct Setup {
    /// The backbone (possibly with variables, for full fine-tuning).
    pub model: Transformer,
    /// The method.
    pub method: Box<dyn Method>,
    /// The head.
    pub head: SequenceHead,
    /// AdamW over method and head variables.
    pub opt: AdamW,
    /// Trainable parameters (method + head).
    pub trainable: usize,
}

/// Attaches `method` to a copy of `base`.
pub fn setup(base: &Transformer, method: &MethodConfig) -> Setup {
    let mut model = base.clone();
    let method = method
        .attach(&mut AttachContext::new(&mut model, 0))
        .unwrap();
    let mut hp = TrainableParams::new();
    let head = SequenceHead::new(
        &model,
        HeadKind::Classifier { num_labels: 2 },
        &mut hp,
        &mut Initializer::new(2),
    )
    .unwrap();
    let mut vars = method.params().vars();
    vars.extend(hp.vars());
    let trainable = method.params().count() + hp.count();
    let opt = AdamW::new(
        vars,
        OptimConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    Setup {
        model,
        method,
        head,
        opt,
        trainable,
    }
}

const OBJ: Objective = Objective::Classification {
    num_labels: 2,
    metric: peftbench_datasets::GlueMetric::Accuracy,
};

impl Setup {
    /// Forward pass and loss, no gradient.
    pub fn forward(&self, b: &Batch) -> f32 {
        self.try_forward(b).unwrap()
    }

    /// Forward pass and loss, or the error (e.g. virtual tokens that do not fit the model's
    /// positions beside the batch).
    pub fn try_forward(&self, b: &Batch) -> Result<f32, String> {
        let s = Scorer {
            model: &self.model,
            method: self.method.as_ref(),
            head: Some(&self.head),
        };
        loss(&objective(), &s, b)
            .and_then(|l| l.to_scalar::<f32>())
            .map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())
    }

    /// Forward and backward.
    pub fn forward_backward(&self, b: &Batch) -> candle_core::backprop::GradStore {
        let s = Scorer {
            model: &self.model,
            method: self.method.as_ref(),
            head: Some(&self.head),
        };
        loss(&objective(), &s, b).unwrap().backward().unwrap()
    }

    /// One full optimizer step, finished on the device (GPU work is queued asynchronously).
    pub fn step(&mut self, b: &Batch) {
        let g = self.forward_backward(b);
        self.opt.accumulate(&g).unwrap();
        self.opt.step(1e-4).unwrap();
        self.model.device().synchronize().unwrap();
    }
}

/// The budget label used in tables.
pub fn budget_label(model: &Transformer) -> String {
    let t = reference_budget(model);
    format!(
        "{t} ({:.2}%)",
        100.0 * t as f64 / model.num_parameters() as f64
    )
}

/// Unused budget helper kept for parity with the harness's parser.
pub fn parse_budget(s: &str) -> Budget {
    Budget::parse(s).unwrap()
}

/// The CPU's model name and the vector extensions the kernels can use.
pub fn cpu_line() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    #[cfg(target_arch = "x86_64")]
    let flags: Vec<&str> = [
        ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ("fma", std::arch::is_x86_feature_detected!("fma")),
        ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
        (
            "avx512bf16",
            std::arch::is_x86_feature_detected!("avx512bf16"),
        ),
        // AMX counts only where the OS grants the tile state too.
        (
            "amx-bf16",
            peftbench_backbone::bf16_gemm::Kernel::Amx.runs_here(),
        ),
    ]
    .into_iter()
    .filter_map(|(n, on)| on.then_some(n))
    .collect();
    #[cfg(not(target_arch = "x86_64"))]
    let flags: Vec<&str> = Vec::new();
    format!("{model} ({})", flags.join(", "))
}

/// Runs `benches/pytorch_step.py` with `args` (and `--threads` at ours) under `python` and
/// returns its JSON; methods PyTorch + PEFT could not run are printed, not fatal.
pub fn pytorch_step(python: &str, args: &[String], env: &[(&str, &str)]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pytorch_step.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .args([
            "--threads",
            &candle_core::utils::get_num_threads().to_string(),
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {python} {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("{}: bad output ({e}): {line}", script.display()));
    if let Some(errors) = v["errors"].as_object().filter(|e| !e.is_empty()) {
        // Their PyTorch column stays empty.
        for (method, why) in errors {
            eprintln!("PyTorch side: {method}: {why}");
        }
    }
    v
}
