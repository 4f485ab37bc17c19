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
//! and CUDA graphs (off by default; `STEPSCOPE_CUDA_GRAPHS=1`): a pure decode step of a shape
//! seen before is replayed as a graph captured the first time (the GPU check found replays
//! bit-identical to eager launches and 0.2-0.4 ms faster per step).
//! [`CudaModelRunner::profile_step`] times every kernel and GEMM
//! of one step with CUDA events, for the benchmark's breakdown.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use rayon::prelude::*;

use crate::engine::model_runner::{Logits, ModelBatch, ModelRunner, ModelRunnerError};
use crate::model::weights::Matrix;
use crate::model::{KvCacheShape, LlamaWeights, ModelConfig};

use super::gemm::{GemmImpl, GemmMode, GemmPlan, GemmShape, token_tile};
use super::nvrtc::{self, ActDtype, SKINNY_GEMM_TOKEN_TILES, SKINNY_GEMM_WARPS, attention_warps};
use super::{CudaError, DeviceSummary, guard, libs, probe};

/// Largest query-head group one attention block handles (`ATTN_MAX_GROUP` in attention.cu).
const ATTN_MAX_GROUP: usize = 8;

/// Options of [`CudaModelRunner::with_options`].
#[derive(Debug, Clone)]
pub struct CudaOptions {
    /// Device ordinal (default 0).
    pub device: usize,
    /// 16-bit type of weights and KV cache (default: bf16 on compute capability 8.0+, else f16).
    pub dtype: Option<ActDtype>,
    /// Replay pure decode steps as CUDA graphs (default: `STEPSCOPE_CUDA_GRAPHS=1`, else off).
    pub cuda_graphs: bool,
    /// How GEMM implementations are picked (default: `STEPSCOPE_CUDA_GEMM`, else auto).
    pub gemm: Option<GemmMode>,
    /// Split attention over key ranges when a step has few tokens (default: on, unless
    /// `STEPSCOPE_CUDA_SPLIT_ATTENTION=0`).
    pub split_attention: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            device: 0,
            dtype: None,
            cuda_graphs: std::env::var("STEPSCOPE_CUDA_GRAPHS").is_ok_and(|v| v == "1"),
            gemm: None,
            split_attention: std::env::var("STEPSCOPE_CUDA_SPLIT_ATTENTION")
                .map_or(true, |v| v != "0"),
        }
    }
}

/// Most key ranges one token's attention is split into, and the thread blocks per SM the
/// split aims for.
const MAX_ATTENTION_SPLITS: usize = 32;
const ATTENTION_BLOCKS_PER_SM: usize = 4;
/// Fewest keys in one range (`ATTN_MIN_SPLIT` in attention.cu).
const ATTENTION_MIN_SPLIT: usize = 64;

/// Largest decode batch replayed as a CUDA graph, and how many shapes are kept.
const MAX_GRAPH_TOKENS: usize = 512;
const MAX_GRAPHS: usize = 64;
/// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;

struct DeviceLayer {
    input_norm: CudaSlice<f32>,
    qkv: CudaSlice<u16>,
    qkv_bias: Option<CudaSlice<f32>>,
    o: CudaSlice<u16>,
    o_bias: Option<CudaSlice<f32>>,
    post_norm: CudaSlice<f32>,
    gate_up: CudaSlice<u16>,
    down: CudaSlice<u16>,
}

struct DeviceWeights {
    embed: CudaSlice<u16>,
    layers: Vec<DeviceLayer>,
    final_norm: CudaSlice<f32>,
    /// `None` when tied to `embed`.
    lm_head: Option<CudaSlice<u16>>,
    /// Bytes of the 16-bit matrices a decode step reads (all projections and the LM head).
    matrix_bytes: usize,
}

struct Kernels {
    embedding_gather: CudaFunction,
    rms_norm: CudaFunction,
    rotary_kv_cache_write: CudaFunction,
    attention: CudaFunction,
    attention_combine: CudaFunction,
    silu_and_mul: CudaFunction,
    bias_add: CudaFunction,
    argmax_rows: CudaFunction,
    /// `SKINNY_GEMM_FUNCTIONS` (compute capability 8.0+ only).
    skinny_gemm: Option<Vec<CudaFunction>>,
}

/// A growable device buffer.
struct Buf<T> {
    slice: Option<CudaSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Buf<T> {
    fn new() -> Self {
        Buf { slice: None }
    }

    /// Ensures room for `len` elements (contents are not kept) and returns the device pointer.
    /// Ensures room for `len` elements (contents are not kept) and returns the device pointer;
    /// a reallocation bumps `generation` (captured CUDA graphs hold the old addresses).
    fn ensure(
        &mut self,
        stream: &Arc<CudaStream>,
        len: usize,
        generation: &mut u64,
    ) -> Result<u64, CudaError> {
        let len = len.max(1);
        if self.slice.as_ref().is_none_or(|s| s.len() < len) {
            self.slice = None;
            *generation += 1;
            // Grow by 1.5x so that slowly growing batches do not reallocate every step.
            let cap = len + len / 2;
            self.slice = Some(
                stream
                    .alloc_zeros::<T>(cap)
                    .map_err(|e| CudaError::driver("cuMemAlloc", e))?,
            );
        }
        Ok(self.ptr(stream))
    }

    fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        self.slice.as_ref().map_or(0, |s| dptr(s, stream))
    }
}

fn dptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    // Event tracking is off (one stream), so the guard records nothing.
    let (p, _guard) = s.device_ptr(stream);
    p
}

/// Activation buffers, reused across steps.
struct Buffers {
    x: Buf<f32>,
    h: Buf<u16>,
    qkv: Buf<f32>,
    attn: Buf<u16>,
    /// Partial results of a split attention: [tokens, heads, splits, head_dim + 2] f32.
    attn_part: Buf<f32>,
    gate_up: Buf<f32>,
    act: Buf<u16>,
    meta: Buf<i32>,
    final_h: Buf<u16>,
    logits: Buf<f32>,
    ids: Buf<u32>,
    /// Bumped whenever a buffer is reallocated.
    generation: u64,
}

