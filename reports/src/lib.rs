//! Run records and the reports made from them: CSV tables, PNG plots and a Markdown report.

pub mod analyses;
pub mod chance;
pub mod compare;
pub mod lenient;
pub mod load;
pub mod markdown;
pub mod metrics;
pub mod outcomes;
pub mod plots;
pub mod record;
pub mod stats;
mod style;
pub mod summary;
pub mod tables;

pub use load::load_records;
pub use plots::Plot;
pub use record::{
    Amplification, CurvePoint, Environment, MatrixUpdate, MemoryUse, RunRecord, RunStatus,
    Selected, Selection, UpdateAnalysis,
};
pub use summary::{summarize, SummaryRow};

use std::path::{Path, PathBuf};

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
    /// A CSV table could not be written.
    #[error("{path}: writing CSV: {message}")]
    Csv {
        /// The table file.
        path: PathBuf,
        /// The CSV error.
        message: String,
    },
    /// The embedded plot font could not be registered.
    #[error("plot font: {0}")]
    Font(String),
    /// A plot could not be drawn.
    #[error("plot {path}: {message}")]
    Plot {
        /// The image file.
        path: PathBuf,
        /// The drawing error.
        message: String,
    },
}

/// What [`write_report`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// Run records read.
    pub records: usize,
    /// Of those, runs with status ok.
    pub ok_runs: usize,
    /// Rows of `summary.csv` (task × method × budget groups with an ok run).
    pub summary_rows: usize,
    /// Rows of `curves.csv`.
    pub curve_rows: usize,
    /// `runs.csv`.
    pub runs_csv: PathBuf,
    /// `summary.csv`.
    pub summary_csv: PathBuf,
    /// `curves.csv`.
    pub curves_csv: PathBuf,
    /// The PNG plots, in the order the report shows them.
    pub plots: Vec<PathBuf>,
    /// `REPORT.md`.
    pub report: PathBuf,
    /// Record files that could not be read, each with why; the report was built without them
    /// and names them.
    pub skipped: Vec<String>,
}

/// Reads every record in `results_dir` and writes the CSV tables, the PNG plots and `REPORT.md`
/// into `out_dir` (created if missing). Unreadable records are left out and named in the
/// report and in [`ReportSummary::skipped`].
pub fn write_report(results_dir: &Path, out_dir: &Path) -> Result<ReportSummary, ReportError> {
    write_report_with(results_dir, out_dir, &|_| (Vec::new(), Vec::new()))
}

/// Makes the subspace comparisons a report shows from its records (reading the adapters the
/// runs saved), with a line for each adapter that could not be read.
pub type SubspaceSource<'a> =
    &'a dyn Fn(&[RunRecord]) -> (Vec<analyses::SubspaceComparison>, Vec<String>);

/// [`write_report`], with the subspace comparisons `subspace` makes from the records.
pub fn write_report_with(
    results_dir: &Path,
    out_dir: &Path,
    subspace: SubspaceSource,
) -> Result<ReportSummary, ReportError> {
    let (records, bad) = load::load_records_skipping_bad(results_dir)?;
    let skipped: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
    std::fs::create_dir_all(out_dir).map_err(|source| ReportError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let rows = summarize(&records);
    let runs_csv = out_dir.join("runs.csv");
    let summary_csv = out_dir.join("summary.csv");
    let curves_csv = out_dir.join("curves.csv");
    tables::write_runs_csv(&records, &runs_csv)?;
    let summary_rows = tables::write_summary_csv(&rows, &summary_csv)?;
    let curve_rows = tables::write_curves_csv(&records, &curves_csv)?;
    let plots = plots::write_plots(&records, &rows, out_dir)?;
    let report = out_dir.join("REPORT.md");
    let mut text = markdown::render_report(&records, &rows, &plots);
    let (comparisons, unread) = subspace(&records);
    let mut plots = plots;
    let subspace_plots = analyses::write_subspace_plots(&comparisons, out_dir)?;
    let analysed = analyses::tasks_with_analyses(&records, &comparisons);
    if !analysed.is_empty() {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "## The weight updates
"
        );
        for task in analysed {
            analyses::render_task(&mut text, &records, &task, &comparisons, &subspace_plots);
        }
    }
    if !unread.is_empty() {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "Adapters left out of the subspace similarity:
"
        );
        for u in &unread {
            let _ = writeln!(text, "- {u}");
        }
        let _ = writeln!(text);
    }
    plots.extend(subspace_plots);
    markdown::skipped_records(&mut text, &skipped);
    std::fs::write(&report, text).map_err(|source| ReportError::Io {
        path: report.clone(),
        source,
    })?;
    Ok(ReportSummary {
        records: records.len(),
        ok_runs: records.iter().filter(|r| r.status == RunStatus::Ok).count(),
        summary_rows,
        curve_rows,
        runs_csv,
        summary_csv,
        curves_csv,
        plots: plots.into_iter().map(|p| p.path).collect(),
        report,
        skipped,
    })
}
