//! The kernels of `kernels/` (embedded with `include_str!`) and their compilation with NVRTC.
//!
//! Each `.cu` file is one NVRTC program that includes `common.cuh` (passed to NVRTC as an
//! in-memory header); no CUDA header is needed, so compilation works with nothing but
//! `libnvrtc` (no toolkit). At start-up the runner compiles every file for the device's
//! compute capability (`--gpu-architecture=sm_XY`, a cubin, so the driver JIT is not involved);
//! the test suite compiles them for virtual architectures (`compute_80`, `compute_90`, PTX) on
//! machines without a GPU. Compilation needs no device, only the library.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int};
use std::sync::{Arc, Mutex};

use cudarc::nvrtc::sys;

use super::{CudaError, guard, libs};

/// A kernel source file.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name under `kernels/`.
    pub file: &'static str,
    pub source: &'static str,
    /// Entry points the runner loads from it.
    pub functions: &'static [&'static str],
}

/// The shared header every kernel file includes.
pub const COMMON_HEADER: (&str, &str) =
    ("common.cuh", include_str!("../../../../kernels/common.cuh"));

/// Every kernel file, with the entry points the runner loads from it.
pub const KERNEL_SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "embedding.cu",
        source: include_str!("../../../../kernels/embedding.cu"),
        functions: &["embedding_gather"],
    },
    KernelSource {
        file: "rmsnorm.cu",
        source: include_str!("../../../../kernels/rmsnorm.cu"),
        functions: &["rms_norm"],
    },
    KernelSource {
        file: "kv_cache.cu",
        source: include_str!("../../../../kernels/kv_cache.cu"),
        functions: &["rotary_kv_cache_write"],
    },
    KernelSource {
        file: "attention.cu",
        source: include_str!("../../../../kernels/attention.cu"),
        functions: &[
            "paged_attention_d16",
            "paged_attention_d32",
            "paged_attention_d64",
            "paged_attention_d80",
            "paged_attention_d96",
            "paged_attention_d128",
            "paged_attention_d256",
            "attention_combine",
        ],
    },
    KernelSource {
        file: "prefill_attention.cu",
        source: include_str!("../../../../kernels/prefill_attention.cu"),
        functions: PREFILL_ATTENTION_FUNCTIONS,
    },
    KernelSource {
        file: "activation.cu",
        source: include_str!("../../../../kernels/activation.cu"),
        functions: &["silu_and_mul"],
    },
    KernelSource {
        file: "elementwise.cu",
        source: include_str!("../../../../kernels/elementwise.cu"),
        functions: &["bias_add", "residual_add"],
    },
    KernelSource {
        file: "gemm.cu",
        source: include_str!("../../../../kernels/gemm.cu"),
        functions: SKINNY_GEMM_FUNCTIONS,
    },
    KernelSource {
        file: "sampling.cu",
        source: include_str!("../../../../kernels/sampling.cu"),
        functions: &["argmax_rows"],
    },
];

/// The skinny tensor-core GEMMs of `gemm.cu`, indexed `[variant][token tile]` with token tiles
/// of up to 8, 16, 32 and 64 tokens ([`SKINNY_GEMM_TOKEN_TILES`]); the variants are 16 and 32
/// rows per block, then the gate/up GEMM fused with SwiGLU.
pub const SKINNY_GEMM_FUNCTIONS: &[&str] = &[
    "skinny_gemm_r1_m1",
    "skinny_gemm_r1_m2",
    "skinny_gemm_r1_m4",
    "skinny_gemm_r1_m8",
    "skinny_gemm_r2_m1",
    "skinny_gemm_r2_m2",
    "skinny_gemm_r2_m4",
    "skinny_gemm_r2_m8",
    "skinny_gemm_silu_m1",
    "skinny_gemm_silu_m2",
    "skinny_gemm_silu_m4",
    "skinny_gemm_silu_m8",
];

/// Eighths of the largest token count each skinny GEMM variant takes (its `MT`).
pub const SKINNY_GEMM_TOKEN_TILES: [usize; 4] = [1, 2, 4, 8];

/// Warps per block of the skinny GEMMs (`GEMM_NWARPS` in gemm.cu).
pub const SKINNY_GEMM_WARPS: usize = 8;

/// Head sizes the attention kernel is instantiated for.
pub const ATTENTION_HEAD_DIMS: &[usize] = &[16, 32, 64, 80, 96, 128, 256];

/// Warps per block of `paged_attention_d{head_dim}` (must match `attention.cu`).
pub fn attention_warps(head_dim: usize) -> usize {
    if head_dim > 128 { 2 } else { 4 }
}

