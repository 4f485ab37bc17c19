//! [`CudaModelRunner`]: the Llama-family forward on one NVIDIA GPU.
//!
//! Per step: the batch's token ids, positions, KV slots, context lengths, block tables and
//! logits rows are packed into one `i32` buffer and copied to the device in one transfer; then
//! the embedding gather, and per layer RMSNorm → fused QKV GEMM (+ Qwen2 bias) → RoPE fused
//! with the KV-cache write → paged attention (split over key ranges and then combined when the
//! step has too few tokens to fill the GPU) → O GEMM accumulated into the residual (+ o bias) →
//! RMSNorm → fused gate/up GEMM → SiLU-and-multiply (or both in one kernel) → down GEMM accumulated into the residual;
//! then the final norm on the rows that need logits only and the LM head. Everything is
//! enqueued on one stream; the only synchronisation is the copy of the logits (or, in
//! [`CudaModelRunner::forward_greedy`], of one argmax id per row) back to the host. Activation
//! buffers grow on demand and are reused.
//!
//! Each GEMM runs on cuBLAS or on the skinny tensor-core kernel of `kernels/gemm.cu`, whichever
//! [`super::gemm::tune`] found faster for its shape and token count at start-up.
//!
//! Options ([`CudaOptions`]): the device, the 16-bit type, the GEMM mode, the attention split,
//! and CUDA graphs (on by default, as in vLLM; `--enforce-eager` or `STEPSCOPE_CUDA_GRAPHS=0`
//! turn them off): a pure decode step of a shape seen before is replayed as a graph captured
//! the first time (the GPU check found replays
//! bit-identical to eager launches and 0.2-0.4 ms faster per step).
//! [`CudaModelRunner::profile_step`] times every kernel and GEMM
//! of one step with CUDA events, for the benchmark's breakdown.
//!
//! The runner is split by the data each part owns:
//! - [`weights`]: the model on the device and its upload (and the 16-bit conversions);
//! - [`step`]: the per-step host staging and device buffers, filled by `prepare`;
//! - [`forward`]: the compiled kernels and the enqueue of the forward, GEMM launches included;
//! - [`graphs`]: the captured CUDA graphs and the choice between replay and eager launch;
//! - [`profile`]: the CUDA events of [`CudaModelRunner::profile_step`].
//!
//! This file holds the runner itself: its options, its construction (device, stream, cuBLAS,
//! KV cache allocation, GEMM tuning), its accessors and the [`ModelRunner`] implementation.

mod forward;
mod graphs;
mod profile;
mod step;
mod weights;

#[cfg(test)]
mod tests;

pub use weights::{to_half_bits, weights_rounded_to};

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtrMut};

use crate::engine::model_runner::{BatchLimits, Logits, ModelBatch, ModelRunner, ModelRunnerError};
use crate::model::{KvCacheShape, LlamaWeights, ModelConfig};

use super::gemm::{GemmMode, GemmPlan};
use super::nvrtc::{self, ActDtype};
use super::{CudaError, DeviceSummary, guard, probe};

use forward::Kernels;
use graphs::Graphs;
use profile::Profiler;
use step::{Buffers, HostMeta};
use weights::{DeviceWeights, check_model};

/// Options of [`CudaModelRunner::with_options`].
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal (default 0).
    pub device: usize,
    /// 16-bit type of weights and KV cache (default: bf16 on compute capability 8.0+, else f16).
    pub dtype: Option<ActDtype>,
    /// Replay pure decode steps of up to 512 tokens as CUDA graphs (default: on, unless
    /// `STEPSCOPE_CUDA_GRAPHS=0`; `serve --enforce-eager` turns them off).
    pub cuda_graphs: bool,
    /// How GEMM implementations are picked (default: `STEPSCOPE_CUDA_GEMM`, else auto).
    pub gemm: Option<GemmMode>,
    /// Split attention over key ranges when a step has few tokens (default: on, unless
    /// `STEPSCOPE_CUDA_SPLIT_ATTENTION=0`).
    pub split_attention: bool,
    /// Run the attention of entries with many new tokens (prefill) on the tensor-core kernel of
    /// `prefill_attention.cu` (default: on where the device has it, unless
    /// `STEPSCOPE_CUDA_PREFILL_ATTENTION=0`).
    pub prefill_attention: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            dtype: None,
            cuda_graphs: std::env::var("STEPSCOPE_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            gemm: None,
            split_attention: std::env::var("STEPSCOPE_CUDA_SPLIT_ATTENTION")
                .map_or(true, |v| v != "0"),
            prefill_attention: std::env::var("STEPSCOPE_CUDA_PREFILL_ATTENTION")
                .map_or(true, |v| v != "0"),
        }
    }
}

/// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

/// Device memory besides the weights and the KV cache: the cuBLAS workspace and the start-up
/// GEMM check's buffers (freed after it).
fn working_bytes(cfg: &ModelConfig) -> usize {
    let max_n = [
        cfg.q_dim() + 2 * cfg.kv_dim(),
        cfg.hidden_size,
        2 * cfg.intermediate_size,
        cfg.vocab_size,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    let max_k = cfg.hidden_size.max(cfg.q_dim()).max(cfg.intermediate_size);
    CUBLAS_WORKSPACE_BYTES + super::gemm::tuning_bytes(max_n, max_k)
}

/// The largest step the engine will run, which sizes the activation buffers counted in the
/// KV pool's memory budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepSizes {
    pub block_size: usize,
    /// `--max-num-batched-tokens`.
    pub max_tokens: usize,
    /// `--max-num-seqs`: the most sampled logits rows of a step.
    pub max_seqs: usize,
    /// The most prompt positions whose logits a step returns for `prompt_logprobs` (the
    /// scheduler's `max_prompt_logprobs_tokens`), rows on top of `max_seqs`.
    pub max_prompt_logits: usize,
    /// The longest context (sizes the attention split and the block tables).
    pub max_model_len: usize,
}

/// Device memory held by captured CUDA graphs (an estimate: up to 64 graphs of a few hundred
/// kernel nodes each; not yet measured on a GPU).
const GRAPH_RESERVE_BYTES: usize = 64 << 20;

/// Bytes of the activation buffers at their largest for steps up to `sizes` on a GPU with
/// `sm_count` SMs, as the runner grows them (each buffer independently, to 1.5× the length
/// that made it grow), plus the step metadata.
fn activation_bytes(cfg: &ModelConfig, sizes: &StepSizes, sm_count: usize) -> usize {
    let t_max = sizes.max_tokens.max(1);
    let entries = sizes.max_seqs.clamp(1, t_max);
    let r_max = (sizes.max_seqs + sizes.max_prompt_logits).clamp(1, t_max);
    let mut lens = step::BufferLens::of(cfg, t_max, r_max, 1);
    // The split attention's partials peak at small steps, split many ways.
    for t in 1..=t_max {
        let splits = step::attention_splits(
            t,
            cfg.num_heads,
            cfg.num_kv_heads,
            sm_count,
            sizes.max_model_len,
        );
        if splits > 1 {
            lens = lens.max(step::BufferLens::of(cfg, t, 0, splits));
        }
    }
    // ids, positions, slots, context lengths, table offsets, the attention's token list and
    // prefill tiles (under one int per token and three per entry), logits rows, block tables.
    let tables = entries * sizes.max_model_len.div_ceil(sizes.block_size.max(1));
    let meta_bytes = 4 * (7 * t_max + 5 * r_max + tables);
    (lens.bytes() + meta_bytes) * 3 / 2
}

/// How `--gpu-memory-utilization` sized the KV pool, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSizing {
    pub blocks: usize,
    pub budget_bytes: usize,
    pub weight_bytes: usize,
    /// cuBLAS workspace, the start-up GEMM check, activation buffers and CUDA graphs.
    pub working_bytes: usize,
    pub kv_bytes: usize,
}

impl std::fmt::Display for KvSizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} blocks ({:.2} GiB) in a budget of {:.2} GiB: {:.2} GiB of weights, {:.2} GiB of working and activation buffers",
            self.blocks,
            self.kv_bytes as f64 / GIB,
            self.budget_bytes as f64 / GIB,
            self.weight_bytes as f64 / GIB,
            self.working_bytes as f64 / GIB,
        )
    }
}

