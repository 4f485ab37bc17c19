//! Matrix multiplication with weights in a block format (`out = x · wᵀ`, `w` a
//! [`BlockMatrix`]). For llama.cpp's Q8_0, Q5_0, Q4_0 and Q4_1, Q4_K's super-blocks (each
//! sub-block of 32 multiplied as a Q4_1 block with scale d·sc and minimum −dmin·m, both exact in
//! f32) and Q6_K's values in 32-element blocks, the activations are quantized per block
//! of 32 to int8 with an f16 scale, as llama.cpp does (`quantize_row_q8_0`/`q8_1`), and the
//! weights are read in the 8-row interleaved layout they were packed into at load
//! ([`pack_rows`](crate::model::quant::pack_rows)): each 32-bit lane of a weight vector holds
//! four weights of one row, so one integer dot-product instruction against four broadcast
//! activation bytes advances 8 output columns, and each block's 8 scales convert with one
//! instruction. The dot products use AVX-512 VNNI (`vpdpbusd`, unsigned × signed bytes) where
//! the CPU has it, AVX2 (`vpmaddubsw` + `vpmaddwd`) otherwise, and plain Rust elsewhere (aarch64
//! builds too). Weights are unsigned codes: Q4 nibbles 0..15, Q5_0 codes 0..31 and Q6_K codes
//! 0..63 (a nibble and the fifth and sixth bits, put in place with one shift and mask per code
//! vector), Q8_0 bytes offset by 128 (VNNI); the offset (8, 16, 32 or 128) times the activation
//! block's sum seeds the integer accumulator, and Q4_1's (Q4_K's) minimum times that sum is
//! added in f32.
//! Q6_K's two 16-element halves have their own int8 scales, so each half keeps its own
//! accumulator and seed and is scaled on its own. Rows past the last whole group of 8 go
//! through a scalar row kernel. Half-precision weights (f16, bf16) go to `half_matmul`. Work is
//! split over groups of output columns
//! with rayon; within a task, tiles of up to 4 activation rows share each decoded weight block.

use rayon::prelude::*;

use super::matmul::{MatmulScratch, scatter_transposed};
use crate::model::quant::{
    BlockFormat, PACK_ROWS, Q4_K_PACKED_SUPER_HEADER, Q4_K_SUB_BYTES, QK, QK_K, half_at,
    q4_k_sub_scales, q5_0_codes, q6_k_codes, unpack_block,
};
use crate::model::weight_matrix::BlockMatrix;

/// 8-row groups per rayon task.
const GROUPS_PER_TASK: usize = 2;
/// Activation rows per task: a block of rows whose int8 values stay in L1/L2 while every
/// weight group of the task passes over them.
const ROWS_PER_TASK: usize = 64;
/// Activation rows per tile (of the x86 kernels).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const MR: usize = 4;
/// Activation rows quantized per rayon task.
const QUANTIZE_ROWS_PER_TASK: usize = 8;

/// Activations quantized per block of 32: int8 values, f16-rounded scales, per block the
/// integer seed of the accumulator (`−offset·Σq`; for Q6_K one per 16-element half, else the
/// second is 0) and `d·Σq` (for Q4_1).
#[derive(Debug, Default)]
pub struct QuantizedActs {
    qs: Vec<i8>,
    d: Vec<f32>,
    seed: Vec<[i32; 2]>,
    sum: Vec<f32>,
    m: usize,
    k: usize,
}

/// Some rows' quantized values, scales, sums and seeds (zipped mutable chunks).
type ActRows<'a> = (
    ((&'a mut [i8], &'a mut [f32]), &'a mut [f32]),
    &'a mut [[i32; 2]],
);

