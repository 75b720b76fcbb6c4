//! Which implementation the custom ops run, and where: the CPU's fused kernels, or the
//! composite candle graph that every device runs.
//!
//! `PEFTBENCH_KERNELS=composite` makes the CPU run exactly the graph a GPU runs, so that path
//! is tested where there is no GPU. The choice is read once per process.

use candle_core::{DType, Device};
use std::cell::Cell;
use std::sync::OnceLock;

/// The implementation the custom ops use on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// Fused f32 CPU kernels with their own backward (the default).
    Fused,
    /// Compositions of candle primitives, as on every other device.
    Composite,
}

impl Kernels {
    /// The name used by `PEFTBENCH_KERNELS` and run records.
    pub fn name(self) -> &'static str {
        match self {
            Kernels::Fused => "fused",
            Kernels::Composite => "composite",
        }
    }
}

/// Parses `PEFTBENCH_KERNELS`'s value (unset means fused).
pub fn parse_kernels(value: Option<&str>) -> Result<Kernels, String> {
    match value.map(str::trim) {
        None | Some("") | Some("fused") => Ok(Kernels::Fused),
        Some("composite") => Ok(Kernels::Composite),
        Some(other) => Err(format!(
            "PEFTBENCH_KERNELS=`{other}`: expected `fused` or `composite`"
        )),
    }
}

/// The choice in force on this thread: a [`with_kernels`] scope's, else the process's, from
/// `PEFTBENCH_KERNELS`. A bad value is an error the CLI reports up front
/// ([`check_kernels_env`]); here it falls back to fused.
pub fn kernels() -> Kernels {
    static CHOICE: OnceLock<Kernels> = OnceLock::new();
    SCOPED.with(Cell::get).unwrap_or_else(|| {
        *CHOICE.get_or_init(|| {
            parse_kernels(std::env::var("PEFTBENCH_KERNELS").ok().as_deref())
                .unwrap_or(Kernels::Fused)
        })
    })
}

thread_local! {
    static SCOPED: Cell<Option<Kernels>> = const { Cell::new(None) };
}

/// Runs `f` with `choice` in force on this thread (ops choose their path on the calling
/// thread), so one process can run both paths side by side.
pub fn with_kernels<R>(choice: Kernels, f: impl FnOnce() -> R) -> R {
    let before = SCOPED.with(|c| c.replace(Some(choice)));
    // Restored on unwind too, so a failing check does not leak its choice.
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(before);
    f()
}

/// Checks `PEFTBENCH_KERNELS` once, for a clear error before anything runs.
pub fn check_kernels_env() -> Result<Kernels, String> {
    parse_kernels(std::env::var("PEFTBENCH_KERNELS").ok().as_deref())
}

/// Whether a custom op's fused CPU kernel may run on a tensor of `dtype` on `device`.
pub fn fused_on(dtype: DType, device: &Device) -> bool {
    dtype == DType::F32 && device.is_cpu() && kernels() == Kernels::Fused
}

/// Parses `cpu`, `cuda` or `cuda:N` into a device. A CUDA device in a build without the
/// `cuda` feature is an error that says how to get one.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let name = name.trim();
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(format!(
                    "device `{name}`: expected `cpu`, `cuda` or `cuda:N`"
                ))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device `{name}`: this binary was built without CUDA (build one with scripts/build-cuda.sh, i.e. `cargo build --release --features cuda`)"
        ));
    }
    // cudarc loads the driver and CUDA libraries when the device opens and panics when one is
    // missing: that becomes an error saying what to check.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    match opened {
        Ok(device) => device.map_err(|e| format!("device `{name}`: {e}")),
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown reason");
            let why = why.split(" - ").next().unwrap_or(why);
            Err(format!(
                "device `{name}`: {why} (is there an NVIDIA driver, and does LD_LIBRARY_PATH name the CUDA 13 libraries?)"
            ))
        }
    }
}

/// The name a record gives a device (`cpu`, `cuda:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Parses a run's precision: `f32`, or `bf16` (the frozen base in bf16, trained parameters
/// and their optimizer state in f32).
pub fn parse_dtype(name: &str) -> Result<DType, String> {
    match name.trim() {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("dtype `{other}`: expected `f32` or `bf16`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_choice_parses_and_refuses_unknown_values() {
        assert_eq!(parse_kernels(None), Ok(Kernels::Fused));
        assert_eq!(parse_kernels(Some("composite")), Ok(Kernels::Composite));
        let e = parse_kernels(Some("cudnn")).unwrap_err();
        assert!(e.contains("PEFTBENCH_KERNELS=`cudnn`"), "{e}");
    }

    #[test]
    fn devices_parse_and_a_cuda_device_without_cuda_is_explained() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").unwrap_err().contains("expected `cpu`"));
        assert!(parse_device("cuda:x").unwrap_err().contains("expected"));
        if !candle_core::utils::cuda_is_available() {
            let e = parse_device("cuda:1").unwrap_err();
            assert!(e.contains("without CUDA"), "{e}");
        }
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_dtype("f16").unwrap_err().contains("`f16`"));
    }
}
