//! Request fields to engine parameters: sampling, stop conditions and the output budget.
//!
//! [`RequestOptions::from_fields`] checks every OpenAI/vLLM sampling field against its range and
//! turns the request into the engine's [`SamplingParams`] and the detokenizer's
//! [`DetokenizerOptions`]; what this server does not implement (`best_of > 1`) is refused with
//! a 400 naming the field rather than silently ignored (log-probabilities are set
//! by each endpoint, whose fields differ). [`resolve_max_tokens`]
//! applies the context-length rule once the prompt is tokenized: the prompt plus `max_tokens`
//! must fit in `max_model_len` (as vLLM checks), and an absent `max_tokens` takes the endpoint's
//! default, capped at what is left of the context.

use crate::engine::{MAX_LOGPROBS, SamplingParams};
use crate::model::DetokenizerOptions;

use super::errors::ApiError;
use super::openai_types::SamplingFields;

/// Everything a generation request asks for except its prompt and `max_tokens`.
#[derive(Debug, Clone)]
pub struct RequestOptions {
    /// `max_tokens` is filled in by [`resolve_max_tokens`].
    pub sampling: SamplingParams,
    pub detokenizer: DetokenizerOptions,
    pub stream: bool,
    pub include_usage: bool,
    pub return_token_ids: bool,
    /// Show tokens in log-probabilities as `token_id:N` (`sampling.logprobs` is set by the
    /// endpoint, whose field differs).
    pub tokens_as_ids: bool,
    /// Choices per prompt (`n`).
    pub n: usize,
    /// `truncate_prompt_tokens`: keep only the prompt's last N tokens (`-1` resolved to
    /// `max_model_len` by [`truncate_prompt`]).
    pub truncate_prompt_tokens: Option<TruncatePrompt>,
    /// The client's `prompt_logprobs` (rendered in the answer). `sampling.prompt_logprobs` is
    /// what the engine computes: this, or what `echo` with `logprobs` needs.
    pub prompt_logprobs: Option<usize>,
    /// Completions' `echo` (set by the endpoint).
    pub echo: bool,
}

impl RequestOptions {
    /// Completions' `echo`: the prompt is prepended to the text and, with `logprobs` (N), its
    /// tokens' log-probabilities (N most likely each) to the log-probabilities (streamed: in
    /// each choice's first chunk, as vLLM does).
    pub fn with_echo(mut self, echo: bool) -> Self {
        if !echo {
            return self;
        }
        self.echo = true;
        if let Some(n) = self.sampling.logprobs {
            let wanted = self.sampling.prompt_logprobs.map_or(n, |p| p.max(n));
            self.sampling.prompt_logprobs = Some(wanted);
        }
        self
    }
}

/// `truncate_prompt_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TruncatePrompt {
    /// The last N tokens.
    Last(usize),
    /// `-1`: the last `max_model_len` tokens.
    MaxModelLen,
}

/// Keeps the last tokens of `prompt_ids` as `truncate` asks (vLLM's left truncation); `None`
/// leaves the prompt whole. A count above `max_model_len` is refused, as by vLLM.
pub fn truncate_prompt(
    prompt_ids: &mut Vec<u32>,
    truncate: Option<TruncatePrompt>,
    max_model_len: usize,
) -> Result<(), ApiError> {
    let keep = match truncate {
        None => return Ok(()),
        Some(TruncatePrompt::MaxModelLen) => max_model_len,
        Some(TruncatePrompt::Last(n)) if n > max_model_len => {
            return Err(ApiError::invalid_param(
                "truncate_prompt_tokens",
                format!(
                    "truncate_prompt_tokens ({n}) is greater than max_model_len ({max_model_len})"
                ),
            ));
        }
        Some(TruncatePrompt::Last(n)) => n,
    };
    if prompt_ids.len() > keep {
        prompt_ids.drain(..prompt_ids.len() - keep);
    }
    Ok(())
}

