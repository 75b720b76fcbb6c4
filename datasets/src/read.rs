//! Whole-file reading shared by the loaders (all inputs are a few MiB at most).

use std::path::Path;

use crate::error::DataError;

/// UTF-8 byte-order mark, which some exported files start with.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads a file's bytes, mapping failures to [`DataError::Io`] with the path.
pub(crate) fn read_bytes(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Drops a leading UTF-8 BOM; otherwise it would be glued onto the first field or key.
pub(crate) fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(BOM).unwrap_or(bytes)
}

/// Reads a whole file as UTF-8 text without a BOM; invalid UTF-8 is `Malformed` at its line.
pub(crate) fn read_text(path: &Path) -> Result<String, DataError> {
    let mut bytes = read_bytes(path)?;
    if bytes.starts_with(BOM) {
        bytes.drain(..BOM.len());
    }
    String::from_utf8(bytes).map_err(|e| {
        let offset = e.utf8_error().valid_up_to();
        DataError::Malformed {
            path: path.to_path_buf(),
            line: line_of(e.as_bytes(), offset),
            message: format!("invalid UTF-8 at byte {offset}"),
        }
    })
}

/// 1-based line number of byte `offset` in `bytes`.
pub(crate) fn line_of(bytes: &[u8], offset: usize) -> usize {
    1 + bytes[..offset.min(bytes.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}
