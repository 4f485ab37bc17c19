//! Token sampling from one row of logits: logits processors, then greedy, temperature, top-k and
//! top-p.
//!
//! Each request draws from its own [`RequestRng`], so a request's tokens depend only on its
//! logits, its parameters, its own tokens so far and its seed, never on what else shares the
//! batch. Ties and orderings are broken by token id, so results are deterministic. NaN logits
//! are ignored; a `+inf` logit wins outright. The [`Sampler`] keeps scratch buffers so a step
//! allocates nothing.
//!
//! The logits processors run first, on a copy of the row and only for requests that ask for them
//! (as in vLLM, greedy requests included): `min_tokens` masks the EOS and stop tokens; then the
//! repetition penalty (prompt and output tokens: a positive logit is divided by it, a negative one
//! multiplied); then the frequency and presence penalties (output tokens: `logit -= frequency ×
//! count + presence`).

use std::cmp::Ordering;

use super::model_runner::Logits;
use super::request::{Request, RequestRng, TokenLogprobs};
use super::sampling_params::SamplingParams;
use super::scheduler::ScheduledRequest;

/// How many top candidates top-p sorts first; it doubles until their mass reaches `top_p`, so the
/// usual peaked distribution costs a partial selection instead of a full-vocabulary sort.
const TOP_P_INITIAL_CANDIDATES: usize = 64;

/// A request's tokens so far, which the logits processors read.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenHistory<'a> {
    pub prompt: &'a [u32],
    pub output: &'a [u32],
}

/// Samples tokens; reuse one per engine.
#[derive(Debug, Default, Clone)]
pub struct Sampler {
    candidates: Vec<Candidate>,
    /// The processed copy of a row.
    processed: Vec<f32>,
    /// Per-token output counts (all zero between calls).
    counts: Vec<u32>,
    /// Token ids, for picking the top log-probabilities.
    order: Vec<u32>,
    /// Which tokens `allowed_token_ids` keeps, per vocabulary entry.
    allowed: Vec<bool>,
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

    /// Samples the step's tokens: one per scheduled request that computes its last known token
    /// (`None` for a prefill chunk that stops short of it), in `scheduled` order, from that
    /// request's last logits row; records the log-probabilities of requests that ask for them.
    /// A request with `prompt_logits` has a row per computed position: each one before the
    /// prompt's last gives the next prompt token's log-probabilities (`prompt_logprobs`).
    /// `running` is the running queue `scheduled` indexes into.
    pub fn sample_step(
        &mut self,
        logits: &Logits,
        scheduled: &[ScheduledRequest],
        running: &mut [Request],
    ) -> Vec<Option<u32>> {
        let mut next_row = 0;
        let mut sampled = Vec::with_capacity(scheduled.len());
        for s in scheduled {
            if s.prompt_logits {
                let request = &mut running[s.running_index];
                let top = request.params.prompt_logprobs.unwrap_or(0);
                for offset in 0..s.num_tokens {
                    let next = s.start_position + offset + 1;
                    if next < request.num_prompt_tokens {
                        let token = request.token_ids[next];
                        let computed = self.logprobs(logits.row(next_row + offset), token, top);
                        request.record_prompt_logprobs(next, computed);
                    }
                }
                next_row += s.num_tokens - 1;
            }
            if !s.needs_logits {
                next_row += usize::from(s.prompt_logits);
                sampled.push(None);
                continue;
            }
            let row = next_row;
            next_row += 1;
            let request = &mut running[s.running_index];
            let history = TokenHistory {
                prompt: &request.token_ids[..request.num_prompt_tokens],
                output: &request.token_ids[request.num_prompt_tokens..],
            };
            let token = self.sample(logits.row(row), &request.params, history, &mut request.rng);
            if let Some(top) = request.params.logprobs {
                request.sampled_logprobs = Some(self.logprobs(logits.row(row), token, top));
            }
            sampled.push(Some(token));
        }
        sampled
    }

