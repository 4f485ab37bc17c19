//! A deterministic [`ModelRunner`] without a model, which honestly goes through the paged KV cache.
//!
//! For every token it computes, [`DeterministicRunner`] writes `(position, token)` into its own
//! paged KV store at the slot the block table names. For every row of logits it reads the whole
//! context back through the block table and hashes it: the most likely next token is that hash
//! modulo the vocabulary. A slot that was never written or holds another position is an
//! `InvalidBatch` error; a wrong but plausible block (a prefix-cache hit on the wrong blocks, a
//! stale block after a broken preemption) changes the hash and so the output. Entries are processed
//! one after another, so a request reading K/V that another entry writes later in the same batch is
//! caught too. [`reference_next_token`] computes the same token straight from the token sequence,
//! and [`reference_greedy_output`] a whole greedy generation, for tests and benchmarks to compare.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::model_runner::{BatchLimits, Logits, ModelBatch, ModelRunner, ModelRunnerError};
use crate::engine::sampling_params::SamplingParams;
use crate::splitmix::{GOLDEN_GAMMA, finalize as mix64};

/// Height of the most likely token's logit above the others' (which lie in [0, 2)).
const TARGET_LOGIT_BOOST: f32 = 3.0;

/// What one slot of the paged store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KvSlot {
    position: u32,
    token: u32,
}

/// Counters a test can keep after the runner is boxed into the engine.
#[derive(Debug, Default)]
pub struct RunnerCounters {
    pub forward_calls: AtomicU64,
    /// Tokens written to the KV store (what prefix caching saves).
    pub tokens_computed: AtomicU64,
    pub logits_rows: AtomicU64,
}

/// The deterministic test model runner.
#[derive(Debug)]
pub struct DeterministicRunner {
    num_blocks: usize,
    block_size: usize,
    vocab_size: usize,
    max_model_len: usize,
    seed: u64,
    slots: Vec<Option<KvSlot>>,
    step_delay: Option<Duration>,
    counters: Arc<RunnerCounters>,
}

impl DeterministicRunner {
    /// A runner whose KV store has `num_blocks` blocks of `block_size` slots (use the engine's
    /// `num_kv_blocks` and `block_size`).
    pub fn new(
        num_blocks: usize,
        block_size: usize,
        vocab_size: usize,
        max_model_len: usize,
    ) -> Self {
        Self {
            num_blocks,
            block_size,
            vocab_size,
            max_model_len,
            seed: 0,
            slots: vec![None; num_blocks * block_size],
            step_delay: None,
            counters: Arc::default(),
        }
    }

    /// Changes the "model weights": another seed gives other tokens.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sleeps this long in every forward pass (to make a step take time in API tests).
    pub fn with_step_delay(mut self, delay: Duration) -> Self {
        self.step_delay = Some(delay);
        self
    }

    pub fn counters(&self) -> Arc<RunnerCounters> {
        Arc::clone(&self.counters)
    }

    fn slot_index(&self, block_table: &[u32], position: usize) -> Result<usize, String> {
        let block = *block_table.get(position / self.block_size).ok_or_else(|| {
            format!(
                "position {position} is beyond the block table ({} blocks)",
                block_table.len()
            )
        })?;
        if block as usize >= self.num_blocks {
            return Err(format!(
                "block id {block} is outside the pool ({} blocks)",
                self.num_blocks
            ));
        }
        Ok(block as usize * self.block_size + position % self.block_size)
    }
}

