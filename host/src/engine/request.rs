//! Requests as the engine tracks them and what they stream back (their sampling parameters are
//! in [`super::sampling_params`]).
//!
//! A [`Request`] holds its prompt and generated tokens in one sequence, how many of those tokens
//! already have K/V in its KV blocks (`num_computed_tokens`), the prefix-cache hit it got at its
//! first admission (`num_cached_tokens`), how often it was preempted, its status and its own
//! random-number generator (so sampling is reproducible whatever else shares its batches).
//! [`RequestOutput`] is what one engine step produces for one request.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::block_pool::BlockHash;
use super::journey::JourneyLog;
use super::sampling_params::SamplingParams;
use crate::splitmix::{SplitMix64, finalize};

/// Engine request id.
pub type RequestId = u64;

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
    /// Every reason, in declaration order.
    pub const ALL: [Self; 4] = [Self::Stop, Self::Length, Self::Abort, Self::Error];

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

/// A request's private random stream.
pub type RequestRng = SplitMix64;

/// The stream a request samples from: from its own seed if it has one, else from the engine seed
/// and its id (so two requests never share a stream by accident).
pub fn request_rng(
    params_seed: Option<u64>,
    engine_seed: u64,
    request_id: RequestId,
) -> RequestRng {
    let seed = params_seed.unwrap_or_else(|| finalize(engine_seed ^ finalize(request_id)));
    SplitMix64::new(seed)
}

/// One request inside the engine.
#[derive(Debug, Clone)]
pub struct Request {
    pub(super) id: RequestId,
    /// The id the client knows the request by (`chatcmpl-…`, `cmpl-…-N`, or its
    /// `X-Request-Id`): `request.id` on snapshots. The engine's own key is `id`.
    pub(super) external_id: Arc<str>,
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
    /// Chained hashes of the full blocks of `token_ids`, computed lazily by the KV cache manager.
    pub(super) block_hashes: Vec<BlockHash>,
    pub(super) rng: RequestRng,
    /// The log-probabilities of the token sampled this step, until the step's output takes them.
    pub(super) sampled_logprobs: Option<TokenLogprobs>,
    /// `prompt_logprobs`: one entry per prompt token after the first, until its first output
    /// takes them.
    pub(super) prompt_logprobs: Vec<TokenLogprobs>,
    /// Whether every prompt position's log-probabilities were computed (they are never computed
    /// twice, even when a preempted request recomputes its prompt).
    pub(super) prompt_logprobs_complete: bool,
    /// When the engine took the request in.
    pub(super) arrived: Instant,
    /// How long it waited before its first admission to the running queue.
    pub(super) queue_time: Option<Duration>,
    /// The `llm_core` journey, when the request's journey is traced.
    pub(super) journey: Option<Box<JourneyLog>>,
}

