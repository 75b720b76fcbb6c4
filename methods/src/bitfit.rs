//! BitFit (Ben Zaken et al. 2022): only the bias terms train, those of every projection and of
//! every LayerNorm. The trained variables are offsets from the base's biases, zero at the
//! start, so the base stays untouched until a merge adds them in. A model without biases
//! (Llama-style) has nothing for BitFit to train and is refused.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method};
use candle_core::{DType, Tensor};
use peftbench_backbone::{
    Family, Intervention, ModelConfig, Norm, NormParams, NormSite, Site, TrainableParams,
    Transformer,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;

const NAME: &str = "bitfit";
/// The `peft_type` of a saved BitFit run: this project's own (PEFT has no BitFit).
pub const PEFT_TYPE: &str = "PEFTBENCH_BITFIT";

/// BitFit's configuration: nothing to choose but whether the norms' biases train too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitFitConfig {
    /// Train LayerNorm biases as well as the projections' (the paper trains both).
    #[serde(default = "yes")]
    pub norm_biases: bool,
}

fn yes() -> bool {
    true
}

impl Default for BitFitConfig {
    fn default() -> Self {
        Self { norm_biases: true }
    }
}

/// The projections with a bias in a model of this family.
fn biased_sites(model: &ModelConfig) -> Vec<Site> {
    let projs: &[peftbench_backbone::Proj] = match model.family {
        Family::Llama => &[],
        Family::Bert | Family::Gpt2 => &peftbench_backbone::Proj::ALL,
    };
    (0..model.num_layers)
        .flat_map(|layer| {
            projs
                .iter()
                .filter(|p| **p != peftbench_backbone::Proj::Gate)
                .map(move |&proj| Site { layer, proj })
        })
        .collect()
}

/// The norms with a bias (LayerNorm; RMSNorm has none).
fn biased_norms(model: &ModelConfig) -> Vec<NormSite> {
    if model.family == Family::Llama {
        return Vec::new();
    }
    let mut out = Vec::new();
    if model.family == Family::Bert {
        out.push(NormSite::Embeddings);
    }
    for l in 0..model.num_layers {
        out.push(NormSite::Attention(l));
        out.push(NormSite::Ffn(l));
    }
    if model.family == Family::Gpt2 {
        out.push(NormSite::Final);
    }
    out
}

impl BitFitConfig {
    /// Checks that the model has biases to train.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if model.family == Family::Llama {
            return Err(invalid(
                NAME,
                "this Llama-style model has no bias terms (its projections have none and RMSNorm has no bias): BitFit has nothing to train",
            ));
        }
        Ok(())
    }

    /// Closed form: Σ over projections of `out`, plus hidden per LayerNorm when its bias trains.
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        self.validate(model)?;
        let proj: usize = biased_sites(model)
            .iter()
            .map(|s| crate::site_shape(model, s.proj).1)
            .sum();
        let norms = if self.norm_biases {
            biased_norms(model).len() * model.hidden_size
        } else {
            0
        };
        Ok(proj + norms)
    }
}

/// BitFit attached to a model.
pub struct BitFit {
    /// Offsets of each projection's bias.
    projections: BTreeMap<Site, Tensor>,
    /// Each LayerNorm's gain (frozen) and bias offset.
    norms: BTreeMap<NormSite, (Tensor, Tensor, Tensor)>,
    params: TrainableParams,
    merged: Cell<bool>,
}

impl BitFit {
    /// Zero offsets for every bias the model has.
    pub fn attach(config: &BitFitConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let mut params = TrainableParams::new();
        let mut projections = BTreeMap::new();
        for site in biased_sites(&ctx.model.config) {
            let Some(b) = ctx.model.linear(site).and_then(|l| l.bias.as_ref()) else {
                return Err(invalid(NAME, format!("projection {site} has no bias")));
            };
            let d = params.add(format!("{site}.bias_delta"), b.zeros_like()?)?;
            projections.insert(site, d);
        }
        let mut norms = BTreeMap::new();
        if config.norm_biases {
            for site in biased_norms(&ctx.model.config) {
                let Some(Norm::Layer { weight, bias, .. }) = ctx.model.norm(site) else {
                    return Err(invalid(NAME, format!("norm {site} has no bias")));
                };
                let d = params.add(format!("{site}.bias_delta"), bias.zeros_like()?)?;
                // A copy: candle's add would give the model's own tensor a gradient entry.
                norms.insert(
                    site,
                    (weight.clone(), bias.to_dtype(DType::F32)?.copy()?, d),
                );
            }
        }
        Ok(Self {
            projections,
            norms,
            params,
            merged: Cell::new(false),
        })
    }

