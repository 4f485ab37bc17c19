//! The forward pass: [`Kernels`] owns the NVRTC-compiled kernel functions (loaded once per
//! runner), and this module enqueues one step's work with them on the runner's stream: the
//! embedding gather, the per-layer norms, projections, RoPE with the KV-cache write, attention
//! (the tensor-core prefill kernel for entries with many new tokens, the paged kernel for the
//! other tokens), SwiGLU and residual adds, then the final norm and LM head
//! ([`CudaModelRunner::enqueue_kernels`]), plus each GEMM's launch on cuBLAS or the skinny kernel
//! ([`CudaModelRunner::launch_gemm`]) and the on-device argmax of
//! [`CudaModelRunner::forward_greedy`]. It reads the weights, the KV cache and the step's device
//! pointers; it allocates and copies nothing, so a step it enqueues can be captured as a graph.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::engine::model_runner::{ModelBatch, ModelRunnerError};

use super::super::gemm::{GemmImpl, token_tile};
use super::super::nvrtc::{
    self, ActDtype, PREFILL_ATTENTION_HEAD_DIMS, PREFILL_ATTENTION_WARPS, SKINNY_GEMM_TOKEN_TILES,
    SKINNY_GEMM_WARPS, attention_warps, prefill_attention_smem_bytes,
};
use super::super::{CudaError, guard};
use super::step::{ATTN_MAX_GROUP, StepPtrs, Widths, dptr};
use super::{CudaModelRunner, backend_err};

pub(super) struct Kernels {
    pub(super) embedding_gather: CudaFunction,
    pub(super) rms_norm: CudaFunction,
    pub(super) rotary_kv_cache_write: CudaFunction,
    pub(super) attention: CudaFunction,
    pub(super) attention_combine: CudaFunction,
    /// `prefill_attention_d{head_dim}` (compute capability 8.0+, head sizes that are multiples
    /// of 16, unless turned off): `None` keeps every token on the paged kernel.
    pub(super) prefill_attention: Option<CudaFunction>,
    pub(super) silu_and_mul: CudaFunction,
    pub(super) bias_add: CudaFunction,
    pub(super) argmax_rows: CudaFunction,
    /// `SKINNY_GEMM_FUNCTIONS` (compute capability 8.0+ only).
    pub(super) skinny_gemm: Option<Vec<CudaFunction>>,
}

impl Kernels {
    /// Compiles (or takes from the cache) every kernel file for `arch` and `dtype` with NVRTC,
    /// loads the modules into `ctx` and looks up the functions the forward launches; the prefill
    /// attention only when `prefill_attention` and the device and head size allow it.
    pub(super) fn load(
        ctx: &Arc<CudaContext>,
        arch: &str,
        dtype: ActDtype,
        head_dim: usize,
        major: i32,
        prefill_attention: bool,
    ) -> Result<Kernels, CudaError> {
        let compiled = nvrtc::compile_all_cached(arch, dtype)?;
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
        Ok(Kernels {
            embedding_gather: load("embedding.cu", "embedding_gather")?,
            rms_norm: load("rmsnorm.cu", "rms_norm")?,
            rotary_kv_cache_write: load("kv_cache.cu", "rotary_kv_cache_write")?,
            attention: load("attention.cu", &format!("paged_attention_d{head_dim}"))?,
            attention_combine: load("attention.cu", "attention_combine")?,
            prefill_attention: if prefill_attention
                && major >= 8
                && PREFILL_ATTENTION_HEAD_DIMS.contains(&head_dim)
            {
                Some(load(
                    "prefill_attention.cu",
                    &format!("prefill_attention_d{head_dim}"),
                )?)
            } else {
                None
            },
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
        })
    }
}

fn gemm_dtype(d: ActDtype) -> cudaDataType {
    match d {
        ActDtype::Bf16 => cudaDataType::CUDA_R_16BF,
        ActDtype::F16 => cudaDataType::CUDA_R_16F,
    }
}

impl CudaModelRunner {
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

    /// Validates the batch, uploads its metadata and enqueues the whole forward up to the
    /// logits; returns the number of logits rows.
    pub(super) fn enqueue_forward(
        &mut self,
        batch: &ModelBatch<'_>,
    ) -> Result<usize, ModelRunnerError> {
        self.prepare(batch)?;
        guard(|| self.enqueue_prepared()).map_err(backend_err)
    }

    /// Enqueues the forward's kernels and GEMMs (no allocation, no copy: capturable).
    pub(super) fn enqueue_kernels(
        &self,
        t: usize,
        r: usize,
        p: &StepPtrs,
    ) -> Result<(), CudaError> {
        let cfg = &self.cfg;
        let stream = &self.stream;
        let Widths {
            hidden: hid,
            q: q_dim,
            qkv: qkv_dim,
            inter,
            vocab,
        } = Widths::of(cfg);
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
        // The paged kernel takes p.paged_tokens tokens (all t, or the listed ones), the prefill
        // kernel p.prefill_tiles tiles of whole entries; both write `attn`, disjoint rows.
        let paged_u = p.paged_tokens as u32;
        let attn_grid = (
            paged_u,
            cfg.num_kv_heads as u32,
            (group.div_ceil(ATTN_MAX_GROUP) * splits) as u32,
        );
        let prefill_grid = (p.prefill_tiles as u32, cfg.num_kv_heads as u32, 1);
        let prefill_block = (PREFILL_ATTENTION_WARPS * 32) as u32;
        let smem_prefill = prefill_attention_smem_bytes(d) as u32;
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
            if p.paged_tokens > 0 {
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
                        &m.paged_tokens,
                    ],
                )?;
                if splits > 1 {
                    launch(
                        &k.attention_combine,
                        "attention_combine",
                        (paged_u, cfg.num_heads as u32, 1),
                        d.min(128) as u32,
                        0,
                        &[&attn, &p.attn_part, &nh_i, &d_i, &splits_i, &m.paged_tokens],
                    )?;
                }
            }
            if p.prefill_tiles > 0 {
                let f = k.prefill_attention.as_ref().ok_or_else(|| {
                    CudaError::Unsupported("prefill attention tiles without the kernel".into())
                })?;
                launch(
                    f,
                    "prefill_attention",
                    prefill_grid,
                    prefill_block,
                    smem_prefill,
                    &[
                        &attn,
                        &qkv,
                        &k_cache,
                        &v_cache,
                        &m.ctx_lens,
                        &m.bt_offsets,
                        &m.tables,
                        &m.prefill_tiles,
                        &qkv_dim_i,
                        &nh_i,
                        &nkv_i,
                        &bs_i,
                        &scale,
                    ],
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
    pub(super) fn launch_swiglu(
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
    pub(super) fn launch_gemm(
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
