//! (IA)³ (Liu et al. 2022): learned vectors that rescale keys, values and the feed-forward
//! activations. A projection listed in `feedforward_modules` has its input scaled
//! (W·(l ⊙ x)); any other targeted projection its output (l ⊙ W·x). The vectors start at ones,
//! so training starts from the unchanged model, and fold into W exactly.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method, Targets};
use candle_core::{DType, Tensor};
use peftbench_backbone::hf_names::{fused_qkv, module_path};
use peftbench_backbone::ops::scale_columns;
use peftbench_backbone::{
    Family, Intervention, ModelConfig, Proj, Site, TrainableParams, Transformer,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;

const NAME: &str = "ia3";
/// PEFT's `peft_type`.
pub const PEFT_TYPE: &str = "IA3";

/// (IA)³'s configuration (PEFT's field names; unset lists take PEFT's defaults for the family).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    /// The projections that get a vector. Default: key, value and the feed-forward output
    /// (BERT: also the attention output, which PEFT's `output.dense` matches too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Targets>,
    /// The targeted projections whose input, not output, is scaled. Default: the feed-forward
    /// output projection (BERT: and the attention output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feedforward_modules: Option<Targets>,
}

fn names(v: &[&str]) -> Targets {
    Targets(v.iter().map(|s| s.to_string()).collect())
}

impl Ia3Config {
    fn targets(&self, model: &ModelConfig) -> Targets {
        self.target_modules
            .clone()
            .unwrap_or_else(|| match model.family {
                Family::Bert => names(&["key", "value", "attn_out", "down"]),
                // GPT-2's `c_attn` holds query, key and value: PEFT scales all three.
                Family::Gpt2 => names(&["query", "key", "value", "down"]),
                Family::Llama => names(&["key", "value", "down"]),
            })
    }

    fn feedforward(&self, model: &ModelConfig) -> Targets {
        self.feedforward_modules
            .clone()
            .unwrap_or_else(|| match model.family {
                Family::Bert => names(&["attn_out", "down"]),
                Family::Gpt2 | Family::Llama => names(&["down"]),
            })
    }

    /// Every targeted site, with whether it scales its input (feed-forward) or its output.
    pub fn sites(&self, model: &ModelConfig) -> Result<Vec<(Site, bool)>> {
        let targets = self.targets(model).sites(model, NAME)?;
        let ff = self.feedforward(model);
        let ff = if ff.0.is_empty() {
            Vec::new()
        } else {
            ff.sites(model, NAME)?
        };
        if let Some(s) = ff.iter().find(|s| !targets.contains(s)) {
            return Err(invalid(
                NAME,
                format!(
                    "feedforward_modules names `{}`, which target_modules does not",
                    s.proj.name()
                ),
            ));
        }
        Ok(targets.into_iter().map(|s| (s, ff.contains(&s))).collect())
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.sites(model).map(|_| ())
    }

    /// Closed form: Σ over targets of `in` (feed-forward) or `out` (others).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self
            .sites(model)?
            .iter()
            .map(|(s, ff)| {
                let (i, o) = crate::site_shape(model, s.proj);
                if *ff {
                    i
                } else {
                    o
                }
            })
            .sum())
    }
}

/// One scaled projection: its vector and which side it scales.
#[derive(Debug, Clone)]
pub struct Ia3Vector {
    /// `[in]` for a feed-forward projection, else `[out]`.
    pub l: Tensor,
    /// Scales the projection's input.
    pub feedforward: bool,
}

/// (IA)³ attached to a model.
pub struct Ia3 {
    vectors: BTreeMap<Site, Ia3Vector>,
    params: TrainableParams,
    merged: Cell<bool>,
}

impl Ia3 {
    /// A vector of ones for every targeted projection.
    pub fn attach(config: &Ia3Config, ctx: &mut AttachContext) -> Result<Self> {
        let mut params = TrainableParams::new();
        let mut vectors = BTreeMap::new();
        let dev = ctx.model.device().clone();
        for (site, feedforward) in config.sites(&ctx.model.config)? {
            let (i, o) = crate::site_shape(&ctx.model.config, site.proj);
            let n = if feedforward { i } else { o };
            let l = params.add(format!("{site}.ia3_l"), Tensor::ones(n, DType::F32, &dev)?)?;
            vectors.insert(site, Ia3Vector { l, feedforward });
        }
        Ok(Self {
            vectors,
            params,
            merged: Cell::new(false),
        })
    }