    /// A BitFit run read back from this project's format.
    pub fn from_peft(r: &mut PeftReader, model: &Transformer) -> Result<Self> {
        let cfg = &model.config;
        let norm_biases = r.files.flag("norm_biases");
        let mut params = TrainableParams::new();
        let mut projections = BTreeMap::new();
        for site in biased_sites(cfg) {
            let key = PeftKey::Top(format!("bitfit.{site}.bias_delta"));
            let out = crate::site_shape(cfg, site.proj).1;
            let d = r.take(&key, Some(&[out]))?;
            projections.insert(site, params.add(format!("{site}.bias_delta"), d)?);
        }
        let mut norms = BTreeMap::new();
        if norm_biases {
            for site in biased_norms(cfg) {
                let Some(Norm::Layer { weight, bias, .. }) = model.norm(site) else {
                    return Err(r
                        .files
                        .config_error(format!("the base has no LayerNorm {site}")));
                };
                let key = PeftKey::Top(format!("bitfit.{site}.bias_delta"));
                let d = r.take(&key, Some(&[cfg.hidden_size]))?;
                let d = params.add(format!("{site}.bias_delta"), d)?;
                norms.insert(
                    site,
                    (weight.clone(), bias.to_dtype(DType::F32)?.copy()?, d),
                );
            }
        }
        Ok(Self {
            projections,
            norms,
            params,
            merged: Cell::new(false),
        })
    }

    fn fold(&self, model: &mut Transformer, sign: f64) -> Result<()> {
        for (site, d) in &self.projections {
            let lin = model
                .linear_mut(*site)
                .ok_or_else(|| invalid(NAME, format!("no projection {site}")))?;
            if let Some(b) = &lin.bias {
                lin.bias = Some(shifted(b, d, sign)?);
            }
        }
        for (site, (_, _, d)) in &self.norms {
            if let Some(Norm::Layer { bias, .. }) = model.norm_mut(*site) {
                *bias = shifted(bias, d, sign)?;
            }
        }
        Ok(())
    }
}

impl Intervention for BitFit {
    fn project(&self, site: Site, _input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        match self.projections.get(&site) {
            Some(d) if !self.merged.get() => peftbench_backbone::ops::add_bias(&output, d),
            _ => Ok(output),
        }
    }

    fn norm_params(&self, site: NormSite) -> Option<NormParams> {
        if self.merged.get() {
            return None;
        }
        let (weight, bias, d) = self.norms.get(&site)?;
        // An addition of two [hidden] vectors per call: cheap beside the norm itself.
        let bias = (bias + d).ok()?;
        Some(NormParams {
            weight: weight.clone(),
            bias: Some(bias),
        })
    }
}

impl Method for BitFit {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        if !self.merged.get() {
            self.fold(model, 1.0)?;
            self.merged.set(true);
        }
        Ok(true)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        if self.merged.get() {
            self.fold(model, -1.0)?;
            self.merged.set(false);
        }
        Ok(true)
    }
    /// The offsets under this project's own type, at the top level of the file.
    fn peft_state(
        &self,
        _model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let mut tensors = Vec::new();
        for (site, d) in &self.projections {
            tensors.push((
                PeftKey::Top(format!("bitfit.{site}.bias_delta")),
                d.detach(),
            ));
        }
        for (site, (_, _, d)) in &self.norms {
            tensors.push((
                PeftKey::Top(format!("bitfit.{site}.bias_delta")),
                d.detach(),
            ));
        }
        let mut config = serde_json::Map::new();
        config.insert("norm_biases".into(), (!self.norms.is_empty()).into());
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl crate::MethodSpec for BitFitConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_projections out + LayerNorms · hidden (bias terms only)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        BitFitConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        BitFitConfig::num_trainable(self, &model.config)
    }
    fn fixed_budget(&self) -> Option<&'static str> {
        Some("fixed")
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(BitFit::attach(self, ctx)?))
    }
}

/// `b + sign·d` in f32, kept in `b`'s dtype (a bf16 base's bias stays bf16).
fn shifted(b: &Tensor, d: &Tensor, sign: f64) -> candle_core::Result<Tensor> {
    (b.to_dtype(DType::F32)? + (d.detach() * sign)?)?.to_dtype(b.dtype())
}
