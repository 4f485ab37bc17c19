//! `POST /v1/completions`: a prompt (text or token ids), or a batch of them, continued by the
//! model `n` times each, as one JSON answer or as SSE chunks (choice `index` = prompt number ×
//! `n` + choice number). `max_tokens` defaults to 16 (OpenAI's default), capped at what the
//! context leaves. `logprobs: N` (0–20) adds the legacy log-probabilities object (the chosen
//! token's and the N most likely); `echo` and `suffix` are refused with a 400.

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::engine::MAX_LOGPROBS;

use super::super::errors::{ApiError, ApiJson, from_value};
use super::super::generation::Generation;
use super::super::logprobs::{LogprobsRenderer, LogprobsShape};
use super::super::openai_types::{
    CompletionChoice, CompletionFields, CompletionResponse, SamplingFields,
};
use super::super::openapi::{CompletionRequest, ErrorBody, ServerSentEvent};
use super::super::params::{MaxTokensDefault, RequestOptions, resolve_max_tokens};
use super::super::prompts::{encode_prompt, parse_prompts};
use super::super::sse::{Choice, ChunkKind, ChunkWriter};
use super::super::state::AppState;
use super::{Answer, check_choice_count, object_body, respond, stream_or_collect};

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    operation_id = "create_completion",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, its chunks as server-sent events", content(
            (CompletionResponse = "application/json"),
            (ServerSentEvent = "text/event-stream"),
        )),
        (status = 400, description = "Malformed body, or a field out of range or unsupported", body = ErrorBody),
        (status = 404, description = "A `model` this server does not serve", body = ErrorBody),
        (status = 408, description = "The body did not arrive within --http-read-timeout", body = ErrorBody),
        (status = 413, description = "The body is over --max-request-body-bytes", body = ErrorBody),
        (status = 503, description = "The waiting queue is full, or the server is shutting down", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let arrival = Instant::now();
    let result = handle(&state, body, arrival).await;
    respond(&state, result)
}

async fn handle(
    state: &AppState,
    body: Result<ApiJson<Value>, ApiError>,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let body = object_body(body)?;
    let common: SamplingFields = from_value(&body)?;
    let fields: CompletionFields = from_value(&body)?;
    let model = state.resolve_model(common.model.as_deref())?;
    if fields.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "echo is not supported"));
    }
    let logprobs = match &fields.logprobs {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(n) if n as usize <= MAX_LOGPROBS => Some(n as usize),
            _ => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!("logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {value}"),
                ));
            }
        },
    };
    if fields
        .suffix
        .as_ref()
        .is_some_and(|v| !v.is_null() && v.as_str() != Some(""))
    {
        return Err(ApiError::unsupported("suffix", "suffix is not supported"));
    }
    let mut options = RequestOptions::from_fields(&common, state.engine.vocab_size())?;
    options.sampling.logprobs = logprobs;
    let renderer = logprobs.map(|_| {
        LogprobsRenderer::new(
            state.model.clone(),
            LogprobsShape::Completion,
            options.tokens_as_ids,
        )
    });
    let prompts = parse_prompts(fields.prompt.as_ref())?;
    let batched = prompts.len() > 1;
    let total = prompts.len() * options.n;
    check_choice_count(state, total, "n")?;
    // Tokenize and size every prompt before any starts, so a bad one wastes no work.
    let mut sized = Vec::with_capacity(prompts.len());
    for (p, prompt) in prompts.into_iter().enumerate() {
        let param = if batched {
            format!("prompt[{p}]")
        } else {
            "prompt".to_string()
        };
        let prompt_ids = encode_prompt(&state.model, prompt, &param)?;
        let mut options = options.clone();
        options.sampling.max_tokens = resolve_max_tokens(
            common.max_tokens,
            "max_tokens",
            MaxTokensDefault::Fixed(DEFAULT_MAX_TOKENS),
            prompt_ids.len(),
            state.engine.max_model_len(),
            &param,
        )?;
        state
            .engine
            .limits()
            .validate_request(&prompt_ids, &options.sampling)
            .map_err(|error| ApiError::from_engine(&error, &param))?;
        sized.push((param, prompt_ids, options));
    }
    let mut choices = Vec::with_capacity(total);
    for (p, (param, prompt_ids, options)) in sized.into_iter().enumerate() {
        for choice in 0..options.n {
            // An error here drops the choices started so far, which aborts them.
            let generation =
                Generation::start(state, prompt_ids.clone(), &options, choice, &param, arrival)?;
            choices.push(Choice {
                index: (p * options.n + choice) as u32,
                counts_prompt: choice == 0,
                generation,
            });
        }
    }
    let writer = ChunkWriter::new(ChunkKind::Completion, "cmpl-", model, &options, renderer);
    let (id, created, model, renderer) = (
        writer.id.clone(),
        writer.created,
        writer.model.clone(),
        writer.logprobs.clone(),
    );
    let (finished, usage) = match stream_or_collect(choices, &options, writer).await? {
        Answer::Streamed(response) => return Ok(response),
        Answer::Collected(finished, usage) => (finished, usage),
    };
    Ok(Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model,
        choices: finished
            .into_iter()
            .map(|(choice, done)| CompletionChoice {
                index: choice.index,
                text: done.text,
                logprobs: renderer.as_ref().map(|r| r.render(&done.logprobs, &mut 0)),
                finish_reason: Some(done.finish_reason.as_str()),
                token_ids: options.return_token_ids.then_some(done.token_ids),
                prompt_token_ids: choice.prompt_token_ids,
            })
            .collect(),
        usage: Some(Some(usage)),
    })
    .into_response())
}
