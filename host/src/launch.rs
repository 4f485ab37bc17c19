//! Start-up shared by `serve` and `generate`: load the model, pick the device, size the KV
//! cache, and start the engine thread with a step observer (the step tracer, or a no-op).
//!
//! Everything here runs once, before the first request; errors are reported with the setting
//! that caused them (`anyhow` at this edge).

use crate::backend::cuda::{self, DeviceArg};
use crate::cli::{Device, EngineArgs};
use crate::engine::{Engine, EngineConfig, EngineHandle, StepObserver};
use crate::model::{KvCacheShape, ModelInfo};
use anyhow::Context;
use std::sync::Arc;

/// A started engine and the model description the text side needs.
pub struct LaunchedEngine {
    pub engine: EngineHandle,
    pub model: Arc<ModelInfo>,
    /// The device the model runs on (`auto` resolved).
    pub device: Device,
}

/// The engine configuration the flags ask for.
pub fn engine_config(args: &EngineArgs) -> EngineConfig {
    EngineConfig {
        block_size: args.block_size,
        num_kv_blocks: args.num_kv_blocks,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len,
        max_waiting_requests: args.max_waiting_requests,
        enable_prefix_caching: !args.no_enable_prefix_caching,
        seed: args.seed,
    }
}

/// Loads `model_spec` and starts the engine on its own thread.
pub fn launch(
    model_spec: &str,
    args: &EngineArgs,
    observer: Box<dyn StepObserver>,
) -> anyhow::Result<LaunchedEngine> {
    let kv = KvCacheShape {
        num_blocks: args.num_kv_blocks,
        block_size: args.block_size,
    };
    let (device, why) = cuda::resolve_device(match args.device {
        Device::Cpu => DeviceArg::Cpu,
        Device::Cuda => DeviceArg::Cuda,
        Device::Auto => DeviceArg::Auto,
    })
    .context("--device")?;
    if let Some(why) = why {
        tracing::info!("--device auto: {why}");
    }
    let model = crate::model::load_model_files(model_spec)
        .with_context(|| format!("loading model `{model_spec}`"))?;
    let runner = cuda::build_runner(&model, kv, &device)
        .with_context(|| format!("preparing model `{model_spec}` on {device}"))?;
    let info = model.info;
    let device = match device {
        cuda::Device::Cpu => Device::Cpu,
        cuda::Device::Cuda(_) => Device::Cuda,
    };
    let engine =
        Engine::start(engine_config(args), runner, observer).context("starting the engine")?;
    Ok(LaunchedEngine {
        engine,
        model: Arc::new(info),
        device,
    })
}