impl QuantizedActs {
    /// Quantizes the `m` rows of `x` (`k` wide, a multiple of 32) for weights in `format`.
    fn quantize(&mut self, x: &[f32], m: usize, k: usize, format: BlockFormat) {
        let nb = k / QK;
        let offset = match format {
            BlockFormat::Q8_0 => 128,
            BlockFormat::Q4_0 => 8,
            BlockFormat::Q5_0 => 16,
            BlockFormat::Q6_K => 32,
            _ => 0,
        };
        let halves = format == BlockFormat::Q6_K;
        self.m = m;
        self.k = k;
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.sum.resize(m * nb, 0.0);
        self.seed.resize(m * nb, [0; 2]);
        // Rows in parallel, a few at a time (prefill quantizes megabytes per matmul); a decode
        // step's few rows stay on this thread.
        let rows = QUANTIZE_ROWS_PER_TASK;
        let work = |(((qs, d), sum), seed): ActRows<'_>, x: &[f32]| {
            for (b, blk) in x.chunks_exact(QK).enumerate() {
                let (block_d, block_sum, [lo, hi]) =
                    quantize_block(blk, &mut qs[b * QK..(b + 1) * QK]);
                d[b] = block_d;
                sum[b] = block_sum;
                seed[b] = if halves {
                    [-offset * lo, -offset * hi]
                } else {
                    [-offset * (lo + hi), 0]
                };
            }
        };
        if m <= rows {
            work(
                (
                    ((&mut self.qs[..], &mut self.d[..]), &mut self.sum[..]),
                    &mut self.seed[..],
                ),
                &x[..m * k],
            );
        } else {
            self.qs
                .par_chunks_mut(rows * k)
                .zip(self.d.par_chunks_mut(rows * nb))
                .zip(self.sum.par_chunks_mut(rows * nb))
                .zip(self.seed.par_chunks_mut(rows * nb))
                .zip(x[..m * k].par_chunks(rows * k))
                .for_each(|(dst, x)| work(dst, x));
        }
    }
}

/// One block of 32 activations quantized into `q` like llama.cpp's `quantize_row_q8_0`/`q8_1`:
/// returns the f16-rounded scale, the f16-rounded `d·Σq` and `Σq` over each 16-element half.
fn quantize_block(blk: &[f32], q: &mut [i8]) -> (f32, f32, [i32; 2]) {
    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut halves = [0i32; 2];
    for (j, (q, v)) in q.iter_mut().zip(blk).enumerate() {
        // Round half away from zero, as roundf, without the libm call.
        let r = v * id;
        *q = (r + 0.5f32.copysign(r)) as i8;
        halves[j / (QK / 2)] += i32::from(*q);
    }
    let total = halves[0] + halves[1];
    (
        half::f16::from_f32(d).to_f32(),
        half::f16::from_f32(d * total as f32).to_f32(),
        halves,
    )
}

/// `out = x · wᵀ` (or `+=` with `accumulate`), `x` `[m, w.cols]`, `out` `[m, w.rows]`.
pub fn matmul_blocks(
    x: &[f32],
    m: usize,
    w: &BlockMatrix,
    out: &mut [f32],
    accumulate: bool,
    scratch: &mut MatmulScratch,
) {
    let (n, k) = (w.rows, w.cols);
    assert!(
        x.len() >= m * k && out.len() >= m * n,
        "matmul operand sizes"
    );
    if m == 0 || n == 0 {
        return;
    }
    if !w.format.is_quantized() {
        return super::half_matmul::matmul_half(x, m, w, out, accumulate, scratch);
    }
    let acts = &mut scratch.acts;
    acts.quantize(x, m, k, w.format);
    let res = &mut scratch.cols;
    res.clear();
    res.resize(n * m, 0.0);
    multiply_parts(Isa::detect(), w, acts, res, true);
    scatter_blocks(res, m, n, out, accumulate);
}

/// `res` holds, for each block of [`ROWS_PER_TASK`] activation rows, an `[n, rows]` matrix;
/// writes (or adds) their transposes into `out` `[m, n]`.
fn scatter_blocks(res: &[f32], m: usize, n: usize, out: &mut [f32], accumulate: bool) {
    let mut i0 = 0;
    while i0 < m {
        let mb = ROWS_PER_TASK.min(m - i0);
        scatter_transposed(
            &res[i0 * n..(i0 + mb) * n],
            mb,
            n,
            &mut out[i0 * n..(i0 + mb) * n],
            accumulate,
        );
        i0 += mb;
    }
}

/// Activation rows `start..start + len`.
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    start: usize,
    len: usize,
}