/// Host-side staging for one step.
#[derive(Default)]
struct HostMeta {
    /// ids | positions | slots | context lengths | block-table offsets | logits rows | tables.
    packed: Vec<i32>,
    ids: Vec<i32>,
    positions: Vec<i32>,
    slots: Vec<i32>,
    ctx_lens: Vec<i32>,
    bt_offsets: Vec<i32>,
    logit_rows: Vec<i32>,
    tables: Vec<i32>,
    num_entries: usize,
}

/// A captured CUDA graph. cudarc leaves `CudaGraph` `!Send` (it holds raw handles); the driver
/// allows launching an executable graph from any thread with the context current, which every
/// entry point of the runner makes sure of, and the runner uses its graphs only through
/// `&mut self`.
struct SendGraph(CudaGraph);

// SAFETY: see above; the graph is only ever used by one thread at a time (through `&mut self`).
unsafe impl Send for SendGraph {}

/// Device pointers of one step: metadata and activations.
#[derive(Clone, Copy)]
struct StepPtrs {
    meta: MetaPtrs,
    x: u64,
    h: u64,
    qkv: u64,
    attn: u64,
    attn_part: u64,
    /// Key ranges of the split attention (1: not split).
    attn_splits: usize,
    gate_up: u64,
    act: u64,
    final_h: u64,
    logits: u64,
}

