//! Request bodies: read whole, within a size limit and a deadline, before any handler runs.
//!
//! [`limit_body`] is the outermost middleware of both routers. It reads a request's body into
//! memory and hands the handler a complete one, so a client that never finishes its body is
//! answered by this layer (408 `request_timeout` after the read timeout) and never reaches a
//! handler or the engine. A body over the limit (by its `Content-Length`, or as it arrives) is a
//! 413 `request_too_large`. Both answers carry the OpenAI error body and `Connection: close`.
//! Before a 413 the rest of the body is read and discarded for a short while (at most
//! [`LINGER_BYTES`] and [`LINGER_TIME`]), so that a client that writes its whole body before
//! reading the answer gets the 413 rather than a connection reset.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::time::{Instant, timeout_at};

use super::errors::ApiError;

/// The most bytes of an oversized body read and discarded before the 413.
pub const LINGER_BYTES: usize = 64 << 20;
/// The longest an oversized body is read and discarded before the 413.
pub const LINGER_TIME: Duration = Duration::from_secs(2);

/// What [`limit_body`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// The largest accepted body, in bytes.
    pub max_bytes: usize,
    /// How long the body may take to arrive, counted from when the handler chain is entered
    /// (just after the request head).
    pub read_timeout: Duration,
}

/// Why a body was not read.
#[derive(Debug)]
enum BodyError {
    TooLarge,
    TimedOut,
    Broken(axum::Error),
}

/// The middleware: reads the body under `limits`, then runs the rest of the chain with it.
pub async fn limit_body(
    State(limits): State<BodyLimits>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let deadline = Instant::now() + limits.read_timeout;
    let read = match declared {
        Some(length) if length > limits.max_bytes as u64 => {
            linger(body, deadline).await;
            Err(BodyError::TooLarge)
        }
        _ => read_body(body, limits.max_bytes, deadline).await,
    };
    match read {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(BodyError::TooLarge) => closing(
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the limit of {} bytes",
                    limits.max_bytes
                ),
            )
            .with_code("request_too_large"),
        ),
        Err(BodyError::TimedOut) => closing(
            ApiError::status(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {:?}",
                    limits.read_timeout
                ),
            )
            .with_code("request_timeout"),
        ),
        Err(BodyError::Broken(error)) => closing(ApiError::invalid(format!(
            "cannot read the request body: {error}"
        ))),
    }
}

/// Reads the whole body, at most `max_bytes`, by `deadline`.
async fn read_body(body: Body, max_bytes: usize, deadline: Instant) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buffer = Vec::new();
    loop {
        match timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(BodyError::TimedOut),
            Ok(None) => return Ok(Bytes::from(buffer)),
            Ok(Some(Err(error))) => return Err(BodyError::Broken(error)),
            Ok(Some(Ok(chunk))) => {
                if buffer.len() + chunk.len() > max_bytes {
                    linger_stream(stream, deadline, buffer.len() + chunk.len()).await;
                    return Err(BodyError::TooLarge);
                }
                buffer.extend_from_slice(&chunk);
            }
        }
    }
}

async fn linger(body: Body, deadline: Instant) {
    linger_stream(body.into_data_stream(), deadline, 0).await;
}

/// Reads and discards what is left of a body, within [`LINGER_BYTES`] and [`LINGER_TIME`].
async fn linger_stream(mut stream: axum::body::BodyDataStream, deadline: Instant, mut read: usize) {
    let deadline = deadline.min(Instant::now() + LINGER_TIME);
    while read < LINGER_BYTES {
        match timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => read += chunk.len(),
            _ => return,
        }
    }
}

/// The error's response, asking the client to close the connection.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::body::to_bytes;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    fn app(max_bytes: usize, read_timeout: Duration) -> Router {
        Router::new()
            .route(
                "/echo",
                post(|body: Bytes| async move { format!("{}", body.len()) }),
            )
            .layer(axum::middleware::from_fn_with_state(
                BodyLimits {
                    max_bytes,
                    read_timeout,
                },
                limit_body,
            ))
    }

    async fn send(app: Router, request: Request) -> (StatusCode, serde_json::Value, bool) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let closes = response.headers().get(header::CONNECTION) == Some(&"close".parse().unwrap());
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, body, closes)
    }

    fn request(body: Body, length: Option<usize>) -> Request {
        let mut builder = Request::builder().method("POST").uri("/echo");
        if let Some(length) = length {
            builder = builder.header(header::CONTENT_LENGTH, length);
        }
        builder.body(body).unwrap()
    }

    #[tokio::test]
    async fn bodies_within_the_limit_reach_the_handler() {
        let app = app(10, Duration::from_secs(60));
        let (status, body, _) = send(app, request(Body::from("0123456789"), Some(10))).await;
        assert_eq!((status, body), (StatusCode::OK, serde_json::json!(10)));
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413_by_length_or_by_content() {
        let declared = send(
            app(10, Duration::from_secs(60)),
            request(Body::from("01234567890"), Some(11)),
        )
        .await;
        // A streamed body without a length, which only turns out too large as it arrives.
        let chunks = futures_util::stream::iter(["012345", "67890"].map(Ok::<_, std::io::Error>));
        let streamed = send(
            app(10, Duration::from_secs(60)),
            request(Body::from_stream(chunks), None),
        )
        .await;
        for (status, body, closes) in [declared, streamed] {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(body["error"]["code"], "request_too_large");
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert!(closes);
        }
    }

    /// A body that never completes is a 408 once the read timeout passes (paused tokio time, so
    /// no real waiting).
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_completes_times_out() {
        let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>("{\"pro")])
            .chain(futures_util::stream::pending());
        let (status, body, closes) = send(
            app(1 << 20, Duration::from_secs(5)),
            request(Body::from_stream(chunks), Some(100)),
        )
        .await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(body["error"]["code"], "request_timeout");
        assert!(closes);
    }
}