/// The tensor-core prefill attention of `prefill_attention.cu`, one per head size of
/// [`PREFILL_ATTENTION_HEAD_DIMS`] (compute capability 8.0+ only).
pub const PREFILL_ATTENTION_FUNCTIONS: &[&str] = &[
    "prefill_attention_d16",
    "prefill_attention_d32",
    "prefill_attention_d64",
    "prefill_attention_d80",
    "prefill_attention_d96",
    "prefill_attention_d128",
    "prefill_attention_d256",
];

/// Head sizes the prefill attention is instantiated for: every size of
/// [`ATTENTION_HEAD_DIMS`] that is a multiple of 16.
pub const PREFILL_ATTENTION_HEAD_DIMS: &[usize] = &[16, 32, 64, 80, 96, 128, 256];

/// Warps per block of the prefill attention (`PREFILL_NWARPS`), 16 query rows each.
pub const PREFILL_ATTENTION_WARPS: usize = 4;

/// Keys per shared-memory tile of `prefill_attention_d{head_dim}` (must match
/// `prefill_attention.cu`).
pub fn prefill_attention_key_tile(head_dim: usize) -> usize {
    if head_dim > 128 { 16 } else { 64 }
}

/// Dynamic shared memory of `prefill_attention_d{head_dim}`: a K and a V tile of
/// [`prefill_attention_key_tile`] keys, rows padded by 8 elements, 16-bit.
pub fn prefill_attention_smem_bytes(head_dim: usize) -> usize {
    2 * prefill_attention_key_tile(head_dim) * (head_dim + 8) * 2
}

/// The 16-bit type of weights, KV cache and GEMM inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActDtype {
    Bf16,
    F16,
}

impl ActDtype {
    /// bf16 where the GPU has bf16 tensor cores (compute capability 8.0+), else f16.
    pub fn for_compute_capability(major: i32) -> Self {
        if major >= 8 {
            ActDtype::Bf16
        } else {
            ActDtype::F16
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ActDtype::Bf16 => "bf16",
            ActDtype::F16 => "f16",
        }
    }

    fn defines(self) -> &'static [&'static str] {
        match self {
            ActDtype::Bf16 => &[],
            ActDtype::F16 => &["-DSTEPSCOPE_ACT_F16"],
        }
    }
}

/// One compiled kernel file: a cubin for `sm_XY`, NUL-terminated PTX for `compute_XY`.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    pub file: &'static str,
    pub image: Vec<u8>,
    pub is_cubin: bool,
}

/// NVRTC's version.
pub fn version() -> Result<(i32, i32), CudaError> {
    guard(|| {
        libs::ensure_nvrtc()?;
        let (mut major, mut minor) = (0, 0);
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcVersion: {e:?}")))?;
        Ok((major, minor))
    })
}

/// The real architectures (`sm_XY` numbers, e.g. 90) this NVRTC can compile for.
pub fn supported_archs() -> Result<Vec<i32>, CudaError> {
    guard(|| {
        libs::ensure_nvrtc()?;
        let mut n: c_int = 0;
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetNumSupportedArchs: {e:?}")))?;
        let mut archs = vec![0 as c_int; n.max(0) as usize];
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| CudaError::Nvrtc(format!("nvrtcGetSupportedArchs: {e:?}")))?;
        Ok(archs)
    })
}

/// The `--gpu-architecture` to compile for a device of compute capability `major.minor`: its
/// own `sm_XY` when NVRTC knows it, else the newest virtual architecture NVRTC supports (PTX,
/// which the driver compiles for newer GPUs).
pub fn arch_for_device(major: i32, minor: i32) -> Result<String, CudaError> {
    let want = major * 10 + minor;
    let archs = supported_archs()?;
    if archs.contains(&want) {
        return Ok(format!("sm_{want}"));
    }
    match archs.iter().copied().filter(|&a| a < want).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(CudaError::Unsupported(format!(
            "compute capability {major}.{minor} is older than anything this NVRTC compiles for ({archs:?})"
        ))),
    }
}

/// Compiles one kernel file for `arch` (`sm_XY` gives a cubin, `compute_XY` PTX).
pub fn compile(
    src: &KernelSource,
    arch: &str,
    dtype: ActDtype,
) -> Result<CompiledKernel, CudaError> {
    guard(|| {
        libs::ensure_nvrtc()?;
        compile_loaded(src, arch, dtype, &[]).map(|(k, _)| k)
    })
}

/// What ptxas reports for each entry point of `src` compiled for the real architecture `arch`
/// (`sm_XY`): registers, stack frame and spills (`--ptxas-options=-v`), for tests.
pub fn ptxas_report(src: &KernelSource, arch: &str, dtype: ActDtype) -> Result<String, CudaError> {
    guard(|| {
        libs::ensure_nvrtc()?;
        compile_loaded(src, arch, dtype, &["--ptxas-options=-v"]).map(|(_, log)| log)
    })
}

