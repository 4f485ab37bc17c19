//! How a request's tokens are chosen: [`SamplingParams`], their defaults and their validation.
//!
//! The server maps the OpenAI fields onto these (see `server/params.rs`), the engine validates
//! them once at admission ([`SamplingParams::validate`]), and the sampler
//! ([`super::sampler`]) applies them to each row of logits.

/// How a request's tokens are chosen; the engine validates these at admission
/// (see [`SamplingParams::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Most tokens to generate (at least 1).
    pub max_tokens: usize,
    /// Softmax temperature; 0 (anything below 1e-5) means greedy decoding.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None`: no limit; `Some(0)` is invalid).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`, in (0, 1].
    pub top_p: f32,
    /// Seed of this request's random stream; `None`: derived from the engine seed and the id.
    pub seed: Option<u64>,
    /// Generation stops after any of these tokens (the token is part of the output).
    pub stop_token_ids: Vec<u32>,
    /// Keep generating after an end-of-sequence token.
    pub ignore_eos: bool,
    /// The model's end-of-sequence token ids (filled in by the server from the tokenizer).
    pub eos_token_ids: Vec<u32>,
    /// EOS and stop tokens cannot be sampled before this many tokens were generated.
    pub min_tokens: usize,
    /// Subtracted once from the logit of every token already generated (OpenAI, in [-2, 2]).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI, in [-2, 2]).
    pub frequency_penalty: f32,
    /// Divides positive and multiplies negative logits of every token in the prompt or the
    /// output (vLLM and Hugging Face; 1 is off, > 1 discourages repetition).
    pub repetition_penalty: f32,
    /// Report each generated token's log-probability and this many top alternatives (at most
    /// [`MAX_LOGPROBS`]), from the model's raw logits; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// vLLM's `prompt_logprobs`: report every prompt token's log-probability (given the tokens
    /// before it) and this many top alternatives (at most [`MAX_LOGPROBS`]). Such a request reads
    /// nothing from the prefix cache, since every prompt position must be computed.
    pub prompt_logprobs: Option<usize>,
    /// Prefix-cache namespace: requests share cached blocks only with requests of the same salt
    /// (vLLM's `cache_salt`), so one tenant cannot probe another's prompts by timing. `None`:
    /// the shared namespace.
    pub cache_salt: Option<String>,
    /// vLLM's `min_p`, in [0, 1]: after temperature, tokens less likely than `min_p` × the most
    /// likely one's probability are dropped (0: off). Applied before top-k and top-p, as vLLM.
    pub min_p: f32,
    /// OpenAI's `logit_bias`: added to these tokens' logits (each in [-100, 100]) before the
    /// penalties; +100 all but forces a token, -100 all but bans it.
    pub logit_bias: Vec<(u32, f32)>,
    /// vLLM's `allowed_token_ids`: only these tokens can be sampled (empty: every token).
    pub allowed_token_ids: Vec<u32>,
    /// vLLM's `bad_words`, tokenized: a sequence's last token is banned whenever the output ends
    /// with the rest of it (a one-token sequence is always banned). Every sequence is non-empty.
    pub bad_words_token_ids: Vec<Vec<u32>>,
}

/// The longest `cache_salt` accepted, in bytes.
pub const MAX_CACHE_SALT_LEN: usize = 1024;

/// The most top alternatives a request may ask log-probabilities for (vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            eos_token_ids: Vec::new(),
            min_tokens: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            cache_salt: None,
            min_p: 0.0,
            logit_bias: Vec::new(),
            allowed_token_ids: Vec::new(),
            bad_words_token_ids: Vec::new(),
            prompt_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), super::config::EngineError> {
        use super::config::EngineError::InvalidSamplingParams;
        if self.max_tokens == 0 {
            return Err(InvalidSamplingParams {
                name: "max_tokens",
                reason: "must be at least 1".into(),
            });
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(InvalidSamplingParams {
                name: "temperature",
                reason: format!("must be finite and >= 0, got {}", self.temperature),
            });
        }
        if self.top_k == Some(0) {
            return Err(InvalidSamplingParams {
                name: "top_k",
                reason: "must be at least 1 (leave it unset for no limit)".into(),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InvalidSamplingParams {
                name: "top_p",
                reason: format!("must be in (0, 1], got {}", self.top_p),
            });
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(InvalidSamplingParams {
                    name,
                    reason: format!("must be in [-2, 2], got {value}"),
                });
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(InvalidSamplingParams {
                name: "repetition_penalty",
                reason: format!("must be finite and > 0, got {}", self.repetition_penalty),
            });
        }
        for (name, asked) in [
            ("logprobs", self.logprobs),
            ("prompt_logprobs", self.prompt_logprobs),
        ] {
            if let Some(n) = asked
                && n > MAX_LOGPROBS
            {
                return Err(InvalidSamplingParams {
                    name,
                    reason: format!("at most {MAX_LOGPROBS} top log-probabilities, got {n}"),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(InvalidSamplingParams {
                name: "min_p",
                reason: format!("must be in [0, 1], got {}", self.min_p),
            });
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(InvalidSamplingParams {
                name: "logit_bias",
                reason: format!("the bias of token {token} must be in [-100, 100], got {bias}"),
            });
        }
        if self.bad_words_token_ids.iter().any(Vec::is_empty) {
            return Err(InvalidSamplingParams {
                name: "bad_words",
                reason: "a bad word must have at least one token".into(),
            });
        }
        if let Some(salt) = &self.cache_salt
            && (salt.is_empty() || salt.len() > MAX_CACHE_SALT_LEN)
        {
            return Err(InvalidSamplingParams {
                name: "cache_salt",
                reason: format!(
                    "must be a non-empty string of at most {MAX_CACHE_SALT_LEN} bytes, got {} bytes",
                    salt.len()
                ),
            });
        }
        if self.min_tokens > self.max_tokens {
            return Err(InvalidSamplingParams {
                name: "min_tokens",
                reason: format!(
                    "must not exceed max_tokens ({}), got {}",
                    self.max_tokens, self.min_tokens
                ),
            });
        }
        Ok(())
    }

    /// Whether the logits need rewriting before sampling (penalties, or EOS/stop tokens held
    /// back by `min_tokens`) after `num_output_tokens` tokens.
    pub fn processes_logits(&self, num_output_tokens: usize) -> bool {
        self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.repetition_penalty != 1.0
            || num_output_tokens < self.min_tokens
            || !self.logit_bias.is_empty()
            || !self.allowed_token_ids.is_empty()
            || !self.bad_words_token_ids.is_empty()
    }

    /// Whether sampling is greedy (argmax).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPSILON
    }
}

/// Temperatures below this are treated as 0 (greedy), as vLLM does.
pub const GREEDY_TEMPERATURE_EPSILON: f32 = 1e-5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_params_validation_names_the_field() {
        assert!(SamplingParams::default().validate().is_ok());
        let bad = [
            (
                SamplingParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                SamplingParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "top_p",
            ),
        ];
        for (params, field) in bad {
            let err = params.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }
}
