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
use crate::model::quant::BlockFormat;
use crate::model::{KvCacheShape, LoadedModel, MatrixStorage, ModelError};

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

    /// `auto`: CUDA when a usable device is present, else the CPU; with the one line the log
    /// gives for the choice (which device, or why not CUDA).
    pub fn cuda_or_cpu() -> (Device, String) {
        match cuda::probe() {
            Ok(s) => {
                let line = format!("using CUDA device 0: {s}");
                (Device::Cuda(s), line)
            }
            Err(e) => (Device::Cpu, format!("using the CPU: {e}")),
        }
    }
}

impl Device {
    /// vLLM `serve`'s batch defaults on this device: `(max_num_seqs, max_num_batched_tokens)`.
    pub fn vllm_batch_defaults(&self) -> (usize, usize) {
        match self {
            Device::Cpu => (128, 2048),
            Device::Cuda(d)
                if d.total_memory_bytes >= 70 << 30 && !d.name.to_lowercase().contains("a100") =>
            {
                (1024, 8192)
            }
            Device::Cuda(_) => (256, 2048),
        }
    }
}

/// The CPU's KV pool when `--num-kv-blocks` is not given.
pub const DEFAULT_CPU_KV_BLOCKS: usize = 2048;

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(s) => write!(f, "cuda: {s}"),
        }
    }
}

/// What the model computes in (`--dtype`, vLLM's spellings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModelDtype {
    /// The backend's own: float32 on the CPU; on CUDA bfloat16 (compute capability 8.0+) or
    /// float16.
    #[default]
    Auto,
    Float32,
    BFloat16,
    Float16,
}

impl ModelDtype {
    /// vLLM's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ModelDtype::Auto => "auto",
            ModelDtype::Float32 => "float32",
            ModelDtype::BFloat16 => "bfloat16",
            ModelDtype::Float16 => "float16",
        }
    }
}

/// How to hold a checkpoint's matrices for `device` and `--dtype`: the CPU keeps bfloat16 and
/// float16 weights in half precision (f32 accumulation); everything else loads f32 matrices
/// (CUDA converts them itself).
pub fn cpu_matrix_storage(device: &Device, dtype: ModelDtype) -> MatrixStorage {
    match (device, dtype) {
        (Device::Cpu, ModelDtype::BFloat16) => MatrixStorage::Half(BlockFormat::Bf16),
        (Device::Cpu, ModelDtype::Float16) => MatrixStorage::Half(BlockFormat::F16),
        _ => MatrixStorage::F32,
    }
}

/// Why [`build_runner`] failed.
#[derive(Debug, Error)]
pub enum BuildRunnerError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error("--dtype {asked}: {why}")]
    Dtype { asked: &'static str, why: String },
}

/// How [`build_runner`] builds a runner (`--dtype`, `--enforce-eager`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunnerSettings {
    pub dtype: ModelDtype,
    /// Never replay steps as CUDA graphs (on CUDA they are on by default for decode steps,
    /// unless `STEPSCOPE_CUDA_GRAPHS=0`); the CPU always runs eagerly.
    pub enforce_eager: bool,
}

impl From<ModelDtype> for RunnerSettings {
    fn from(dtype: ModelDtype) -> Self {
        RunnerSettings {
            dtype,
            enforce_eager: false,
        }
    }
}

/// Builds the model runner for a resolved device: the CPU runner or a [`CudaModelRunner`],
/// computing in `settings.dtype` where the backend supports it (a clear error where it does
/// not).
pub fn build_runner(
    model: &LoadedModel,
    kv: KvCacheShape,
    device: &Device,
    settings: impl Into<RunnerSettings>,
) -> Result<Box<dyn ModelRunner>, BuildRunnerError> {
    let RunnerSettings {
        dtype,
        enforce_eager,
    } = settings.into();
    let refuse = |why: &str| BuildRunnerError::Dtype {
        asked: dtype.name(),
        why: why.to_string(),
    };
    Ok(match device {
        Device::Cpu => {
            let held = model.weights.matrix_format();
            let wanted = match dtype {
                ModelDtype::BFloat16 => Some("BF16"),
                ModelDtype::Float16 => Some("F16"),
                ModelDtype::Auto | ModelDtype::Float32 => None,
            };
            if wanted.is_some_and(|w| w != held) {
                return Err(refuse(&format!(
                    "the weights were loaded as {held} (load them with cpu_matrix_storage)"
                )));
            }
            Box::new(cpu::CpuModelRunner::new(
                model.info.config.clone(),
                model.weights.clone(),
                kv,
            )?)
        }
        Device::Cuda(_) => {
            let act = match dtype {
                ModelDtype::Auto => None,
                ModelDtype::BFloat16 => Some(cuda::nvrtc::ActDtype::Bf16),
                ModelDtype::Float16 => Some(cuda::nvrtc::ActDtype::F16),
                ModelDtype::Float32 => {
                    return Err(refuse(
                        "the CUDA backend computes in 16 bits (use auto, bfloat16 or float16)",
                    ));
                }
            };
            let defaults = cuda::runner::CudaOptions::default();
            let options = cuda::runner::CudaOptions {
                dtype: act,
                cuda_graphs: defaults.cuda_graphs && !enforce_eager,
                ..defaults
            };
            Box::new(CudaModelRunner::with_options(
                model.info.config.clone(),
                model.weights.clone(),
                kv,
                &options,
            )?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_runs_16_bit_dtypes_on_half_precision_weights() {
        use crate::engine::model_runner::{BatchEntry, ModelBatch};
        let kv = KvCacheShape {
            num_blocks: 8,
            block_size: 4,
        };
        let tokens = [3u32, 14, 15, 92, 65];
        let run = |model: &LoadedModel, dtype| {
            let mut runner = build_runner(model, kv, &Device::Cpu, dtype).expect("builds");
            runner
                .forward(&ModelBatch {
                    entries: vec![BatchEntry {
                        request_id: 1,
                        token_ids: &tokens,
                        start_position: 0,
                        block_table: &[0, 1],
                        needs_logits: true,
                        all_logits: false,
                    }],
                })
                .expect("forward")
                .data
        };
        let f32_model = crate::model::load_model_files("builtin:tiny").expect("tiny");
        let reference = run(&f32_model, ModelDtype::Float32);
        for (dtype, name, tol) in [
            (ModelDtype::BFloat16, "BF16", 0.1),
            (ModelDtype::Float16, "F16", 0.02),
        ] {
            let storage = cpu_matrix_storage(&Device::Cpu, dtype);
            let model = crate::model::load_model_files_as("builtin:tiny", storage).expect("tiny");
            assert_eq!(model.weights.matrix_format(), name);
            let logits = run(&model, dtype);
            let diff = logits
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff > 0.0 && diff < tol, "{name}: {diff}");
        }
    }

    #[test]
    fn the_cpu_refuses_16_bit_dtypes_by_name_on_f32_weights_and_takes_float32() {
        let model = crate::model::load_model_files("builtin:tiny").expect("tiny");
        let kv = KvCacheShape {
            num_blocks: 8,
            block_size: 4,
        };
        for dtype in [ModelDtype::BFloat16, ModelDtype::Float16] {
            let error = build_runner(&model, kv, &Device::Cpu, dtype)
                .err()
                .expect("refused")
                .to_string();
            assert!(
                error.starts_with(&format!("--dtype {}: ", dtype.name())),
                "{error}"
            );
        }
        for dtype in [ModelDtype::Auto, ModelDtype::Float32] {
            assert!(build_runner(&model, kv, &Device::Cpu, dtype).is_ok());
        }
    }
}
