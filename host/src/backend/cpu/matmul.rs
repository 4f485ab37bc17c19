//! Matrix multiplication for the CPU backend: `out = x · wᵀ` with weights in the Hugging Face
//! `[out, in]` layout. Many rows go to the `gemm` crate (rayon-parallel, AVX-512 where
//! available); a few rows (decode steps), where a GEMM degenerates into a memory-bound GEMV, go
//! to a rayon-parallel register-tiled kernel with explicit AVX2/AVX-512 intrinsics chosen at run
//! time, which streams each weight row from memory once for all input rows.

use rayon::prelude::*;

use super::kernels::{dot_lanes, has_avx2_fma};
use super::qmatmul::{QuantizedActs, matmul_blocks};
use crate::model::weight_matrix::WeightMatrix;
use crate::model::weights::Matrix;

/// Up to this many rows, `matmul` uses the row-tiled kernel instead of `gemm`.
pub const SMALL_M: usize = 16;
/// Output columns per rayon task in the row-tiled kernel.
const COLS_PER_TASK: usize = 32;

/// Buffers the matmul kernels reuse across calls (they only grow).
#[derive(Debug, Default)]
pub struct MatmulScratch {
    /// The few-row f32 kernel's `[n, m]` results.
    pub(super) f32_rows: Vec<f32>,
    /// The block kernels' `[n, m]` results.
    pub(super) cols: Vec<f32>,
    /// Activations quantized for the int8 kernels.
    pub(super) acts: QuantizedActs,
    /// Half-precision weight rows widened to f32, and their product.
    pub(super) widened: Vec<f32>,
    pub(super) part_out: Vec<f32>,
}

/// Computes `out = x · wᵀ` (or `out += x · wᵀ` with `accumulate`), with `x` `[m, k]`, `w`
/// `[n, k]` (the Hugging Face `[out, in]` layout) and `out` `[m, n]`, all row-major, for
/// weights in f32 or a block format.
pub fn matmul(
    x: &[f32],
    m: usize,
    w: &WeightMatrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut MatmulScratch,
) {
    match w {
        WeightMatrix::F32(w) => matmul_f32(x, m, w, out, accumulate, &mut scratch.f32_rows),
        WeightMatrix::Blocks(w) => matmul_blocks(x, m, w, out, accumulate, scratch),
    }
}

/// [`matmul`] for f32 weights. `scratch` is reused across calls by the small-`m` kernel.
pub fn matmul_f32(
    x: &[f32],
    m: usize,
    w: &Matrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "matmul operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if m <= SMALL_M {
        matmul_rows(x, m, w, out, accumulate, scratch);
        return;
    }
    // SAFETY: the asserts above guarantee every index the strides below reach is in bounds:
    // dst (i, j) = i * n + j < m * n, lhs (i, kk) = i * k + kk < m * k, rhs (kk, j) = j * k + kk
    // < n * k = w.data.len(); `out` does not alias `x` or `w` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            x.as_ptr(),
            1,
            k as isize,
            w.data.as_ptr(),
            k as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// Which instruction set the hand-tiled kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Baseline,
    Avx2Fma,
    Avx512,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if has_avx2_fma() {
            return Isa::Avx2Fma;
        }
    }
    Isa::Baseline
}

/// The few-row case: tasks split the output columns (weight rows); within a task, tiles of
/// `MR` input rows × `NR` weight rows are reduced along `k` in registers, so each weight row is
/// streamed from memory once and reused from L1 for every input row.
fn matmul_rows(
    x: &[f32],
    m: usize,
    w: &Matrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut Vec<f32>,
) {
    let (n, k) = (w.rows, w.cols);
    scratch.clear();
    scratch.resize(n * m, 0.0);
    let isa = isa();
    scratch
        .par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let j0 = chunk * COLS_PER_TASK;
            let rows = &w.data[j0 * k..(j0 + dst.len() / m) * k];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => rows_task_avx512(x, m, k, rows, dst),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2Fma => rows_task_avx2(x, m, k, rows, dst),
                _ => rows_task_portable(x, m, k, rows, dst),
            }
        });
    // `scratch` is `[n, m]`; transpose into `out` `[m, n]`.
    scatter_transposed(scratch, m, n, out, accumulate);
}

