//! Run records and the reports made from them: CSV tables, PNG plots and a Markdown report.

pub mod record;

pub use record::{CurvePoint, Environment, RunRecord, RunStatus};

use std::path::PathBuf;

/// Errors reading records or writing reports.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A record is not valid JSON of the expected shape.
    #[error("{path}: not a run record: {message}")]
    BadRecord {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// The drawing error.
        message: String,
    },
}
