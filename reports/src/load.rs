//! Reading a results directory into run records.

use crate::{ReportError, RunRecord};
use std::path::{Path, PathBuf};

/// Reads every `*.json` record in `dir` (not `*.json.tmp`, which a killed run may leave),
/// sorted by run id so that every report made from the same records is identical. The first
/// unreadable record is an error; [`load_records_skipping_bad`] reads past it.
pub fn load_records(dir: &Path) -> Result<Vec<RunRecord>, ReportError> {
    let (records, mut bad) = load_records_skipping_bad(dir)?;
    match bad.is_empty() {
        true => Ok(records),
        false => Err(bad.remove(0)),
    }
}

/// Reads every record in `dir` that parses, and returns the errors of those that do not
/// (truncated, empty, not a record), so one bad file costs only itself.
pub fn load_records_skipping_bad(
    dir: &Path,
) -> Result<(Vec<RunRecord>, Vec<ReportError>), ReportError> {
    let io = |source| ReportError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        // `extension()` of `x.json.tmp` is `tmp`, so half-written records are skipped here.
        if path.extension().is_some_and(|e| e == "json") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    let mut records = Vec::new();
    let mut bad = Vec::new();
    for p in &paths {
        match read_record(p) {
            Ok(r) => records.push(r),
            Err(e @ ReportError::BadRecord { .. }) => bad.push(e),
            Err(e) => return Err(e),
        }
    }
    // Stable: records with the same run id keep their file-name order.
    records.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    Ok((records, bad))
}

/// Reads one record; when the strict reader fails, retries reading `null` floats as NaN
/// (how serde_json writes NaN metrics) and otherwise reports the strict error, which has the line.
pub fn read_record(path: &Path) -> Result<RunRecord, ReportError> {
    let strict_error = match RunRecord::read(path) {
        Ok(record) => return Ok(record),
        Err(e @ ReportError::Io { .. }) => return Err(e),
        Err(e) => e,
    };
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|value| crate::lenient::from_value_nan_as_null(value).ok())
        .ok_or(strict_error)
}
