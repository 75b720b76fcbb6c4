//! DoRA (Liu et al. 2024): LoRA with the update's direction and magnitude trained apart,
//! W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output row (PEFT's `dim=1` on the
//! `[out, in]` weight) and detached from the graph, as the paper and PEFT do. m starts at ‖W‖,
//! so training starts from the unchanged model.

use crate::error::{invalid, Result};
use crate::lora::{Lora, LoraConfig};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method};
use candle_core::{Tensor, D};
use peftbench_backbone::hf_names::{fused_qkv, module_path};
use peftbench_backbone::ops::scale_columns;
use peftbench_backbone::{Intervention, Linear, ModelConfig, Site, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;

const NAME: &str = "dora";

/// DoRA's configuration: LoRA's fields (PEFT's `LoraConfig(use_dora=True)`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DoraConfig(pub LoraConfig);

impl DoraConfig {
    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.0.validate(model)
    }

    /// Closed form: LoRA's Σ r·(in + out) plus one magnitude per output row of each target.
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        let sites = self.0.target_modules.sites(model, NAME)?;
        let magnitudes: usize = sites
            .iter()
            .map(|s| crate::site_shape(model, s.proj).1)
            .sum();
        Ok(self.0.num_trainable(model)? + magnitudes)
    }
}

/// What DoRA keeps per projection beside LoRA's factors.
struct Part {
    /// The trained magnitude m `[out]`.
    magnitude: Tensor,
    /// The frozen base weight `[out, in]` and its squared row norms `[out]`.
    weight: Tensor,
    weight_sq: Tensor,
    /// The frozen bias, which DoRA's rescaling leaves out.
    bias: Option<Tensor>,
}

/// DoRA attached to a model.
pub struct Dora {
    lora: Lora,
    parts: BTreeMap<Site, Part>,
    params: TrainableParams,
    /// While merged: the base weights, to restore exactly on unmerge.
    originals: RefCell<Option<BTreeMap<Site, Linear>>>,
}

fn row_sq(w: &Tensor) -> candle_core::Result<Tensor> {
    w.sqr()?.sum(D::Minus1)
}

impl Dora {
    fn build(
        lora: Lora,
        model: &Transformer,
        magnitudes: Option<BTreeMap<Site, Tensor>>,
    ) -> Result<Self> {
        let mut params = lora.params().clone();
        let mut mags = TrainableParams::new();
        let mut parts = BTreeMap::new();
        for site in lora.pairs().keys() {
            let lin = model
                .linear(*site)
                .ok_or_else(|| invalid(NAME, format!("the model has no projection {site}")))?;
            // Copies: the norm's arithmetic must not give the model's own tensors gradients.
            let weight = lin.weight_f32()?.detach().copy()?;
            let weight_sq = row_sq(&weight)?;
            let init = match &magnitudes {
                Some(m) => m[site].clone(),
                None => weight_sq.sqrt()?,
            };
            let magnitude = mags.add(format!("{site}.lora_magnitude"), init)?;
            let bias = lin
                .bias
                .as_ref()
                .map(|b| b.detach().to_dtype(candle_core::DType::F32)?.copy())
                .transpose()?;
            parts.insert(
                *site,
                Part {
                    magnitude,
                    weight,
                    weight_sq,
                    bias,
                },
            );
        }
        params.extend("", mags)?;
        Ok(Self {
            lora,
            parts,
            params,
            originals: RefCell::new(None),
        })
    }

    /// LoRA's factors (A Kaiming-uniform, B zero) and m = ‖W‖ per row.
    pub fn attach(config: &DoraConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let lora = Lora::attach(&config.0, ctx)?;
        Self::build(lora, &*ctx.model, None)
    }

    /// A DoRA adapter read from PEFT's format (`LORA` with `use_dora`).
    pub fn from_peft(r: &mut PeftReader, model: &Transformer) -> Result<Self> {
        let cfg = &model.config;
        if fused_qkv(cfg) {
            return Err(r
                .files
                .config_error("use_dora: DoRA on GPT-2's fused c_attn is not read here"));
        }
        let lora = Lora::from_peft_factors(r, cfg)?;
        let mut magnitudes = BTreeMap::new();
        for site in lora.pairs().keys() {
            let key = PeftKey::Module(format!("{}.lora_magnitude_vector", module_path(cfg, *site)));
            let out = crate::site_shape(cfg, site.proj).1;
            magnitudes.insert(*site, r.take(&key, Some(&[out]))?);
        }
        Self::build(lora, model, Some(magnitudes))
    }

