//! Block formats of weights kept in llama.cpp's layouts (GGUF's Q8_0, Q5_0, Q4_0, Q4_1), Q4_K's
//! super-blocks with their 6-bit scales unpacked to bytes, Q6_K's values regrouped into
//! 32-element blocks, or half precision (f16, bf16): the byte layout of one block, scalar
//! reference dequantization
//! ([`BlockFormat::dequantize_row`]), and reference quantizers that follow llama.cpp's
//! `quantize_row_*_ref` (used to build test matrices and by nothing on the serving path). The
//! fast kernels that multiply these blocks live in the CPU backend (`backend::cpu::qmatmul`).

use half::{bf16, f16};

/// Elements per block of the 32-element llama.cpp formats.
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one [`BlockFormat::Q4_K`] sub-block: its scale, its minimum and 16 bytes of nibbles.
pub const Q4_K_SUB_BYTES: usize = 2 + QK / 2;

/// How a weight matrix's rows are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // llama.cpp's names
pub enum BlockFormat {
    /// `{ d: f16, qs: [i8; 32] }`: x = d·q.
    Q8_0,
    /// `{ d: f16, qs: [u8; 16] }`: element j is the low nibble of byte j, element j + 16 its
    /// high nibble; x = d·(q − 8).
    Q4_0,
    /// `{ d: f16, m: f16, qs: [u8; 16] }`: nibbles as Q4_0; x = d·q + m.
    Q4_1,
    /// `{ d: f16, qh: u32, qs: [u8; 16] }`: nibbles as Q4_0, bit j of `qh` (little-endian) the
    /// fifth bit of element j; x = d·(q − 16).
    Q5_0,
    /// Q6_K's values in 32-element blocks: `{ d: f16, sc: [i8; 2], qh: [u8; 8], qs: [u8; 16] }`,
    /// nibbles as Q4_0, bits 2j and 2j + 1 of `qh` (little-endian) the fifth and sixth bits of
    /// element j; x = d·sc[j / 16]·(q − 32). A Q6_K super-block (one f16 `d`, 16 int8 scales of
    /// 16 elements each, 6-bit quants) is 8 such blocks exactly (`kquant`): 6.56 → 7 bits per
    /// weight.
    Q6_K,
    /// Q4_K's super-blocks of 256 with the 6-bit scales and minima unpacked to bytes: `{ d: f16,
    /// dmin: f16, sub: [{ sc: u8, m: u8, qs: [u8; 16] }; 8] }`, each sub-block's nibbles as
    /// Q4_0; x = d·sc·q − dmin·m. GGUF's Q4_K (12 bytes of packed scales) maps onto it exactly
    /// (`kquant`): 4.5 → 4.625 bits per weight.
    Q4_K,
    /// IEEE half precision, one element per "block".
    F16,
    /// bfloat16, one element per "block".
    Bf16,
}

