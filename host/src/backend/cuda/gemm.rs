//! Which implementation each projection's GEMM uses: cuBLAS `GemmEx`, or the skinny
//! tensor-core kernel of `kernels/gemm.cu`, written for decode-sized batches (up to 64 tokens)
//! where a step is bound by streaming the weights once.
//!
//! At start-up, on the device, [`tune`] first checks the skinny kernel against cuBLAS on the
//! model's own weights with random inputs (if they disagree the kernel is not used, and the
//! reason is kept for diagnostics), then times both, for every projection shape and token
//! bucket, cycling through the layers' matrices so that the timings see HBM rather than L2.
//! A skinny kernel is used from then on where it timed at least 5% faster than cuBLAS (so that
//! timing noise rarely changes the choice, and with it the last bits of the logits, between
//! starts). For the gate/up projection the candidates include the SwiGLU that follows (its own
//! kernel after cuBLAS or the plain skinny GEMM), against the skinny kernel with SwiGLU fused
//! in. `STEPSCOPE_CUDA_GEMM=auto|cublas|skinny` (default auto) forces a choice for comparisons
//! and tests; the records are what the decode benchmark prints.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::CudaError;
use super::nvrtc::{ActDtype, SKINNY_GEMM_TOKEN_TILES};
use super::runner::to_half_bits;

/// Largest token count the skinny kernel takes (8 × the largest tile).
pub const SKINNY_MAX_TOKENS: usize = 64;

/// Environment variable that forces a [`GemmMode`].
pub const GEMM_MODE_ENV: &str = "STEPSCOPE_CUDA_GEMM";

/// How the runner picks GEMM implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmMode {
    /// Time both at start-up, per shape and token bucket; use the faster.
    #[default]
    Auto,
    /// cuBLAS everywhere (no tuning).
    Cublas,
    /// The skinny kernel wherever it applies (at most 64 tokens, k a multiple of 8).
    Skinny,
}

impl FromStr for GemmMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(GemmMode::Auto),
            "cublas" => Ok(GemmMode::Cublas),
            "skinny" => Ok(GemmMode::Skinny),
            other => Err(format!(
                "{GEMM_MODE_ENV}={other:?}: expected auto, cublas or skinny"
            )),
        }
    }
}

impl GemmMode {
    /// The mode `STEPSCOPE_CUDA_GEMM` asks for (auto when unset).
    pub fn from_env() -> Result<Self, CudaError> {
        match std::env::var(GEMM_MODE_ENV) {
            Ok(v) => v.parse().map_err(CudaError::Unsupported),
            Err(_) => Ok(GemmMode::Auto),
        }
    }
}

/// One GEMM implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmImpl {
    Cublas,
    /// `skinny_gemm_r{rows_per_block / 16}_m*`.
    Skinny {
        rows_per_block: usize,
    },
    /// `skinny_gemm_silu_m*`: the gate/up projection with SwiGLU fused in; its output is the
    /// 16-bit SwiGLU activation, not the f32 projection.
    SkinnySwiglu,
}

impl fmt::Display for GemmImpl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GemmImpl::Cublas => f.write_str("cuBLAS"),
            GemmImpl::Skinny { rows_per_block } => write!(f, "skinny/{rows_per_block}"),
            GemmImpl::SkinnySwiglu => f.write_str("skinny+SwiGLU"),
        }
    }
}

/// The skinny implementations tried, in order.
pub const SKINNY_VARIANTS: [GemmImpl; 2] = [
    GemmImpl::Skinny { rows_per_block: 16 },
    GemmImpl::Skinny { rows_per_block: 32 },
];

/// Index into [`SKINNY_GEMM_TOKEN_TILES`] of the smallest tile holding `m` tokens.
pub fn token_tile(m: usize) -> Option<usize> {
    SKINNY_GEMM_TOKEN_TILES.iter().position(|&t| m <= 8 * t)
}

/// Whether the skinny kernel can compute a `[m, k] x [n, k]ᵀ` product.
pub fn skinny_applies(m: usize, k: usize) -> bool {
    (1..=SKINNY_MAX_TOKENS).contains(&m) && k.is_multiple_of(8)
}

/// A projection of the model: its label (as the runner's profile names it), output and input
/// sizes, the device pointers of its matrix in every layer (one for the LM head), and whether
/// SwiGLU follows it (the gate/up projection: `n` is twice the intermediate size).
pub struct GemmShape {
    pub label: &'static str,
    pub n: usize,
    pub k: usize,
    pub weights: Vec<u64>,
    pub swiglu: bool,
}

