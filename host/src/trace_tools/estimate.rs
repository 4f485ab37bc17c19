//! Population estimates from a sampled step trace.
//!
//! Each step is traced independently of the others with the probability its span records
//! (`sampling.batch_probability`, π): Poisson sampling with known inclusion probabilities,
//! whether π is a constant rate or a policy's rule (a step under pressure traced with π = 1,
//! the rest at the base rate). For a quantity y per step, over the traced steps S:
//!
//! - total: the Horvitz–Thompson estimator T̂ = Σ y/π, unbiased, with variance estimate
//!   V̂ = Σ (1 − π) y² / π²;
//! - number of steps: N̂ = Σ 1/π (the same with y = 1);
//! - mean: the Hájek ratio T̂ / N̂, with the linearised variance Σ (1 − π)(y − mean)² / π² / N̂²;
//! - percentiles: of the empirical distribution that weighs each traced step by 1/π.
//!
//! Intervals are T̂ ± 1.96 √V̂ (normal approximation, 95%). A census (every π = 1, a
//! `--record-steps` file) gives exact values and zero-width intervals. Unbiasedness holds only
//! if π is the probability the step really had: a policy that records a wrong π biases the
//! estimates, and nothing in the file can show it.

use serde::Serialize;

/// The 97.5% quantile of the standard normal distribution.
const Z_95: f64 = 1.959_963_984_540_054;

/// A point estimate with its standard error and 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub std_error: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
}

impl Estimate {
    fn new(value: f64, variance: f64) -> Self {
        let std_error = variance.max(0.0).sqrt();
        Self {
            value,
            std_error,
            ci95_low: value - Z_95 * std_error,
            ci95_high: value + Z_95 * std_error,
        }
    }

    /// Whether `truth` lies in the 95% interval.
    pub fn covers(&self, truth: f64) -> bool {
        self.ci95_low <= truth && truth <= self.ci95_high
    }
}

/// The Horvitz–Thompson total of `ys` over steps traced with probabilities `pis`.
pub fn total(ys: &[f64], pis: &[f64]) -> Estimate {
    let (mut value, mut variance) = (0.0, 0.0);
    for (&y, &pi) in ys.iter().zip(pis) {
        value += y / pi;
        variance += (1.0 - pi) * y * y / (pi * pi);
    }
    Estimate::new(value, variance)
}

/// The Horvitz–Thompson count of events (requests that failed, say) among units traced with
/// probabilities `pis`. Where no traced unit had the event, the normal interval would be
/// [0, 0] whatever π; its upper end is instead the most events X for which tracing none of them
/// still had a 5% chance, (1 − π)^X = 0.05 with π the lowest probability among the traced
/// units (the rule of three: about 3/π for small π; 0 for a census).
pub fn event_count(events: &[bool], pis: &[f64]) -> Estimate {
    if events.iter().any(|&e| e) {
        let ys: Vec<f64> = events.iter().map(|&e| f64::from(u8::from(e))).collect();
        return total(&ys, pis);
    }
    let lowest = pis.iter().copied().fold(1.0f64, f64::min);
    let ci95_high = if lowest >= 1.0 {
        0.0
    } else {
        0.05f64.ln() / (1.0 - lowest).ln()
    };
    Estimate {
        value: 0.0,
        std_error: 0.0,
        ci95_low: 0.0,
        ci95_high,
    }
}

/// The estimated number of steps in the population.
pub fn count(pis: &[f64]) -> Estimate {
    total(&vec![1.0; pis.len()], pis)
}

/// The Hájek (ratio) estimate of the mean of `ys`.
pub fn mean(ys: &[f64], pis: &[f64]) -> Estimate {
    ratio(ys, &vec![1.0; ys.len()], pis)
}

/// The ratio of two population totals, T̂(ys) / T̂(xs) (the mean when every x is 1), with the
/// linearised variance Σ (1 − π)(y − R x)² / π² / T̂(xs)².
pub fn ratio(ys: &[f64], xs: &[f64], pis: &[f64]) -> Estimate {
    let denominator = xs.iter().zip(pis).map(|(x, pi)| x / pi).sum::<f64>();
    if denominator == 0.0 {
        return Estimate::new(f64::NAN, f64::NAN);
    }
    let value = ys.iter().zip(pis).map(|(y, pi)| y / pi).sum::<f64>() / denominator;
    let variance = ys
        .iter()
        .zip(xs)
        .zip(pis)
        .map(|((y, x), pi)| (1.0 - pi) * (y - value * x).powi(2) / (pi * pi))
        .sum::<f64>()
        / (denominator * denominator);
    Estimate::new(value, variance)
}

