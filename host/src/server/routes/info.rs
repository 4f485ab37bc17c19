//! The read-only endpoints: `GET /v1/models` (the served names, with the model's context length),
//! `GET /health` (200 with an empty body while the engine serves; 503 with an error body once it
//! is shutting down, or when requests are pending and the engine's step loop has not completed a
//! step within `--health-stall-timeout`), `GET /metrics` (Prometheus text) and `GET /version`
//! (`{"version": …}`, as vLLM's).

use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::engine::Liveness;

use super::super::errors::ApiError;
use super::super::metrics::CONTENT_TYPE;
use super::super::openai_types::{ModelCard, ModelList};
use super::super::openapi::ErrorBody;
use super::super::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    operation_id = "list_models",
    responses((status = 200, description = "The names this server answers to", body = ModelList))
)]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .served_names
        .iter()
        .map(|name| ModelCard {
            id: name.clone(),
            object: "model",
            created: state.started,
            owned_by: "stepscope",
            root: state.model.source.clone(),
            max_model_len: state.engine.max_model_len(),
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "meta",
    operation_id = "health",
    responses(
        (status = 200, description = "The engine is serving (empty body)"),
        (status = 503, description = "Shutting down, or requests are pending and the engine has not completed a step within --health-stall-timeout", body = ErrorBody),
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_shutting_down() {
        return ApiError::unavailable("shutting_down", "the server is shutting down")
            .into_response();
    }
    let bound = state.health_stall_timeout;
    match state.engine.liveness(Instant::now(), bound) {
        Liveness::Stalled { since_beat } => ApiError::unavailable(
            "engine_stalled",
            format!(
                "the engine has not completed a step for {:.1} s (bound {:.1} s) while {} \
                 requests are pending",
                since_beat.as_secs_f64(),
                bound.as_secs_f64(),
                state.engine.num_pending()
            ),
        )
        .into_response(),
        Liveness::Idle | Liveness::Busy { .. } => StatusCode::OK.into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    operation_id = "metrics",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::internal("cannot encode the metrics").into_response(),
    }
}

/// `GET /version`'s answer, as vLLM's.
#[derive(Debug, Serialize, ToSchema)]
pub struct Version {
    /// The server's version (this crate's).
    pub version: &'static str,
}

#[utoipa::path(
    get,
    path = "/version",
    tag = "meta",
    operation_id = "version",
    responses((status = 200, description = "The server's version", body = Version))
)]
pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION"),
    })
}
