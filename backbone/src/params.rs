//! The trainable parameters of a run: named variables, counted, saved and loaded.

use crate::error::{BackboneError, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// An ordered set of named trainable variables.
#[derive(Debug, Clone, Default)]
pub struct TrainableParams {
    entries: Vec<(String, Var)>,
}

impl TrainableParams {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `init` a variable named `name` and returns the tensor to compute with. Variables
    /// are f32 whatever the base's dtype: they are the master weights a bf16 run steps.
    pub fn add(&mut self, name: impl Into<String>, init: Tensor) -> Result<Tensor> {
        let name = name.into();
        if self.entries.iter().any(|(n, _)| *n == name) {
            return Err(BackboneError::Input(format!(
                "parameter `{name}` defined twice"
            )));
        }
        let var = Var::from_tensor(&init.detach().to_dtype(DType::F32)?.contiguous()?)?;
        let t = var.as_tensor().clone();
        self.entries.push((name, var));
        Ok(t)
    }

    /// Adds every entry of `other`, keeping names distinct with `prefix`.
    pub fn extend(&mut self, prefix: &str, other: TrainableParams) -> Result<()> {
        for (n, v) in other.entries {
            let name = format!("{prefix}{n}");
            if self.entries.iter().any(|(m, _)| *m == name) {
                return Err(BackboneError::Input(format!(
                    "parameter `{name}` defined twice"
                )));
            }
            self.entries.push((name, v));
        }
        Ok(())
    }

    /// The variables, in creation order.
    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }

    /// Names and variables.
    pub fn entries(&self) -> &[(String, Var)] {
        &self.entries
    }

    /// The variable named `name`.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Total number of trainable scalars.
    pub fn count(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Current values, detached, by name.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.entries
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }

    /// Sets every variable from a [`Self::snapshot`] of these parameters.
    pub fn restore(&self, snapshot: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in &self.entries {
            if let Some(t) = snapshot.get(name) {
                var.set(t)?;
            }
        }
        Ok(())
    }

    /// Writes every variable to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.snapshot()?, path)?;
        Ok(())
    }

    /// Sets every variable from a safetensors file written by [`Self::save`]; a missing tensor or
    /// a wrong shape is an error naming the file and tensor.
    pub fn load(&self, path: &Path) -> Result<()> {
        let mut file = crate::weights::WeightFile::open(path, &candle_core::Device::Cpu)?;
        for (name, var) in &self.entries {
            let t = file.take(name, var.dims())?;
            var.set(&t.to_device(var.device())?)?;
        }
        Ok(())
    }
}
