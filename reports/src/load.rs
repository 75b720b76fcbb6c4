//! Reading a results directory into run records.

use crate::{ReportError, RunRecord};
use std::path::{Path, PathBuf};

/// Reads every `*.json` record in `dir` (not `*.json.tmp`, which a killed run may leave),
/// sorted by run id so that every report made from the same records is identical.
pub fn load_records(dir: &Path) -> Result<Vec<RunRecord>, ReportError> {
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
    let mut records = paths
        .iter()
        .map(|p| read_record(p))
        .collect::<Result<Vec<_>, _>>()?;
    // Stable: records with the same run id keep their file-name order.
    records.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    Ok(records)
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
