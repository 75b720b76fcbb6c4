//! Writes `reports/step_table.md` and `.csv`: per method, in the configuration the PyTorch +
//! PEFT reference used (LoRA r=8 on query/value, AdaLoRA 12 → 8, 20 prefix / prompt / P-Tuning
//! tokens; each method's defaults in `peftbench methods`), on the all-MiniLM-L6-v2 shape (batch 16 × 64, f32), median ms per training step over 10 steps
//! after 3 warm-up steps, with methods interleaved (the host's speed drifts), tokens per second,
//! peak memory, and the ratio to the PyTorch + PEFT reference measured on a machine of this kind.
//!
//! `cargo bench --bench step_table`

mod support;

use std::fmt::Write as _;
use std::time::Instant;
use support::*;

/// ms/step of PyTorch 2.15 + PEFT 0.21.2 on a 2-core AVX-512 machine of this kind (2 threads,
/// fp32, batch 16 × 64 of all-MiniLM-L6-v2 with a 2-class head), from the benchmark issue.
const PYTORCH_MS: [(&str, f64); 6] = [
    ("full_finetune", 715.0),
    ("lora", 476.0),
    ("adalora", 480.0),
    ("prefix_tuning", 519.0),
    ("prompt_tuning", 673.0),
    ("p_tuning", 685.0),
];

fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:")).map(|v| {
                v.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0)
        * 1024
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let base = minilm();
    let b = batch(16, 64);
    let methods = peftbench_methods::MethodConfig::defaults();

    // Peak memory: one method at a time, the kernel's high-water mark reset before each.
    let mut peaks = Vec::new();
    for m in &methods {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let mut s = setup(&base, m);
        s.step(&b);
        s.step(&b);
        peaks.push(peak_rss());
    }

    let mut setups: Vec<_> = methods.iter().map(|m| setup(&base, m)).collect();
    for s in setups.iter_mut() {
        for _ in 0..3 {
            s.step(&b);
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); setups.len()];
    for _ in 0..10 {
        for (i, s) in setups.iter_mut().enumerate() {
            let t0 = Instant::now();
            s.step(&b);
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let full_peak = methods
        .iter()
        .position(|m| m.name() == "full_finetune")
        .map(|i| peaks[i] as f64);
    let mut md = String::new();
    let mut csv = String::from("method,trainable_params,ms_per_step,tokens_per_s,peak_mb,peak_vs_full,pytorch_ms,ratio_vs_pytorch\n");
    let _ = writeln!(md, "# Training step cost per method\n");
    let _ = writeln!(md, "all-MiniLM-L6-v2 shape, batch 16 × 64, f32, each method's default configuration (the reference's: LoRA r=8 on query/value, AdaLoRA 12 → 8, 20 virtual tokens), trainable counts include the 2-class head, median of 10 interleaved steps after 3 warm-up, {} threads. Produced by `cargo bench --bench step_table`.\n", candle_core::utils::get_num_threads());
    let _ = writeln!(md, "| method | trainable | ms/step | tokens/s | peak MB | peak vs full FT | PyTorch ms | ratio |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (i, m) in methods.iter().enumerate() {
        let mut t = times[i].clone();
        t.sort_by(f64::total_cmp);
        let med = (t[4] + t[5]) / 2.0;
        let tps = 16.0 * 64.0 / (med / 1e3);
        let mb = peaks[i] as f64 / 1e6;
        let rel = full_peak.map_or(f64::NAN, |f| peaks[i] as f64 / f);
        let py = PYTORCH_MS
            .iter()
            .find(|(n, _)| *n == m.name())
            .map(|(_, v)| *v);
        let ratio = py.map(|p| med / p);
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = writeln!(
            md,
            "| {} | {} | {med:.0} | {tps:.0} | {mb:.0} | {rel:.2} | {} | {} |",
            m.name(),
            setups[i].trainable,
            fmt(py),
            fmt(ratio)
        );
        let _ = writeln!(
            csv,
            "{},{},{med:.1},{tps:.0},{mb:.1},{rel:.3},{},{}",
            m.name(),
            setups[i].trainable,
            py.map_or(String::new(), |p| p.to_string()),
            ratio.map_or(String::new(), |r| format!("{r:.3}"))
        );
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("reports");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("step_table.md"), &md).unwrap();
    std::fs::write(dir.join("step_table.csv"), &csv).unwrap();
    print!("{md}");
}
