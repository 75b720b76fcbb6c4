//! Errors raised while loading or running a backbone.

use std::path::PathBuf;

/// Everything that can go wrong in the backbone, each naming the file or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// config.json is not valid JSON or lacks a required key.
    #[error("{path}: {message}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// config.json names an architecture the backbone does not implement.
    #[error("{path}: unknown architecture `{found}` (supported model_type: bert, roberta, gpt2, gpt_bigcode, llama)")]
    UnknownArchitecture {
        /// The config file.
        path: PathBuf,
        /// The model_type found.
        found: String,
    },
    /// The weights file could not be parsed as safetensors.
    #[error("{path}: not a readable safetensors file: {message}")]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A GGUF file could not be parsed, or its metadata lacks or misstates a field.
    #[error("{path}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong, naming the metadata key or tensor.
        message: String,
    },
    /// A tensor the architecture needs is absent from the weights file.
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
    },
    /// A tensor has a shape other than the config implies.
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A weight holds NaN or infinite values: training on it could only report a NaN loss.
    #[error("{path}: tensor `{name}` holds {count} non-finite values (NaN or infinite)")]
    NonFinite {
        /// The weights file.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// How many of its values are not finite.
        count: usize,
    },
    /// The weights file holds backbone tensors the config does not use (a config.json that
    /// declares fewer layers than the checkpoint has, or another architecture's file).
    #[error("{path}: {} tensors the config does not use, e.g. `{}`: does config.json match the checkpoint (layer count, architecture)?", names.len(), names.first().map_or("", |s| s.as_str()))]
    UnusedTensors {
        /// The weights file.
        path: PathBuf,
        /// The unused tensors' names, sorted.
        names: Vec<String>,
    },
    /// tokenizer.json could not be loaded or applied.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// The tokenizer's message.
        message: String,
    },
    /// The inputs given to forward are inconsistent (shapes, lengths).
    #[error("bad input: {0}")]
    Input(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`BackboneError`].
pub type Result<T> = std::result::Result<T, BackboneError>;
