//! `POST /v1/completions`: a prompt (text or token ids), or a batch of them, continued by the
//! model `n` times each, as one JSON answer or as SSE chunks (choice `index` = prompt number ×
//! `n` + choice number). `max_tokens` defaults to 16 (OpenAI's default), capped at what the
//! context leaves. `logprobs: N` (0–20) adds the legacy log-probabilities object (the chosen
//! token's and the N most likely); `echo` prepends the prompt (and its tokens'
//! log-probabilities); `suffix` is refused with a 400. Everything else is the shared
//! [`serving`](super::super::serving) pipeline.

use serde_json::Value;

use crate::engine::MAX_LOGPROBS;

use super::super::errors::{ApiError, ApiJson};
use super::super::openai_types::{CompletionChoice, CompletionFields, CompletionResponse, Usage};
use super::super::openapi::{CompletionRequest, GenerationErrors, ServerSentEvent};
use super::super::params::MaxTokensDefault;
use super::super::prompts::{PromptInput, encode_prompt, parse_prompts};
use super::super::serving::{Collected, Endpoint, Prompts, openai_handler, serve};
use super::super::sse::{ChunkKind, ChunkWriter};
use super::super::state::AppState;

/// OpenAI's default `max_tokens` for completions.
const DEFAULT_MAX_TOKENS: usize = 16;

/// The completions endpoint's part of the [`serving`](super::super::serving) pipeline.
impl Endpoint for CompletionFields {
    const KIND: ChunkKind = ChunkKind::Completion;
    type Response = CompletionResponse;

    fn echo(&self) -> bool {
        self.echo == Some(true)
    }

    fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        let logprobs = match &self.logprobs {
            None | Some(Value::Null) => None,
            Some(value) => match value.as_u64() {
                Some(n) if n as usize <= MAX_LOGPROBS => Some(n as usize),
                _ => {
                    return Err(ApiError::invalid_param(
                        "logprobs",
                        format!(
                            "logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {value}"
                        ),
                    ));
                }
            },
        };
        if self
            .suffix
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_str() != Some(""))
        {
            return Err(ApiError::unsupported("suffix", "suffix is not supported"));
        }
        Ok(logprobs)
    }

    /// Tokenizes and sizes every prompt before any starts, so a bad one wastes no work.
    fn prompts(self, prompts: &mut Prompts<'_>) -> Result<(), ApiError> {
        let inputs = parse_prompts(self.prompt.as_ref())?;
        let batched = inputs.len() > 1;
        prompts.check_choice_count(inputs.len())?;
        for (p, input) in inputs.into_iter().enumerate() {
            let param = if batched {
                format!("prompt[{p}]")
            } else {
                "prompt".to_string()
            };
            let text = match &input {
                PromptInput::Text(text) => Some(text.clone()),
                PromptInput::TokenIds(_) => None,
            };
            let prompt_ids = encode_prompt(prompts.model(), input, &param)?;
            let max_tokens = (prompts.max_tokens(), "max_tokens");
            let default = MaxTokensDefault::Fixed(DEFAULT_MAX_TOKENS);
            prompts.push((param, text), prompt_ids, max_tokens, default)?;
        }
        Ok(())
    }

    fn response(head: &ChunkWriter, choices: Vec<Collected>, usage: Usage) -> CompletionResponse {
        let choices = choices.into_iter().map(|choice| CompletionChoice {
            index: choice.index,
            text: choice.text,
            logprobs: choice.logprobs,
            finish_reason: Some(choice.finish_reason),
            token_ids: choice.token_ids,
            prompt_token_ids: choice.prompt_token_ids,
            prompt_logprobs: choice.prompt_logprobs,
        });
        CompletionResponse {
            id: head.id.clone(),
            object: "text_completion",
            created: head.created,
            model: head.model.clone(),
            choices: choices.collect(),
            usage: Some(Some(usage)),
        }
    }
}

openai_handler!(
    CompletionFields,
    "/v1/completions",
    "create_completion",
    CompletionRequest,
    CompletionResponse,
    "The completion; with `stream`, its chunks as server-sent events"
);