/// `--gpu-memory-utilization` on device 0, as vLLM's profile run: the KV blocks (16-bit K and
/// V) that fit in `share` of the device's memory, and in what is free now, next to the
/// weights, the working buffers, the activation buffers of the largest step in `sizes`, and
/// the captured CUDA graphs. An error when none fit.
pub fn kv_blocks_for_memory_share(
    cfg: &ModelConfig,
    num_params: usize,
    sizes: &StepSizes,
    share: f64,
) -> Result<KvSizing, CudaError> {
    let summary = probe()?;
    let ctx = CudaContext::new(0).map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
    let (free, total) = ctx
        .mem_get_info()
        .map_err(|e| CudaError::driver("cuMemGetInfo", e))?;
    let sm_count = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?
        .max(1) as usize;
    let layout = MemoryLayout {
        total,
        free,
        weight_bytes: 2 * num_params,
        working_bytes: working_bytes(cfg)
            + activation_bytes(cfg, sizes, sm_count)
            + GRAPH_RESERVE_BYTES,
        block_bytes: 2 * cfg.num_layers * cfg.kv_dim() * 2 * sizes.block_size.max(1),
    };
    layout.kv_sizing(share).ok_or_else(|| {
        CudaError::OutOfMemory(format!(
            "--gpu-memory-utilization {share}: {:.2} GiB of {} ({:.2} GiB free) leave no room for a KV block next to {:.2} GiB of weights and {:.2} GiB of working and activation buffers (--max-num-batched-tokens {})",
            total as f64 * share / GIB,
            summary.name,
            free as f64 / GIB,
            layout.weight_bytes as f64 / GIB,
            layout.working_bytes as f64 / GIB,
            sizes.max_tokens,
        ))
    })
}

/// Device memory, in bytes, as the KV pool is sized.
#[derive(Debug, Clone, Copy)]
struct MemoryLayout {
    total: usize,
    free: usize,
    weight_bytes: usize,
    working_bytes: usize,
    block_bytes: usize,
}

impl MemoryLayout {
    /// As vLLM: `share × total` holds the weights, the working buffers and the KV cache; never
    /// more than is free. `None` when not one block fits.
    fn kv_sizing(&self, share: f64) -> Option<KvSizing> {
        let budget = ((self.total as f64 * share.clamp(0.0, 1.0)) as usize).min(self.free);
        let kv_bytes = budget.checked_sub(self.weight_bytes + self.working_bytes)?;
        let blocks = kv_bytes / self.block_bytes.max(1);
        (blocks > 0).then_some(KvSizing {
            blocks,
            budget_bytes: budget,
            weight_bytes: self.weight_bytes,
            working_bytes: self.working_bytes,
            kv_bytes: blocks * self.block_bytes,
        })
    }
}

/// A Llama-family model on an NVIDIA GPU with its paged KV cache.
pub struct CudaModelRunner {
    cfg: ModelConfig,
    dtype: ActDtype,
    kv_shape: KvCacheShape,
    summary: DeviceSummary,
    arch: String,
    // Field order is drop order: buffers and weights before the handle, stream and context.
    /// Per-op timing for benchmarks ([`CudaModelRunner::profile_step`]): events recorded after
    /// each kernel or GEMM while set.
    prof: Profiler,
    /// Captured decode steps; see `graphs`.
    graphs: Graphs,
    /// Split each token's keys over several blocks when a step has few tokens (see attention.cu).
    split_attention: bool,
    /// Streaming multiprocessors on the device (sizes the attention split).
    sm_count: usize,
    bufs: Buffers,
    host: HostMeta,
    kv: CudaSlice<u16>,
    /// Elements of one layer's K (or V) tensor.
    kv_layer_elems: usize,
    inv_freq: CudaSlice<f32>,
    weights: DeviceWeights,
    k: Kernels,
    /// Which GEMM implementation each projection uses (see `gemm`).
    gemm_plan: GemmPlan,
    /// cuBLAS workspace (explicit, so that captured GEMMs never allocate).
    _workspace: CudaSlice<u8>,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
}

