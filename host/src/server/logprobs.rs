//! Log-probabilities in the two OpenAI shapes.
//!
//! The engine gives one [`TokenLogprobs`] per generated token (raw log-softmax, the token's rank
//! and the top alternatives). [`LogprobsRenderer`] turns a run of them into `/v1/completions`'
//! legacy object (`tokens`, `token_logprobs`, `top_logprobs` as `{token: logprob}` maps, most
//! likely first, that also hold the chosen token, and `text_offset`, character offsets that
//! continue across stream chunks; tokens decoding to the same text share a key there, so use
//! `return_tokens_as_token_ids` where that matters) or chat's `{"content": [{token, logprob, bytes, top_logprobs: [...]}]}`. A token is
//! shown as its own decoded text (special tokens included), or, with the vLLM extension
//! `return_tokens_as_token_ids`, as `token_id:N`, which stays exact when several tokens decode to
//! the same text (partial UTF-8 bytes do). A `-inf` log-probability is written as -9999.0 (JSON
//! has no infinity), as vLLM does.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::engine::TokenLogprobs;
use crate::model::ModelInfo;

/// What JSON gets for a log-probability of -inf.
const NEG_INF_LOGPROB: f64 = -9999.0;

/// Which endpoint's shape to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsShape {
    Completion,
    Chat,
}

/// Renders log-probabilities for one response.
#[derive(Clone)]
pub struct LogprobsRenderer {
    model: Arc<ModelInfo>,
    shape: LogprobsShape,
    tokens_as_ids: bool,
}

impl std::fmt::Debug for LogprobsRenderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogprobsRenderer")
            .field("shape", &self.shape)
            .field("tokens_as_ids", &self.tokens_as_ids)
            .finish()
    }
}

fn number(logprob: f32) -> f64 {
    if logprob.is_finite() {
        f64::from(logprob)
    } else {
        NEG_INF_LOGPROB
    }
}

impl LogprobsRenderer {
    pub fn new(model: Arc<ModelInfo>, shape: LogprobsShape, tokens_as_ids: bool) -> Self {
        Self {
            model,
            shape,
            tokens_as_ids,
        }
    }

    /// How a token is shown.
    pub fn token_text(&self, token: u32) -> String {
        if self.tokens_as_ids {
            return format!("token_id:{token}");
        }
        self.model
            .tokenizer
            .decode(&[token], false)
            .unwrap_or_default()
    }

    /// The `logprobs` value of a choice (or chunk) holding `entries`; `text_offset` (completions)
    /// is where the first token's text starts and is advanced past the last one.
    pub fn render(&self, entries: &[TokenLogprobs], text_offset: &mut usize) -> Value {
        match self.shape {
            LogprobsShape::Completion => self.completion(entries, text_offset),
            LogprobsShape::Chat => self.chat(entries),
        }
    }

    fn completion(&self, entries: &[TokenLogprobs], text_offset: &mut usize) -> Value {
        let mut tokens = Vec::with_capacity(entries.len());
        let mut token_logprobs = Vec::with_capacity(entries.len());
        let mut top_logprobs = Vec::with_capacity(entries.len());
        let mut offsets = Vec::with_capacity(entries.len());
        for entry in entries {
            let text = self.token_text(entry.token_id);
            offsets.push(*text_offset);
            *text_offset += text.chars().count();
            // Most likely first (serde_json keeps insertion order here), then the chosen token
            // if it is not among them.
            let mut top = serde_json::Map::new();
            for &(token, logprob) in &entry.top {
                top.entry(self.token_text(token))
                    .or_insert(json!(number(logprob)));
            }
            if !entry.top.iter().any(|&(token, _)| token == entry.token_id) {
                top.entry(text.clone())
                    .or_insert(json!(number(entry.logprob)));
            }
            tokens.push(text);
            token_logprobs.push(number(entry.logprob));
            top_logprobs.push(top);
        }
        json!({
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        })
    }

