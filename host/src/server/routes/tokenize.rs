//! `POST /tokenize` and `POST /detokenize`, as vLLM serves them: clients count tokens, check how a
//! prompt or a chat renders, or turn ids back into text without running the model.
//!
//! `/tokenize` takes a `prompt` (tokenized with the special tokens unless `add_special_tokens`
//! is false, as `/v1/completions` does) or chat `messages` (rendered with the model's template,
//! `add_generation_prompt` default true, as `/v1/chat/completions` does) and answers `count`,
//! `max_model_len`, `tokens` and, with `return_token_strs`, each token's vocabulary string.
//! `/detokenize` takes `tokens` and answers the decoded `prompt`.

use axum::Json;
use axum::extract::State;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::super::errors::{ApiError, ApiJson, from_value};
use super::super::openapi::{ChatMessage, ErrorBody};
use super::super::params::token_ids_in_vocabulary;
use super::super::prompts::{encode_chat, normalize_messages};
use super::super::state::AppState;
use super::{object_body, respond};

/// `POST /tokenize`'s body: a `prompt`, or chat `messages`, not both.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TokenizeFields {
    model: Option<String>,
    prompt: Option<String>,
    #[schema(value_type = Option<Vec<ChatMessage>>)]
    messages: Option<Value>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    #[schema(value_type = Option<Object>)]
    chat_template_kwargs: Option<Map<String, Value>>,
    return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    token_strs: Option<Vec<Option<String>>>,
}

/// `POST /detokenize`'s body.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct DetokenizeFields {
    model: Option<String>,
    #[schema(value_type = Vec<u32>)]
    tokens: Option<Vec<i64>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    prompt: String,
}

#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "vllm",
    operation_id = "tokenize",
    request_body = TokenizeFields,
    responses(
        (status = 200, description = "The prompt's token ids", body = TokenizeResponse),
        (status = 400, description = "Malformed body, or a field out of range or unsupported", body = ErrorBody),
        (status = 404, description = "A `model` this server does not serve", body = ErrorBody),
        (status = 408, description = "The body did not arrive within --http-read-timeout", body = ErrorBody),
        (status = 413, description = "The body is over --max-request-body-bytes", body = ErrorBody),
    )
)]
pub async fn tokenize(
    State(state): State<AppState>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let result =
        tokenize_body(&state, body).map(|r| axum::response::IntoResponse::into_response(Json(r)));
    respond(&state, result)
}

fn tokenize_body(
    state: &AppState,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<TokenizeResponse, ApiError> {
    let body = object_body(body)?;
    let fields: TokenizeFields = from_value(&body)?;
    state.resolve_model(fields.model.as_deref())?;
    let tokens = match (&fields.prompt, &fields.messages) {
        (Some(prompt), None) => state
            .model
            .tokenizer
            .encode(prompt, fields.add_special_tokens.unwrap_or(true))
            .map_err(|e| ApiError::invalid_param("prompt", format!("cannot tokenize: {e}")))?,
        (None, Some(_)) => {
            let messages = normalize_messages(fields.messages.as_ref())?;
            encode_chat(
                &state.model,
                &messages,
                fields.add_generation_prompt.unwrap_or(true),
                fields.chat_template_kwargs.as_ref(),
            )?
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give either `prompt` or `messages`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "`prompt` (or chat `messages`) is required",
            ));
        }
    };
    let token_strs = fields.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&id| state.model.tokenizer.id_to_token(id))
            .collect()
    });
    Ok(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.engine.max_model_len(),
        tokens,
        token_strs,
    })
}

#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "vllm",
    operation_id = "detokenize",
    request_body = DetokenizeFields,
    responses(
        (status = 200, description = "The decoded text", body = DetokenizeResponse),
        (status = 400, description = "Malformed body, or a field out of range or unsupported", body = ErrorBody),
        (status = 404, description = "A `model` this server does not serve", body = ErrorBody),
        (status = 408, description = "The body did not arrive within --http-read-timeout", body = ErrorBody),
        (status = 413, description = "The body is over --max-request-body-bytes", body = ErrorBody),
    )
)]
pub async fn detokenize(
    State(state): State<AppState>,
    body: Result<ApiJson<Value>, ApiError>,
) -> Response {
    let result =
        detokenize_body(&state, body).map(|r| axum::response::IntoResponse::into_response(Json(r)));
    respond(&state, result)
}

fn detokenize_body(
    state: &AppState,
    body: Result<ApiJson<Value>, ApiError>,
) -> Result<DetokenizeResponse, ApiError> {
    let body = object_body(body)?;
    let fields: DetokenizeFields = from_value(&body)?;
    state.resolve_model(fields.model.as_deref())?;
    let Some(tokens) = fields.tokens else {
        return Err(ApiError::invalid_param("tokens", "`tokens` is required"));
    };
    let ids = token_ids_in_vocabulary(&tokens, state.engine.vocab_size(), "tokens")?;
    let prompt = state
        .model
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid_param("tokens", format!("cannot decode: {e}")))?;
    Ok(DetokenizeResponse { prompt })
}