/// `bad_words` as token sequences, as vLLM tokenizes them: each word (leading spaces removed)
/// alone and after a space, the second kept only when it is a different sequence of the same
/// length (the word is not split differently after a space). `encode` tokenizes without
/// special tokens.
pub fn bad_words_token_ids(
    words: &[String],
    encode: impl Fn(&str) -> Result<Vec<u32>, String>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    for word in words {
        let word = word.trim_start();
        if word.is_empty() {
            return Err(ApiError::invalid_param(
                "bad_words",
                "bad_words may not contain empty words",
            ));
        }
        let alone = encode(word).map_err(|e| ApiError::invalid_param("bad_words", e))?;
        let spaced =
            encode(&format!(" {word}")).map_err(|e| ApiError::invalid_param("bad_words", e))?;
        if alone.is_empty() {
            continue;
        }
        if spaced.len() == alone.len() && spaced.first() != alone.first() {
            out.push(alone);
            out.push(spaced);
        } else {
            out.push(alone);
        }
    }
    Ok(out)
}

/// The most choices (`n`) per prompt.
pub const MAX_CHOICES: usize = 128;

/// The largest `max_tokens` accepted before it is compared with the context (keeps the
/// arithmetic far from overflow).
const MAX_TOKENS_LIMIT: i64 = 1 << 40;

impl RequestOptions {
    /// Checks the shared fields; `vocab_size` bounds `stop_token_ids`.
    pub fn from_fields(fields: &SamplingFields, vocab_size: usize) -> Result<Self, ApiError> {
        let n = match fields.n {
            None => 1,
            Some(n) if (1..=MAX_CHOICES as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "n",
                    format!("n must be from 1 to {MAX_CHOICES}, got {n}"),
                ));
            }
        };
        if let Some(best_of) = fields.best_of
            && best_of != 1
        {
            return Err(ApiError::unsupported(
                "best_of",
                format!("best_of must be 1, got {best_of}"),
            ));
        }
        let mut penalties = [0.0f32; 2];
        for ((name, value), out) in [
            ("presence_penalty", fields.presence_penalty),
            ("frequency_penalty", fields.frequency_penalty),
        ]
        .into_iter()
        .zip(&mut penalties)
        {
            let v = value.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&v) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be between -2 and 2, got {v}"),
                ));
            }
            *out = v as f32;
        }
        let [presence_penalty, frequency_penalty] = penalties;
        let repetition_penalty = fields.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(ApiError::invalid_param(
                "repetition_penalty",
                format!("repetition_penalty must be greater than 0, got {repetition_penalty}"),
            ));
        }
        let min_tokens = match fields.min_tokens {
            None => 0,
            Some(v) => usize::try_from(v).map_err(|_| {
                ApiError::invalid_param(
                    "min_tokens",
                    format!("min_tokens must be at least 0, got {v}"),
                )
            })?,
        };
        let temperature = fields.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = fields.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], got {top_p}"),
            ));
        }
        let top_k = match fields.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(usize::try_from(k).unwrap_or(usize::MAX)),
            Some(k) => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be -1 or 0 (no limit) or at least 1, got {k}"),
                ));
            }
        };
        let stop_token_ids = token_ids_in_vocabulary(
            fields.stop_token_ids.as_deref().unwrap_or_default(),
            vocab_size,
            "stop_token_ids",
        )?;
        let min_p = fields.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::invalid_param(
                "min_p",
                format!("min_p must be in [0, 1], got {min_p}"),
            ));
        }
        let logit_bias = parse_logit_bias(fields.logit_bias.as_ref(), vocab_size)?;
        let allowed_token_ids = match fields.allowed_token_ids.as_deref() {
            None => Vec::new(),
            Some([]) => {
                return Err(ApiError::invalid_param(
                    "allowed_token_ids",
                    "allowed_token_ids may not be empty (leave it out to allow every token)",
                ));
            }
            Some(ids) => token_ids_in_vocabulary(ids, vocab_size, "allowed_token_ids")?,
        };
        let truncate_prompt_tokens = match fields.truncate_prompt_tokens {
            None => None,
            Some(-1) => Some(TruncatePrompt::MaxModelLen),
            Some(n) if n >= 1 => Some(TruncatePrompt::Last(
                usize::try_from(n).unwrap_or(usize::MAX),
            )),
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "truncate_prompt_tokens",
                    format!(
                        "truncate_prompt_tokens must be -1 (max_model_len) or at least 1, got {n}"
                    ),
                ));
            }
        };
        let stream = fields.stream.unwrap_or(false);
        let prompt_logprobs = match fields.prompt_logprobs {
            None => None,
            Some(-1) => {
                return Err(ApiError::unsupported(
                    "prompt_logprobs",
                    format!(
                        "prompt_logprobs -1 (the whole vocabulary) is not supported; ask for 0 to {MAX_LOGPROBS}"
                    ),
                ));
            }
            Some(n) if (0..=MAX_LOGPROBS as i64).contains(&n) => Some(n as usize),
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "prompt_logprobs",
                    format!("prompt_logprobs must be from 0 to {MAX_LOGPROBS}, got {n}"),
                ));
            }
        };
        if prompt_logprobs.is_some() && stream {
            return Err(ApiError::invalid_param(
                "prompt_logprobs",
                "prompt_logprobs are not available when stream is true",
            ));
        }
        if fields.stream_options.is_some() && !stream {
            return Err(ApiError::invalid_param(
                "stream_options",
                "stream_options may only be set when stream is true",
            ));
        }
        let include_usage = fields
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        Ok(Self {
            sampling: SamplingParams {
                max_tokens: 0,
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                // Negative seeds are accepted (as by vLLM) and reinterpreted as unsigned.
                seed: fields.seed.map(|s| s as u64),
                stop_token_ids,
                ignore_eos: fields.ignore_eos.unwrap_or(false),
                eos_token_ids: Vec::new(),
                min_tokens,
                presence_penalty,
                frequency_penalty,
                repetition_penalty: repetition_penalty as f32,
                logprobs: None,
                cache_salt: fields.cache_salt.clone(),
                min_p: min_p as f32,
                logit_bias,
                allowed_token_ids,
                // Tokenized by the endpoint (it holds the tokenizer).
                bad_words_token_ids: Vec::new(),
                // Widened by `echo` with `logprobs` (see `RequestOptions::with_echo`).
                prompt_logprobs,
            },
            detokenizer: DetokenizerOptions {
                skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
                stop: parse_stop(fields.stop.as_ref())?,
                include_stop_str_in_output: fields.include_stop_str_in_output.unwrap_or(false),
                min_tokens,
            },
            stream,
            include_usage,
            return_token_ids: fields.return_token_ids.unwrap_or(false),
            tokens_as_ids: fields.return_tokens_as_token_ids.unwrap_or(false),
            n,
            truncate_prompt_tokens,
            prompt_logprobs,
            echo: false,
        })
    }
}