    fn chat_entry(&self, token: u32, logprob: f32) -> serde_json::Map<String, Value> {
        let text = self.token_text(token);
        let bytes: Vec<u8> = text.as_bytes().to_vec();
        let mut entry = serde_json::Map::new();
        entry.insert("token".into(), Value::String(text));
        entry.insert("logprob".into(), json!(number(logprob)));
        entry.insert("bytes".into(), json!(bytes));
        entry
    }

    fn chat(&self, entries: &[TokenLogprobs]) -> Value {
        let content: Vec<Value> = entries
            .iter()
            .map(|entry| {
                let mut item = self.chat_entry(entry.token_id, entry.logprob);
                let top: Vec<Value> = entry
                    .top
                    .iter()
                    .map(|&(token, logprob)| Value::Object(self.chat_entry(token, logprob)))
                    .collect();
                item.insert("top_logprobs".into(), Value::Array(top));
                Value::Object(item)
            })
            .collect();
        json!({ "content": content })
    }

    /// vLLM's `prompt_logprobs` for a prompt: `null` for its first token, then, per token, a map
    /// from token id to `{logprob, rank, decoded_token}` holding the most likely tokens (ranks 1,
    /// 2, …; the first `top` of each entry) and the prompt's own token with its rank.
    /// `entries[i]` is token `i + 1`'s.
    pub fn prompt_logprobs(&self, entries: &[TokenLogprobs], top: usize) -> Value {
        let item = |token: u32, logprob: f32, rank: usize| {
            json!({
                "logprob": number(logprob),
                "rank": rank,
                "decoded_token": self.model.tokenizer.decode(&[token], false).unwrap_or_default(),
            })
        };
        let mut out = vec![Value::Null];
        for entry in entries {
            let mut map = serde_json::Map::new();
            map.insert(
                entry.token_id.to_string(),
                item(entry.token_id, entry.logprob, entry.rank),
            );
            for (i, &(token, logprob)) in entry.top.iter().take(top).enumerate() {
                map.entry(token.to_string())
                    .or_insert_with(|| item(token, logprob, i + 1));
            }
            out.push(Value::Object(map));
        }
        Value::Array(out)
    }

