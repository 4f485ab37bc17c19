//! Server-sent events for `stream: true`: one `data: {json}\n\n` event per text delta, then
//! (with `stream_options.include_usage`) a chunk with `usage` and empty `choices`, then
//! `data: [DONE]`.
//!
//! With several choices (`n`, or a batch of prompts) their chunks interleave as they come, each
//! with its `index`; the usage chunk counts every completion token and each prompt once.
//!
//! The body is a stream that owns its [`Generation`]s and pulls the next delta only when hyper
//! asks for more bytes, so a client that disconnects makes hyper drop the body, which drops the
//! generations and aborts the requests (their KV blocks return to the pool at the next engine
//! step).
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
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use serde::Serialize;
use serde_json::Value;

use crate::engine::{FinishReason, TokenLogprobs};
use crate::textgen::TextDelta;

use super::generation::{Generation, model_failure, stopped_by_server};
use super::logprobs::{LogprobsRenderer, LogprobsShape};
use super::openai_types::{
    ChatChunk, ChatChunkChoice, ChatDelta, CompletionChoice, CompletionResponse, Usage,
};
use super::params::RequestOptions;
use super::state::unix_seconds;

/// Which endpoint's chunk shape to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    Completion,
    Chat,
}

impl ChunkKind {
    /// The prefix of a response's `id`.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Completion => "cmpl-",
            Self::Chat => "chatcmpl-",
        }
    }

    /// `gen_ai.operation.name` of a request to this endpoint.
    pub fn operation_name(self) -> &'static str {
        match self {
            Self::Completion => "text_completion",
            Self::Chat => "chat",
        }
    }

    /// The endpoint's log-probabilities shape.
    pub fn logprobs_shape(self) -> LogprobsShape {
        match self {
            Self::Completion => LogprobsShape::Completion,
            Self::Chat => LogprobsShape::Chat,
        }
    }
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
    /// The writer for a new response with this `id`, created now.
    pub fn new(
        kind: ChunkKind,
        id: String,
        model: String,
        options: &RequestOptions,
        logprobs: Option<LogprobsRenderer>,
    ) -> Self {
        Self {
            kind,
            id,
            created: unix_seconds(),
            model,
            include_usage: options.include_usage,
            return_token_ids: options.return_token_ids,
            logprobs,
        }
    }

    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    /// Events sent before the first token of choice `index` (chat: the assistant role).
    pub fn opening(&self, index: u32) -> Vec<Bytes> {
        match self.kind {
            ChunkKind::Completion => Vec::new(),
            ChunkKind::Chat => vec![self.chat_chunk(
                index,
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
        index: u32,
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
                index,
                delta,
                logprobs,
                finish_reason: finish.map(FinishReason::as_str),
                token_ids,
            }],
            usage: self.usage_field(),
        })
    }

    /// A chunk of choice `index` with new text (and the finish reason on the last one), with
    /// the rendered log-probabilities of its tokens if the request asked for them.
    pub fn delta(
        &self,
        index: u32,
        text: String,
        token_ids: Vec<u32>,
        finish: Option<FinishReason>,
        logprobs: Option<Value>,
    ) -> Bytes {
        self.delta_with_prompt(index, text, token_ids, finish, logprobs, None)
    }

    /// [`delta`](Self::delta), with the prompt's token ids (a completion choice's first chunk
    /// carries them when `return_token_ids` is on, as vLLM does; chat chunks have no such field).
    pub fn delta_with_prompt(
        &self,
        index: u32,
        text: String,
        token_ids: Vec<u32>,
        finish: Option<FinishReason>,
        logprobs: Option<Value>,
        prompt_token_ids: Option<Vec<u32>>,
    ) -> Bytes {
        let token_ids = self.return_token_ids.then_some(token_ids);
        match self.kind {
            ChunkKind::Completion => event(&CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finish.map(FinishReason::as_str),
                    token_ids,
                    prompt_token_ids,
                    prompt_logprobs: None,
                }],
                usage: self.usage_field(),
            }),
            ChunkKind::Chat => {
                let content = (!text.is_empty() || finish.is_none()).then_some(text);
                self.chat_chunk(
                    index,
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

/// One choice of a response.
pub struct Choice {
    /// The choice's `index` (prompt number × `n` + choice number).
    pub index: u32,
    /// Whether this choice's prompt counts in `usage` (the first choice of each prompt does).
    pub counts_prompt: bool,
    pub generation: Generation,
}

/// The usage of several choices: every completion token, and each prompt once.
pub fn total_usage<'a>(choices: impl IntoIterator<Item = (bool, &'a Usage)>) -> Usage {
    let (mut prompt, mut completion, mut cached) = (0, 0, 0);
    for (counts_prompt, usage) in choices {
        completion += usage.completion_tokens;
        if counts_prompt {
            prompt += usage.prompt_tokens;
            cached += usage.prompt_tokens_details.cached_tokens;
        }
    }
    Usage::new(prompt, completion, cached)
}