/// Token ids as a request gave them, each checked to be in `0..vocab_size`; `param` names the
/// field in the error.
pub fn token_ids_in_vocabulary(
    ids: &[i64],
    vocab_size: usize,
    param: &str,
) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        param,
                        format!("token id {id} is outside the vocabulary (size {vocab_size})"),
                    )
                })
        })
        .collect()
}

/// `logit_bias`: token ids (as strings, in the vocabulary) to biases in [-100, 100].
fn parse_logit_bias(
    bias: Option<&std::collections::BTreeMap<String, f64>>,
    vocab_size: usize,
) -> Result<Vec<(u32, f32)>, ApiError> {
    let refuse = |message: String| Err(ApiError::invalid_param("logit_bias", message));
    let mut out = Vec::new();
    for (key, &value) in bias.into_iter().flatten() {
        let Ok(id) = key.trim().parse::<i64>() else {
            return refuse(format!("logit_bias keys are token ids, got `{key}`"));
        };
        let [token] = token_ids_in_vocabulary(&[id], vocab_size, "logit_bias")?[..] else {
            return refuse(format!("token id {id} is outside the vocabulary"));
        };
        if !(-100.0..=100.0).contains(&value) {
            return refuse(format!(
                "the bias of token {id} must be in [-100, 100], got {value}"
            ));
        }
        out.push((token, value as f32));
    }
    Ok(out)
}