/// Compiles `src`; returns the image and NVRTC's log.
fn compile_loaded(
    src: &KernelSource,
    arch: &str,
    dtype: ActDtype,
    extra_options: &[&str],
) -> Result<(CompiledKernel, String), CudaError> {
    let nvrtc_err =
        |call: &str, e: sys::nvrtcResult| CudaError::Nvrtc(format!("{call}({}): {e:?}", src.file));
    let source = CString::new(src.source)
        .map_err(|_| CudaError::Nvrtc(format!("{} has a NUL byte", src.file)))?;
    let name = CString::new(src.file).expect("file names have no NUL");
    let header = CString::new(COMMON_HEADER.1)
        .map_err(|_| CudaError::Nvrtc("common.cuh has a NUL byte".into()))?;
    let header_name = CString::new(COMMON_HEADER.0).expect("no NUL");
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            source.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| nvrtc_err("nvrtcCreateProgram", e.0))?;
    struct Prog(sys::nvrtcProgram);
    impl Drop for Prog {
        fn drop(&mut self) {
            unsafe {
                let _ = sys::nvrtcDestroyProgram(&mut self.0);
            }
        }
    }
    let prog = Prog(prog);

    let mut options: Vec<CString> = vec![
        CString::new(format!("--gpu-architecture={arch}"))
            .map_err(|_| CudaError::Nvrtc("bad arch".into()))?,
        CString::new("--std=c++17").expect("no NUL"),
    ];
    options.extend(
        dtype
            .defines()
            .iter()
            .chain(extra_options)
            .map(|d| CString::new(*d).expect("no NUL")),
    );
    let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();
    let status = unsafe {
        sys::nvrtcCompileProgram(prog.0, option_ptrs.len() as c_int, option_ptrs.as_ptr())
    };
    let log = program_log(prog.0);
    if status != sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            file: src.file,
            arch: format!("{arch} ({})", dtype.name()),
            log: if log.trim().is_empty() {
                format!("{status:?}")
            } else {
                log
            },
        });
    }
    let is_cubin = arch.starts_with("sm_");
    let mut size = 0usize;
    let image = if is_cubin {
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e.0))?;
        let mut buf = vec![0u8; size];
        unsafe { sys::nvrtcGetCUBIN(prog.0, buf.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetCUBIN", e.0))?;
        buf
    } else {
        unsafe { sys::nvrtcGetPTXSize(prog.0, &mut size) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetPTXSize", e.0))?;
        let mut buf = vec![0u8; size];
        unsafe { sys::nvrtcGetPTX(prog.0, buf.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| nvrtc_err("nvrtcGetPTX", e.0))?;
        buf // includes the terminating NUL
    };
    Ok((
        CompiledKernel {
            file: src.file,
            image,
            is_cubin,
        },
        log,
    ))
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    if unsafe { sys::nvrtcGetProgramLogSize(prog, &mut size) } != sys::nvrtcResult::NVRTC_SUCCESS
        || size <= 1
    {
        return String::new();
    }
    let mut buf = vec![0u8; size];
    if unsafe { sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast::<c_char>()) }
        != sys::nvrtcResult::NVRTC_SUCCESS
    {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Compiles every kernel file for `arch`, files in parallel (NVRTC is thread-safe across
/// programs); the first error wins.
pub fn compile_all(arch: &str, dtype: ActDtype) -> Result<Vec<CompiledKernel>, CudaError> {
    guard(|| {
        libs::ensure_nvrtc()?;
        // Resolve the symbols once on this thread before fanning out.
        let _ = version()?;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(KERNEL_SOURCES.len());
        let results: Vec<Result<CompiledKernel, CudaError>> = if threads <= 1 {
            KERNEL_SOURCES
                .iter()
                .map(|s| compile_loaded(s, arch, dtype, &[]).map(|(k, _)| k))
                .collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = KERNEL_SOURCES
                    .iter()
                    .map(|s| {
                        scope.spawn(move || {
                            guard(|| compile_loaded(s, arch, dtype, &[]).map(|(k, _)| k))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(CudaError::Panic("NVRTC compile thread".into()))
                        })
                    })
                    .collect()
            })
        };
        results.into_iter().collect()
    })
}

/// [`compile_all`], memoised per (architecture, type) for the life of the process, so that
/// several runners (tests, a server restarting its engine) compile once.
pub fn compile_all_cached(
    arch: &str,
    dtype: ActDtype,
) -> Result<Arc<Vec<CompiledKernel>>, CudaError> {
    type Cache = Mutex<HashMap<(String, ActDtype), Arc<Vec<CompiledKernel>>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (arch.to_owned(), dtype);
    if let Some(hit) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(hit.clone());
    }
    let compiled = Arc::new(compile_all(arch, dtype)?);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, compiled.clone());
    Ok(compiled)
}
