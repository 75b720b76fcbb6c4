//! Loader for tab-separated GLUE-style files described by a [`TextTaskSpec`].

use crate::error::DataError;
use crate::loaded::{BadRow, LoadOptions, Loaded, Problem};
use crate::read::{read_bytes, strip_bom};
use crate::task::{Split, Target, TextTaskSpec};

/// A label: a class id (index into `Target::Classes::names`) or a regression score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Label {
    /// Class id.
    Class(usize),
    /// Real-valued score.
    Score(f32),
}

impl Label {
    /// The class id, if this is a class label.
    pub fn class(self) -> Option<usize> {
        match self {
            Label::Class(c) => Some(c),
            Label::Score(_) => None,
        }
    }

    /// The score, if this is a regression label.
    pub fn score(self) -> Option<f32> {
        match self {
            Label::Score(s) => Some(s),
            Label::Class(_) => None,
        }
    }
}

/// One example of a text task: one or two (trimmed) texts and a label.
#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    /// First text.
    pub text_a: String,
    /// Second text for sentence-pair tasks.
    pub text_b: Option<String>,
    /// Gold label.
    pub label: Label,
}

/// Loads one split of `spec`.
///
/// Files are read tab-separated with quoting off (GLUE sentences contain `"`), a leading
/// UTF-8 BOM is ignored, blank lines are ignored, and texts and labels are trimmed
/// (SST-2 has a space before each tab). A header row, when the spec says there is one,
/// must have the right column count; problems with it are always fatal.
pub fn load_text_task(
    spec: &TextTaskSpec,
    split: Split,
    opts: &LoadOptions,
) -> Result<Loaded<TextExample>, DataError> {
    spec.validate()?;
    let path = spec.path(split);
    let bytes = read_bytes(path)?;
    let body = strip_bom(&bytes);
    // has_headers(false): we handle the header ourselves so that the header row goes
    // through the same line accounting as data rows. flexible(true): the reader must not
    // reject ragged rows itself, so we can report them (or skip them) with our own message.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .quoting(false)
        .has_headers(false)
        .flexible(true)
        .from_reader(body);
    let mut record = csv::ByteRecord::new();
    let mut lines = LineCounter::default();
    let mut out = Loaded::new();
    let mut header_pending = spec.header;
    let mut data_rows = 0usize;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                // With quoting off the reader only fails on I/O, which cannot happen on
                // an in-memory buffer; still report it rather than unwrap.
                let line = e.position().map_or(0, |p| lines.line_at(body, p.byte()));
                return Err(BadRow::malformed(line, e.to_string()).into_error(path));
            }
        }
        let line = record
            .position()
            .map_or(0, |p| lines.line_at(body, p.byte()));
        if header_pending {
            header_pending = false;
            if record.len() != spec.columns {
                let msg = format!(
                    "header: expected {} columns, found {}",
                    spec.columns,
                    record.len()
                );
                return Err(BadRow::malformed(line, msg).into_error(path));
            }
            continue;
        }
        data_rows += 1;
        match parse_row(spec, &record, line) {
            Ok(example) => {
                if out.accept(example, opts) {
                    break;
                }
            }
            Err(bad) => out.reject(bad, path, opts)?,
        }
    }
    if data_rows == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Maps record byte offsets to 1-based physical line numbers.
///
/// The csv reader's own `Position::line()` miscounts after blank lines and with CRLF
/// endings (csv 1.4), so lines are counted here from the byte offsets instead. A record's
/// reported offset may point at the terminators before it (blank lines), so those are
/// skipped first; with quoting off a record never starts with `\r` or `\n`.
#[derive(Default)]
struct LineCounter {
    /// Bytes consumed so far.
    pos: usize,
    /// Line breaks seen in `bytes[..pos]`.
    breaks: usize,
}

impl LineCounter {
    /// Line on which the record whose reported offset is `offset` starts (offsets must not decrease).
    fn line_at(&mut self, bytes: &[u8], offset: u64) -> usize {
        let mut start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        while start < bytes.len() && matches!(bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        for i in self.pos..start.max(self.pos) {
            // "\r\n" counts once (at the \n); a lone "\r" is an old-Mac line break.
            let is_break = match bytes[i] {
                b'\n' => true,
                b'\r' => bytes.get(i + 1) != Some(&b'\n'),
                _ => false,
            };
            self.breaks += usize::from(is_break);
        }
        self.pos = self.pos.max(start);
        self.breaks + 1
    }
}

/// Turns one record into an example, or says why it is bad.
fn parse_row(
    spec: &TextTaskSpec,
    record: &csv::ByteRecord,
    line: usize,
) -> Result<TextExample, BadRow> {
    if record.len() != spec.columns {
        let msg = format!("expected {} columns, found {}", spec.columns, record.len());
        return Err(BadRow::malformed(line, msg));
    }
    let field = |idx: usize| -> Result<&str, BadRow> {
        std::str::from_utf8(&record[idx])
            .map(str::trim)
            .map_err(|e| BadRow::malformed(line, format!("column {idx}: invalid UTF-8 ({e})")))
    };
    let text = |idx: usize| -> Result<String, BadRow> {
        let s = field(idx)?;
        if s.is_empty() {
            return Err(BadRow::malformed(line, format!("column {idx}: empty text")));
        }
        Ok(s.to_string())
    };
    let text_a = text(spec.text_a)?;
    let text_b = spec.text_b.map(text).transpose()?;
    let raw = field(spec.label)?;
    let label = match &spec.target {
        Target::Classes { names } => match names.iter().position(|n| n.trim() == raw) {
            Some(i) => Label::Class(i),
            None => {
                return Err(BadRow {
                    line,
                    problem: Problem::UnknownLabel {
                        label: raw.to_string(),
                        known: names.clone(),
                    },
                })
            }
        },
        Target::Regression { min, max } => {
            let score: f32 = raw
                .parse()
                .ok()
                .filter(|s: &f32| s.is_finite())
                .ok_or_else(|| BadRow::malformed(line, format!("score {raw:?} is not a number")))?;
            if score < *min || score > *max {
                let msg = format!("score {score} is outside [{min}, {max}]");
                return Err(BadRow::malformed(line, msg));
            }
            Label::Score(score)
        }
    };
    Ok(TextExample {
        text_a,
        text_b,
        label,
    })
}
