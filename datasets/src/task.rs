//! Text-classification / regression tasks described as data.
//!
//! A GLUE-style task is just "which file, which columns, which labels"; keeping that in a
//! serde struct means a suite file can declare a new task without new code, and the four
//! built-ins below are ordinary values of the same type.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// Which split of a task to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Training split.
    Train,
    /// Development (validation) split; GLUE test labels are not public.
    Dev,
}

/// What the label column holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Class labels; the label text must equal one of `names`, whose index is the class id.
    Classes {
        /// Label strings in class-id order (numeric labels are written "0", "1", ...).
        names: Vec<String>,
    },
    /// A real-valued score; values outside `[min, max]` are bad rows.
    Regression {
        /// Smallest allowed score.
        min: f32,
        /// Largest allowed score.
        max: f32,
    },
}

/// The evaluation metric GLUE reports for a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlueMetric {
    /// Fraction of correct predictions (SST-2, RTE).
    Accuracy,
    /// Matthews correlation coefficient (CoLA).
    Matthews,
    /// Pearson and Spearman correlation (STS-B).
    PearsonSpearman,
    /// F1 and accuracy (MRPC, QQP).
    F1Accuracy,
}

impl GlueMetric {
    /// The metric a task gets when its spec does not name one.
    pub fn default_for(target: &Target) -> Self {
        match target {
            Target::Classes { .. } => GlueMetric::Accuracy,
            Target::Regression { .. } => GlueMetric::PearsonSpearman,
        }
    }
}

/// A delimited-text task: files, column layout, label kind and metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSpec")]
pub struct TextTaskSpec {
    /// Task name used in reports.
    pub name: String,
    /// Training file (relative paths can be anchored with [`TextTaskSpec::with_root`]).
    pub train: PathBuf,
    /// Development file.
    pub dev: PathBuf,
    /// Whether the first row is a header (it is checked for column count, then ignored).
    pub header: bool,
    /// Exact number of tab-separated columns every row must have.
    pub columns: usize,
    /// Column index of the first text.
    pub text_a: usize,
    /// Column index of the second text for sentence-pair tasks.
    pub text_b: Option<usize>,
    /// Column index of the label.
    pub label: usize,
    /// What the label column holds.
    pub target: Target,
    /// Metric to report for this task.
    pub metric: GlueMetric,
}

/// Deserialization shape: same fields, but `header`, `text_b` and `metric` are optional,
/// and the result is validated so a broken suite file fails when it is read, not mid-run.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    // In a suite's `[[tasks]]` table the task's own `name` is taken by the task and filled in
    // afterwards; a spec read alone still names itself.
    #[serde(default)]
    name: String,
    train: PathBuf,
    dev: PathBuf,
    #[serde(default)]
    header: bool,
    columns: usize,
    text_a: usize,
    #[serde(default)]
    text_b: Option<usize>,
    label: usize,
    target: Target,
    #[serde(default)]
    metric: Option<GlueMetric>,
}

impl TryFrom<RawSpec> for TextTaskSpec {
    type Error = DataError;