/// What the stream remembers of one choice.
struct ChoiceState {
    index: u32,
    counts_prompt: bool,
    pending_token_ids: Vec<u32>,
    pending_logprobs: Vec<TokenLogprobs>,
    /// `text_offset` of the next token (completions' log-probabilities).
    text_offset: usize,
    usage: Usage,
    /// Sent with the choice's first chunk (`return_token_ids`).
    prompt_token_ids: Option<Vec<u32>>,
    /// Completions' `echo`, until the choice's first chunk carries it.
    echo: Option<Echo>,
    /// The prompt's log-probabilities for `echo` with `logprobs`, until then.
    pending_prompt_logprobs: Vec<TokenLogprobs>,
}

/// What a choice's first chunk prepends for `echo`: the prompt's text and, with `logprobs: N`
/// (`top`), its tokens' log-probabilities (the first `null`), as vLLM streams them.
struct Echo {
    text: String,
    prompt_ids: Vec<u32>,
    top: Option<usize>,
}

/// A choice's deltas, each with the choice's slot and its usage after it.
type ChoiceDeltas = BoxStream<'static, (usize, TextDelta, Usage)>;

struct StreamState {
    /// Every unfinished choice's deltas; dropping it drops their generations (aborting them).
    deltas: SelectAll<ChoiceDeltas>,
    choices: Vec<ChoiceState>,
    writer: ChunkWriter,
    queue: VecDeque<Bytes>,
    ended: bool,
}

impl StreamState {
    fn absorb(&mut self, slot: usize, delta: TextDelta, usage: Usage) {
        let TextDelta {
            text,
            token_ids,
            logprobs,
            finish_reason: finish,
            // The client's `prompt_logprobs` are refused with `stream` (as by vLLM); these are
            // the ones `echo` with `logprobs` asked for.
            prompt_logprobs,
        } = delta;
        let choice = &mut self.choices[slot];
        choice.usage = usage;
        choice.pending_token_ids.extend(token_ids);
        choice.pending_logprobs.extend(logprobs);
        choice.pending_prompt_logprobs.extend(prompt_logprobs);
        let error = match finish {
            Some(FinishReason::Error) => Some(model_failure()),
            Some(FinishReason::Abort) => Some(stopped_by_server(usage.completion_tokens)),
            _ => None,
        };
        if let Some(error) = error {
            // One failed choice ends the response (the others are aborted).
            self.queue
                .push_back(Bytes::from(format!("data: {}\n\n", error.body_json())));
            self.end();
            return;
        }
        if !text.is_empty() || finish.is_some() {
            let ids = std::mem::take(&mut choice.pending_token_ids);
            let logprobs = std::mem::take(&mut choice.pending_logprobs);
            let echo = choice.echo.take();
            let logprobs = self.writer.logprobs.as_ref().map(|renderer| {
                match echo.as_ref().and_then(|e| e.top.map(|top| (e, top))) {
                    Some((echo, top)) => renderer.completion_echo(
                        &echo.prompt_ids,
                        &std::mem::take(&mut choice.pending_prompt_logprobs),
                        top,
                        &logprobs,
                        &mut choice.text_offset,
                    ),
                    None => renderer.render(&logprobs, &mut choice.text_offset),
                }
            });
            let text = match echo {
                Some(echo) => echo.text + &text,
                None => text,
            };
            let index = choice.index;
            let prompt_ids = choice.prompt_token_ids.take();
            self.queue.push_back(
                self.writer
                    .delta_with_prompt(index, text, ids, finish, logprobs, prompt_ids),
            );
        }
    }

    /// Queues the usage chunk (if asked for) and `[DONE]`, and drops what is still running.
    fn end(&mut self) {
        self.deltas = SelectAll::new();
        if self.writer.include_usage {
            let usage = total_usage(self.choices.iter().map(|c| (c.counts_prompt, &c.usage)));
            self.queue.push_back(self.writer.usage(usage));
        }
        self.queue.push_back(done_event());
        self.ended = true;
    }
}

