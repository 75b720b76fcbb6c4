//! Writes `reports/step_table.md` and `.csv`: per method, in the configuration the PyTorch +
//! PEFT reference used (LoRA r=8 on query/value, AdaLoRA 12 → 8, 20 prefix / prompt / P-Tuning
//! tokens; each method's defaults in `peftbench methods`), on the all-MiniLM-L6-v2 shape
//! (batch 16 × 64, f32): median ms per training step (forward, backward, AdamW), methods
//! interleaved step by step because the host's speed drifts, tokens per second, peak memory,
//! and the ratio to PyTorch + PEFT.
//!
//! With `PEFTBENCH_PYTHON` naming a Python that has torch, transformers and peft, the same
//! steps run in PyTorch (`benches/pytorch_step.py`) in rounds alternating with ours on this
//! machine, and the ratio is ours over theirs from the same run. Without it the ratio is to
//! the figures measured on another machine of this kind (from the benchmark issue).
//! `PEFTBENCH_BENCH_METHODS=lora,full_finetune` limits the methods.
//!
//! `cargo bench --bench step_table` (writes into the build folder;
//! `PEFTBENCH_WRITE_STEP_TABLE=1` rewrites the committed `reports/step_table.*`)

mod support;

// Counts live heap bytes, so each method's peak is its own (backbone/src/heap.rs).
#[global_allocator]
static ALLOC: peftbench_backbone::heap::CountingAlloc = peftbench_backbone::heap::CountingAlloc;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;
use support::*;

/// ms/step of PyTorch 2.15 + PEFT 0.21.2 on a 2-core AVX-512 machine of this kind (2 threads,
/// fp32, batch 16 × 64 of all-MiniLM-L6-v2 with a 2-class head), from the benchmark issue.
const REFERENCE_MS: [(&str, f64); 6] = [
    ("full_finetune", 715.0),
    ("lora", 476.0),
    ("adalora", 480.0),
    ("prefix_tuning", 519.0),
    ("prompt_tuning", 673.0),
    ("p_tuning", 685.0),
];

/// Rounds of (ours, PyTorch) when PyTorch runs side by side.
const ROUNDS: usize = 3;
/// Timed steps per method per round.
const STEPS: usize = 10;
/// Timed steps, then as many replays, per block of the GEMM floor's timing (each after one
/// untimed).
const FLOOR_BLOCK: usize = 5;
/// Blocks of the GEMM floor's timing per method.
const FLOOR_BLOCKS: usize = 6;

/// Blocks of the GEMM floor's timing: `PEFTBENCH_BENCH_FLOOR_BLOCKS`, else [`FLOOR_BLOCKS`].
fn floor_blocks() -> usize {
    env_usize("PEFTBENCH_BENCH_FLOOR_BLOCKS", FLOOR_BLOCKS).max(1)
}

/// Timed steps per method per round: `PEFTBENCH_BENCH_STEPS`, else [`STEPS`] (large shapes on
/// a CPU take seconds a step).
fn steps() -> usize {
    env_usize("PEFTBENCH_BENCH_STEPS", STEPS)
}

fn median(v: &[f64]) -> f64 {
    let mut t = v.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n % 2 == 1 {
        t[n / 2]
    } else {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    }
}

