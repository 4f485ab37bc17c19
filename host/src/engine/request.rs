//! Requests as the engine tracks them, their sampling parameters, and what they stream back.
//!
//! A [`Request`] holds its prompt and generated tokens in one sequence, how many of those tokens
//! already have K/V in its KV blocks (`num_computed_tokens`), the prefix-cache hit it got at its
//! first admission (`num_cached_tokens`), how often it was preempted, its status and its own
//! random-number generator (so sampling is reproducible whatever else shares its batches).
//! [`RequestOutput`] is what one engine step produces for one request.

use std::time::{SystemTime, UNIX_EPOCH};

use super::block_pool::BlockHash;
use super::hashing::mix64;

/// Engine request id.
pub type RequestId = u64;

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
    /// Prefix-cache namespace: requests share cached blocks only with requests of the same salt
    /// (vLLM's `cache_salt`), so one tenant cannot probe another's prompts by timing. `None`:
    /// the shared namespace.
    pub cache_salt: Option<String>,
}

/// The longest `cache_salt` accepted, in bytes.
pub const MAX_CACHE_SALT_LEN: usize = 1024;

/// The most top alternatives a request may ask log-probabilities for (vLLM's default limit).
pub const MAX_LOGPROBS: usize = 20;

/// The log-probabilities of one generated token, from the raw logits (before temperature,
/// penalties and truncation, as vLLM's default `raw_logprobs`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The generated token and its log-probability.
    pub token_id: u32,
    pub logprob: f32,
    /// 1 + the number of tokens with a higher logit.
    pub rank: usize,
    /// The most likely tokens, most likely first (ties by token id), as many as asked for.
    pub top: Vec<(u32, f32)>,
}

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
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(InvalidSamplingParams {
                name: "logprobs",
                reason: format!("at most {MAX_LOGPROBS} top log-probabilities, got {n}"),
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
    }

    /// Whether sampling is greedy (argmax).
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_TEMPERATURE_EPSILON
    }
}

/// Temperatures below this are treated as 0 (greedy), as vLLM does.
pub const GREEDY_TEMPERATURE_EPSILON: f32 = 1e-5;

/// Why a request finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was generated.
    Stop,
    /// `max_tokens`, `max_model_len` or the KV pool's capacity was reached.
    Length,
    /// Aborted by the client (or its output stream was dropped).
    Abort,
    /// The model backend failed on a batch containing this request.
    Error,
}

impl FinishReason {
    /// The OpenAI/vLLM spelling: `stop`, `length`, `abort`, `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStatus {
    /// Queued, never admitted yet.
    Waiting,
    /// In the running queue, holding KV blocks.
    Running,
    /// Preempted: back in the waiting queue without blocks, to be recomputed.
    Preempted,
    FinishedStopped,
    FinishedLength,
    FinishedAborted,
    FinishedError,
}

impl RequestStatus {
    pub fn is_finished(self) -> bool {
        self.finish_reason().is_some()
    }

    pub fn finish_reason(self) -> Option<FinishReason> {
        match self {
            Self::FinishedStopped => Some(FinishReason::Stop),
            Self::FinishedLength => Some(FinishReason::Length),
            Self::FinishedAborted => Some(FinishReason::Abort),
            Self::FinishedError => Some(FinishReason::Error),
            Self::Waiting | Self::Running | Self::Preempted => None,
        }
    }

    pub fn finished_with(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Stop => Self::FinishedStopped,
            FinishReason::Length => Self::FinishedLength,
            FinishReason::Abort => Self::FinishedAborted,
            FinishReason::Error => Self::FinishedError,
        }
    }
}

/// The phase a request is in for step tracing: PREFILL while it has no output token, DECODE after
/// (a preempted request recomputing prompt + output is DECODE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestPhase {
    Prefill,
    Decode,
}

/// A request's private random stream (splitmix64): small, fast and reproducible.
#[derive(Debug, Clone)]
pub struct RequestRng {
    state: u64,
}

