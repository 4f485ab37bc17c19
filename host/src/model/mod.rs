//! Llama-family models: configuration (`config`), f32 weights loaded from safetensors
//! (`weights`), tokenizer and special tokens (`tokenizer`), chat templates (`chat_template`),
//! streaming detokenization with stop strings (`detokenizer`) and the built-in `builtin:tiny`
//! model (`tiny`). [`load_model_files`] is the entry point: it turns a model spec
//! (`builtin:tiny`, a Hugging Face directory or a GGUF file, `gguf_model`) into a [`LoadedModel`], the weights a backend
//! runs ([`crate::backend::build_runner`]) plus the [`ModelInfo`] the text side needs. This
//! module knows no backend; test tools (greedy generation, export) are in [`crate::testing`].

pub mod chat_template;
pub mod config;
pub mod detokenizer;
pub mod error;
pub mod gguf;
pub mod gguf_model;
pub mod hub;
pub mod kquant;
pub mod quant;
pub mod tiny;
pub mod tokenizer;
pub mod weight_matrix;
pub mod weights;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
mod gguf_tests;
#[cfg(test)]
mod kquant_gguf_tests;
#[cfg(test)]
mod kquant_tests;
#[cfg(test)]
mod loader_tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::model_runner::BatchLimits;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use detokenizer::{DetokenizerOptions, IncrementalDetokenizer};
pub use error::ModelError;
pub use tokenizer::{SpecialTokens, TextTokenizer};
pub use weights::{LlamaWeights, MatrixStorage};

/// The spec of the built-in tiny random model.
pub const BUILTIN_TINY: &str = "builtin:tiny";

/// Geometry of the paged KV cache a runner allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_blocks: usize,
    pub block_size: usize,
}

impl KvCacheShape {
    /// What a runner of `config` over this cache accepts (what [`ModelBatch::validate`] checks).
    ///
    /// [`ModelBatch::validate`]: crate::engine::model_runner::ModelBatch::validate
    pub fn batch_limits(self, config: &ModelConfig) -> BatchLimits {
        BatchLimits {
            max_model_len: config.max_model_len,
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            vocab_size: config.vocab_size,
        }
    }

    /// As many blocks of `block_size` slots as fit in `budget_bytes` of f32 K/V for `config`
    /// (at least one).
    pub fn from_budget(config: &ModelConfig, budget_bytes: usize, block_size: usize) -> Self {
        let block_size = block_size.max(1);
        let per_block = config.kv_bytes_per_token().max(1) * block_size;
        KvCacheShape {
            num_blocks: (budget_bytes / per_block).max(1),
            block_size,
        }
    }

    /// Bytes of K/V this shape occupies for `config`.
    pub fn bytes(&self, config: &ModelConfig) -> usize {
        self.num_blocks * self.block_size * config.kv_bytes_per_token()
    }
}

/// Everything about a model except its weights: what the engine, the sampler and the HTTP
/// layer need to turn text into tokens and back.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// `builtin:tiny`, or the directory's name (e.g. `SmolLM2-135M-Instruct`).
    pub name: String,
    /// Where it came from: `builtin:tiny` or the directory path.
    pub source: String,
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
    pub bos_token_id: Option<u32>,
    /// Token ids that end generation (generation_config, config and tokenizer EOS, merged).
    pub eos_token_ids: Vec<u32>,
    pub chat_template: Option<ChatTemplate>,
    /// Width of a logits row (the config's vocab size; may exceed the tokenizer's).
    pub vocab_size: usize,
}

impl ModelInfo {
    /// Puts a loaded model's text side together (its chat template built from `special`).
    pub fn new(
        name: String,
        source: String,
        config: ModelConfig,
        tokenizer: TextTokenizer,
        special: SpecialTokens,
    ) -> Result<Self, ModelError> {
        let chat_template = special
            .chat_template
            .map(|src| ChatTemplate::new(src, special.bos_token, special.eos_token))
            .transpose()?;
        Ok(ModelInfo {
            name,
            source,
            vocab_size: config.vocab_size,
            bos_token_id: special.bos_token_id,
            eos_token_ids: special.eos_token_ids,
            chat_template,
            tokenizer,
            config,
        })
    }

    /// Renders a chat with the model's template (error if it has none).
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| {
                ModelError::ChatTemplate(format!("model `{}` has no chat template", self.name))
            })?
            .render(messages, add_generation_prompt)
    }

    /// Renders a chat (with the generation prompt) and tokenizes it without adding special
    /// tokens again (the template already contains them).
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        let text = self.render_chat(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// A streaming detokenizer for a request with this prompt.
    pub fn detokenizer(
        &self,
        prompt_ids: &[u32],
        opts: DetokenizerOptions,
    ) -> IncrementalDetokenizer {
        IncrementalDetokenizer::new(self.tokenizer.clone(), prompt_ids, opts)
    }

    /// Whether `token` ends generation.
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_token_ids.contains(&token)
    }
}

/// A model in memory, before a backend is chosen.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub info: ModelInfo,
    pub weights: Arc<LlamaWeights>,
}

/// Loads the config, tokenizer, templates and weights of `spec` without building a runner,
/// with the matrices in f32 (GGUF: in the file's formats).
pub fn load_model_files(spec: &str) -> Result<LoadedModel, ModelError> {
    load_model_files_as(spec, MatrixStorage::F32)
}

/// As [`load_model_files`], with a checkpoint's matrices held in `storage`. A GGUF file's
/// weights stay in the file's formats: a half-precision storage is refused for it by name.
pub fn load_model_files_as(spec: &str, storage: MatrixStorage) -> Result<LoadedModel, ModelError> {
    if spec == BUILTIN_TINY {
        let mut model = tiny::tiny_model();
        if storage != MatrixStorage::F32 {
            let weights = LlamaWeights::clone(&model.weights).into_storage(storage);
            model.weights = Arc::new(weights);
        }
        return Ok(model);
    }
    if let Some(rest) = spec.strip_prefix("builtin:") {
        return Err(ModelError::UnknownSpec(format!("builtin:{rest}")));
    }
    let path = Path::new(spec);
    if gguf_model::is_gguf_path(path) && !path.is_dir() {
        if let MatrixStorage::Half(format) = storage {
            return Err(ModelError::Unsupported {
                path: path.to_path_buf(),
                message: format!(
                    "a GGUF file's weights are used in the formats it stores; {} storage applies to safetensors checkpoints",
                    format.name()
                ),
            });
        }
        return gguf_model::load_gguf(path);
    }
    load_dir(path, storage)
}

fn load_dir(dir: &Path, storage: MatrixStorage) -> Result<LoadedModel, ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::NotADirectory(dir.to_path_buf()));
    }
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
    let special = SpecialTokens::load(dir, &tokenizer, &config.eos_token_ids, config.bos_token_id)?;
    let name = dir
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(dir))
        .file_name()
        .map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
    // The text side first: a broken template fails before the weights are read.
    let info = ModelInfo::new(name, dir.display().to_string(), config, tokenizer, special)?;
    let weights = LlamaWeights::load(dir, &info.config, storage)?;
    Ok(LoadedModel {
        info,
        weights: Arc::new(weights),
    })
}
