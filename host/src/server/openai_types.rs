//! The OpenAI wire format: request fields as they arrive and the responses and stream chunks
//! the server sends, as serde types.
//!
//! A request body is first parsed as one JSON object, then read twice: once as
//! [`SamplingFields`] (what `/v1/completions` and `/v1/chat/completions` share: `max_tokens`,
//! `temperature`, `stop`, `stream_options`, …, plus the vLLM extensions `top_k`, `ignore_eos`,
//! `stop_token_ids`, `skip_special_tokens`, `include_stop_str_in_output`, `return_token_ids`) and
//! once as the endpoint's own fields. Flexible fields (`prompt`, `stop`, `messages`) stay JSON
//! values and are checked by hand, so every error can name the field. Unknown fields are
//! ignored, as by the OpenAI API. Responses carry `id`, `object`, `created`, `model`,
//! `choices` and `usage` exactly as the official SDKs expect. Every type also derives
//! `utoipa::ToSchema`, so `GET /openapi.json` is generated from these very types (the `schema`
//! attributes state the ranges the handlers check and the shapes of the JSON-valued fields).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::openapi::{ChatMessage, Stop};

/// Fields both generation endpoints accept.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct SamplingFields {
    pub model: Option<String>,
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// vLLM extension; `-1` or `0` means no limit.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    /// A string or a list of strings.
    #[schema(value_type = Option<Stop>)]
    pub stop: Option<Value>,
    /// vLLM extension: generation stops after any of these tokens.
    #[schema(value_type = Option<Vec<u32>>)]
    pub stop_token_ids: Option<Vec<i64>>,
    /// Choices per prompt.
    #[schema(minimum = 1, maximum = 128)]
    pub n: Option<i64>,
    /// Only 1 is supported.
    #[schema(minimum = 1, maximum = 1)]
    pub best_of: Option<i64>,
    /// vLLM extension: keep generating after an end-of-sequence token.
    pub ignore_eos: Option<bool>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    #[schema(exclusive_minimum = 0)]
    pub repetition_penalty: Option<f64>,
    #[schema(minimum = 0)]
    pub min_tokens: Option<i64>,
    pub skip_special_tokens: Option<bool>,
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM extension: add `token_ids` to every choice (and `prompt_token_ids`).
    pub return_token_ids: Option<bool>,
    /// vLLM extension: show tokens in log-probabilities as `token_id:N`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM extension: the request's prefix-cache namespace.
    pub cache_salt: Option<String>,
    /// vLLM extension: drop tokens less likely than `min_p` × the most likely one (0: off).
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    /// Token id (as a string) → bias in [-100, 100], added to the token's logit.
    #[schema(value_type = Option<std::collections::BTreeMap<String, f64>>)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    /// vLLM extension: only these tokens can be generated.
    #[schema(value_type = Option<Vec<u32>>)]
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM extension: words that are never generated (each as tokenized alone and after a
    /// space; the last token of a word is banned once the output ends with the rest of it).
    pub bad_words: Option<Vec<String>>,
    /// vLLM extension: keep only the prompt's last N tokens (`-1`: the last `max_model_len`).
    #[schema(minimum = -1)]
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM extension: each prompt token's log-probability (given the tokens before it) with
    /// this many most likely alternatives, as `prompt_logprobs` (not with `stream`).
    #[schema(minimum = 0, maximum = 20)]
    pub prompt_logprobs: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Fields only `/v1/completions` has.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CompletionFields {
    /// A string or a list of token ids, or a batch: a list of either.
    #[schema(schema_with = super::openapi::prompt_schema, required = true)]
    pub prompt: Option<Value>,
    /// Prepend the prompt to the text (and, with `logprobs`, its tokens' log-probabilities to
    /// the log-probabilities, the first one `null`). Not with `stream`.
    pub echo: Option<bool>,
    /// How many most likely alternatives to report with each token.
    #[schema(value_type = Option<u32>, minimum = 0, maximum = 20)]
    pub logprobs: Option<Value>,
    /// Not supported: only empty.
    #[schema(value_type = Option<String>)]
    pub suffix: Option<Value>,
}

/// Fields only `/v1/chat/completions` has.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ChatFields {
    #[schema(value_type = Vec<ChatMessage>, min_items = 1)]
    pub messages: Option<Value>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<i64>,
    /// Not supported: absent, `null` or empty.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// Only `{"type": "text"}` is supported.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// vLLM extension (default true).
    pub add_generation_prompt: Option<bool>,
    /// vLLM extension: extra variables for the chat template.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A `/v1/completions` answer, or one of its stream chunks (`object` is `text_completion` in
/// both cases, as OpenAI does).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Absent, `null` (stream chunks with `include_usage`), or the usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a completion (or of a completion chunk).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token a map from
    /// token id to `{logprob, rank, decoded_token}` (the token itself and the most likely ones).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Option<Object>>>)]
    pub prompt_logprobs: Option<Value>,
}

/// A `/v1/chat/completions` answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's `prompt_logprobs` of the rendered conversation (see the completions choice's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Option<Object>>>)]
    pub prompt_logprobs: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    pub content: String,
}

/// A `chat.completion.chunk`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub usage: Option<Option<Usage>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// Where the weights came from (`builtin:tiny` or the directory).
    pub root: String,
    pub max_model_len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_null_and_absent_differ() {
        let chunk = |usage| CompletionResponse {
            id: "cmpl-1".into(),
            object: "text_completion",
            created: 1,
            model: "m".into(),
            choices: vec![],
            usage,
        };
        let absent = serde_json::to_value(chunk(None)).unwrap();
        assert!(absent.get("usage").is_none());
        let null = serde_json::to_value(chunk(Some(None))).unwrap();
        assert!(null["usage"].is_null() && null.get("usage").is_some());
        let full = serde_json::to_value(chunk(Some(Some(Usage::new(3, 4, 2))))).unwrap();
        assert_eq!(full["usage"]["total_tokens"], 7);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    }
}