/// Writes (or, with `accumulate`, adds) the transpose of `res` (`[n, m]`, what the few-row
/// kernels produce: one weight row's results for every activation row together) into `out`
/// (`[m, n]`).
pub(super) fn scatter_transposed(
    res: &[f32],
    m: usize,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    for i in 0..m {
        let o = &mut out[i * n..(i + 1) * n];
        if accumulate {
            for (j, v) in o.iter_mut().enumerate() {
                *v += res[j * m + i];
            }
        } else {
            for (j, v) in o.iter_mut().enumerate() {
                *v = res[j * m + i];
            }
        }
    }
}

/// Input rows per tile.
const MR: usize = 4;

/// `dst[j * m + i] = x_i · rows_j` for the weight rows of one task, in tiles of `MR` input rows
/// × `NR` weight rows (`tile` computes one tile; single rows/columns cover the edges).
#[inline(always)]
fn rows_task_tiled<const NR: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    rows: &[f32],
    dst: &mut [f32],
    tile: impl Fn(&[f32], usize, &[f32], usize, usize, &mut [f32; MR * 4]),
) {
    let nw = rows.len() / k;
    let mut res = [0f32; MR * 4];
    let mut j = 0;
    while j < nw {
        let nr = if nw - j >= NR { NR } else { 1 };
        let mut i = 0;
        while i < m {
            let mr = if m - i >= MR { MR } else { 1 };
            tile(
                &x[i * k..(i + mr) * k],
                mr,
                &rows[j * k..(j + nr) * k],
                nr,
                k,
                &mut res,
            );
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

/// Portable fallback: one dot product at a time.
fn rows_task_portable(x: &[f32], m: usize, k: usize, rows: &[f32], dst: &mut [f32]) {
    for (wrow, d) in rows.chunks_exact(k).zip(dst.chunks_exact_mut(m)) {
        for (i, di) in d.iter_mut().enumerate() {
            *di = dot_lanes::<false>(&x[i * k..(i + 1) * k], wrow);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn rows_task_avx2(x: &[f32], m: usize, k: usize, rows: &[f32], dst: &mut [f32]) {
    rows_task_tiled::<2>(x, m, k, rows, dst, |xs, mr, ws, nr, k, res| {
        // SAFETY: only called after AVX2 and FMA were detected; the slices hold `mr` and `nr`
        // rows of `k` floats, which is all the tiles read.
        unsafe {
            match (mr, nr) {
                (MR, 2) => x86::tile_avx2::<MR, 2>(xs, ws, k, res),
                (MR, _) => x86::tile_avx2::<MR, 1>(xs, ws, k, res),
                (_, 2) => x86::tile_avx2::<1, 2>(xs, ws, k, res),
                _ => x86::tile_avx2::<1, 1>(xs, ws, k, res),
            }
        }
    })
}

#[cfg(target_arch = "x86_64")]
fn rows_task_avx512(x: &[f32], m: usize, k: usize, rows: &[f32], dst: &mut [f32]) {
    rows_task_tiled::<4>(x, m, k, rows, dst, |xs, mr, ws, nr, k, res| {
        // SAFETY: only called after AVX-512F was detected; the slices hold `mr` and `nr` rows
        // of `k` floats, which is all the tiles read.
        unsafe {
            match (mr, nr) {
                (MR, 4) => x86::tile_avx512::<MR, 4>(xs, ws, k, res),
                (MR, _) => x86::tile_avx512::<MR, 1>(xs, ws, k, res),
                (_, 4) => x86::tile_avx512::<1, 4>(xs, ws, k, res),
                _ => x86::tile_avx512::<1, 1>(xs, ws, k, res),
            }
        }
    })
}

/// Register-tiled dot products with explicit AVX2/AVX-512 intrinsics.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::MR;

    /// `res[a * 4 + b] = xs_a · ws_b` for `R` rows of `xs` and `C` rows of `ws`, `k` long.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `xs.len() >= R * k` and `ws.len() >= C * k`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const R: usize, const C: usize>(
        xs: &[f32],
        ws: &[f32],
        k: usize,
        res: &mut [f32; MR * 4],
    ) {
        assert!(xs.len() >= R * k && ws.len() >= C * k && R <= MR && C <= 4);
        let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / 8 * 8;
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 8 <= k` and the asserted lengths keep every load in bounds.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); C];
                for (b, w) in wv.iter_mut().enumerate() {
                    *w = _mm256_loadu_ps(wp.add(b * k + c));
                }
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(a * k + c));
                    for (acc_ab, w) in acc_a.iter_mut().zip(&wv) {
                        *acc_ab = _mm256_fmadd_ps(xv, *w, *acc_ab);
                    }
                }
            }
            c += 8;
        }
        for (a, acc_a) in acc.iter().enumerate() {
            for (b, v) in acc_a.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds 8 floats.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *v) };
                let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for kk in full..k {
                    s += xs[a * k + kk] * ws[b * k + kk];
                }
                res[a * 4 + b] = s;
            }
        }
    }

    /// As [`tile_avx2`], 16 lanes at a time.
    ///
    /// # Safety
    /// AVX-512F must be available; `xs.len() >= R * k` and `ws.len() >= C * k`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512<const R: usize, const C: usize>(
        xs: &[f32],
        ws: &[f32],
        k: usize,
        res: &mut [f32; MR * 4],
    ) {
        assert!(xs.len() >= R * k && ws.len() >= C * k && R <= MR && C <= 4);
        let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = k / 16 * 16;
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 16 <= k` and the asserted lengths keep every load in bounds.
            unsafe {
                let mut wv = [_mm512_setzero_ps(); C];
                for (b, w) in wv.iter_mut().enumerate() {
                    *w = _mm512_loadu_ps(wp.add(b * k + c));
                }
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(xp.add(a * k + c));
                    for (acc_ab, w) in acc_a.iter_mut().zip(&wv) {
                        *acc_ab = _mm512_fmadd_ps(xv, *w, *acc_ab);
                    }
                }
            }
            c += 16;
        }
        for (a, acc_a) in acc.iter().enumerate() {
            for (b, v) in acc_a.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*v);
                for kk in full..k {
                    s += xs[a * k + kk] * ws[b * k + kk];
                }
                res[a * 4 + b] = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    fn naive(x: &[f32], m: usize, w: &Matrix) -> Vec<f32> {
        let mut out = vec![0.0; m * w.rows];
        for i in 0..m {
            for j in 0..w.rows {
                let mut s = 0f64;
                for kk in 0..w.cols {
                    s += f64::from(x[i * w.cols + kk]) * f64::from(w.data[j * w.cols + kk]);
                }
                out[i * w.rows + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_for_all_row_counts() {
        let mut rng = SplitMix64::new(7);
        let (n, k) = (70, 45);
        let w = Matrix::new(n, k, (0..n * k).map(|_| rng.uniform()).collect());
        let mut scratch = Vec::new();
        for m in [1, 2, 3, 4, 5, 17, 64] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
            let expect = naive(&x, m, &w);
            let mut out = vec![0.0; m * n];
            matmul_f32(&x, m, &w, &mut out, false, &mut scratch);
            for (a, b) in out.iter().zip(&expect) {
                assert!((a - b).abs() < 1e-4, "m={m}: {a} vs {b}");
            }
            matmul_f32(&x, m, &w, &mut out, true, &mut scratch);
            for (a, b) in out.iter().zip(&expect) {
                assert!((a - 2.0 * b).abs() < 2e-4, "accumulate m={m}");
            }
        }
    }
}
