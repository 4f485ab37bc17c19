//! OpenAI-style errors and the JSON body extractor that produces them.
//!
//! Every failure the API reports, from unreadable JSON to a full waiting queue, becomes an
//! [`ApiError`], rendered as `{"error": {"message", "type", "param", "code"}}` with a 4xx or 5xx
//! status, the body the official SDKs parse. [`ApiJson`] replaces axum's own JSON extractor (whose
//! rejections are plain text) and names the offending field in `param` when serde can tell it.
//! [`ApiError::from_engine`] maps the engine's admission errors: the caller's fault is a 400, a
//! full queue or a shutdown a 503 with `Retry-After`, anything else a 500.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::EngineError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `not_found_error`, `server_error`, …
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `queue_full`, …).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// An `invalid_request_error` with the given 4xx status (a server error for 5xx).
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        Self::new(status, kind, message)
    }

    /// A 409 `invalid_request_error`: the request conflicts with how the server runs.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "invalid_request_error", message)
    }

    /// A 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// A 400 about one request field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// A 400 for a body that is not JSON.
    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::invalid(message).with_code("invalid_json")
    }

    /// A 400 for a parameter this server does not implement.
    pub fn unsupported(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_param(param, message).with_code("unsupported_parameter")
    }

    /// A 404 for a `model` the server does not serve.
    pub fn model_not_found(requested: &str, served: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!(
                "the model `{requested}` does not exist; this server serves {}",
                served
                    .iter()
                    .map(|name| format!("`{name}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// A 401: a `/v1` request without the API key (`presented`: it sent a wrong one).
    pub fn unauthorized(presented: bool) -> Self {
        let message = if presented {
            "incorrect API key provided in the Authorization header"
        } else {
            "this server requires an API key: send `Authorization: Bearer <key>`"
        };
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
            .with_code("invalid_api_key")
    }

    /// A 404 for an unknown path.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            format!("no route for {method} {path}"),
        )
    }

    /// A 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// A 503: the server cannot take the request now (retry later).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            message,
        )
        .with_code(code)
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .with_code("internal_error")
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Maps an admission error of the engine; `prompt_param` names the prompt's field
    /// (`prompt` or `messages`).
    pub fn from_engine(error: &EngineError, prompt_param: &str) -> Self {
        let message = error.to_string();
        match error {
            EngineError::PromptTooLong { .. } | EngineError::PromptExceedsKvCapacity { .. } => {
                Self::invalid_param(prompt_param, message).with_code("context_length_exceeded")
            }
            EngineError::EmptyPrompt | EngineError::InvalidTokenId { .. } => {
                Self::invalid_param(prompt_param, message)
            }
            EngineError::InvalidSamplingParams { name, .. } => Self::invalid_param(name, message),
            EngineError::QueueFull { .. } => Self::unavailable("queue_full", message),
            EngineError::ShuttingDown => Self::unavailable("shutting_down", message),
            EngineError::EngineStopped => Self::unavailable("engine_stopped", message),
            other if other.is_invalid_request() => Self::invalid(message),
            _ => Self::internal(message),
        }
    }

    /// The body as JSON text (also used for errors inside an SSE stream).
    pub fn body_json(&self) -> String {
        let body = ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| String::from("{\"error\":{}}"))
    }

    /// A short label for the rejection counter: the code, else the status.
    pub fn reason_label(&self) -> &'static str {
        match (self.code, self.status) {
            (Some(code), _) => code,
            (None, StatusCode::BAD_REQUEST) => "invalid_request",
            (None, StatusCode::NOT_FOUND) => "not_found",
            (None, s) if s.is_server_error() => "server_error",
            (None, _) => "other",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let body = self.body_json();
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// A JSON request body whose every rejection is an [`ApiError`].
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            let mut error = ApiError::invalid(format!(
                "cannot read the request body: {}",
                rejection.body_text()
            ));
            error.status = rejection.status();
            error
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON body; the error says where and, for a wrong field, which one.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_data() {
            field_error(&path, &inner)
        } else {
            ApiError::invalid_json(format!("the request body is not valid JSON: {inner}"))
        }
    })?;
    deserializer.end().map_err(|error| {
        ApiError::invalid_json(format!("the request body is not valid JSON: {error}"))
    })?;
    Ok(value)
}

/// Converts a JSON value into `T` (fields of an already-parsed body), naming the field at fault.
pub fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value)
        .map_err(|error| field_error(&error.path().to_string(), error.inner()))
}

fn field_error(path: &str, error: &serde_json::Error) -> ApiError {
    if path.is_empty() || path == "." {
        ApiError::invalid(format!("invalid request body: {error}"))
    } else {
        ApiError::invalid_param(path, format!("invalid value for `{path}`: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_openai_shape() {
        let error = ApiError::invalid_param("temperature", "too hot");
        let body: serde_json::Value = serde_json::from_str(&error.body_json()).unwrap();
        assert_eq!(body["error"]["message"], "too hot");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "temperature");
        assert!(body["error"]["code"].is_null());
    }

    #[test]
    fn json_errors_name_syntax_and_fields() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Body {
            max_tokens: Option<u32>,
        }
        let syntax = parse_json::<Body>(b"{\"max_tokens\": ").unwrap_err();
        assert_eq!(syntax.code, Some("invalid_json"));
        let trailing = parse_json::<Body>(b"{} x").unwrap_err();
        assert_eq!(trailing.code, Some("invalid_json"));
        let field = parse_json::<Body>(b"{\"max_tokens\": \"many\"}").unwrap_err();
        assert_eq!(field.param.as_deref(), Some("max_tokens"));
        assert_eq!(field.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let full = ApiError::from_engine(
            &EngineError::QueueFull {
                max_waiting_requests: 1,
            },
            "prompt",
        );
        assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(full.code, Some("queue_full"));
        let long = ApiError::from_engine(
            &EngineError::PromptTooLong {
                prompt_len: 9,
                max_model_len: 8,
            },
            "messages",
        );
        assert_eq!(long.status, StatusCode::BAD_REQUEST);
        assert_eq!(long.param.as_deref(), Some("messages"));
        let response = full.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    }
}
