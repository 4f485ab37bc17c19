//! Matrix multiplication with half-precision weights (f16 or bf16, `--dtype float16|bfloat16`
//! on the CPU, or an F16/BF16 GGUF): `out = x · wᵀ` with f32 activations and f32
//! accumulation. A few activation rows (decode) go to a register-tiled kernel that widens each
//! weight vector once (F16C `vcvtph2ps`, or a 16-bit shift for bf16) and multiplies it into
//! every row, so each weight byte is read from memory once: half the bytes of f32 weights.
//! Many rows (prefill) widen a chunk of weight rows to f32 at a time (in parallel) and hand it
//! to the f32 GEMM, whose compute dominates there.

use rayon::prelude::*;

use super::kernels::dot_lanes;
use super::matmul::{MatmulScratch, SMALL_M, matmul_f32, scatter_transposed};
use crate::model::quant::BlockFormat;
use crate::model::weight_matrix::BlockMatrix;
use crate::model::weights::Matrix;

/// Weight rows per rayon task in the few-row kernel.
const ROWS_PER_TASK: usize = 32;
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
    if m <= SMALL_M {
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
    let fast = has_f16c_fma();
    tasks.into_par_iter().for_each(|(rows, dst)| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: AVX2, FMA and F16C were detected; the kernel reads `rows` (whole rows of
            // `k` halves) and `x` (`m` rows of `k`) within their lengths, asserted inside.
            unsafe { x86::rows_task(x, m, k, rows, bf16, dst) };
            return;
        }
        let _ = fast;
        portable_task(x, m, k, rows, w.format, dst);
    });
    scatter_transposed(res, m, n, out, accumulate);
}

