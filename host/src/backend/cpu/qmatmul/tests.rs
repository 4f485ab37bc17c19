//! The int8 kernels against dequantize-then-multiply, every format on every instruction set.

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
    for format in BlockFormat::QUANTIZED {
        let shapes: &[(usize, usize)] = if format == BlockFormat::Q4_K {
            &[(1, 256), (9, 512), (37, 768)]
        } else {
            &[(1, 32), (7, 64), (37, 96), (70, 160)]
        };
        for &(n, k) in shapes {
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
