//! The few-row (decode) kernel shared by f32 and half-precision weights: for one task's weight
//! rows, `dst[j * m + i] = x_i · w_j`, computed in register tiles of up to `MR` activation rows
//! × `NR` weight rows reduced along `k`, so each weight row is streamed from memory once and
//! reused from registers for every activation row. The weight element type ([`F32`], [`F16`],
//! [`BF16`]) is a const parameter of the tile; its one element-specific step is loading a vector
//! of weights widened to f32 (a plain load, F16C `vcvtph2ps`, or a 16-bit shift for bf16), so
//! the same tile serves every storage and half weights cost half the memory traffic. The
//! instruction set (AVX-512F, AVX2 + FMA + F16C, or portable Rust) is chosen at run time.

use super::kernels::dot_lanes;

/// Weight elements stored as little-endian f32.
pub const F32: u8 = 0;
/// Weight elements stored as IEEE half precision.
pub const F16: u8 = 1;
/// Weight elements stored as bfloat16.
pub const BF16: u8 = 2;

/// Bytes per weight element of kind `W`.
pub const fn elem_bytes(w: u8) -> usize {
    if w == F32 { 4 } else { 2 }
}

/// Which instruction set the tiles run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    /// AVX2, FMA and F16C (every AVX2 CPU has F16C).
    Avx2,
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU has.
    pub fn detect() -> Isa {
        *Isa::available().last().unwrap_or(&Isa::Portable)
    }

    /// Every instruction set this CPU can run, portable first (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect()
    }

    /// Whether this CPU can run `self` (feature detection is cached by std).
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::Avx512 => avx2 && has!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }
}

/// One weight element at index `i` of `bytes` (kind `W`) as f32.
#[inline(always)]
fn scalar<const W: u8>(bytes: &[u8], i: usize) -> f32 {
    match W {
        F32 => f32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]),
        F16 => half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        _ => half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
    }
}

/// `dst[j * m + i] = x_i · w_j` for the weight rows in `rows` (whole rows of `k` elements of kind
/// `W`) and the `m` activation rows of `x` (`[m, k]`). `isa` must be one of
/// [`Isa::available`].
pub fn rows_task<const W: u8>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    rows: &[u8],
    dst: &mut [f32],
) {
    let row_len = k * elem_bytes(W);
    let nw = rows.len() / row_len.max(1);
    assert!(
        x.len() >= m * k && dst.len() >= nw * m,
        "row tile operand sizes"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.supported());
            tiled::<W, 4, 4>(x, m, k, rows, dst, |xs, mr, ws, nr, ahead, res| {
                // SAFETY: AVX-512F was detected (asserted above); the slices hold `mr` rows of
                // `k` floats and `nr` rows of `k` elements, which is all the tiles read
                // (`ahead` is only prefetched, never read).
                unsafe {
                    match (mr, nr) {
                        (4, 4) => x86::tile_avx512::<W, 4, 4>(xs, ws, k, ahead, res),
                        (4, _) => x86::tile_avx512::<W, 4, 1>(xs, ws, k, ahead, res),
                        (_, 4) => x86::tile_avx512::<W, 1, 4>(xs, ws, k, ahead, res),
                        _ => x86::tile_avx512::<W, 1, 1>(xs, ws, k, ahead, res),
                    }
                }
            })
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.supported());
            tiled::<W, 2, 4>(x, m, k, rows, dst, |xs, mr, ws, nr, ahead, res| {
                // SAFETY: AVX2, FMA and F16C were detected (asserted above); the slices hold
                // `mr` rows of `k` floats and `nr` rows of `k` elements (`ahead` is only
                // prefetched).
                unsafe {
                    match (mr, nr) {
                        (2, 4) => x86::tile_avx2::<W, 2, 4>(xs, ws, k, ahead, res),
                        (2, _) => x86::tile_avx2::<W, 2, 1>(xs, ws, k, ahead, res),
                        (_, 4) => x86::tile_avx2::<W, 1, 4>(xs, ws, k, ahead, res),
                        _ => x86::tile_avx2::<W, 1, 1>(xs, ws, k, ahead, res),
                    }
                }
            })
        }
        _ => portable::<W>(x, m, k, rows, dst),
    }
}

/// One row of `out.len()` weights of kind `W` (`bytes`) widened to f32 into `out`, 8 at a
/// time where `isa` has AVX2 (the long-prefill path widens weights for the f32 GEMM).
pub fn widen_row<const W: u8>(isa: Isa, bytes: &[u8], out: &mut [f32]) {
    assert!(bytes.len() >= elem_bytes(W) * out.len(), "widen_row sizes");
    #[cfg(target_arch = "x86_64")]
    let done = if isa != Isa::Portable && isa.supported() {
        // SAFETY: AVX2, FMA and F16C were detected (every non-portable ISA has them); the
        // lengths were asserted above.
        unsafe { x86::widen_row::<W>(bytes, out) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = isa;
        0
    };
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = scalar::<W>(bytes, i);
    }
}

