//! Streaming detokenization and stop strings. [`IncrementalDetokenizer`] turns generated token
//! ids into text deltas that never split a UTF-8 character: it decodes a small window of ids
//! twice (up to the last emitted token, and up to the newest one) and emits the difference only
//! once it no longer ends in U+FFFD (the prefix-offset/read-offset technique of vLLM and TGI,
//! which also keeps SentencePiece leading-space handling right). Stop strings are searched in
//! the decoded text; a match truncates the text there and reports the stop, and text that could
//! still turn out to be the start of a stop string is held back until it is known not to be.

use super::error::ModelError;
use super::tokenizer::TextTokenizer;

/// How many prompt tokens before the first output token are decoded as context.
const PROMPT_CONTEXT_TOKENS: usize = 5;

/// Per-request detokenization settings.
#[derive(Debug, Clone)]
pub struct DetokenizerOptions {
    /// Leave special tokens (EOS, chat markers) out of the text.
    pub skip_special_tokens: bool,
    /// Generation stops at the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep the matched stop string at the end of the text (OpenAI's default is to drop it).
    pub include_stop_str_in_output: bool,
    /// Stop strings are looked for only in text that tokens after the first `min_tokens` add
    /// (vLLM's rule; the sampler holds back stop tokens as long).
    pub min_tokens: usize,
}

impl Default for DetokenizerOptions {
    fn default() -> Self {
        DetokenizerOptions {
            skip_special_tokens: true,
            stop: Vec::new(),
            include_stop_str_in_output: false,
            min_tokens: 0,
        }
    }
}

/// What one new token produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetokenizerStep {
    /// Text that may be streamed now (possibly empty).
    pub delta: String,
    /// The stop string matched by this token, if any: the request should finish.
    pub stop: Option<String>,
}

/// Incremental detokenizer of one request.
#[derive(Debug, Clone)]
pub struct IncrementalDetokenizer {
    tokenizer: TextTokenizer,
    opts: DetokenizerOptions,
    /// Prompt tail followed by every output token.
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Decoded output text (truncated at a stop string).
    text: String,
    /// Bytes of `text` already returned as deltas.
    emitted: usize,
    max_stop_len: usize,
    stopped: Option<String>,
    num_output_tokens: usize,
}

impl IncrementalDetokenizer {
    /// Starts detokenizing the output of a request whose prompt was `prompt_ids`.
    pub fn new(tokenizer: TextTokenizer, prompt_ids: &[u32], opts: DetokenizerOptions) -> Self {
        let tail = &prompt_ids[prompt_ids.len().saturating_sub(PROMPT_CONTEXT_TOKENS + 1)..];
        let read_offset = tail.len();
        let prefix_offset = read_offset.saturating_sub(PROMPT_CONTEXT_TOKENS);
        let max_stop_len = opts.stop.iter().map(String::len).max().unwrap_or(0);
        IncrementalDetokenizer {
            tokenizer,
            opts,
            ids: tail.to_vec(),
            prefix_offset,
            read_offset,
            text: String::new(),
            emitted: 0,
            max_stop_len,
            stopped: None,
            num_output_tokens: 0,
        }
    }

