//! Loader and prompt template for Alpaca-format instruction data.
//!
//! The file is ONE JSON array of `{instruction, input, output}` objects (not JSONL).

use std::path::Path;

use serde_json::Value;

use crate::error::DataError;
use crate::loaded::{BadRow, LoadOptions, Loaded};
use crate::read::read_text;

/// Stanford Alpaca prompt for examples with an input (from `tatsu-lab/stanford_alpaca` train.py).
pub const PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

/// Stanford Alpaca prompt for examples without an input.
pub const PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

/// One instruction-following example; `input` is empty when the row has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstructionExample {
    /// The task description.
    pub instruction: String,
    /// Optional context; placeholders like `<noinput>` are normalised to "".
    pub input: String,
    /// The reference response.
    pub output: String,
}

impl InstructionExample {
    /// The Stanford Alpaca prompt (with or without the `### Input:` block), ending in `### Response:\n`.
    pub fn prompt(&self) -> String {
        // Fill instruction first and input second so text inside the instruction that
        // happens to read "{input}" is never substituted.
        if self.input.is_empty() {
            PROMPT_NO_INPUT.replacen("{instruction}", &self.instruction, 1)
        } else {
            let (head, tail) = PROMPT_WITH_INPUT
                .split_once("{input}")
                .expect("template has an {input} slot");
            format!(
                "{}{}{}",
                head.replacen("{instruction}", &self.instruction, 1),
                self.input,
                tail
            )
        }
    }

    /// The training target: the output text (the caller appends EOS).
    pub fn response(&self) -> String {
        self.output.clone()
    }
}

/// Whether an input is a "no input" placeholder rather than real context.
///
/// The Alpaca data spells the placeholder many ways (`<noinput>`, `<No Input>`,
/// `< noinput >`, `"<noinput>"`, `[noinput]`, `No input.`, typos `<ninput>`/`<noput>`,
/// `No input required`). Comparing only the lower-cased letters catches all of them
/// while leaving real inputs such as `None` or `N/A` (which may be content) alone.
pub fn is_placeholder_input(input: &str) -> bool {
    let letters: String = input
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    matches!(
        letters.as_str(),
        "" | "noinput" | "ninput" | "noput" | "noinputneeded" | "noinputrequired"
    )
}

/// Loads an Alpaca JSON array.
///
/// Invalid JSON (or a top level that is not an array) is always fatal, because a single
/// JSON document cannot be resynchronised; per-item problems (not an object, missing or
/// non-string key, empty instruction or output) are bad rows and honour `skip_bad_rows`.
/// Reasons name the 0-based array index as well as the line the item starts on.
pub fn load_alpaca(
    path: &Path,
    opts: &LoadOptions,
) -> Result<Loaded<InstructionExample>, DataError> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| DataError::Malformed {
        path: path.to_path_buf(),
        line: e.line(),
        message: format!("invalid JSON: {e}"),
    })?;
    if items.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    // serde_json's Value keeps no positions, so find the line each item starts on ourselves.
    let lines = element_lines(text.as_bytes());
    debug_assert_eq!(lines.len(), items.len());
    let mut out = Loaded::new();
    for (index, item) in items.iter().enumerate() {
        let line = lines.get(index).copied().unwrap_or(1);
        match parse_item(item, index, line) {
            Ok(example) => {
                if out.accept(example, opts) {
                    break;
                }
            }
            Err(bad) => out.reject(bad, path, opts)?,
        }
    }
    Ok(out)
}

/// Converts one array item, or says why it is bad.
fn parse_item(item: &Value, index: usize, line: usize) -> Result<InstructionExample, BadRow> {
    let bad = |msg: String| BadRow::malformed(line, format!("item {index}: {msg}"));
    let obj = item
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".into()))?;
    let get = |key: &str| -> Result<String, BadRow> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad(format!("key {key:?} is not a string: {other}"))),
            None => Err(bad(format!("missing key {key:?}"))),
        }
    };
    let instruction = get("instruction")?;
    let input = get("input")?;
    let output = get("output")?;
    if instruction.trim().is_empty() {
        return Err(bad("empty instruction".into()));
    }
    // An empty target teaches the model to emit EOS immediately; never train on it.
    if output.trim().is_empty() {
        return Err(bad("empty output".into()));
    }
    let input = if is_placeholder_input(&input) {
        String::new()
    } else {
        input
    };
    Ok(InstructionExample {
        instruction,
        input,
        output,
    })
}

/// 1-based line on which each top-level element of a (valid) JSON array starts.
///
/// One pass that counts newlines as it goes (raw newlines can only appear outside strings
/// in valid JSON), so the cost stays linear in the file size.
fn element_lines(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let (mut depth, mut in_string, mut escaped, mut in_element) = (0usize, false, false, false);
    let mut line = 1;
    for &b in bytes {
        if b == b'\n' {
            line += 1;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && !in_element && !b.is_ascii_whitespace() && b != b',' && b != b']' {
            starts.push(line);
            in_element = true;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => in_element = false,
            _ => {}
        }
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_lines_handle_nesting_and_strings() {
        let s = b"[ {\"a\": \"x,]\\\"{\"},\n [1,\n 2], 3\n ,\"s\"]";
        assert_eq!(element_lines(s), [1, 2, 3, 4]);
        assert_eq!(element_lines(b"[]"), Vec::<usize>::new());
    }

    #[test]
    fn placeholders() {
        for p in [
            "<noinput>",
            "<No Input>",
            "< noinput >",
            "\"<noinput>\"",
            "No input.",
            "<ninput>",
            "",
        ] {
            assert!(is_placeholder_input(p), "{p}");
        }
        for p in ["None", "N/A", "Input: 2", "G, B, E"] {
            assert!(!is_placeholder_input(p), "{p}");
        }
    }

    #[test]
    fn prompt_template() {
        let mut ex = InstructionExample {
            instruction: "Sort {input}".into(),
            input: String::new(),
            output: "a b".into(),
        };
        assert_eq!(
            ex.prompt(),
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSort {input}\n\n### Response:\n"
        );
        ex.input = "b a".into();
        assert!(ex
            .prompt()
            .ends_with("### Instruction:\nSort {input}\n\n### Input:\nb a\n\n### Response:\n"));
        assert_eq!(ex.response(), "a b");
    }
}
