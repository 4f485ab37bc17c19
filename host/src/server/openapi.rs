//! The OpenAPI 3.1 descriptions `serve` publishes at `GET /openapi.json`, generated (utoipa)
//! from the request and response types and the handlers' `#[utoipa::path]` annotations.
//!
//! The API's routes are registered through `utoipa_axum::routes!`, so a route and its
//! description come from the same annotation and cannot drift apart (a unit test also checks
//! that every route of the router is described). The admin listener publishes its own
//! description at its own `/openapi.json` ([`AdminDoc`]), so the public API never advertises the
//! admin API. The request bodies of the generation endpoints are [`CompletionRequest`] and
//! [`ChatRequest`]: the shared [`SamplingFields`] flattened with each endpoint's own fields,
//! the very types the handlers parse. The JSON-valued fields (`prompt`, `stop`, `messages`) are
//! described by the schema-only types and [`prompt_schema`] below; the handlers check them by hand to name the field
//! at fault. Errors are [`ErrorBody`], with the statuses each handler can answer.

use std::sync::Arc;

use axum::Router;
use axum::extract::Extension;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{IntoResponses, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openai_types::{ChatFields, CompletionFields, SamplingFields};
use super::prompts::MAX_PROMPTS;

/// The main API's description (paths are added by the router's `routes!`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "stepscope",
        description = "OpenAI-compatible LLM inference API (plus vLLM's /tokenize and /detokenize)."
    ),
    components(schemas(ErrorBody, ErrorDetail))
)]
pub struct ApiDoc;

/// The admin API's description, served on the admin listener.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "stepscope admin",
        description = "Hot swap of the step-tracing policy (served on --admin-port only)."
    ),
    components(schemas(ErrorBody, ErrorDetail))
)]
pub struct AdminDoc;

/// `POST /v1/completions`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub completion: CompletionFields,
}

/// `POST /v1/chat/completions`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub sampling: SamplingFields,
    #[serde(flatten)]
    pub chat: ChatFields,
}

/// The schema of a completion `prompt` (a JSON value the handler checks by hand, see
/// `prompts::parse_prompts`): non-empty text, a non-empty list of token ids, or a batch of up to
/// `MAX_PROMPTS` of either.
pub fn prompt_schema() -> Schema {
    let text = || {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(1))
    };
    let token_ids = || {
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            )
            .min_items(Some(1))
    };
    OneOfBuilder::new()
        .item(text())
        .item(token_ids())
        .item(
            ArrayBuilder::new()
                .items(text())
                .min_items(Some(1))
                .max_items(Some(MAX_PROMPTS)),
        )
        .item(
            ArrayBuilder::new()
                .items(token_ids())
                .min_items(Some(1))
                .max_items(Some(MAX_PROMPTS)),
        )
        .description(Some(
            "Text or token ids, or a batch: a list of either (each prompt gets its own choices)",
        ))
        .build()
        .into()
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A chat message (other fields are passed to the chat template).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, … (whatever the model's template knows).
    pub role: String,
    pub content: Option<ChatContent>,
}

/// A message's `content`: text, or a list of text parts (joined with newlines).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<TextPart>),
}

/// A content part; only `text` parts are supported.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TextPart {
    #[serde(rename = "type")]
    pub kind: TextPartType,
    pub text: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TextPartType {
    Text,
}

/// One server-sent event of a streamed answer: `data` is a chunk (a `CompletionResponse`, or a
/// `chat.completion.chunk`), an OpenAI error body if the request fails midway, and `[DONE]` last.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServerSentEvent {
    pub data: String,
    pub event: Option<String>,
}

/// The refusals `POST /v1/completions` and `POST /v1/chat/completions` can answer, each with
/// an [`ErrorBody`].
#[derive(IntoResponses)]
#[allow(dead_code)] // only its description is used
pub enum GenerationErrors {
    /// Malformed body, or a field out of range or unsupported
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// A `model` this server does not serve
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The body did not arrive within --http-read-timeout
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The body is over --max-request-body-bytes
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// The waiting queue is full, or the server is shutting down
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// The OpenAI error body every refusal carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// `error`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `service_unavailable_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `queue_full`, `request_too_large`, …).
    pub code: Option<String>,
}

/// A finished description, as served.
#[derive(Debug, Clone)]
pub struct Published(Arc<str>);

/// `GET /openapi.json`: this listener's OpenAPI description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "This OpenAPI 3.1 description", body = Object))
)]
pub async fn openapi_json(Extension(Published(json)): Extension<Published>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        json.to_string(),
    )
        .into_response()
}

/// Adds `GET /openapi.json` to `router` and returns the plain router, serving the description
/// of every route registered so far.
pub fn publish<S>(router: OpenApiRouter<S>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let (router, doc) = router.routes(routes!(openapi_json)).split_for_parts();
    // Serializing a description built from types cannot fail; an empty object if it ever did.
    let json = doc.to_json().unwrap_or_else(|error| {
        tracing::error!(%error, "cannot render the OpenAPI description");
        String::from("{}")
    });
    router.layer(Extension(Published(Arc::from(json))))
}