impl BlockFormat {
    /// Every quantized format (the int8 kernels' and the packed layout's).
    pub const QUANTIZED: [BlockFormat; 6] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q6_K,
        BlockFormat::Q4_K,
    ];

    /// Elements per block.
    pub const fn block_len(self) -> usize {
        match self {
            BlockFormat::Q8_0
            | BlockFormat::Q4_0
            | BlockFormat::Q4_1
            | BlockFormat::Q5_0
            | BlockFormat::Q6_K => QK,
            BlockFormat::Q4_K => QK_K,
            BlockFormat::F16 | BlockFormat::Bf16 => 1,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => 2 + QK,
            BlockFormat::Q4_0 => 2 + QK / 2,
            BlockFormat::Q4_1 => 4 + QK / 2,
            BlockFormat::Q5_0 => 6 + QK / 2,
            BlockFormat::Q6_K => 12 + QK / 2,
            BlockFormat::Q4_K => 4 + QK_K / QK * Q4_K_SUB_BYTES,
            BlockFormat::F16 | BlockFormat::Bf16 => 2,
        }
    }

    /// Whether rows are quantized to 8, 6, 5 or 4 bits (as opposed to half precision).
    pub const fn is_quantized(self) -> bool {
        !matches!(self, BlockFormat::F16 | BlockFormat::Bf16)
    }

    /// Bytes of one row of `cols` elements (`cols` must be a multiple of the block length).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }

    /// The name GGUF and llama.cpp use (for Q4_K and Q6_K, that of the values they hold).
    pub const fn name(self) -> &'static str {
        match self {
            BlockFormat::Q8_0 => "Q8_0",
            BlockFormat::Q4_0 => "Q4_0",
            BlockFormat::Q4_1 => "Q4_1",
            BlockFormat::Q5_0 => "Q5_0",
            BlockFormat::Q6_K => "Q6_K",
            BlockFormat::Q4_K => "Q4_K",
            BlockFormat::F16 => "F16",
            BlockFormat::Bf16 => "BF16",
        }
    }

    /// Dequantizes one row (`out.len()` elements, `bytes` = [`Self::row_bytes`]) to f32.
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), self.row_bytes(out.len()), "row byte length");
        match self {
            BlockFormat::F16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            BlockFormat::Bf16 => {
                for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([b[0], b[1]]).to_f32();
                }
            }
            BlockFormat::Q8_0 => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(34)) {
                    let d = half_at(b, 0);
                    for (x, &q) in o.iter_mut().zip(&b[2..]) {
                        *x = d * f32::from(q as i8);
                    }
                }
            }
            BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
                let bb = self.block_bytes();
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(bb)) {
                    let d = half_at(b, 0);
                    let (m, qs) = if self == BlockFormat::Q4_1 {
                        (half_at(b, 2), &b[4..])
                    } else {
                        (-8.0 * d, &b[2..])
                    };
                    for (j, &q) in qs.iter().enumerate() {
                        o[j] = d * f32::from(q & 0xF) + m;
                        o[j + QK / 2] = d * f32::from(q >> 4) + m;
                    }
                }
            }
            BlockFormat::Q5_0 => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(22)) {
                    let d = half_at(b, 0);
                    for (x, q) in o.iter_mut().zip(q5_0_codes(b)) {
                        *x = d * f32::from(q as i8 - 16);
                    }
                }
            }
            BlockFormat::Q6_K => {
                for (o, b) in out.chunks_exact_mut(QK).zip(bytes.chunks_exact(28)) {
                    let d = half_at(b, 0);
                    for (j, (x, q)) in o.iter_mut().zip(q6_k_codes(b)).enumerate() {
                        let scale = d * f32::from(b[2 + j / 16] as i8);
                        *x = scale * f32::from(q as i8 - 32);
                    }
                }
            }
            BlockFormat::Q4_K => {
                for (o, b) in out
                    .chunks_exact_mut(QK_K)
                    .zip(bytes.chunks_exact(self.block_bytes()))
                {
                    for (j, o) in o.chunks_exact_mut(QK).enumerate() {
                        let (scale, min) = q4_k_sub_scales(b, j);
                        let sub = &b[4 + j * Q4_K_SUB_BYTES + 2..][..QK / 2];
                        for (i, &q) in sub.iter().enumerate() {
                            o[i] = scale * f32::from(q & 0xF) - min;
                            o[i + QK / 2] = scale * f32::from(q >> 4) - min;
                        }
                    }
                }
            }
        }
    }

    /// Quantizes one row of f32 values (a multiple of the block length) into this format, the
    /// way llama.cpp's reference quantizers do.
    pub fn quantize_row(self, x: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.row_bytes(x.len()));
        match self {
            BlockFormat::F16 => x
                .iter()
                .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
            BlockFormat::Bf16 => x
                .iter()
                .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
            BlockFormat::Q8_0 => {
                for blk in x.chunks_exact(QK) {
                    let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(blk.iter().map(|v| (v * id).round() as i8 as u8));
                }
            }
            BlockFormat::Q4_0 => {
                for blk in x.chunks_exact(QK) {
                    let (d, id) = signed_max_scale(blk, 8.0);
                    out.extend(f16::from_f32(d).to_le_bytes());
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    for j in 0..QK / 2 {
                        out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                    }
                }
            }
            BlockFormat::Q4_1 => {
                for blk in x.chunks_exact(QK) {
                    let min = blk.iter().copied().fold(f32::INFINITY, f32::min);
                    let max = blk.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(f16::from_f32(min).to_le_bytes());
                    let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                    for j in 0..QK / 2 {
                        out.push(q(blk[j]) | (q(blk[j + QK / 2]) << 4));
                    }
                }
            }
            BlockFormat::Q5_0 => {
                for blk in x.chunks_exact(QK) {
                    let (d, id) = signed_max_scale(blk, 16.0);
                    out.extend(f16::from_f32(d).to_le_bytes());
                    let q: Vec<u8> = blk
                        .iter()
                        .map(|&v| ((v * id + 16.5) as i32).clamp(0, 31) as u8)
                        .collect();
                    let qh = q
                        .iter()
                        .enumerate()
                        .fold(0u32, |h, (j, &q)| h | (u32::from(q >> 4) << j));
                    out.extend(qh.to_le_bytes());
                    for j in 0..QK / 2 {
                        out.push((q[j] & 0xF) | ((q[j + QK / 2] & 0xF) << 4));
                    }
                }
            }
            BlockFormat::Q6_K => x
                .chunks_exact(QK)
                .for_each(|blk| quantize_q6_k(blk, &mut out)),
            BlockFormat::Q4_K => x
                .chunks_exact(QK_K)
                .for_each(|blk| quantize_q4_k(blk, &mut out)),
        }
        out
    }
}

