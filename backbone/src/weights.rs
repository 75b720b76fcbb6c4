//! A safetensors file opened for loading, with errors that name the file and tensor.

use crate::error::{BackboneError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensors of one safetensors file, taken out by name and checked against expected shapes.
pub struct WeightFile {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
    prefix: String,
}

impl WeightFile {
    /// Reads every tensor of `path` onto `device` as f32.
    pub fn open(path: &Path, device: &Device) -> Result<Self> {
        if !path.exists() {
            return Err(BackboneError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            });
        }
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| {
            BackboneError::Safetensors {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
            prefix: String::new(),
        })
    }

    /// Wraps tensors already in memory; `path` names them in errors.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            path: path.to_path_buf(),
            tensors,
            prefix: String::new(),
        }
    }

    /// The file these tensors came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Uses the first of `candidates` under which `probe` exists as the name prefix
    /// (checkpoints saved from a task model nest the backbone under `bert.`, `transformer.`, …).
    pub fn detect_prefix(&mut self, probe: &str, candidates: &[&str]) {
        for p in candidates {
            if self.tensors.contains_key(&format!("{p}{probe}")) {
                self.prefix = p.to_string();
                return;
            }
        }
    }

    /// Whether a tensor (under the detected prefix) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(&format!("{}{name}", self.prefix))
    }

    /// Takes a tensor and checks its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .tensors
            .remove(&full)
            .ok_or_else(|| BackboneError::MissingTensor {
                path: self.path.clone(),
                name: full.clone(),
            })?;
        if t.dims() != shape {
            return Err(BackboneError::ShapeMismatch {
                path: self.path.clone(),
                name: full,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let count = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|v| !v.is_finite())
            .count();
        if count > 0 {
            return Err(BackboneError::NonFinite {
                path: self.path.clone(),
                name: full,
                count,
            });
        }
        Ok(t)
    }

    /// Fails when a backbone tensor was left untaken. Buffers that hold no weights
    /// (`position_ids`, rotary `inv_freq`, GPT-2's causal-mask `attn.bias`) and task heads
    /// outside the backbone (`classifier`, `cls`, `lm_head`, `score`, …) may remain.
    pub fn ensure_all_used(&self) -> Result<()> {
        const BUFFERS: [&str; 4] = [
            "position_ids",
            "inv_freq",
            ".attn.bias",
            ".attn.masked_bias",
        ];
        const HEADS: [&str; 6] = [
            "classifier.",
            "cls.",
            "lm_head.",
            "score.",
            "qa_outputs.",
            "pre_classifier.",
        ];
        let mut names: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !BUFFERS.iter().any(|b| k.ends_with(b)))
            .filter(|k| match k.strip_prefix(&self.prefix) {
                Some(rest) => !HEADS.iter().any(|h| rest.starts_with(h)),
                // Outside the backbone's prefix: a task head of a task model's checkpoint.
                None => false,
            })
            .cloned()
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        names.sort();
        Err(BackboneError::UnusedTensors {
            path: self.path.clone(),
            names,
        })
    }

    /// Takes a tensor if present (e.g. an untied LM head), checking its shape.
    pub fn take_optional(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl WeightFile {
    /// Replaces the name prefix, returning the old one.
    pub fn swap_prefix(&mut self, prefix: String) -> String {
        std::mem::replace(&mut self.prefix, prefix)
    }
}

impl WeightFile {
    /// The shape of a tensor (under the detected prefix), if present.
    pub fn dims(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors
            .get(&format!("{}{name}", self.prefix))
            .map(|t| t.dims().to_vec())
    }
}