/// Device pointers into the packed metadata of the current step.
#[derive(Clone, Copy)]
struct MetaPtrs {
    ids: u64,
    positions: u64,
    slots: u64,
    ctx_lens: u64,
    bt_offsets: u64,
    logit_rows: u64,
    tables: u64,
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
    prof: RefCell<Option<Vec<(&'static str, CudaEvent)>>>,
    /// Captured decode steps by (tokens, logits rows, attention splits); see `enqueue_prepared`.
    graphs: HashMap<(usize, usize, usize), SendGraph>,
    graph_generation: u64,
    use_graphs: bool,
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

fn gemm_dtype(d: ActDtype) -> cudaDataType {
    match d {
        ActDtype::Bf16 => cudaDataType::CUDA_R_16BF,
        ActDtype::F16 => cudaDataType::CUDA_R_16F,
    }
}

/// Converts f32 values to the 16-bit type (round to nearest, ties to even), in parallel.
pub fn to_half_bits(data: &[f32], dtype: ActDtype) -> Vec<u16> {
    let mut out = vec![0u16; data.len()];
    out.par_chunks_mut(1 << 16)
        .zip(data.par_chunks(1 << 16))
        .for_each(|(o, d)| match dtype {
            ActDtype::Bf16 => o
                .iter_mut()
                .zip(d)
                .for_each(|(o, &x)| *o = half::bf16::from_f32(x).to_bits()),
            ActDtype::F16 => o
                .iter_mut()
                .zip(d)
                .for_each(|(o, &x)| *o = half::f16::from_f32(x).to_bits()),
        });
    out
}

/// Rounds f32 values to the 16-bit type and back (what the device computes with).
pub fn round_to_dtype(data: &mut [f32], dtype: ActDtype) {
    data.par_chunks_mut(1 << 16).for_each(|c| match dtype {
        ActDtype::Bf16 => c
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        ActDtype::F16 => c
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
    });
}

/// A copy of `w` with every matrix rounded to `dtype` (norms and biases kept in f32): the
/// weights a CPU reference must use to see only the GPU's arithmetic differences.
pub fn weights_rounded_to(w: &LlamaWeights, dtype: ActDtype) -> LlamaWeights {
    let mut w = w.clone();
    let round = |m: &mut Matrix| round_to_dtype(&mut m.data, dtype);
    round(&mut w.embed);
    if let Some(m) = w.lm_head.as_mut() {
        round(m);
    }
    for l in &mut w.layers {
        round(&mut l.qkv);
        round(&mut l.o);
        round(&mut l.gate_up);
        round(&mut l.down);
    }
    w
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

    /// [`CudaModelRunner::new`] for a loaded model.
    pub fn from_model(
        model: &crate::model::LoadedModel,
        kv: KvCacheShape,
    ) -> Result<Self, CudaError> {
        Self::new(model.info.config.clone(), model.weights.clone(), kv)
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
        // Also the cuBLAS workspace and the start-up GEMM check's buffers (freed after it).
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
        let working_bytes = CUBLAS_WORKSPACE_BYTES + super::gemm::tuning_bytes(max_n, max_k);
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
        let compiled = nvrtc::compile_all_cached(&arch, dtype)?;
        let mut modules = Vec::with_capacity(compiled.len());
        for c in compiled.iter() {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(c.image.clone()))
                .map_err(|e| CudaError::driver("cuModuleLoadData", e))?;
            modules.push((c.file, module));
        }
        let load = |file: &str, name: &str| -> Result<CudaFunction, CudaError> {
            let m = &modules
                .iter()
                .find(|(f, _)| *f == file)
                .ok_or_else(|| CudaError::Nvrtc(format!("kernels/{file} was not compiled")))?
                .1;
            m.load_function(name)
                .map_err(|e| CudaError::driver("cuModuleGetFunction", e))
        };
        let d = cfg.head_dim;
        let k = Kernels {
            embedding_gather: load("embedding.cu", "embedding_gather")?,
            rms_norm: load("rmsnorm.cu", "rms_norm")?,
            rotary_kv_cache_write: load("kv_cache.cu", "rotary_kv_cache_write")?,
            attention: load("attention.cu", &format!("paged_attention_d{d}"))?,
            attention_combine: load("attention.cu", "attention_combine")?,
            silu_and_mul: load("activation.cu", "silu_and_mul")?,
            bias_add: load("elementwise.cu", "bias_add")?,
            argmax_rows: load("sampling.cu", "argmax_rows")?,
            skinny_gemm: if major >= 8 {
                Some(
                    nvrtc::SKINNY_GEMM_FUNCTIONS
                        .iter()
                        .map(|f| load("gemm.cu", f))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            } else {
                None
            },
        };
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
        let weights = upload_weights(&stream, w, dtype)?;
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
            bufs: Buffers {
                x: Buf::new(),
                h: Buf::new(),
                qkv: Buf::new(),
                attn: Buf::new(),
                attn_part: Buf::new(),
                gate_up: Buf::new(),
                act: Buf::new(),
                meta: Buf::new(),
                final_h: Buf::new(),
                logits: Buf::new(),
                ids: Buf::new(),
                generation: 0,
            },
            prof: RefCell::new(None),
            graphs: HashMap::new(),
            graph_generation: 0,
            use_graphs: opts.cuda_graphs,
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

    /// See [`attention_splits`].
    fn attention_splits(&self, t: usize, max_ctx: usize) -> usize {
        if !self.split_attention {
            return 1;
        }
        attention_splits(
            t,
            self.cfg.num_heads,
            self.cfg.num_kv_heads,
            self.sm_count,
            max_ctx,
        )
    }

    /// The model's projections, with every layer's matrix (for [`super::gemm::tune`]).
    fn gemm_shapes(&self) -> Vec<GemmShape> {
        let cfg = &self.cfg;
        let s = &self.stream;
        let w = &self.weights;
        let per_layer = |f: fn(&DeviceLayer) -> &CudaSlice<u16>| -> Vec<u64> {
            w.layers.iter().map(|l| dptr(f(l), s)).collect()
        };
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
        );
        vec![
            GemmShape {
                label: "gemm qkv",
                n: q + 2 * kv,
                k: h,
                weights: per_layer(|l| &l.qkv),
                swiglu: false,
            },
            GemmShape {
                label: "gemm o",
                n: h,
                k: q,
                weights: per_layer(|l| &l.o),
                swiglu: false,
            },
            GemmShape {
                label: "gemm gate_up",
                n: 2 * i,
                k: h,
                weights: per_layer(|l| &l.gate_up),
                swiglu: true,
            },
            GemmShape {
                label: "gemm down",
                n: h,
                k: i,
                weights: per_layer(|l| &l.down),
                swiglu: false,
            },
            GemmShape {
                label: "gemm lm_head",
                n: cfg.vocab_size,
                k: h,
                weights: vec![dptr(w.lm_head.as_ref().unwrap_or(&w.embed), s)],
                swiglu: false,
            },
        ]
    }

    /// Which GEMM implementation each projection uses, and the start-up timings behind it.
    pub fn gemm_plan(&self) -> &GemmPlan {
        &self.gemm_plan
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn kv_shape(&self) -> KvCacheShape {
        self.kv_shape
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

    /// Libraries opened by absolute path (diagnostics).
    pub fn preloaded_libraries(&self) -> Vec<std::path::PathBuf> {
        libs::preloaded()
    }

    /// Runs one step and returns the greedy (argmax) token of each row that needs logits,
    /// computed on the device: only the ids are copied back.
    pub fn forward_greedy(&mut self, batch: &ModelBatch<'_>) -> Result<Vec<u32>, ModelRunnerError> {
        let r = self.enqueue_forward(batch)?;
        if r == 0 {
            return Ok(Vec::new());
        }
        guard(|| {
            let vocab = self.cfg.vocab_size;
            let logits = self.bufs.logits.ptr(&self.stream);
            let ids = self
                .bufs
                .ids
                .ensure(&self.stream, r, &mut self.bufs.generation)?;
            let vocab_i = vocab as i32;
            let mut b = self.stream.launch_builder(&self.k.argmax_rows);
            b.arg(&ids).arg(&logits).arg(&vocab_i);
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (r as u32, 1, 1),
                    block_dim: (1024, 1, 1),
                    shared_mem_bytes: 0,
                })
            }
            .map_err(|e| CudaError::driver("cuLaunchKernel(argmax_rows)", e))?;
            let mut out = vec![0u32; r];
            let src = self.bufs.ids.slice.as_ref().expect("ensured").slice(0..r);
            self.stream
                .memcpy_dtoh(&src, &mut out)
                .map_err(|e| CudaError::driver("cuMemcpyDtoH", e))?;
            self.stream
                .synchronize()
                .map_err(|e| CudaError::driver("cuStreamSynchronize", e))?;
            Ok(out)
        })
        .map_err(backend_err)
    }

    /// Runs one step (eagerly, with full logits) recording a CUDA event after every kernel and
    /// GEMM; returns the device time per op kind in milliseconds, in first-seen order, summed
    /// over layers. For benchmarks: the events themselves add a little time.
    pub fn profile_step(
        &mut self,
        batch: &ModelBatch<'_>,
    ) -> Result<Vec<(&'static str, f64)>, ModelRunnerError> {
        let use_graphs = std::mem::replace(&mut self.use_graphs, false);
        *self.prof.borrow_mut() = Some(Vec::new());
        let ran = self.forward(batch);
        self.use_graphs = use_graphs;
        let events = self.prof.borrow_mut().take().unwrap_or_default();
        ran?;
        let mut out: Vec<(&'static str, f64)> = Vec::new();
        for pair in events.windows(2) {
            let ms = pair[0]
                .1
                .elapsed_ms(&pair[1].1)
                .map_err(|e| backend_err(CudaError::driver("cuEventElapsedTime", e)))?;
            match out.iter_mut().find(|(l, _)| *l == pair[1].0) {
                Some((_, t)) => *t += f64::from(ms),
                None => out.push((pair[1].0, f64::from(ms))),
            }
        }
        Ok(out)
    }

    fn mark(&self, label: &'static str) -> Result<(), CudaError> {
        if let Some(events) = self.prof.borrow_mut().as_mut() {
            let ev = self
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| CudaError::driver("cuEventRecord", e))?;
            events.push((label, ev));
        }
        Ok(())
    }

    /// Validates the batch, uploads its metadata and enqueues the whole forward up to the
    /// logits; returns the number of logits rows.
    fn enqueue_forward(&mut self, batch: &ModelBatch<'_>) -> Result<usize, ModelRunnerError> {
        self.prepare(batch)?;
        guard(|| self.enqueue_prepared()).map_err(backend_err)
    }

    /// Checks the batch (as the CPU runner does) and fills the host metadata.
    fn prepare(&mut self, batch: &ModelBatch<'_>) -> Result<(), ModelRunnerError> {
        let bs = self.kv_shape.block_size;
        let num_blocks = self.kv_shape.num_blocks;
        let max_len = self.cfg.max_model_len;
        let vocab = self.cfg.vocab_size;
        let h = &mut self.host;
        h.ids.clear();
        h.positions.clear();
        h.slots.clear();
        h.ctx_lens.clear();
        h.bt_offsets.clear();
        h.logit_rows.clear();
        h.tables.clear();
        h.num_entries = batch.entries.len();
        for e in &batch.entries {
            let invalid = |msg: String| {
                ModelRunnerError::InvalidBatch(format!("request {}: {msg}", e.request_id))
            };
            if e.token_ids.is_empty() {
                return Err(invalid("no tokens to compute".into()));
            }
            let end = e.start_position + e.token_ids.len();
            if end > max_len {
                return Err(invalid(format!(
                    "positions up to {end} exceed max_model_len {max_len}"
                )));
            }
            if e.block_table.len() * bs < end {
                return Err(invalid(format!(
                    "block table of {} blocks cannot hold {end} tokens (block size {bs})",
                    e.block_table.len()
                )));
            }
            let used = end.div_ceil(bs);
            if let Some(b) = e.block_table[..used]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(invalid(format!(
                    "block id {b} out of range (num_blocks {num_blocks})"
                )));
            }
            if let Some(t) = e.token_ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid(format!(
                    "token id {t} out of range (vocab {vocab})"
                )));
            }
            let table_offset = h.tables.len() as i32;
            h.tables
                .extend(e.block_table[..used].iter().map(|&b| b as i32));
            for (i, &tok) in e.token_ids.iter().enumerate() {
                let p = e.start_position + i;
                h.ids.push(tok as i32);
                h.positions.push(p as i32);
                h.slots
                    .push((e.block_table[p / bs] as usize * bs + p % bs) as i32);
                h.ctx_lens.push(p as i32 + 1);
                h.bt_offsets.push(table_offset);
            }
            if e.needs_logits {
                h.logit_rows.push(h.ids.len() as i32 - 1);
            }
        }
        Ok(())
    }

    fn enqueue_prepared(&mut self) -> Result<usize, CudaError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| CudaError::driver("cuCtxSetCurrent", e))?;
        let t = self.host.ids.len();
        let r = self.host.logit_rows.len();
        if t == 0 {
            return Ok(0);
        }
        let p = self.upload_and_size(t, r)?;
        // A pure decode step (one token per entry) of a shape seen before replays a CUDA graph:
        // every launch parameter depends only on (t, r), the attention split count and the
        // buffers' addresses, and the per-step data is read from the metadata buffer.
        let graphable = self.use_graphs && t == self.host.num_entries && t <= MAX_GRAPH_TOKENS;
        if graphable {
            match self.replay_or_capture(t, r, &p) {
                Ok(()) => return Ok(r),
                Err(e) => {
                    tracing::warn!("CUDA graphs disabled for this runner: {e}");
                    self.use_graphs = false;
                    self.graphs.clear();
                }
            }
        }
        self.enqueue_kernels(t, r, &p)?;
        Ok(r)
    }

    fn replay_or_capture(&mut self, t: usize, r: usize, p: &StepPtrs) -> Result<(), CudaError> {
        if self.graph_generation != self.bufs.generation {
            self.graphs.clear();
            self.graph_generation = self.bufs.generation;
        }
        let key = (t, r, p.attn_splits);
        if let Some(g) = self.graphs.get(&key) {
            return g
                .0
                .launch()
                .map_err(|e| CudaError::driver("cuGraphLaunch", e));
        }
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| CudaError::driver("cuStreamBeginCapture", e))?;
        let enqueued = self.enqueue_kernels(t, r, p);
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| CudaError::driver("cuStreamEndCapture", e));
        enqueued?;
        let graph = graph?.ok_or_else(|| CudaError::Driver {
            call: "cuStreamEndCapture",
            message: "empty graph".into(),
        })?;
        graph
            .launch()
            .map_err(|e| CudaError::driver("cuGraphLaunch", e))?;
        if self.graphs.len() >= MAX_GRAPHS {
            self.graphs.clear();
        }
        self.graphs.insert(key, SendGraph(graph));
        Ok(())
    }

    /// Copies the step's metadata to the device and makes every activation buffer big enough.
    fn upload_and_size(&mut self, t: usize, r: usize) -> Result<StepPtrs, CudaError> {
        let cfg = &self.cfg;
        let stream = &self.stream;
        let (hid, q_dim, kv_dim, inter, vocab) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let qkv_dim = q_dim + 2 * kv_dim;
        let max_ctx = self.host.ctx_lens.iter().copied().max().unwrap_or(0).max(0) as usize;
        let attn_splits = self.attention_splits(t, max_ctx);

        // Metadata: one host-to-device copy. Every part's offset depends on (t, r) only: the
        // block tables, whose length varies, come last.
        let h = &mut self.host;
        h.packed.clear();
        let mut offsets = [0usize; 7];
        for (i, part) in [
            &h.ids,
            &h.positions,
            &h.slots,
            &h.ctx_lens,
            &h.bt_offsets,
            &h.logit_rows,
            &h.tables,
        ]
        .into_iter()
        .enumerate()
        {
            offsets[i] = h.packed.len();
            h.packed.extend_from_slice(part);
        }
        let b = &mut self.bufs;
        let meta_base = b.meta.ensure(stream, h.packed.len(), &mut b.generation)?;
        {
            let dst = b.meta.slice.as_mut().expect("ensured");
            let mut view = dst.slice_mut(0..h.packed.len());
            stream
                .memcpy_htod(&h.packed[..], &mut view)
                .map_err(|e| CudaError::driver("cuMemcpyHtoD", e))?;
        }
        let at = |i: usize| meta_base + (offsets[i] * 4) as u64;
        let g = &mut b.generation;
        Ok(StepPtrs {
            meta: MetaPtrs {
                ids: at(0),
                positions: at(1),
                slots: at(2),
                ctx_lens: at(3),
                bt_offsets: at(4),
                logit_rows: at(5),
                tables: at(6),
            },
            x: b.x.ensure(stream, t * hid, g)?,
            h: b.h.ensure(stream, t * hid, g)?,
            qkv: b.qkv.ensure(stream, t * qkv_dim, g)?,
            attn: b.attn.ensure(stream, t * q_dim, g)?,
            attn_part: b.attn_part.ensure(
                stream,
                t * cfg.num_heads * attn_splits * (cfg.head_dim + 2),
                g,
            )?,
            attn_splits,
            gate_up: b.gate_up.ensure(stream, t * 2 * inter, g)?,
            act: b.act.ensure(stream, t * inter, g)?,
            final_h: b.final_h.ensure(stream, r * hid, g)?,
            logits: b.logits.ensure(stream, r * vocab, g)?,
        })
    }

    /// Enqueues the forward's kernels and GEMMs (no allocation, no copy: capturable).
    fn enqueue_kernels(&self, t: usize, r: usize, p: &StepPtrs) -> Result<(), CudaError> {
        let cfg = &self.cfg;
        let stream = &self.stream;
        let (hid, q_dim, kv_dim, inter, vocab) = (
            cfg.hidden_size,
            cfg.q_dim(),
            cfg.kv_dim(),
            cfg.intermediate_size,
            cfg.vocab_size,
        );
        let qkv_dim = q_dim + 2 * kv_dim;
        let d = cfg.head_dim;
        let eps = cfg.rms_norm_eps;
        let m = p.meta;
        let (x, hbuf, qkv, attn, gu, act) = (p.x, p.h, p.qkv, p.attn, p.gate_up, p.act);

        let w = &self.weights;
        let k = &self.k;
        let launch = |f: &CudaFunction,
                      name: &'static str,
                      grid: (u32, u32, u32),
                      block: u32,
                      smem: u32,
                      args: &[&dyn ArgRef]| {
            let mut b = stream.launch_builder(f);
            for a in args {
                a.push(&mut b);
            }
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: grid,
                    block_dim: (block, 1, 1),
                    shared_mem_bytes: smem,
                })
            }
            .map_err(|e| CudaError::driver(name, e))?;
            self.mark(name)
        };
        self.mark("start")?;
        let (t_u, hid_i, eps_f) = (t as u32, hid as i32, eps);
        let null: u64 = 0;
        let norm_block = norm_threads(hid);

        let embed = dptr(&w.embed, stream);
        launch(
            &k.embedding_gather,
            "embedding_gather",
            (t_u, 1, 1),
            256,
            0,
            &[&x, &embed, &m.ids, &hid_i],
        )?;

        let group = cfg.num_heads / cfg.num_kv_heads;
        let gmax = group.min(ATTN_MAX_GROUP);
        let nwarps = attention_warps(d);
        let smem_attn =
            (gmax * d * 4 + (nwarps * 32 * (d + 8) * 2).max(nwarps * gmax * (d + 2) * 4)) as u32;
        let splits = p.attn_splits;
        let splits_i = splits as i32;
        let attn_grid = (
            t_u,
            cfg.num_kv_heads as u32,
            (group.div_ceil(ATTN_MAX_GROUP) * splits) as u32,
        );
        let scale = 1.0f32 / (d as f32).sqrt();
        let (qkv_dim_i, nkv_i, d_i, bs_i, nh_i, t_i) = (
            qkv_dim as i32,
            cfg.num_kv_heads as i32,
            d as i32,
            self.kv_shape.block_size as i32,
            cfg.num_heads as i32,
            t as i32,
        );
        let inv_freq = dptr(&self.inv_freq, stream);
        let kv_base = dptr(&self.kv, stream);

        for (l, lw) in w.layers.iter().enumerate() {
            let k_cache = kv_base + (2 * l * self.kv_layer_elems * 2) as u64;
            let v_cache = k_cache + (self.kv_layer_elems * 2) as u64;
            let norm_w = dptr(&lw.input_norm, stream);
            launch(
                &k.rms_norm,
                "rms_norm",
                (t_u, 1, 1),
                norm_block,
                0,
                &[&hbuf, &x, &null, &norm_w, &hid_i, &eps_f],
            )?;
            self.gemm(
                "gemm qkv",
                t,
                qkv_dim,
                hid,
                dptr(&lw.qkv, stream),
                hbuf,
                qkv,
                false,
            )?;
            if let Some(b) = &lw.qkv_bias {
                let bp = dptr(b, stream);
                launch(
                    &k.bias_add,
                    "bias_add",
                    (grid_for(t * qkv_dim), 1, 1),
                    256,
                    0,
                    &[&qkv, &bp, &t_i, &qkv_dim_i, &qkv_dim_i],
                )?;
            }
            launch(
                &k.rotary_kv_cache_write,
                "rotary_kv_cache_write",
                (t_u, 1, 1),
                256,
                0,
                &[
                    &qkv,
                    &k_cache,
                    &v_cache,
                    &m.positions,
                    &m.slots,
                    &inv_freq,
                    &nh_i,
                    &nkv_i,
                    &d_i,
                    &bs_i,
                    &qkv_dim_i,
                ],
            )?;
            launch(
                &k.attention,
                "paged_attention",
                attn_grid,
                (nwarps * 32) as u32,
                smem_attn,
                &[
                    &attn,
                    &qkv,
                    &k_cache,
                    &v_cache,
                    &m.ctx_lens,
                    &m.bt_offsets,
                    &m.tables,
                    &qkv_dim_i,
                    &nh_i,
                    &nkv_i,
                    &bs_i,
                    &scale,
                    &p.attn_part,
                    &splits_i,
                ],
            )?;
            if splits > 1 {
                launch(
                    &k.attention_combine,
                    "attention_combine",
                    (t_u, cfg.num_heads as u32, 1),
                    d.min(128) as u32,
                    0,
                    &[&attn, &p.attn_part, &nh_i, &d_i, &splits_i],
                )?;
            }
            self.gemm("gemm o", t, hid, q_dim, dptr(&lw.o, stream), attn, x, true)?;
            if let Some(b) = &lw.o_bias {
                let bp = dptr(b, stream);
                launch(
                    &k.bias_add,
                    "bias_add",
                    (grid_for(t * hid), 1, 1),
                    256,
                    0,
                    &[&x, &bp, &t_i, &hid_i, &hid_i],
                )?;
            }
            let norm_w = dptr(&lw.post_norm, stream);
            launch(
                &k.rms_norm,
                "rms_norm",
                (t_u, 1, 1),
                norm_block,
                0,
                &[&hbuf, &x, &null, &norm_w, &hid_i, &eps_f],
            )?;
            self.gate_up_swiglu(t, inter, hid, dptr(&lw.gate_up, stream), hbuf, gu, act)?;
            self.gemm(
                "gemm down",
                t,
                hid,
                inter,
                dptr(&lw.down, stream),
                act,
                x,
                true,
            )?;
        }

        if r > 0 {
            let (fh, logits) = (p.final_h, p.logits);
            let norm_w = dptr(&w.final_norm, stream);
            launch(
                &k.rms_norm,
                "rms_norm",
                (r as u32, 1, 1),
                norm_block,
                0,
                &[&fh, &x, &m.logit_rows, &norm_w, &hid_i, &eps_f],
            )?;
            let head = dptr(w.lm_head.as_ref().unwrap_or(&w.embed), stream);
            self.gemm("gemm lm_head", r, vocab, hid, head, fh, logits, false)?;
        }
        Ok(())
    }

    /// The gate/up projection and SwiGLU: `act[m, inter] = silu(gate) * up` from
    /// `x[m, k] · w[2 inter, k]ᵀ`, either fused in one skinny kernel or as the GEMM into the f32
    /// `gate_up` buffer followed by the SwiGLU kernel, as the GEMM plan picks.
    #[allow(clippy::too_many_arguments)]
    fn gate_up_swiglu(
        &self,
        m: usize,
        inter: usize,
        k: usize,
        w: u64,
        x: u64,
        gate_up: u64,
        act: u64,
    ) -> Result<(), CudaError> {
        let label = "gemm gate_up";
        let imp = self.gemm_plan.choose(label, m, k, true);
        if imp == GemmImpl::SkinnySwiglu {
            self.launch_gemm(imp, m, 2 * inter, k, w, x, act, false)?;
            return self.mark("gemm gate_up+silu");
        }
        self.launch_gemm(imp, m, 2 * inter, k, w, x, gate_up, false)?;
        self.mark(label)?;
        self.launch_swiglu(m, inter, gate_up, act)?;
        self.mark("silu_and_mul")
    }

    /// The SwiGLU kernel: `act[m, inter] = silu(gate) * up` from the f32 `gate_up[m, 2 inter]`.
    fn launch_swiglu(
        &self,
        m: usize,
        inter: usize,
        gate_up: u64,
        act: u64,
    ) -> Result<(), CudaError> {
        let (m_i, inter_i) = (m as i32, inter as i32);
        let mut b = self.stream.launch_builder(&self.k.silu_and_mul);
        b.arg(&act).arg(&gate_up).arg(&m_i).arg(&inter_i);
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (grid_for(m * inter), 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map_err(|e| CudaError::driver("cuLaunchKernel(silu_and_mul)", e))?;
        Ok(())
    }

    /// `y[m, n] (+)= x[m, k] · w[n, k]ᵀ`: 16-bit `x` and `w` (row-major, `w` in the Hugging Face
    /// `[out, in]` layout), f32 `y`, f32 accumulation, with the implementation the GEMM plan
    /// picks for projection `label`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        label: &'static str,
        m: usize,
        n: usize,
        k: usize,
        w: u64,
        x: u64,
        y: u64,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let imp = self.gemm_plan.choose(label, m, k, false);
        self.launch_gemm(imp, m, n, k, w, x, y, accumulate)?;
        self.mark(label)
    }

    /// Enqueues one GEMM with the given implementation (see [`CudaModelRunner::gemm`]); with
    /// [`GemmImpl::SkinnySwiglu`], `w` is `[gate; up]` (`n` rows in all) and `y` the 16-bit
    /// SwiGLU output `[m, n / 2]`. In cuBLAS's column-major terms the product is
    /// `yᵀ (n×m) = op(w) · xᵀ` with `op = T`.
    #[allow(clippy::too_many_arguments)]
    fn launch_gemm(
        &self,
        imp: GemmImpl,
        m: usize,
        n: usize,
        k: usize,
        w: u64,
        x: u64,
        y: u64,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        let skinny = match imp {
            GemmImpl::Cublas => None,
            // (variant in SKINNY_GEMM_FUNCTIONS, row tiles per block, rows of output per block)
            GemmImpl::Skinny { rows_per_block } => {
                Some((rows_per_block / 16 - 1, rows_per_block / 16, rows_per_block))
            }
            GemmImpl::SkinnySwiglu => Some((2, 2, 16)),
        };
        if let Some((variant, row_tiles, rows_per_block)) = skinny {
            let (Some(funcs), Some(tile)) = (self.k.skinny_gemm.as_ref(), token_tile(m)) else {
                return Err(CudaError::Unsupported(format!(
                    "skinny GEMM for {m} tokens on this device"
                )));
            };
            let f = &funcs[variant * SKINNY_GEMM_TOKEN_TILES.len() + tile];
            let smem =
                SKINNY_GEMM_WARPS / 2 * row_tiles * SKINNY_GEMM_TOKEN_TILES[tile] * 4 * 32 * 4;
            // The fused kernel's n is the SwiGLU width (half the projection's rows).
            let out_n = if imp == GemmImpl::SkinnySwiglu {
                n / 2
            } else {
                n
            };
            let (m_i, n_i, k_i, acc_i) = (m as i32, out_n as i32, k as i32, i32::from(accumulate));
            let mut b = self.stream.launch_builder(f);
            b.arg(&y).arg(&w).arg(&x).arg(&m_i).arg(&n_i).arg(&k_i);
            if imp != GemmImpl::SkinnySwiglu {
                b.arg(&acc_i);
            }
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (out_n.div_ceil(rows_per_block) as u32, 1, 1),
                    block_dim: ((SKINNY_GEMM_WARPS * 32) as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                })
            }
            .map_err(|e| CudaError::driver("cuLaunchKernel(skinny_gemm)", e))?;
            return Ok(());
        }
        let dt = gemm_dtype(self.dtype);
        let alpha = 1.0f32;
        let beta = if accumulate { 1.0f32 } else { 0.0f32 };
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                dt,
                k as i32,
                x as *const c_void,
                dt,
                k as i32,
                (&beta as *const f32).cast::<c_void>(),
                y as *mut c_void,
                cudaDataType::CUDA_R_32F,
                n as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )
        }
        .map_err(|e| CudaError::cublas("cublasGemmEx", e))?;
        Ok(())
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn backend_err(e: CudaError) -> ModelRunnerError {
    ModelRunnerError::Backend(format!("cuda: {e}"))
}

