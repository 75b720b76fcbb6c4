//! The harness: tasks, objectives, the training loop, matched budgets, and the grid runner
//! that turns a suite into run records.

pub mod analysis;
pub mod budget;
pub mod chance;
pub mod claim;
pub mod data;
pub mod env;
pub mod generate;
pub mod grid;
pub use peftbench_backbone::linalg;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plan;
pub mod pretrain;
pub mod subspace;
pub mod suite;
pub mod synthetic;
pub mod task;
pub mod train;

pub use budget::{match_budget, Budget};
pub use grid::{run_grid, run_grid_with, Shard};
pub use suite::Suite;
pub use task::{load_task, TaskConfig, TaskData};
pub use train::{run, Base, Precision, RunSpec, TrainConfig};

use std::path::PathBuf;

/// Errors of the harness, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A suite file is invalid.
    #[error("{origin}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Suite {
        /// The suite file.
        origin: String,
        /// 1-based line, where known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A configuration is inconsistent.
    #[error("{0}")]
    Config(String),
    /// Data could not be loaded.
    #[error(transparent)]
    Data(#[from] peftbench_datasets::DataError),
    /// The backbone failed.
    #[error(transparent)]
    Backbone(#[from] peftbench_backbone::BackboneError),
    /// A method failed.
    #[error(transparent)]
    Method(#[from] peftbench_methods::MethodError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
