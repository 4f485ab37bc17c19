//! The OpenAI serving pipeline that `/v1/completions` and `/v1/chat/completions` share, as vLLM's
//! `entrypoints/openai/serving_engine.py` is the base of both. [`serve`] reads the body as a JSON
//! object, parses the shared [`SamplingFields`] and the endpoint's own fields, resolves the
//! model, and builds the [`RequestOptions`] and the log-probabilities renderer; the endpoint
//! ([`Endpoint`]) then tokenizes its prompts into [`Prompts`], which sizes `max_tokens` and
//! validates each prompt once, through the engine handle ([`EngineHandle::validate`]), before any
//! choice starts (a bad prompt of a batch wastes no work, and the engine thread does not check it
//! again). Every choice (prompt number × `n` + choice number) is then submitted, and the answer is
//! streamed ([`sse::response`]) or collected: every choice run to its end, concurrently, the
//! first failure being the answer, with the log-probabilities rendered, token ids kept when asked
//! for, and a usage that counts each prompt once. The endpoint keeps only its fields and its
//! response shape.
//!
//! Request ids: the response `id` is the kind's prefix and random hex, or the prefix and the
//! client's `X-Request-Id` when it sends one (as vLLM does); the `X-Request-Id` response header
//! echoes the client's value, or carries the response `id`. Each choice is known to the engine,
//! and to step snapshots as `request.id`, by the client's `X-Request-Id` or else the response
//! `id`, with `-N` appended for choice N when the request has more than one choice. The
//! server's log lines about a request carry the same id (a `request` span).
//!
//! [`EngineHandle::validate`]: crate::engine::EngineHandle::validate

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Json;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;
use utoipa::PartialSchema;
use utoipa::openapi::{RefOr, schema::Schema};

use crate::engine::api::ValidRequest;
use crate::model::ModelInfo;

use super::errors::{ApiError, ApiJson, from_value};
use super::generation::Generation;
use super::journey::ServerJourney;
use super::logprobs::LogprobsRenderer;
use super::openai_types::{SamplingFields, Usage};
use super::params::{
    MaxTokensDefault, RequestOptions, bad_words_token_ids, resolve_max_tokens, truncate_prompt,
};
use super::routes::{object_body, respond};
use super::sse::{self, Choice, ChunkKind, ChunkWriter, total_usage};
use super::state::{AppState, new_id};
use crate::step_tracing::RequestInfo;

/// The request-id header a client may send (and the server echoes).
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest `X-Request-Id` accepted.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// The most choices one request may ask for (prompts × `n`).
pub const MAX_CHOICES_PER_REQUEST: usize = 256;

/// Declares an OpenAI endpoint's handler, `create`, with its OpenAPI description (the `200`
/// answer as JSON or SSE, and the shared [`GenerationErrors`]): the whole handler is
/// [`serve`] for the given [`Endpoint`].
///
/// [`GenerationErrors`]: super::openapi::GenerationErrors
macro_rules! openai_handler {
    ($endpoint:ident, $path:tt, $operation_id:tt, $request:ident, $response:ident, $description:tt) => {
        #[utoipa::path(
                            post, path = $path, tag = "openai", operation_id = $operation_id,
                            request_body = $request,
                            responses(
                                (status = 200, description = $description, content(
                                    ($response = "application/json"),
                                    (ServerSentEvent = "text/event-stream"),
                                )),
                                GenerationErrors,
                            )
                        )]
        pub async fn create(
            axum::extract::State(state): axum::extract::State<AppState>,
            headers: axum::http::HeaderMap,
            body: Result<ApiJson<serde_json::Value>, ApiError>,
        ) -> axum::response::Response {
            serve::<$endpoint>(&state, &headers, body).await
        }
    };
}
pub(super) use openai_handler;

/// What one OpenAI endpoint adds to the pipeline: its own body fields (the implementor, parsed
/// beside the shared [`SamplingFields`]) and its response shape.
pub trait Endpoint: DeserializeOwned + utoipa::PartialSchema {
    /// The endpoint's chunk shape (and so its id prefix and log-probabilities shape).
    const KIND: ChunkKind;
    /// The JSON answer.
    type Response: Serialize;

