//! Matrix multiplication for the CPU backend: `out = x · wᵀ` with weights in the Hugging Face
//! `[out, in]` layout. Many rows go to the `gemm` crate (rayon-parallel, AVX-512 where
//! available); a few rows (decode steps), where a GEMM degenerates into a memory-bound GEMV, go
//! to the rayon-parallel register-tiled kernel of [`super::row_tiles`] (AVX2/AVX-512 chosen at
//! run time), which streams each weight row from memory once for all input rows.

use rayon::prelude::*;

use super::qmatmul::{QuantizedActs, matmul_blocks};
use super::row_tiles::{F32, Isa, rows_task};
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
    let isa = Isa::detect();
    scratch
        .par_chunks_mut(COLS_PER_TASK * m)
        .enumerate()
        .for_each(|(chunk, dst)| {
            let j0 = chunk * COLS_PER_TASK;
            let rows = &w.data[j0 * k..(j0 + dst.len() / m) * k];
            // SAFETY: every f32 is 4 initialised bytes; the byte view covers exactly `rows`.
            let bytes = unsafe {
                std::slice::from_raw_parts(rows.as_ptr().cast::<u8>(), std::mem::size_of_val(rows))
            };
            rows_task::<F32>(isa, x, m, k, bytes, dst);
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
