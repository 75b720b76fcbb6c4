//! Writes `scaling.md` and `.csv`: how a training step's time and memory grow with sequence
//! length (64 … 1024) and model shape (all-MiniLM-L6-v2's, BERT-base's and SmolLM2-135M's,
//! random weights), for LoRA, prefix tuning and full fine-tuning, each method's default
//! configuration with a 2-class head, f32 on the CPU.
//!
//! Per point: the median ms of interleaved steps after one warm-up, and the step's memory: the
//! heap's high-water mark over the first step minus what was live before it (activations,
//! gradients, AdamW state; the model's own weights excluded). With `PEFTBENCH_PYTHON` naming
//! a Python with torch, transformers and peft, `benches/pytorch_step.py` runs the same point
//! in a process of its own (`--random-config`, `--memory`: resident high-water mark over its
//! first step minus resident before it), and the table gives ours over theirs.
//!
//! `cargo bench --bench scaling` (files in the build folder; `PEFTBENCH_WRITE_SCALING=1`
//! rewrites the committed `reports/scaling.*`). `PEFTBENCH_SCALING_LENS` (default
//! `64,128,256,512,1024`), `_SHAPES` (`minilm,bert-base,smollm2`), `_BATCH` (2) and
//! `_STEPS` (3) size it.

mod support;

// Counts live heap bytes (backbone/src/heap.rs).
#[global_allocator]
static ALLOC: peftbench_backbone::heap::CountingAlloc = peftbench_backbone::heap::CountingAlloc;

use candle_core::Device;
use peftbench_backbone::{heap, ModelConfig, Transformer};
use peftbench_methods::MethodConfig;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;
use support::*;

const METHODS: [&str; 3] = ["lora", "prefix_tuning", "full_finetune"];