    /// Refuses the fields the endpoint does not support, and says how many top
    /// log-probabilities the request asks for (`None`: no log-probabilities).
    fn logprobs(&self) -> Result<Option<usize>, ApiError>;

    /// Whether the answer starts with the prompt (completions' `echo`).
    fn echo(&self) -> bool {
        false
    }

    /// Tokenizes the request's prompts into `prompts`. The choice count is checked once they are
    /// all in, unless the endpoint checks it earlier ([`Prompts::check_choice_count`]).
    fn prompts(self, prompts: &mut Prompts<'_>) -> Result<(), ApiError>;

    /// The answer once every choice has finished (in `index` order); `head` carries the
    /// response's `id`, `created` and `model`.
    fn response(head: &ChunkWriter, choices: Vec<Collected>, usage: Usage) -> Self::Response;
}

/// One choice run to its end, ready for the endpoint's shape.
pub struct Collected {
    pub index: u32,
    pub text: String,
    /// The rendered log-probabilities, when the request asked for them.
    pub logprobs: Option<Value>,
    pub finish_reason: &'static str,
    /// The generated token ids, when the request asked for them (`return_token_ids`).
    pub token_ids: Option<Vec<u32>>,
    /// The prompt's token ids, when the request asked for them.
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs`, rendered, when the request asked for them.
    pub prompt_logprobs: Option<Value>,
}

/// Answers one request to `E`: the handler's whole body.
pub async fn serve<E: Endpoint>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let arrival = Instant::now();
    let journey = JourneyGuard(ServerJourney::begin(state.journeys.as_ref(), headers));
    let prefix = E::KIND.id_prefix();
    let (ids, result) = match client_request_id(headers) {
        Ok(client_id) => (RequestIds::new(prefix, client_id), None),
        Err(error) => (RequestIds::new(prefix, None), Some(error)),
    };
    let span = tracing::info_span!("request", request_id = %ids.base);
    let result = match result {
        None => {
            run::<E>(state, body, arrival, &ids, journey.0.as_ref())
                .instrument(span.clone())
                .await
        }
        Some(error) => Err(error),
    };
    let mut response = span.in_scope(|| respond(state, result));
    if let Ok(value) = HeaderValue::from_str(&ids.base) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    match journey.take() {
        Some(journey) => journey.wrap(response),
        None => response,
    }
}

/// Ends a journey as aborted if the handler is dropped before the answer (a client that went
/// away while a plain JSON answer was being collected).
struct JourneyGuard(Option<ServerJourney>);

impl JourneyGuard {
    fn take(mut self) -> Option<ServerJourney> {
        self.0.take()
    }
}

impl Drop for JourneyGuard {
    fn drop(&mut self) {
        if let Some(journey) = self.0.take() {
            journey.end(crate::step_tracing::RequestOutcome::Aborted(
                "client disconnected".into(),
            ));
        }
    }
}

/// A request's ids (see the module doc).
struct RequestIds {
    /// The response's `id`.
    response: String,
    /// The client's `X-Request-Id`, or else the response `id`: the choices' ids are built on it.
    base: String,
}

impl RequestIds {
    fn new(prefix: &str, client_id: Option<String>) -> Self {
        match client_id {
            Some(client_id) => Self {
                response: format!("{prefix}{client_id}"),
                base: client_id,
            },
            None => {
                let response = new_id(prefix);
                Self {
                    base: response.clone(),
                    response,
                }
            }
        }
    }

    /// The id of choice `index` of `choices`.
    fn choice(&self, index: usize, choices: usize) -> Arc<str> {
        if choices > 1 {
            Arc::from(format!("{}-{index}", self.base))
        } else {
            Arc::from(self.base.as_str())
        }
    }
}

/// The client's `X-Request-Id`: `None` when absent; refused (400, naming the header) unless it
/// is 1 to [`MAX_REQUEST_ID_LEN`] visible ASCII characters.
fn client_request_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all(REQUEST_ID_HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let refuse = |why: &str| {
        Err(ApiError::invalid_param(
            "X-Request-Id",
            format!("the X-Request-Id header {why}"),
        ))
    };
    if values.next().is_some() {
        return refuse("is given more than once");
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_REQUEST_ID_LEN {
        return refuse(&format!(
            "must be 1 to {MAX_REQUEST_ID_LEN} characters long"
        ));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return refuse("may hold only visible ASCII characters (no spaces)");
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

async fn run<E: Endpoint>(
    state: &AppState,
    body: Result<ApiJson<Value>, ApiError>,
    arrival: Instant,
    ids: &RequestIds,
    journey: Option<&ServerJourney>,
) -> Result<Response, ApiError> {
    let body = object_body(body)?;
    super::unsupported::refuse_unimplemented(&body, E::KIND)?;
    super::unsupported::refuse_unknown(&body, E::KIND, known_fields::<E>())?;
    let common: SamplingFields = from_value(&body)?;
    let fields: E = from_value(&body)?;
    let model = state.resolve_model(common.model.as_deref())?;
    let logprobs = fields.logprobs()?;
    let mut options = RequestOptions::from_fields(&common, state.engine.vocab_size())?;
    options.sampling.logprobs = logprobs;
    options = options.with_echo(fields.echo());
    if let Some(words) = &common.bad_words {
        options.sampling.bad_words_token_ids = bad_words_token_ids(words, |text| {
            state
                .model
                .tokenizer
                .encode(text, false)
                .map_err(|e| e.to_string())
        })?;
    }
    if let Some(journey) = journey {
        journey.describe(RequestInfo {
            operation: E::KIND.operation_name(),
            request_id: ids.base.clone(),
            response_id: ids.response.clone(),
            model: model.clone(),
            max_tokens: common.max_tokens.and_then(|m| u64::try_from(m).ok()),
            temperature: f64::from(options.sampling.temperature),
            top_p: f64::from(options.sampling.top_p),
            n: u32::try_from(options.n).unwrap_or(u32::MAX),
        });
    }
    let renderer = logprobs.map(|_| {
        LogprobsRenderer::new(
            state.model.clone(),
            E::KIND.logprobs_shape(),
            options.tokens_as_ids,
        )
    });
    let mut prompts = Prompts::new(state, &options, common.max_tokens);
    fields.prompts(&mut prompts)?;
    let choices = prompts.start(arrival, ids, journey)?;
    tracing::debug!(choices = choices.len(), "request admitted");
    let writer = ChunkWriter::new(E::KIND, ids.response.clone(), model, &options, renderer);
    if options.stream {
        let echo_top = options.echo.then_some(logprobs).flatten();
        return Ok(sse::response(choices, writer, echo_top));
    }
    let from_prompt = PromptAnswer {
        renderer: LogprobsRenderer::new(
            state.model.clone(),
            E::KIND.logprobs_shape(),
            options.tokens_as_ids,
        ),
        echo_top: options.echo.then_some(logprobs).flatten(),
        prompt_logprobs: options.prompt_logprobs,
    };
    let (collected, usage) = collect_all(choices, &writer, &from_prompt).await?;
    Ok(Json(E::response(&writer, collected, usage)).into_response())
}

/// A request's prompts, each with its `max_tokens` sized and, once the choice count is known to
/// fit, validated by the engine handle: the one check a prompt gets.
pub struct Prompts<'a> {
    state: &'a AppState,
    options: &'a RequestOptions,
    /// The shared `max_tokens` field.
    max_tokens: Option<i64>,
    /// The `max_tokens` (or `max_completion_tokens`) value the client set, for the metrics.
    requested_max_tokens: Option<u64>,
    /// Per prompt, in order, its text when the answer echoes it.
    echo_texts: Vec<Option<String>>,
    /// Whether [`check_choice_count`](Self::check_choice_count) passed: until then a prompt
    /// waits in `sized` for its validation, so errors come in the order the fields are read.
    counted: bool,
    sized: Vec<(String, Vec<u32>, RequestOptions)>,
    valid: Vec<(String, ValidRequest)>,
}

impl<'a> Prompts<'a> {
    fn new(state: &'a AppState, options: &'a RequestOptions, max_tokens: Option<i64>) -> Self {
        Self {
            state,
            options,
            max_tokens,
            requested_max_tokens: None,
            echo_texts: Vec::new(),
            counted: false,
            sized: Vec::new(),
            valid: Vec::new(),
        }
    }

    /// The model, to tokenize with.
    pub fn model(&self) -> &ModelInfo {
        &self.state.model
    }

    /// The request's `max_tokens` field (shared by both endpoints).
    pub fn max_tokens(&self) -> Option<i64> {
        self.max_tokens
    }

    /// Refuses a request whose choices (`num_prompts` × `n`) could never all be admitted: more
    /// than [`MAX_CHOICES_PER_REQUEST`], or more than the waiting queue holds (a 503
    /// `queue_full` would then be retried in vain). Validates the prompts added so far.
    pub fn check_choice_count(&mut self, num_prompts: usize) -> Result<(), ApiError> {
        let total = num_prompts * self.options.n;
        let queue = self.state.engine.limits().max_waiting_requests;
        let limit = MAX_CHOICES_PER_REQUEST.min(queue);
        if total > limit {
            return Err(ApiError::invalid_param(
                "n",
                format!(
                    "this request asks for {total} choices (prompts × n); at most {limit} fit \
                     (--max-waiting-requests {queue}, and {MAX_CHOICES_PER_REQUEST} per request)"
                ),
            ));
        }
        self.counted = true;
        for (param, prompt_ids, options) in std::mem::take(&mut self.sized) {
            self.validate(param, prompt_ids, options)?;
        }
        Ok(())
    }

    /// Adds a tokenized prompt (its field named `param` in errors; `text`: the prompt as the
    /// client wrote it, if it was text, for `echo`), with `max_tokens` resolved from the
    /// `requested` value of field `max_tokens_param` or the endpoint's `default`.
    pub fn push(
        &mut self,
        (param, text): (String, Option<String>),
        prompt_ids: Vec<u32>,
        (requested, max_tokens_param): (Option<i64>, &str),
        default: MaxTokensDefault,
    ) -> Result<(), ApiError> {
        let mut prompt_ids = prompt_ids;
        let whole = prompt_ids.len();
        truncate_prompt(
            &mut prompt_ids,
            self.options.truncate_prompt_tokens,
            self.state.engine.max_model_len(),
        )?;
        if self.options.echo {
            // The text as written, unless it came as token ids or was truncated.
            let text = text.filter(|_| prompt_ids.len() == whole).map_or_else(
                || {
                    self.state
                        .model
                        .tokenizer
                        .decode(&prompt_ids, false)
                        .map_err(|e| ApiError::invalid_param(&param, format!("cannot decode: {e}")))
                },
                Ok,
            )?;
            self.echo_texts.push(Some(text));
        } else {
            self.echo_texts.push(None);
        }
        self.requested_max_tokens = requested.and_then(|m| u64::try_from(m).ok());
        let mut options = self.options.clone();
        options.sampling.max_tokens = resolve_max_tokens(
            requested,
            max_tokens_param,
            default,
            prompt_ids.len(),
            self.state.engine.max_model_len(),
            &param,
        )?;
        if self.counted {
            self.validate(param, prompt_ids, options)
        } else {
            self.sized.push((param, prompt_ids, options));
            Ok(())
        }
    }

    fn validate(
        &mut self,
        param: String,
        prompt_ids: Vec<u32>,
        options: RequestOptions,
    ) -> Result<(), ApiError> {
        let request = self
            .state
            .engine
            .validate(prompt_ids, options.sampling)
            .map_err(|error| ApiError::from_engine(&error, &param))?;
        self.valid.push((param, request));
        Ok(())
    }

    /// Submits every choice of every prompt (`index` = prompt number × `n` + choice number;
    /// with a fixed seed, choice j uses seed + j). An error drops the choices started so far,
    /// which aborts them.
    fn start(
        mut self,
        arrival: Instant,
        ids: &RequestIds,
        journey: Option<&ServerJourney>,
    ) -> Result<Vec<Choice>, ApiError> {
        if !self.counted {
            self.check_choice_count(self.sized.len())?;
        }
        let n = self.options.n;
        let total = self.valid.len() * n;
        let ticket = journey.map(|j| j.ticket(total));
        let mut choices = Vec::with_capacity(total);
        let max_tokens_param = self.requested_max_tokens;
        for (p, (param, request)) in self.valid.iter().enumerate() {
            let parent = self.state.metrics.parent_request(n, max_tokens_param);
            for choice in 0..n {
                let index = p * n + choice;
                let mut request = request
                    .with_seed_offset(choice as u64)
                    .with_external_id(ids.choice(index, total));
                if let Some(ticket) = &ticket {
                    request = request.with_journey(Arc::clone(ticket));
                }
                if let Some(journey) = journey {
                    journey.handed_off();
                }
                let generation = Generation::start(
                    self.state,
                    request,
                    self.options,
                    (param, &parent),
                    arrival,
                )?
                .in_journey(journey, choice == 0)
                .with_echo_text(self.echo_texts.get(p).cloned().flatten());
                choices.push(Choice {
                    index: index as u32,
                    counts_prompt: choice == 0,
                    generation,
                });
            }
        }
        Ok(choices)
    }
}

/// What a plain JSON answer shows of the prompt.
struct PromptAnswer {
    renderer: LogprobsRenderer,
    /// `echo` with `logprobs: N`: the prompt's tokens lead the log-probabilities, N top each.
    echo_top: Option<usize>,
    /// The client's `prompt_logprobs`.
    prompt_logprobs: Option<usize>,
}

/// Runs every choice to its end, concurrently, in `index` order, with the request's usage. The
/// first failure is the answer; the other choices are dropped, which aborts them.
async fn collect_all(
    choices: Vec<Choice>,
    writer: &ChunkWriter,
    from_prompt: &PromptAnswer,
) -> Result<(Vec<Collected>, Usage), ApiError> {
    let runs = choices.into_iter().map(|choice| async move {
        let prompt_token_ids = choice.generation.prompt_token_ids().cloned();
        let prompt_ids = choice.generation.prompt_ids().to_vec();
        let echo_text = choice.generation.echo_text().map(str::to_string);
        let done = choice.generation.collect().await?;
        let logprobs = writer
            .logprobs
            .as_ref()
            .map(|renderer| match from_prompt.echo_top {
                Some(top) => renderer.completion_echo(
                    &prompt_ids,
                    &done.prompt_logprobs,
                    top,
                    &done.logprobs,
                    &mut 0,
                ),
                None => renderer.render(&done.logprobs, &mut 0),
            });
        let prompt_logprobs = from_prompt.prompt_logprobs.map(|top| {
            from_prompt
                .renderer
                .prompt_logprobs(&done.prompt_logprobs, top)
        });
        let collected = Collected {
            index: choice.index,
            text: echo_text.unwrap_or_default() + &done.text,
            logprobs,
            finish_reason: done.finish_reason.as_str(),
            token_ids: writer.return_token_ids.then_some(done.token_ids),
            prompt_token_ids,
            prompt_logprobs,
        };
        Ok::<_, ApiError>(((choice.counts_prompt, done.usage), collected))
    });
    let finished = futures_util::future::try_join_all(runs).await?;
    let usage = total_usage(finished.iter().map(|((counts, usage), _)| (*counts, usage)));
    Ok((finished.into_iter().map(|(_, c)| c).collect(), usage))
}

/// The body fields `E`'s handler parses: the properties of [`SamplingFields`] and of `E` as
/// their OpenAPI schemas (serde's names) list them, computed once per endpoint.
fn known_fields<E: Endpoint>() -> &'static BTreeSet<String> {
    static COMPLETION: OnceLock<BTreeSet<String>> = OnceLock::new();
    static CHAT: OnceLock<BTreeSet<String>> = OnceLock::new();
    let cell = match E::KIND {
        ChunkKind::Completion => &COMPLETION,
        ChunkKind::Chat => &CHAT,
    };
    cell.get_or_init(|| {
        let mut fields = schema_properties(SamplingFields::schema());
        fields.extend(schema_properties(E::schema()));
        fields
    })
}

/// The property names of an object schema.
fn schema_properties(schema: RefOr<Schema>) -> BTreeSet<String> {
    match schema {
        RefOr::T(Schema::Object(object)) => object.properties.into_keys().collect(),
        _ => BTreeSet::new(),
    }
}
