//! Keeps freed tensor buffers in the process.
//!
//! glibc hands blocks above its mmap threshold back to the kernel on free, and the next
//! allocation of that size maps fresh pages that the kernel must fault in and zero. A training
//! step frees and reallocates the same activation and gradient sizes every time, so those page
//! faults (several % of a MiniLM step, mostly on the one thread that allocates) buy nothing.

/// Serves every block from glibc's heap (no mmap, whatever the size) and stops heap trimming,
/// so freed buffers are reused instead of unmapped. Set `PEFTBENCH_MALLOC_DEFAULTS=1` to keep
/// glibc's defaults (to measure the difference). A no-op on other C libraries.
pub fn keep_freed_memory() {
    if std::env::var_os("PEFTBENCH_MALLOC_DEFAULTS").is_some_and(|v| v == "1") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // -1: never trim (mallopt(3)). i32::MAX (2 GiB) still trimmed: a SmolLM2 evaluation
        // batch frees more than that at once, and its pages were faulted in again each batch.
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        // Blocks above the threshold still went to mmap: full fine-tuning's 47 MB embedding
        // gradient faulted in ~11,700 fresh pages every step. No mmap at all:
        // every block comes from the heap and is reused.
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}
