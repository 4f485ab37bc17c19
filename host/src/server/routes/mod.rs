//! The HTTP routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`,
//! `POST /tokenize`, `POST /detokenize`, `GET /health`, `GET /metrics` and `GET /openapi.json`
//! (the description of all of them, generated from each handler's `#[utoipa::path]`).
//!
//! The two generation endpoints are [`Endpoint`](super::serving::Endpoint)s of the shared
//! [`serving`](super::serving) pipeline: each file holds only its fields and its response shape.
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
use super::openapi::{self, ApiDoc};
use super::state::AppState;

/// The application's router.
pub fn router(state: AppState) -> Router {
    let api = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(completions::create))
        .routes(routes!(chat::create))
        .routes(routes!(info::models))
        .routes(routes!(tokenize::tokenize))
        .routes(routes!(tokenize::detokenize))
        .routes(routes!(info::health))
        .routes(routes!(info::metrics))
        .routes(routes!(info::version));
    let keys = state.api_keys.clone();
    let router = openapi::publish(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    match keys {
        Some(keys) => router.layer(axum::middleware::from_fn_with_state(
            keys,
            super::auth::require_key,
        )),
        None => router,
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    ApiError::route_not_found(method.as_str(), uri.path()).into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}

/// The body as a JSON object.
pub(super) fn object_body(body: Result<ApiJson<Value>, ApiError>) -> Result<Value, ApiError> {
    let ApiJson(value) = body?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ApiError::invalid("the request body must be a JSON object"))
    }
}

/// Turns a handler's result into a response, counting refusals.
pub(super) fn respond(state: &AppState, result: Result<Response, ApiError>) -> Response {
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
