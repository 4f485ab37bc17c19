//! Engine configuration, its validation, per-request admission checks, and the engine's errors.
//!
//! [`EngineConfig`] carries the vLLM-like knobs (`--block-size`, `--num-kv-blocks`,
//! `--max-num-seqs`, `--max-num-batched-tokens`, `--seed`, ...). [`RequestLimits`] is what a request
//! is checked against at admission; the engine handle holds a copy so that it can reject bad
//! requests synchronously, without a round trip to the engine thread.

use thiserror::Error;

use super::sampling_params::SamplingParams;

/// Engine configuration. `Default` gives a small CPU-friendly setup.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Tokens per KV block (default 16).
    pub block_size: usize,
    /// Blocks in the KV pool.
    pub num_kv_blocks: usize,
    /// Most requests in the running queue (and so in one batch).
    pub max_num_seqs: usize,
    /// Most tokens computed in one step, over all requests.
    pub max_num_batched_tokens: usize,
    /// Most prompt positions whose logits one step returns for `prompt_logprobs`, over all
    /// requests: each is a vocabulary-wide row of f32, so this bounds the logits buffer at
    /// `(max_num_seqs + max_prompt_logprobs_tokens) · vocab` floats (the CUDA KV sizing counts
    /// it); a longer prompt's logprobs come in chunks of this many positions.
    pub max_prompt_logprobs_tokens: usize,
    /// Longest prompt + output; `None` takes the model runner's limit. It may not exceed it.
    pub max_model_len: Option<usize>,
    /// Most requests waiting for their first admission (preempted ones do not count); further
    /// requests are refused with [`EngineError::QueueFull`].
    pub max_waiting_requests: usize,
    /// Reuse the KV blocks of identical prefixes.
    pub enable_prefix_caching: bool,
    /// Seeds the random stream of every request without its own seed.
    pub seed: u64,
}

/// [`EngineConfig::max_prompt_logprobs_tokens`]'s default: 256 rows, 128 MB of logits for a
/// 128k vocabulary.
pub const DEFAULT_MAX_PROMPT_LOGPROBS_TOKENS: usize = 256;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_kv_blocks: 1024,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_prompt_logprobs_tokens: DEFAULT_MAX_PROMPT_LOGPROBS_TOKENS,
            max_model_len: None,
            max_waiting_requests: 4096,
            enable_prefix_caching: true,
            seed: 0,
        }
    }
}

impl EngineConfig {
    /// Checks the configuration on its own and against the model runner's `max_model_len` and
    /// vocabulary; returns the limits requests are admitted under.
    pub fn validate(
        &self,
        runner_max_model_len: usize,
        vocab_size: usize,
    ) -> Result<RequestLimits, EngineError> {
        let invalid =
            |field: &'static str, reason: String| Err(EngineError::InvalidConfig { field, reason });
        if self.block_size == 0 {
            return invalid("block_size", "must be at least 1".into());
        }
        if self.num_kv_blocks == 0 {
            return invalid("num_kv_blocks", "must be at least 1".into());
        }
        if self.num_kv_blocks >= u32::MAX as usize {
            return invalid("num_kv_blocks", format!("must be below {}", u32::MAX));
        }
        if self.num_kv_blocks.checked_mul(self.block_size).is_none() {
            return invalid(
                "num_kv_blocks",
                "num_kv_blocks * block_size overflows".into(),
            );
        }
        if self.max_num_seqs == 0 {
            return invalid("max_num_seqs", "must be at least 1".into());
        }
        if self.max_num_batched_tokens == 0 {
            return invalid("max_num_batched_tokens", "must be at least 1".into());
        }
        if self.max_prompt_logprobs_tokens == 0 {
            return invalid("max_prompt_logprobs_tokens", "must be at least 1".into());
        }
        if self.max_waiting_requests == 0 {
            return invalid("max_waiting_requests", "must be at least 1".into());
        }
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return invalid(
                "vocab_size",
                format!("the model runner reports {vocab_size}"),
            );
        }
        if runner_max_model_len == 0 {
            return invalid("max_model_len", "the model runner reports 0".into());
        }
        let max_model_len = match self.max_model_len {
            None => runner_max_model_len,
            Some(0) => return invalid("max_model_len", "must be at least 1".into()),
            Some(len) if len > runner_max_model_len => {
                return invalid(
                    "max_model_len",
                    format!("{len} exceeds what the model accepts ({runner_max_model_len})"),
                );
            }
            Some(len) => len,
        };
        Ok(RequestLimits {
            max_model_len,
            kv_capacity_tokens: self.num_kv_blocks * self.block_size,
            vocab_size,
            max_waiting_requests: self.max_waiting_requests,
        })
    }
}

/// What a request is checked against at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest prompt + output the model accepts (the resolved `max_model_len`).
    pub max_model_len: usize,
    /// Tokens the whole KV pool holds (`num_kv_blocks * block_size`).
    pub kv_capacity_tokens: usize,
    pub vocab_size: usize,
    pub max_waiting_requests: usize,
}

impl RequestLimits {
    /// The length at which a request stops with `length`: `max_model_len`, or the KV pool's
    /// capacity if that is smaller. Capping at the pool is what keeps a lone request from needing
    /// more blocks than exist (it would otherwise preempt itself forever).
    pub fn max_request_len(&self) -> usize {
        self.max_model_len.min(self.kv_capacity_tokens)
    }

