//! GGUF formats the int8 kernels do not run as stored, converted row by row at load into the
//! layouts they do run, as close to exactly as those allow. Q4_K (256-element super-blocks: 8
//! sub-blocks of 32 with 6-bit scales and minima packed into 12 bytes, x = d·sc·q − dmin·m)
//! becomes [`BlockFormat::Q4_K`] exactly: the same `d`, `dmin` and nibbles, the scales and
//! minima one byte each; 4.5 → 4.625 bits per weight. Q6_K (16 sub-blocks of 16 with int8
//! scales, 6-bit quants) becomes [`BlockFormat::Q6_K`] exactly: each 32 elements keep the
//! super-block's `d`, their two int8 scales and their 6-bit quants; 6.56 → 7 bits. Q5_0 (the
//! fallback llama.cpp writes into K-quant files for rows that are not whole super-blocks) runs
//! as stored (`BlockFormat::Q5_0`); only where a fused q/k/v or gate/up stack mixes it with
//! another format does it become Q8_0, exactly: the same scale, the 5-bit quants as int8;
//! 5.5 → 8.5 bits. Likewise a Q4_K or Q6_K tensor in a stack of mixed formats is re-quantized to
//! Q8_0 (each 32 values to one f16 scale `d' ≈ max|x|/127`: at most half a Q8_0 step, `d'/2`,
//! per element), so the stack has one format (stacks that mix other formats, Q4_0 or Q4_1
//! beside Q8_0, say, are refused at load). The scalar dequantizers here follow ggml's
//! `dequantize_row_*` and are the reference the conversions are measured against
//! (`kquant_tests`).

use half::f16;
use rayon::prelude::*;

use super::quant::{BlockFormat, Q4_K_SUB_BYTES, QK, half_at, q5_0_codes, write_q6_k_block};

pub use super::quant::QK_K;

/// Rows converted per rayon task.
const ROWS_PER_TASK: usize = 16;

/// A GGUF block format converted at load ([module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvertedFormat {
    /// `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`.
    Q4K,
    /// `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`.
    Q6K,
    /// `{ d: f16, qh: [u8; 4], qs: [u8; 16] }`: x = d·(q − 16), q 5 bits.
    Q5_0,
}

impl ConvertedFormat {
    /// The format of a ggml type id, if it is one converted here.
    pub const fn from_ggml_type(ggml_type: u32) -> Option<Self> {
        match ggml_type {
            6 => Some(ConvertedFormat::Q5_0),
            12 => Some(ConvertedFormat::Q4K),
            14 => Some(ConvertedFormat::Q6K),
            _ => None,
        }
    }