/// Sub-block `j`'s scale `d·sc` and minimum `dmin·m` (both exact in f32) in one
/// [`BlockFormat::Q4_K`] super-block `b`.
#[inline]
pub fn q4_k_sub_scales(b: &[u8], j: usize) -> (f32, f32) {
    let sub = 4 + j * Q4_K_SUB_BYTES;
    (
        half_at(b, 0) * f32::from(b[sub]),
        half_at(b, 2) * f32::from(b[sub + 1]),
    )
}

/// One super-block of 256 values as [`BlockFormat::Q4_K`] (a simple reference, not llama.cpp's
/// iterative `make_qkx2_quants`): each sub-block's minimum (never above 0, as llama.cpp has it)
/// is covered by `dmin·m` with `m` rounded up, its range above that by `15·d·sc` with `sc`
/// rounded up, so no value clamps beyond f16 rounding; `q = round((x + dmin·m) / (d·sc))`.
fn quantize_q4_k(blk: &[f32], out: &mut Vec<u8>) {
    let subs: Vec<&[f32]> = blk.chunks_exact(QK).collect();
    let lows: Vec<f32> = subs
        .iter()
        .map(|s| -s.iter().copied().fold(0f32, f32::min))
        .collect();
    let dmin = f16::from_f32(lows.iter().copied().fold(0f32, f32::max) / 63.0);
    let code = |v: f32, step: f32| {
        if step == 0.0 {
            0
        } else {
            (v / step).ceil().min(63.0) as u8
        }
    };
    let m: Vec<u8> = lows.iter().map(|&l| code(l, dmin.to_f32())).collect();
    let ranges: Vec<f32> = subs
        .iter()
        .zip(&m)
        .map(|(s, &m)| {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (max + dmin.to_f32() * f32::from(m)).max(0.0)
        })
        .collect();
    let d = f16::from_f32(ranges.iter().copied().fold(0f32, f32::max) / (15.0 * 63.0));
    out.extend(d.to_le_bytes());
    out.extend(dmin.to_le_bytes());
    for ((s, &m), &range) in subs.iter().zip(&m).zip(&ranges) {
        let sc = code(range / 15.0, d.to_f32());
        let (step, offset) = (d.to_f32() * f32::from(sc), dmin.to_f32() * f32::from(m));
        let q = |v: f32| {
            if step == 0.0 {
                0
            } else {
                ((v + offset) / step).round().clamp(0.0, 15.0) as u8
            }
        };
        out.extend([sc, m]);
        out.extend((0..QK / 2).map(|i| q(s[i]) | (q(s[i + QK / 2]) << 4)));
    }
}

