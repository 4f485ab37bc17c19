//! Prompts: a completion's `prompt` and a chat's `messages` turned into prompt token ids.
//!
//! A completion prompt is a string (tokenized with the model's special tokens, e.g. BOS, as
//! `stepscope generate` does) or a list of token ids; a list of either is a batch of prompts,
//! each answered by its own choices. Chat messages are checked
//! (`role` a string, `content` a string, `null`, or a list of `text` parts, which are joined with
//! newlines as vLLM does), rendered with the model's own chat template through
//! `ChatTemplate::render_json` (so extra fields such as `name` reach templates that use them),
//! and tokenized without adding special tokens again: the template has them.

use serde_json::{Map, Value};

use crate::model::ModelInfo;

use super::errors::ApiError;

/// A completion prompt as the request gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    Text(String),
    TokenIds(Vec<u32>),
}

/// The most prompts one completion request may carry.
pub const MAX_PROMPTS: usize = 256;

/// Reads `prompt`: one prompt, or a batch (a list of strings or of token-id lists), each of
/// which becomes its own choices.
pub fn parse_prompts(prompt: Option<&Value>) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || {
        ApiError::invalid_param(
            "prompt",
            "prompt must be a string, a list of token ids, or a list of either",
        )
    };
    match prompt {
        None | Some(Value::Null) => Err(ApiError::invalid_param("prompt", "prompt is required")),
        Some(Value::String(text)) => Ok(vec![PromptInput::Text(text.clone())]),
        Some(Value::Array(items)) if items.is_empty() => {
            Err(ApiError::invalid_param("prompt", "the prompt is empty"))
        }
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            Ok(vec![PromptInput::TokenIds(token_ids("prompt", items)?)])
        }
        Some(Value::Array(items)) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            if items.len() > MAX_PROMPTS {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!(
                        "at most {MAX_PROMPTS} prompts per request, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let param = format!("prompt[{i}]");
                    match item {
                        Value::String(text) => Ok(PromptInput::Text(text.clone())),
                        Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_number) => {
                            token_ids(&param, ids).map(PromptInput::TokenIds)
                        }
                        _ => Err(ApiError::invalid_param(
                            &param,
                            "each prompt of a batch must be a string or a non-empty list of token ids",
                        )),
                    }
                })
                .collect()
        }
        Some(_) => Err(bad()),
    }
}

fn token_ids(param: &str, items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|item| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        param,
                        format!("prompt token ids must be integers in [0, 2^32), got {item}"),
                    )
                })
        })
        .collect()
}

/// Tokenizes a completion prompt (text gets the model's special tokens, as `generate` does);
/// `param` names it in errors (`prompt`, or `prompt[i]` in a batch).
pub fn encode_prompt(
    model: &ModelInfo,
    prompt: PromptInput,
    param: &str,
) -> Result<Vec<u32>, ApiError> {
    match prompt {
        PromptInput::TokenIds(ids) => Ok(ids),
        PromptInput::Text(text) => model
            .tokenizer
            .encode(&text, true)
            .map_err(|e| ApiError::invalid_param(param, format!("cannot tokenize: {e}"))),
    }
}

/// Checks `messages` and flattens text content parts; returns the messages for the template.
pub fn normalize_messages(messages: Option<&Value>) -> Result<Value, ApiError> {
    let items = match messages {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_param("messages", "messages is empty"));
        }
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param("messages", "messages is required"));
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must be a list of message objects",
            ));
        }
    };
    items
        .iter()
        .enumerate()
        .map(|(i, message)| normalize_message(i, message))
        .collect::<Result<Vec<Value>, ApiError>>()
        .map(Value::Array)
}

fn normalize_message(index: usize, message: &Value) -> Result<Value, ApiError> {
    let param = format!("messages[{index}]");
    let Value::Object(fields) = message else {
        return Err(ApiError::invalid_param(
            &param,
            format!("{param} must be an object with `role` and `content`"),
        ));
    };
    if !matches!(fields.get("role"), Some(Value::String(_))) {
        return Err(ApiError::invalid_param(
            &format!("{param}.role"),
            format!("{param}.role must be a string"),
        ));
    }
    let content = match fields.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => text_parts(&param, parts)?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                &format!("{param}.content"),
                format!("{param}.content must be a string or a list of text parts"),
            ));
        }
    };
    let mut normalized: Map<String, Value> = fields.clone();
    normalized.insert("content".into(), Value::String(content));
    Ok(Value::Object(normalized))
}