/// Key ranges each token's attention is split into for a step of `t` tokens whose longest
/// context is `max_ctx`, on a GPU of `sm_count` SMs: enough thread blocks for
/// [`ATTENTION_BLOCKS_PER_SM`] per SM, but no more ranges than the longest context fills with
/// [`ATTENTION_MIN_SPLIT`] keys each. Each block derives its range from its own token's context
/// on the device; a captured graph is keyed by the split count too.
fn attention_splits(
    t: usize,
    num_heads: usize,
    num_kv_heads: usize,
    sm_count: usize,
    max_ctx: usize,
) -> usize {
    if t == 0 || num_kv_heads == 0 {
        return 1;
    }
    let blocks = t * num_kv_heads * (num_heads / num_kv_heads).div_ceil(ATTN_MAX_GROUP);
    let target = ATTENTION_BLOCKS_PER_SM * sm_count;
    if blocks >= target {
        return 1;
    }
    target
        .div_ceil(blocks)
        .min(MAX_ATTENTION_SPLITS)
        .min(max_ctx.div_ceil(ATTENTION_MIN_SPLIT))
        .max(1)
}

/// Threads per block of the row-wise RMSNorm.
fn norm_threads(dim: usize) -> u32 {
    (dim.div_ceil(4).next_power_of_two()).clamp(32, 1024) as u32
}

