//! Errors raised by methods.

/// A method's configuration is impossible for the model, or a tensor op failed.
#[derive(Debug, thiserror::Error)]
pub enum MethodError {
    /// The configuration cannot be applied (bad rank, unknown target, empty budget…).
    #[error("{method}: {message}")]
    InvalidConfig {
        /// The method.
        method: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A PEFT-format adapter directory is malformed or does not fit the model.
    #[error("{path}: {message}")]
    PeftFormat {
        /// The file (adapter_config.json or adapter_model.safetensors).
        path: std::path::PathBuf,
        /// What is wrong, naming the key or field.
        message: String,
    },
    /// A backbone error (loading, shapes).
    #[error(transparent)]
    Backbone(#[from] peftbench_backbone::BackboneError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`MethodError`].
pub type Result<T> = std::result::Result<T, MethodError>;

/// Shorthand for an invalid-configuration error.
pub(crate) fn invalid(method: &'static str, message: impl Into<String>) -> MethodError {
    MethodError::InvalidConfig {
        method,
        message: message.into(),
    }
}
