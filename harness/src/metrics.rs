//! Evaluation metrics as GLUE defines them: they live beside the records, whose per-example
//! outcomes the reports resample with the same definitions.

pub use peftbench_reports::metrics::*;