/// Blocks of 256 threads for a grid-stride loop over `n` elements.
fn grid_for(n: usize) -> u32 {
    n.div_ceil(256).clamp(1, 65_535) as u32
}

/// A kernel argument passed by value (device pointers as `u64`, scalars).
trait ArgRef {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}

impl<T: DeviceRepr> ArgRef for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

/// Checks what the kernels support before anything is allocated.
fn check_model(cfg: &ModelConfig, w: &LlamaWeights, kv: KvCacheShape) -> Result<(), CudaError> {
    if w.layers.len() != cfg.num_layers {
        return Err(CudaError::Unsupported(format!(
            "weights have {} layers, config {}",
            w.layers.len(),
            cfg.num_layers
        )));
    }
    if !nvrtc::ATTENTION_HEAD_DIMS.contains(&cfg.head_dim) {
        return Err(CudaError::Unsupported(format!(
            "head_dim {} (the attention kernel is built for {:?})",
            cfg.head_dim,
            nvrtc::ATTENTION_HEAD_DIMS
        )));
    }
    if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
        return Err(CudaError::Unsupported(format!(
            "{} query heads over {} KV heads",
            cfg.num_heads, cfg.num_kv_heads
        )));
    }
    if kv.num_blocks == 0 || kv.block_size == 0 {
        return Err(CudaError::InvalidKvShape(format!(
            "num_blocks ({}) and block_size ({}) must be positive",
            kv.num_blocks, kv.block_size
        )));
    }
    let slots = kv.num_blocks.checked_mul(kv.block_size);
    if slots.is_none_or(|s| s > i32::MAX as usize) {
        return Err(CudaError::InvalidKvShape(format!(
            "{} blocks of {} slots exceed 2^31 token slots",
            kv.num_blocks, kv.block_size
        )));
    }
    let dims = [
        cfg.hidden_size,
        cfg.q_dim() + 2 * cfg.kv_dim(),
        2 * cfg.intermediate_size,
        cfg.vocab_size,
    ];
    if dims.iter().any(|&x| x > i32::MAX as usize / 4) {
        return Err(CudaError::Unsupported(
            "a dimension exceeds the kernels' 32-bit sizes".into(),
        ));
    }
    Ok(())
}