    /// Adds one generated token. After a stop has been reported further tokens are ignored.
    pub fn push(&mut self, token: u32) -> Result<DetokenizerStep, ModelError> {
        if self.stopped.is_some() {
            return Ok(DetokenizerStep::default());
        }
        self.num_output_tokens += 1;
        self.ids.push(token);
        let skip = self.opts.skip_special_tokens;
        let prefix_text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let new_text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..], skip)?;
        let old_len = self.text.len();
        if new_text.len() > prefix_text.len() && !new_text.ends_with('\u{FFFD}') {
            let delta = match new_text.strip_prefix(prefix_text.as_str()) {
                Some(rest) => rest.to_owned(),
                // The window's text changed shape (rare normalisations): fall back to counting
                // characters, as vLLM does.
                None => new_text.chars().skip(prefix_text.chars().count()).collect(),
            };
            self.text.push_str(&delta);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep the window small: drop ids before the prefix offset.
            if self.prefix_offset > 64 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
        }
        let stop = if self.num_output_tokens > self.opts.min_tokens {
            self.check_stop(old_len)
        } else {
            None
        };
        let release = if self.stopped.is_some() {
            self.text.len()
        } else {
            self.text.len() - self.held_back_len()
        };
        let delta = if release > self.emitted {
            let d = self.text[self.emitted..release].to_owned();
            self.emitted = release;
            d
        } else {
            String::new()
        };
        Ok(DetokenizerStep { delta, stop })
    }

    /// Returns the text still held back (a possible stop-string prefix) when the request ends
    /// for another reason (EOS, length).
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        rest
    }

    /// The whole output text so far (truncated at a matched stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Tokens pushed (up to and including the one that matched a stop string).
    pub fn num_output_tokens(&self) -> usize {
        self.num_output_tokens
    }

    /// Looks for a stop string that ends in the text `push` just added after `old_len` bytes
    /// (vLLM's rule: text before it was checked already, or held exempt by `min_tokens`).
    fn check_stop(&mut self, old_len: usize) -> Option<String> {
        if self.max_stop_len == 0 || self.text.len() == old_len {
            return None;
        }
        let text = &self.text;
        let (pos, s) = self
            .opts
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                // Forward to a character boundary: a match starts on one, and moving back could
                // find a stop string that ends in the old text.
                let mut from = old_len.saturating_sub(s.len() - 1);
                while !text.is_char_boundary(from) {
                    from += 1;
                }
                text[from..].find(s.as_str()).map(|i| (from + i, s))
            })
            .min_by_key(|(i, _)| *i)?;
        let s = s.clone();
        let cut = if self.opts.include_stop_str_in_output {
            pos + s.len()
        } else {
            pos
        };
        self.text.truncate(cut);
        self.emitted = self.emitted.min(cut);
        self.stopped = Some(s.clone());
        Some(s)
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn held_back_len(&self) -> usize {
        let mut best = 0;
        for s in &self.opts.stop {
            let max = s.len().saturating_sub(1).min(self.text.len());
            for n in (best + 1..=max).rev() {
                let start = self.text.len() - n;
                if self.text.is_char_boundary(start)
                    && s.is_char_boundary(n)
                    && s.as_bytes()[..n] == self.text.as_bytes()[start..]
                {
                    best = n;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny;

    fn tok() -> TextTokenizer {
        tiny::tiny_tokenizer()
    }

    fn stream(d: &mut IncrementalDetokenizer, ids: &[u32]) -> (Vec<String>, Option<String>) {
        let mut deltas = Vec::new();
        for &id in ids {
            let step = d.push(id).unwrap();
            deltas.push(step.delta);
            if step.stop.is_some() {
                return (deltas, step.stop);
            }
        }
        deltas.push(d.finish());
        (deltas, None)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let t = tok();
        let text = "héllo 世界 🎉!";
        let ids = t.encode(text, false).unwrap();
        assert_eq!(
            ids.len(),
            text.len(),
            "byte-level tokenizer: one token per byte"
        );
        let mut d =
            IncrementalDetokenizer::new(t.clone(), &[1, 2, 3], DetokenizerOptions::default());
        let (deltas, stop) = stream(&mut d, &ids);
        assert!(stop.is_none());
        for delta in &deltas {
            assert!(!delta.contains('\u{FFFD}'), "{deltas:?}");
        }
        // The 4-byte emoji arrives as 3 empty deltas then the whole character.
        assert!(deltas.iter().any(|d| d == "🎉"), "{deltas:?}");
        assert_eq!(deltas.concat(), text);
        assert_eq!(d.text(), text);
    }

    #[test]
    fn special_tokens_are_skipped() {
        let t = tok();
        let mut ids = t.encode("ok", false).unwrap();
        ids.push(tiny::EOS_ID);
        let mut d = IncrementalDetokenizer::new(t, &[], DetokenizerOptions::default());
        let (deltas, _) = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), "ok");
    }

    #[test]
    fn stop_string_truncates_and_is_never_streamed() {
        let t = tok();
        let ids = t.encode("Hello END world", false).unwrap();
        let opts = DetokenizerOptions {
            stop: vec!["END".into(), "zzz".into()],
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop.as_deref(), Some("END"));
        assert_eq!(deltas.concat(), "Hello ");
        assert_eq!(d.text(), "Hello ");
        assert_eq!(d.num_output_tokens(), "Hello END".len());
        assert!(d.push(65).unwrap().delta.is_empty());
    }

    #[test]
    fn a_stop_string_inside_the_min_tokens_text_is_never_matched() {
        // "\n" arrives within the first 2 tokens: the longer stop string's window must not find
        // it when the 3rd token is checked.
        let t = tok();
        let ids = t.encode("x\nyz", false).unwrap();
        let opts = DetokenizerOptions {
            stop: vec!["\n".into(), "</answer>".into()],
            min_tokens: 2,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop, None);
        assert_eq!(deltas.concat(), "x\nyz");
    }

    #[test]
    fn a_multibyte_stop_string_inside_the_min_tokens_text_is_never_matched() {
        let t = tok();
        let ids = t.encode("好。x", false).unwrap();
        // Every token but the last ("x") is exempt: "。" lies wholly in the exempt text.
        let opts = DetokenizerOptions {
            stop: vec!["。".into()],
            min_tokens: ids.len() - 1,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t.clone(), &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop, None, "{ids:?}");
        assert_eq!(deltas.concat(), "好。x");
        // Without min_tokens the same text stops at the full stop.
        let opts = DetokenizerOptions {
            stop: vec!["。".into()],
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop.as_deref(), Some("。"));
        assert_eq!(deltas.concat(), "好");
    }

    #[test]
    fn stop_strings_wait_for_min_tokens() {
        let t = tok();
        let ids = t.encode("END is END", false).unwrap();
        let opts = DetokenizerOptions {
            stop: vec!["END".into()],
            min_tokens: 5,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop.as_deref(), Some("END"));
        assert_eq!(deltas.concat(), "END is ");
    }

    #[test]
    fn partial_stop_prefix_is_released_when_it_diverges() {
        let t = tok();
        let ids = t.encode("aEN then ENx", false).unwrap();
        let opts = DetokenizerOptions {
            stop: vec!["END".into()],
            include_stop_str_in_output: false,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let mut seen = String::new();
        for &id in &ids {
            let step = d.push(id).unwrap();
            seen.push_str(&step.delta);
            assert!(!seen.ends_with("EN"), "held back: {seen:?}");
        }
        seen.push_str(&d.finish());
        assert_eq!(seen, "aEN then ENx");
    }

    #[test]
    fn include_stop_str_and_multibyte_stop() {
        let t = tok();
        let ids = t.encode("ab→cd", false).unwrap();
        let opts = DetokenizerOptions {
            stop: vec!["→c".into()],
            include_stop_str_in_output: true,
            ..Default::default()
        };
        let mut d = IncrementalDetokenizer::new(t, &[], opts);
        let (deltas, stop) = stream(&mut d, &ids);
        assert_eq!(stop.as_deref(), Some("→c"));
        assert_eq!(deltas.concat(), "ab→c");
    }

    #[test]
    fn long_generation_keeps_window_small() {
        let t = tok();
        let text = "0123456789".repeat(50);
        let ids = t.encode(&text, false).unwrap();
        let mut d = IncrementalDetokenizer::new(t, &[], DetokenizerOptions::default());
        let (deltas, _) = stream(&mut d, &ids);
        assert_eq!(deltas.concat(), text);
        assert!(d.ids.len() < 80);
    }
}