impl std::fmt::Debug for CudaModelRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModelRunner")
            .field("architecture", &self.cfg.architecture)
            .field("device", &self.summary.name)
            .field("arch", &self.arch)
            .field("dtype", &self.dtype)
            .field("kv", &self.kv_shape)
            .finish()
    }
}

impl CudaModelRunner {
    /// Builds a runner on device 0: probes the device, compiles the kernels with NVRTC, uploads
    /// the weights and allocates (zeroed) K/V blocks for `kv`.
    pub fn new(
        cfg: ModelConfig,
        weights: Arc<LlamaWeights>,
        kv: KvCacheShape,
    ) -> Result<Self, CudaError> {
        Self::with_options(cfg, weights, kv, &CudaOptions::default())
    }

    pub fn with_options(
        cfg: ModelConfig,
        weights: Arc<LlamaWeights>,
        kv: KvCacheShape,
        opts: &CudaOptions,
    ) -> Result<Self, CudaError> {
        guard(|| Self::build(cfg, &weights, kv, opts))
    }

    fn build(
        cfg: ModelConfig,
        w: &LlamaWeights,
        kv: KvCacheShape,
        opts: &CudaOptions,
    ) -> Result<Self, CudaError> {
        check_model(&cfg, w, kv)?;
        let mut summary = probe()?;
        if opts.device >= summary.num_devices {
            return Err(CudaError::NoDevice(format!(
                "device {} requested, {} present",
                opts.device, summary.num_devices
            )));
        }
        let ctx = CudaContext::new(opts.device)
            .map_err(|e| CudaError::driver("cuDevicePrimaryCtxRetain", e))?;
        // One stream, one runner: cudarc's per-allocation events are pure overhead here.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?;
        summary.name = ctx
            .name()
            .map_err(|e| CudaError::driver("cuDeviceGetName", e))?;
        summary.compute_capability = (major, minor);
        let dtype = opts
            .dtype
            .unwrap_or(ActDtype::for_compute_capability(major));
        if dtype == ActDtype::Bf16 && major < 8 {
            return Err(CudaError::Unsupported(format!(
                "bf16 needs compute capability 8.0 or newer; {} is {major}.{minor}",
                summary.name
            )));
        }
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| CudaError::driver("cuDeviceGetAttribute", e))?
            .max(1) as usize;

        // KV cache: check the size against free memory first, for a clear message.
        let kv_layer_elems = kv.num_blocks * cfg.num_kv_heads * kv.block_size * cfg.head_dim;
        let kv_elems = 2 * cfg.num_layers * kv_layer_elems;
        let weight_bytes = 2 * w.num_params();
        let (free, _total) = ctx
            .mem_get_info()
            .map_err(|e| CudaError::driver("cuMemGetInfo", e))?;
        let working_bytes = working_bytes(&cfg);
        if kv_elems * 2 + weight_bytes + working_bytes > free {
            return Err(CudaError::OutOfMemory(format!(
                "the weights ({:.2} GiB in {}) and a KV cache of {} blocks of {} ({:.2} GiB), with {:.2} GiB of working buffers, do not fit in the {:.2} GiB free on {}",
                weight_bytes as f64 / GIB,
                dtype.name(),
                kv.num_blocks,
                kv.block_size,
                (kv_elems * 2) as f64 / GIB,
                working_bytes as f64 / GIB,
                free as f64 / GIB,
                summary.name
            )));
        }