/// Results of one tile: `res[a * 4 + b]` for activation row `a`, weight row `b`.
#[cfg(target_arch = "x86_64")]
type TileResult = [f32; 16];

/// Walks the rows in tiles of `MR` activation rows × `NR` weight rows (single rows cover the
/// edges); `tile(xs, mr, ws, nr, ahead, res)` computes one.
///
/// A tile reads its `NR` rows side by side, and the CPU's stream prefetchers lose track of
/// several streams a row apart (Zen 4 here: 11.8 GB/s per thread over 4 interleaved f16 rows
/// against 21 GB/s over one row at a time, in a C loop). So the first pass over each group of
/// `NR` rows also prefetches, in address order, the `NR` rows two tiles ahead (`ahead`; null
/// when there is nothing to prefetch): 24 GB/s in the same loop.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tiled<const W: u8, const MR: usize, const NR: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &[u8],
    dst: &mut [f32],
    tile: impl Fn(&[f32], usize, &[u8], usize, *const u8, &mut TileResult),
) {
    let row_len = k * elem_bytes(W);
    let nw = rows.len() / row_len.max(1);
    let mut res = [0f32; 16];
    let mut j = 0;
    while j < nw {
        let nr = if nw - j >= NR { NR } else { 1 };
        let ws = &rows[j * row_len..(j + nr) * row_len];
        let mut i = 0;
        while i < m {
            let mr = if m - i >= MR { MR } else { 1 };
            // Past the end of `rows` this only prefetches (which never faults) other memory.
            let ahead = if i == 0 && nr == NR {
                rows.as_ptr().wrapping_add((j + nr + NR) * row_len)
            } else {
                std::ptr::null()
            };
            tile(&x[i * k..(i + mr) * k], mr, ws, nr, ahead, &mut res);
            for a in 0..mr {
                for b in 0..nr {
                    dst[(j + b) * m + i + a] = res[a * 4 + b];
                }
            }
            i += mr;
        }
        j += nr;
    }
}

/// Portable Rust: each weight row widened to f32 (f32 rows used in place), then one dot
/// product per activation row.
fn portable<const W: u8>(x: &[f32], m: usize, k: usize, rows: &[u8], dst: &mut [f32]) {
    let row_len = k * elem_bytes(W);
    let mut wide = vec![0f32; k];
    for (wrow, d) in rows
        .chunks_exact(row_len.max(1))
        .zip(dst.chunks_exact_mut(m))
    {
        // SAFETY: every bit pattern is a valid f32; `align_to` only yields the aligned middle.
        let (head, floats, _) = unsafe { wrow.align_to::<f32>() };
        let w: &[f32] = if W == F32 && head.is_empty() && floats.len() == k {
            floats
        } else {
            for (c, v) in wide.iter_mut().enumerate() {
                *v = scalar::<W>(wrow, c);
            }
            &wide
        };
        for (i, di) in d.iter_mut().enumerate() {
            *di = dot_lanes::<false>(&x[i * k..(i + 1) * k], w);
        }
    }
}