    /// Picks the next token from `logits` (one row, one entry per vocabulary token) for a request
    /// whose tokens so far are `history`.
    pub fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        history: TokenHistory<'_>,
        rng: &mut RequestRng,
    ) -> u32 {
        if params.processes_logits(history.output.len()) {
            let mut processed = std::mem::take(&mut self.processed);
            processed.clear();
            processed.extend_from_slice(logits);
            self.process(&mut processed, params, history);
            let token = sample_row(&mut self.candidates, &processed, params, rng);
            self.processed = processed;
            token
        } else {
            sample_row(&mut self.candidates, logits, params, rng)
        }
    }

    /// Applies `allowed_token_ids`, `logit_bias`, `bad_words`, `min_tokens` and the penalties to
    /// `logits` in place.
    fn process(&mut self, logits: &mut [f32], params: &SamplingParams, history: TokenHistory<'_>) {
        let vocab = logits.len();
        if !params.allowed_token_ids.is_empty() {
            let mut allowed = std::mem::take(&mut self.allowed);
            allowed.clear();
            allowed.resize(vocab, false);
            for &token in &params.allowed_token_ids {
                if let Some(slot) = allowed.get_mut(token as usize) {
                    *slot = true;
                }
            }
            for (x, &keep) in logits.iter_mut().zip(&allowed) {
                if !keep {
                    *x = f32::NEG_INFINITY;
                }
            }
            self.allowed = allowed;
        }
        for &(token, bias) in &params.logit_bias {
            if let Some(x) = logits.get_mut(token as usize) {
                *x += bias;
            }
        }
        for word in &params.bad_words_token_ids {
            if let Some((&last, rest)) = word.split_last()
                && history.output.ends_with(rest)
                && let Some(x) = logits.get_mut(last as usize)
            {
                *x = f32::NEG_INFINITY;
            }
        }
        if history.output.len() < params.min_tokens {
            let eos = params.eos_token_ids.iter().filter(|_| !params.ignore_eos);
            for &token in eos.chain(&params.stop_token_ids) {
                if let Some(x) = logits.get_mut(token as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        let repetition = params.repetition_penalty;
        let (frequency, presence) = (params.frequency_penalty, params.presence_penalty);
        if repetition == 1.0 && frequency == 0.0 && presence == 0.0 {
            return;
        }
        self.counts.resize(vocab, 0);
        for &token in history.output {
            if let Some(count) = self.counts.get_mut(token as usize) {
                *count += 1;
            }
        }
        if repetition != 1.0 {
            // Each distinct prompt or output token once: the output's are marked by their counts,
            // the prompt's by a mark removed below.
            const PROMPT_MARK: u32 = 1 << 31;
            for &token in history.prompt.iter().chain(history.output) {
                let Some(count) = self.counts.get_mut(token as usize) else {
                    continue;
                };
                if *count & PROMPT_MARK != 0 {
                    continue;
                }
                *count |= PROMPT_MARK;
                let x = &mut logits[token as usize];
                *x = if *x > 0.0 {
                    *x / repetition
                } else {
                    *x * repetition
                };
            }
            for &token in history.prompt.iter().chain(history.output) {
                if let Some(count) = self.counts.get_mut(token as usize) {
                    *count &= !PROMPT_MARK;
                }
            }
        }
        for &token in history.output {
            let Some(count) = self.counts.get_mut(token as usize) else {
                continue;
            };
            if *count > 0 {
                logits[token as usize] -= frequency * *count as f32 + presence;
                *count = 0;
            }
        }
    }
}

/// Samples from one (processed) row.
fn sample_row(
    candidates: &mut Vec<Candidate>,
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut RequestRng,
) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    if let Some(token) = logits.iter().position(|&x| x == f32::INFINITY) {
        return token as u32;
    }
    let inv_temperature = 1.0 / params.temperature;
    candidates.clear();
    candidates.extend(
        logits
            .iter()
            .enumerate()
            .filter(|(_, x)| x.is_finite())
            .map(|(token, &x)| Candidate {
                token: token as u32,
                weight: x * inv_temperature,
            }),
    );
    if candidates.is_empty() {
        return argmax(logits);
    }
    if params.min_p > 0.0 {
        // p_i / p_max = exp(w_i - w_max): keep the tokens at least min_p as likely as the best.
        let best = candidates
            .iter()
            .map(|c| c.weight)
            .fold(f32::NEG_INFINITY, f32::max);
        let floor = best + params.min_p.ln();
        candidates.retain(|c| c.weight >= floor);
    }
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

impl Sampler {
    /// The log-probabilities (log-softmax of the raw `logits`, in f64) of `token` and of the
    /// `top` most likely tokens (ties by token id). NaN logits count as impossible (−inf).
    pub fn logprobs(&mut self, logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
        token_logprobs_with(&mut self.order, logits, token, top)
    }
}

/// [`Sampler::logprobs`] without a sampler (allocates its scratch).
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    token_logprobs_with(&mut Vec::new(), logits, token, top)
}

fn token_logprobs_with(
    order: &mut Vec<u32>,
    logits: &[f32],
    token: u32,
    top: usize,
) -> TokenLogprobs {
    let finite_or_neg_inf = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits
        .iter()
        .map(|&x| finite_or_neg_inf(x))
        .fold(f32::NEG_INFINITY, f32::max);
    let log_sum_exp = if max.is_infinite() {
        f64::from(max)
    } else {
        let sum: f64 = logits
            .iter()
            .map(|&x| (f64::from(finite_or_neg_inf(x)) - f64::from(max)).exp())
            .sum();
        f64::from(max) + sum.ln()
    };
    let logprob = |x: f32| -> f32 {
        let x = finite_or_neg_inf(x);
        if x == f32::INFINITY {
            // +inf logits share the mass; none exist but these in practice.
            return 0.0;
        }
        (f64::from(x) - log_sum_exp) as f32
    };
    let chosen = logits
        .get(token as usize)
        .copied()
        .map_or(f32::NEG_INFINITY, finite_or_neg_inf);
    let rank = 1 + logits
        .iter()
        .filter(|&&x| finite_or_neg_inf(x) > chosen)
        .count();
    let mut top_tokens: Vec<(u32, f32)> = Vec::new();
    if top > 0 && !logits.is_empty() {
        order.clear();
        order.extend(0..logits.len() as u32);
        let by_logit_desc = |a: &u32, b: &u32| {
            let (x, y) = (
                finite_or_neg_inf(logits[*a as usize]),
                finite_or_neg_inf(logits[*b as usize]),
            );
            y.total_cmp(&x).then(a.cmp(b))
        };
        let k = top.min(order.len());
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit_desc);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit_desc);
        top_tokens = order
            .iter()
            .map(|&t| (t, logprob(logits[t as usize])))
            .collect();
    }
    TokenLogprobs {
        token_id: token,
        logprob: logprob(chosen),
        rank,
        top: top_tokens,
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
            counts[sampler.sample(logits, p, TokenHistory::default(), &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_ties_and_nan_skipped() {
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(0);
        let greedy = SamplingParams::greedy(1);
        assert_eq!(
            sampler.sample(
                &[0.1, 3.0, 3.0, -1.0],
                &greedy,
                TokenHistory::default(),
                &mut rng
            ),
            1
        );
        assert_eq!(
            sampler.sample(
                &[f32::NAN, 0.5, f32::NAN],
                &greedy,
                TokenHistory::default(),
                &mut rng
            ),
            1
        );
        assert_eq!(
            sampler.sample(&[f32::NAN], &greedy, TokenHistory::default(), &mut rng),
            0
        );
        assert_eq!(
            sampler.sample(
                &[f32::NEG_INFINITY, -5.0],
                &greedy,
                TokenHistory::default(),
                &mut rng
            ),
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
                TokenHistory::default(),
                &mut rng
            ),
            1
        );
        assert_eq!(
            sampler.sample(
                &[f32::NAN, f32::NAN],
                &params(1.0, None, 1.0),
                TokenHistory::default(),
                &mut rng
            ),
            0
        );
    }

    fn history<'a>(prompt: &'a [u32], output: &'a [u32]) -> TokenHistory<'a> {
        TokenHistory { prompt, output }
    }

    /// The processed row (and the scratch counts are left clean).
    fn processed(logits: &[f32], p: &SamplingParams, h: TokenHistory<'_>) -> Vec<f32> {
        let mut sampler = Sampler::new();
        let mut row = logits.to_vec();
        sampler.process(&mut row, p, h);
        assert!(
            sampler.counts.iter().all(|&c| c == 0),
            "scratch counts left dirty"
        );
        row
    }

    #[test]
    fn penalties_follow_openai_and_vllm() {
        let logits = [1.0f32, -1.0, 2.0, 0.5, 3.0];
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..SamplingParams::greedy(8)
        };
        // Output [4, 4, 1]: token 4 twice, token 1 once; the prompt does not count.
        let row = processed(&logits, &p, history(&[0, 2], &[4, 4, 1]));
        assert_eq!(row, vec![1.0, -1.0 - 0.25 - 0.5, 2.0, 0.5, 3.0 - 0.5 - 0.5]);

        // Repetition: prompt and output tokens, once each however often they occur.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy(8)
        };
        let row = processed(&logits, &p, history(&[0, 1, 0], &[4, 4]));
        assert_eq!(row, vec![0.5, -2.0, 2.0, 0.5, 1.5]);

        // Both, in vLLM's order: repetition first.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 1.0,
            ..SamplingParams::greedy(8)
        };
        let row = processed(&logits, &p, history(&[], &[4, 4]));
        assert_eq!(row[4], 3.0 / 2.0 - 2.0);

        // Greedy decoding sees the penalised row: 4 loses to 2 after repeating.
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(0);
        let p = SamplingParams {
            frequency_penalty: 0.75,
            ..SamplingParams::greedy(8)
        };
        assert_eq!(sampler.sample(&logits, &p, history(&[], &[]), &mut rng), 4);
        assert_eq!(sampler.sample(&logits, &p, history(&[], &[4]), &mut rng), 4);
        assert_eq!(
            sampler.sample(&logits, &p, history(&[], &[4, 4]), &mut rng),
            2
        );
        // Out-of-vocabulary ids in the history are ignored, not a panic.
        assert_eq!(
            sampler.sample(&logits, &p, history(&[99], &[77]), &mut rng),
            4
        );
    }

    #[test]
    fn min_tokens_holds_back_eos_and_stop_tokens() {
        let logits = [0.0f32, 5.0, 4.0, 3.0];
        let p = SamplingParams {
            min_tokens: 2,
            eos_token_ids: vec![1],
            stop_token_ids: vec![2],
            ..SamplingParams::greedy(8)
        };
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(0);
        assert_eq!(sampler.sample(&logits, &p, history(&[7], &[]), &mut rng), 3);
        assert_eq!(
            sampler.sample(&logits, &p, history(&[7], &[3]), &mut rng),
            3
        );
        assert_eq!(
            sampler.sample(&logits, &p, history(&[7], &[3, 3]), &mut rng),
            1
        );
        // With ignore_eos the EOS token is an ordinary token.
        let p = SamplingParams {
            ignore_eos: true,
            ..p
        };
        assert_eq!(sampler.sample(&logits, &p, history(&[7], &[]), &mut rng), 1);
        assert!(!SamplingParams::greedy(4).processes_logits(0));
    }

    #[test]
    fn penalty_ranges_are_checked() {
        for (p, name) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..SamplingParams::greedy(4)
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..SamplingParams::greedy(4)
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..SamplingParams::greedy(4)
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    min_tokens: 5,
                    ..SamplingParams::greedy(4)
                },
                "min_tokens",
            ),
        ] {
            let err = p.validate().unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn logprobs_are_the_raw_log_softmax() {
        let logits = [1.0f32, 3.0, f32::NAN, 3.0, -2.0];
        let lse = (1f64.exp() + 2.0 * 3f64.exp() + (-2f64).exp()).ln();
        let lp = token_logprobs(&logits, 0, 3);
        assert!((f64::from(lp.logprob) - (1.0 - lse)).abs() < 1e-6, "{lp:?}");
        assert_eq!(lp.rank, 3);
        // Ties by token id; the NaN is never a top token.
        let ids: Vec<u32> = lp.top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, vec![1, 3, 0]);
        assert!((f64::from(lp.top[0].1) - (3.0 - lse)).abs() < 1e-6);
        let total: f64 = logits
            .iter()
            .enumerate()
            .map(|(t, _)| f64::from(token_logprobs(&logits, t as u32, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        // More alternatives asked for than the vocabulary holds: all of them, in order.
        let all = token_logprobs(&logits, 4, 20);
        assert_eq!(all.top.len(), 5);
        assert_eq!(all.rank, 4);
        assert_eq!(all.top[4].1, f32::NEG_INFINITY);
        assert!(token_logprobs(&logits, 1, 0).top.is_empty());
    }

    #[test]
    fn logit_bias_allowed_tokens_and_min_p_shape_the_choice() {
        let logits = [1.0f32, 3.0, 2.0, 0.5, 2.9];
        let greedy = SamplingParams::greedy(4);
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(1);
        let none = history(&[], &[]);
        // +100 all but forces a token; -100 all but bans the best one.
        let forced = SamplingParams {
            logit_bias: vec![(3, 100.0)],
            ..greedy.clone()
        };
        assert_eq!(sampler.sample(&logits, &forced, none, &mut rng), 3);
        let banned = SamplingParams {
            logit_bias: vec![(1, -100.0)],
            ..greedy.clone()
        };
        assert_eq!(sampler.sample(&logits, &banned, none, &mut rng), 4);
        // Only the allowed tokens are ever drawn, whatever the temperature.
        let allowed = SamplingParams {
            allowed_token_ids: vec![0, 3],
            ..params(1.0, None, 1.0)
        };
        for _ in 0..200 {
            let token = sampler.sample(&logits, &allowed, none, &mut rng);
            assert!(token == 0 || token == 3, "{token}");
        }
        // min_p 0.5 keeps tokens at least half as likely as the best: e^(x - 3) >= 0.5 keeps
        // tokens 1 (3.0) and 4 (2.9) only; min_p 1 is greedy.
        let shrunk = SamplingParams {
            min_p: 0.5,
            ..params(1.0, None, 1.0)
        };
        let counts = histogram(&logits, &shrunk, 4_000, 9);
        assert_eq!((counts[0], counts[2], counts[3]), (0, 0, 0), "{counts:?}");
        assert!(counts[1] > 1_000 && counts[4] > 1_000, "{counts:?}");
        let strict = SamplingParams {
            min_p: 1.0,
            ..params(1.0, None, 1.0)
        };
        assert_eq!(histogram(&logits, &strict, 500, 3)[1], 500);
        // Out of range values are refused at admission.
        for bad in [
            SamplingParams {
                min_p: 1.5,
                ..greedy.clone()
            },
            SamplingParams {
                logit_bias: vec![(0, 101.0)],
                ..greedy.clone()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    #[test]
    fn bad_words_ban_a_single_token_always_and_a_word_s_last_token_after_its_prefix() {
        let logits = [1.0f32, 3.0, 2.0, 0.5, 2.9];
        let mut sampler = Sampler::new();
        let mut rng = RequestRng::new(1);
        let words = SamplingParams {
            // Token 1 alone; the word [2, 4]: token 4 only right after a 2.
            bad_words_token_ids: vec![vec![1], vec![2, 4]],
            ..SamplingParams::greedy(4)
        };
        assert_eq!(
            sampler.sample(&logits, &words, history(&[], &[]), &mut rng),
            4
        );
        assert_eq!(
            sampler.sample(&logits, &words, history(&[], &[0, 2]), &mut rng),
            2
        );
        assert_eq!(
            sampler.sample(&logits, &words, history(&[2], &[3]), &mut rng),
            4
        );
        let empty = SamplingParams {
            bad_words_token_ids: vec![vec![]],
            ..SamplingParams::greedy(4)
        };
        assert!(empty.validate().is_err());
    }
}
