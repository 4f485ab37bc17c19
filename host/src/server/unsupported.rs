//! Request fields `vllm serve` accepts that stepscope does not implement, and fields nobody
//! defines: refused by name, never ignored. A client that sends one of them with anything but its default (or `null`) gets a 400
//! `unsupported_parameter` naming the field, so it never receives a 200 whose output ignores a
//! constraint it asked for (a `guided_json` schema, a beam search). The default
//! values are accepted because that is what stepscope does anyway (clients that always send
//! `"priority": 0` or `"use_beam_search": false` keep working). Fields OpenAI defines that do not
//! change the output (`user`, `metadata`, `store`, `service_tier`) stay accepted, and the fields
//! stepscope implements are parsed by the endpoints. Any other field (a typo such as
//! `max_token`, or a vLLM field this list does not know) is refused as unknown by
//! [`refuse_unknown`], so a misspelt constraint never silently does nothing.

use serde_json::{Value, json};

use super::errors::ApiError;
use super::sse::ChunkKind;

/// `(field, default)`: vLLM's request fields that stepscope does not implement, with the value
/// that means "not used". `null` is always accepted too.
fn unimplemented_fields(kind: ChunkKind) -> Vec<(&'static str, Value)> {
    let mut fields = vec![
        // vLLM's sampling extensions.
        ("use_beam_search", json!(false)),
        ("length_penalty", json!(1.0)),
        ("spaces_between_special_tokens", json!(true)),
        ("priority", json!(0)),
        // Structured outputs.
        ("guided_json", Value::Null),
        ("guided_regex", Value::Null),
        ("guided_choice", Value::Null),
        ("guided_grammar", Value::Null),
        ("guided_json_object", json!(false)),
        ("guided_decoding_backend", Value::Null),
        ("guided_whitespace_pattern", Value::Null),
        ("structural_tag", Value::Null),
        ("structured_outputs", Value::Null),
        // Disaggregated serving and extensions.
        ("kv_transfer_params", Value::Null),
        ("vllm_xargs", Value::Null),
        // vLLM's body `request_id` (stepscope takes the `X-Request-Id` header instead).
        ("request_id", Value::Null),
        ("logits_processors", Value::Null),
        ("prompt_embeds", Value::Null),
        ("mm_processor_kwargs", Value::Null),
        // OpenAI fields that would change the output.
        ("reasoning_effort", Value::Null),
        ("prediction", Value::Null),
        ("audio", Value::Null),
        ("web_search_options", Value::Null),
        ("functions", Value::Null),
        ("function_call", Value::Null),
    ];
    match kind {
        ChunkKind::Chat => fields.extend([
            // vLLM's chat `echo` (prepend the last message of the same role).
            ("echo", json!(false)),
            ("documents", Value::Null),
            ("chat_template", Value::Null),
            ("chat_template_kwargs", Value::Null),
            ("continue_final_message", json!(false)),
            ("add_generation_prompt", json!(true)),
            ("add_special_tokens", json!(false)),
            ("parallel_tool_calls", json!(true)),
        ]),
        ChunkKind::Completion => fields.extend([("add_special_tokens", json!(true))]),
    }
    fields
}

/// OpenAI's fields that do not change what is generated: accepted, and not used.
const ACCEPTED_UNUSED: [&str; 5] = ["user", "metadata", "store", "service_tier", "tool_choice"];

/// Refuses the first field of `body` that is neither one the endpoint parses (`known`: the
/// properties of its request types), nor one of [`unimplemented_fields`] (refused when set by
/// [`refuse_unimplemented`], accepted at their defaults), nor in [`ACCEPTED_UNUSED`].
pub fn refuse_unknown(
    body: &Value,
    kind: ChunkKind,
    known: &std::collections::BTreeSet<String>,
) -> Result<(), ApiError> {
    let Some(object) = body.as_object() else {
        return Ok(());
    };
    let unimplemented = unimplemented_fields(kind);
    for field in object.keys() {
        let listed = unimplemented.iter().any(|(name, _)| name == field);
        if !known.contains(field) && !listed && !ACCEPTED_UNUSED.contains(&field.as_str()) {
            return Err(ApiError::unsupported(
                field,
                format!(
                    "unknown field `{field}`: this server does not know it, and would ignore it"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `value` means "not used" for a field whose default is `default`.
fn is_default(value: &Value, default: &Value) -> bool {
    match (value, default) {
        (Value::Null, _) => true,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(_)) => a.is_empty(),
        (Value::Object(a), Value::Object(_)) => a.is_empty(),
        (a, b) => a == b,
    }
}

/// Refuses the first field of `body` (a JSON object) that stepscope does not implement and that
/// is set to something other than its default.
pub fn refuse_unimplemented(body: &Value, kind: ChunkKind) -> Result<(), ApiError> {
    for (field, default) in unimplemented_fields(kind) {
        if let Some(value) = body.get(field)
            && !is_default(value, &default)
        {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported by this server (it would be ignored)"),
            ));
        }
    }
    // `tool_choice` means nothing without tools (which are refused when given).
    if let Some(choice) = body.get("tool_choice")
        && !matches!(choice.as_str(), Some("none" | "auto"))
        && !choice.is_null()
    {
        return Err(ApiError::unsupported(
            "tool_choice",
            "`tool_choice` is not supported by this server (no tools can be called)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_fields_are_refused_by_name_and_defaults_pass() {
        let chat = ChunkKind::Chat;
        for (field, value) in [
            ("guided_json", json!({"type": "object"})),
            ("use_beam_search", json!(true)),
            ("priority", json!(-1)),
            ("structured_outputs", json!({"regex": "a+"})),
            ("tool_choice", json!("required")),
        ] {
            let error = refuse_unimplemented(&json!({ field: value }), chat).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(field));
            assert_eq!(error.code, Some("unsupported_parameter"));
        }
        for body in [
            json!({"priority": 0, "use_beam_search": false}),
            json!({"guided_json": null, "echo": false, "length_penalty": 1}),
            json!({"user": "u", "metadata": {"a": "b"}, "tool_choice": "none"}),
        ] {
            assert!(refuse_unimplemented(&body, chat).is_ok(), "{body}");
        }
        // add_special_tokens' default differs by endpoint, as in vLLM.
        let special = json!({"add_special_tokens": true});
        assert!(refuse_unimplemented(&special, ChunkKind::Completion).is_ok());
        assert!(refuse_unimplemented(&special, chat).is_err());
    }

    #[test]
    fn unknown_fields_are_refused_by_name_and_listed_ones_are_not() {
        let known: std::collections::BTreeSet<String> =
            ["model", "prompt", "max_tokens"].map(String::from).into();
        let kind = ChunkKind::Completion;
        let body = json!({"model": "m", "prompt": "p", "user": "u", "guided_json": null});
        assert!(refuse_unknown(&body, kind, &known).is_ok());
        let typo = json!({"model": "m", "max_token": 5});
        let error = refuse_unknown(&typo, kind, &known).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("max_token"));
        assert_eq!(error.code, Some("unsupported_parameter"));
        assert!(error.message.contains("unknown field `max_token`"));
    }
}
