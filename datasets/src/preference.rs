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

impl PreferencePair {
    /// The conversation of an HH-RLHF pair as turns (`user` / `assistant`, in order), ending
    /// with the assistant turn whose reply is `chosen` or `rejected`: `None` when the prompt
    /// is not `\n\nHuman: …\n\nAssistant: …` text ending in an open `\n\nAssistant:`.
    pub fn hh_turns(&self, reply: &str) -> Option<Vec<(&'static str, String)>> {
        const HUMAN: &str = "\n\nHuman:";
        const ASSISTANT: &str = "\n\nAssistant:";
        let open = self.prompt.strip_suffix(ASSISTANT)?;
        let mut turns = Vec::new();
        let mut rest = open.strip_prefix(HUMAN)?;
        let mut role = "user";
        loop {
            // The next marker of the other speaker ends this turn.
            let marker = if role == "user" { ASSISTANT } else { HUMAN };
            match rest.find(marker) {
                Some(i) => {
                    turns.push((role, rest[..i].trim().to_string()));
                    rest = &rest[i + marker.len()..];
                    role = if role == "user" { "assistant" } else { "user" };
                }
                None => {
                    turns.push((role, rest.trim().to_string()));
                    break;
                }
            }
        }
        // The prompt ends with the human's turn; the reply is the assistant's. Two turns of one
        // speaker in a row leave a marker inside a turn: not alternating, not rendered.
        let nested = turns
            .iter()
            .any(|(_, t)| t.contains(HUMAN) || t.contains(ASSISTANT));
        if role != "user" || nested {
            return None;
        }
        turns.push(("assistant", reply.trim().to_string()));
        Some(turns)
    }
}

#[cfg(test)]
mod hh_tests {
    use super::*;

    #[test]
    fn hh_text_splits_into_alternating_turns() {
        let p = PreferencePair {
            prompt: "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: a pen prank?\n\nAssistant:"
                .into(),
            chosen: " No.".into(),
            rejected: " Sure.".into(),
        };
        let t = p.hh_turns(&p.chosen).unwrap();
        assert_eq!(
            t,
            vec![
                ("user", "hi there".to_string()),
                ("assistant", "hello".to_string()),
                ("user", "a pen prank?".to_string()),
                ("assistant", "No.".to_string()),
            ]
        );
        let bad = PreferencePair {
            prompt: "Human: no leading newlines\n\nAssistant:".into(),
            ..p.clone()
        };
        assert!(bad.hh_turns("x").is_none());
        let twice = PreferencePair {
            prompt: "\n\nHuman: a\n\nHuman: b\n\nAssistant:".into(),
            ..p.clone()
        };
        assert!(twice.hh_turns("x").is_none());
        let ends_with_assistant = PreferencePair {
            prompt: "\n\nHuman: a\n\nAssistant: b\n\nAssistant:".into(),
            ..p
        };
        assert!(ends_with_assistant.hh_turns("x").is_none());
    }
}
