//! `POST /v1/chat/completions`: messages rendered with the model's chat template, answered as
//! one `chat.completion` or as `chat.completion.chunk` SSE events. `max_completion_tokens`
//! (or the older `max_tokens`) defaults to what the context leaves, as in vLLM. `logprobs: true`
//! with `top_logprobs: N` (0–20) adds `logprobs.content`; `tools` and non-text `response_format`
//! are refused with a 400.

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
    ChatChoice, ChatFields, ChatMessageOut, ChatResponse, SamplingFields,
};
use super::super::openapi::{ChatRequest, ErrorBody, ServerSentEvent};
use super::super::params::{MaxTokensDefault, RequestOptions, resolve_max_tokens};
use super::super::prompts::{encode_chat, normalize_messages};
use super::super::sse::{Choice, ChunkKind, ChunkWriter};
use super::super::state::AppState;
use super::{Answer, check_choice_count, object_body, respond, stream_or_collect};

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    operation_id = "create_chat_completion",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The chat completion; with `stream`, its chunks as server-sent events", content(
            (ChatResponse = "application/json"),
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

/// `logprobs` and `top_logprobs`: how many top alternatives to report, if any.
fn requested_logprobs(fields: &ChatFields) -> Result<Option<usize>, ApiError> {
    let top = match fields.top_logprobs {
        None => None,
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= MAX_LOGPROBS => Some(n),
            _ => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be from 0 to {MAX_LOGPROBS}, got {n}"),
                ));
            }
        },
    };
    match (fields.logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(n)) if n > 0 => Err(ApiError::invalid_param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (false, _) => Ok(None),
    }
}

fn refuse_unsupported(fields: &ChatFields) -> Result<(), ApiError> {
    if fields
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::unsupported("tools", "tools are not supported"));
    }
    if let Some(format) = &fields.response_format
        && !format.is_null()
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::unsupported(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported",
        ));
    }
    Ok(())
}

async fn handle(
    state: &AppState,
    body: Result<ApiJson<Value>, ApiError>,
    arrival: Instant,
) -> Result<Response, ApiError> {
    let body = object_body(body)?;
    let common: SamplingFields = from_value(&body)?;
    let fields: ChatFields = from_value(&body)?;
    let model = state.resolve_model(common.model.as_deref())?;
    refuse_unsupported(&fields)?;
    let logprobs = requested_logprobs(&fields)?;
    let mut options = RequestOptions::from_fields(&common, state.engine.vocab_size())?;
    options.sampling.logprobs = logprobs;
    let renderer = logprobs.map(|_| {
        LogprobsRenderer::new(
            state.model.clone(),
            LogprobsShape::Chat,
            options.tokens_as_ids,
        )
    });
    let messages = normalize_messages(fields.messages.as_ref())?;
    let prompt_ids = encode_chat(
        &state.model,
        &messages,
        fields.add_generation_prompt.unwrap_or(true),
        fields.chat_template_kwargs.as_ref(),
    )?;
    let (requested, param) = match fields.max_completion_tokens {
        Some(n) => (Some(n), "max_completion_tokens"),
        None => (common.max_tokens, "max_tokens"),
    };
    options.sampling.max_tokens = resolve_max_tokens(
        requested,
        param,
        MaxTokensDefault::RestOfContext,
        prompt_ids.len(),
        state.engine.max_model_len(),
        "messages",
    )?;
    check_choice_count(state, options.n, "n")?;
    let mut choices = Vec::with_capacity(options.n);
    for choice in 0..options.n {
        // An error here drops the choices started so far, which aborts them.
        let generation = Generation::start(
            state,
            prompt_ids.clone(),
            &options,
            choice,
            "messages",
            arrival,
        )?;
        choices.push(Choice {
            index: choice as u32,
            counts_prompt: choice == 0,
            generation,
        });
    }
    let writer = ChunkWriter::new(ChunkKind::Chat, "chatcmpl-", model, &options, renderer);
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
    Ok(Json(ChatResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices: finished
            .into_iter()
            .map(|(choice, done)| ChatChoice {
                index: choice.index,
                message: ChatMessageOut {
                    role: "assistant",
                    content: done.text,
                },
                logprobs: renderer.as_ref().map(|r| r.render(&done.logprobs, &mut 0)),
                finish_reason: Some(done.finish_reason.as_str()),
                token_ids: options.return_token_ids.then_some(done.token_ids),
                prompt_token_ids: choice.prompt_token_ids,
            })
            .collect(),
        usage,
    })
    .into_response())
}