fn upload_weights(
    stream: &Arc<CudaStream>,
    w: &LlamaWeights,
    dtype: ActDtype,
) -> Result<DeviceWeights, CudaError> {
    // Bytes a forward reads: every projection, and the LM head (the embedding gather reads a
    // few rows only, so a tied embedding counts once, as the LM head).
    let matrix_bytes = 2
        * (w.lm_head().data.len()
            + w.layers
                .iter()
                .map(|l| {
                    l.qkv.data.len() + l.o.data.len() + l.gate_up.data.len() + l.down.data.len()
                })
                .sum::<usize>());
    let mat = |m: &Matrix| -> Result<CudaSlice<u16>, CudaError> {
        stream
            .clone_htod(&to_half_bits(&m.data, dtype))
            .map_err(|e| CudaError::driver("cuMemcpyHtoD (weights)", e))
    };
    let vec32 = |v: &[f32]| -> Result<CudaSlice<f32>, CudaError> {
        stream
            .clone_htod(v)
            .map_err(|e| CudaError::driver("cuMemcpyHtoD (weights)", e))
    };
    let embed = mat(&w.embed)?;
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        layers.push(DeviceLayer {
            input_norm: vec32(&l.input_norm)?,
            qkv: mat(&l.qkv)?,
            qkv_bias: l.qkv_bias.as_deref().map(vec32).transpose()?,
            o: mat(&l.o)?,
            o_bias: l.o_bias.as_deref().map(vec32).transpose()?,
            post_norm: vec32(&l.post_norm)?,
            gate_up: mat(&l.gate_up)?,
            down: mat(&l.down)?,
        });
    }
    let final_norm = vec32(&w.final_norm)?;
    let lm_head = w.lm_head.as_ref().map(mat).transpose()?;
    Ok(DeviceWeights {
        embed,
        layers,
        final_norm,
        lm_head,
        matrix_bytes,
    })
}

