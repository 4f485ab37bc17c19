//! Model backends: implementations of the engine's `ModelRunner` trait for a device. `cpu` is
//! the default (f32, rayon-parallel, paged KV cache in host memory); `cuda` runs on an NVIDIA GPU
//! (bf16 weights, cuBLAS, our NVRTC-compiled kernels).
//!
//! This module owns the device choice: [`Device`] is where a runner will run once
//! `cpu|cuda|auto` has been decided ([`Device::cuda`] for `cuda`, [`Device::cuda_or_cpu`] for
//! `auto`), and [`build_runner`] builds the runner for it. The `--device` flag itself is the
//! CLI's, which resolves it into a [`Device`] at its edge.

pub mod cpu;
pub mod cuda;

use std::fmt;

use thiserror::Error;

use crate::engine::model_runner::ModelRunner;
use crate::model::{KvCacheShape, LoadedModel, ModelError};

use cuda::{CudaError, CudaModelRunner, DeviceSummary};

/// The device a runner will use, after `auto` has been decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(DeviceSummary),
}

impl Device {
    /// `cuda`: device 0 as probed, or an error saying why it is not usable.
    pub fn cuda() -> Result<Device, CudaError> {
        cuda::probe().map(Device::Cuda)
    }

    /// `auto`: CUDA when a usable device is present, else the CPU with the reason (for a log
    /// line).
    pub fn cuda_or_cpu() -> (Device, Option<String>) {
        match cuda::probe() {
            Ok(s) => (Device::Cuda(s), None),
            Err(e) => (Device::Cpu, Some(format!("using the CPU: {e}"))),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(s) => write!(f, "cuda: {s}"),
        }
    }
}

/// Why [`build_runner`] failed.
#[derive(Debug, Error)]
pub enum BuildRunnerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// Builds the model runner for a resolved device: the CPU runner or a [`CudaModelRunner`].
pub fn build_runner(
    model: &LoadedModel,
    kv: KvCacheShape,
    device: &Device,
) -> Result<Box<dyn ModelRunner>, BuildRunnerError> {
    Ok(match device {
        Device::Cpu => Box::new(cpu::CpuModelRunner::new(
            model.info.config.clone(),
            model.weights.clone(),
            kv,
        )?),
        Device::Cuda(_) => Box::new(CudaModelRunner::new(
            model.info.config.clone(),
            model.weights.clone(),
            kv,
        )?),
    })
}