/// The tiles in AVX2 and AVX-512 intrinsics.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{F16, F32, TileResult, elem_bytes, scalar};

    /// 8 weights of kind `W` at `p` widened to f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load8<const W: u8>(p: *const u8) -> __m256 {
        // SAFETY: the caller passes 8 readable elements.
        unsafe {
            match W {
                F32 => _mm256_loadu_ps(p.cast()),
                F16 => _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _ => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(p.cast()),
                ))),
            }
        }
    }

    /// 16 weights of kind `W` at `p` widened to f32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<const W: u8>(p: *const u8) -> __m512 {
        // SAFETY: the caller passes 16 readable elements.
        unsafe {
            match W {
                F32 => _mm512_loadu_ps(p.cast()),
                F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
                _ => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(p.cast()),
                ))),
            }
        }
    }

    /// Widens the whole 8-element groups of `bytes` into `out`; returns how many were done.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `bytes` holds `out.len()` elements of kind `W`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_row<const W: u8>(bytes: &[u8], out: &mut [f32]) -> usize {
        let full = out.len() / 8 * 8;
        let eb = elem_bytes(W);
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 8 <= out.len()`: 8 elements at `c` exist in both.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(c),
                    load8::<W>(bytes.as_ptr().add(c * eb)),
                )
            };
            c += 8;
        }
        full
    }

    /// The lane sum of 8 floats, pairwise.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum8(v: __m256) -> f32 {
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
            + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
    }

    /// One tile function per vector width: `res[a * 4 + b] = xs_a · ws_b` for `R` rows of `xs`
    /// and `C` rows of `ws`, `k` long, `$lanes` at a time (`$wload` widens `$lanes` weights of
    /// kind `W`), the elements past the last whole vector added in scalar code. Unless `ahead`
    /// is null, each step also prefetches the next `C * $lanes` elements' bytes from `ahead`, so
    /// the whole loop prefetches `C` rows from there in address order.
    macro_rules! tile_fn {
        ($(#[$doc:meta])* $name:ident, $features:literal, $lanes:literal,
         $zero:ident, $xload:ident, $fma:ident, $wload:ident, $hsum:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const W: u8, const R: usize, const C: usize>(
                xs: &[f32],
                ws: &[u8],
                k: usize,
                ahead: *const u8,
                res: &mut TileResult,
            ) {
                let eb = elem_bytes(W);
                let ahead_step = C * $lanes * eb;
                assert!(xs.len() >= R * k && ws.len() >= C * k * eb && R <= 4 && C <= 4);
                let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
                let mut acc = [[$zero(); C]; R];
                let full = k / $lanes * $lanes;
                let mut c = 0;
                while c < full {
                    if !ahead.is_null() {
                        let from = ahead.wrapping_add(c / $lanes * ahead_step);
                        for line in (0..ahead_step).step_by(64) {
                            // A prefetch reads nothing and never faults.
                            _mm_prefetch::<_MM_HINT_T0>(from.wrapping_add(line).cast());
                        }
                    }
                    // SAFETY: `c + $lanes <= k`: every load is inside the asserted lengths.
                    unsafe {
                        let mut wv = [$zero(); C];
                        for (b, v) in wv.iter_mut().enumerate() {
                            *v = $wload::<W>(wp.add((b * k + c) * eb));
                        }
                        for (a, acc_a) in acc.iter_mut().enumerate() {
                            let xv = $xload(xp.add(a * k + c));
                            for (acc_ab, v) in acc_a.iter_mut().zip(&wv) {
                                *acc_ab = $fma(xv, *v, *acc_ab);
                            }
                        }
                    }
                    c += $lanes;
                }
                for (a, acc_a) in acc.iter().enumerate() {
                    for (b, v) in acc_a.iter().enumerate() {
                        let lanes = (full..k)
                            .fold(0.0, |s, c| s + xs[a * k + c] * scalar::<W>(ws, b * k + c));
                        res[a * 4 + b] = $hsum(*v) + lanes;
                    }
                }
            }
        };
    }

    tile_fn!(
        /// # Safety
        /// AVX2, FMA and F16C must be available.
        tile_avx2, "avx2,fma,f16c", 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, load8, hsum8
    );
    tile_fn!(
        /// # Safety
        /// AVX-512F must be available.
        tile_avx512, "avx512f", 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, load16, _mm512_reduce_add_ps
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    /// Weight rows of kind `W` (as bytes) and the f32 values they hold.
    fn weights<const W: u8>(rng: &mut SplitMix64, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut values = Vec::new();
        for _ in 0..n * k {
            let v = rng.uniform() * 2.0 - 1.0;
            match W {
                F32 => {
                    bytes.extend_from_slice(&v.to_le_bytes());
                    values.push(v);
                }
                F16 => {
                    let h = half::f16::from_f32(v);
                    bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    values.push(h.to_f32());
                }
                _ => {
                    let h = half::bf16::from_f32(v);
                    bytes.extend_from_slice(&h.to_bits().to_le_bytes());
                    values.push(h.to_f32());
                }
            }
        }
        (bytes, values)
    }

    fn check<const W: u8>() {
        let mut rng = SplitMix64::new(u64::from(W) + 11);
        // k below, at and past a vector and not a multiple of 8; n and m not multiples of tiles.
        for (k, n) in [(5, 3), (16, 9), (37, 13), (64, 4)] {
            let (bytes, values) = weights::<W>(&mut rng, n, k);
            for isa in Isa::available() {
                let mut wide = vec![f32::NAN; n * k];
                widen_row::<W>(isa, &bytes, &mut wide);
                assert_eq!(wide, values, "widen_row W={W} {isa:?} k={k}");
            }
            for m in [1, 2, 3, 5, 16] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                for isa in Isa::available() {
                    let mut dst = vec![f32::NAN; n * m];
                    rows_task::<W>(isa, &x, m, k, &bytes, &mut dst);
                    for j in 0..n {
                        for i in 0..m {
                            let want: f64 = (0..k)
                                .map(|c| f64::from(x[i * k + c]) * f64::from(values[j * k + c]))
                                .sum();
                            let got = f64::from(dst[j * m + i]);
                            assert!(
                                (got - want).abs() < 1e-4,
                                "W={W} {isa:?} k={k} n={n} m={m} ({i}, {j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_and_element_kind_matches_the_f64_product() {
        check::<F32>();
        check::<F16>();
        check::<BF16>();
    }
}
