//! Per-step randomness handed to policies, derived from the engine seed and the step id.
//!
//! A counter-based generator (SplitMix64 finalisers) instead of a global RNG: the draws of
//! step `n` depend only on `(seed, n)`, so a decision can be reproduced after the fact, and the
//! batch and rich draws come from distinct streams, so they are independent.

use crate::splitmix::{mix64, unit_f64};

const BATCH_STREAM: u64 = 0x6261_7463_685f_7374; // "batch_st"
const RICH_STREAM: u64 = 0x7269_6368_5f73_7472; // "rich_str"
const JOURNEY_STREAM: u64 = 0x6a6f_7572_6e65_7973; // "journeys"

/// The two independent uniform draws of step `step_id`: `(batch, rich)`.
pub fn step_draws(seed: u64, step_id: u64) -> (f64, f64) {
    let key = mix64(seed ^ mix64(step_id));
    (
        unit_f64(mix64(key ^ BATCH_STREAM)),
        unit_f64(mix64(key ^ RICH_STREAM)),
    )
}

/// The uniform draw that decides whether the journey of engine request `request_id` is traced
/// (a stream of its own, independent of the step draws).
pub fn journey_draw(seed: u64, request_id: u64) -> f64 {
    unit_f64(mix64(mix64(seed ^ JOURNEY_STREAM) ^ mix64(request_id)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journey_draws_are_reproducible_and_uniform() {
        let n = 100_000u64;
        let below = (1..=n).filter(|&id| journey_draw(3, id) < 0.25).count() as f64;
        assert_eq!(journey_draw(3, 9), journey_draw(3, 9));
        assert_ne!(journey_draw(3, 9), journey_draw(4, 9));
        // Binomial(n, 0.25): within 5 standard deviations.
        let sd = (n as f64 * 0.25 * 0.75).sqrt();
        assert!((below - n as f64 * 0.25).abs() < 5.0 * sd, "{below}");
    }

    #[test]
    fn draws_are_reproducible_and_in_range() {
        for step in 1..1000 {
            let (b, r) = step_draws(42, step);
            assert_eq!((b, r), step_draws(42, step));
            assert!((0.0..1.0).contains(&b) && (0.0..1.0).contains(&r));
        }
        assert_ne!(step_draws(1, 5), step_draws(2, 5));
    }

    #[test]
    fn batch_and_rich_draws_are_uncorrelated() {
        let n = 200_000u64;
        let (mut sb, mut sr, mut sbr) = (0.0, 0.0, 0.0);
        for step in 1..=n {
            let (b, r) = step_draws(7, step);
            sb += b;
            sr += r;
            sbr += b * r;
        }
        let nf = n as f64;
        let cov = sbr / nf - (sb / nf) * (sr / nf);
        // Var(U) = 1/12; correlation within 5 standard errors of 0.
        let corr = cov * 12.0;
        assert!(corr.abs() < 5.0 / nf.sqrt(), "correlation {corr}");
    }
}
