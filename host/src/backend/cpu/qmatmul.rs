//! Matrix multiplication with weights in a block format (`out = x · wᵀ`, `w` a
//! [`BlockMatrix`]). For llama.cpp's Q8_0, Q5_0, Q4_0 and Q4_1, and Q6_K's values in 32-element
//! blocks, the activations are quantized per block
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
//! block's sum seeds the integer accumulator, and Q4_1's minimum times that sum is added in f32.
//! Q6_K's two 16-element halves have their own int8 scales, so each half keeps its own
//! accumulator and seed and is scaled on its own. Rows past the last whole group of 8 go
//! through a scalar row kernel. Half-precision weights (f16, bf16) go to `half_matmul`. Work is
//! split over groups of output columns
//! with rayon; within a task, tiles of up to 4 activation rows share each decoded weight block.

use rayon::prelude::*;

use super::matmul::{MatmulScratch, scatter_transposed};
use crate::model::quant::{
    BlockFormat, PACK_ROWS, QK, half_at, q5_0_codes, q6_k_codes, unpack_block,
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

/// The weight codes (unsigned: Q8_0 offset by 128) and scales of one row-major block.
fn block_codes(format: BlockFormat, blk: &[u8], codes: &mut [u8; QK]) -> BlockScales {
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
    let (m, nb, bb) = (span.len, acts.k / QK, format.block_bytes());
    let mut codes = [0u8; QK];
    for (wrow, d) in rows.chunks_exact(row_bytes).zip(dst.chunks_exact_mut(m)) {
        d.fill(0.0);
        for b in 0..nb {
            let scales = block_codes(format, &wrow[b * bb..(b + 1) * bb], &mut codes);
            for (i, di) in d.iter_mut().enumerate() {
                *di += block_dot(acts, (span.start + i) * nb + b, &codes, scales);
            }
        }
    }
}

/// Scalar kernel over packed groups: each row of the group is gathered back into a row-major
/// block, then multiplied as in [`rows_portable`].
fn groups_portable(
    format: BlockFormat,
    acts: &QuantizedActs,
    span: RowSpan,
    groups: &[u8],
    dst: &mut [f32],
) {
    let (m, nb, bb) = (span.len, acts.k / QK, format.block_bytes());
    let gbb = PACK_ROWS * bb;
    let mut blk = vec![0u8; bb];
    let mut codes = [0u8; QK];
    for (g, gdst) in dst.chunks_exact_mut(PACK_ROWS * m).enumerate() {
        gdst.fill(0.0);
        for b in 0..nb {
            let gb = &groups[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
            for l in 0..PACK_ROWS {
                unpack_block(format, gb, l, &mut blk);
                let scales = block_codes(format, &blk, &mut codes);
                for i in 0..m {
                    gdst[l * m + i] += block_dot(acts, (span.start + i) * nb + b, &codes, scales);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;

    /// Formats as const-generic codes, so each kernel is compiled per format without branches.
    const Q8_0: u8 = 0;
    const Q4_0: u8 = 1;
    const Q4_1: u8 = 2;
    const Q5_0: u8 = 3;
    const Q6_K: u8 = 4;

    const fn block_bytes(f: u8) -> usize {
        match f {
            Q8_0 => 34,
            Q4_0 => 18,
            Q5_0 => 22,
            Q6_K => 28,
            _ => 20,
        }
    }

    /// Integer accumulator chains per activation row in a tile.
    const CHAINS: usize = 2;

    const fn header_bytes(f: u8) -> usize {
        match f {
            Q4_1 => 32,
            Q5_0 => 48,
            Q6_K => 96,
            _ => 16,
        }
    }

    macro_rules! group_kernel {
        ($groups:ident, $groups_f:ident, $tile:ident, $features:literal, $codes:ident, $dot:ident, $q8_seeded:literal) => {
            /// Multiplies the packed groups by every activation row into `dst`.
            ///
            /// # Safety
            /// The CPU must have the enabled features.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $groups(
                format: BlockFormat,
                acts: &QuantizedActs,
                span: RowSpan,
                groups: &[u8],
                dst: &mut [f32],
            ) {
                // SAFETY: same features; the format code matches `format`.
                unsafe {
                    match format {
                        BlockFormat::Q8_0 => $groups_f::<Q8_0>(acts, span, groups, dst),
                        BlockFormat::Q4_0 => $groups_f::<Q4_0>(acts, span, groups, dst),
                        BlockFormat::Q4_1 => $groups_f::<Q4_1>(acts, span, groups, dst),
                        BlockFormat::Q5_0 => $groups_f::<Q5_0>(acts, span, groups, dst),
                        BlockFormat::Q6_K => $groups_f::<Q6_K>(acts, span, groups, dst),
                        _ => unreachable!("half formats take the f32 path"),
                    }
                }
            }

            /// The groups kernel for one format.
            ///
            /// # Safety
            /// As the dispatching function.
            #[target_feature(enable = $features)]
            unsafe fn $groups_f<const F: u8>(
                acts: &QuantizedActs,
                span: RowSpan,
                groups: &[u8],
                dst: &mut [f32],
            ) {
                let (m, nb) = (span.len, acts.k / QK);
                let group_bytes = nb * PACK_ROWS * block_bytes(F);
                let ng = groups.len() / group_bytes;
                assert!(groups.len() == ng * group_bytes && dst.len() >= ng * PACK_ROWS * m);
                let end = span.start + m;
                assert!(acts.qs.len() >= end * acts.k && acts.d.len() >= end * nb);
                assert!(acts.seed.len() >= end * nb && acts.sum.len() >= end * nb);
                let mut res = [[0f32; PACK_ROWS]; MR];
                for g in 0..ng {
                    let gp = groups[g * group_bytes..].as_ptr();
                    let mut i = 0;
                    while i < m {
                        let mr = if m - i >= MR { MR } else { 1 };
                        // SAFETY: the group holds `nb` packed blocks; rows i..i + mr exist.
                        unsafe {
                            if mr == MR {
                                $tile::<F, MR>(acts, span.start + i, gp, &mut res);
                            } else {
                                $tile::<F, 1>(acts, span.start + i, gp, &mut res);
                            }
                        }
                        for (a, res_a) in res.iter().enumerate().take(mr) {
                            for (l, v) in res_a.iter().enumerate() {
                                dst[(g * PACK_ROWS + l) * m + i + a] = *v;
                            }
                        }
                        i += mr;
                    }
                }
            }

            /// One tile: `res[a][l] = x_{i0 + a} · w_l` for `R` activation rows and the 8 rows
            /// of the group at `gp`.
            ///
            /// # Safety
            /// `gp` points at a whole packed group of format `F` for `acts.k` columns, and
            /// rows `i0..i0 + R` exist in `acts` (the caller asserted the lengths).
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $tile<const F: u8, const R: usize>(
                acts: &QuantizedActs,
                i0: usize,
                gp: *const u8,
                res: &mut [[f32; PACK_ROWS]; MR],
            ) {
                let nb = acts.k / QK;
                let gbb = PACK_ROWS * block_bytes(F);
                let xp = acts.qs.as_ptr();
                let mut acc = [_mm256_setzero_ps(); R];
                let low = _mm256_set1_epi8(0x0F);
                for b in 0..nb {
                    // SAFETY: see the function's contract.
                    unsafe {
                        let blk = gp.add(b * gbb);
                        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                        let mw = if F == Q4_1 {
                            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast()))
                        } else {
                            _mm256_setzero_ps()
                        };
                        // Q6_K: the 8 rows' scales of each 16-element half, d·sc (exact in f32).
                        let half_scales = if F == Q6_K {
                            let sc = |at: usize| {
                                let bytes = _mm_loadl_epi64(blk.add(at).cast());
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))
                            };
                            [_mm256_mul_ps(dw, sc(16)), _mm256_mul_ps(dw, sc(24))]
                        } else {
                            [dw, dw]
                        };
                        let qs = blk.add(header_bytes(F));
                        // codes[u]: 4 weights of each of the 8 rows, at columns 4u..4u + 4.
                        let mut codes = [_mm256_setzero_si256(); 8];
                        if F == Q8_0 {
                            for (t, c) in codes.iter_mut().enumerate() {
                                *c = $codes(_mm256_loadu_si256(qs.add(32 * t).cast()));
                            }
                        } else {
                            for t in 0..4 {
                                let raw = _mm256_loadu_si256(qs.add(32 * t).cast());
                                codes[t] = _mm256_and_si256(raw, low);
                                codes[t + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                            }
                            if F == Q5_0 {
                                or_high_bit::<4>(
                                    &mut codes,
                                    _mm256_loadu_si256(blk.add(16).cast()),
                                );
                            }
                            if F == Q6_K {
                                or_high_bit::<4>(
                                    &mut codes,
                                    _mm256_loadu_si256(blk.add(32).cast()),
                                );
                                or_high_bit::<5>(
                                    &mut codes,
                                    _mm256_loadu_si256(blk.add(64).cast()),
                                );
                            }
                        }
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let ab = (i0 + r) * nb + b;
                            let xb = xp.add(ab * QK).cast::<i32>();
                            let [seed_lo, seed_hi] = if F == Q4_1 || (F == Q8_0 && !$q8_seeded) {
                                [0, 0]
                            } else {
                                *acts.seed.as_ptr().add(ab)
                            };
                            // Independent chains hide the dot product's latency; Q6_K's halves
                            // (code vectors 0..4 and 4..8) get CHAINS each.
                            let mut chains = [_mm256_setzero_si256(); 2 * CHAINS];
                            chains[0] = _mm256_set1_epi32(seed_lo);
                            chains[CHAINS] = _mm256_set1_epi32(seed_hi);
                            for (u, c) in codes.iter().enumerate() {
                                let xv = _mm256_set1_epi32(xb.add(u).read_unaligned());
                                let ch = if F == Q6_K { (u / 4) * CHAINS } else { 0 } + u % CHAINS;
                                chains[ch] = $dot::<F>(chains[ch], *c, xv);
                            }
                            let halves = if F == Q6_K { 2 } else { 1 };
                            let dx = _mm256_broadcast_ss(&*acts.d.as_ptr().add(ab));
                            for (h, half) in chains.chunks_exact(CHAINS).take(halves).enumerate() {
                                let mut p = half[0];
                                for ch in &half[1..] {
                                    p = _mm256_add_epi32(p, *ch);
                                }
                                *acc_r = _mm256_fmadd_ps(
                                    _mm256_cvtepi32_ps(p),
                                    _mm256_mul_ps(half_scales[h], dx),
                                    *acc_r,
                                );
                            }
                            if F == Q4_1 {
                                let s = _mm256_broadcast_ss(&*acts.sum.as_ptr().add(ab));
                                *acc_r = _mm256_fmadd_ps(mw, s, *acc_r);
                            }
                        }
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    // SAFETY: `res[r]` holds 8 floats.
                    unsafe { _mm256_storeu_ps(res[r].as_mut_ptr(), *acc_r) };
                }
            }
        };
    }

    /// ORs bit `BIT` of each code in: bit `t` of each byte of `h` belongs to code vector `t`'s
    /// byte there (see `quant::pack_rows`) and moves to bit `BIT`. Within a 16-bit lane the
    /// shifts (left by up to `BIT`, right by up to `7 − BIT`) bring no other byte's bit to `BIT`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn or_high_bit<const BIT: i32>(codes: &mut [__m256i; 8], h: __m256i) {
        let mask = _mm256_set1_epi8(1 << BIT);
        for (t, c) in (0i32..).zip(codes.iter_mut()) {
            let shift = BIT - t;
            let moved = if shift >= 0 {
                _mm256_sll_epi16(h, _mm_cvtsi32_si128(shift))
            } else {
                _mm256_srl_epi16(h, _mm_cvtsi32_si128(-shift))
            };
            *c = _mm256_or_si256(*c, _mm256_and_si256(moved, mask));
        }
    }

    /// For VNNI, Q8_0's signed weights become unsigned codes (w + 128).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn codes_vnni(w: __m256i) -> __m256i {
        _mm256_xor_si256(w, _mm256_set1_epi8(-128))
    }

    /// AVX2 keeps Q8_0's signed bytes (see [`dot_avx2`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn codes_avx2(w: __m256i) -> __m256i {
        w
    }

    /// `acc + Σ codes·x` per 32-bit lane with AVX-512 VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    #[inline]
    fn dot_vnni<const F: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(acc, w, x)
    }

    /// `acc + Σ w·x` per 32-bit lane with AVX2. Q8_0's signed weights go through `sign` so
    /// `maddubs` (unsigned × signed) never saturates; they carry no offset, so the AVX2 Q8_0
    /// tile starts from zero instead of the −128·Σx seed.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn dot_avx2<const F: u8>(acc: __m256i, w: __m256i, x: __m256i) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        if F == Q8_0 {
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones))
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones))
        }
    }

    group_kernel!(
        groups_avx2,
        groups_avx2_f,
        tile_avx2,
        "avx2,fma,f16c",
        codes_avx2,
        dot_avx2,
        false
    );
    group_kernel!(
        groups_vnni,
        groups_vnni_f,
        tile_vnni,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        codes_vnni,
        dot_vnni,
        true
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weight_matrix::BlockMatrix;
    use crate::model::weights::Matrix;
    use crate::splitmix::SplitMix64;

    /// Dequantize-then-multiply in f64: the reference every kernel is held to.
    fn reference(x: &[f32], m: usize, w: &BlockMatrix) -> Vec<f64> {
        let wf = w.dequantize();
        let mut out = vec![0f64; m * w.rows];
        for i in 0..m {
            for j in 0..w.rows {
                out[i * w.rows + j] = (0..w.cols)
                    .map(|c| f64::from(x[i * w.cols + c]) * f64::from(wf.data[j * w.cols + c]))
                    .sum();
            }
        }
        out
    }

    fn random(rng: &mut SplitMix64, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.uniform() * 2.0 - 1.0).collect()
    }

    /// The error int8 activations allow: each block's rounding is at most half a step
    /// (amax/254) per element, times the weights' magnitude, summed over the row.
    fn tolerance(x: &[f32], k: usize, wmax: f64) -> f64 {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
        (amax / 254.0) * wmax * k as f64 * 0.5 + 1e-3
    }

    #[test]
    fn every_quantized_format_and_isa_matches_dequantize_then_multiply() {
        let mut rng = SplitMix64::new(11);
        // Odd shapes: rows not a multiple of any tile, several parts, 1..=MR+1 activation rows.
        for format in [
            BlockFormat::Q8_0,
            BlockFormat::Q4_0,
            BlockFormat::Q4_1,
            BlockFormat::Q5_0,
            BlockFormat::Q6_K,
        ] {
            for (n, k) in [(1, 32), (7, 64), (37, 96), (70, 160)] {
                // Halves of 16 weights of three magnitudes, so that a kernel that mixes up
                // Q6_K's two scales per block fails.
                let uneven = |v: Vec<f32>| -> Vec<f32> {
                    let scale = [1.0, 0.2, 0.05];
                    v.into_iter()
                        .enumerate()
                        .map(|(i, x)| x * scale[(i / 16 + i / 48) % 3])
                        .collect()
                };
                let a = Matrix::new(n, k, uneven(random(&mut rng, n * k)));
                let b = Matrix::new(3, k, uneven(random(&mut rng, 3 * k)));
                let w = BlockMatrix::vstack(vec![
                    BlockMatrix::quantize(&a, format).unwrap(),
                    BlockMatrix::quantize(&b, format).unwrap(),
                ])
                .unwrap();
                let wmax = w.dequantize().data.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                for m in [1, 2, 3, 4, 5, 9, 17] {
                    let x = random(&mut rng, m * k);
                    let want = reference(&x, m, &w);
                    let tol = tolerance(&x, k, wmax);
                    let mut outputs = Vec::new();
                    for isa in Isa::available() {
                        let got = matmul_blocks_with(isa, &x, m, &w);
                        for (g, r) in got.iter().zip(&want) {
                            assert!(
                                (f64::from(*g) - r).abs() <= tol,
                                "{format:?} {isa:?} n={n} k={k} m={m}: {g} vs {r} (tol {tol})"
                            );
                        }
                        outputs.push((isa, got));
                    }
                    // The SIMD kernels compute the same integer sums as the portable one.
                    let (_, base) = &outputs[0];
                    for (isa, got) in &outputs[1..] {
                        for (g, b) in got.iter().zip(base) {
                            assert!(
                                (g - b).abs() <= 1e-4 * (1.0 + b.abs()),
                                "{isa:?} vs portable"
                            );
                        }
                    }
                    // And the threaded entry point agrees, also when accumulating.
                    let mut out = vec![1.0f32; m * w.rows];
                    let mut scratch = MatmulScratch::default();
                    matmul_blocks(&x, m, &w, &mut out, true, &mut scratch);
                    for (o, b) in out.iter().zip(base) {
                        assert!((o - 1.0 - b).abs() <= 1e-4 * (1.0 + b.abs()));
                    }
                }
            }
        }
    }
}