/// Timings of one (shape, token bucket): microseconds per call, one layer's matrix.
#[derive(Debug, Clone)]
pub struct TuneRecord {
    pub label: &'static str,
    pub n: usize,
    pub k: usize,
    /// Tokens the bucket was timed at.
    pub tokens: usize,
    pub cublas_us: f64,
    /// Per [`SKINNY_VARIANTS`].
    pub skinny_us: Vec<f64>,
    /// The fused gate/up + SwiGLU kernel (gate/up only); the other timings then include the
    /// separate SwiGLU kernel.
    pub fused_us: Option<f64>,
    pub chosen: GemmImpl,
}

/// The choice per (n, k, token tile), with what it was based on.
#[derive(Debug, Clone, Default)]
pub struct GemmPlan {
    pub mode: GemmMode,
    /// By projection label and token tile.
    choices: HashMap<(&'static str, usize), GemmImpl>,
    /// One per (shape, token bucket) timed at start-up.
    pub records: Vec<TuneRecord>,
    /// Why the skinny kernel is not used at all (no tensor cores, or it disagreed with cuBLAS).
    pub skinny_disabled: Option<String>,
    /// Largest |skinny − cuBLAS| / max |cuBLAS| seen by the start-up check.
    pub check_max_rel_diff: Option<f64>,
}

impl GemmPlan {
    /// cuBLAS everywhere, for `why`.
    pub fn cublas_only(mode: GemmMode, why: Option<String>) -> Self {
        GemmPlan {
            mode,
            skinny_disabled: why,
            ..GemmPlan::default()
        }
    }

    /// The implementation for the `[m, k] x [n, k]ᵀ` product of projection `label`;
    /// [`GemmImpl::SkinnySwiglu`] only where `swiglu` (the gate/up projection) says SwiGLU
    /// follows.
    pub fn choose(&self, label: &str, m: usize, k: usize, swiglu: bool) -> GemmImpl {
        if self.skinny_disabled.is_some() || !skinny_applies(m, k) {
            return GemmImpl::Cublas;
        }
        let chosen = match self.mode {
            GemmMode::Cublas => GemmImpl::Cublas,
            GemmMode::Skinny if swiglu => GemmImpl::SkinnySwiglu,
            GemmMode::Skinny => SKINNY_VARIANTS[0],
            GemmMode::Auto => token_tile(m)
                .and_then(|t| self.choices.get(&(label, t)).copied())
                .unwrap_or(GemmImpl::Cublas),
        };
        if chosen == GemmImpl::SkinnySwiglu && !swiglu {
            GemmImpl::Cublas
        } else {
            chosen
        }
    }

    /// One line per record, for logs and the benchmark.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = &self.skinny_disabled {
            out.push(format!("skinny GEMM not used: {why}"));
        }
        if let Some(d) = self.check_max_rel_diff {
            out.push(format!(
                "skinny GEMM vs cuBLAS on the model's weights: max relative difference {d:.2e}"
            ));
        }
        for r in &self.records {
            let mut skinny = SKINNY_VARIANTS
                .iter()
                .zip(&r.skinny_us)
                .map(|(v, t)| format!("{v} {t:.1} us"))
                .collect::<Vec<_>>();
            if let Some(t) = r.fused_us {
                skinny.push(format!("{} {t:.1} us", GemmImpl::SkinnySwiglu));
            }
            let with = if r.fused_us.is_some() {
                " (with the SwiGLU kernel)"
            } else {
                ""
            };
            out.push(format!(
                "{} ({} x {}), {} tokens: cuBLAS{with} {:.1} us, {} -> {}",
                r.label,
                r.n,
                r.k,
                r.tokens,
                r.cublas_us,
                skinny.join(", "),
                r.chosen
            ));
        }
        out
    }
}

/// Runs one GEMM: `(impl, m, n, k, w, x, y, accumulate)`; with [`GemmImpl::SkinnySwiglu`], `y`
/// is the 16-bit `[m, n / 2]` SwiGLU output.
pub type LaunchGemm<'a> =
    dyn Fn(GemmImpl, usize, usize, usize, u64, u64, u64, bool) -> Result<(), CudaError> + 'a;

/// Runs the SwiGLU kernel: `(m, inter, gate_up f32 [m, 2 inter], act 16-bit [m, inter])`.
pub type LaunchSwiglu<'a> = dyn Fn(usize, usize, u64, u64) -> Result<(), CudaError> + 'a;

/// Token counts the start-up check compares at: a tail in each token tile.
const CHECK_TOKENS: [usize; 4] = [1, 13, 29, 61];