    /// Checks a prompt and its sampling parameters (not the queue bound).
    pub fn validate_request(
        &self,
        prompt_token_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<(), EngineError> {
        if prompt_token_ids.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt_token_ids.len() > self.max_model_len {
            return Err(EngineError::PromptTooLong {
                prompt_len: prompt_token_ids.len(),
                max_model_len: self.max_model_len,
            });
        }
        if prompt_token_ids.len() > self.kv_capacity_tokens {
            return Err(EngineError::PromptExceedsKvCapacity {
                prompt_len: prompt_token_ids.len(),
                kv_capacity_tokens: self.kv_capacity_tokens,
            });
        }
        if let Some((index, &token_id)) = prompt_token_ids
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(EngineError::InvalidTokenId {
                token_id,
                index,
                vocab_size: self.vocab_size,
            });
        }
        params.validate()
    }
}

/// Everything the engine refuses or fails with.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EngineError {
    #[error("invalid engine config: {field} {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt has {prompt_len} tokens, more than max_model_len ({max_model_len})")]
    PromptTooLong {
        prompt_len: usize,
        max_model_len: usize,
    },
    #[error(
        "the prompt has {prompt_len} tokens, more than the whole KV cache holds ({kv_capacity_tokens} tokens)"
    )]
    PromptExceedsKvCapacity {
        prompt_len: usize,
        kv_capacity_tokens: usize,
    },
    #[error("prompt token {index} is {token_id}, outside the vocabulary (size {vocab_size})")]
    InvalidTokenId {
        token_id: u32,
        index: usize,
        vocab_size: usize,
    },
    #[error("invalid sampling parameter {name}: {reason}")]
    InvalidSamplingParams { name: &'static str, reason: String },
    #[error("the waiting queue is full ({max_waiting_requests} requests); retry later")]
    QueueFull { max_waiting_requests: usize },
    #[error("request id {0} is already in use")]
    DuplicateRequestId(u64),
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("the engine thread has stopped")]
    EngineStopped,
    #[error("could not start the engine thread: {0}")]
    Spawn(String),
    #[error("the engine thread panicked")]
    ThreadPanicked,
}

impl EngineError {
    /// Whether the caller's request is at fault (an HTTP 4xx) rather than the engine's state
    /// (queue full, shutting down: a 503) or a failure.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            Self::EmptyPrompt
                | Self::PromptTooLong { .. }
                | Self::PromptExceedsKvCapacity { .. }
                | Self::InvalidTokenId { .. }
                | Self::InvalidSamplingParams { .. }
                | Self::DuplicateRequestId(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_errors_name_the_field() {
        assert!(EngineConfig::default().validate(4096, 32000).is_ok());
        let cases = [
            (
                EngineConfig {
                    block_size: 0,
                    ..Default::default()
                },
                "block_size",
            ),
            (
                EngineConfig {
                    num_kv_blocks: 0,
                    ..Default::default()
                },
                "num_kv_blocks",
            ),
            (
                EngineConfig {
                    max_num_seqs: 0,
                    ..Default::default()
                },
                "max_num_seqs",
            ),
            (
                EngineConfig {
                    max_num_batched_tokens: 0,
                    ..Default::default()
                },
                "max_num_batched_tokens",
            ),
            (
                EngineConfig {
                    max_prompt_logprobs_tokens: 0,
                    ..Default::default()
                },
                "max_prompt_logprobs_tokens",
            ),
            (
                EngineConfig {
                    max_waiting_requests: 0,
                    ..Default::default()
                },
                "max_waiting_requests",
            ),
            (
                EngineConfig {
                    max_model_len: Some(5000),
                    ..Default::default()
                },
                "max_model_len",
            ),
            (
                EngineConfig {
                    max_model_len: Some(0),
                    ..Default::default()
                },
                "max_model_len",
            ),
        ];
        for (config, field) in cases {
            let err = config.validate(4096, 32000).unwrap_err();
            assert!(err.to_string().contains(field), "{err}");
        }
        assert!(EngineConfig::default().validate(4096, 0).is_err());
    }

    #[test]
    fn limits_resolve_and_cap_at_the_pool() {
        let limits = EngineConfig {
            num_kv_blocks: 4,
            block_size: 16,
            ..Default::default()
        }
        .validate(4096, 100)
        .unwrap();
        assert_eq!(limits.max_model_len, 4096);
        assert_eq!(limits.max_request_len(), 64);
        assert_eq!(
            limits.validate_request(&[1; 65], &SamplingParams::default()),
            Err(EngineError::PromptExceedsKvCapacity {
                prompt_len: 65,
                kv_capacity_tokens: 64
            })
        );
        assert!(
            limits
                .validate_request(&[1; 64], &SamplingParams::default())
                .is_ok()
        );
        assert_eq!(
            limits.validate_request(&[], &SamplingParams::default()),
            Err(EngineError::EmptyPrompt)
        );
        assert!(matches!(
            limits.validate_request(&[1, 100], &SamplingParams::default()),
            Err(EngineError::InvalidTokenId {
                token_id: 100,
                index: 1,
                ..
            })
        ));
        let small = EngineConfig {
            max_model_len: Some(8),
            ..Default::default()
        }
        .validate(4096, 100)
        .unwrap();
        assert!(matches!(
            small.validate_request(&[1; 9], &SamplingParams::default()),
            Err(EngineError::PromptTooLong {
                prompt_len: 9,
                max_model_len: 8
            })
        ));
        assert!(EngineError::EmptyPrompt.is_invalid_request());
        assert!(
            !EngineError::QueueFull {
                max_waiting_requests: 1
            }
            .is_invalid_request()
        );
    }
}