fn has_f16c_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Widens each weight row and takes its dot product with every activation row.
fn portable_task(x: &[f32], m: usize, k: usize, rows: &[u8], format: BlockFormat, dst: &mut [f32]) {
    let mut wide = vec![0f32; k];
    for (wrow, d) in rows.chunks_exact(2 * k).zip(dst.chunks_exact_mut(m)) {
        format.dequantize_row(wrow, &mut wide);
        for (i, di) in d.iter_mut().enumerate() {
            *di = dot_lanes::<false>(&x[i * k..(i + 1) * k], &wide);
        }
    }
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
        let fast = has_f16c_fma();
        data.par_chunks_mut(k * 16)
            .enumerate()
            .for_each(|(c, block)| {
                for (i, row) in block.chunks_exact_mut(k).enumerate() {
                    let bytes = w.row_bytes(j0 + c * 16 + i);
                    #[cfg(target_arch = "x86_64")]
                    if fast {
                        // SAFETY: AVX2, FMA and F16C were detected; `bytes` holds `k` halves.
                        unsafe { x86::widen_row(&bytes, w.format == BlockFormat::Bf16, row) };
                        continue;
                    }
                    let _ = fast;
                    w.format.dequantize_row(&bytes, row);
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Activation rows and weight rows per register tile.
    const MR: usize = 2;
    const NR: usize = 4;

    /// 8 halves at `p` widened to f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn widen<const BF16: bool>(p: *const u8) -> __m256 {
        // SAFETY: the caller passes 16 readable bytes.
        unsafe {
            let h = _mm_loadu_si128(p.cast());
            if BF16 {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                _mm256_cvtph_ps(h)
            }
        }
    }

    /// One row of halves (`bytes`, `out.len()` of them) widened into `out`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_row(bytes: &[u8], bf16: bool, out: &mut [f32]) {
        assert!(bytes.len() >= 2 * out.len());
        let full = out.len() / 8 * 8;
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 8 <= out.len()`, so 16 bytes at `2c` and 8 floats at `c` exist.
            unsafe {
                let v = if bf16 {
                    widen::<true>(bytes.as_ptr().add(2 * c))
                } else {
                    widen::<false>(bytes.as_ptr().add(2 * c))
                };
                _mm256_storeu_ps(out.as_mut_ptr().add(c), v);
            }
            c += 8;
        }
        for (i, o) in out.iter_mut().enumerate().skip(full) {
            let bits = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
            *o = if bf16 {
                half::bf16::from_bits(bits).to_f32()
            } else {
                half::f16::from_bits(bits).to_f32()
            };
        }
    }

    /// `dst[j * m + i] = x_i · w_j` for the weight rows in `rows` (`k` halves each).
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_task(
        x: &[f32],
        m: usize,
        k: usize,
        rows: &[u8],
        bf16: bool,
        dst: &mut [f32],
    ) {
        // SAFETY: same features.
        unsafe {
            if bf16 {
                task::<true>(x, m, k, rows, dst)
            } else {
                task::<false>(x, m, k, rows, dst)
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn task<const BF16: bool>(x: &[f32], m: usize, k: usize, rows: &[u8], dst: &mut [f32]) {
        let nw = rows.len() / (2 * k);
        assert!(x.len() >= m * k && dst.len() >= nw * m);
        let mut res = [[0f32; NR]; MR];
        let mut j = 0;
        while j < nw {
            let nr = if nw - j >= NR { NR } else { 1 };
            let mut i = 0;
            while i < m {
                let mr = if m - i >= MR { MR } else { 1 };
                let w = &rows[2 * j * k..2 * (j + nr) * k];
                let xs = &x[i * k..(i + mr) * k];
                // SAFETY: `w` holds `nr` rows of `k` halves, `xs` `mr` rows of `k` floats.
                unsafe {
                    match (mr, nr) {
                        (MR, NR) => tile::<BF16, MR, NR>(xs, w, k, &mut res),
                        (MR, _) => tile::<BF16, MR, 1>(xs, w, k, &mut res),
                        (_, NR) => tile::<BF16, 1, NR>(xs, w, k, &mut res),
                        _ => tile::<BF16, 1, 1>(xs, w, k, &mut res),
                    }
                }
                for (a, res_a) in res.iter().enumerate().take(mr) {
                    for (b, v) in res_a.iter().enumerate().take(nr) {
                        dst[(j + b) * m + i + a] = *v;
                    }
                }
                i += mr;
            }
            j += nr;
        }
    }

    /// `res[a][b] = xs_a · ws_b` for `R` activation rows and `C` weight rows.
    ///
    /// # Safety
    /// `xs.len() >= R * k`, `ws.len() >= 2 * C * k`; the features are enabled.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<const BF16: bool, const R: usize, const C: usize>(
        xs: &[f32],
        ws: &[u8],
        k: usize,
        res: &mut [[f32; NR]; MR],
    ) {
        assert!(xs.len() >= R * k && ws.len() >= 2 * C * k);
        let (xp, wp) = (xs.as_ptr(), ws.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = k / 8 * 8;
        let mut c = 0;
        while c < full {
            // SAFETY: `c + 8 <= k`: every load is inside the asserted lengths.
            unsafe {
                let mut wv = [_mm256_setzero_ps(); C];
                for (b, v) in wv.iter_mut().enumerate() {
                    *v = widen::<BF16>(wp.add(2 * (b * k + c)));
                }
                for (a, acc_a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(xp.add(a * k + c));
                    for (acc_ab, v) in acc_a.iter_mut().zip(&wv) {
                        *acc_ab = _mm256_fmadd_ps(xv, *v, *acc_ab);
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
                let mut s = lanes.iter().sum::<f32>();
                for kk in full..k {
                    let at = 2 * (b * k + kk);
                    let bits = u16::from_le_bytes([ws[at], ws[at + 1]]);
                    let wv = if BF16 {
                        half::bf16::from_bits(bits).to_f32()
                    } else {
                        half::f16::from_bits(bits).to_f32()
                    };
                    s += xs[a * k + kk] * wv;
                }
                res[a][b] = s;
            }
        }
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
            for m in [1, 3, 5, 16, 17, 40] {
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