/// How much faster than cuBLAS (as a fraction) a skinny kernel must time to be chosen.
const MIN_GAIN: f64 = 0.05;

/// Bytes of device memory [`tune`] allocates for projections of at most `max_n` outputs and
/// `max_k` inputs (freed when it returns).
pub fn tuning_bytes(max_n: usize, max_k: usize) -> usize {
    SKINNY_MAX_TOKENS * (max_k * 2 + 2 * max_n * 4 + 2 * max_n.div_ceil(2) * 2)
}

/// Relative difference above which the skinny kernel is taken to be wrong (both accumulate in
/// f32 from the same 16-bit inputs; only the summation order differs).
const CHECK_TOLERANCE: f64 = 1e-3;
/// The same for a 16-bit output, which may round the other way (bf16 keeps 8 significant bits).
const CHECK_TOLERANCE_16BIT: f64 = 1e-2;

/// Checks and times the skinny kernel against cuBLAS on `shapes` (see the module doc).
/// With [`GemmMode::Skinny`] a failed check is an error; with [`GemmMode::Auto`] it leaves
/// cuBLAS everywhere.
pub fn tune(
    stream: &Arc<CudaStream>,
    dtype: ActDtype,
    mode: GemmMode,
    shapes: &[GemmShape],
    launch: &LaunchGemm<'_>,
    swiglu: &LaunchSwiglu<'_>,
) -> Result<GemmPlan, CudaError> {
    let drv = |call: &'static str| move |e| CudaError::driver(call, e);
    let max_k = shapes.iter().map(|s| s.k).max().unwrap_or(1);
    let max_n = shapes.iter().map(|s| s.n).max().unwrap_or(1);
    // Random inputs in [-1, 1) from a fixed LCG (the check must see real products, not zeros).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let xs: Vec<f32> = (0..SKINNY_MAX_TOKENS * max_k)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let x: CudaSlice<u16> = stream
        .clone_htod(&to_half_bits(&xs, dtype))
        .map_err(drv("cuMemcpyHtoD (GEMM tuning)"))?;
    let y_ref: CudaSlice<f32> = stream
        .alloc_zeros(SKINNY_MAX_TOKENS * max_n)
        .map_err(drv("cuMemAlloc (GEMM tuning)"))?;
    let y_test: CudaSlice<f32> = stream
        .alloc_zeros(SKINNY_MAX_TOKENS * max_n)
        .map_err(drv("cuMemAlloc (GEMM tuning)"))?;
    let (xp, _) = x.device_ptr(stream);
    let (yr, _) = y_ref.device_ptr(stream);
    let (yt, _) = y_test.device_ptr(stream);
    // SwiGLU outputs (16-bit), reference and fused.
    let act_ref: CudaSlice<u16> = stream
        .alloc_zeros(SKINNY_MAX_TOKENS * max_n.div_ceil(2))
        .map_err(drv("cuMemAlloc (GEMM tuning)"))?;
    let act_test: CudaSlice<u16> = stream
        .alloc_zeros(SKINNY_MAX_TOKENS * max_n.div_ceil(2))
        .map_err(drv("cuMemAlloc (GEMM tuning)"))?;
    let (ar, _) = act_ref.device_ptr(stream);
    let (at, _) = act_test.device_ptr(stream);
    let to_f32 = |bits: &[u16]| -> Vec<f32> {
        bits.iter()
            .map(|&b| match dtype {
                ActDtype::Bf16 => half::bf16::from_bits(b).to_f32(),
                ActDtype::F16 => half::f16::from_bits(b).to_f32(),
            })
            .collect()
    };
    let max_diff = |got: &[f32], want: &[f32]| -> f64 {
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6) as f64;
        got.iter()
            .zip(want)
            .map(|(a, b)| {
                let d = (a - b).abs() as f64;
                if d.is_nan() { f64::INFINITY } else { d }
            })
            .fold(0f64, f64::max)
            / scale
    };

    let mut plan = GemmPlan {
        mode,
        ..GemmPlan::default()
    };

    // 1. Agreement with cuBLAS, every token tile with a tail (1, 13, 29 and 61 tokens). The fused SwiGLU output
    // is 16-bit, so it may differ from cuBLAS + the SwiGLU kernel by one rounding step.
    let mut worst = 0.0f64;
    for s in shapes.iter().filter(|s| skinny_applies(1, s.k)) {
        let Some(&w) = s.weights.first() else {
            continue;
        };
        for m in CHECK_TOKENS {
            launch(GemmImpl::Cublas, m, s.n, s.k, w, xp, yr, false)?;
            let want = stream
                .clone_dtoh(&y_ref.slice(0..m * s.n))
                .map_err(drv("cuMemcpyDtoH (GEMM tuning)"))?;
            let mut diffs = Vec::new();
            for v in SKINNY_VARIANTS {
                launch(v, m, s.n, s.k, w, xp, yt, false)?;
                let got = stream
                    .clone_dtoh(&y_test.slice(0..m * s.n))
                    .map_err(drv("cuMemcpyDtoH (GEMM tuning)"))?;
                diffs.push((v, max_diff(&got, &want), CHECK_TOLERANCE));
            }
            if s.swiglu {
                let inter = s.n / 2;
                swiglu(m, inter, yr, ar)?;
                launch(GemmImpl::SkinnySwiglu, m, s.n, s.k, w, xp, at, false)?;
                let want = stream
                    .clone_dtoh(&act_ref.slice(0..m * inter))
                    .map_err(drv("cuMemcpyDtoH (GEMM tuning)"))?;
                let got = stream
                    .clone_dtoh(&act_test.slice(0..m * inter))
                    .map_err(drv("cuMemcpyDtoH (GEMM tuning)"))?;
                diffs.push((
                    GemmImpl::SkinnySwiglu,
                    max_diff(&to_f32(&got), &to_f32(&want)),
                    CHECK_TOLERANCE_16BIT,
                ));
            }
            for (v, diff, tolerance) in diffs {
                worst = worst.max(diff);
                if diff > tolerance {
                    let why = format!(
                        "{v} differs from cuBLAS on {} ({} x {}) at {m} tokens: relative difference {diff:.2e} > {tolerance:.0e}",
                        s.label, s.n, s.k
                    );
                    if mode == GemmMode::Skinny {
                        return Err(CudaError::Unsupported(format!(
                            "{GEMM_MODE_ENV}=skinny: {why}"
                        )));
                    }
                    tracing::warn!("CUDA: {why}; using cuBLAS for every GEMM");
                    return Ok(GemmPlan::cublas_only(mode, Some(why)));
                }
            }
        }
    }
    plan.check_max_rel_diff = Some(worst);
    if mode == GemmMode::Skinny {
        // Forced: the timings would not change anything.
        return Ok(plan);
    }

    // 2. Timing, per shape and token bucket.
    // One call of `imp` on matrix `w`, followed for the gate/up projection by the SwiGLU kernel
    // unless it is fused in.
    let call = |imp: GemmImpl, m: usize, s: &GemmShape, w: u64| -> Result<(), CudaError> {
        if imp == GemmImpl::SkinnySwiglu {
            return launch(imp, m, s.n, s.k, w, xp, at, false);
        }
        launch(imp, m, s.n, s.k, w, xp, yt, false)?;
        if s.swiglu {
            swiglu(m, s.n / 2, yt, at)?;
        }
        Ok(())
    };
    let time = |imp: GemmImpl, m: usize, s: &GemmShape| -> Result<f64, CudaError> {
        let reps = (48 / s.weights.len()).max(2);
        for &w in &s.weights {
            call(imp, m, s, w)?;
        }
        let ev = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let start = ev().map_err(drv("cuEventRecord"))?;
        for _ in 0..reps {
            for &w in &s.weights {
                call(imp, m, s, w)?;
            }
        }
        let end = ev().map_err(drv("cuEventRecord"))?;
        let ms = start.elapsed_ms(&end).map_err(drv("cuEventElapsedTime"))?;
        Ok(f64::from(ms) * 1e3 / (reps * s.weights.len()) as f64)
    };
    for s in shapes.iter().filter(|s| skinny_applies(1, s.k)) {
        for (tile, &mt) in SKINNY_GEMM_TOKEN_TILES.iter().enumerate() {
            // Batch-1 decode is the common single-user case: the first bucket is timed there.
            let m = if tile == 0 { 1 } else { 8 * mt };
            let cublas_us = time(GemmImpl::Cublas, m, s)?;
            let skinny_us = SKINNY_VARIANTS
                .iter()
                .map(|&v| time(v, m, s))
                .collect::<Result<Vec<_>, _>>()?;
            let fused_us = if s.swiglu {
                Some(time(GemmImpl::SkinnySwiglu, m, s)?)
            } else {
                None
            };
            let (fastest, fastest_us) = SKINNY_VARIANTS
                .iter()
                .zip(&skinny_us)
                .map(|(v, t)| (*v, *t))
                .chain(fused_us.map(|t| (GemmImpl::SkinnySwiglu, t)))
                .fold((GemmImpl::Cublas, f64::INFINITY), |best, c| {
                    if c.1 < best.1 { c } else { best }
                });
            // cuBLAS unless clearly beaten, so that timing noise does not flip the choice (and
            // with it the last bits of the logits) from one start to the next.
            let chosen = if fastest_us < cublas_us * (1.0 - MIN_GAIN) {
                fastest
            } else {
                GemmImpl::Cublas
            };
            plan.choices.insert((s.label, tile), chosen);
            plan.records.push(TuneRecord {
                label: s.label,
                n: s.n,
                k: s.k,
                tokens: m,
                cublas_us,
                skinny_us,
                fused_us,
                chosen,
            });
        }
    }
    stream.synchronize().map_err(drv("cuStreamSynchronize"))?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_bad_values_are_named() {
        assert_eq!("auto".parse::<GemmMode>(), Ok(GemmMode::Auto));
        assert_eq!("cuBLAS".parse::<GemmMode>(), Ok(GemmMode::Cublas));
        assert_eq!(" skinny ".parse::<GemmMode>(), Ok(GemmMode::Skinny));
        let err = "fast".parse::<GemmMode>().unwrap_err();
        assert!(err.contains("STEPSCOPE_CUDA_GEMM") && err.contains("auto, cublas or skinny"));
    }

    #[test]
    fn the_check_covers_every_token_tile_with_a_tail() {
        let tiles: Vec<usize> = CHECK_TOKENS.iter().filter_map(|&m| token_tile(m)).collect();
        assert_eq!(
            tiles,
            (0..SKINNY_GEMM_TOKEN_TILES.len()).collect::<Vec<_>>()
        );
        assert!(CHECK_TOKENS.iter().all(|m| m % 8 != 0));
    }

    #[test]
    fn token_tiles_cover_up_to_64_tokens() {
        assert_eq!(token_tile(1), Some(0));
        assert_eq!(token_tile(8), Some(0));
        assert_eq!(token_tile(9), Some(1));
        assert_eq!(token_tile(32), Some(2));
        assert_eq!(token_tile(33), Some(3));
        assert_eq!(token_tile(64), Some(3));
        assert_eq!(token_tile(65), None);
        assert!(skinny_applies(64, 2048));
        assert!(!skinny_applies(65, 2048));
        assert!(!skinny_applies(4, 2044));
    }

    #[test]
    fn plan_falls_back_to_cublas_where_the_skinny_kernel_does_not_apply() {
        let mut plan = GemmPlan {
            mode: GemmMode::Auto,
            ..GemmPlan::default()
        };
        plan.choices.insert(("gemm qkv", 2), SKINNY_VARIANTS[1]);
        plan.choices
            .insert(("gemm gate_up", 0), GemmImpl::SkinnySwiglu);
        assert_eq!(plan.choose("gemm qkv", 32, 2048, false), SKINNY_VARIANTS[1]);
        assert_eq!(
            plan.choose("gemm gate_up", 3, 2048, true),
            GemmImpl::SkinnySwiglu
        );
        // untimed bucket or projection, too many tokens, k not a multiple of 8
        assert_eq!(plan.choose("gemm qkv", 4, 2048, false), GemmImpl::Cublas);
        assert_eq!(plan.choose("gemm o", 32, 2048, false), GemmImpl::Cublas);
        assert_eq!(plan.choose("gemm qkv", 65, 2048, false), GemmImpl::Cublas);
        assert_eq!(plan.choose("gemm qkv", 32, 2044, false), GemmImpl::Cublas);
        // the fused kernel never where no SwiGLU follows
        assert_eq!(
            plan.choose("gemm gate_up", 3, 2048, false),
            GemmImpl::Cublas
        );
        plan.mode = GemmMode::Skinny;
        assert_eq!(plan.choose("gemm o", 4, 16, false), SKINNY_VARIANTS[0]);
        assert_eq!(
            plan.choose("gemm gate_up", 4, 16, true),
            GemmImpl::SkinnySwiglu
        );
        plan.skinny_disabled = Some("disagrees".into());
        assert_eq!(plan.choose("gemm o", 4, 16, false), GemmImpl::Cublas);
        assert_eq!(plan.choose("gemm gate_up", 4, 16, true), GemmImpl::Cublas);
        assert!(plan.describe()[0].contains("disagrees"));
        plan.mode = GemmMode::Cublas;
        plan.skinny_disabled = None;
        assert_eq!(plan.choose("gemm o", 4, 16, false), GemmImpl::Cublas);
    }
}
