//! Prefix tuning (Li & Liang 2021): trainable key/value prefixes in every layer, produced while
//! training by an MLP reparametrisation; export keeps only the computed prefix.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::prefix_kv::{split_table, PrefixMlp};
use crate::{AttachContext, Method};
use candle_core::Tensor;
use peftbench_backbone::{Intervention, KvPrefix, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::Path;

/// Prefix-tuning configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixTuningConfig {
    /// Prefix length p.
    #[serde(default = "crate::defaults::num_virtual_tokens")]
    pub num_virtual_tokens: usize,
    /// Width of the reparametrising MLP's hidden layer.
    #[serde(default = "d_mid")]
    pub encoder_hidden_size: usize,
}

fn d_mid() -> usize {
    128
}

impl Default for PrefixTuningConfig {
    fn default() -> Self {
        Self {
            num_virtual_tokens: 20,
            encoder_hidden_size: d_mid(),
        }
    }
}

impl PrefixTuningConfig {
    /// Checks the configuration.
    pub fn validate(&self, _model: &ModelConfig) -> Result<()> {
        if self.encoder_hidden_size == 0 {
            return Err(invalid(
                "prefix_tuning",
                "encoder_hidden_size must be at least 1",
            ));
        }
        Ok(())
    }

    /// Closed form of the training-time count (embedding + MLP).
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        PrefixMlp::num_parameters(model, self.num_virtual_tokens, self.encoder_hidden_size)
    }

    /// Closed form of what export keeps: p·2·layers·kv_dim.
    pub fn num_kept(&self, model: &ModelConfig) -> usize {
        self.num_virtual_tokens * crate::prefix_kv::table_width(model)
    }
}

/// Prefix tuning attached to a model.
pub struct PrefixTuning {
    model: ModelConfig,
    mlp: PrefixMlp,
    params: TrainableParams,
    /// The table loaded from an export; when set, it replaces the MLP.
    loaded: RefCell<Option<Tensor>>,
}

impl PrefixTuning {
    /// Creates the embedding and MLP.
    pub fn attach(config: &PrefixTuningConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let dev = ctx.model.device().clone();
        let mut params = TrainableParams::new();
        let mlp = PrefixMlp::new(
            &ctx.model.config,
            config.num_virtual_tokens,
            config.encoder_hidden_size,
            &mut params,
            &mut ctx.init,
            &dev,
        )?;
        Ok(Self {
            model: ctx.model.config.clone(),
            mlp,
            params,
            loaded: RefCell::new(None),
        })
    }

    /// The computed prefix alone, with the MLP dropped: what inference needs.
    pub fn export(&self) -> Result<PrefixTable> {
        let table = match &*self.loaded.borrow() {
            Some(t) => t.clone(),
            None => self.mlp.table()?.detach(),
        };
        Ok(PrefixTable {
            model: self.model.clone(),
            table,
            params: TrainableParams::new(),
        })
    }
}

impl Intervention for PrefixTuning {
    fn kv_prefixes(&self) -> candle_core::Result<Option<Vec<KvPrefix>>> {
        if self.mlp.embedding.dims()[0] == 0 {
            return Ok(None);
        }
        let table = match &*self.loaded.borrow() {
            Some(t) => t.clone(),
            None => self.mlp.table()?,
        };
        split_table(&table, &self.model).map(Some)
    }
}

impl Method for PrefixTuning {
    fn name(&self) -> &'static str {
        "prefix_tuning"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    /// Saves the exported prefix only (`prefix.table`), not the MLP.
    fn save(&self, path: &Path) -> Result<()> {
        self.export()?.save(path)
    }
    /// Loads an exported prefix; it then replaces the MLP in forward.
    fn load(&mut self, path: &Path) -> Result<()> {
        let t = PrefixTable::read(path, &self.model)?;
        *self.loaded.borrow_mut() = Some(t);
        Ok(())
    }
    /// PEFT keeps the computed prefix (`prompt_embeddings`), not the MLP.
    fn peft_state(
        &self,
        model: &ModelConfig,
        task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let mut state = self
            .export()?
            .peft_state(model, task)?
            .expect("a table exports");
        state.config.insert("prefix_projection".into(), true.into());
        state.config.insert(
            "encoder_hidden_size".into(),
            self.mlp.first.weight.dims()[0].into(),
        );
        Ok(Some(state))
    }
}

/// An exported prefix `[p, 2·layers·kv_dim]`: the inference form of prefix tuning.
pub struct PrefixTable {
    model: ModelConfig,
    table: Tensor,
    params: TrainableParams,
}

impl PrefixTable {
    /// The table.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// Writes the table as `prefix.table` in a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map =
            std::collections::HashMap::from([("prefix.table".to_string(), self.table.clone())]);
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Reads a table written by [`PrefixTable::save`], checking its width against the model.
    pub fn read(path: &Path, model: &ModelConfig) -> Result<Tensor> {
        let mut f = peftbench_backbone::weights::WeightFile::open(path, &candle_core::Device::Cpu)?;
        let w = crate::prefix_kv::table_width(model);
        // The prefix length is whatever was saved; only the width must match the model.
        let rows = f.dims("prefix.table").map_or(0, |d| d[0]);
        Ok(f.take("prefix.table", &[rows, w])?)
    }
}

impl Intervention for PrefixTable {
    fn kv_prefixes(&self) -> candle_core::Result<Option<Vec<KvPrefix>>> {
        if self.table.dims()[0] == 0 {
            return Ok(None);
        }
        split_table(&self.table, &self.model).map(Some)
    }
}

impl Method for PrefixTable {
    fn name(&self) -> &'static str {
        "prefix_table"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let mut config = crate::peft::prompt_config(model, self.table.dims()[0]);
        config.insert("prefix_projection".into(), false.into());
        Ok(Some(PeftState {
            peft_type: "PREFIX_TUNING".into(),
            config,
            tensors: vec![(
                PeftKey::Top("prompt_embeddings".into()),
                self.table.detach(),
            )],
        }))
    }
}

impl PrefixTable {
    /// A table `[p, 2·layers·kv_dim]` for `model`.
    pub fn new(model: &ModelConfig, table: Tensor) -> Self {
        Self {
            model: model.clone(),
            table,
            params: TrainableParams::new(),
        }
    }

    /// The prefix PEFT saved for prefix tuning or P-Tuning v2 (with or without projection,
    /// PEFT keeps the computed table).
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        let width = crate::prefix_kv::table_width(model);
        let table = crate::peft::read_prompt_embeddings(r, width)?;
        Ok(Self::new(model, table))
    }
}

impl crate::MethodSpec for PrefixTuningConfig {
    fn name(&self) -> &'static str {
        "prefix_tuning"
    }
    fn formula(&self) -> &'static str {
        "p·hidden + (hidden·mid + mid) + (mid·2·layers·kv_dim + 2·layers·kv_dim); kept: p·2·layers·kv_dim"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        PrefixTuningConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        Ok(PrefixTuningConfig::num_trainable(self, &model.config))
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "encoder_hidden_size",
            value: self.encoder_hidden_size,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.encoder_hidden_size = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn crate::Method>> {
        Ok(Box::new(PrefixTuning::attach(self, ctx)?))
    }
}