    fn try_from(raw: RawSpec) -> Result<Self, DataError> {
        let metric = raw
            .metric
            .unwrap_or_else(|| GlueMetric::default_for(&raw.target));
        let spec = TextTaskSpec {
            name: raw.name,
            train: raw.train,
            dev: raw.dev,
            header: raw.header,
            columns: raw.columns,
            text_a: raw.text_a,
            text_b: raw.text_b,
            label: raw.label,
            target: raw.target,
            metric,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Names accepted by [`TextTaskSpec::glue`], in canonical form.
pub const GLUE_TASKS: [&str; 4] = ["sst2", "rte", "cola", "stsb"];

impl TextTaskSpec {
    /// Built-in GLUE task (`sst2`, `rte`, `cola`, `stsb`; also `SST-2`, `STS_B`, ...) under `glue_root`.
    pub fn glue(name: &str, glue_root: &Path) -> Option<Self> {
        // Case and separators vary between papers, folders and HF names; compare without them.
        let key: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let classes = |names: &[&str]| Target::Classes {
            names: names.iter().map(|s| s.to_string()).collect(),
        };
        let (dir, header, columns, text_a, text_b, label, target, metric) = match key.as_str() {
            // sentence \t label, with a header.
            "sst2" => (
                "SST-2",
                true,
                2,
                0,
                None,
                1,
                classes(&["0", "1"]),
                GlueMetric::Accuracy,
            ),
            // index \t sentence1 \t sentence2 \t label; 0 = entailment as in HF `glue/rte`.
            "rte" => (
                "RTE",
                true,
                4,
                1,
                Some(2),
                3,
                classes(&["entailment", "not_entailment"]),
                GlueMetric::Accuracy,
            ),
            // source \t label \t author_mark \t sentence, NO header row.
            "cola" => (
                "CoLA",
                false,
                4,
                3,
                None,
                1,
                classes(&["0", "1"]),
                GlueMetric::Matthews,
            ),
            // 10 columns; sentence1, sentence2, score are the last three.
            "stsb" => (
                "STS-B",
                true,
                10,
                7,
                Some(8),
                9,
                Target::Regression { min: 0.0, max: 5.0 },
                GlueMetric::PearsonSpearman,
            ),
            _ => return None,
        };
        let dir = glue_root.join(dir);
        Some(TextTaskSpec {
            name: key,
            train: dir.join("train.tsv"),
            dev: dir.join("dev.tsv"),
            header,
            columns,
            text_a,
            text_b,
            label,
            target,
            metric,
        })
    }

    /// The metric to report for this task.
    pub fn metric(&self) -> GlueMetric {
        self.metric
    }

    /// The file for `split`.
    pub fn path(&self, split: Split) -> &Path {
        match split {
            Split::Train => &self.train,
            Split::Dev => &self.dev,
        }
    }

    /// Number of classes, or `None` for a regression task.
    pub fn num_classes(&self) -> Option<usize> {
        match &self.target {
            Target::Classes { names } => Some(names.len()),
            Target::Regression { .. } => None,
        }
    }

    /// The same spec with relative `train`/`dev` paths resolved against `root`.
    pub fn with_root(mut self, root: &Path) -> Self {
        // Path::join keeps absolute paths unchanged, which is what a suite file expects.
        self.train = root.join(&self.train);
        self.dev = root.join(&self.dev);
        self
    }

    /// Checks that column indices, labels and metric are consistent.
    pub fn validate(&self) -> Result<(), DataError> {
        let fail = |message: String| {
            Err(DataError::Config {
                task: self.name.clone(),
                message,
            })
        };
        if self.columns == 0 {
            return fail("columns must be at least 1".into());
        }
        let mut used = vec![("text_a", self.text_a), ("label", self.label)];
        if let Some(b) = self.text_b {
            used.push(("text_b", b));
        }
        for (field, idx) in &used {
            if *idx >= self.columns {
                return fail(format!(
                    "{field} = {idx} is out of range for {} columns",
                    self.columns
                ));
            }
        }
        let distinct: HashSet<usize> = used.iter().map(|(_, i)| *i).collect();
        if distinct.len() != used.len() {
            return fail("text_a, text_b and label must be different columns".into());
        }
        match &self.target {
            Target::Classes { names } => {
                if names.len() < 2 {
                    return fail("a classification target needs at least 2 class names".into());
                }
                let unique: HashSet<&str> = names.iter().map(|n| n.trim()).collect();
                if unique.len() != names.len() || unique.contains("") {
                    return fail("class names must be non-empty and distinct".into());
                }
                if self.metric == GlueMetric::PearsonSpearman {
                    return fail("pearson_spearman needs a regression target".into());
                }
            }
            Target::Regression { min, max } => {
                if !(min.is_finite() && max.is_finite() && min < max) {
                    return fail(format!("regression range [{min}, {max}] is not valid"));
                }
                if self.metric != GlueMetric::PearsonSpearman {
                    return fail(format!("{:?} needs a classification target", self.metric));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glue_names_are_normalised() {
        let root = Path::new("/g");
        for (alias, canon) in [
            ("SST-2", "sst2"),
            ("sts_b", "stsb"),
            ("CoLA", "cola"),
            ("RTE", "rte"),
        ] {
            let spec = TextTaskSpec::glue(alias, root).unwrap();
            assert_eq!(spec.name, canon);
            spec.validate().unwrap();
        }
        assert!(TextTaskSpec::glue("mnli", root).is_none());
    }

    #[test]
    fn default_metrics() {
        let root = Path::new("/g");
        let m = |n| TextTaskSpec::glue(n, root).unwrap().metric();
        assert_eq!(m("sst2"), GlueMetric::Accuracy);
        assert_eq!(m("rte"), GlueMetric::Accuracy);
        assert_eq!(m("cola"), GlueMetric::Matthews);
        assert_eq!(m("stsb"), GlueMetric::PearsonSpearman);
        assert_eq!(
            TextTaskSpec::glue("cola", root).unwrap().path(Split::Dev),
            Path::new("/g/CoLA/dev.tsv")
        );
    }

    #[test]
    fn spec_roundtrips_through_serde() {
        let spec = TextTaskSpec::glue("rte", Path::new("/g")).unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: TextTaskSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(spec, back);
    }

    #[test]
    fn invalid_specs_are_rejected_on_deserialize() {
        let bad = serde_json::json!({
            "name": "x", "train": "a", "dev": "b", "columns": 2,
            "text_a": 0, "label": 2, "target": {"kind": "classes", "names": ["a", "b"]}
        });
        let err = serde_json::from_value::<TextTaskSpec>(bad).unwrap_err();
        assert!(
            err.to_string().contains("label = 2 is out of range"),
            "{err}"
        );
        let bad = serde_json::json!({
            "name": "x", "train": "a", "dev": "b", "columns": 2, "text_a": 0, "label": 1,
            "target": {"kind": "regression", "min": 1.0, "max": 0.0}
        });
        assert!(serde_json::from_value::<TextTaskSpec>(bad).is_err());
    }
}