        let arch = nvrtc::arch_for_device(major, minor)?;
        let k = Kernels::load(
            &ctx,
            &arch,
            dtype,
            cfg.head_dim,
            major,
            opts.prefill_attention,
        )?;
        let gemm_mode = match opts.gemm {
            Some(m) => m,
            None => GemmMode::from_env()?,
        };
        if gemm_mode == GemmMode::Skinny && major < 8 {
            return Err(CudaError::Unsupported(format!(
                "{}=skinny needs compute capability 8.0 or newer; {} is {major}.{minor}",
                super::gemm::GEMM_MODE_ENV,
                summary.name
            )));
        }

        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| CudaError::cublas("cublasCreate", e))?;
        let mut workspace = stream
            .alloc_zeros::<u8>(CUBLAS_WORKSPACE_BYTES)
            .map_err(|e| CudaError::driver("cuMemAlloc (cuBLAS workspace)", e))?;
        {
            let (ws, _g) = workspace.device_ptr_mut(&stream);
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ws as *mut c_void,
                    CUBLAS_WORKSPACE_BYTES,
                )
            }
            .result()
            .map_err(|e| CudaError::cublas("cublasSetWorkspace", e))?;
        }
        let weights = DeviceWeights::upload(&stream, w, dtype)?;
        let kv_buf = stream
            .alloc_zeros::<u16>(kv_elems.max(1))
            .map_err(|e| CudaError::driver("cuMemAlloc (KV cache)", e))?;
        let inv_freq = stream
            .clone_htod(&cfg.rope_inv_freq())
            .map_err(|e| CudaError::driver("cuMemcpyHtoD", e))?;
        stream
            .synchronize()
            .map_err(|e| CudaError::driver("cuStreamSynchronize", e))?;

        let mut runner = CudaModelRunner {
            cfg,
            dtype,
            kv_shape: kv,
            summary,
            arch,
            bufs: Buffers::new(),
            prof: Profiler::default(),
            graphs: Graphs::new(opts.cuda_graphs),
            split_attention: opts.split_attention,
            sm_count,
            host: HostMeta::default(),
            kv: kv_buf,
            kv_layer_elems,
            inv_freq,
            weights,
            k,
            gemm_plan: GemmPlan::cublas_only(
                gemm_mode,
                (major < 8).then(|| format!("compute capability {major}.{minor} (needs 8.0+)")),
            ),
            _workspace: workspace,
            blas,
            stream,
            ctx,
        };
        if gemm_mode != GemmMode::Cublas && runner.k.skinny_gemm.is_some() {
            let t = std::time::Instant::now();
            let shapes = runner.gemm_shapes();
            let plan = super::gemm::tune(
                &runner.stream,
                dtype,
                gemm_mode,
                &shapes,
                &|imp, m, n, k, w, x, y, acc| runner.launch_gemm(imp, m, n, k, w, x, y, acc),
                &|m, inter, gate_up, act| runner.launch_swiglu(m, inter, gate_up, act),
            )?;
            tracing::debug!(
                "CUDA GEMM plan ({:.0} ms): {}",
                t.elapsed().as_secs_f64() * 1e3,
                plan.describe().join("; ")
            );
            runner.gemm_plan = plan;
        }
        Ok(runner)
    }

    /// Which GEMM implementation each projection uses, and the start-up timings behind it.
    pub fn gemm_plan(&self) -> &GemmPlan {
        &self.gemm_plan
    }

    pub fn dtype(&self) -> ActDtype {
        self.dtype
    }

    /// The device, as probed.
    pub fn device(&self) -> &DeviceSummary {
        &self.summary
    }

    /// The `--gpu-architecture` the kernels were compiled for.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Bytes of weight matrices one forward reads (projections and LM head, 16-bit).
    pub fn weight_matrix_bytes(&self) -> usize {
        self.weights.matrix_bytes
    }

    /// Bytes of K and V one token occupies across all layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.cfg.kv_dim() * 2
    }

    /// The CUDA stream everything runs on (for benchmarks).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn backend_err(e: CudaError) -> ModelRunnerError {
    ModelRunnerError::Backend(format!("cuda: {e}"))
}

impl ModelRunner for CudaModelRunner {
    fn limits(&self) -> BatchLimits {
        self.kv_shape.batch_limits(&self.cfg)
    }

    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        let r = self.enqueue_forward(batch)?;
        let vocab = self.cfg.vocab_size;
        let mut data = vec![0.0f32; r * vocab];
        if r > 0 {
            guard(|| {
                let src = self
                    .bufs
                    .logits
                    .slice
                    .as_ref()
                    .expect("ensured")
                    .slice(0..r * vocab);
                self.stream
                    .memcpy_dtoh(&src, &mut data[..])
                    .map_err(|e| CudaError::driver("cuMemcpyDtoH", e))?;
                self.stream
                    .synchronize()
                    .map_err(|e| CudaError::driver("cuStreamSynchronize", e))
            })
            .map_err(backend_err)?;
        }
        Ok(Logits {
            vocab_size: vocab,
            data,
        })
    }
}