impl RequestRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The stream a request uses: from its own seed if it has one, else from the engine seed and
    /// its id (so two requests never share a stream by accident).
    pub fn for_request(params_seed: Option<u64>, engine_seed: u64, request_id: RequestId) -> Self {
        let seed = params_seed.unwrap_or_else(|| mix64(engine_seed ^ mix64(request_id)));
        Self::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One request inside the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub(super) id: RequestId,
    /// Prompt followed by the generated tokens.
    pub(super) token_ids: Vec<u32>,
    pub(super) num_prompt_tokens: usize,
    /// Tokens (from the start of `token_ids`) whose K/V are in the request's blocks.
    pub(super) num_computed_tokens: usize,
    /// Prefix-cache hit (tokens) at the first admission; `None` until admitted once.
    pub(super) num_cached_tokens: Option<usize>,
    pub(super) num_preemptions: u32,
    pub(super) params: SamplingParams,
    pub(super) status: RequestStatus,
    /// Tokens scheduled for this request in the step being built (0 outside a step).
    pub(super) num_scheduled_tokens: usize,
    /// Chained hashes of the full blocks of `token_ids`, computed lazily by the KV cache manager.
    pub(super) block_hashes: Vec<BlockHash>,
    pub(super) rng: RequestRng,
    /// The log-probabilities of the token sampled this step, until the step's output takes them.
    pub(super) sampled_logprobs: Option<TokenLogprobs>,
}

impl Request {
    /// A new WAITING request. `rng_seed` seeds its sampler (see [`RequestRng::for_request`]).
    pub fn new(
        id: RequestId,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        rng: RequestRng,
    ) -> Self {
        let num_prompt_tokens = prompt_token_ids.len();
        Self {
            id,
            token_ids: prompt_token_ids,
            num_prompt_tokens,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            num_preemptions: 0,
            params,
            status: RequestStatus::Waiting,
            num_scheduled_tokens: 0,
            block_hashes: Vec::new(),
            rng,
            sampled_logprobs: None,
        }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    pub fn output_token_ids(&self) -> &[u32] {
        &self.token_ids[self.num_prompt_tokens..]
    }

    pub fn num_prompt_tokens(&self) -> usize {
        self.num_prompt_tokens
    }

    pub fn num_output_tokens(&self) -> usize {
        self.token_ids.len() - self.num_prompt_tokens
    }

    /// Prompt plus output tokens.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn num_computed_tokens(&self) -> usize {
        self.num_computed_tokens
    }

    /// Prompt tokens served by the prefix cache at the first admission (0 before it).
    pub fn num_cached_tokens(&self) -> usize {
        self.num_cached_tokens.unwrap_or(0)
    }

    /// Whether the request has been admitted to the running queue at least once.
    pub fn was_admitted(&self) -> bool {
        self.num_cached_tokens.is_some()
    }

    pub fn num_preemptions(&self) -> u32 {
        self.num_preemptions
    }

    pub fn status(&self) -> RequestStatus {
        self.status
    }

    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }

    /// Tokens scheduled for this request in the step being built (0 outside a step).
    pub fn num_scheduled_tokens(&self) -> usize {
        self.num_scheduled_tokens
    }

    /// PREFILL while the request has no output token, DECODE after.
    pub fn phase(&self) -> RequestPhase {
        if self.num_output_tokens() == 0 {
            RequestPhase::Prefill
        } else {
            RequestPhase::Decode
        }
    }

    /// Prompt tokens that had to be computed: `Some(prompt - cached)` only when part, but not
    /// all, of the prompt came from the prefix cache (the `request.effective_prompt_len` rule).
    pub fn effective_prompt_len(&self) -> Option<usize> {
        let cached = self.num_cached_tokens();
        (cached > 0 && cached < self.num_prompt_tokens).then(|| self.num_prompt_tokens - cached)
    }

    /// Makes sure the hashes of the first `num_blocks` full blocks are known.
    pub(super) fn ensure_block_hashes(&mut self, block_size: usize, num_blocks: usize) {
        debug_assert!(num_blocks * block_size <= self.token_ids.len());
        while self.block_hashes.len() < num_blocks {
            let index = self.block_hashes.len();
            let parent = self.block_hashes.last().copied();
            let tokens = &self.token_ids[index * block_size..(index + 1) * block_size];
            let salt = self.params.cache_salt.as_deref();
            self.block_hashes
                .push(BlockHash::of_salted_block(parent, salt, tokens));
        }
    }

    pub(super) fn finish(&mut self, reason: FinishReason) {
        self.status = RequestStatus::finished_with(reason);
    }

    /// The stop rule after a new token: stop/eos tokens first, then the length limits
    /// (`max_tokens`, and `max_len`: the engine's effective `max_model_len`).
    pub(super) fn check_stop(&self, max_len: usize) -> Option<FinishReason> {
        let last = *self.token_ids.last()?;
        // Below `min_tokens` the sampler never picks a stop token; a forced one is kept going.
        if self.num_output_tokens() >= self.params.min_tokens.max(1)
            && ((!self.params.ignore_eos && self.params.eos_token_ids.contains(&last))
                || self.params.stop_token_ids.contains(&last))
        {
            return Some(FinishReason::Stop);
        }
        if self.num_output_tokens() >= self.params.max_tokens || self.num_tokens() >= max_len {
            return Some(FinishReason::Length);
        }
        None
    }
}