    /// Completions' legacy object for `echo`: the prompt's tokens first (`prompt_ids`; the first
    /// one's log-probabilities `null`, the others' from `prompt_entries`, each with its `top`
    /// most likely), then the generated ones; offsets run through the echoed text from 0, and
    /// `text_offset` is left after it (a stream's next chunk goes on from there).
    pub fn completion_echo(
        &self,
        prompt_ids: &[u32],
        prompt_entries: &[TokenLogprobs],
        top: usize,
        generated: &[TokenLogprobs],
        text_offset: &mut usize,
    ) -> Value {
        *text_offset = 0;
        let offset = text_offset;
        let Some(&first) = prompt_ids.first() else {
            return self.completion(generated, offset);
        };
        let first_text = self.token_text(first);
        *offset += first_text.chars().count();
        let prompt: Vec<TokenLogprobs> = prompt_entries
            .iter()
            .map(|e| TokenLogprobs {
                top: e.top.iter().copied().take(top).collect(),
                ..e.clone()
            })
            .collect();
        let prompt_part = self.completion(&prompt, offset);
        let generated_part = self.completion(generated, offset);
        let join = |key: &str, head: Value| {
            let mut all = vec![head];
            for part in [&prompt_part, &generated_part] {
                all.extend(part[key].as_array().cloned().unwrap_or_default());
            }
            Value::Array(all)
        };
        json!({
            "tokens": join("tokens", Value::String(first_text)),
            "token_logprobs": join("token_logprobs", Value::Null),
            "top_logprobs": join("top_logprobs", Value::Null),
            "text_offset": join("text_offset", json!(0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BUILTIN_TINY, load_model_files};

    fn renderer(shape: LogprobsShape, as_ids: bool) -> LogprobsRenderer {
        let model = load_model_files(BUILTIN_TINY).expect("builtin:tiny");
        LogprobsRenderer::new(Arc::new(model.info), shape, as_ids)
    }

    fn entries() -> Vec<TokenLogprobs> {
        vec![
            TokenLogprobs {
                token_id: 72,
                logprob: -0.5,
                rank: 2,
                top: vec![(105, -0.25), (72, -0.5)],
            },
            TokenLogprobs {
                token_id: 105,
                logprob: f32::NEG_INFINITY,
                rank: 9,
                top: vec![(33, -0.125)],
            },
        ]
    }

    #[test]
    fn completion_shape_with_offsets_and_the_chosen_token() {
        let r = renderer(LogprobsShape::Completion, true);
        let mut offset = 3;
        let v = r.render(&entries(), &mut offset);
        assert_eq!(v["tokens"], json!(["token_id:72", "token_id:105"]));
        assert_eq!(v["token_logprobs"], json!([-0.5, -9999.0]));
        assert_eq!(v["text_offset"], json!([3, 14]));
        assert_eq!(offset, 3 + 11 + 12);
        // The chosen token joins the top map when it is not among the top ones.
        assert_eq!(
            v["top_logprobs"][1],
            json!({"token_id:33": -0.125, "token_id:105": -9999.0})
        );
        assert_eq!(
            v["top_logprobs"][0],
            json!({"token_id:105": -0.25, "token_id:72": -0.5})
        );
        // Most likely first in the JSON text, as OpenAI lists them.
        let text = serde_json::to_string(&v["top_logprobs"][0]).unwrap();
        assert_eq!(text, r#"{"token_id:105":-0.25,"token_id:72":-0.5}"#);
        // Worst first in the entries: the order is the entries', not alphabetical.
        let reversed = [TokenLogprobs {
            token_id: 5,
            logprob: -3.0,
            rank: 3,
            top: vec![(9, -1.0), (10, -2.0)],
        }];
        let text = serde_json::to_string(&r.render(&reversed, &mut 0)["top_logprobs"][0]).unwrap();
        assert_eq!(
            text,
            r#"{"token_id:9":-1.0,"token_id:10":-2.0,"token_id:5":-3.0}"#
        );
    }

    #[test]
    fn chat_shape_lists_top_alternatives_with_bytes() {
        let r = renderer(LogprobsShape::Chat, false);
        let v = r.render(&entries(), &mut 0);
        let first = &v["content"][0];
        let text = r.token_text(72);
        assert_eq!(first["token"], json!(text));
        assert_eq!(first["bytes"], json!(text.as_bytes()));
        assert_eq!(first["logprob"], json!(-0.5));
        assert_eq!(first["top_logprobs"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["content"][1]["logprob"], json!(-9999.0));
    }

    #[test]
    fn prompt_logprobs_in_vllms_shape_and_echo_with_the_prompt_first() {
        let r = renderer(LogprobsShape::Completion, true);
        let out = r.prompt_logprobs(&entries(), 2);
        assert_eq!(out[0], Value::Null);
        assert_eq!(out[1]["72"]["rank"], 2);
        assert_eq!(out[1]["72"]["logprob"], -0.5);
        assert_eq!(out[1]["105"]["rank"], 1);
        assert_eq!(out[2]["105"]["logprob"], NEG_INF_LOGPROB);
        assert_eq!(out[2]["33"]["rank"], 1);
        assert!(out[1]["72"]["decoded_token"].is_string());
        let mut end = 0;
        let echo = r.completion_echo(&[7, 72, 105], &entries(), 1, &entries()[..1], &mut end);
        assert_eq!(
            echo["tokens"],
            json!(["token_id:7", "token_id:72", "token_id:105", "token_id:72"])
        );
        assert_eq!(echo["token_logprobs"], json!([null, -0.5, -9999.0, -0.5]));
        assert_eq!(echo["top_logprobs"][0], Value::Null);
        // The prompt's tops cut to `top` (1), plus the token itself when it is not among them.
        assert_eq!(
            echo["top_logprobs"][1],
            json!({"token_id:105": -0.25, "token_id:72": -0.5})
        );
        assert_eq!(echo["text_offset"], json!([0, 10, 21, 33]));
    }
}
