//! Load options and the result container shared by every loader.
//!
//! Bad rows are either fatal or recorded in [`Loaded::skipped`]; there is deliberately no
//! mode that drops a row without a trace, because silently shrinking a benchmark split
//! changes its scores.

use std::path::Path;

use crate::error::{unknown_label_reason, DataError};

/// How a loader treats bad rows and how many examples it keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// `false`: the first bad row is an error. `true`: bad rows are skipped and recorded.
    pub skip_bad_rows: bool,
    /// Stop after this many good examples (rows after that are not read or checked).
    pub limit: Option<usize>,
}

impl LoadOptions {
    /// Strict loading: the first bad row is an error, no limit (same as `default()`).
    pub fn strict() -> Self {
        Self::default()
    }

    /// Lenient loading: bad rows are skipped and recorded, no limit.
    pub fn skipping() -> Self {
        Self {
            skip_bad_rows: true,
            limit: None,
        }
    }

    /// The same options with a limit on the number of good examples.
    pub fn with_limit(self, limit: usize) -> Self {
        Self {
            limit: Some(limit),
            ..self
        }
    }
}

/// A row that was skipped because `skip_bad_rows` was set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// 1-based line where the row starts.
    pub line: usize,
    /// Why it was rejected (same wording as the error it would have raised).
    pub reason: String,
}

/// The examples read from one file plus the rows that were skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<T> {
    /// Good examples in file order.
    pub examples: Vec<T>,
    /// Bad rows that were skipped (empty unless `skip_bad_rows` was set).
    pub skipped: Vec<SkippedRow>,
}

impl<T> Loaded<T> {
    /// An empty result, filled by the loaders.
    pub(crate) fn new() -> Self {
        Self {
            examples: Vec::new(),
            skipped: Vec::new(),
        }
    }

    /// Keeps a good example; returns `true` once the limit is reached so the caller stops.
    pub(crate) fn accept(&mut self, example: T, opts: &LoadOptions) -> bool {
        let full = |n: usize| opts.limit.is_some_and(|limit| n >= limit);
        // Checked before pushing too, so `limit: Some(0)` really keeps nothing.
        if !full(self.examples.len()) {
            self.examples.push(example);
        }
        full(self.examples.len())
    }

    /// Records a bad row when skipping, otherwise turns it into the error for `path`.
    pub(crate) fn reject(
        &mut self,
        bad: BadRow,
        path: &Path,
        opts: &LoadOptions,
    ) -> Result<(), DataError> {
        if opts.skip_bad_rows {
            self.skipped.push(SkippedRow {
                line: bad.line,
                reason: bad.reason(),
            });
            Ok(())
        } else {
            Err(bad.into_error(path))
        }
    }
}

/// What is wrong with one row, before we know whether it is fatal.
#[derive(Debug)]
pub(crate) enum Problem {
    /// Wrong shape or value.
    Malformed(String),
    /// Class label not in the task's list.
    UnknownLabel { label: String, known: Vec<String> },
}

/// A rejected row: its line plus the problem.
#[derive(Debug)]
pub(crate) struct BadRow {
    pub line: usize,
    pub problem: Problem,
}

impl BadRow {
    /// A malformed-row problem at `line`.
    pub(crate) fn malformed(line: usize, message: impl Into<String>) -> Self {
        Self {
            line,
            problem: Problem::Malformed(message.into()),
        }
    }

    /// The human-readable reason, without the path prefix.
    fn reason(&self) -> String {
        match &self.problem {
            Problem::Malformed(m) => m.clone(),
            Problem::UnknownLabel { label, known } => unknown_label_reason(label, known),
        }
    }

    /// The fatal form of this row's problem.
    pub(crate) fn into_error(self, path: &Path) -> DataError {
        let path = path.to_path_buf();
        match self.problem {
            Problem::Malformed(message) => DataError::Malformed {
                path,
                line: self.line,
                message,
            },
            Problem::UnknownLabel { label, known } => DataError::UnknownLabel {
                path,
                line: self.line,
                label,
                known,
            },
        }
    }
}
