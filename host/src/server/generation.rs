//! One generation request from admission to its last token, shared by both endpoints.
//!
//! [`Generation::start`] submits a validated prompt through [`TextStream`] (so admission errors,
//! such as a full queue, come back before any response is sent) and attaches a
//! [`RequestTracker`] for the latency histograms. [`Generation::next`] yields text deltas for
//! streaming; [`Generation::collect`] runs to the end for a plain JSON answer. Dropping a
//! `Generation` early (the client went away, so hyper dropped the handler or the SSE body) drops
//! its `TextStream`, which aborts the request in the engine and frees its KV blocks. A request
//! that ends in `abort` while its handler still listens was stopped by the server (a drain that
//! ran past `--shutdown-timeout`): the client gets a 503 `server_shutdown` error, not a result.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::api::ValidRequest;
use crate::engine::{FinishReason, TokenLogprobs};
use crate::textgen::{TextDelta, TextStream};

use super::errors::ApiError;
use super::journey::ServerJourney;
use super::openai_types::Usage;
use super::params::RequestOptions;
use super::request_stats::{ChoiceProgress, ParentRequest, RequestTracker};
use super::state::AppState;

/// A running request.
pub struct Generation {
    stream: TextStream,
    tracker: RequestTracker,
    /// The prompt's token ids, kept when the answer shows them (`return_token_ids`), echoes
    /// them or carries their log-probabilities.
    prompt_ids: Option<Vec<u32>>,
    return_prompt_ids: bool,
    /// The client request's journey, when traced, and whether this choice counts its prompt.
    journey: Option<(ServerJourney, bool)>,
    received_any: bool,
    prompt_logprobs: Vec<TokenLogprobs>,
    /// The prompt's text, when the answer starts with it (`echo`).
    echo_text: Option<String>,
}

/// A request run to its end.
#[derive(Debug, Clone)]
pub struct Finished {
    pub text: String,
    pub token_ids: Vec<u32>,
    /// Per token, when the request asked for log-probabilities.
    pub logprobs: Vec<TokenLogprobs>,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    /// With `prompt_logprobs` (or `echo` with `logprobs`): one entry per prompt token after
    /// the first.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

impl Generation {
    /// Submits one choice of a prompt the engine handle validated (its seed already offset for
    /// the choice); `prompt_param` names the prompt's field for errors, `parent` is the prompt
    /// the choice belongs to (for the per-request metrics).
    pub fn start(
        state: &AppState,
        request: ValidRequest,
        options: &RequestOptions,
        (prompt_param, parent): (&str, &Arc<ParentRequest>),
        arrival: Instant,
    ) -> Result<Self, ApiError> {
        let keep_prompt =
            options.return_token_ids || options.echo || request.params().prompt_logprobs.is_some();
        let prompt_ids = keep_prompt.then(|| request.prompt_token_ids().to_vec());
        let stream = TextStream::submit(
            &state.engine,
            &state.model,
            request,
            options.detokenizer.clone(),
        )
        .map_err(|error| ApiError::from_engine(&error, prompt_param))?;
        Ok(Self {
            stream,
            tracker: RequestTracker::new(Arc::clone(parent), arrival),
            prompt_ids,
            return_prompt_ids: options.return_token_ids,
            journey: None,
            received_any: false,
            prompt_logprobs: Vec::new(),
            echo_text: None,
        })
    }

    /// The same choice, part of `journey` (`counts_prompt`: its prompt counts in the usage).
    pub fn in_journey(mut self, journey: Option<&ServerJourney>, counts_prompt: bool) -> Self {
        self.journey = journey.map(|j| (j.clone(), counts_prompt));
        self
    }

    /// The next text delta; `None` after the last one (which carries the finish reason).
    pub async fn next(&mut self) -> Option<TextDelta> {
        let mut delta = self.stream.next().await?;
        if !delta.prompt_logprobs.is_empty() {
            self.prompt_logprobs = std::mem::take(&mut delta.prompt_logprobs);
        }
        let progress = ChoiceProgress {
            num_prompt_tokens: self.stream.num_prompt_tokens(),
            num_output_tokens: self.stream.num_output_tokens(),
            queue_time: self.stream.queue_time(),
        };
        self.tracker
            .on_output(delta.token_ids.len(), delta.finish_reason, progress);
        if let Some((journey, counts_prompt)) = &self.journey {
            if !self.received_any {
                journey.first_response();
            }
            if delta.finish_reason.is_some() {
                let queue = self.stream.queue_time().map(|d| d.as_secs_f64());
                journey.choice_ended(*counts_prompt, &self.usage(), queue);
            }
        }
        self.received_any = true;
        Some(delta)
    }

    /// The prompt's log-probabilities once a delta brought them (`echo` with `logprobs` in a
    /// stream), taken: empty before and after.
    pub fn take_prompt_logprobs(&mut self) -> Vec<TokenLogprobs> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    /// Token counts so far (final once the last delta was returned).
    pub fn usage(&self) -> Usage {
        Usage::new(
            self.stream.num_prompt_tokens(),
            self.stream.num_output_tokens(),
            self.stream.num_cached_tokens(),
        )
    }

    /// The prompt's token ids, when the request asked for them (`return_token_ids`).
    pub fn prompt_token_ids(&self) -> Option<&Vec<u32>> {
        self.prompt_ids.as_ref().filter(|_| self.return_prompt_ids)
    }

    /// The same choice, its answer starting with `text` (`echo`).
    pub fn with_echo_text(mut self, text: Option<String>) -> Self {
        self.echo_text = text;
        self
    }

    /// The prompt's text, when the answer starts with it.
    pub fn echo_text(&self) -> Option<&str> {
        self.echo_text.as_deref()
    }

    /// The prompt's token ids, when kept (for `echo` and `prompt_logprobs` too).
    pub fn prompt_ids(&self) -> &[u32] {
        self.prompt_ids.as_deref().unwrap_or_default()
    }

    /// Runs the request to its end. A model failure becomes a 500, a request the server stopped
    /// (or an output stream that ended without a finish reason) a 503.
    pub async fn collect(mut self) -> Result<Finished, ApiError> {
        let mut token_ids = Vec::new();
        let mut logprobs = Vec::new();
        let mut finish_reason = FinishReason::Abort;
        while let Some(delta) = self.next().await {
            token_ids.extend_from_slice(&delta.token_ids);
            logprobs.extend(delta.logprobs);
            if let Some(reason) = delta.finish_reason {
                finish_reason = reason;
            }
        }
        match finish_reason {
            FinishReason::Error => return Err(model_failure()),
            FinishReason::Abort => return Err(stopped_by_server(self.usage().completion_tokens)),
            _ => {}
        }
        Ok(Finished {
            text: self.stream.text().to_string(),
            token_ids,
            logprobs,
            finish_reason,
            usage: self.usage(),
            prompt_logprobs: std::mem::take(&mut self.prompt_logprobs),
        })
    }
}

/// The error reported for a request the server stopped before its end (the drain deadline of a
/// shutdown passed), after `completion_tokens` tokens.
pub fn stopped_by_server(completion_tokens: usize) -> ApiError {
    ApiError::unavailable(
        "server_shutdown",
        format!(
            "the server is shutting down and stopped this request after {completion_tokens} \
             generated tokens; retry it on another replica"
        ),
    )
}

/// The error reported when the model failed on a request.
pub fn model_failure() -> ApiError {
    ApiError::internal("the model failed while generating this request").with_code("model_error")
}
