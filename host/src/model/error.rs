//! Errors raised while loading a model or preparing its text side (tokenizer, chat template,
//! detokenizer). Every variant names the file (and, for weights, the tensor) it is about, so a
//! user who points the server at a broken directory learns exactly what is wrong.

use std::path::PathBuf;

use thiserror::Error;

/// Why a model could not be loaded or its text could not be processed.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("model directory {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("required file {path} is missing")]
    MissingFile { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: unsupported model: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("tensor `{tensor}` not found in any safetensors file of {dir}")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error(
        "unknown model `{0}` (expected `builtin:tiny`, a Hugging Face model directory, or a Hugging Face id `org/name`)"
    )]
    UnknownSpec(String),
    #[error("invalid KV cache shape: {0}")]
    InvalidKvShape(String),
    #[error("model runner: {0}")]
    Runner(#[from] crate::engine::model_runner::ModelRunnerError),
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            ModelError::MissingFile { path: path.into() }
        } else {
            ModelError::Io {
                path: path.into(),
                source,
            }
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        ModelError::Parse {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
