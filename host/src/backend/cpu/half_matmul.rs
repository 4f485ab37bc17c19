//! Matrix multiplication with half-precision weights (f16 or bf16, `--dtype float16|bfloat16`
//! on the CPU, or an F16/BF16 GGUF): `out = x · wᵀ` with f32 activations and f32
//! accumulation. Up to 256 activation rows (decode, short prefills) go to the register-tiled
//! kernel shared with f32 weights ([`super::row_tiles`]), which widens each weight vector once
//! (F16C `vcvtph2ps`, or a 16-bit shift for bf16) and multiplies it into every row, so each
//! weight byte is read from memory once: half the bytes of f32 weights. More rows (long
//! prefills) widen a chunk of weight rows to f32 at a time (in parallel) and hand it to the f32
//! GEMM, whose compute dominates there.

use rayon::prelude::*;

use super::matmul::{MatmulScratch, matmul_f32, scatter_transposed};
use super::row_tiles::{BF16, F16, Isa, rows_task, widen_row};
use crate::model::quant::BlockFormat;
use crate::model::weight_matrix::BlockMatrix;
use crate::model::weights::Matrix;

/// Weight rows per rayon task in the few-row kernel.
const ROWS_PER_TASK: usize = 32;
/// Up to this many activation rows the register-tiled kernel runs (a 128-token prefill
/// included): it reads each half weight once and keeps it in registers/L1 while the activation
/// rows stream from L2, where widening the weights to f32 for the GEMM costs more than it gains
/// (measured on `bench model` with the F16 GGUF, 2 threads: prefill of 128 tokens ~8% faster
/// tiled; 16 × 128 tokens 2.5× faster through the GEMM).
const TILED_MAX_M: usize = 256;
/// Weight rows widened to f32 per GEMM call in the many-row path.
const ROWS_PER_CHUNK: usize = 2048;

/// `out = x · wᵀ` (or `+=` with `accumulate`) for f16/bf16 weights.
pub fn matmul_half(
    x: &[f32],
    m: usize,
    w: &BlockMatrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut MatmulScratch,
) {
    if m <= TILED_MAX_M {
        few_rows(x, m, w, out, accumulate, scratch);
    } else {
        many_rows(x, m, w, out, accumulate, scratch);
    }
}

/// Tasks over weight rows; `scratch.cols` gets `[n, m]`, then is transposed into `out`.
fn few_rows(
    x: &[f32],
    m: usize,
    w: &BlockMatrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut MatmulScratch,
) {
    let (n, k) = (w.rows, w.cols);
    let res = &mut scratch.cols;
    res.clear();
    res.resize(n * m, 0.0);
    let bf16 = w.format == BlockFormat::Bf16;
    let mut tasks: Vec<(&[u8], &mut [f32])> = Vec::new();
    let mut rest = res.as_mut_slice();
    for part in &w.parts {
        let bytes = part.bytes.as_slice();
        for r0 in (0..part.rows).step_by(ROWS_PER_TASK) {
            let rows = ROWS_PER_TASK.min(part.rows - r0);
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(rows * m);
            tasks.push((&bytes[r0 * 2 * k..(r0 + rows) * 2 * k], dst));
            rest = tail;
        }
    }
    let isa = Isa::detect();
    tasks.into_par_iter().for_each(|(rows, dst)| {
        if bf16 {
            rows_task::<BF16>(isa, x, m, k, rows, dst);
        } else {
            rows_task::<F16>(isa, x, m, k, rows, dst);
        }
    });
    scatter_transposed(res, m, n, out, accumulate);
}

/// Chunks of weight rows widened to f32 (in parallel), each multiplied by the f32 GEMM into its
/// columns of `out`.
fn many_rows(
    x: &[f32],
    m: usize,
    w: &BlockMatrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut MatmulScratch,
) {
    let (n, k) = (w.rows, w.cols);
    let mut j0 = 0;
    while j0 < n {
        let rows = ROWS_PER_CHUNK.min(n - j0);
        let mut data = std::mem::take(&mut scratch.widened);
        data.resize(rows * k, 0.0);
        let isa = Isa::detect();
        let bf16 = w.format == BlockFormat::Bf16;
        data.par_chunks_mut(k * 16)
            .enumerate()
            .for_each(|(c, block)| {
                for (i, row) in block.chunks_exact_mut(k).enumerate() {
                    let bytes = w.row_bytes(j0 + c * 16 + i);
                    if bf16 {
                        widen_row::<BF16>(isa, &bytes, row);
                    } else {
                        widen_row::<F16>(isa, &bytes, row);
                    }
                }
            });
        let chunk = Matrix::new(rows, k, data);
        let mut part = std::mem::take(&mut scratch.part_out);
        part.resize(m * rows, 0.0);
        matmul_f32(x, m, &chunk, &mut part, false, &mut scratch.f32_rows);
        for i in 0..m {
            let src = &part[i * rows..(i + 1) * rows];
            let dst = &mut out[i * n + j0..i * n + j0 + rows];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
        scratch.widened = chunk.data;
        scratch.part_out = part;
        j0 += rows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    #[test]
    fn half_weights_match_widen_then_multiply_for_few_and_many_rows() {
        let mut rng = SplitMix64::new(5);
        for format in [BlockFormat::F16, BlockFormat::Bf16] {
            // Odd sizes: k not a multiple of 8, rows not a multiple of the tiles, two parts.
            let (k, n1, n2) = (37, 45, 6);
            let a = Matrix::new(n1, k, (0..n1 * k).map(|_| rng.uniform()).collect());
            let b = Matrix::new(n2, k, (0..n2 * k).map(|_| rng.uniform()).collect());
            let w = BlockMatrix::vstack(vec![
                BlockMatrix::quantize(&a, format).unwrap(),
                BlockMatrix::quantize(&b, format).unwrap(),
            ])
            .unwrap();
            let wide = w.dequantize();
            for m in [1, 3, 5, 16, 17, 40, TILED_MAX_M + 3] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                let mut out = vec![0.5f32; m * w.rows];
                matmul_half(&x, m, &w, &mut out, true, &mut MatmulScratch::default());
                for i in 0..m {
                    for j in 0..w.rows {
                        let want: f64 = (0..k)
                            .map(|c| f64::from(x[i * k + c]) * f64::from(wide.data[j * k + c]))
                            .sum();
                        let got = f64::from(out[i * w.rows + j]) - 0.5;
                        assert!((got - want).abs() < 1e-4, "{format:?} m={m} ({i}, {j})");
                    }
                }
            }
        }
    }
}