/// For each block of [`ROWS_PER_TASK`] activation rows, `res` gets `[n, rows]` with
/// `x_i · w_j` at `j * rows + i`: one parallel loop over tasks of (row block, a few packed
/// groups) and each part's row-major tail.
fn multiply_parts(
    isa: Isa,
    w: &BlockMatrix,
    acts: &QuantizedActs,
    res: &mut [f32],
    parallel: bool,
) {
    let m = acts.m;
    let row_bytes = w.format.row_bytes(w.cols);
    let group_bytes = PACK_ROWS * row_bytes;
    // (rows, weight bytes, is a packed run, destination)
    let mut tasks: Vec<(RowSpan, &[u8], bool, &mut [f32])> = Vec::new();
    let mut rest = res;
    let mut i0 = 0;
    while i0 < m {
        let span = RowSpan {
            start: i0,
            len: ROWS_PER_TASK.min(m - i0),
        };
        for part in &w.parts {
            let bytes = part.bytes.as_slice();
            let groups = part.rows / PACK_ROWS;
            let mut g = 0;
            while g < groups {
                let ng = GROUPS_PER_TASK.min(groups - g);
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(ng * PACK_ROWS * span.len);
                tasks.push((
                    span,
                    &bytes[g * group_bytes..(g + ng) * group_bytes],
                    true,
                    dst,
                ));
                rest = tail;
                g += ng;
            }
            let tail_rows = part.rows - groups * PACK_ROWS;
            if tail_rows > 0 {
                let (dst, tail) = std::mem::take(&mut rest).split_at_mut(tail_rows * span.len);
                tasks.push((span, &bytes[groups * group_bytes..], false, dst));
                rest = tail;
            }
        }
        i0 += span.len;
    }
    let run = |(span, bytes, packed, dst): (RowSpan, &[u8], bool, &mut [f32])| {
        if packed {
            group_task(isa, w.format, acts, span, bytes, dst);
        } else {
            rows_portable(w.format, acts, span, bytes, row_bytes, dst);
        }
    };
    if parallel {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// The instruction set the int8 kernels run with, detected once per call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            if avx2 && has!("avx512vnni") && has!("avx512vl") && has!("avx512f") {
                return Isa::Avx512Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run (tests compare them all).
    pub fn available() -> Vec<Isa> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            let best = Isa::detect();
            if best != Isa::Portable {
                all.push(Isa::Avx2);
            }
            if best == Isa::Avx512Vnni {
                all.push(Isa::Avx512Vnni);
            }
        }
        all
    }
}

/// `dst[(g * 8 + l) * m + i] = x_i · w_{g, l}` for the packed groups in `groups`.
fn group_task(
    isa: Isa,
    format: BlockFormat,
    acts: &QuantizedActs,
    rows: RowSpan,
    groups: &[u8],
    dst: &mut [f32],
) {
    match isa {
        Isa::Portable => groups_portable(format, acts, rows, groups, dst),
        // SAFETY: `Isa::detect` checked the features each kernel is compiled with; the kernels
        // assert that `groups`, `acts` and `dst` hold what their shapes imply.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::groups_avx2(format, acts, rows, groups, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { x86::groups_vnni(format, acts, rows, groups, dst) },
    }
}

/// Test entry point: the product with a given instruction set, single-threaded.
#[cfg(test)]
pub(crate) fn matmul_blocks_with(isa: Isa, x: &[f32], m: usize, w: &BlockMatrix) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let mut acts = QuantizedActs::default();
    acts.quantize(x, m, k, w.format);
    let mut res = vec![0f32; n * m];
    multiply_parts(isa, w, &acts, &mut res, false);
    let mut out = vec![0f32; m * n];
    scatter_blocks(&res, m, n, &mut out, false);
    out
}

/// One row-major block's scales: of its first and second 16-element halves (equal but in
/// Q6_K) and Q4_1's minimum.
#[derive(Debug, Clone, Copy)]
struct BlockScales {
    halves: [f32; 2],
    min: f32,
}

