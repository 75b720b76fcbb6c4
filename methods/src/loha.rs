//! LoHa (LyCORIS; Hyeon-Woo et al. 2022): the update is the Hadamard product of two low-rank
//! products, ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b), which reaches rank up to r² with 2·r·(in + out)
//! parameters. As in PEFT, W2b starts at zero (so ΔW = 0) and the others Kaiming-uniform; the
//! dense ΔW is formed each forward, as PEFT does.

use crate::dense_delta::{Delta, DeltaSites};
use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method, Targets};
use candle_core::{DType, Tensor};
use peftbench_backbone::hf_names::{fused_qkv, module_path, target_name};
use peftbench_backbone::{Intervention, ModelConfig, Site, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const NAME: &str = "loha";
/// PEFT's `peft_type`.
pub const PEFT_TYPE: &str = "LOHA";
const FACTORS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

/// LoHa's configuration (PEFT's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LohaConfig {
    /// Rank of each of the two products.
    #[serde(default = "crate::defaults::rank")]
    pub r: usize,
    /// Scaling numerator α (the update is scaled by α/r).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Which projections get an update.
    #[serde(default)]
    pub target_modules: Targets,
}

fn default_alpha() -> f64 {
    8.0
}

impl Default for LohaConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: default_alpha(),
            target_modules: Targets::default(),
        }
    }
}

impl LohaConfig {
    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            return Err(invalid(NAME, "r must be at least 1"));
        }
        self.target_modules.sites(model, NAME).map(|_| ())
    }

    /// Closed form: Σ over targets of 2·r·(in + out).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self
            .target_modules
            .sites(model, NAME)?
            .iter()
            .map(|s| {
                let (i, o) = crate::site_shape(model, s.proj);
                2 * self.r * (i + o)
            })
            .sum())
    }
}

/// One adapted projection's four factors: `[out, r]`, `[r, in]`, `[out, r]`, `[r, in]`.
struct Factors {
    w: [Tensor; 4],
    scaling: f64,
}

impl Delta for Factors {
    fn delta(&self) -> candle_core::Result<Tensor> {
        let [w1a, w1b, w2a, w2b] = &self.w;
        (w1a.matmul(w1b)? * w2a.matmul(w2b)?)? * self.scaling
    }
}

/// LoHa attached to a model.
pub struct Loha {
    config: LohaConfig,
    factors: DeltaSites<Factors>,
    params: TrainableParams,
}

impl Loha {
    /// W1a, W1b, W2a Kaiming-uniform, W2b zero, for every targeted projection.
    pub fn attach(config: &LohaConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let dev = ctx.model.device().clone();
        let r = config.r;
        let mut params = TrainableParams::new();
        let mut factors = BTreeMap::new();
        for site in config.target_modules.sites(&ctx.model.config, NAME)? {
            let (i, o) = crate::site_shape(&ctx.model.config, site.proj);
            let inits = [
                ctx.init.kaiming_uniform(o, r, &dev)?,
                ctx.init.kaiming_uniform(r, i, &dev)?,
                ctx.init.kaiming_uniform(o, r, &dev)?,
                Tensor::zeros((r, i), DType::F32, &dev)?,
            ];
            let mut w = Vec::with_capacity(4);
            for (name, t) in FACTORS.iter().zip(inits) {
                w.push(params.add(format!("{site}.{name}"), t)?);
            }
            let w: [Tensor; 4] = w.try_into().expect("four factors");
            factors.insert(
                site,
                Factors {
                    w,
                    scaling: config.alpha / r as f64,
                },
            );
        }
        Ok(Self {
            config: config.clone(),
            factors: DeltaSites::new(NAME, factors),
            params,
        })
    }

    /// A LoHa adapter read from PEFT's format (linear layers; no `alpha_pattern`).
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        if fused_qkv(model) {
            return Err(r
                .files
                .config_error("LOHA on GPT-2's fused c_attn is not read here"));
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if r.files
                .config
                .get(key)
                .and_then(|v| v.as_object())
                .is_some_and(|m| !m.is_empty())
            {
                return Err(r
                    .files
                    .config_error(format!("{key}: per-module LoHa ranks are not read here")));
            }
        }
        let rank = r.files.usize("r")?;
        let alpha = r.files.f64("alpha")?;
        let mut params = TrainableParams::new();
        let mut factors = BTreeMap::new();
        let mut projs: Vec<String> = Vec::new();
        for layer in 0..model.num_layers {
            for proj in peftbench_backbone::Proj::ALL {
                let site = Site { layer, proj };
                if model.family != peftbench_backbone::Family::Llama
                    && proj == peftbench_backbone::Proj::Gate
                {
                    continue;
                }
                let path = module_path(model, site);
                if !r.contains(&PeftKey::Module(format!("{path}.{}", FACTORS[0]))) {
                    continue;
                }
                let (i, o) = crate::site_shape(model, proj);
                let shapes = [[o, rank], [rank, i], [o, rank], [rank, i]];
                let mut w = Vec::with_capacity(4);
                for (name, shape) in FACTORS.iter().zip(shapes) {
                    let t = r.take(&PeftKey::Module(format!("{path}.{name}")), Some(&shape))?;
                    w.push(params.add(format!("{site}.{name}"), t)?);
                }
                let w: [Tensor; 4] = w.try_into().expect("four factors");
                factors.insert(
                    site,
                    Factors {
                        w,
                        scaling: alpha / rank as f64,
                    },
                );
                if !projs.iter().any(|p| p == proj.name()) {
                    projs.push(proj.name().to_string());
                }
            }
        }
        if factors.is_empty() {
            return Err(r
                .files
                .config_error("LOHA: no `*.hada_w1_a` of a projection this model has"));
        }
        Ok(Self {
            config: LohaConfig {
                r: rank,
                alpha,
                target_modules: Targets(projs),
            },
            factors: DeltaSites::new(NAME, factors),
            params,
        })
    }
}

impl Intervention for Loha {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        self.factors.project(site, input, output)
    }
    fn weight_delta(&self, site: Site, _input: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.factors.weight_delta(site)
    }
}

impl Method for Loha {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        self.factors.merge_into(model)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        self.factors.unmerge_from(model)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if fused_qkv(model) {
            return Err(invalid(
                NAME,
                "PEFT's format for LoHa on GPT-2's fused c_attn is not written here",
            ));
        }
        let mut tensors = Vec::new();
        let mut targets: Vec<serde_json::Value> = Vec::new();
        for (site, f) in &self.factors.sites {
            let path = module_path(model, *site);
            for (name, t) in FACTORS.iter().zip(&f.w) {
                tensors.push((PeftKey::Module(format!("{path}.{name}")), t.detach()));
            }
            // BERT's `dense` leaf names three kinds of module: name paths for it.
            let leaf = target_name(model, site.proj);
            let name = if leaf == "dense" {
                path
            } else {
                leaf.to_string()
            };
            if !targets
                .iter()
                .any(|t| t == &serde_json::Value::String(name.clone()))
            {
                targets.push(name.into());
            }
        }
        let mut config = serde_json::Map::new();
        config.insert("r".into(), self.config.r.into());
        config.insert("alpha".into(), self.config.alpha.into());
        config.insert("target_modules".into(), targets.into());
        config.insert("rank_dropout".into(), 0.0.into());
        config.insert("module_dropout".into(), 0.0.into());
        config.insert("init_weights".into(), true.into());
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl crate::MethodSpec for LohaConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_targets 2·r·(in + out)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        LohaConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        LohaConfig::num_trainable(self, &model.config)
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "r",
            value: self.r,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.r = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(Loha::attach(self, ctx)?))
    }
}