/// One block of 32 values as [`BlockFormat::Q6_K`] (a simple reference, not llama.cpp's
/// iterative `make_qx_quants`): each half's scale `s = max|x|/31` is stored as `d·sc` with,
/// as llama.cpp's `quantize_row_q6_K_ref` does, a negative `d = f16(−max s / 128)` and
/// `sc = −⌈s/|d|⌉` down to −128 (so no value clamps), then `q = round(x / (d·sc)) + 32`.
fn quantize_q6_k(blk: &[f32], out: &mut Vec<u8>) {
    let half_scale = |h: &[f32]| h.iter().fold(0f32, |a, v| a.max(v.abs())) / 31.0;
    let s = [half_scale(&blk[..QK / 2]), half_scale(&blk[QK / 2..])];
    let d = f16::from_f32(-s[0].max(s[1]) / 128.0);
    let df = d.to_f32();
    let sc = s.map(|s| {
        if df == 0.0 {
            0
        } else {
            (-(s / -df).ceil().min(128.0)) as i8
        }
    });
    let mut q = [32u8; QK];
    for (j, (q, v)) in q.iter_mut().zip(blk).enumerate() {
        let step = df * f32::from(sc[j / 16]);
        if step != 0.0 {
            *q = ((v / step).round() + 32.0).clamp(0.0, 63.0) as u8;
        }
    }
    let at = out.len();
    out.resize(at + BlockFormat::Q6_K.block_bytes(), 0);
    write_q6_k_block(d.to_le_bytes(), sc.map(|s| s as u8), &q, &mut out[at..]);
}

/// Writes one [`BlockFormat::Q6_K`] block (`out`, 28 bytes) from its f16 scale's bytes, its
/// halves' int8 scales and its 6-bit codes.
pub fn write_q6_k_block(d: [u8; 2], sc: [u8; 2], codes: &[u8; QK], out: &mut [u8]) {
    out[..2].copy_from_slice(&d);
    out[2..4].copy_from_slice(&sc);
    let qh = codes
        .iter()
        .enumerate()
        .fold(0u64, |h, (j, &q)| h | (u64::from(q >> 4) << (2 * j)));
    out[4..12].copy_from_slice(&qh.to_le_bytes());
    for j in 0..QK / 2 {
        out[12 + j] = (codes[j] & 0xF) | ((codes[j + QK / 2] & 0xF) << 4);
    }
}

