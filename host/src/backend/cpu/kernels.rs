//! Element-wise and reduction kernels of the CPU backend: lane-wise dot, axpy, sum and max
//! (written over fixed-width lane arrays so they auto-vectorise; callers compile them inside
//! AVX2+FMA functions chosen at run time), a branch-free `exp`, RMSNorm, SwiGLU, bias and the
//! RoPE table. Matrix multiplication lives in `matmul`.

/// Lane width of the vectorised loops.
const LANES: usize = 16;

/// Whether the CPU has AVX2 and FMA (checked once per call site by std's cached detection).
#[inline]
pub fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `a · b` over fixed-width lanes; `FMA` selects fused multiply-add (only with hardware FMA).
#[inline(always)]
pub fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] = if FMA {
                x[i].mul_add(y[i], acc[i])
            } else {
                acc[i] + x[i] * y[i]
            };
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    // Pairwise reduction of the lanes.
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0] + tail
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy_lanes<const FMA: bool>(y: &mut [f32], a: f32, x: &[f32]) {
    for (yy, xx) in y.iter_mut().zip(x) {
        *yy = if FMA {
            xx.mul_add(a, *yy)
        } else {
            *yy + a * xx
        };
    }
}

/// Sum of `x` over fixed-width lanes.
#[inline(always)]
pub fn sum_lanes(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Maximum of `x` over fixed-width lanes (`-inf` for an empty slice).
#[inline(always)]
pub fn max_lanes(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(tail, |a, &b| a.max(b))
}

/// `e^x` to about 2 ulp (Cephes `expf` polynomial), branch-free so loops over it vectorise;
/// inputs are clamped to [-87, 88].
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let k = t - MAGIC;
    let r = (x - k * C1) - k * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    y * pow2
}

/// RMSNorm of each `dim`-wide row of `x` into `out`: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let dim = w.len();
    for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ss = dot_lanes::<false>(row, row);
        let inv = 1.0 / (ss / dim as f32 + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = g * (v * inv);
        }
    }
}

/// SwiGLU: from rows `[gate (inter) | up (inter)]` writes `silu(gate) * up` rows of `inter`.
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (gu, o) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
    {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_fast(-g)) * u;
        }
    }
}

/// Adds `bias` to each row of `x`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Precomputed RoPE cos/sin tables, `[position][head_dim / 2]`.
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..max_pos` from the config's inverse frequencies. Angles are
    /// formed in f32 as transformers does, then their cos/sin taken in f64 and rounded.
    pub fn new(inv_freq: &[f32], max_pos: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in inv_freq {
                let angle = f64::from(p as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// Rotates every `2 * half`-wide head of `v` (rotate-half convention) for position `pos`.
    pub fn apply(&self, v: &mut [f32], pos: usize) {
        let h = self.half;
        let cos = &self.cos[pos * h..(pos + 1) * h];
        let sin = &self.sin[pos * h..(pos + 1) * h];
        for head in v.chunks_exact_mut(2 * h) {
            let (a, b) = head.split_at_mut(h);
            for i in 0..h {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    #[test]
    fn exp_fast_is_accurate() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_fast(x), x.exp());
            assert!((a - b).abs() <= 4e-7 * b, "exp({x}): {a} vs {b}");
            x += 0.0137;
        }
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) < 1e-37);
        let v = [3.0, -1.0, 7.5, 2.0, 0.5];
        assert_eq!(max_lanes(&v), 7.5);
        assert_eq!(sum_lanes(&v), 12.0);
    }

    #[test]
    fn dot_variants_agree() {
        let mut rng = SplitMix64::new(3);
        let a: Vec<f32> = (0..133).map(|_| rng.uniform()).collect();
        let b: Vec<f32> = (0..133).map(|_| rng.uniform()).collect();
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((f64::from(dot_lanes::<false>(&a, &b)) - exact).abs() < 1e-4);
        if has_avx2_fma() {
            assert!((f64::from(dot_lanes::<true>(&a, &b)) - exact).abs() < 1e-4);
        }
    }

    #[test]
    fn rope_position_zero_is_identity_and_preserves_norm() {
        let inv: Vec<f32> = (0..4)
            .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / 8.0))
            .collect();
        let t = RopeTable::new(&inv, 16);
        let orig = vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8];
        let mut v = orig.clone();
        t.apply(&mut v, 0);
        assert_eq!(v, orig);
        t.apply(&mut v, 9);
        let n0: f32 = orig.iter().map(|x| x * x).sum();
        let n1: f32 = v.iter().map(|x| x * x).sum();
        assert!((n0 - n1).abs() < 1e-5);
    }
}