    /// An (IA)³ adapter read from PEFT's format (`ia3_l` of shape `[out, 1]`, or `[1, in]` for a
    /// feed-forward module).
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        if fused_qkv(model) {
            return Err(r.files.config_error(
                "IA3 on GPT-2's fused c_attn is not read here (only BERT- and Llama-style models)",
            ));
        }
        let ff_list: Vec<String> = match r.files.config.get("feedforward_modules") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(_) => {
                return Err(r.files.config_error(
                    "feedforward_modules: only a list of names is read here, not a regex",
                ))
            }
        };
        // PEFT's rule for a list: the module's name is an entry or ends with `.entry`.
        let is_ff = |path: &str| {
            ff_list
                .iter()
                .any(|e| path == e || path.ends_with(&format!(".{e}")))
        };
        let mut params = TrainableParams::new();
        let mut vectors = BTreeMap::new();
        for layer in 0..model.num_layers {
            for proj in Proj::ALL {
                if proj == Proj::Gate && model.family != Family::Llama {
                    continue;
                }
                let site = Site { layer, proj };
                let path = module_path(model, site);
                let key = PeftKey::Module(format!("{path}.ia3_l"));
                if !r.contains(&key) {
                    continue;
                }
                let (i, o) = crate::site_shape(model, proj);
                let feedforward = is_ff(&path);
                let shape: [usize; 2] = if feedforward { [1, i] } else { [o, 1] };
                let l = r.take(&key, Some(&shape))?.flatten_all()?;
                let l = params.add(format!("{site}.ia3_l"), l)?;
                vectors.insert(site, Ia3Vector { l, feedforward });
            }
        }
        if vectors.is_empty() {
            return Err(r
                .files
                .config_error("IA3: no `*.ia3_l` tensor of a projection this model has"));
        }
        Ok(Self {
            vectors,
            params,
            merged: Cell::new(false),
        })
    }

    /// The vector of each scaled projection.
    pub fn vectors(&self) -> &BTreeMap<Site, Ia3Vector> {
        &self.vectors
    }

    /// Whether the vectors currently live in the base weights.
    pub fn is_merged(&self) -> bool {
        self.merged.get()
    }

    fn fold(&self, model: &mut Transformer, invert: bool) -> Result<()> {
        for (site, v) in &self.vectors {
            let lin = model
                .linear_mut(*site)
                .ok_or_else(|| invalid(NAME, format!("the model has no projection {site}")))?;
            let l = v.l.detach();
            let l = if invert { l.recip()? } else { l };
            let dt = lin.weight.dtype();
            if v.feedforward {
                // W·(l ⊙ x) = (W·diag l)·x: scale W's columns; the bias is untouched.
                let w = lin.weight_f32()?.broadcast_mul(&l.unsqueeze(0)?)?;
                lin.set_weight(w.to_dtype(dt)?);
            } else {
                let w = lin.weight_f32()?.broadcast_mul(&l.unsqueeze(1)?)?;
                lin.set_weight(w.to_dtype(dt)?);
                if let Some(b) = &lin.bias {
                    lin.bias = Some((b.to_dtype(DType::F32)? * &l)?.to_dtype(b.dtype())?);
                }
            }
        }
        Ok(())
    }
}

impl Intervention for Ia3 {
    fn project_input(&self, site: Site, input: &Tensor) -> candle_core::Result<Tensor> {
        match self.vectors.get(&site) {
            Some(v) if v.feedforward && !self.merged.get() => scale_columns(input, &v.l),
            _ => Ok(input.clone()),
        }
    }

    fn project(&self, site: Site, _input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        match self.vectors.get(&site) {
            Some(v) if !v.feedforward && !self.merged.get() => scale_columns(&output, &v.l),
            _ => Ok(output),
        }
    }
}

impl Method for Ia3 {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        if !self.merged.get() {
            self.fold(model, false)?;
            self.merged.set(true);
        }
        Ok(true)
    }
    /// Divides the vectors out again, as PEFT does (exact up to rounding).
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        if self.merged.get() {
            self.fold(model, true)?;
            self.merged.set(false);
        }
        Ok(true)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if fused_qkv(model) {
            return Err(invalid(
                NAME,
                "PEFT's format for IA3 on GPT-2's fused c_attn is not written here",
            ));
        }
        let mut tensors = Vec::new();
        let (mut targets, mut ff) = (Vec::new(), Vec::new());
        for (site, v) in &self.vectors {
            let path = module_path(model, *site);
            let l = v.l.detach();
            let n = l.elem_count();
            let l = if v.feedforward {
                l.reshape((1, n))?
            } else {
                l.reshape((n, 1))?
            };
            tensors.push((PeftKey::Module(format!("{path}.ia3_l")), l));
            // Whole paths: as a suffix, `output.dense` would also name `attention.output.dense`.
            targets.push(serde_json::Value::String(path.clone()));
            if v.feedforward {
                ff.push(serde_json::Value::String(path));
            }
        }
        let mut config = serde_json::Map::new();
        config.insert("target_modules".into(), targets.into());
        config.insert("feedforward_modules".into(), ff.into());
        config.insert("fan_in_fan_out".into(), false.into());
        config.insert("init_ia3_weights".into(), true.into());
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl crate::MethodSpec for Ia3Config {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_targets (in if feed-forward else out)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        Ia3Config::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        Ia3Config::num_trainable(self, &model.config)
    }
    fn fixed_budget(&self) -> Option<&'static str> {
        Some("fixed")
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(Ia3::attach(self, ctx)?))
    }
}