impl ModelRunner for DeterministicRunner {
    fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_model_len: self.max_model_len,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            vocab_size: self.vocab_size,
        }
    }

    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError> {
        if let Some(delay) = self.step_delay {
            std::thread::sleep(delay);
        }
        self.counters.forward_calls.fetch_add(1, Ordering::Relaxed);
        let mut logits = Logits {
            vocab_size: self.vocab_size,
            data: Vec::with_capacity(batch.num_logits_rows() * self.vocab_size),
        };
        for entry in &batch.entries {
            let invalid = |what: String| {
                ModelRunnerError::InvalidBatch(format!("request {}: {what}", entry.request_id))
            };
            let end = entry.start_position + entry.token_ids.len();
            if entry.token_ids.is_empty() {
                return Err(invalid("no tokens to compute".into()));
            }
            if end > self.max_model_len {
                return Err(invalid(format!(
                    "{end} tokens exceed max_model_len {}",
                    self.max_model_len
                )));
            }
            for (offset, &token) in entry.token_ids.iter().enumerate() {
                let position = entry.start_position + offset;
                let slot = self
                    .slot_index(entry.block_table, position)
                    .map_err(invalid)?;
                self.slots[slot] = Some(KvSlot {
                    position: position as u32,
                    token,
                });
            }
            self.counters
                .tokens_computed
                .fetch_add(entry.token_ids.len() as u64, Ordering::Relaxed);
            let rows = entry.num_logits_rows();
            if rows == 0 {
                continue;
            }
            // One row per context ending at each of the entry's last `rows` positions.
            let first_row_position = end - rows;
            let mut hasher = ContextHasher::new(self.seed);
            for position in 0..end {
                let slot = self
                    .slot_index(entry.block_table, position)
                    .map_err(invalid)?;
                match self.slots[slot] {
                    Some(kv) if kv.position as usize == position => hasher.push(kv.token),
                    Some(kv) => {
                        return Err(invalid(format!(
                            "position {position} reads a slot holding position {}",
                            kv.position
                        )));
                    }
                    None => {
                        return Err(invalid(format!(
                            "position {position} reads a slot never written"
                        )));
                    }
                }
                if position >= first_row_position {
                    push_logits_row(&mut logits.data, hasher.finish(), self.vocab_size);
                    self.counters.logits_rows.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(logits)
    }
}

/// Hash of a context, token by token.
struct ContextHasher(u64);

impl ContextHasher {
    fn new(seed: u64) -> Self {
        Self(mix64(seed ^ 0xD1B5_4A32_D192_ED03))
    }

    fn push(&mut self, token: u32) {
        self.0 = mix64(self.0 ^ u64::from(token));
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

fn target_token(context_hash: u64, vocab_size: usize) -> u32 {
    (context_hash % vocab_size as u64) as u32
}

fn push_logits_row(data: &mut Vec<f32>, context_hash: u64, vocab_size: usize) {
    let target = target_token(context_hash, vocab_size) as usize;
    data.extend((0..vocab_size).map(|token| {
        let noise = (mix64(context_hash ^ (token as u64 + 1).wrapping_mul(GOLDEN_GAMMA)) >> 40)
            as f32
            / (1u64 << 23) as f32;
        if token == target {
            noise + TARGET_LOGIT_BOOST
        } else {
            noise
        }
    }));
}

/// The token a runner with `seed` and `vocab_size` makes most likely after `context`.
pub fn reference_next_token(seed: u64, vocab_size: usize, context: &[u32]) -> u32 {
    let mut hasher = ContextHasher::new(seed);
    for &token in context {
        hasher.push(token);
    }
    target_token(hasher.finish(), vocab_size)
}

/// The logits row the runner produces after `context`.
pub fn reference_logits(seed: u64, vocab_size: usize, context: &[u32]) -> Vec<f32> {
    let mut hasher = ContextHasher::new(seed);
    for &token in context {
        hasher.push(token);
    }
    let mut row = Vec::with_capacity(vocab_size);
    push_logits_row(&mut row, hasher.finish(), vocab_size);
    row
}

/// The greedy output the engine must produce for `prompt` with this runner, applying the engine's
/// stop rules (stop/eos tokens, `max_tokens`, and `max_request_len` for prompt + output).
pub fn reference_greedy_output(
    seed: u64,
    vocab_size: usize,
    prompt: &[u32],
    params: &SamplingParams,
    max_request_len: usize,
) -> Vec<u32> {
    let mut context = prompt.to_vec();
    let mut hasher = ContextHasher::new(seed);
    for &token in prompt {
        hasher.push(token);
    }
    loop {
        let token = target_token(hasher.finish(), vocab_size);
        context.push(token);
        hasher.push(token);
        let num_output = context.len() - prompt.len();
        let stop = (!params.ignore_eos && params.eos_token_ids.contains(&token))
            || params.stop_token_ids.contains(&token);
        if stop || num_output >= params.max_tokens || context.len() >= max_request_len {
            return context.split_off(prompt.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model_runner::BatchEntry;
    use crate::engine::sampler::argmax;

    #[test]
    fn logits_follow_the_context_read_through_the_block_table() {
        let mut runner = DeterministicRunner::new(4, 2, 50, 64).with_seed(3);
        let prompt = [5, 6, 7];
        let batch = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 1,
                token_ids: &prompt,
                start_position: 0,
                block_table: &[2, 0],
                needs_logits: true,
                all_logits: false,
            }],
        };
        let logits = runner.forward(&batch).unwrap();
        assert_eq!(logits.rows(), 1);
        assert_eq!(logits.row(0), reference_logits(3, 50, &prompt).as_slice());
        let next = reference_next_token(3, 50, &prompt);
        assert_eq!(argmax(logits.row(0)), next);

        // Decode one token on top of the stored prompt.
        let decode = [next];
        let batch = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 1,
                token_ids: &decode,
                start_position: 3,
                block_table: &[2, 0],
                needs_logits: true,
                all_logits: false,
            }],
        };
        let logits = runner.forward(&batch).unwrap();
        assert_eq!(
            argmax(logits.row(0)),
            reference_next_token(3, 50, &[5, 6, 7, next])
        );
        assert_eq!(runner.counters().tokens_computed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn wrong_block_tables_are_detected() {
        let mut runner = DeterministicRunner::new(4, 2, 50, 64);
        let prompt = [1, 2, 3, 4];
        let write = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 1,
                token_ids: &prompt,
                start_position: 0,
                block_table: &[0, 1],
                needs_logits: false,
                all_logits: false,
            }],
        };
        runner.forward(&write).unwrap();
        // Claims 4 computed tokens but points at blocks never written.
        let bad = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 2,
                token_ids: &[9],
                start_position: 4,
                block_table: &[2, 3, 1],
                needs_logits: true,
                all_logits: false,
            }],
        };
        assert!(runner.forward(&bad).is_err());
        // Blocks in the wrong order: positions do not match.
        let swapped = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 2,
                token_ids: &[9],
                start_position: 4,
                block_table: &[1, 0, 2],
                needs_logits: true,
                all_logits: false,
            }],
        };
        assert!(runner.forward(&swapped).is_err());
        let short = ModelBatch {
            entries: vec![BatchEntry {
                request_id: 3,
                token_ids: &[1, 2, 3],
                start_position: 0,
                block_table: &[0],
                needs_logits: true,
                all_logits: false,
            }],
        };
        assert!(runner.forward(&short).is_err());
    }

    #[test]
    fn reference_greedy_applies_the_stop_rules() {
        let prompt = [1, 2, 3];
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(5)
        };
        let out = reference_greedy_output(0, 50, &prompt, &params, 100);
        assert_eq!(out.len(), 5);
        assert_eq!(out[0], reference_next_token(0, 50, &prompt));
        assert_eq!(reference_greedy_output(0, 50, &prompt, &params, 6).len(), 3);
        let stop_at_first = SamplingParams {
            stop_token_ids: vec![out[0]],
            ..params.clone()
        };
        assert_eq!(
            reference_greedy_output(0, 50, &prompt, &stop_at_first, 100),
            vec![out[0]]
        );
    }
}