fn text_parts(param: &str, parts: &[Value]) -> Result<String, ApiError> {
    let texts = parts
        .iter()
        .enumerate()
        .map(|(j, part)| {
            let part_param = format!("{param}.content[{j}]");
            match (part.get("type").and_then(Value::as_str), part.get("text")) {
                (Some("text"), Some(Value::String(text))) => Ok(text.as_str()),
                (Some("text"), _) => Err(ApiError::invalid_param(
                    &part_param,
                    format!("{part_param} has type `text` but no string `text`"),
                )),
                (Some(other), _) => Err(ApiError::unsupported(
                    &part_param,
                    format!("content parts of type `{other}` are not supported (text only)"),
                )),
                (None, _) => Err(ApiError::invalid_param(
                    &part_param,
                    format!("{part_param} must be an object with a `type`"),
                )),
            }
        })
        .collect::<Result<Vec<&str>, ApiError>>()?;
    Ok(texts.join("\n"))
}

/// Renders normalized messages with the model's chat template and tokenizes the result.
pub fn encode_chat(
    model: &ModelInfo,
    messages: &Value,
    add_generation_prompt: bool,
    template_kwargs: Option<&Map<String, Value>>,
) -> Result<Vec<u32>, ApiError> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(format!(
            "model `{}` has no chat template; use /v1/completions",
            model.name
        ))
    })?;
    let text = template
        .render_json(messages, add_generation_prompt, template_kwargs)
        .map_err(|e| ApiError::invalid_param("messages", format!("{e}")))?;
    model
        .tokenizer
        .encode(&text, false)
        .map_err(|e| ApiError::invalid_param("messages", format!("cannot tokenize: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_of_every_shape() {
        let text = |t: &str| PromptInput::Text(t.into());
        assert_eq!(parse_prompts(Some(&json!("hi"))), Ok(vec![text("hi")]));
        assert_eq!(parse_prompts(Some(&json!(["hi"]))), Ok(vec![text("hi")]));
        assert_eq!(
            parse_prompts(Some(&json!([1, 2]))),
            Ok(vec![PromptInput::TokenIds(vec![1, 2])])
        );
        assert_eq!(
            parse_prompts(Some(&json!([[3], "a", "b"]))),
            Ok(vec![PromptInput::TokenIds(vec![3]), text("a"), text("b")])
        );
        for (bad, param) in [
            (json!(null), "prompt"),
            (json!(3), "prompt"),
            (json!([]), "prompt"),
            (json!([-1]), "prompt"),
            (json!([1.5]), "prompt"),
            (json!(["a", [1, -2]]), "prompt[1]"),
            (json!(["a", []]), "prompt[1]"),
            (json!([[1], ["x"]]), "prompt[1]"),
            (json!({"a": 1}), "prompt"),
            (json!(vec!["a"; MAX_PROMPTS + 1]), "prompt"),
        ] {
            let error = parse_prompts(Some(&bad)).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{bad}");
        }
        assert!(parse_prompts(None).is_err());
    }

    #[test]
    fn messages_are_checked_and_flattened() {
        let messages = normalize_messages(Some(&json!([
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
            {"role": "assistant", "content": null},
        ])))
        .unwrap();
        assert_eq!(messages[1]["content"], "a\nb");
        assert_eq!(messages[1]["name"], "x");
        assert_eq!(messages[2]["content"], "");
        for (bad, param) in [
            (json!([]), "messages"),
            (json!("hi"), "messages"),
            (json!([1]), "messages[0]"),
            (json!([{"content": "x"}]), "messages[0].role"),
            (
                json!([{"role": "user", "content": 5}]),
                "messages[0].content",
            ),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                "messages[0].content[0]",
            ),
        ] {
            let error = normalize_messages(Some(&bad)).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{bad}");
        }
    }

    #[test]
    fn chat_encoding_matches_the_model_helper() {
        let model = crate::model::tiny::tiny_model().info;
        let messages =
            normalize_messages(Some(&json!([{"role": "user", "content": "hi"}]))).unwrap();
        let ids = encode_chat(&model, &messages, true, None).unwrap();
        let expected = model
            .encode_chat(&[crate::model::ChatMessage::new("user", "hi")])
            .unwrap();
        assert_eq!(ids, expected);
    }
}
