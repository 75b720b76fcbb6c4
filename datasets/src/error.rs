//! The crate's single error type.
//!
//! Every variant that comes from a file carries the file path, and every row-level
//! problem carries the 1-based line, so a message alone is enough to open the file at
//! the offending row (`glue/RTE/train.tsv:17: expected 4 columns, found 3`).

use std::path::{Path, PathBuf};

/// Everything that can go wrong while loading a data set or validating a task spec.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A row (or the whole document) does not have the expected shape.
    #[error("{}:{line}: {message}", path.display())]
    Malformed {
        /// File that holds the row.
        path: PathBuf,
        /// 1-based line where the row starts.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A class label that the task's `Target::Classes` does not list.
    #[error("{}:{line}: {}", path.display(), unknown_label_reason(label, known))]
    UnknownLabel {
        /// File that holds the row.
        path: PathBuf,
        /// 1-based line of the row.
        line: usize,
        /// The label text as found (trimmed).
        label: String,
        /// The labels the task accepts.
        known: Vec<String>,
    },
    /// The file has no data rows at all (empty, blank, or a header only).
    #[error("{}: no examples (file is empty or has only a header)", path.display())]
    Empty {
        /// File that is empty.
        path: PathBuf,
    },
    /// A task spec is inconsistent (column index out of range, no class names, ...).
    #[error("task {task:?}: invalid spec: {message}")]
    Config {
        /// Name of the task whose spec is wrong.
        task: String,
        /// What is wrong with it.
        message: String,
    },
}

impl DataError {
    /// The file this error is about, if it is about a file.
    pub fn path(&self) -> Option<&Path> {
        match self {
            DataError::Io { path, .. }
            | DataError::Malformed { path, .. }
            | DataError::UnknownLabel { path, .. }
            | DataError::Empty { path } => Some(path),
            DataError::Config { .. } => None,
        }
    }

    /// The 1-based line this error is about, if it is about one row.
    pub fn line(&self) -> Option<usize> {
        match self {
            DataError::Malformed { line, .. } | DataError::UnknownLabel { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Shared wording for unknown labels, used both by the error and by skipped-row reasons
/// so the two never drift apart.
pub(crate) fn unknown_label_reason(label: &str, known: &[String]) -> String {
    format!(
        "unknown label {label:?} (expected one of: {})",
        known.join(", ")
    )
}
