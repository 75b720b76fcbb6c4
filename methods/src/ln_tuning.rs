//! LN tuning (Qi et al. 2022): only the normalisation layers' gains (and LayerNorm's biases)
//! train. As in PEFT, the trained values are copies the model's norms defer to, so the base
//! stays untouched until a merge swaps them in.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method};
use peftbench_backbone::hf_names::norm_path;
use peftbench_backbone::{
    Family, Intervention, ModelConfig, Norm, NormParams, NormSite, TrainableParams, Transformer,
};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::BTreeMap;

const NAME: &str = "ln_tuning";
/// PEFT's `peft_type`.
pub const PEFT_TYPE: &str = "LN_TUNING";
/// The norm kinds a config can name; `all` is every norm the model has.
const KINDS: [&str; 4] = ["embeddings_norm", "attn_norm", "ffn_norm", "final_norm"];

/// LN tuning's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LnTuningConfig {
    /// Which norms train: `all`, or any of `embeddings_norm`, `attn_norm`, `ffn_norm`,
    /// `final_norm`.
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_targets() -> Vec<String> {
    vec!["all".into()]
}

impl Default for LnTuningConfig {
    fn default() -> Self {
        Self {
            target_modules: default_targets(),
        }
    }
}

/// The norms a model of this shape has: BERT-style encoders one after the embeddings, pre-norm
/// decoders one after the last layer, and every layer two.
fn model_norms(model: &ModelConfig) -> Vec<NormSite> {
    let mut out = Vec::new();
    if model.family == Family::Bert {
        out.push(NormSite::Embeddings);
    }
    for l in 0..model.num_layers {
        out.push(NormSite::Attention(l));
        out.push(NormSite::Ffn(l));
    }
    if model.family != Family::Bert {
        out.push(NormSite::Final);
    }
    out
}

fn kind(site: NormSite) -> &'static str {
    match site {
        NormSite::Embeddings => "embeddings_norm",
        NormSite::Attention(_) => "attn_norm",
        NormSite::Ffn(_) => "ffn_norm",
        NormSite::Final => "final_norm",
    }
}

/// Parameters of one norm: RMSNorm (Llama) has a gain, LayerNorm a gain and a bias.
fn norm_width(model: &ModelConfig) -> usize {
    match model.family {
        Family::Llama => model.hidden_size,
        Family::Bert | Family::Gpt2 => 2 * model.hidden_size,
    }
}

impl LnTuningConfig {
    /// The targeted norms, checked against the model.
    pub fn sites(&self, model: &ModelConfig) -> Result<Vec<NormSite>> {
        if self.target_modules.is_empty() {
            return Err(invalid(NAME, "target_modules is empty"));
        }
        let all = model_norms(model);
        let mut kinds: Vec<&str> = Vec::new();
        for t in &self.target_modules {
            if t == "all" {
                kinds.extend(KINDS);
                continue;
            }
            if !KINDS.contains(&t.as_str()) {
                return Err(invalid(
                    NAME,
                    format!("unknown target module `{t}` (all, {})", KINDS.join(", ")),
                ));
            }
            if !all.iter().any(|s| kind(*s) == t) {
                return Err(invalid(
                    NAME,
                    format!(
                        "target module `{t}`: this {:?} model has none",
                        model.family
                    ),
                ));
            }
            kinds.push(t);
        }
        Ok(all
            .into_iter()
            .filter(|s| kinds.contains(&kind(*s)))
            .collect())
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.sites(model).map(|_| ())
    }

    /// Closed form: targeted norms × hidden × (2 for LayerNorm, 1 for RMSNorm).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self.sites(model)?.len() * norm_width(model))
    }
}

/// LN tuning attached to a model.
pub struct LnTuning {
    norms: BTreeMap<NormSite, NormParams>,
    params: TrainableParams,
    /// While merged: the base's own parameters, to swap back on unmerge.
    originals: RefCell<Option<BTreeMap<NormSite, NormParams>>>,
}

fn params_of(norm: &Norm) -> NormParams {
    match norm {
        Norm::Layer { weight, bias, .. } => NormParams {
            weight: weight.clone(),
            bias: Some(bias.clone()),
        },
        Norm::Rms { weight, .. } => NormParams {
            weight: weight.clone(),
            bias: None,
        },
    }
}

fn set_params(norm: &mut Norm, p: &NormParams) -> candle_core::Result<()> {
    match norm {
        // In the norm's own dtype: a bf16 base keeps bf16 norms.
        Norm::Layer { weight, bias, .. } => {
            *weight = p.weight.detach().to_dtype(weight.dtype())?;
            if let Some(b) = &p.bias {
                *bias = b.detach().to_dtype(bias.dtype())?;
            }
        }
        Norm::Rms { weight, .. } => *weight = p.weight.detach().to_dtype(weight.dtype())?,
    }
    Ok(())
}

