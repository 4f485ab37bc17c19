//! Start-up shared by `serve` and `generate`: load the model, build its runner on the resolved
//! device, size the KV cache, and start the engine thread with a step observer (the step
//! tracer, or a no-op).
//!
//! Everything here runs once, before the first request; errors are reported with the setting
//! that caused them (`anyhow` at this edge). What to launch arrives as a [`LaunchConfig`]: the
//! CLI converts its flags into one (`TryFrom<&EngineArgs>` in `cli.rs`), so this module does not
//! know the flags.

use crate::backend::{self, Device, ModelDtype};
use crate::engine::{Engine, EngineConfig, EngineHandle, StepObserver};
use crate::model::hub::{self, HubSettings};
use crate::model::{KvCacheShape, LoadedModel, MatrixStorage, ModelInfo};
use anyhow::Context;
use std::sync::Arc;

/// What [`launch`] starts: the engine configuration and the device, `auto` already resolved.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// `num_kv_blocks` is used as given unless `kv_pool` says to size it from device memory.
    pub engine: EngineConfig,
    pub device: Device,
    /// What `--device auto` chose and why, for a log line.
    pub device_note: Option<String>,
    /// `--dtype`.
    pub dtype: ModelDtype,
    /// `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    pub kv_pool: KvPoolSize,
    /// Where a model given by Hugging Face id is found (`--revision`, `HF_*`).
    pub hub: HubSettings,
}

impl LaunchConfig {
    /// `engine` on the CPU, as configured, computing in float32 (the hub settings from the
    /// environment, whose `HF_HUB_DOWNLOAD_TIMEOUT` may be invalid).
    pub fn cpu(engine: EngineConfig) -> Result<Self, hub::HubError> {
        Ok(Self {
            engine,
            device: Device::Cpu,
            device_note: None,
            dtype: ModelDtype::Auto,
            enforce_eager: false,
            kv_pool: KvPoolSize::AsConfigured,
            hub: HubSettings::from_env(|name| std::env::var(name).ok(), None)?,
        })
    }
}

/// How many KV blocks the pool has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvPoolSize {
    /// `engine.num_kv_blocks`, on any device (`--num-kv-blocks`, or the CPU's default).
    AsConfigured,
    /// On CUDA, as many as fit in this share of the device's memory (`--gpu-memory-utilization`);
    /// on the CPU, `engine.num_kv_blocks`.
    DeviceMemoryShare(f64),
}

/// Loads `builtin:tiny`, a model directory, or a Hugging Face id (`org/name`, resolved in the
/// hub cache and downloaded when allowed; the model is then named by its id, as in vLLM).
fn load_model(
    model_spec: &str,
    hub_settings: &HubSettings,
    storage: MatrixStorage,
) -> anyhow::Result<LoadedModel> {
    if !hub::is_hub_id(model_spec) {
        if let Some(revision) = &hub_settings.revision {
            anyhow::bail!(
                "--revision {revision}: a revision applies to a Hugging Face id (org/name), not to `{model_spec}`"
            );
        }
        return crate::model::load_model_files_as(model_spec, storage)
            .with_context(|| format!("loading model `{model_spec}`"));
    }
    let dir = hub::resolve(model_spec, hub_settings)?;
    let path = dir.to_str().context("the hub cache path is not UTF-8")?;
    let mut model = crate::model::load_model_files_as(path, storage)
        .with_context(|| format!("loading model `{model_spec}` from {}", dir.display()))?;
    model.info.name = model_spec.to_string();
    Ok(model)
}

/// A started engine and the model description the text side needs.
pub struct LaunchedEngine {
    pub engine: EngineHandle,
    pub model: Arc<ModelInfo>,
    /// The device the model runs on (`auto` resolved).
    pub device: Device,
}

/// Loads `model_spec` and starts the engine on its own thread. `config` is a [`LaunchConfig`]
/// or anything that converts into one (the CLI's engine flags).
pub fn launch<C>(
    model_spec: &str,
    config: C,
    observer: Box<dyn StepObserver>,
) -> anyhow::Result<LaunchedEngine>
where
    C: TryInto<LaunchConfig>,
    C::Error: Into<anyhow::Error>,
{
    let LaunchConfig {
        engine: mut engine_config,
        device,
        device_note,
        dtype,
        enforce_eager,
        kv_pool,
        hub: hub_settings,
    } = config.try_into().map_err(Into::into)?;
    if let Some(line) = device_note {
        tracing::info!("--device auto: {line}");
    }
    if enforce_eager && device == Device::Cpu {
        tracing::info!("--enforce-eager: the CPU backend always runs eagerly");
    }
    let model = load_model(
        model_spec,
        &hub_settings,
        backend::cpu_matrix_storage(&device, dtype),
    )?;
    if let (KvPoolSize::DeviceMemoryShare(share), Device::Cuda(_)) = (kv_pool, &device) {
        let sizing = backend::cuda::runner::kv_blocks_for_memory_share(
            &model.info.config,
            model.weights.num_params(),
            &backend::cuda::runner::StepSizes {
                block_size: engine_config.block_size,
                max_tokens: engine_config.max_num_batched_tokens,
                max_seqs: engine_config.max_num_seqs,
                max_prompt_logits: engine_config.max_prompt_logprobs_tokens,
                max_model_len: engine_config
                    .max_model_len
                    .unwrap_or(model.info.config.max_model_len),
            },
            share,
        )?;
        engine_config.num_kv_blocks = sizing.blocks;
        tracing::info!(
            num_kv_blocks = sizing.blocks,
            gpu_memory_utilization = share,
            "KV pool sized from device memory: {sizing}"
        );
    }
    let kv = KvCacheShape {
        num_blocks: engine_config.num_kv_blocks,
        block_size: engine_config.block_size,
    };
    let settings = backend::RunnerSettings {
        dtype,
        enforce_eager,
    };
    let runner = backend::build_runner(&model, kv, &device, settings)
        .with_context(|| format!("preparing model `{model_spec}` on {device}"))?;
    let info = model.info;
    let engine = Engine::start(engine_config, runner, observer).context("starting the engine")?;
    Ok(LaunchedEngine {
        engine,
        model: Arc::new(info),
        device,
    })
}