/// The weight codes (unsigned: Q8_0 offset by 128) and scales of the 32-element block `b` of
/// a row-major row (for Q4_K, sub-block `b % 8` of super-block `b / 8`).
fn block_codes(format: BlockFormat, row: &[u8], b: usize, codes: &mut [u8; QK]) -> BlockScales {
    if format == BlockFormat::Q4_K {
        let sup = &row[b / 8 * format.block_bytes()..][..format.block_bytes()];
        let (scale, min) = q4_k_sub_scales(sup, b % 8);
        let qs = &sup[4 + (b % 8) * Q4_K_SUB_BYTES + 2..][..QK / 2];
        for (j, &q) in qs.iter().enumerate() {
            codes[j] = q & 0xF;
            codes[j + QK / 2] = q >> 4;
        }
        return BlockScales {
            halves: [scale, scale],
            min: -min,
        };
    }
    let bb = format.block_bytes();
    let blk = &row[b * bb..(b + 1) * bb];
    let dw = half_at(blk, 0);
    let (dw, mw) = match format {
        BlockFormat::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(&blk[2..]) {
                *c = q ^ 0x80;
            }
            (dw, 0.0)
        }
        BlockFormat::Q5_0 => {
            *codes = q5_0_codes(blk);
            (dw, 0.0)
        }
        BlockFormat::Q6_K => {
            *codes = q6_k_codes(blk);
            return BlockScales {
                halves: [0, 1].map(|h| dw * f32::from(blk[2 + h] as i8)),
                min: 0.0,
            };
        }
        _ => {
            let (mw, qs) = if format == BlockFormat::Q4_1 {
                (half_at(blk, 2), &blk[4..])
            } else {
                (0.0, &blk[2..])
            };
            for (j, &q) in qs.iter().enumerate() {
                codes[j] = q & 0xF;
                codes[j + QK / 2] = q >> 4;
            }
            (dw, mw)
        }
    };
    BlockScales {
        halves: [dw, dw],
        min: mw,
    }
}

/// `Σ codes·x` seeded, scaled, plus Q4_1's minimum term: one block pair in scalar code (per
/// 16-element half where the halves' scales differ, as Q6_K's do).
#[inline]
fn block_dot(acts: &QuantizedActs, ab: usize, codes: &[u8; QK], s: BlockScales) -> f32 {
    let xq = &acts.qs[ab * QK..(ab + 1) * QK];
    let half_dot = |h: usize| {
        let span = h * QK / 2..(h + 1) * QK / 2;
        codes[span.clone()]
            .iter()
            .zip(&xq[span])
            .map(|(c, q)| i32::from(*c) * i32::from(*q))
            .sum::<i32>()
    };
    let [seed_lo, seed_hi] = acts.seed[ab];
    if s.halves[0] == s.halves[1] {
        let dot = seed_lo + seed_hi + half_dot(0) + half_dot(1);
        dot as f32 * (s.halves[0] * acts.d[ab]) + s.min * acts.sum[ab]
    } else {
        (seed_lo + half_dot(0)) as f32 * (s.halves[0] * acts.d[ab])
            + (seed_hi + half_dot(1)) as f32 * (s.halves[1] * acts.d[ab])
    }
}

/// Scalar kernel over row-major rows (the rows past the last whole group).
fn rows_portable(
    format: BlockFormat,
    acts: &QuantizedActs,
    span: RowSpan,
    rows: &[u8],
    row_bytes: usize,
    dst: &mut [f32],
) {
    for (wrow, d) in rows
        .chunks_exact(row_bytes)
        .zip(dst.chunks_exact_mut(span.len))
    {
        row_portable(format, acts, span, wrow, d);
    }
}

/// `d[i] = x_{span.start + i} · w` for one row-major weight row `w`.
fn row_portable(format: BlockFormat, acts: &QuantizedActs, span: RowSpan, w: &[u8], d: &mut [f32]) {
    let nb = acts.k / QK;
    let mut codes = [0u8; QK];
    d.fill(0.0);
    for b in 0..nb {
        let scales = block_codes(format, w, b, &mut codes);
        for (i, di) in d.iter_mut().enumerate() {
            *di += block_dot(acts, (span.start + i) * nb + b, &codes, scales);
        }
    }
}

/// Scalar kernel over packed groups: each row of the group is gathered back into row-major
/// blocks, then multiplied as in [`rows_portable`].
fn groups_portable(
    format: BlockFormat,
    acts: &QuantizedActs,
    span: RowSpan,
    groups: &[u8],
    dst: &mut [f32],
) {
    let (m, bb) = (span.len, format.block_bytes());
    let units = acts.k / format.block_len();
    let gbb = PACK_ROWS * bb;
    let mut row = vec![0u8; units * bb];
    for (g, gdst) in dst.chunks_exact_mut(PACK_ROWS * m).enumerate() {
        for (l, d) in gdst.chunks_exact_mut(m).enumerate() {
            for (u, blk) in row.chunks_exact_mut(bb).enumerate() {
                let gb = &groups[(g * units + u) * gbb..][..gbb];
                unpack_block(format, gb, l, blk);
            }
            row_portable(format, acts, span, &row, d);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
