//! `POST /v1/chat/completions`: messages rendered with the model's chat template, answered as
//! one `chat.completion` or as `chat.completion.chunk` SSE events. `max_completion_tokens`
//! (or the older `max_tokens`) defaults to what the context leaves, as in vLLM. `logprobs: true`
//! with `top_logprobs: N` (0–20) adds `logprobs.content`; `tools` and non-text `response_format`
//! are refused with a 400. Everything else is the shared [`serving`](super::super::serving)
//! pipeline.

use serde_json::Value;

use crate::engine::MAX_LOGPROBS;

use super::super::errors::{ApiError, ApiJson};
use super::super::openai_types::{ChatChoice, ChatFields, ChatMessageOut, ChatResponse, Usage};
use super::super::openapi::{ChatRequest, GenerationErrors, ServerSentEvent};
use super::super::params::MaxTokensDefault;
use super::super::prompts::{encode_chat, normalize_messages};
use super::super::serving::{Collected, Endpoint, Prompts, openai_handler, serve};
use super::super::sse::{ChunkKind, ChunkWriter};
use super::super::state::AppState;

/// The chat endpoint's part of the [`serving`](super::super::serving) pipeline.
impl Endpoint for ChatFields {
    const KIND: ChunkKind = ChunkKind::Chat;
    type Response = ChatResponse;

    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        refuse_unsupported(self)?;
        requested_logprobs(self)
    }

    fn prompts(self, prompts: &mut Prompts<'_>) -> Result<(), ApiError> {
        let messages = normalize_messages(self.messages.as_ref())?;
        let prompt_ids = encode_chat(
            prompts.model(),
            &messages,
            self.add_generation_prompt.unwrap_or(true),
            self.chat_template_kwargs.as_ref(),
        )?;
        let max_tokens = match self.max_completion_tokens {
            Some(n) => (Some(n), "max_completion_tokens"),
            None => (prompts.max_tokens(), "max_tokens"),
        };
        let default = MaxTokensDefault::RestOfContext;
        prompts.push(("messages".into(), None), prompt_ids, max_tokens, default)
    }

    fn response(head: &ChunkWriter, choices: Vec<Collected>, usage: Usage) -> ChatResponse {
        // One conversation: every choice has the same prompt.
        let prompt_logprobs = choices.first().and_then(|c| c.prompt_logprobs.clone());
        let choices = choices.into_iter().map(|choice| ChatChoice {
            index: choice.index,
            message: ChatMessageOut {
                role: "assistant",
                content: choice.text,
            },
            logprobs: choice.logprobs,
            finish_reason: Some(choice.finish_reason),
            token_ids: choice.token_ids,
            prompt_token_ids: choice.prompt_token_ids,
        });
        ChatResponse {
            id: head.id.clone(),
            object: "chat.completion",
            created: head.created,
            model: head.model.clone(),
            choices: choices.collect(),
            usage,
            prompt_logprobs,
        }
    }
}

/// `logprobs` and `top_logprobs`: how many top alternatives to report, if any.
fn requested_logprobs(fields: &ChatFields) -> Result<Option<usize>, ApiError> {
    let top = match fields.top_logprobs {
        None => None,
        Some(n) => match usize::try_from(n) {
            Ok(n) if n <= MAX_LOGPROBS => Some(n),
            _ => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be from 0 to {MAX_LOGPROBS}, got {n}"),
                ));
            }
        },
    };
    match (fields.logprobs.unwrap_or(false), top) {
        (true, top) => Ok(Some(top.unwrap_or(0))),
        (false, Some(n)) if n > 0 => Err(ApiError::invalid_param(
            "top_logprobs",
            "top_logprobs needs logprobs: true",
        )),
        (false, _) => Ok(None),
    }
}

fn refuse_unsupported(fields: &ChatFields) -> Result<(), ApiError> {
    if fields
        .tools
        .as_ref()
        .is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::unsupported("tools", "tools are not supported"));
    }
    if let Some(format) = &fields.response_format
        && !format.is_null()
        && format.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::unsupported(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported",
        ));
    }
    Ok(())
}

openai_handler!(
    ChatFields,
    "/v1/chat/completions",
    "create_chat_completion",
    ChatRequest,
    ChatResponse,
    "The chat completion; with `stream`, its chunks as server-sent events"
);