    /// ‖W + s·B·A‖ per row, without forming B·A: ‖W‖² + 2s·rows(B ⊙ W·Aᵀ) + s²·rows(B·G ⊙ B)
    /// with G = A·Aᵀ, all detached.
    fn norms(&self, site: Site) -> candle_core::Result<Tensor> {
        let pair = &self.lora.pairs()[&site];
        let part = &self.parts[&site];
        let (a, b, s) = (pair.a.detach(), pair.b.detach(), pair.scaling);
        let wa = part.weight.matmul(&a.t()?)?;
        let cross = (&b * &wa)?.sum(D::Minus1)?;
        let gram = a.matmul(&a.t()?)?;
        let quad = (b.matmul(&gram)? * &b)?.sum(D::Minus1)?;
        let sq = ((&part.weight_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        sq.relu()?.sqrt()
    }

    /// The factors of each adapted projection.
    pub fn lora(&self) -> &Lora {
        &self.lora
    }
}

impl Intervention for Dora {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        let (Some(pair), Some(part)) = (self.lora.pairs().get(&site), self.parts.get(&site)) else {
            return Ok(output);
        };
        if self.originals.borrow().is_some() {
            return Ok(output);
        }
        // PEFT's form: out + (m/‖·‖ − 1)·(W·x) + (m/‖·‖)·s·B·A·x, with W·x the output less its
        // bias; at m = ‖W‖ and B = 0 this adds exact zeros. With dropout in training, x is the
        // dropped input in both terms, so W·x is computed again on it, as PEFT does.
        let scale = (&part.magnitude / self.norms(site)?)?;
        let (x, base) = match self.lora.dropped(input)? {
            Some(x) => {
                let base =
                    peftbench_backbone::Linear::new(part.weight.clone(), None).forward(&x)?;
                (x, base)
            }
            None => match &part.bias {
                Some(b) => (input.clone(), output.broadcast_sub(b)?),
                None => (input.clone(), output.clone()),
            },
        };
        let up = peftbench_backbone::ops::low_rank_delta(&x, &pair.a, &pair.b, pair.scaling)?;
        let dora = (scale_columns(&base, &(&scale - 1.0)?)? + scale_columns(&up, &scale)?)?;
        output + dora
    }
}

impl Method for Dora {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn set_training(&self, training: bool) {
        self.lora.set_training(training);
    }
    /// W ← (m/‖W + s·B·A‖) ⊙ (W + s·B·A), row by row; the bias stays.
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        if self.originals.borrow().is_some() {
            return Ok(true);
        }
        let mut originals = BTreeMap::new();
        for (site, pair) in self.lora.pairs() {
            let scale = (self.parts[site].magnitude.detach() / self.norms(*site)?)?;
            let lin = model
                .linear_mut(*site)
                .ok_or_else(|| invalid(NAME, format!("the model has no projection {site}")))?;
            let delta = (pair.b.matmul(&pair.a)?.detach() * pair.scaling)?;
            originals.insert(*site, lin.clone());
            let merged = (lin.weight_f32()? + delta)?
                .broadcast_mul(&scale.unsqueeze(1)?)?
                .to_dtype(lin.weight.dtype())?;
            lin.set_weight(merged);
        }
        *self.originals.borrow_mut() = Some(originals);
        Ok(true)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        if let Some(originals) = self.originals.borrow_mut().take() {
            for (site, original) in originals {
                if let Some(lin) = model.linear_mut(site) {
                    *lin = original;
                }
            }
        }
        Ok(true)
    }
    /// PEFT's `LORA` with `use_dora` and each target's `lora_magnitude_vector`.
    fn peft_state(
        &self,
        model: &ModelConfig,
        task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if fused_qkv(model) {
            return Err(invalid(
                NAME,
                "PEFT's format for DoRA on GPT-2's fused c_attn is not written here",
            ));
        }
        let Some(mut state) = self.lora.peft_state(model, task)? else {
            return Ok(None);
        };
        state.config.insert("use_dora".into(), true.into());
        for (site, part) in &self.parts {
            state.tensors.push((
                PeftKey::Module(format!(
                    "{}.lora_magnitude_vector",
                    module_path(model, *site)
                )),
                part.magnitude.detach(),
            ));
        }
        Ok(Some(state))
    }
}

impl crate::MethodSpec for DoraConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_targets r·(in + out) + out"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        DoraConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        DoraConfig::num_trainable(self, &model.config)
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "rank",
            value: self.0.rank,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.0.rank = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(Dora::attach(self, ctx)?))
    }
}
