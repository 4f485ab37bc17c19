//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics` and `GET /openapi.json`
//! (the description of all of them, generated from each handler's `#[utoipa::path]`).
//!
//! Unknown paths and wrong methods get OpenAI-style JSON errors too (404, 405), so a client never
//! has to parse plain text. Each generation handler reads its body as [`ApiJson`], whose failures
//! reach the handler as values (not axum rejections) so that they are counted in
//! `stepscope_requests_rejected_total` like every other refusal.

mod chat;
mod completions;
mod info;
mod tokenize;

use axum::Router;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::errors::{ApiError, ApiJson};
use super::generation::Finished;
use super::openai_types::Usage;
use super::openapi::{self, ApiDoc};
use super::params::RequestOptions;
use super::sse::{self, Choice, ChunkWriter, total_usage};
use super::state::AppState;

/// The most choices one request may ask for (prompts × `n`).
pub const MAX_CHOICES_PER_REQUEST: usize = 256;

/// A generation request's answer: an SSE stream, or every choice run to its end (in `index`
/// order) with the request's usage, for the endpoint to shape as JSON.
enum Answer {
    Streamed(Response),
    Collected(Vec<(ChoiceInfo, Finished)>, Usage),
}

/// Streams `choices` when the request asked for it, else collects them.
async fn stream_or_collect(
    choices: Vec<Choice>,
    options: &RequestOptions,
    writer: ChunkWriter,
) -> Result<Answer, ApiError> {
    if options.stream {
        return Ok(Answer::Streamed(sse::response(choices, writer)));
    }
    let finished = collect_all(choices).await?;
    let usage = total_usage(
        finished
            .iter()
            .map(|(c, done)| (c.counts_prompt, &done.usage)),
    );
    Ok(Answer::Collected(finished, usage))
}

/// Refuses a request whose choices could never all be admitted: more than
/// [`MAX_CHOICES_PER_REQUEST`], or more than the waiting queue holds (a 503 `queue_full` would
/// then be retried in vain).
fn check_choice_count(state: &AppState, total: usize, param: &str) -> Result<(), ApiError> {
    let queue = state.engine.limits().max_waiting_requests;
    let limit = MAX_CHOICES_PER_REQUEST.min(queue);
    if total > limit {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "this request asks for {total} choices (prompts × n); at most {limit} fit \
                 (--max-waiting-requests {queue}, and {MAX_CHOICES_PER_REQUEST} per request)"
            ),
        ));
    }
    Ok(())
}

/// What a finished choice keeps of its [`Choice`].
struct ChoiceInfo {
    index: u32,
    counts_prompt: bool,
    prompt_token_ids: Option<Vec<u32>>,
}

/// Runs every choice to its end, concurrently, in `index` order. The first failure is the
/// answer; the other choices are dropped, which aborts them.
async fn collect_all(choices: Vec<Choice>) -> Result<Vec<(ChoiceInfo, Finished)>, ApiError> {
    let runs = choices.into_iter().map(|choice| async move {
        let info = ChoiceInfo {
            index: choice.index,
            counts_prompt: choice.counts_prompt,
            prompt_token_ids: choice.generation.prompt_token_ids().cloned(),
        };
        choice.generation.collect().await.map(|done| (info, done))
    });
    futures_util::future::try_join_all(runs).await
}

/// The application's router.
pub fn router(state: AppState) -> Router {
    let api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(completions::create))
        .routes(routes!(chat::create))
        .routes(routes!(info::models))
        .routes(routes!(tokenize::tokenize))
        .routes(routes!(tokenize::detokenize))
        .routes(routes!(info::health))
        .routes(routes!(info::metrics));
    openapi::publish(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

/// The body as a JSON object.
fn object_body(body: Result<ApiJson<Value>, ApiError>) -> Result<Value, ApiError> {
    let ApiJson(value) = body?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::invalid("the request body must be a JSON object"))
    }
}

/// Turns a handler's result into a response, counting refusals.
fn respond(state: &AppState, result: Result<Response, ApiError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => {
            state.metrics.record_rejection(error.reason_label());
            if error.status.is_server_error() {
                tracing::warn!(%error, "request failed");
            } else {
                tracing::debug!(%error, "request refused");
            }
            error.into_response()
        }
    }
}
