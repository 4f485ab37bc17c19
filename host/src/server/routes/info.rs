//! The read-only endpoints: `GET /v1/models` (the served names, with the model's context length),
//! `GET /health` (200 with an empty body while the engine accepts requests, 503 once it is
//! shutting down) and `GET /metrics` (Prometheus text).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::super::errors::ApiError;
use super::super::metrics::CONTENT_TYPE;
use super::super::openai_types::{ModelCard, ModelList};
use super::super::state::AppState;

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

pub async fn health(State(state): State<AppState>) -> Response {
    if state.engine.is_shutting_down() {
        ApiError::unavailable("shutting_down", "the server is shutting down").into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::internal("cannot encode the metrics").into_response(),
    }
}
