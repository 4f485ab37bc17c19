//! Tokens per step, as a histogram with vLLM's buckets (`vllm:iteration_tokens_total`).
//!
//! The engine thread observes each non-empty step's scheduled tokens (prefill chunks and decode
//! tokens together, what vLLM calls an iteration's prompt plus generation tokens) into fixed
//! buckets; the counts travel in `EngineStats`, which is `Copy`, so the `/metrics` scrape reads
//! them without touching the engine thread.

/// vLLM's bucket upper bounds for `vllm:iteration_tokens_total` (`+Inf` is implied).
pub const STEP_TOKEN_BUCKETS: [f64; 13] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

/// Per-bucket (not cumulative) counts of steps by their number of tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTokenHistogram {
    /// `buckets[i]`: steps with `STEP_TOKEN_BUCKETS[i-1] < tokens <= STEP_TOKEN_BUCKETS[i]`;
    /// the last entry counts steps above the largest bound.
    pub buckets: [u64; STEP_TOKEN_BUCKETS.len() + 1],
    /// Steps observed.
    pub count: u64,
    /// Tokens over all observed steps.
    pub sum: u64,
}

impl StepTokenHistogram {
    /// Counts one step that scheduled `tokens` tokens.
    pub fn observe(&mut self, tokens: usize) {
        let index = STEP_TOKEN_BUCKETS
            .iter()
            .position(|&bound| tokens as f64 <= bound)
            .unwrap_or(STEP_TOKEN_BUCKETS.len());
        self.buckets[index] += 1;
        self.count += 1;
        self.sum += tokens as u64;
    }

    /// `(upper bound, count)` per bucket, `+Inf` last, for an encoder that accumulates.
    pub fn bucket_counts(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        STEP_TOKEN_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_land_in_the_bucket_whose_bound_they_do_not_pass() {
        let mut h = StepTokenHistogram::default();
        for tokens in [1, 2, 8, 9, 16384, 16385] {
            h.observe(tokens);
        }
        let counts: Vec<(f64, u64)> = h.bucket_counts().filter(|(_, c)| *c > 0).collect();
        assert_eq!(
            counts,
            [
                (1.0, 1),
                (8.0, 2),
                (16.0, 1),
                (16384.0, 1),
                (f64::INFINITY, 1)
            ]
        );
        assert_eq!((h.count, h.sum), (6, 1 + 2 + 8 + 9 + 16384 + 16385));
    }
}