impl Request {
    /// A new WAITING request. `rng_seed` seeds its sampler (see [`request_rng`]).
    pub fn new(
        id: RequestId,
        prompt_token_ids: Vec<u32>,
        params: SamplingParams,
        rng: RequestRng,
    ) -> Self {
        let num_prompt_tokens = prompt_token_ids.len();
        Self {
            id,
            external_id: Arc::from(id.to_string()),
            token_ids: prompt_token_ids,
            num_prompt_tokens,
            num_computed_tokens: 0,
            num_cached_tokens: None,
            num_preemptions: 0,
            params,
            status: RequestStatus::Waiting,
            block_hashes: Vec::new(),
            rng,
            sampled_logprobs: None,
            prompt_logprobs: Vec::new(),
            prompt_logprobs_complete: false,
            arrived: Instant::now(),
            queue_time: None,
            journey: None,
        }
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// The same request known to the client as `external_id` (by default, the decimal `id`).
    pub fn with_external_id(mut self, external_id: Arc<str>) -> Self {
        self.external_id = external_id;
        self
    }

    /// The id the client knows the request by.
    pub fn external_id(&self) -> &Arc<str> {
        &self.external_id
    }

    /// The request's `llm_core` journey, when it is traced.
    pub fn journey(&self) -> Option<&JourneyLog> {
        self.journey.as_deref()
    }

    /// Traces the request's journey in `log` (from its arrival on).
    pub(super) fn with_journey(mut self, log: Option<Box<JourneyLog>>) -> Self {
        self.journey = log;
        self
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

    /// Whether the forward pass must return logits for every position this request computes
    /// from `start_position` on: it asked for `prompt_logprobs`, some are still missing, and a
    /// position before the prompt's last one is computed.
    pub fn needs_prompt_logits(&self, start_position: usize) -> bool {
        self.params.prompt_logprobs.is_some()
            && !self.prompt_logprobs_complete
            && start_position + 1 < self.num_prompt_tokens
    }

    /// Whether the prefix cache may serve this request's prompt (not with `prompt_logprobs`).
    pub fn reads_prefix_cache(&self) -> bool {
        self.params.prompt_logprobs.is_none()
    }

    /// Records the log-probabilities of the prompt token at `position` (computed from the
    /// logits of the position before it), in order and once.
    pub(super) fn record_prompt_logprobs(&mut self, position: usize, logprobs: TokenLogprobs) {
        if self.prompt_logprobs_complete || position != self.prompt_logprobs.len() + 1 {
            return;
        }
        self.prompt_logprobs.push(logprobs);
        if position + 1 >= self.num_prompt_tokens {
            self.prompt_logprobs_complete = true;
        }
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

    /// PREFILL while the request has no output token, DECODE after.
    pub fn phase(&self) -> RequestPhase {
        if self.num_output_tokens() == 0 {
            RequestPhase::Prefill
        } else {
            RequestPhase::Decode
        }
    }

    /// Prompt tokens that had to be computed, `prompt - cached`: the seed's
    /// `request.effective_prompt_len` rule, present whenever `0 <= cached < prompt` once the
    /// request was admitted (a cache miss included), absent before admission and when the whole
    /// prompt came from the cache.
    pub fn effective_prompt_len(&self) -> Option<usize> {
        let cached = self.num_cached_tokens?;
        (cached < self.num_prompt_tokens).then(|| self.num_prompt_tokens - cached)
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
    /// How long the request waited in the engine before it was first scheduled (`None` until
    /// then).
    pub queue_time: Option<Duration>,
    /// One entry per new token when the request asked for log-probabilities, else empty.
    pub logprobs: Vec<TokenLogprobs>,
    /// With `prompt_logprobs`, on the request's first output: one entry per prompt token after
    /// the first (each given the tokens before it). Empty otherwise.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

impl RequestOutput {
    /// The one output of a request that ended (`reason`) before the engine ever ran it.
    pub(super) fn never_started(request_id: RequestId, reason: FinishReason) -> Self {
        Self {
            request_id,
            new_token_ids: Vec::new(),
            finish_reason: Some(reason),
            num_prompt_tokens: 0,
            num_cached_tokens: 0,
            num_output_tokens: 0,
            num_preemptions: 0,
            queue_time: None,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
        }
    }

    pub(super) fn from_request(request: &Request, new_token_ids: Vec<u32>) -> Self {
        Self {
            request_id: request.id,
            new_token_ids,
            finish_reason: request.status.finish_reason(),
            num_prompt_tokens: request.num_prompt_tokens,
            num_cached_tokens: request.num_cached_tokens(),
            num_output_tokens: request.num_output_tokens(),
            num_preemptions: request.num_preemptions,
            queue_time: request.queue_time,
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
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
        assert_eq!(r.effective_prompt_len(), None, "not admitted yet");
        r.num_cached_tokens = Some(0);
        assert_eq!(r.effective_prompt_len(), Some(10), "a cache miss");
        r.num_cached_tokens = Some(4);
        assert_eq!(r.effective_prompt_len(), Some(6));
        r.num_cached_tokens = Some(10);
        assert_eq!(r.effective_prompt_len(), None, "the whole prompt cached");
        r.num_cached_tokens = Some(4);
        r.token_ids.push(3);
        assert_eq!(r.phase(), RequestPhase::Decode);
        assert_eq!(r.output_token_ids(), &[3]);
    }

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let mut a = request_rng(None, 7, 42);
        let mut b = request_rng(None, 7, 42);
        let mut c = request_rng(None, 7, 43);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert_eq!(
            request_rng(Some(5), 1, 2).next_u64(),
            RequestRng::new(5).next_u64()
        );
        for _ in 0..1000 {
            let u = a.next_f64();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
