//! Server-sent events for `stream: true`: one `data: {json}\n\n` event per text delta, then
//! (with `stream_options.include_usage`) a chunk with `usage` and empty `choices`, then
//! `data: [DONE]`.
//!
//! The body is a stream that owns its [`Generation`] and pulls the next delta only when hyper
//! asks for more bytes, so a client that disconnects makes hyper drop the body, which drops the
//! generation and aborts the request (its KV blocks return to the pool at the next engine step).
//! [`ChunkWriter`] knows the two chunk shapes: `text_completion` for `/v1/completions` and
//! `chat.completion.chunk` (which starts with a `role: assistant` delta) for chat. A delta that
//! decodes to no text yet (half a UTF-8 character) sends nothing; its token ids ride on the next
//! chunk. A model failure mid-stream sends an `{"error": …}` event, as vLLM does; so does a request
//! the server stopped (`server_shutdown`, a drain past `--shutdown-timeout`).

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

use crate::engine::{FinishReason, TokenLogprobs};
use crate::textgen::TextDelta;

use super::generation::{Generation, model_failure, stopped_by_server};
use super::logprobs::LogprobsRenderer;
use super::openai_types::{
    ChatChunk, ChatChunkChoice, ChatDelta, CompletionChoice, CompletionResponse, Usage,
};

/// Which endpoint's chunk shape to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Completion,
    Chat,
}

/// Serializes the chunks of one streamed response.
#[derive(Debug, Clone)]
pub struct ChunkWriter {
    pub kind: ChunkKind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// Set when the request asked for log-probabilities.
    pub logprobs: Option<LogprobsRenderer>,
}

/// One SSE event carrying `value` as JSON.
pub fn event<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"));
    Bytes::from(format!("data: {json}\n\n"))
}

/// The stream's last event.
pub fn done_event() -> Bytes {
    Bytes::from_static(b"data: [DONE]\n\n")
}

impl ChunkWriter {
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    /// Events sent before the first token (chat: the assistant role).
    pub fn opening(&self) -> Vec<Bytes> {
        match self.kind {
            ChunkKind::Completion => Vec::new(),
            ChunkKind::Chat => vec![self.chat_chunk(
                ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
                None,
                None,
            )],
        }
    }

    fn chat_chunk(
        &self,
        delta: ChatDelta,
        finish: Option<FinishReason>,
        token_ids: Option<Vec<u32>>,
        logprobs: Option<Value>,
    ) -> Bytes {
        event(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish.map(FinishReason::as_str),
                token_ids,
            }],
            usage: self.usage_field(),
        })
    }

    /// A chunk with new text (and the finish reason on the last one), with the rendered
    /// log-probabilities of its tokens if the request asked for them.
    pub fn delta(
        &self,
        text: String,
        token_ids: Vec<u32>,
        finish: Option<FinishReason>,
        logprobs: Option<Value>,
    ) -> Bytes {
        let token_ids = self.return_token_ids.then_some(token_ids);
        match self.kind {
            ChunkKind::Completion => event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs,
                    finish_reason: finish.map(FinishReason::as_str),
                    token_ids,
                    prompt_token_ids: None,
                }],
                usage: self.usage_field(),
            }),
            ChunkKind::Chat => {
                let content = (!text.is_empty() || finish.is_none()).then_some(text);
                self.chat_chunk(
                    ChatDelta {
                        role: None,
                        content,
                    },
                    finish,
                    token_ids,
                    logprobs,
                )
            }
        }
    }

    /// The `include_usage` chunk: empty `choices`, the usage.
    pub fn usage(&self, usage: Usage) -> Bytes {
        match self.kind {
            ChunkKind::Completion => event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            ChunkKind::Chat => event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        }
    }
}

struct StreamState {
    generation: Option<Generation>,
    writer: ChunkWriter,
    queue: VecDeque<Bytes>,
    pending_token_ids: Vec<u32>,
    pending_logprobs: Vec<TokenLogprobs>,
    /// `text_offset` of the next token (completions' log-probabilities).
    text_offset: usize,
}

