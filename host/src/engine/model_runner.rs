//! The boundary between the engine and a model backend.
//!
//! Each step the engine hands the runner one flattened batch: for every scheduled request, the
//! tokens to compute this step (a prefill chunk, a whole prompt, or a single decode token), the
//! position of the first of them, and the request's block table (KV block ids from the KV cache
//! manager, in order). The runner owns the KV tensors themselves: `num_blocks` blocks of
//! `block_size` token slots per layer, indexed by the block ids the engine passes, so token at
//! position `p` of a request lives in block `block_table[p / block_size]`, slot `p % block_size`.
//! Blocks that came from the prefix cache already hold the right K/V and must not be rewritten.
//! The runner returns one row of logits per request whose `needs_logits` is set (a row per token
//! for one whose `all_logits` is set), in batch order.

use thiserror::Error;

/// One request's share of a step's batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry<'a> {
    /// Engine request id (for diagnostics; the runner keeps no per-request state).
    pub request_id: u64,
    /// Token ids to compute this step, at positions `start_position ..`.
    pub token_ids: &'a [u32],
    /// Number of tokens of this request whose K/V are already in its blocks.
    pub start_position: usize,
    /// KV block ids of the request, covering at least `start_position + token_ids.len()` slots.
    pub block_table: &'a [u32],
    /// Whether this chunk ends at the last known token, so the engine samples from its logits.
    pub needs_logits: bool,
    /// Whether the runner returns a logits row for every token of this chunk (in order; the
    /// last one is then also the sampling row when `needs_logits`), for `prompt_logprobs`.
    pub all_logits: bool,
}

impl BatchEntry<'_> {
    /// Logits rows this entry gets: every token's with `all_logits`, else the last token's
    /// when `needs_logits`, else none.
    pub fn num_logits_rows(&self) -> usize {
        if self.all_logits {
            self.token_ids.len()
        } else {
            usize::from(self.needs_logits)
        }
    }
}

/// The flattened batch of one step.
#[derive(Debug, Clone, Default)]
pub struct ModelBatch<'a> {
    pub entries: Vec<BatchEntry<'a>>,
}

impl ModelBatch<'_> {
    /// Number of logits rows the runner must return.
    pub fn num_logits_rows(&self) -> usize {
        self.entries.iter().map(BatchEntry::num_logits_rows).sum()
    }

    /// Checks every entry against what a runner holds (the check the CPU and CUDA runners
    /// share): each entry has tokens; its last position fits `max_model_len` and the KV cache's
    /// capacity (`num_blocks * block_size` slots); its block table covers its positions with
    /// block ids below `num_blocks`; its token ids are below `vocab_size`.
    pub fn validate(&self, limits: &BatchLimits) -> Result<(), ModelRunnerError> {
        let BatchLimits {
            max_model_len,
            block_size: bs,
            num_blocks,
            vocab_size: vocab,
        } = *limits;
        let capacity = bs * num_blocks;
        let max_len = max_model_len.min(capacity);
        for e in &self.entries {
            let invalid = |msg: String| {
                ModelRunnerError::InvalidBatch(format!("request {}: {msg}", e.request_id))
            };
            if e.token_ids.is_empty() {
                return Err(invalid("no tokens to compute".into()));
            }
            let end = e.start_position + e.token_ids.len();
            if end > max_len {
                return Err(invalid(format!(
                    "positions up to {end} exceed max_model_len {max_model_len} (or the KV cache capacity {capacity})"
                )));
            }
            if e.block_table.len() * bs < end {
                return Err(invalid(format!(
                    "block table of {} blocks cannot hold {end} tokens (block size {bs})",
                    e.block_table.len()
                )));
            }
            if let Some(b) = e.block_table[..end.div_ceil(bs)]
                .iter()
                .find(|&&b| b as usize >= num_blocks)
            {
                return Err(invalid(format!(
                    "block id {b} out of range (num_blocks {num_blocks})"
                )));
            }
            if let Some(t) = e.token_ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(invalid(format!(
                    "token id {t} out of range (vocab {vocab})"
                )));
            }
        }
        Ok(())
    }
}

/// The bounds [`ModelBatch::validate`] checks a batch against: the model's and the KV cache's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_model_len: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub vocab_size: usize,
}

/// Logits for the requests that need them: `rows` rows of `vocab_size` floats, row-major.
#[derive(Debug, Clone, Default)]
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab_size).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    /// Checks that a runner returned `rows` rows of the engine's `vocab_size`.
    pub fn check_shape(&self, rows: usize, vocab_size: usize) -> Result<(), ModelRunnerError> {
        if self.vocab_size != vocab_size || self.data.len() != rows * self.vocab_size {
            return Err(ModelRunnerError::Backend(format!(
                "runner returned {} floats of vocab width {}, expected {rows} rows of {vocab_size}",
                self.data.len(),
                self.vocab_size,
            )));
        }
        Ok(())
    }
}

/// Why a forward pass failed.
#[derive(Debug, Error)]
pub enum ModelRunnerError {
    #[error("batch is invalid: {0}")]
    InvalidBatch(String),
    #[error("backend failure: {0}")]
    Backend(String),
}

/// A model backend the engine drives (CPU, CUDA, or the deterministic test runner).
pub trait ModelRunner: Send {
    /// What the runner accepts: the model's vocabulary and length, the KV cache's geometry.
    fn limits(&self) -> BatchLimits;
    /// Vocabulary size (width of each logits row).
    fn vocab_size(&self) -> usize {
        self.limits().vocab_size
    }
    /// Longest sequence (prompt + output) the model accepts.
    fn max_model_len(&self) -> usize {
        self.limits().max_model_len
    }
    /// Runs one batched forward pass; returns one logits row per entry with `needs_logits`.
    fn forward(&mut self, batch: &ModelBatch<'_>) -> Result<Logits, ModelRunnerError>;
}