impl LnTuning {
    /// Trainable copies of every targeted norm's parameters.
    pub fn attach(config: &LnTuningConfig, ctx: &mut AttachContext) -> Result<Self> {
        let mut params = TrainableParams::new();
        let mut norms = BTreeMap::new();
        for site in config.sites(&ctx.model.config)? {
            let norm = ctx
                .model
                .norm(site)
                .ok_or_else(|| invalid(NAME, format!("the model has no norm {site}")))?;
            let own = params_of(norm);
            let weight = params.add(format!("{site}.weight"), own.weight.copy()?)?;
            let bias = match own.bias {
                Some(b) => Some(params.add(format!("{site}.bias"), b.copy()?)?),
                None => None,
            };
            norms.insert(site, NormParams { weight, bias });
        }
        Ok(Self {
            norms,
            params,
            originals: RefCell::new(None),
        })
    }

    /// An LN-tuning adapter read from PEFT's format.
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        let h = model.hidden_size;
        let mut params = TrainableParams::new();
        let mut norms = BTreeMap::new();
        for site in model_norms(model) {
            let Some(path) = norm_path(model, site) else {
                continue;
            };
            let w = PeftKey::Module(format!("{path}.ln_tuning_layers.weight"));
            if !r.contains(&w) {
                continue;
            }
            let weight = params.add(format!("{site}.weight"), r.take(&w, Some(&[h]))?)?;
            let b = PeftKey::Module(format!("{path}.ln_tuning_layers.bias"));
            let bias = match (model.family, r.contains(&b)) {
                (Family::Llama, _) | (_, false) => None,
                (_, true) => Some(params.add(format!("{site}.bias"), r.take(&b, Some(&[h]))?)?),
            };
            norms.insert(site, NormParams { weight, bias });
        }
        if norms.is_empty() {
            return Err(r.files.config_error(
                "LN_TUNING: no `*.ln_tuning_layers.weight` tensor of a norm this model has",
            ));
        }
        Ok(Self {
            norms,
            params,
            originals: RefCell::new(None),
        })
    }

    /// The trained parameters of each norm.
    pub fn norms(&self) -> &BTreeMap<NormSite, NormParams> {
        &self.norms
    }
}

impl Intervention for LnTuning {
    fn norm_params(&self, site: NormSite) -> Option<NormParams> {
        if self.originals.borrow().is_some() {
            return None;
        }
        self.norms.get(&site).cloned()
    }
}

impl Method for LnTuning {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    /// Swaps the trained parameters into the model, as PEFT's merge does.
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        if self.originals.borrow().is_some() {
            return Ok(true);
        }
        let mut originals = BTreeMap::new();
        for (site, p) in &self.norms {
            let norm = model
                .norm_mut(*site)
                .ok_or_else(|| invalid(NAME, format!("the model has no norm {site}")))?;
            originals.insert(*site, params_of(norm));
            set_params(norm, p)?;
        }
        *self.originals.borrow_mut() = Some(originals);
        Ok(true)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        let Some(originals) = self.originals.borrow_mut().take() else {
            return Ok(true);
        };
        for (site, p) in &originals {
            if let Some(norm) = model.norm_mut(*site) {
                set_params(norm, p)?;
            }
        }
        Ok(true)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        let mut tensors = Vec::new();
        let mut targets = Vec::new();
        for (site, p) in &self.norms {
            let path = norm_path(model, *site)
                .ok_or_else(|| invalid(NAME, format!("no Hugging Face name for {site}")))?;
            tensors.push((
                PeftKey::Module(format!("{path}.ln_tuning_layers.weight")),
                p.weight.detach(),
            ));
            if let Some(b) = &p.bias {
                tensors.push((
                    PeftKey::Module(format!("{path}.ln_tuning_layers.bias")),
                    b.detach(),
                ));
            }
            // Whole paths: PEFT matches a listed name as the module's suffix, and
            // `output.LayerNorm` alone would also catch `attention.output.LayerNorm`.
            targets.push(serde_json::Value::String(path));
        }
        let mut config = serde_json::Map::new();
        config.insert("target_modules".into(), targets.into());
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl crate::MethodSpec for LnTuningConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "targeted norms · hidden · (2 for LayerNorm, 1 for RMSNorm)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        LnTuningConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        LnTuningConfig::num_trainable(self, &model.config)
    }
    fn fixed_budget(&self) -> Option<&'static str> {
        Some("fixed")
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(LnTuning::attach(self, ctx)?))
    }
}