    /// The name GGUF and llama.cpp use.
    pub const fn name(self) -> &'static str {
        match self {
            ConvertedFormat::Q4K => "Q4_K",
            ConvertedFormat::Q6K => "Q6_K",
            ConvertedFormat::Q5_0 => "Q5_0",
        }
    }

    /// Elements per block.
    pub const fn block_len(self) -> usize {
        match self {
            ConvertedFormat::Q4K | ConvertedFormat::Q6K => QK_K,
            ConvertedFormat::Q5_0 => QK,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> usize {
        match self {
            ConvertedFormat::Q4K => 144,
            ConvertedFormat::Q6K => 210,
            ConvertedFormat::Q5_0 => 22,
        }
    }

    /// Bytes of one row of `cols` elements (a multiple of the block length).
    pub const fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_len() * self.block_bytes()
    }

    /// The format a tensor converts to on its own: Q4_K to [`BlockFormat::Q4_K`] (its scales
    /// unpacked), Q6_K to the 32-element [`BlockFormat::Q6_K`], Q5_0 (converted only in stacks
    /// of mixed formats) to Q8_0.
    pub const fn target(self) -> BlockFormat {
        match self {
            ConvertedFormat::Q4K => BlockFormat::Q4_K,
            ConvertedFormat::Q6K => BlockFormat::Q6_K,
            ConvertedFormat::Q5_0 => BlockFormat::Q8_0,
        }
    }

    /// Dequantizes one row (`out.len()` elements) exactly as ggml's `dequantize_row_*` does.
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(bytes.len(), self.row_bytes(out.len()), "row byte length");
        let (bl, bb) = (self.block_len(), self.block_bytes());
        for (o, b) in out.chunks_exact_mut(bl).zip(bytes.chunks_exact(bb)) {
            match self {
                ConvertedFormat::Q4K => dequantize_q4_k(b, o),
                ConvertedFormat::Q6K => dequantize_q6_k(b, o),
                ConvertedFormat::Q5_0 => BlockFormat::Q5_0.dequantize_row(b, o),
            }
        }
    }

    /// Converts one row (`cols` elements) into `target` (this format's [`Self::target`], or
    /// Q8_0), written to `out` (`target.row_bytes(cols)` long). Errs only where a Q8_0 scale
    /// does not fit in f16 (values above 8·10⁶: no real weights come near).
    pub fn convert_row(
        self,
        target: BlockFormat,
        bytes: &[u8],
        cols: usize,
        out: &mut [u8],
    ) -> Result<(), String> {
        assert_eq!(bytes.len(), self.row_bytes(cols), "row byte length");
        assert_eq!(out.len(), target.row_bytes(cols), "converted row length");
        let (bl, bb) = (self.block_len(), self.block_bytes());
        let out_per_block = target.row_bytes(bl);
        let blocks = bytes
            .chunks_exact(bb)
            .zip(out.chunks_exact_mut(out_per_block));
        match (self, target) {
            (ConvertedFormat::Q4K, BlockFormat::Q4_K) => {
                for (b, o) in blocks {
                    q4_k_to_unpacked_scales(b, o);
                }
            }
            (ConvertedFormat::Q6K, BlockFormat::Q6_K) => {
                for (b, o) in blocks {
                    q6_k_to_32_element_blocks(b, o);
                }
            }
            (ConvertedFormat::Q5_0, BlockFormat::Q8_0) => {
                for (b, o) in blocks {
                    q5_0_to_q8_0(b, o);
                }
            }
            (ConvertedFormat::Q4K | ConvertedFormat::Q6K, BlockFormat::Q8_0) => {
                let mut exact = [0f32; QK_K];
                for (b, o) in blocks {
                    self.dequantize_row(b, &mut exact);
                    for (x, q) in exact.chunks_exact(QK).zip(o.chunks_exact_mut(2 + QK)) {
                        requantize_q8_0(x, q)?;
                    }
                }
            }
            _ => panic!("{} does not convert to {}", self.name(), target.name()),
        }
        Ok(())
    }

    /// Converts `rows` rows of `cols` elements (row-major `bytes`) into `target`, rows in
    /// parallel; the error names the first row that failed.
    pub fn convert_rows(
        self,
        target: BlockFormat,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Vec<u8>, String> {
        let (src, dst) = (self.row_bytes(cols), target.row_bytes(cols));
        assert_eq!(bytes.len(), rows * src, "converted byte length");
        let mut out = vec![0u8; rows * dst];
        if rows == 0 || dst == 0 {
            return Ok(out);
        }
        out.par_chunks_mut(ROWS_PER_TASK * dst)
            .zip(bytes.par_chunks(ROWS_PER_TASK * src))
            .enumerate()
            .try_for_each(|(t, (o, b))| {
                for (r, (o, b)) in o.chunks_exact_mut(dst).zip(b.chunks_exact(src)).enumerate() {
                    self.convert_row(target, b, cols, o)
                        .map_err(|m| format!("row {}: {m}", t * ROWS_PER_TASK + r))?;
                }
                Ok::<(), String>(())
            })?;
        Ok(out)
    }
}

/// ggml's `get_scale_min_k4`: sub-block `j`'s 6-bit scale and minimum from the 12 packed bytes.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j`'s 4-bit quant at position `l` (0..32) of a Q4_K super-block's `qs`: pairs of
/// sub-blocks share 32 bytes, the even one in the low nibbles.
#[inline]
fn q4_k_nibble(qs: &[u8], j: usize, l: usize) -> u8 {
    (qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xF
}

/// ggml's `dequantize_row_q4_K` for one super-block.
fn dequantize_q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, o) in out.chunks_exact_mut(QK).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        let (d1, m1) = (d * f32::from(sc), dmin * f32::from(m));
        for (l, x) in o.iter_mut().enumerate() {
            *x = d1 * f32::from(q4_k_nibble(qs, j, l)) - m1;
        }
    }
}

