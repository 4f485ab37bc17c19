//! The text side of a model: [`TextTokenizer`], a cheap-to-clone handle on a `tokenizers`
//! tokenizer (loaded from `tokenizer.json`, pure Rust, no onig), and [`SpecialTokens`], the BOS
//! and EOS tokens and the chat template source gathered from `tokenizer_config.json`,
//! `chat_template.jinja`, `generation_config.json` and `config.json`.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::config::token_id_list;
use super::error::ModelError;

/// A shared, thread-safe tokenizer.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(ModelError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::parse(path, e))?;
        Ok(Self::new(inner))
    }

    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        TextTokenizer {
            inner: Arc::new(inner),
        }
    }

    /// Token ids of `text`. `add_special_tokens` applies the tokenizer's post-processor (e.g.
    /// a BOS token): use `true` for raw completions prompts, `false` for rendered chat templates
    /// (which already contain their special tokens).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ModelError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Text of `ids` (lossy for incomplete UTF-8 sequences: they become U+FFFD).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Special tokens and chat template of a model directory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub bos_token_id: Option<u32>,
    /// Every token id that ends generation, deduplicated, in discovery order:
    /// `generation_config.json`, then `config.json`, then the tokenizer's `eos_token`.
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<String>,
}

impl SpecialTokens {
    /// Gathers the special tokens of `dir`; every file here is optional.
    pub fn load(
        dir: &Path,
        tokenizer: &TextTokenizer,
        config_eos: &[u32],
        config_bos: Option<u32>,
    ) -> Result<Self, ModelError> {
        let tok_cfg = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let jinja = dir.join("chat_template.jinja");
        let template_file = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            None
        };
        let gen_cfg = read_optional_json(&dir.join("generation_config.json"))?;
        Ok(Self::from_values(
            tok_cfg.as_ref(),
            template_file,
            gen_cfg.as_ref(),
            tokenizer,
            config_eos,
            config_bos,
        ))
    }

    /// Gathers the special tokens from a parsed `tokenizer_config.json`, a
    /// `chat_template.jinja` and a `generation_config.json` (each optional).
    pub fn from_values(
        tok_cfg: Option<&Value>,
        template_file: Option<String>,
        gen_cfg: Option<&Value>,
        tokenizer: &TextTokenizer,
        config_eos: &[u32],
        config_bos: Option<u32>,
    ) -> Self {
        let mut out = SpecialTokens::default();
        if let Some(v) = tok_cfg {
            out.bos_token = v.get("bos_token").and_then(token_content);
            out.eos_token = v.get("eos_token").and_then(token_content);
            out.chat_template = match v.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Array(list)) => pick_named_template(list),
                _ => None,
            };
        }
        if out.chat_template.is_none() {
            out.chat_template = template_file;
        }
        let mut eos = Vec::new();
        let mut bos = config_bos;
        if let Some(v) = gen_cfg {
            eos.extend(token_id_list(v.get("eos_token_id")));
            if let Some(b) = v.get("bos_token_id").and_then(Value::as_u64) {
                bos = Some(b as u32);
            }
        }
        eos.extend_from_slice(config_eos);
        if let Some(id) = out
            .eos_token
            .as_deref()
            .and_then(|t| tokenizer.token_to_id(t))
        {
            eos.push(id);
        }
        let mut seen = std::collections::HashSet::new();
        eos.retain(|id| seen.insert(*id));
        out.eos_token_ids = eos;
        out.bos_token_id = bos.or_else(|| {
            out.bos_token
                .as_deref()
                .and_then(|t| tokenizer.token_to_id(t))
        });
        if out.bos_token.is_none() {
            out.bos_token = out.bos_token_id.and_then(|id| tokenizer.id_to_token(id));
        }
        if out.eos_token.is_none() {
            out.eos_token = out
                .eos_token_ids
                .first()
                .and_then(|&id| tokenizer.id_to_token(id));
        }
        out
    }
}

/// A special token given either as a string or as `{"content": "..."}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// From a list of `{"name", "template"}`, the one named `default` (else the first).
fn pick_named_template(list: &[Value]) -> Option<String> {
    let template = |v: &Value| v.get("template").and_then(Value::as_str).map(str::to_owned);
    list.iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some("default"))
        .and_then(template)
        .or_else(|| list.first().and_then(template))
}

pub(crate) fn read_optional_json(path: &Path) -> Result<Option<Value>, ModelError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ModelError::parse(path, e))
}
