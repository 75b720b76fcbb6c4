//! Data loading for peftbench: GLUE-style TSV tasks, Alpaca instructions, preference
//! pairs and plain-text corpora, with typed errors that name file and line.

mod alpaca;
mod error;
mod loaded;
mod preference;
mod read;
mod subset;
mod task;
mod text;
mod tsv;

use std::path::{Path, PathBuf};

pub use alpaca::{
    is_placeholder_input, load_alpaca, InstructionExample, PROMPT_NO_INPUT, PROMPT_WITH_INPUT,
};
pub use error::DataError;
pub use loaded::{LoadOptions, Loaded, SkippedRow};
pub use preference::{load_preferences, PreferencePair};
pub use subset::{subset, subset_indices};
pub use task::{GlueMetric, Split, Target, TextTaskSpec, GLUE_TASKS};
pub use text::{load_text, split_train_val};
pub use tsv::{load_text_task, Label, TextExample};

/// Environment variable that overrides where the shared data sets live.
pub const DATA_ENV: &str = "PEFTBENCH_DATA";

/// Root of the shared data sets: `$PEFTBENCH_DATA` if set, else the first existing
/// `../shared/datasets` or `../../shared/datasets` relative to the current directory,
/// then relative to this crate's manifest directory.
pub fn shared_datasets_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        // An explicit setting wins even if wrong, so a typo shows up as an I/O error
        // instead of silently falling back to another copy.
        return Some(PathBuf::from(dir));
    }
    let mut bases = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        bases.push(cwd);
    }
    // The tests and binaries may run from anywhere in the workspace; the manifest dir is fixed.
    bases.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    bases
        .iter()
        .flat_map(|base| {
            [
                Path::new("../shared/datasets"),
                Path::new("../../shared/datasets"),
            ]
            .map(|rel| base.join(rel))
        })
        .find(|p| p.is_dir())
}
