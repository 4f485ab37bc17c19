//! SplitMix64, the crate's one small, fast, seedable generator and 64-bit mixer.
//!
//! Nothing here is cryptographic. [`finalize`] is SplitMix64's output function (a bijection on
//! `u64` with full avalanche): the engine's id hasher and the deterministic test runner hash with
//! it. [`mix64`] is one SplitMix64 step of a state (`finalize(z + GOLDEN_GAMMA)`), the stateless
//! counter-based draw behind the policies' per-step randomness, synthetic steps and response ids.
//! [`SplitMix64`] is the stream: each request samples from its own (so its tokens depend only on
//! its seed), and tests and benchmarks make random weights and orders with it.

/// The golden-ratio increment of SplitMix64.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a cheap bijective 64-bit mixer with full avalanche.
#[inline]
pub const fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SplitMix64 output for state `z` (increment, then finalise): a stateless draw keyed by `z`.
#[inline]
pub const fn mix64(z: u64) -> u64 {
    finalize(z.wrapping_add(GOLDEN_GAMMA))
}

/// Maps 64 random bits to a uniform f64 in [0, 1) (53 bits of precision).
#[inline]
pub fn unit_f64(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A SplitMix64 stream.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        finalize(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        unit_f64(self.next_u64())
    }

    /// Uniform in [-1, 1), 24 bits of precision (random test weights).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalize_is_deterministic_and_spreads_neighbours() {
        assert_eq!(finalize(1), finalize(1));
        assert_ne!(finalize(1), finalize(2));
        // Neighbouring inputs differ in about half their output bits.
        let differing = (finalize(1000) ^ finalize(1001)).count_ones();
        assert!((16..=48).contains(&differing), "{differing}");
    }

    #[test]
    fn the_stream_is_splitmix64() {
        // The reference outputs of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(1_234_567);
        assert_eq!(rng.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(rng.next_u64(), 3_203_168_211_198_807_973);
        // A stream's n-th output is the stateless draw of its state.
        assert_eq!(SplitMix64::new(99).next_u64(), mix64(99));
        let mut rng = SplitMix64::new(5);
        for _ in 0..1000 {
            assert!((0.0..1.0).contains(&rng.next_f64()));
            assert!((-1.0..1.0).contains(&rng.uniform()));
        }
    }
}