impl ModelRunner for CudaModelRunner {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn max_model_len(&self) -> usize {
        self.cfg.max_model_len
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

#[cfg(test)]
mod tests {
    use super::super::nvrtc::{
        ATTENTION_HEAD_DIMS, KERNEL_SOURCES, SKINNY_GEMM_FUNCTIONS, SKINNY_GEMM_TOKEN_TILES,
        SKINNY_GEMM_WARPS, attention_warps,
    };
    use super::{ATTENTION_MIN_SPLIT, ATTN_MAX_GROUP, attention_splits};

    fn kernel_source(file: &str) -> &'static str {
        KERNEL_SOURCES
            .iter()
            .find(|s| s.file == file)
            .expect("kernel file")
            .source
    }

    /// The integer of `#define NAME value` in `src`.
    fn define(src: &str, name: &str) -> usize {
        src.lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no #define {name}"))
    }

    /// The arguments of every top-level `MACRO(a, b, ...)` line in `src`.
    fn instantiations(src: &str, mac: &str) -> Vec<Vec<usize>> {
        src.lines()
            .filter_map(|l| l.strip_prefix(&format!("{mac}(")))
            .map(|rest| {
                rest.trim_end_matches(')')
                    .split(',')
                    .map(|a| a.trim().parse().expect("integer argument"))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn host_constants_match_the_kernels() {
        // A mismatch here would launch kernels with the wrong grid or shared memory on a GPU.
        let attention = kernel_source("attention.cu");
        assert_eq!(define(attention, "ATTN_MAX_GROUP"), ATTN_MAX_GROUP);
        assert_eq!(define(attention, "ATTN_MIN_SPLIT"), ATTENTION_MIN_SPLIT);
        let heads = instantiations(attention, "STEPSCOPE_DEFINE_ATTENTION");
        assert_eq!(
            heads.iter().map(|a| a[0]).collect::<Vec<_>>(),
            ATTENTION_HEAD_DIMS
        );
        for a in &heads {
            assert_eq!(attention_warps(a[0]), a[1], "warps of head_dim {}", a[0]);
        }
        let gemm = kernel_source("gemm.cu");
        assert_eq!(define(gemm, "GEMM_NWARPS"), SKINNY_GEMM_WARPS);
        // SKINNY_GEMM_FUNCTIONS is [variant][token tile]: r1, r2, then the SwiGLU variant.
        let mut names: Vec<String> = instantiations(gemm, "STEPSCOPE_DEFINE_SKINNY_GEMM")
            .iter()
            .map(|a| format!("skinny_gemm_r{}_m{}", a[0], a[1]))
            .collect();
        names.extend(
            instantiations(gemm, "STEPSCOPE_DEFINE_SKINNY_GEMM_SILU")
                .iter()
                .map(|a| format!("skinny_gemm_silu_m{}", a[0])),
        );
        assert_eq!(names, SKINNY_GEMM_FUNCTIONS);
        for (i, name) in SKINNY_GEMM_FUNCTIONS.iter().enumerate() {
            let tile = SKINNY_GEMM_TOKEN_TILES[i % SKINNY_GEMM_TOKEN_TILES.len()];
            assert!(name.ends_with(&format!("_m{tile}")), "{name} at {i}");
        }
    }

    #[test]
    fn attention_is_split_only_where_blocks_are_few_and_contexts_long() {
        // 16 query heads over 8 KV heads on 132 SMs (an H100): 528 blocks wanted.
        let splits = |t, ctx| attention_splits(t, 16, 8, 132, ctx);
        assert_eq!(splits(1, 531), 9); // 8 blocks: as many 64-key ranges as the context has
        assert_eq!(splits(1, 100_000), 32); // capped
        assert_eq!(splits(32, 531), 3); // 256 blocks -> 3 ranges
        assert_eq!(splits(66, 531), 1); // 528 blocks: enough
        assert_eq!(splits(128, 531), 1);
        assert_eq!(splits(4, 64), 1); // one range holds the whole context
        assert_eq!(splits(4, 65), 2);
        assert_eq!(splits(0, 531), 1);
        // Query-head groups above 8 take more blocks per KV head.
        assert_eq!(attention_splits(1, 32, 2, 132, 4096), 32);
        assert_eq!(attention_splits(33, 32, 2, 132, 4096), 4);
    }
}