impl StreamState {
    fn absorb(&mut self, delta: TextDelta) {
        let TextDelta {
            text,
            token_ids,
            logprobs,
            finish_reason: finish,
        } = delta;
        self.pending_token_ids.extend(token_ids);
        self.pending_logprobs.extend(logprobs);
        let error = match finish {
            Some(FinishReason::Error) => Some(model_failure()),
            Some(FinishReason::Abort) => Some(stopped_by_server(
                self.generation
                    .as_ref()
                    .map_or(0, |g| g.usage().completion_tokens),
            )),
            _ => None,
        };
        if let Some(error) = error {
            self.queue
                .push_back(Bytes::from(format!("data: {}\n\n", error.body_json())));
            self.end();
            return;
        }
        if !text.is_empty() || finish.is_some() {
            let ids = std::mem::take(&mut self.pending_token_ids);
            let logprobs = std::mem::take(&mut self.pending_logprobs);
            let logprobs = self
                .writer
                .logprobs
                .as_ref()
                .map(|renderer| renderer.render(&logprobs, &mut self.text_offset));
            self.queue
                .push_back(self.writer.delta(text, ids, finish, logprobs));
        }
        if finish.is_some() {
            self.end();
        }
    }

    /// Queues the usage chunk (if asked for) and `[DONE]`, and releases the generation.
    fn end(&mut self) {
        if let Some(generation) = self.generation.take()
            && self.writer.include_usage
        {
            self.queue.push_back(self.writer.usage(generation.usage()));
        }
        self.queue.push_back(done_event());
    }
}

/// The SSE response for a started generation.
pub fn response(generation: Generation, writer: ChunkWriter) -> Response {
    let queue = VecDeque::from(writer.opening());
    let state = StreamState {
        generation: Some(generation),
        writer,
        queue,
        pending_token_ids: Vec::new(),
        pending_logprobs: Vec::new(),
        text_offset: 0,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(bytes) = state.queue.pop_front() {
                return Some((Ok::<Bytes, Infallible>(bytes), state));
            }
            let generation = state.generation.as_mut()?;
            match generation.next().await {
                Some(delta) => state.absorb(delta),
                None => state.end(),
            }
        }
    });
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(kind: ChunkKind, include_usage: bool) -> ChunkWriter {
        ChunkWriter {
            kind,
            id: "x".into(),
            created: 1,
            model: "m".into(),
            include_usage,
            return_token_ids: true,
            logprobs: None,
        }
    }

    fn parse(bytes: &Bytes) -> serde_json::Value {
        let text = std::str::from_utf8(bytes).unwrap();
        let json = text
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn completion_chunks() {
        let w = writer(ChunkKind::Completion, true);
        assert!(w.opening().is_empty());
        let chunk = parse(&w.delta("hi".into(), vec![5], None, None));
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["text"], "hi");
        assert_eq!(chunk["choices"][0]["token_ids"], serde_json::json!([5]));
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        let last = parse(&w.delta(String::new(), vec![], Some(FinishReason::Length), None));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = parse(&w.usage(Usage::new(2, 3, 0)));
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        assert_eq!(&done_event()[..], b"data: [DONE]\n\n");
    }

    #[test]
    fn chat_chunks() {
        let w = writer(ChunkKind::Chat, false);
        let opening = w.opening();
        assert_eq!(opening.len(), 1);
        let first = parse(&opening[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first.get("usage").is_none());
        let chunk = parse(&w.delta("Paris".into(), vec![1], None, None));
        assert_eq!(chunk["choices"][0]["delta"]["content"], "Paris");
        assert!(chunk["choices"][0]["delta"].get("role").is_none());
        let last = parse(&w.delta(String::new(), vec![], Some(FinishReason::Stop), None));
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
    }
}