/// One PyTorch round: ms samples per method.
fn pytorch_round(python: &str, methods: &[&str]) -> BTreeMap<String, Vec<f64>> {
    let model = std::env::var("PEFTBENCH_MINILM").unwrap_or_else(|_| {
        format!(
            "{}/.cache/peftbench/all-MiniLM-L6-v2",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let mut args = vec![
        "--model".to_string(),
        model,
        "--steps".into(),
        steps().to_string(),
        "--methods".into(),
        methods.join(","),
    ];
    args.extend(python_shape_args());
    let v = pytorch_step(python, &args, &[]);
    serde_json::from_value(v["ms"].clone()).expect("ms per method")
}

/// The shape, device, dtype and batch the PyTorch side must match ours in.
fn python_shape_args() -> Vec<String> {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.into());
    let mut a = vec![
        "--device".into(),
        var("PEFTBENCH_BENCH_DEVICE", "cpu"),
        "--dtype".into(),
        // PyTorch's precision may differ from ours (bf16 products here against PyTorch f32).
        std::env::var("PEFTBENCH_BENCH_PYTORCH_DTYPE")
            .unwrap_or_else(|_| var("PEFTBENCH_BENCH_DTYPE", "f32")),
        "--batch".into(),
        var("PEFTBENCH_BENCH_BATCH", "16"),
        "--seq".into(),
        var("PEFTBENCH_BENCH_SEQ", "64"),
    ];
    if let Some(cfg) = bench_shape_config() {
        // A random model of the same shape: its config.json, written where the bench writes.
        let dir = std::env::temp_dir().join(format!("peftbench-shape-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
        a.push("--random-config".into());
        a.push(dir.join("config.json").display().to_string());
    }
    a
}

fn main() {
    // `cargo bench` passes --bench; the shape, device and dtype come from the environment
    // (support/mod.rs), as do PEFTBENCH_BENCH_BATCH and _SEQ (default 16 × 64).
    let base = bench_model();
    let (rows, seq) = (
        env_usize("PEFTBENCH_BENCH_BATCH", 16),
        env_usize("PEFTBENCH_BENCH_SEQ", 64),
    );
    let b = batch_on(rows, seq, base.device());
    let only = std::env::var("PEFTBENCH_BENCH_METHODS").unwrap_or_default();
    let methods: Vec<_> = peftbench_methods::MethodConfig::defaults()
        .into_iter()
        .filter(|m| only.is_empty() || only.split(',').any(|n| n == m.name()))
        .collect();
    let python = std::env::var("PEFTBENCH_PYTHON")
        .ok()
        .filter(|p| !p.is_empty());

    // Peak memory: one method at a time, the heap's high-water mark reset before each (the
    // process's resident peak cannot go down again: freed buffers are kept, see alloc.rs).
    let mut peaks = Vec::new();
    for m in &methods {
        peftbench_backbone::heap::reset_peak();
        let mut s = setup(&base, m);
        s.step(&b);
        s.step(&b);
        drop(s);
        peaks.push(peftbench_backbone::heap::peak_bytes() as u64);
    }

    let mut setups: Vec<_> = methods.iter().map(|m| setup(&base, m)).collect();
    for s in setups.iter_mut() {
        for _ in 0..3.min(steps()) {
            s.step(&b);
        }
    }
    let with_torch: Vec<&str> = methods
        .iter()
        .map(|m| m.name())
        .filter(|n| *n != "adapter")
        .collect();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    let mut torch: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..if python.is_some() { ROUNDS } else { 1 } {
        for _ in 0..steps() {
            for (i, s) in setups.iter_mut().enumerate() {
                let t0 = Instant::now();
                s.step(&b);
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        if let Some(py) = &python {
            for (k, v) in pytorch_round(py, &with_torch) {
                torch.entry(k).or_default().extend(v);
            }
        }
    }
    // The GEMM floor: each method's step's own GEMM calls (recorded from one step) replayed
    // alone, one method at a time so only one set of replay buffers is alive. Blocks of
    // replays alternate with blocks of the same method's steps, so both are timed in the
    // same stretch of the run (the host's speed drifts); in blocks, as a step timed right
    // after a replay runs on the replay's cache (alternating one by one read 2-20% slower
    // steps than the rounds), and each block's first step and first replay are left out.
    // The share is the median over blocks of each block's floor over its steps: a burst of
    // host noise moves one block, not the result.
    let mut floors = Vec::new();
    let mut paired = Vec::new();
    let mut owns = Vec::new();
    let mut shares = Vec::new();
    for s in setups.iter_mut() {
        let ((), record) = peftbench_backbone::gemm_floor::record_all(|| s.step(&b));
        let mut replay = peftbench_backbone::gemm_floor::Replay::of(record);
        replay.run();
        let (mut floor, mut own, mut step, mut share) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..floor_blocks() {
            let (mut f, mut st) = (Vec::new(), Vec::new());
            for i in 0..=FLOOR_BLOCK {
                let t0 = Instant::now();
                s.step(&b);
                if i > 0 {
                    st.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            for i in 0..=FLOOR_BLOCK {
                let [library, own_kernels] = replay.run_split();
                if i > 0 {
                    f.push((library + own_kernels) * 1e3);
                    own.push(own_kernels * 1e3);
                }
            }
            share.push(median(&f) / median(&st));
            floor.extend(f);
            step.extend(st);
        }
        floors.push(median(&floor));
        owns.push(median(&own));
        paired.push(median(&step));
        shares.push(median(&share));
    }
    let full_peak = methods
        .iter()
        .position(|m| m.name() == "full_finetune")
        .map(|i| peaks[i] as f64);
    let (py_label, py_note) = if python.is_some() {
        (
            "PyTorch ms (same run)",
            format!("PyTorch + PEFT ran the same steps on this machine in {ROUNDS} rounds alternating with ours (`benches/pytorch_step.py`, `PEFTBENCH_PYTHON` set, PyTorch in {}); both columns are medians over all rounds", std::env::var("PEFTBENCH_BENCH_PYTORCH_DTYPE").or_else(|_| std::env::var("PEFTBENCH_BENCH_DTYPE")).unwrap_or_else(|_| "f32".into())),
        )
    } else {
        (
            "PyTorch ms (other machine)",
            "PyTorch figures are the benchmark issue's, measured on another 2-core machine; set `PEFTBENCH_PYTHON` to measure them side by side here".to_string(),
        )
    };
    let mut md = String::new();
    let mut csv = String::from("method,trainable_params,ms_per_step,gemm_ms,own_kernel_ms,paired_step_ms,gemm_share,tokens_per_s,peak_mb,peak_vs_full,pytorch_ms,pytorch_same_run,ratio_vs_pytorch\n");
    let _ = writeln!(md, "# Training step cost per method\n");
    let _ = writeln!(md, "CPU: {}.\n", cpu_line());
    let shape = match base.is_quantized() {
        true => "SmolLM2-135M-Instruct (its Q4_1 GGUF file)".to_string(),
        false => std::env::var("PEFTBENCH_BENCH_SHAPE").unwrap_or_else(|_| "minilm".into()),
    };
    let objective = if bench_lm() {
        "a next-token (SFT) loss over the vocabulary at every position"
    } else {
        "a 2-class classification loss"
    };
    let warm = 3.min(steps());
    let device = peftbench_backbone::device_name(base.device());
    let mut dtype = format!("{:?}", base.dtype()).to_lowercase();
    if base.is_quantized() {
        dtype.push_str(" with the projections in their GGUF blocks");
    }
    if base.is_packed_bf16() {
        let k = peftbench_backbone::bf16_gemm::best().map_or("", |k| k.name());
        dtype.push_str(&format!(
            " with the projections' products in bf16 ({k}; frozen weights packed once, trained ones (full fine-tuning) at each product; the GEMM floor replays them with the same kernel on weights packed once)"
        ));
    }
    let _ = writeln!(md, "Device: {device}, dtype {dtype}, shape {shape}.\n");
    let _ = writeln!(md, "all-MiniLM-L6-v2 shape unless named above, batch {rows} × {seq}, each method's default configuration (the reference's: LoRA r=8 on query/value, AdaLoRA 12 → 8, 20 virtual tokens), {objective}, trainable counts include the 2-class head, median ms of interleaved steps after {warm} warm-up, peak MB the heap's high-water mark while the method is attached and takes two steps (the base's weights included), {} threads. {py_note}. Produced by `cargo bench --bench step_table`.\n", candle_core::utils::get_num_threads());
    let _ = writeln!(md, "GEMM ms is the step's floor: every GEMM call one step of the method made (candle's matmuls and the backbone's own projection and attention kernels, recorded by `candle_core::gemm_trace`) replayed alone with the same shapes, strides and threading, and the small products of the low-rank and Kronecker deltas replayed by their own kernels (own ms, part of GEMM ms), median of {} replays in the same run; in GEMM is the median over {} blocks of a block's median floor over its median step, each block {FLOOR_BLOCK} steps of the method then {FLOOR_BLOCK} replays (each after one untimed), not the floor over ms/step, which comes from the rounds beside PyTorch: the host's speed drifts between phases of a run.\n", floor_blocks() * FLOOR_BLOCK, floor_blocks());
    let _ = writeln!(md, "| method | trainable | ms/step | GEMM ms | own ms | in GEMM | tokens/s | peak MB | peak vs full FT | {py_label} | ratio |");
    let _ = writeln!(
        md,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (i, m) in methods.iter().enumerate() {
        let med = median(&times[i]);
        let tps = (rows * seq) as f64 / (med / 1e3);
        let mb = peaks[i] as f64 / 1e6;
        let rel = full_peak.map_or(f64::NAN, |f| peaks[i] as f64 / f);
        // The figures are for the CPU MiniLM shape alone.
        let reference_applies = bench_shape_config().is_none()
            && base.device().is_cpu()
            && base.dtype() == candle_core::DType::F32
            && (rows, seq) == (16, 64);
        let py = if python.is_some() {
            torch.get(m.name()).map(|v| median(v))
        } else if !reference_applies {
            None
        } else {
            REFERENCE_MS
                .iter()
                .find(|(n, _)| *n == m.name())
                .map(|(_, v)| *v)
        };
        let ratio = py.map(|p| med / p);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            md,
            "| {} | {} | {med:.0} | {:.0} | {:.1} | {:.0}% | {tps:.0} | {mb:.0} | {rel:.2} | {} | {} |",
            m.name(),
            setups[i].trainable,
            floors[i],
            owns[i],
            100.0 * shares[i],
            py.map_or("-".to_string(), |p| format!("{p:.0}")),
            fmt(ratio)
        );
        let _ = writeln!(
            csv,
            "{},{},{med:.1},{:.1},{:.2},{:.1},{:.3},{tps:.0},{mb:.1},{rel:.3},{},{},{}",
            m.name(),
            setups[i].trainable,
            floors[i],
            owns[i],
            paired[i],
            shares[i],
            py.map_or(String::new(), |p| format!("{p:.1}")),
            python.is_some(),
            ratio.map_or(String::new(), |r| format!("{r:.3}"))
        );
    }
    // The committed table is rewritten only when asked, so a benchmark run leaves the
    // checkout clean; otherwise the files go to the build folder.
    let dir = if let Some(out) = std::env::var_os("PEFTBENCH_STEP_TABLE_OUT") {
        std::path::PathBuf::from(out)
    } else if std::env::var_os("PEFTBENCH_WRITE_STEP_TABLE").is_some_and(|v| v == "1") {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports")
    } else {
        std::path::PathBuf::from(
            std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into()),
        )
    };
    std::fs::create_dir_all(&dir).unwrap();
    if only.is_empty() {
        eprintln!("step table: {}", dir.join("step_table.md").display());
        std::fs::write(dir.join("step_table.md"), &md).unwrap();
        std::fs::write(dir.join("step_table.csv"), &csv).unwrap();
    }
    print!("{md}");
}
