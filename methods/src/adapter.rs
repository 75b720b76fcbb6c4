//! Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): x + up(act(down(x)))
//! on a sublayer's output. The up-projection starts at zero, so the model starts unchanged.

use crate::error::{invalid, Result};
use crate::{AttachContext, Method};
use candle_core::{DType, Tensor};
use peftbench_backbone::{Block, Intervention, Linear, ModelConfig, TrainableParams};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where adapters sit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterVariant {
    /// After attention and after the feed-forward block of every layer.
    Houlsby,
    /// After the feed-forward block only.
    Pfeiffer,
}

/// The adapter's nonlinearity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterActivation {
    /// ReLU.
    Relu,
    /// Exact GELU.
    Gelu,
    /// tanh.
    Tanh,
}

/// Adapter configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterConfig {
    /// Bottleneck width m.
    #[serde(default = "crate::defaults::bottleneck")]
    pub bottleneck: usize,
    /// Placement.
    #[serde(default = "default_variant")]
    pub variant: AdapterVariant,
    /// Nonlinearity between the projections.
    #[serde(default = "default_act")]
    pub activation: AdapterActivation,
}

fn default_variant() -> AdapterVariant {
    AdapterVariant::Houlsby
}
fn default_act() -> AdapterActivation {
    AdapterActivation::Relu
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            bottleneck: 16,
            variant: default_variant(),
            activation: default_act(),
        }
    }
}

impl AdapterConfig {
    /// The blocks an adapter follows.
    pub fn blocks(&self) -> &'static [Block] {
        match self.variant {
            AdapterVariant::Houlsby => &[Block::Attention, Block::Ffn],
            AdapterVariant::Pfeiffer => &[Block::Ffn],
        }
    }

    /// Checks the configuration.
    pub fn validate(&self, _model: &ModelConfig) -> Result<()> {
        if self.bottleneck == 0 {
            return Err(invalid("adapter", "bottleneck must be at least 1"));
        }
        Ok(())
    }

    /// Closed form: adapters · (2·h·m + m + h).
    pub fn num_trainable(&self, model: &ModelConfig) -> usize {
        let (h, m) = (model.hidden_size, self.bottleneck);
        model.num_layers * self.blocks().len() * (2 * h * m + m + h)
    }
}

/// One adapter's projections.
#[derive(Debug, Clone)]
pub struct AdapterModule {
    /// `[m, h]` down-projection.
    pub down: Linear,
    /// `[h, m]` up-projection, zero at init.
    pub up: Linear,
}

/// Adapters attached to a model.
pub struct Adapter {
    config: AdapterConfig,
    modules: BTreeMap<(usize, u8), AdapterModule>,
    params: TrainableParams,
}

fn block_key(block: Block) -> u8 {
    match block {
        Block::Attention => 0,
        Block::Ffn => 1,
    }
}

impl Adapter {
    /// Creates one adapter after each chosen block of every layer.
    pub fn attach(config: &AdapterConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let (h, m) = (ctx.model.config.hidden_size, config.bottleneck);
        let dev = ctx.model.device().clone();
        let mut params = TrainableParams::new();
        let mut modules = BTreeMap::new();
        for layer in 0..ctx.model.config.num_layers {
            for &block in config.blocks() {
                let name = format!(
                    "layer{layer}.{}",
                    if block == Block::Attention {
                        "attn"
                    } else {
                        "ffn"
                    }
                );
                let down = Linear::new(
                    params.add(
                        format!("{name}.down.weight"),
                        ctx.init.kaiming_uniform(m, h, &dev)?,
                    )?,
                    Some(params.add(
                        format!("{name}.down.bias"),
                        Tensor::zeros(m, DType::F32, &dev)?,
                    )?),
                );
                let up = Linear::new(
                    params.add(
                        format!("{name}.up.weight"),
                        Tensor::zeros((h, m), DType::F32, &dev)?,
                    )?,
                    Some(params.add(
                        format!("{name}.up.bias"),
                        Tensor::zeros(h, DType::F32, &dev)?,
                    )?),
                );
                modules.insert((layer, block_key(block)), AdapterModule { down, up });
            }
        }
        Ok(Self {
            config: config.clone(),
            modules,
            params,
        })
    }

    /// f(x) = up(act(down(x))), the adapter's residual branch.
    pub fn branch(
        &self,
        layer: usize,
        block: Block,
        x: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(m) = self.modules.get(&(layer, block_key(block))) else {
            return Ok(None);
        };
        let d = m.down.forward(x)?;
        let a = match self.config.activation {
            AdapterActivation::Relu => d.relu()?,
            AdapterActivation::Gelu => d.gelu_erf()?,
            AdapterActivation::Tanh => d.tanh()?,
        };
        Ok(Some(m.up.forward(&a)?))
    }
}

impl Intervention for Adapter {
    fn after_block(
        &self,
        layer: usize,
        block: Block,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.branch(layer, block, &output)? {
            Some(f) => output + f,
            None => Ok(output),
        }
    }
}

impl Method for Adapter {
    fn name(&self) -> &'static str {
        "adapter"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
}