/// `stop`: a string or a list of strings (empty strings are dropped).
pub fn parse_stop(stop: Option<&serde_json::Value>) -> Result<Vec<String>, ApiError> {
    use serde_json::Value;
    let bad = || ApiError::invalid_param("stop", "stop must be a string or a list of strings");
    let stops = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

/// How `max_tokens` defaults when the request leaves it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensDefault {
    /// A fixed number (OpenAI's 16 for completions), capped at what the context has left.
    Fixed(usize),
    /// What is left of the context (chat, as vLLM does).
    RestOfContext,
}

/// The output budget: `requested` checked against the context, or the default.
/// `param` names the field (`max_tokens` or `max_completion_tokens`), `prompt_param` the prompt's.
pub fn resolve_max_tokens(
    requested: Option<i64>,
    param: &str,
    default: MaxTokensDefault,
    prompt_len: usize,
    max_model_len: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    if prompt_len >= max_model_len {
        return Err(ApiError::invalid_param(
            prompt_param,
            format!(
                "this model's maximum context length is {max_model_len} tokens, but the prompt has \
                 {prompt_len} tokens, which leaves no room for the completion"
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = max_model_len - prompt_len;
    match requested {
        None => Ok(match default {
            MaxTokensDefault::Fixed(n) => n.min(room),
            MaxTokensDefault::RestOfContext => room,
        }),
        Some(n) if !(1..=MAX_TOKENS_LIMIT).contains(&n) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1, got {n}"),
        )),
        Some(n) => {
            let n = n as usize;
            if n > room {
                Err(ApiError::invalid_param(
                    param,
                    format!(
                        "this model's maximum context length is {max_model_len} tokens, but {} \
                         were requested ({prompt_len} in the prompt, {n} for the completion); \
                         lower {param} or shorten the prompt",
                        prompt_len + n
                    ),
                )
                .with_code("context_length_exceeded"))
            } else {
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: serde_json::Value) -> SamplingFields {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults_follow_openai() {
        let options = RequestOptions::from_fields(&fields(serde_json::json!({})), 100).unwrap();
        assert_eq!(options.sampling.temperature, 1.0);
        assert_eq!(options.sampling.top_p, 1.0);
        assert_eq!(options.sampling.top_k, None);
        assert!(!options.stream && !options.include_usage);
        assert!(options.detokenizer.skip_special_tokens);
    }

    #[test]
    fn fields_are_mapped() {
        let options = RequestOptions::from_fields(
            &fields(serde_json::json!({
                "temperature": 0, "top_p": 0.5, "top_k": 7, "seed": -1, "stop": ["a", ""],
                "ignore_eos": true, "stop_token_ids": [3], "stream": true,
                "stream_options": {"include_usage": true}, "n": 1
            })),
            100,
        )
        .unwrap();
        assert!(options.sampling.is_greedy());
        assert_eq!(options.sampling.top_k, Some(7));
        assert_eq!(options.sampling.seed, Some(u64::MAX));
        assert_eq!(options.detokenizer.stop, vec!["a".to_string()]);
        assert_eq!(options.sampling.stop_token_ids, vec![3]);
        assert!(options.sampling.ignore_eos && options.include_usage);
    }

    #[test]
    fn out_of_range_fields_name_themselves() {
        for (body, param) in [
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 129}), "n"),
            (serde_json::json!({"temperature": -0.1}), "temperature"),
            (serde_json::json!({"temperature": 2.5}), "temperature"),
            (serde_json::json!({"top_p": 0}), "top_p"),
            (serde_json::json!({"top_p": 1.5}), "top_p"),
            (serde_json::json!({"top_k": -2}), "top_k"),
            (serde_json::json!({"stop": 3}), "stop"),
            (serde_json::json!({"stop": ["a", 1]}), "stop"),
            (
                serde_json::json!({"stop_token_ids": [100]}),
                "stop_token_ids",
            ),
            (
                serde_json::json!({"presence_penalty": 2.5}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"frequency_penalty": -2.01}),
                "frequency_penalty",
            ),
            (
                serde_json::json!({"repetition_penalty": 0}),
                "repetition_penalty",
            ),
            (serde_json::json!({"min_tokens": -1}), "min_tokens"),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ] {
            let error = RequestOptions::from_fields(&fields(body.clone()), 100).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{body}");
            assert_eq!(error.status.as_u16(), 400);
        }
    }

    #[test]
    fn max_tokens_must_fit_the_context() {
        let fixed = MaxTokensDefault::Fixed(16);
        assert_eq!(
            resolve_max_tokens(None, "max_tokens", fixed, 10, 100, "prompt"),
            Ok(16)
        );
        assert_eq!(
            resolve_max_tokens(None, "max_tokens", fixed, 90, 100, "prompt"),
            Ok(10)
        );
        assert_eq!(
            resolve_max_tokens(
                None,
                "max_tokens",
                MaxTokensDefault::RestOfContext,
                10,
                100,
                "prompt"
            ),
            Ok(90)
        );
        assert_eq!(
            resolve_max_tokens(Some(90), "max_tokens", fixed, 10, 100, "prompt"),
            Ok(90)
        );
        let over = resolve_max_tokens(Some(91), "max_tokens", fixed, 10, 100, "prompt");
        assert_eq!(
            over.unwrap_err().param.as_deref(),
            Some("max_tokens"),
            "too many"
        );
        let zero = resolve_max_tokens(Some(0), "max_completion_tokens", fixed, 1, 100, "m");
        assert_eq!(
            zero.unwrap_err().param.as_deref(),
            Some("max_completion_tokens")
        );
        let full = resolve_max_tokens(Some(1), "max_tokens", fixed, 100, 100, "messages");
        let full = full.unwrap_err();
        assert_eq!(full.param.as_deref(), Some("messages"));
        assert_eq!(full.code, Some("context_length_exceeded"));
    }

    #[test]
    fn truncation_keeps_the_last_tokens_and_refuses_more_than_the_context() {
        let mut ids: Vec<u32> = (0..10).collect();
        truncate_prompt(&mut ids, Some(TruncatePrompt::Last(3)), 100).unwrap();
        assert_eq!(ids, [7, 8, 9]);
        truncate_prompt(&mut ids, Some(TruncatePrompt::Last(5)), 100).unwrap();
        assert_eq!(ids, [7, 8, 9]);
        let mut long: Vec<u32> = (0..10).collect();
        truncate_prompt(&mut long, Some(TruncatePrompt::MaxModelLen), 4).unwrap();
        assert_eq!(long, [6, 7, 8, 9]);
        let error = truncate_prompt(&mut long, Some(TruncatePrompt::Last(5)), 4).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("truncate_prompt_tokens"));
        for bad in [0, -2] {
            let body = serde_json::json!({"truncate_prompt_tokens": bad});
            let error = RequestOptions::from_fields(&fields(body), 100).unwrap_err();
            assert_eq!(
                error.param.as_deref(),
                Some("truncate_prompt_tokens"),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_words_are_tokenized_alone_and_after_a_space_as_vllm_does() {
        // A toy tokenizer: one token per character, a leading space merged into the next one.
        let encode = |text: &str| -> Result<Vec<u32>, String> {
            let mut out = Vec::new();
            let mut space = false;
            for c in text.chars() {
                if c == ' ' {
                    space = true;
                    continue;
                }
                out.push(u32::from(c) + if space { 1000 } else { 0 });
                space = false;
            }
            Ok(out)
        };
        let words = ["ab".to_string(), "  c".to_string()];
        let ids = bad_words_token_ids(&words, encode).unwrap();
        assert_eq!(ids, [vec![97, 98], vec![1097, 98], vec![99], vec![1099]]);
        // After a space the word splits differently (another length): only the bare form.
        let merged = |text: &str| -> Result<Vec<u32>, String> {
            Ok(if text.starts_with(' ') {
                vec![1, 2, 3]
            } else {
                vec![9]
            })
        };
        assert_eq!(
            bad_words_token_ids(&["x".into()], merged).unwrap(),
            [vec![9]]
        );
        let error = bad_words_token_ids(&[" ".into()], encode).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("bad_words"));
    }
}