/// Percentiles (`qs` in [0, 1]) of `ys` with each step weighing 1/π.
pub fn percentiles(ys: &[f64], pis: &[f64], qs: &[f64]) -> Vec<f64> {
    let mut weighted: Vec<(f64, f64)> = ys.iter().zip(pis).map(|(&y, &pi)| (y, 1.0 / pi)).collect();
    weighted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    qs.iter()
        .map(|&q| {
            let target = q * total;
            let mut seen = 0.0;
            for &(y, w) in &weighted {
                seen += w;
                if seen >= target {
                    return y;
                }
            }
            weighted.last().map_or(f64::NAN, |(y, _)| *y)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;

    #[test]
    fn an_event_never_traced_still_has_an_upper_bound() {
        // None of 10 units traced at 0.5 failed: up to ln 0.05 / ln 0.5 ≈ 4.32 failures could
        // have gone unseen with 5% chance.
        let e = event_count(&[false; 10], &[0.5; 10]);
        assert_eq!((e.value, e.ci95_low), (0.0, 0.0));
        assert!((e.ci95_high - 4.3219).abs() < 1e-3, "{e:?}");
        // Rule of three for small rates; a census has none.
        let small = event_count(&[false; 3], &[0.01, 0.5, 1.0]);
        assert!((small.ci95_high - 298.07).abs() < 0.1, "{small:?}");
        assert_eq!(event_count(&[false; 4], &[1.0; 4]).ci95_high, 0.0);
        // With an event traced it is the Horvitz–Thompson total.
        assert_eq!(
            event_count(&[true, false], &[0.5, 0.5]),
            total(&[1.0, 0.0], &[0.5, 0.5])
        );
    }

    #[test]
    fn a_census_is_exact() {
        let ys = [1.0, 2.0, 6.0];
        let pis = [1.0; 3];
        assert_eq!(total(&ys, &pis), Estimate::new(9.0, 0.0));
        assert_eq!(mean(&ys, &pis).value, 3.0);
        assert_eq!(count(&pis).value, 3.0);
        assert_eq!(percentiles(&ys, &pis, &[0.0, 0.5, 1.0]), [1.0, 2.0, 6.0]);
    }

    #[test]
    fn weights_undo_unequal_sampling() {
        // Value 10 sampled at π = 1, value 0 at π = 0.1: ten zeros stand behind each traced one.
        let ys = [10.0, 0.0];
        let pis = [1.0, 0.1];
        assert_eq!(count(&pis).value, 11.0);
        assert!((mean(&ys, &pis).value - 10.0 / 11.0).abs() < 1e-12);
        assert_eq!(percentiles(&ys, &pis, &[0.5]), [0.0]);
    }

    /// Simulated Poisson samples of a fixed population with varying π: the intervals cover the
    /// true total and mean about 95% of the time.
    #[test]
    fn intervals_cover_the_truth_at_about_their_level() {
        let mut rng = SplitMix64::new(7);
        let population: Vec<(f64, f64)> = (0..4000)
            .map(|i| {
                let y = if i % 7 == 0 { 5.0 } else { (i % 3) as f64 };
                let pi = if y >= 5.0 { 0.5 } else { 0.05 };
                (y, pi)
            })
            .collect();
        let true_total: f64 = population.iter().map(|p| p.0).sum();
        let true_mean = true_total / population.len() as f64;
        let (mut covered_total, mut covered_mean) = (0, 0);
        let rounds = 400;
        for _ in 0..rounds {
            let (ys, pis): (Vec<f64>, Vec<f64>) = population
                .iter()
                .filter(|(_, pi)| rng.next_f64() < *pi)
                .copied()
                .unzip();
            covered_total += usize::from(total(&ys, &pis).covers(true_total));
            covered_mean += usize::from(mean(&ys, &pis).covers(true_mean));
        }
        for covered in [covered_total, covered_mean] {
            assert!((360..=396).contains(&covered), "{covered} of {rounds}");
        }
    }
}
