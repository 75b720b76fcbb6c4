//! Loader for preference pairs (JSONL with `prompt`, `chosen`, `rejected`).

use std::path::Path;

use serde_json::Value;

use crate::error::DataError;
use crate::loaded::{BadRow, LoadOptions, Loaded};
use crate::read::read_text;

/// One preference example: a prompt and a preferred and a dispreferred continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferencePair {
    /// Shared prefix (for HH-RLHF it ends with `\n\nAssistant:`).
    pub prompt: String,
    /// Preferred continuation, kept verbatim (`prompt + chosen` is the original text).
    pub chosen: String,
    /// Dispreferred continuation, kept verbatim.
    pub rejected: String,
}

/// Loads a JSONL preference file; each non-blank line is parsed on its own.
///
/// Bad JSON, a missing or non-string key, or a whitespace-only `chosen`/`rejected` make
/// a bad row at that line (an empty continuation gives the preference loss nothing to
/// compare). The prompt may be empty. Blank lines are ignored.
pub fn load_preferences(
    path: &Path,
    opts: &LoadOptions,
) -> Result<Loaded<PreferencePair>, DataError> {
    let text = read_text(path)?;
    let mut out = Loaded::new();
    let mut rows = 0usize;
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        rows += 1;
        match parse_line(raw, i + 1) {
            Ok(pair) => {
                if out.accept(pair, opts) {
                    break;
                }
            }
            Err(bad) => out.reject(bad, path, opts)?,
        }
    }
    if rows == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Parses one JSONL line, or says why it is bad.
fn parse_line(raw: &str, line: usize) -> Result<PreferencePair, BadRow> {
    let value: Value = serde_json::from_str(raw)
        .map_err(|e| BadRow::malformed(line, format!("invalid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| BadRow::malformed(line, "expected a JSON object"))?;
    let get = |key: &str| -> Result<String, BadRow> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(BadRow::malformed(
                line,
                format!("key {key:?} is not a string: {other}"),
            )),
            None => Err(BadRow::malformed(line, format!("missing key {key:?}"))),
        }
    };
    let pair = PreferencePair {
        prompt: get("prompt")?,
        chosen: get("chosen")?,
        rejected: get("rejected")?,
    };
    for (key, value) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
        if value.trim().is_empty() {
            return Err(BadRow::malformed(
                line,
                format!("{key} is empty or whitespace-only"),
            ));
        }
    }
    Ok(pair)
}
