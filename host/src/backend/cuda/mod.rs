//! The CUDA backend: [`CudaModelRunner`] runs the Llama-family forward on an NVIDIA GPU through
//! cudarc, with the same contract as the CPU runner (flattened batch of prefill chunks and decode
//! tokens, paged KV cache addressed by the engine's block ids, one logits row per entry that
//! needs one).
//!
//! - Weights live on the device in bf16 (f16 on GPUs older than compute capability 8.0); norms
//!   and biases stay f32. Every projection is one GEMM (16-bit inputs, f32 accumulation and
//!   output): cuBLAS `GemmEx`, or for decode-sized batches our skinny tensor-core kernel where
//!   the start-up timing found it faster ([`gemm`]); the o and down projections accumulate
//!   straight into the f32 residual stream.
//! - The KV cache is one device allocation per run, `[layer][K|V][block][kv_head][slot][dim]`
//!   in the 16-bit type, indexed by the engine's block ids.
//! - Our own kernels (`kernels/*.cu`: embedding gather, RMSNorm, RoPE fused with the KV-cache write, paged
//!   attention with its key-range split and combine, tensor-core prefill attention for entries
//!   with many new tokens, skinny GEMM, SiLU-and-multiply, bias and
//!   residual adds, greedy argmax) are embedded with
//!   `include_str!` and compiled at start-up by NVRTC for the device's compute capability
//!   (`sm_XY` cubin; [`nvrtc`]).
//! - Libraries are loaded at run time (cudarc `dynamic-loading`), so the binary builds and runs
//!   without CUDA; [`libs`] finds `libcuda`, `libnvrtc` and `libcublas` on the default search
//!   path or in the usual install locations, and a missing library or device is a clear
//!   [`CudaError`] at start-up, never a panic.
//!
//! [`cuda_available`] says whether a usable device is present; the choice between the CPU and
//! CUDA (`--device cpu|cuda|auto`) is [`crate::backend::Device`]'s.

pub mod gemm;
pub mod libs;
pub mod nvrtc;
pub mod runner;

#[cfg(test)]
pub(crate) mod tests;

use std::fmt;
use std::sync::OnceLock;

use thiserror::Error;

pub use runner::CudaModelRunner;

/// Why the CUDA backend cannot start or a CUDA call failed.
#[derive(Debug, Error)]
pub enum CudaError {
    #[error("{library} was not found ({searched}); {hint}")]
    LibraryMissing {
        library: &'static str,
        searched: String,
        hint: &'static str,
    },
    #[error("no CUDA device is usable: {0}")]
    NoDevice(String),
    #[error("CUDA driver call `{call}` failed: {message}")]
    Driver { call: &'static str, message: String },
    #[error("cuBLAS call `{call}` failed: {message}")]
    Cublas { call: &'static str, message: String },
    #[error("NVRTC failed to compile kernels/{file} for {arch}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        log: String,
    },
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
    #[error("the CUDA backend does not support this model: {0}")]
    Unsupported(String),
    #[error("invalid KV cache shape: {0}")]
    InvalidKvShape(String),
    #[error("a CUDA library call panicked: {0}")]
    Panic(String),
}

impl CudaError {
    pub(crate) fn driver(call: &'static str, e: impl fmt::Debug) -> Self {
        let message = format!("{e:?}");
        if message.contains("OUT_OF_MEMORY") {
            return CudaError::OutOfMemory(format!("{call}: {message}"));
        }
        CudaError::Driver { call, message }
    }

    pub(crate) fn cublas(call: &'static str, e: impl fmt::Debug) -> Self {
        CudaError::Cublas {
            call,
            message: format!("{e:?}"),
        }
    }
}

/// Runs `f`, turning a panic inside a CUDA library binding (cudarc panics when a library or
/// symbol cannot be loaded) into [`CudaError::Panic`].
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "unknown panic".to_owned());
            Err(CudaError::Panic(msg))
        }
    }
}

/// What the probe found about device 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub num_devices: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
    /// `nvrtcVersion`.
    pub nvrtc_version: (i32, i32),
}

impl fmt::Display for DeviceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (compute capability {}.{}, {:.1} GiB, driver CUDA {}.{}, NVRTC {}.{})",
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory_bytes as f64 / (1u64 << 30) as f64,
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1,
        )
    }
}

/// Checks, once per process, that the driver, NVRTC and cuBLAS load and that a device exists.
pub fn probe() -> Result<DeviceSummary, CudaError> {
    static PROBE: OnceLock<Result<DeviceSummary, String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            probe_uncached().map_err(|e| match e {
                CudaError::NoDevice(why) => why,
                other => other.to_string(),
            })
        })
        .clone()
        .map_err(CudaError::NoDevice)
}

/// The oldest GPUs the backend runs on (compute capability 7.0, Volta), as vLLM.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (7, 0);

/// Probes device 0. The error says which of the reasons `--device auto` logs it is: no NVIDIA
/// driver, no CUDA device, a compute capability below [`MIN_COMPUTE_CAPABILITY`], or a missing
/// CUDA library.
fn probe_uncached() -> Result<DeviceSummary, CudaError> {
    guard(|| {
        libs::ensure_driver().map_err(|e| CudaError::NoDevice(format!("no NVIDIA driver: {e}")))?;
        use cudarc::driver::{CudaContext, result as dr};
        dr::init().map_err(|e| CudaError::NoDevice(format!("no CUDA device: cuInit: {e:?}")))?;
        let count =
            CudaContext::device_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(CudaError::NoDevice(
                "no CUDA device: the driver reports none".into(),
            ));
        }
        let dev = dr::device::get(0).map_err(|e| CudaError::driver("cuDeviceGet", e))?;
        let name =
            dr::device::get_name(dev).map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        let total = unsafe { dr::device::total_mem(dev) }
            .map_err(|e| CudaError::driver("cuDeviceTotalMem", e))?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let major = unsafe {
            dr::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        }
        .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        let minor = unsafe {
            dr::device::get_attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
        }
        .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        if (major, minor) < MIN_COMPUTE_CAPABILITY {
            return Err(CudaError::NoDevice(format!(
                "{name} has compute capability {major}.{minor}, below {}.{}, the oldest this backend supports",
                MIN_COMPUTE_CAPABILITY.0, MIN_COMPUTE_CAPABILITY.1
            )));
        }
        let mut driver_version = 0;
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| CudaError::driver("cuDriverGetVersion", e))?;
        libs::ensure_cublas()?;
        let nvrtc_version = nvrtc::version()?;
        Ok(DeviceSummary {
            num_devices: count as usize,
            name,
            compute_capability: (major, minor),
            total_memory_bytes: total,
            driver_version,
            nvrtc_version,
        })
    })
}

/// Whether a usable CUDA device is present (driver, device, NVRTC and cuBLAS all load). Never
/// panics; the first call costs a driver initialisation, later calls are free.
pub fn cuda_available() -> bool {
    probe().is_ok()
}