/// What one step produced for one request: its new token(s) and, on the last one, why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutput {
    pub request_id: RequestId,
    /// Tokens generated since the previous output (eos and stop tokens included).
    pub new_token_ids: Vec<u32>,
    /// Set on the request's last output.
    pub finish_reason: Option<FinishReason>,
    pub num_prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache at the first admission.
    pub num_cached_tokens: usize,
    /// Output tokens so far, these included.
    pub num_output_tokens: usize,
    pub num_preemptions: u32,
    /// One entry per new token when the request asked for log-probabilities, else empty.
    pub logprobs: Vec<TokenLogprobs>,
}

impl RequestOutput {
    pub(super) fn from_request(request: &Request, new_token_ids: Vec<u32>) -> Self {
        Self {
            request_id: request.id,
            new_token_ids,
            finish_reason: request.status.finish_reason(),
            num_prompt_tokens: request.num_prompt_tokens,
            num_cached_tokens: request.num_cached_tokens(),
            num_output_tokens: request.num_output_tokens(),
            num_preemptions: request.num_preemptions,
            logprobs: Vec::new(),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finish_reason.is_some()
    }
}

/// Wall-clock now, Unix epoch nanoseconds (0 if the clock is before 1970).
pub fn unix_time_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(prompt: Vec<u32>, params: SamplingParams) -> Request {
        Request::new(1, prompt, params, RequestRng::new(0))
    }

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

    #[test]
    fn stop_rules() {
        let params = SamplingParams {
            max_tokens: 3,
            eos_token_ids: vec![2],
            stop_token_ids: vec![7],
            ..SamplingParams::greedy(3)
        };
        let mut r = request(vec![2, 7, 5], params.clone());
        // Prompt tokens never stop a request.
        assert_eq!(r.check_stop(100), None);
        r.token_ids.push(2);
        assert_eq!(r.check_stop(100), Some(FinishReason::Stop));
        r.token_ids.pop();
        r.token_ids.push(7);
        assert_eq!(r.check_stop(100), Some(FinishReason::Stop));
        r.token_ids.pop();
        r.token_ids.push(1);
        assert_eq!(r.check_stop(100), None);
        assert_eq!(r.check_stop(4), Some(FinishReason::Length));
        r.token_ids.extend([1, 1]);
        assert_eq!(r.check_stop(100), Some(FinishReason::Length));

        let mut ignoring = request(
            vec![1],
            SamplingParams {
                ignore_eos: true,
                ..params
            },
        );
        ignoring.token_ids.push(2);
        assert_eq!(ignoring.check_stop(100), None);
    }

    #[test]
    fn phase_and_effective_prompt_len() {
        let mut r = request(vec![1; 10], SamplingParams::greedy(4));
        assert_eq!(r.phase(), RequestPhase::Prefill);
        assert_eq!(r.effective_prompt_len(), None);
        r.num_cached_tokens = Some(4);
        assert_eq!(r.effective_prompt_len(), Some(6));
        r.token_ids.push(3);
        assert_eq!(r.phase(), RequestPhase::Decode);
        assert_eq!(r.output_token_ids(), &[3]);
    }

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let mut a = RequestRng::for_request(None, 7, 42);
        let mut b = RequestRng::for_request(None, 7, 42);
        let mut c = RequestRng::for_request(None, 7, 43);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert_eq!(
            RequestRng::for_request(Some(5), 1, 2).next_u64(),
            RequestRng::new(5).next_u64()
        );
        for _ in 0..1000 {
            let u = a.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