/// The SSE response for started generations, one per choice. A choice with an echo text
/// (completions' `echo`) prepends it to its first chunk, and with `echo_top` (`logprobs: N`
/// with `echo`) the prompt tokens' log-probabilities too.
pub fn response(choices: Vec<Choice>, writer: ChunkWriter, echo_top: Option<usize>) -> Response {
    let mut queue = VecDeque::new();
    let mut states = Vec::with_capacity(choices.len());
    let mut deltas = SelectAll::new();
    for (slot, choice) in choices.into_iter().enumerate() {
        queue.extend(writer.opening(choice.index));
        let usage = choice.generation.usage();
        let prompt_token_ids = choice.generation.prompt_token_ids().cloned();
        let echo = choice.generation.echo_text().map(|text| Echo {
            text: text.to_string(),
            prompt_ids: choice.generation.prompt_ids().to_vec(),
            top: echo_top,
        });
        states.push(ChoiceState {
            prompt_token_ids,
            echo,
            pending_prompt_logprobs: Vec::new(),
            index: choice.index,
            counts_prompt: choice.counts_prompt,
            pending_token_ids: Vec::new(),
            pending_logprobs: Vec::new(),
            text_offset: 0,
            usage,
        });
        let stream =
            futures_util::stream::unfold(choice.generation, move |mut generation| async move {
                let mut delta = generation.next().await?;
                delta.prompt_logprobs = generation.take_prompt_logprobs();
                let usage = generation.usage();
                Some(((slot, delta, usage), generation))
            });
        deltas.push(stream.boxed());
    }
    let state = StreamState {
        deltas,
        choices: states,
        writer,
        queue,
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(bytes) = state.queue.pop_front() {
                return Some((Ok::<Bytes, Infallible>(bytes), state));
            }
            if state.ended {
                return None;
            }
            match state.deltas.next().await {
                Some((slot, delta, usage)) => state.absorb(slot, delta, usage),
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
        assert!(w.opening(0).is_empty());
        let chunk = parse(&w.delta(0, "hi".into(), vec![5], None, None));
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["choices"][0]["text"], "hi");
        assert_eq!(chunk["choices"][0]["token_ids"], serde_json::json!([5]));
        assert!(chunk["usage"].is_null() && chunk.get("usage").is_some());
        let last = parse(&w.delta(0, String::new(), vec![], Some(FinishReason::Length), None));
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage = parse(&w.usage(Usage::new(2, 3, 0)));
        assert_eq!(usage["choices"], serde_json::json!([]));
        assert_eq!(usage["usage"]["total_tokens"], 5);
        assert_eq!(&done_event()[..], b"data: [DONE]\n\n");
    }

    /// A stream state of one completions choice that echoes `echo` (no log-probabilities).
    fn echoing(echo: &str) -> StreamState {
        StreamState {
            deltas: SelectAll::new(),
            choices: vec![ChoiceState {
                index: 0,
                counts_prompt: true,
                pending_token_ids: Vec::new(),
                pending_logprobs: Vec::new(),
                text_offset: 0,
                usage: Usage::new(3, 0, 0),
                prompt_token_ids: None,
                echo: Some(Echo {
                    text: echo.into(),
                    prompt_ids: vec![1, 2, 3],
                    top: None,
                }),
                pending_prompt_logprobs: Vec::new(),
            }],
            writer: writer(ChunkKind::Completion, true),
            queue: VecDeque::new(),
            ended: false,
        }
    }

    fn delta(text: &str, ids: &[u32], finish: Option<FinishReason>) -> TextDelta {
        TextDelta {
            text: text.into(),
            token_ids: ids.to_vec(),
            logprobs: Vec::new(),
            prompt_logprobs: Vec::new(),
            finish_reason: finish,
        }
    }

    #[test]
    fn echo_goes_once_with_the_first_chunk_that_has_text() {
        let mut state = echoing("Say: ");
        // Half a character: nothing to send yet, and the echo waits with its token id.
        state.absorb(0, delta("", &[7], None), Usage::new(3, 1, 0));
        assert!(state.queue.is_empty());
        state.absorb(0, delta("hi", &[8], None), Usage::new(3, 2, 0));
        state.absorb(
            0,
            delta("!", &[9], Some(FinishReason::Length)),
            Usage::new(3, 3, 0),
        );
        let chunks: Vec<serde_json::Value> = state.queue.iter().map(parse).collect();
        assert_eq!(chunks.len(), 2, "{chunks:?}");
        assert_eq!(chunks[0]["choices"][0]["text"], "Say: hi");
        assert_eq!(
            chunks[0]["choices"][0]["token_ids"],
            serde_json::json!([7, 8])
        );
        assert_eq!(chunks[1]["choices"][0]["text"], "!");
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
        assert!(!state.ended);
        state.end();
        let usage = parse(&state.queue[2]);
        assert_eq!(usage["usage"]["prompt_tokens"], 3);
        assert_eq!(usage["usage"]["completion_tokens"], 3);
        assert_eq!(&state.queue[3][..], b"data: [DONE]\n\n");
    }

    #[test]
    fn an_echoing_choice_that_ends_at_once_still_carries_the_prompt() {
        // max_tokens 1 with an empty piece: the finishing chunk is the echoing one.
        let mut state = echoing("Prompt");
        state.absorb(
            0,
            delta("", &[4], Some(FinishReason::Length)),
            Usage::new(3, 1, 0),
        );
        let chunk = parse(&state.queue[0]);
        assert_eq!(chunk["choices"][0]["text"], "Prompt");
        assert_eq!(chunk["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn chat_chunks() {
        let w = writer(ChunkKind::Chat, false);
        let opening = w.opening(0);
        assert_eq!(opening.len(), 1);
        let first = parse(&opening[0]);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first.get("usage").is_none());
        let chunk = parse(&w.delta(0, "Paris".into(), vec![1], None, None));
        assert_eq!(chunk["choices"][0]["delta"]["content"], "Paris");
        assert!(chunk["choices"][0]["delta"].get("role").is_none());
        let last = parse(&w.delta(0, String::new(), vec![], Some(FinishReason::Stop), None));
        assert_eq!(last["choices"][0]["delta"], serde_json::json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
    }
}