/// The scale `d` and its inverse of llama.cpp's Q4_0/Q5_0 reference quantizers: the block's
/// value of largest magnitude, sign kept, maps to code 0, i.e. to `−half·d` (`half` 8 or 16).
fn signed_max_scale(blk: &[f32], half: f32) -> (f32, f32) {
    let max = blk
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let d = max / -half;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// Q5_0's 5-bit codes (0..31, the value is `d·(code − 16)`) of one row-major block.
pub fn q5_0_codes(b: &[u8]) -> [u8; QK] {
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let mut q = [0u8; QK];
    for (j, &byte) in b[6..6 + QK / 2].iter().enumerate() {
        let high = |bit: usize| (((qh >> bit) & 1) << 4) as u8;
        q[j] = (byte & 0xF) | high(j);
        q[j + QK / 2] = (byte >> 4) | high(j + QK / 2);
    }
    q
}

/// [`BlockFormat::Q6_K`]'s 6-bit codes (0..63; the value is `d·sc·(code − 32)`) of one
/// row-major block.
pub fn q6_k_codes(b: &[u8]) -> [u8; QK] {
    let mut qh = [0u8; 8];
    qh.copy_from_slice(&b[4..12]);
    let qh = u64::from_le_bytes(qh);
    let mut q = [0u8; QK];
    for (j, &byte) in b[12..12 + QK / 2].iter().enumerate() {
        let high = |e: usize| (((qh >> (2 * e)) & 3) << 4) as u8;
        q[j] = (byte & 0xF) | high(j);
        q[j + QK / 2] = (byte >> 4) | high(j + QK / 2);
    }
    q
}

/// The little-endian f16 at `at` in `b`, as f32.
#[inline(always)]
pub fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    #[test]
    fn quantize_then_dequantize_stays_within_half_a_step() {
        let mut rng = SplitMix64::new(3);
        // Two super-blocks (for Q4_K), sub-blocks of different ranges, some all positive.
        let x: Vec<f32> = (0..2 * QK_K)
            .map(|i| rng.uniform() * [1.0, 0.3, 0.05][i / QK % 3] - [0.0, 0.5][i / 96 % 2])
            .collect();
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (fmt, step) in [
            (BlockFormat::Q8_0, 1.0 / 127.0),
            // The side opposite the largest magnitude may clamp by up to one step.
            (BlockFormat::Q4_0, 2.0 / 8.0),
            (BlockFormat::Q4_1, 2.0 / 15.0),
            (BlockFormat::Q5_0, 2.0 / 16.0),
            (BlockFormat::Q6_K, 2.0 / 31.0),
            // A sub-block's range (up to 2·amax, plus the minimum's rounding) in 15 steps.
            (BlockFormat::Q4_K, 2.1 / 15.0),
            (BlockFormat::F16, 1e-3),
            (BlockFormat::Bf16, 1e-2),
        ] {
            let bytes = fmt.quantize_row(&x);
            assert_eq!(bytes.len(), fmt.row_bytes(x.len()), "{fmt:?}");
            let mut y = vec![0f32; x.len()];
            fmt.dequantize_row(&bytes, &mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!(
                    (a - b).abs() <= step * amax * 0.51 + 1e-3,
                    "{fmt:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn nibble_order_is_llama_cpps() {
        // Q4_1 block: d = 1, m = 0, byte j = (j) | (15 - j) << 4.
        let mut b = Vec::new();
        b.extend(f16::from_f32(1.0).to_le_bytes());
        b.extend(f16::from_f32(0.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; QK];
        BlockFormat::Q4_1.dequantize_row(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], j as f32);
            assert_eq!(y[j + 16], (15 - j) as f32);
        }
    }
}

/// Rows per interleaved group of the packed layout.
pub const PACK_ROWS: usize = 8;

/// Bytes of one 8-row group's header (8 f16 scales; then Q4_1's 8 f16 minima, Q5_0's fifth
/// bits as 32 bytes, or Q6_K's 16 int8 scales and fifth and sixth bits as 2 × 32 bytes; for
/// Q4_K, a sub-block's 8 scale bytes and 8 minimum bytes, see [`pack_rows`]).
pub const fn packed_header_bytes(format: BlockFormat) -> usize {
    match format {
        BlockFormat::Q4_1 => 32,
        BlockFormat::Q5_0 => 48,
        BlockFormat::Q6_K => 96,
        _ => 16,
    }
}

/// Bytes of one 8-row group's super-block header in the packed Q4_K layout (8 f16 `d`, then 8
/// f16 `dmin`).
pub const Q4_K_PACKED_SUPER_HEADER: usize = 32;

/// The packed high-bit bytes of one row's block: bit `t` of byte `i` is bit `bit` of the code
/// of element `4t + i` (see [`pack_rows`]).
fn high_bit_bytes(codes: &[u8; QK], bit: u32) -> [u8; 4] {
    std::array::from_fn(|i| (0..8).fold(0u8, |h, t| h | (((codes[4 * t + i] >> bit) & 1) << t)))
}

/// Appends the 8 rows' quant bytes four at a time, row after row (the `t`-th 4 bytes of rows
/// 0..8, then the `t+1`-th ...); `qs(l)` is row `l`'s quant bytes.
fn extend_interleaved<'a>(out: &mut Vec<u8>, qs: impl Fn(usize) -> &'a [u8]) {
    for t in 0..qs(0).len() / 4 {
        for l in 0..PACK_ROWS {
            out.extend_from_slice(&qs(l)[4 * t..4 * t + 4]);
        }
    }
}

/// Repacks whole groups of [`PACK_ROWS`] rows (row-major `bytes`, `cols` wide) into the
/// interleaved layout the int8 kernels read: for each group and each 32-element block, the 8
/// rows' scales (then Q4_1's 8 minima), then the quant bytes four at a time, row after row
/// (`t`-th 4 bytes of rows 0..8, then the `t+1`-th ...). A 32-bit lane of a vector load is then
/// four weights of one row, so one `vpdpbusd` advances 8 rows at once. Q5_0's fifth bits come
/// after the scales as 32 bytes `h` laid out like one such vector load: bit `t` of `h[4l + i]` is
/// the fifth bit of row `l`'s element `4t + i`, the element whose low four bits the kernels
/// unpack into byte `4l + i` of their `t`-th code vector (`t < 4`: low nibbles of quant bytes
/// `4t..4t + 4`, `t ≥ 4`: high nibbles of bytes `4(t − 4)..`), so one shift and mask moves them
/// into place. Q6_K's header is the 8 rows' first-half int8 scales, then their second-half
/// scales, then two such 32-byte bit vectors: the fifth bits, then the sixth. Q4_K's unit is the
/// super-block: the 8 rows' `d`, their `dmin` ([`Q4_K_PACKED_SUPER_HEADER`] bytes), then each
/// sub-block as a 32-element block whose header is the 8 rows' scale bytes, then their minimum
/// bytes. The byte count is unchanged; rows past the last whole group stay row-major after the
/// groups.
pub fn pack_rows(format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> Vec<u8> {
    assert!(format.is_quantized(), "only quantized formats are packed");
    let (bb, nb) = (format.block_bytes(), cols / format.block_len());
    let row_bytes = nb * bb;
    assert_eq!(bytes.len(), rows * row_bytes, "packed byte length");
    let header = packed_header_bytes(format);
    let qs_at = header / PACK_ROWS; // where the quant bytes start inside a block
    let groups = rows / PACK_ROWS;
    let mut out = Vec::with_capacity(bytes.len());
    for g in 0..groups {
        for b in 0..nb {
            let block = |l: usize| {
                let at = (g * PACK_ROWS + l) * row_bytes + b * bb;
                &bytes[at..at + bb]
            };
            if format == BlockFormat::Q4_K {
                for field in [0..2, 2..4] {
                    (0..PACK_ROWS).for_each(|l| out.extend_from_slice(&block(l)[field.clone()]));
                }
                for j in 0..QK_K / QK {
                    let sub = |l: usize| &block(l)[4 + j * Q4_K_SUB_BYTES..][..Q4_K_SUB_BYTES];
                    for field in 0..2 {
                        out.extend((0..PACK_ROWS).map(|l| sub(l)[field]));
                    }
                    extend_interleaved(&mut out, |l| &sub(l)[2..]);
                }
                continue;
            }
            for l in 0..PACK_ROWS {
                out.extend_from_slice(&block(l)[..2]);
            }
            match format {
                BlockFormat::Q4_1 => {
                    for l in 0..PACK_ROWS {
                        out.extend_from_slice(&block(l)[2..4]);
                    }
                }
                BlockFormat::Q5_0 => {
                    for l in 0..PACK_ROWS {
                        out.extend(high_bit_bytes(&q5_0_codes(block(l)), 4));
                    }
                }
                BlockFormat::Q6_K => {
                    for half in 0..2 {
                        out.extend((0..PACK_ROWS).map(|l| block(l)[2 + half]));
                    }
                    for bit in [4, 5] {
                        for l in 0..PACK_ROWS {
                            out.extend(high_bit_bytes(&q6_k_codes(block(l)), bit));
                        }
                    }
                }
                _ => {}
            }
            extend_interleaved(&mut out, |l| &block(l)[qs_at..]);
        }
    }
    out.extend_from_slice(&bytes[groups * PACK_ROWS * row_bytes..]);
    out
}

/// Row `l`'s block, row-major, from one packed group block `gb` ([`PACK_ROWS`] blocks of
/// `format` as [`pack_rows`] lays them out), written to `out` (one block long).
pub fn unpack_block(format: BlockFormat, gb: &[u8], l: usize, out: &mut [u8]) {
    let (bb, header) = (format.block_bytes(), packed_header_bytes(format));
    let qs_at = header / PACK_ROWS;
    let gather = |out: &mut [u8], interleaved: &[u8]| {
        for (t, o) in out.chunks_exact_mut(4).enumerate() {
            o.copy_from_slice(&interleaved[t * 4 * PACK_ROWS + 4 * l..][..4]);
        }
    };
    out[..2].copy_from_slice(&gb[2 * l..2 * l + 2]);
    match format {
        BlockFormat::Q4_1 => out[2..4].copy_from_slice(&gb[16 + 2 * l..16 + 2 * l + 2]),
        BlockFormat::Q4_K => {
            out[2..4].copy_from_slice(&gb[16 + 2 * l..16 + 2 * l + 2]);
            let packed_sub = PACK_ROWS * Q4_K_SUB_BYTES;
            for j in 0..QK_K / QK {
                let sub = &gb[Q4_K_PACKED_SUPER_HEADER + j * packed_sub..][..packed_sub];
                let o = &mut out[4 + j * Q4_K_SUB_BYTES..][..Q4_K_SUB_BYTES];
                o[0] = sub[l];
                o[1] = sub[PACK_ROWS + l];
                gather(&mut o[2..], &sub[2 * PACK_ROWS..]);
            }
            return;
        }
        BlockFormat::Q5_0 => {
            let h = &gb[16 + 4 * l..16 + 4 * l + 4];
            let mut qh = 0u32;
            for (i, &byte) in h.iter().enumerate() {
                for t in 0..8 {
                    qh |= u32::from((byte >> t) & 1) << (4 * t + i);
                }
            }
            out[2..6].copy_from_slice(&qh.to_le_bytes());
        }
        BlockFormat::Q6_K => {
            out[2] = gb[16 + l];
            out[3] = gb[24 + l];
            let mut qh = 0u64;
            for (k, at) in [32, 64].into_iter().enumerate() {
                for (i, &byte) in gb[at + 4 * l..at + 4 * l + 4].iter().enumerate() {
                    for t in 0..8 {
                        qh |= u64::from((byte >> t) & 1) << (2 * (4 * t + i) + k);
                    }
                }
            }
            out[4..12].copy_from_slice(&qh.to_le_bytes());
        }
        _ => {}
    }
    gather(&mut out[qs_at..bb], &gb[header..]);
}

/// Row `i` of a [`pack_rows`] buffer, back in row-major block layout.
pub fn packed_row(format: BlockFormat, cols: usize, packed: &[u8], i: usize) -> Vec<u8> {
    let (bb, nb) = (format.block_bytes(), cols / format.block_len());
    let row_bytes = nb * bb;
    let groups = packed.len() / row_bytes / PACK_ROWS;
    if i >= groups * PACK_ROWS {
        let at = i * row_bytes;
        return packed[at..at + row_bytes].to_vec();
    }
    let (g, l) = (i / PACK_ROWS, i % PACK_ROWS);
    let mut out = vec![0u8; row_bytes];
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let gb = &packed[(g * nb + b) * PACK_ROWS * bb..(g * nb + b + 1) * PACK_ROWS * bb];
        unpack_block(format, gb, l, blk);
    }
    out
}

#[cfg(test)]
mod pack_tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    /// Where the x86 kernels read a packed Q5_0 or Q6_K code: the low four bits from the nibble
    /// of quant vector `t % 4` (low nibbles for `t < 4`), the fifth (and Q6_K's sixth) from bit
    /// `t` of the high-bit vector's byte at the same position; every code of every row must come
    /// out as the row-major block has it.
    #[test]
    fn high_bits_sit_where_the_kernels_read_them() {
        let (rows, cols) = (16, 96);
        let mut rng = SplitMix64::new(5);
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() - 0.5).collect();
        for (format, codes, high_at) in [
            (
                BlockFormat::Q5_0,
                q5_0_codes as fn(&[u8]) -> [u8; QK],
                &[16][..],
            ),
            (BlockFormat::Q6_K, q6_k_codes, &[32, 64][..]),
        ] {
            let bytes = format.quantize_row(&x);
            let packed = pack_rows(format, rows, cols, &bytes);
            let (bb, nb) = (format.block_bytes(), cols / QK);
            let header = packed_header_bytes(format);
            for g in 0..rows / PACK_ROWS {
                for b in 0..nb {
                    let gb = &packed[(g * nb + b) * PACK_ROWS * bb..][..PACK_ROWS * bb];
                    for l in 0..PACK_ROWS {
                        let at = ((g * PACK_ROWS + l) * nb + b) * bb;
                        let want = codes(&bytes[at..at + bb]);
                        for t in 0..8 {
                            for i in 0..4 {
                                let byte = gb[header + (t % 4) * 32 + 4 * l + i];
                                let mut code = if t < 4 { byte & 0xF } else { byte >> 4 };
                                for (k, &h) in high_at.iter().enumerate() {
                                    code |= ((gb[h + 4 * l + i] >> t) & 1) << (4 + k);
                                }
                                assert_eq!(code, want[4 * t + i], "{format:?} row {l} t {t}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Q6_K's packed scales: the 8 rows' first-half scales, then their second-half ones.
    #[test]
    fn q6_k_scales_sit_where_the_kernels_read_them() {
        let (rows, cols) = (8, 64);
        let mut rng = SplitMix64::new(9);
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() - 0.5).collect();
        let format = BlockFormat::Q6_K;
        let bytes = format.quantize_row(&x);
        let packed = pack_rows(format, rows, cols, &bytes);
        let (bb, nb) = (format.block_bytes(), cols / QK);
        for b in 0..nb {
            let gb = &packed[b * PACK_ROWS * bb..][..PACK_ROWS * bb];
            for l in 0..PACK_ROWS {
                let at = (l * nb + b) * bb;
                assert_eq!(gb[2 * l..2 * l + 2], bytes[at..at + 2], "d of row {l}");
                assert_eq!(gb[16 + l], bytes[at + 2], "first scale of row {l}");
                assert_eq!(gb[24 + l], bytes[at + 3], "second scale of row {l}");
            }
        }
    }

    /// Where the x86 kernels read packed Q4_K: each super-block's 8 `d` then 8 `dmin`, then per
    /// sub-block the 8 scale bytes, the 8 minimum bytes and the nibbles as Q4_1's; every value
    /// of every row must come out as the row-major super-block has it.
    #[test]
    fn q4_k_scales_minima_and_nibbles_sit_where_the_kernels_read_them() {
        let (rows, cols) = (16, 2 * QK_K);
        let mut rng = SplitMix64::new(13);
        let x: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() - 0.3).collect();
        let format = BlockFormat::Q4_K;
        let bytes = format.quantize_row(&x);
        let packed = pack_rows(format, rows, cols, &bytes);
        let (bb, nb) = (format.block_bytes(), cols / QK_K);
        let packed_sub = PACK_ROWS * Q4_K_SUB_BYTES;
        for g in 0..rows / PACK_ROWS {
            for b in 0..nb {
                let gb = &packed[(g * nb + b) * PACK_ROWS * bb..][..PACK_ROWS * bb];
                for l in 0..PACK_ROWS {
                    let row = &bytes[((g * PACK_ROWS + l) * nb + b) * bb..][..bb];
                    assert_eq!(gb[2 * l..2 * l + 2], row[..2], "d of row {l}");
                    assert_eq!(gb[16 + 2 * l..18 + 2 * l], row[2..4], "dmin of row {l}");
                    for j in 0..QK_K / QK {
                        let sub = &gb[Q4_K_PACKED_SUPER_HEADER + j * packed_sub..];
                        let want = &row[4 + j * Q4_K_SUB_BYTES..][..Q4_K_SUB_BYTES];
                        assert_eq!([sub[l], sub[PACK_ROWS + l]], want[..2], "row {l} sub {j}");
                        for t in 0..8 {
                            for i in 0..4 {
                                let byte = sub[16 + (t % 4) * 32 + 4 * l + i];
                                let code = if t < 4 { byte & 0xF } else { byte >> 4 };
                                let e = 4 * t + i;
                                let q = want[2 + e % 16] >> (4 * (e / 16));
                                assert_eq!(code, q & 0xF, "row {l} sub {j} element {e}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packing_round_trips_every_row() {
        for format in BlockFormat::QUANTIZED {
            for rows in [1, 8, 13, 24] {
                let cols = 2 * format.block_len().max(QK);
                let rb = format.row_bytes(cols);
                let bytes: Vec<u8> = (0..rows * rb).map(|i| (i * 7 + i / 3) as u8).collect();
                let packed = pack_rows(format, rows, cols, &bytes);
                assert_eq!(packed.len(), bytes.len());
                for i in 0..rows {
                    assert_eq!(
                        packed_row(format, cols, &packed, i),
                        &bytes[i * rb..(i + 1) * rb],
                        "{format:?} rows={rows} i={i}"
                    );
                }
            }
        }
    }
}
