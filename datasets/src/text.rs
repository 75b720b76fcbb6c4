//! Plain-text corpora (e.g. tinyshakespeare) for language-model training.

use std::path::Path;

use crate::error::DataError;
use crate::read::read_text;

/// Reads a UTF-8 text corpus (BOM stripped); an empty or whitespace-only file is `Empty`.
pub fn load_text(path: &Path) -> Result<String, DataError> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Splits `text` into (train, val) with the last `val_fraction` of characters as val.
///
/// Matches the nanoGPT convention `data[:int(n * 0.9)]` for `val_fraction = 0.1`,
/// counting characters (not bytes) so the cut always lands on a char boundary.
///
/// # Panics
/// If `val_fraction` is not within `[0, 1]`.
pub fn split_train_val(text: &str, val_fraction: f64) -> (&str, &str) {
    assert!(
        (0.0..=1.0).contains(&val_fraction),
        "val_fraction must be in [0, 1], got {val_fraction}"
    );
    let n_chars = text.chars().count();
    let n_train = ((n_chars as f64) * (1.0 - val_fraction)).floor() as usize;
    let cut = text
        .char_indices()
        .nth(n_train)
        .map_or(text.len(), |(byte, _)| byte);
    text.split_at(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_counts_chars() {
        let (a, b) = split_train_val("0123456789", 0.1);
        assert_eq!((a, b), ("012345678", "9"));
        let (a, b) = split_train_val("ééééé", 0.2);
        assert_eq!((a, b), ("éééé", "é"));
        assert_eq!(split_train_val("abc", 0.0), ("abc", ""));
        assert_eq!(split_train_val("abc", 1.0), ("", "abc"));
    }
}
