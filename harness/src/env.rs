//! The environment a run is recorded with, and process memory readings.

use peftbench_reports::Environment;

/// Starts a new peak-memory reading: the counting allocator's high-water mark where it is
/// installed (the CLI), else the kernel's peak-RSS mark (Linux).
pub fn reset_peak_memory() {
    peftbench_backbone::heap::reset_peak();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Where [`peak_memory_bytes`] comes from: `heap` (live heap bytes, this run's own) or `rss`
/// (the process's resident high-water mark, which includes freed memory kept by malloc).
pub fn peak_memory_source() -> &'static str {
    if peftbench_backbone::heap::installed() {
        "heap"
    } else {
        "rss"
    }
}

/// Peak memory since the last reset, in bytes (0 where unknown).
pub fn peak_memory_bytes() -> u64 {
    if peftbench_backbone::heap::installed() {
        return peftbench_backbone::heap::peak_bytes() as u64;
    }
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The revision of the checkout the binary was built from (empty outside a git checkout).
fn git_revision() -> Option<String> {
    Some(env!("PEFTBENCH_GIT_REVISION").to_string()).filter(|r| !r.is_empty())
}

/// The current environment.
pub fn environment() -> Environment {
    Environment {
        git_revision: git_revision(),
        cpu: cpu_name(),
        threads: rayon_threads(),
        candle_version: "0.11.1".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        kernels: peftbench_backbone::kernels().name().into(),
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        finished_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}
