//! Token sampling from one row of logits: greedy, temperature, top-k and top-p.
//!
//! Each request draws from its own [`RequestRng`], so a request's tokens depend only on its
//! logits, its parameters and its seed, never on what else shares the batch. Ties and orderings
//! are broken by token id, so results are deterministic. NaN logits are ignored; a `+inf` logit
//! wins outright. The [`Sampler`] keeps scratch buffers so a step allocates nothing.

use std::cmp::Ordering;

use super::request::{RequestRng, SamplingParams};

/// How many top candidates top-p sorts first; it doubles until their mass reaches `top_p`, so the
/// usual peaked distribution costs a partial selection instead of a full-vocabulary sort.
const TOP_P_INITIAL_CANDIDATES: usize = 64;

/// Samples tokens; reuse one per engine.
#[derive(Debug, Default, Clone)]
pub struct Sampler {
    candidates: Vec<Candidate>,
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    token: u32,
    /// Scaled logit, then unnormalised probability.
    weight: f32,
}

/// Higher weight first, then lower token id.
fn by_weight_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.weight.total_cmp(&a.weight).then(a.token.cmp(&b.token))
}

impl Sampler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Picks the next token from `logits` (one row, one entry per vocabulary token).
    pub fn sample(&mut self, logits: &[f32], params: &SamplingParams, rng: &mut RequestRng) -> u32 {
        if params.is_greedy() {
            return argmax(logits);
        }
        if let Some(token) = logits.iter().position(|&x| x == f32::INFINITY) {
            return token as u32;
        }
        let inv_temperature = 1.0 / params.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, x)| x.is_finite())
                .map(|(token, &x)| Candidate {
                    token: token as u32,
                    weight: x * inv_temperature,
                }),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        let candidates = &mut self.candidates;
        if let Some(k) = params.top_k
            && k < candidates.len()
        {
            candidates.select_nth_unstable_by(k - 1, by_weight_desc);
            candidates.truncate(k);
            candidates.sort_unstable_by(by_weight_desc);
        }
        // Softmax numerators, stable against overflow.
        let max = candidates
            .iter()
            .map(|c| c.weight)
            .fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f64;
        for c in candidates.iter_mut() {
            c.weight = (c.weight - max).exp();
            total += f64::from(c.weight);
        }
        let kept = if params.top_p < 1.0 {
            top_p_prefix(candidates, f64::from(params.top_p) * total)
        } else {
            candidates.len()
        };
        let kept = &candidates[..kept];
        let mass: f64 = kept.iter().map(|c| f64::from(c.weight)).sum();
        let mut target = rng.next_f64() * mass;
        for c in kept {
            target -= f64::from(c.weight);
            if target < 0.0 {
                return c.token;
            }
        }
        kept.last().map_or_else(|| argmax(logits), |c| c.token)
    }
}

/// Sorts the top candidates by weight (descending) and returns how many of them are needed to
/// reach `target` mass (at least one).
fn top_p_prefix(candidates: &mut [Candidate], target: f64) -> usize {
    let n = candidates.len();
    let mut k = TOP_P_INITIAL_CANDIDATES.min(n);
    loop {
        if k < n {
            candidates.select_nth_unstable_by(k - 1, by_weight_desc);
        }
        candidates[..k].sort_unstable_by(by_weight_desc);
        let mut cumulative = 0.0f64;
        for (i, c) in candidates[..k].iter().enumerate() {
            cumulative += f64::from(c.weight);
            if cumulative >= target {
                return i + 1;
            }
        }
        if k == n {
            return n;
        }
        k = (k * 2).min(n);
    }
}

/// Index of the largest logit; NaNs are skipped, ties go to the lowest index, 0 if none.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::default()
        }
    }

    fn histogram(logits: &[f32], p: &SamplingParams, draws: usize, seed: u64) -> Vec<usize> {
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(seed);
        let mut counts = vec![0; logits.len()];
        for _ in 0..draws {
            counts[sampler.sample(logits, p, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_ties_and_nan_skipped() {
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(0);
        let greedy = SamplingParams::greedy(1);
        assert_eq!(sampler.sample(&[0.1, 3.0, 3.0, -1.0], &greedy, &mut rng), 1);
        assert_eq!(
            sampler.sample(&[f32::NAN, 0.5, f32::NAN], &greedy, &mut rng),
            1
        );
        assert_eq!(sampler.sample(&[f32::NAN], &greedy, &mut rng), 0);
        assert_eq!(
            sampler.sample(&[f32::NEG_INFINITY, -5.0], &greedy, &mut rng),
            1
        );
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn temperature_follows_softmax() {
        // p = [1/4, 3/4].
        let logits = [0.0, 3f32.ln()];
        let counts = histogram(&logits, &params(1.0, None, 1.0), 8000, 1);
        let share = counts[1] as f64 / 8000.0;
        assert!((share - 0.75).abs() < 0.03, "{share}");
        // A high temperature flattens it.
        let counts = histogram(&logits, &params(100.0, None, 1.0), 8000, 2);
        let share = counts[1] as f64 / 8000.0;
        assert!((share - 0.5).abs() < 0.04, "{share}");
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits: Vec<f32> = (0..200).map(|i| (i % 50) as f32 * 0.01).collect();
        // The four largest logits (0.49) are at 49, 99, 149, 199.
        let counts = histogram(&logits, &params(1.0, Some(4), 1.0), 2000, 3);
        for (token, &count) in counts.iter().enumerate() {
            assert_eq!(
                count > 0,
                [49, 99, 149, 199].contains(&token),
                "token {token}: {count}"
            );
        }
        assert_eq!(
            histogram(&logits, &params(1.0, Some(1), 1.0), 100, 4)[49],
            100
        );

        // One dominant token holds > 90% of the mass: top_p 0.9 keeps only it.
        let mut peaked = vec![0.0f32; 1000];
        peaked[123] = 20.0;
        assert_eq!(
            histogram(&peaked, &params(1.0, None, 0.9), 100, 5)[123],
            100
        );
        // Uniform over 1000 tokens, top_p 0.5 keeps the 500 lowest ids (ties by id), beyond the
        // first partial selection.
        let flat = vec![0.0f32; 1000];
        let counts = histogram(&flat, &params(1.0, None, 0.5), 5000, 6);
        assert!(counts[500..].iter().all(|&c| c == 0));
        assert!(counts[..500].iter().filter(|&&c| c > 0).count() > 450);
    }

    #[test]
    fn same_seed_same_tokens_and_inf_wins() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(0.8, Some(20), 0.95);
        assert_eq!(
            histogram(&logits, &p, 500, 9),
            histogram(&logits, &p, 500, 9)
        );
        assert_ne!(
            histogram(&logits, &p, 500, 9),
            histogram(&logits, &p, 500, 10)
        );
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(0);
        assert_eq!(
            sampler.sample(
                &[0.0, f32::INFINITY, 1.0],
                &params(1.0, None, 1.0),
                &mut rng
            ),
            1
        );
        assert_eq!(
            sampler.sample(&[f32::NAN, f32::NAN], &params(1.0, None, 1.0), &mut rng),
            0
        );
    }
}
