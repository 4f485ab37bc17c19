//! Tests of the K-quant conversions (`kquant`): the scalar dequantizers against the PyPI `gguf`
//! package's numpy code (a committed fixture, `scripts/make_kquant_fixture.py`); every
//! converted element within the stated bound of the exact value, on odd shapes; and the int8
//! kernels on converted weights against exact dequantize-then-multiply. Test quantizers for the
//! K-quant layouts live here too (`kquant_gguf_tests` builds its model with them).

use std::path::PathBuf;

use half::f16;

use super::kquant::{ConvertedFormat, QK_K};
use super::quant::{BlockFormat, QK, half_at};
use super::weight_matrix::{BlockMatrix, WeightBytes};
use crate::splitmix::SplitMix64;

use ConvertedFormat::{Q4K, Q5_0, Q6K};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn dequantizers_equal_the_gguf_packages_numpy_bit_for_bit() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/kquant_dequant.json");
    let text = std::fs::read_to_string(path).expect("the fixture is committed");
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("parse the fixture");
    for format in [Q4K, Q6K, Q5_0] {
        let f = &fixture["formats"][format.name()];
        assert_eq!(f["block_bytes"].as_u64(), Some(format.block_bytes() as u64));
        assert_eq!(f["block_len"].as_u64(), Some(format.block_len() as u64));
        let blocks = hex(f["blocks_hex"].as_str().unwrap());
        let want: Vec<f32> = hex(f["values_hex"].as_str().unwrap())
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(
            want.len() / format.block_len(),
            blocks.len() / format.block_bytes()
        );
        // One row of every block, and each block on its own.
        let mut got = vec![0f32; want.len()];
        format.dequantize_row(&blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} element {i}: {g} vs {w}",
                format.name()
            );
        }
        let mut one = vec![0f32; format.block_len()];
        let blocks_and_values = blocks
            .chunks_exact(format.block_bytes())
            .zip(want.chunks_exact(format.block_len()));
        for (b, w) in blocks_and_values {
            format.dequantize_row(b, &mut one);
            assert_eq!(one, w);
        }
    }
}

/// llama.cpp-shaped quantizers for test weights (simpler than llama.cpp's searches, same
/// layouts): each row of `x` into `format`'s blocks.
pub(crate) fn quantize_row(format: ConvertedFormat, x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(format.row_bytes(x.len()));
    for blk in x.chunks_exact(format.block_len()) {
        match format {
            Q4K => quantize_q4_k(blk, &mut out),
            Q6K => quantize_q6_k(blk, &mut out),
            Q5_0 => out.extend(BlockFormat::Q5_0.quantize_row(blk)),
        }
    }
    out
}

fn round_to(v: f32, step: f32, lo: f32, hi: f32) -> f32 {
    if step == 0.0 {
        0f32.clamp(lo, hi)
    } else {
        (v / step).round().clamp(lo, hi)
    }
}

fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (mut scale, mut min) = ([0f32; 8], [0f32; 8]);
    for (j, s) in x.chunks_exact(QK).enumerate() {
        let lo = s.iter().copied().fold(0f32, f32::min);
        let hi = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (hi - lo) / 15.0;
        min[j] = -lo;
    }
    let hd = f16::from_f32(scale.iter().copied().fold(0f32, f32::max) / 63.0);
    let hm = f16::from_f32(min.iter().copied().fold(0f32, f32::max) / 63.0);
    let sc: Vec<u8> = scale
        .iter()
        .map(|s| round_to(*s, hd.to_f32(), 0.0, 63.0) as u8)
        .collect();
    let m: Vec<u8> = min
        .iter()
        .map(|s| round_to(*s, hm.to_f32(), 0.0, 63.0) as u8)
        .collect();
    out.extend(hd.to_le_bytes());
    out.extend(hm.to_le_bytes());
    let mut scales = [0u8; 12];
    for j in 0..4 {
        scales[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        scales[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        scales[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    out.extend(scales);
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(e, v)| {
            let j = e / QK;
            let step = hd.to_f32() * f32::from(sc[j]);
            round_to(v + hm.to_f32() * f32::from(m[j]), step, 0.0, 15.0) as u8
        })
        .collect();
    for g in 0..4 {
        out.extend((0..32).map(|l| q[64 * g + l] | (q[64 * g + 32 + l] << 4)));
    }
}

fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scale: Vec<f32> = x
        .chunks_exact(16)
        .map(|s| s.iter().fold(0f32, |a, v| a.max(v.abs())) / 31.0)
        .collect();
    let hd = f16::from_f32(scale.iter().copied().fold(0f32, f32::max) / 127.0);
    let sc: Vec<i8> = scale
        .iter()
        .map(|s| round_to(*s, hd.to_f32(), -128.0, 127.0) as i8)
        .collect();
    let q: Vec<u8> = x
        .iter()
        .enumerate()
        .map(|(e, v)| {
            let step = hd.to_f32() * f32::from(sc[e / 16]);
            (round_to(*v, step, -32.0, 31.0) as i8 + 32) as u8
        })
        .collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for n in 0..2 {
        for l in 0..32 {
            let e = |w: usize| q[128 * n + 32 * w + l];
            ql[64 * n + l] = (e(0) & 0xF) | ((e(2) & 0xF) << 4);
            ql[64 * n + l + 32] = (e(1) & 0xF) | ((e(3) & 0xF) << 4);
            qh[32 * n + l] =
                (e(0) >> 4) | ((e(1) >> 4) << 2) | ((e(2) >> 4) << 4) | ((e(3) >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|s| *s as u8));
    out.extend(hd.to_le_bytes());
}

/// Random bytes for a row of `blocks` blocks, f16 fields finite (magnitudes 1e-6..1, either
/// sign); the first block has every bit set, the second every bit clear but its scales.
fn random_row(rng: &mut SplitMix64, format: ConvertedFormat, blocks: usize) -> Vec<u8> {
    let halves: &[usize] = match format {
        Q4K => &[0, 2],
        Q6K => &[208],
        Q5_0 => &[0],
    };
    let bb = format.block_bytes();
    let mut row: Vec<u8> = (0..blocks * bb).map(|_| rng.next_u64() as u8).collect();
    for (i, b) in row.chunks_exact_mut(bb).enumerate() {
        match i {
            0 => b.fill(0xFF),
            1 => b.fill(0),
            _ => {}
        }
        for &at in halves {
            let mag = 10f32.powf(-6.0 * rng.next_f64() as f32);
            let h = f16::from_f32(if rng.next_u64().is_multiple_of(4) {
                -mag
            } else {
                mag
            });
            b[at..at + 2].copy_from_slice(&h.to_le_bytes());
        }
    }
    row
}

/// Realistic rows: weights of a few magnitudes (outliers included) quantized by the test
/// quantizers.
fn quantized_row(rng: &mut SplitMix64, format: ConvertedFormat, cols: usize) -> Vec<u8> {
    let scale = 10f32.powf(-3.0 * rng.next_f64() as f32);
    let x: Vec<f32> = (0..cols)
        .map(|i| {
            let v = rng.uniform() * scale;
            if i % 97 == 5 { v * 8.0 } else { v }
        })
        .collect();
    quantize_row(format, &x)
}

/// The conversions a K-quant tensor can take.
const CONVERSIONS: [(ConvertedFormat, BlockFormat); 5] = [
    (Q4K, BlockFormat::Q4_K),
    (Q4K, BlockFormat::Q8_0),
    (Q6K, BlockFormat::Q6_K),
    (Q6K, BlockFormat::Q8_0),
    (Q5_0, BlockFormat::Q8_0),
];

/// For each element of a converted row, the bound on its distance from the exact value: to
/// Q8_0 half the stored scale `d'`; Q4_K and Q6_K to their own layouts and Q5_0 to Q8_0 zero.
fn bounds(format: ConvertedFormat, target: BlockFormat, dst: &[u8], cols: usize) -> Vec<f32> {
    match (format, target) {
        (Q5_0, _) | (Q6K, BlockFormat::Q6_K) | (Q4K, BlockFormat::Q4_K) => vec![0.0; cols],
        _ => dst
            .chunks_exact(target.block_bytes())
            .flat_map(|b| std::iter::repeat_n(half_at(b, 0) * 0.5 * (1.0 + 2f32.powi(-14)), QK))
            .collect(),
    }
}

/// Largest |converted − exact| over the (super-)block's largest |exact|, and over the bound.
#[derive(Debug, Default)]
struct Worst {
    relative: f64,
    of_bound: f64,
}

fn check_conversion(
    format: ConvertedFormat,
    target: BlockFormat,
    rows: &[Vec<u8>],
    cols: usize,
    worst: &mut Worst,
) {
    let bytes: Vec<u8> = rows.concat();
    let converted = format
        .convert_rows(target, rows.len(), cols, &bytes)
        .unwrap();
    let m = BlockMatrix::new(
        target,
        rows.len(),
        cols,
        WeightBytes::Owned(converted.into()),
    )
    .unwrap();
    let (mut exact, mut got) = (vec![0f32; cols], vec![0f32; cols]);
    let bl = format.block_len();
    for (i, src) in rows.iter().enumerate() {
        format.dequantize_row(src, &mut exact);
        m.dequantize_row(i, &mut got);
        let dst = m.row_bytes(i);
        let bound = bounds(format, target, &dst, cols);
        let block_max: Vec<f32> = exact
            .chunks_exact(bl)
            .map(|b| b.iter().fold(0f32, |a, v| a.max(v.abs())))
            .collect();
        for (e, ((x, g), b)) in exact.iter().zip(&got).zip(&bound).enumerate() {
            let err = (x - g).abs();
            assert!(
                err <= *b,
                "{} to {} row {i} element {e}: {g} vs exact {x} (bound {b})",
                format.name(),
                target.name()
            );
            let sb_max = block_max[e / bl];
            if sb_max > 0.0 {
                worst.relative = worst.relative.max(f64::from(err / sb_max));
            }
            if *b > 0.0 {
                worst.of_bound = worst.of_bound.max(f64::from(err / b));
            }
        }
        if target == BlockFormat::Q8_0 && format != Q5_0 {
            // The scale is not inflated: d' ≤ max|x|/127 up to one f16 step.
            for (b, x) in dst.chunks_exact(34).zip(exact.chunks_exact(QK)) {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = half_at(b, 0);
                assert!(
                    d <= amax / 127.0 * (1.0 + 2f32.powi(-10)) + 2f32.powi(-24),
                    "{d} {amax}"
                );
            }
        }
    }
}

#[test]
fn converted_rows_are_within_the_stated_bound_of_the_exact_values() {
    let mut rng = SplitMix64::new(17);
    for (format, target) in CONVERSIONS {
        let (mut random, mut realistic) = (Worst::default(), Worst::default());
        for rows in [1, 3, 9, 13] {
            for blocks in [1, 2, 3] {
                let cols = blocks * format.block_len();
                let r: Vec<Vec<u8>> = (0..rows)
                    .map(|_| random_row(&mut rng, format, blocks))
                    .collect();
                check_conversion(format, target, &r, cols, &mut random);
                let q: Vec<Vec<u8>> = (0..rows)
                    .map(|_| quantized_row(&mut rng, format, cols))
                    .collect();
                check_conversion(format, target, &q, cols, &mut realistic);
            }
        }
        eprintln!(
            "{} -> {}: max |converted - exact| / max|super-block| = {:.3e} random, {:.3e} \
             realistic; of the bound: {:.3} random, {:.3} realistic",
            format.name(),
            target.name(),
            random.relative,
            realistic.relative,
            random.of_bound,
            realistic.of_bound
        );
        if format == Q5_0 {
            assert_eq!(
                random.relative + realistic.relative,
                0.0,
                "Q5_0 converts exactly"
            );
        }
    }
}

#[test]
fn q4_k_nibbles_land_where_the_unpacked_layout_reads_them() {
    // d = 1, dmin = 0, every scale 1: element e of the super-block has quant e·7 % 16 and the
    // converted rows must dequantize to exactly that.
    let mut b = Vec::new();
    b.extend(f16::from_f32(1.0).to_le_bytes());
    b.extend(f16::from_f32(0.0).to_le_bytes());
    b.extend([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]);
    let q = |e: usize| (e * 7 % 16) as u8;
    for g in 0..4 {
        b.extend((0..32).map(|l| q(64 * g + l) | (q(64 * g + 32 + l) << 4)));
    }
    let mut exact = [0f32; QK_K];
    Q4K.dequantize_row(&b, &mut exact);
    let mut out = vec![0u8; BlockFormat::Q4_K.row_bytes(QK_K)];
    Q4K.convert_row(BlockFormat::Q4_K, &b, QK_K, &mut out)
        .unwrap();
    let mut got = [0f32; QK_K];
    BlockFormat::Q4_K.dequantize_row(&out, &mut got);
    for e in 0..QK_K {
        assert_eq!(exact[e], f32::from(q(e)), "element {e}");
        assert_eq!(got[e], exact[e], "element {e}");
    }
}

#[test]
fn kernels_on_converted_weights_match_exact_dequantize_then_multiply() {
    use crate::backend::cpu::matmul::MatmulScratch;
    use crate::backend::cpu::qmatmul::{Isa, matmul_blocks, matmul_blocks_with};

    let mut rng = SplitMix64::new(23);
    for (format, target) in CONVERSIONS {
        for (n, blocks) in [(1, 1), (13, 2), (37, 3)] {
            let k = blocks * format.block_len();
            // Two parts (as a fused q/k/v is), rows not a multiple of the 8-row groups.
            let src: Vec<Vec<u8>> = (0..n + 3)
                .map(|_| quantized_row(&mut rng, format, k))
                .collect();
            let part = |rows: &[Vec<u8>]| {
                let c = format
                    .convert_rows(target, rows.len(), k, &rows.concat())
                    .unwrap();
                BlockMatrix::new(target, rows.len(), k, WeightBytes::Owned(c.into())).unwrap()
            };
            let w = BlockMatrix::vstack(vec![part(&src[..n]), part(&src[n..])]).unwrap();
            let exact: Vec<Vec<f32>> = src
                .iter()
                .map(|r| {
                    let mut o = vec![0f32; k];
                    format.dequantize_row(r, &mut o);
                    o
                })
                .collect();
            let converted = w.dequantize();
            let wmax = exact.iter().flatten().fold(0f32, |a, v| a.max(v.abs())) as f64;
            let conv_err = exact
                .iter()
                .flatten()
                .zip(&converted.data)
                .fold(0f32, |a, (x, c)| a.max((x - c).abs())) as f64;
            for m in [1, 2, 5, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                let xmax = x.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                // int8 activations: half a step (max|x|/254) per element times the weights;
                // the conversion: its largest error times Σ|x|.
                let tol = |i: usize| {
                    let xs: f64 = x[i * k..(i + 1) * k]
                        .iter()
                        .map(|v| f64::from(v.abs()))
                        .sum();
                    xmax / 254.0 * wmax * k as f64 * 0.5 + conv_err * xs + 1e-5
                };
                let mut outputs = Isa::available()
                    .into_iter()
                    .map(|isa| (format!("{isa:?}"), matmul_blocks_with(isa, &x, m, &w)))
                    .collect::<Vec<_>>();
                let mut threaded = vec![0f32; m * w.rows];
                matmul_blocks(
                    &x,
                    m,
                    &w,
                    &mut threaded,
                    false,
                    &mut MatmulScratch::default(),
                );
                outputs.push(("threaded".into(), threaded));
                for (name, got) in &outputs {
                    for i in 0..m {
                        for (j, e) in exact.iter().enumerate() {
                            let want: f64 = (0..k)
                                .map(|c| f64::from(x[i * k + c]) * f64::from(e[c]))
                                .sum();
                            let g = f64::from(got[i * w.rows + j]);
                            assert!(
                                (g - want).abs() <= tol(i),
                                "{} to {} {name} n={n} k={k} m={m} ({i},{j}): {g} vs {want}",
                                format.name(),
                                target.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