/// ggml's `dequantize_row_q6_K` for one super-block.
fn dequantize_q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for n in 0..2 {
        let (ql, qh, sc) = (&ql[64 * n..], &qh[32 * n..], &sc[8 * n..]);
        let y = &mut out[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q = [
                (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (w, q) in q.into_iter().enumerate() {
                let s = f32::from(sc[is + 2 * w] as i8);
                y[l + 32 * w] = d * s * f32::from(q as i8 - 32);
            }
        }
    }
}

/// One Q4_K super-block in [`BlockFormat::Q4_K`]'s layout (`out` 148 bytes), exactly: the same
/// `d` and `dmin`, each sub-block's 6-bit scale and minimum as a byte, its nibbles re-packed to
/// Q4_0's order (element `i` low, `i + 16` high).
fn q4_k_to_unpacked_scales(b: &[u8], out: &mut [u8]) {
    out[..4].copy_from_slice(&b[..4]);
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (j, o) in out[4..].chunks_exact_mut(Q4_K_SUB_BYTES).enumerate() {
        let (sc, m) = scale_min_k4(j, scales);
        o[0] = sc;
        o[1] = m;
        for i in 0..QK / 2 {
            o[2 + i] = q4_k_nibble(qs, j, i) | (q4_k_nibble(qs, j, i + QK / 2) << 4);
        }
    }
}

/// One Q6_K super-block as 8 [`BlockFormat::Q6_K`] blocks (`out` 8 × 28 bytes), exactly: each
/// keeps the super-block's f16 `d`, the int8 scales of its two 16-element halves and its 6-bit
/// quants (ggml's element order: quant `e` of the super-block uses scale `e / 16`).
fn q6_k_to_32_element_blocks(b: &[u8], out: &mut [u8]) {
    let (ql, qh, sc) = (&b[..128], &b[128..192], &b[192..208]);
    let mut q = [0u8; QK_K];
    for n in 0..2 {
        let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
        for l in 0..32 {
            let at = 128 * n + l;
            q[at] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[at + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[at + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[at + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    let bb = BlockFormat::Q6_K.block_bytes();
    for (j, (o, q)) in out.chunks_exact_mut(bb).zip(q.chunks_exact(QK)).enumerate() {
        let codes = <&[u8; QK]>::try_from(q).expect("chunks of QK");
        write_q6_k_block([b[208], b[209]], [sc[2 * j], sc[2 * j + 1]], codes, o);
    }
}

/// One Q5_0 block as a Q8_0 block, exactly: the same f16 scale, quants `q − 16` as int8.
fn q5_0_to_q8_0(b: &[u8], out: &mut [u8]) {
    out[..2].copy_from_slice(&b[..2]);
    for (o, q) in out[2..].iter_mut().zip(q5_0_codes(b)) {
        *o = (q as i8 - 16) as u8;
    }
}

/// 32 exact values as one Q8_0 block: the f16 scale `d'` is the nearest to `max|x|/127`, raised
/// by one f16 step where rounding (or f16's subnormal spacing) left `max|x|/d'` above 127.5, and
/// `q = round(x/d')`; so every element is within `d'/2` of its value and `d' ≤ max|x|/127` up to
/// f16 rounding. Errs where the scale does not fit in f16 (max|x| > 8·10⁶).
fn requantize_q8_0(x: &[f32], out: &mut [u8]) -> Result<(), String> {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let mut d = f16::from_f32(amax / 127.0);
    if amax > 127.5 * d.to_f32() {
        d = f16::from_bits(d.to_bits() + 1);
    }
    if !d.is_finite() {
        return Err(format!(
            "a Q8_0 scale for values up to {amax} overflows f16"
        ));
    }
    let df = d.to_f32();
    out[..2].copy_from_slice(&d.to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        let q = if df == 0.0 { 0.0 } else { (v / df).round() };
        *o = q.clamp(-127.0, 127.0) as i8 as u8;
    }
    Ok(())
}