/// The Hugging Face config of a benchmarked shape; BERT shapes get positions for 1,024
/// tokens beyond their checkpoints' 512.
fn shape(name: &str) -> serde_json::Value {
    match name {
        "minilm" => serde_json::json!({"model_type": "bert", "vocab_size": 30522,
            "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
            "intermediate_size": 1536, "max_position_embeddings": 1088, "type_vocab_size": 2}),
        "bert-base" => serde_json::json!({"model_type": "bert", "vocab_size": 30522,
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "max_position_embeddings": 1088, "type_vocab_size": 2}),
        "smollm2" => serde_json::json!({"model_type": "llama", "vocab_size": 49152,
            "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "intermediate_size": 1536,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "hidden_act": "silu", "tie_word_embeddings": true}),
        other => panic!("PEFTBENCH_SCALING_SHAPES: `{other}` is not minilm, bert-base or smollm2"),
    }
}

fn list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// PyTorch + PEFT at one point: (median ms, step MB) per method.
fn pytorch_point(
    python: &str,
    config: &Path,
    batch: usize,
    seq: usize,
    steps: usize,
) -> BTreeMap<String, (f64, f64)> {
    let args: Vec<String> = [
        "--model",
        "-",
        "--random-config",
        &config.display().to_string(),
        "--batch",
        &batch.to_string(),
        "--seq",
        &seq.to_string(),
        "--warmup",
        "1",
        "--steps",
        &steps.to_string(),
        "--memory",
        "--methods",
        &METHODS.join(","),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Freed tensors go back to the kernel, so each method's resident peak is its own.
    let v = pytorch_step(python, &args, &[("MALLOC_MMAP_THRESHOLD_", "65536")]);
    let mut out = BTreeMap::new();
    for m in METHODS {
        let Some(ms) = v["ms"][m].as_array() else {
            continue;
        };
        let mut ms: Vec<f64> = ms.iter().filter_map(|x| x.as_f64()).collect();
        let mb = v["step_mb"][m].as_f64().unwrap_or(f64::NAN);
        out.insert(m.to_string(), (median(&mut ms), mb));
    }
    out
}

fn main() {
    peftbench_backbone::keep_freed_memory();
    let lens: Vec<usize> = list("PEFTBENCH_SCALING_LENS", "64,128,256,512,1024")
        .iter()
        .map(|s| s.parse().expect("PEFTBENCH_SCALING_LENS: lengths"))
        .collect();
    let shapes = list("PEFTBENCH_SCALING_SHAPES", "minilm,bert-base,smollm2");
    let batch = env_usize("PEFTBENCH_SCALING_BATCH", 2);
    let steps = env_usize("PEFTBENCH_SCALING_STEPS", 3);
    let python = std::env::var("PEFTBENCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty());
    let tmp = tempfile::tempdir().unwrap();
    let mut csv = String::from(
        "shape,seq,batch,method,ms_per_step,step_mb,pytorch_ms,pytorch_step_mb,time_ratio,memory_ratio\n",
    );
    let mut rows = Vec::new();
    for name in &shapes {
        let json = shape(name);
        let config_dir = tmp.path().join(name);
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("config.json"), json.to_string()).unwrap();
        let cfg = ModelConfig::from_json(&json, Path::new("scaling/config.json")).unwrap();
        let base = Transformer::random(cfg, 0, &Device::Cpu).unwrap();
        let methods: Vec<MethodConfig> = MethodConfig::defaults()
            .into_iter()
            .filter(|m| METHODS.contains(&m.name()))
            .collect();
        for &seq in &lens {
            let b = batch_on(batch, seq, &Device::Cpu);
            let mut setups = Vec::new();
            let mut step_mb = Vec::new();
            for m in &methods {
                let mut s = setup(&base, m);
                let live = heap::live_bytes();
                heap::reset_peak();
                s.step(&b);
                step_mb.push((heap::peak_bytes() - live) as f64 / 1e6);
                setups.push(s);
            }
            let mut times = vec![Vec::new(); setups.len()];
            for _ in 0..steps {
                for (i, s) in setups.iter_mut().enumerate() {
                    let t0 = Instant::now();
                    s.step(&b);
                    times[i].push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            drop(setups);
            let torch = python
                .as_ref()
                .map(|py| pytorch_point(py, &config_dir, batch, seq, steps))
                .unwrap_or_default();
            for (i, m) in methods.iter().enumerate() {
                let ms = median(&mut times[i]);
                let py = torch.get(m.name()).copied();
                let fmt = |v: Option<f64>, p: usize| {
                    v.filter(|x| x.is_finite())
                        .map_or(String::new(), |x| format!("{x:.p$}"))
                };
                let line = [
                    name.clone(),
                    seq.to_string(),
                    batch.to_string(),
                    m.name().to_string(),
                    format!("{ms:.1}"),
                    format!("{:.1}", step_mb[i]),
                    fmt(py.map(|p| p.0), 1),
                    fmt(py.map(|p| p.1), 1),
                    fmt(py.map(|p| ms / p.0), 3),
                    fmt(py.map(|p| step_mb[i] / p.1), 3),
                ];
                eprintln!("{}", line.join(","));
                let _ = writeln!(csv, "{}", line.join(","));
                rows.push(line);
            }
        }
    }
    let mut md = String::new();
    let _ = writeln!(md, "# Step cost against sequence length and model shape\n");
    let _ = writeln!(
        md,
        "CPU: {}, {} threads.\n",
        cpu_line(),
        candle_core::utils::get_num_threads()
    );
    let _ = writeln!(md, "Random weights of each shape (BERT shapes with 1,088 positions), batch {batch} × length, f32, each method's default configuration (LoRA r = 8 on query/value, prefix tuning with 20 virtual tokens through its MLP) with a 2-class head; ms is the median of {steps} interleaved steps after one warm-up; step MB is what the first step adds to the heap at its peak (activations, gradients, AdamW state; the weights excluded). {} Produced by `cargo bench --bench scaling`.\n",
        if python.is_some() { "PyTorch + PEFT ran each point in its own process on this machine (`benches/pytorch_step.py --memory`: its resident high-water mark over the first step minus resident before it, with freed tensors returned to the kernel)." } else { "PyTorch columns are empty: set `PEFTBENCH_PYTHON` to run PyTorch + PEFT beside it." });
    let _ = writeln!(md, "| shape | length | method | ms/step | step MB | PyTorch ms | PyTorch step MB | time ratio | memory ratio |");
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let dash = |s: &String| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.clone()
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r[0],
            r[1],
            r[3],
            r[4],
            r[5],
            dash(&r[6]),
            dash(&r[7]),
            dash(&r[8]),
            dash(&r[9])
        );
    }
    let dir = if std::env::var_os("PEFTBENCH_WRITE_SCALING").is_some_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("reports")
    } else {
        std::path::PathBuf::from(
            std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()),
        )
    };
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("scaling.md"), &md).unwrap();
    std::fs::write(dir.join("scaling.csv"), &csv).unwrap();
    eprintln!("scaling table: {}", dir.join("scaling.md").display());
    print!("{md}");
}
