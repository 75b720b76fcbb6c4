//! LoRA (Hu et al. 2021): frozen W plus a trainable low-rank bypass (α/r)·B·A.
//! A is Kaiming-uniform and B zero, as in PEFT, so training starts from the unchanged model.

use crate::error::{invalid, Result};
use crate::lora_init::{factors, LoraInit};
use crate::peft::PeftState;
use crate::{AttachContext, Method, Targets};
use candle_core::{Tensor, D};
use peftbench_backbone::{Intervention, ModelConfig, Site, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// LoRA's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of each update.
    #[serde(default = "crate::defaults::rank")]
    pub rank: usize,
    /// Scaling numerator α.
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the low-rank path while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Scale by α/√r (rsLoRA) instead of α/r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which projections get an update.
    #[serde(default)]
    pub target_modules: Targets,
    /// LoRA+: B's learning rate as a multiple of A's (unset: the same rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
    /// How A and B start (PEFT's `init_lora_weights`).
    #[serde(default, skip_serializing_if = "LoraInit::is_default")]
    pub init: LoraInit,
}

fn default_alpha() -> f64 {
    16.0
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            lora_alpha: default_alpha(),
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: Targets::default(),
            loraplus_lr_ratio: None,
            init: LoraInit::Kaiming,
        }
    }
}

impl LoraConfig {
    /// The factor applied to B·A.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.rank as f64).sqrt()
        } else {
            self.lora_alpha / self.rank as f64
        }
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.rank == 0 {
            return Err(invalid("lora", "rank must be at least 1"));
        }
        if let Some(r) = self.loraplus_lr_ratio {
            if !(r.is_finite() && r > 0.0) {
                return Err(invalid(
                    "lora",
                    format!("loraplus_lr_ratio must be finite and > 0, got {r}"),
                ));
            }
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(invalid(
                "lora",
                format!("lora_dropout {} is not in [0, 1)", self.lora_dropout),
            ));
        }
        self.target_modules.sites(model, "lora").map(|_| ())
    }

    /// Closed form: Σ over targeted projections of r·(in + out).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        let sites = self.target_modules.sites(model, "lora")?;
        Ok(sites
            .iter()
            .map(|s| {
                let (i, o) = crate::site_shape(model, s.proj);
                self.rank * (i + o)
            })
            .sum())
    }
}

/// One adapted projection's factors.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// Down factor A `[r, in]`.
    pub a: Tensor,
    /// Up factor B `[out, r]`.
    pub b: Tensor,
    /// The factor applied to B·A here: the config's, or a loaded adapter's per-module one
    /// (PEFT's `rank_pattern` / `alpha_pattern`).
    pub scaling: f64,
}

/// LoRA attached to a model.
pub struct Lora {
    config: LoraConfig,
    pairs: BTreeMap<Site, LoraPair>,
    params: TrainableParams,
    merged: Cell<bool>,
    training: Cell<bool>,
    rng: RefCell<peftbench_backbone::Initializer>,
    /// PiSSA's and OLoRA's initial factors: the base now lacks s·B₀·A₀, so a saved adapter
    /// carries −B₀·A₀ beside B·A to apply to the original base.
    initial: BTreeMap<Site, (Tensor, Tensor)>,
}

impl Lora {
    /// Creates A and B for every targeted projection as `init` says (Kaiming: A uniform, B
    /// zero); PiSSA and OLoRA also replace each targeted weight with its residual.
    pub fn attach(config: &LoraConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let mut params = TrainableParams::new();
        let mut pairs = BTreeMap::new();
        let mut initial = BTreeMap::new();
        let dev = ctx.model.device().clone();
        for site in config.target_modules.sites(&ctx.model.config, "lora")? {
            let lin = ctx
                .model
                .linear_mut(site)
                .ok_or_else(|| invalid("lora", format!("the model has no projection {site}")))?;
            let (a0, b0, residual) = factors(
                config.init,
                &lin.weight_f32()?,
                config.rank,
                config.scaling(),
                &mut ctx.init,
                &dev,
            )?;
            if let Some(w) = residual {
                let dt = lin.weight.dtype();
                lin.set_weight(w.to_dtype(dt)?);
                initial.insert(site, (a0.clone(), b0.clone()));
            }
            let a = params.add(format!("{site}.lora_A"), a0)?;
            let b = params.add(format!("{site}.lora_B"), b0)?;
            pairs.insert(
                site,
                LoraPair {
                    a,
                    b,
                    scaling: config.scaling(),
                },
            );
        }
        Ok(Self {
            config: config.clone(),
            pairs,
            params,
            merged: Cell::new(false),
            training: Cell::new(false),
            rng: RefCell::new(peftbench_backbone::Initializer::new(ctx.seed ^ 0x10a)),
            initial,
        })
    }

    /// The factors of each adapted projection.
    pub fn pairs(&self) -> &BTreeMap<Site, LoraPair> {
        &self.pairs
    }

    /// (α/r)·B·A for one site, detached.
    fn delta(&self, pair: &LoraPair) -> Result<Tensor> {
        Ok((pair.b.matmul(&pair.a)?.detach() * pair.scaling)?)
    }

    /// Adds every update into its base weight; forward then skips the bypass.
    pub fn merge(&self, model: &mut Transformer) -> Result<()> {
        if self.merged.get() {
            return Ok(());
        }
        for (site, pair) in &self.pairs {
            let lin = model.linear_mut(*site).expect("site exists");
            lin.add_to_weight(&self.delta(pair)?)?;
        }
        self.merged.set(true);
        Ok(())
    }

    /// Subtracts every update from its base weight again.
    pub fn unmerge(&self, model: &mut Transformer) -> Result<()> {
        if !self.merged.get() {
            return Ok(());
        }
        for (site, pair) in &self.pairs {
            let lin = model.linear_mut(*site).expect("site exists");
            lin.add_to_weight(&self.delta(pair)?.neg()?)?;
        }
        self.merged.set(false);
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Whether the updates currently live in the base weights.
    pub fn is_merged(&self) -> bool {
        self.merged.get()
    }
}

/// Inverted dropout with a seeded mask.
pub(crate) fn dropout(
    x: &Tensor,
    p: f64,
    rng: &RefCell<peftbench_backbone::Initializer>,
) -> Result<Tensor> {
    let n = x.elem_count();
    let keep: Vec<f32> = {
        let mut r = rng.borrow_mut();
        (0..n)
            .map(|_| {
                if (r.unit() as f64) < p {
                    0.0
                } else {
                    (1.0 / (1.0 - p)) as f32
                }
            })
            .collect()
    };
    Ok((x * Tensor::from_vec(keep, x.shape(), x.device())?)?)
}

impl Lora {
    /// The input with this step's dropout mask applied, when training with dropout.
    pub(crate) fn dropped(&self, input: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !(self.training.get() && self.config.lora_dropout > 0.0) {
            return Ok(None);
        }
        dropout(input, self.config.lora_dropout, &self.rng)
            .map(Some)
            .map_err(candle_core::Error::wrap)
    }
}

impl Intervention for Lora {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        let Some(pair) = self.pairs.get(&site) else {
            return Ok(output);
        };
        if self.merged.get() {
            return Ok(output);
        }
        let x = self.dropped(input)?.unwrap_or_else(|| input.clone());
        let up = peftbench_backbone::ops::low_rank_delta(&x, &pair.a, &pair.b, pair.scaling)?;
        debug_assert_eq!(up.dim(D::Minus1)?, output.dim(D::Minus1)?);
        output + up
    }
}

impl Method for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn set_training(&self, training: bool) {
        self.training.set(training);
    }
    /// With LoRA+, the B factors in a group of their own at `loraplus_lr_ratio` × the rate.
    fn lr_groups(&self) -> Vec<(Vec<candle_core::Var>, f64)> {
        let Some(ratio) = self.config.loraplus_lr_ratio else {
            return vec![(self.params.vars(), 1.0)];
        };
        let (b, a): (Vec<_>, Vec<_>) = self
            .params
            .entries()
            .iter()
            .partition(|(name, _)| name.ends_with(".lora_B"));
        let vars =
            |v: Vec<&(String, candle_core::Var)>| v.into_iter().map(|(_, x)| x.clone()).collect();
        vec![(vars(a), 1.0), (vars(b), ratio)]
    }
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        self.merge(model)?;
        Ok(true)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        self.unmerge(model)?;
        Ok(true)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        // PiSSA / OLoRA: B·A − B₀·A₀ is one LoRA of rank 2r with the same scaling, relative to
        // the original base (PEFT's conversion on save).
        let mut pairs: Vec<crate::peft::LoraFactors> = Vec::new();
        for (s, p) in &self.pairs {
            let (a, b) = match self.initial.get(s) {
                None => (p.a.detach(), p.b.detach()),
                Some((a0, b0)) => (
                    Tensor::cat(&[&p.a.detach(), a0], 0)?,
                    Tensor::cat(&[&p.b.detach(), &b0.neg()?], 1)?,
                ),
            };
            pairs.push((*s, a, b, p.scaling));
        }
        let (rank, alpha) = if self.initial.is_empty() {
            (self.config.rank, self.config.lora_alpha)
        } else {
            let r2 = 2 * self.config.rank;
            let root = if self.config.use_rslora {
                (r2 as f64).sqrt()
            } else {
                r2 as f64
            };
            (r2, self.config.scaling() * root)
        };
        let mut config = serde_json::Map::new();
        config.insert("lora_dropout".into(), self.config.lora_dropout.into());
        config.insert("bias".into(), "none".into());
        config.insert("init_lora_weights".into(), true.into());
        Ok(Some(crate::peft::lora_state(
            "LORA",
            model,
            &pairs,
            rank,
            alpha,
            self.config.use_rslora,
            config,
        )?))
    }
}

impl Lora {
    /// A LoRA read from PEFT's format: per-module ranks and scalings as saved.
    pub fn from_peft(r: &mut crate::peft::PeftReader, model: &ModelConfig) -> Result<Self> {
        if r.files.flag("use_dora") {
            return Err(r
                .files
                .config_error("use_dora: a DoRA adapter is read as DoRA, not plain LoRA"));
        }
        Self::from_peft_factors(r, model)
    }

    /// LoRA's factors as PEFT saved them, whatever else the adapter holds (DoRA's magnitudes).
    pub fn from_peft_factors(r: &mut crate::peft::PeftReader, model: &ModelConfig) -> Result<Self> {
        let files = &r.files;
        if files
            .config
            .get("bias")
            .and_then(|v| v.as_str())
            .is_some_and(|b| b != "none")
            || files.flag("lora_bias")
        {
            return Err(
                files.config_error("bias: adapters that train biases are not implemented here")
            );
        }
        let config = LoraConfig {
            rank: files.usize("r")?,
            lora_alpha: files.f64("lora_alpha")?,
            lora_dropout: files
                .config
                .get("lora_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0),
            use_rslora: files.flag("use_rslora"),
            target_modules: Targets::default(),
            loraplus_lr_ratio: None,
            init: LoraInit::Kaiming,
        };
        let found =
            crate::peft::read_lora_pairs(r, model, &config, "lora_A.weight", "lora_B.weight")?;
        let mut params = TrainableParams::new();
        let mut pairs = BTreeMap::new();
        let mut projs: Vec<String> = Vec::new();
        for (site, a, b, scaling) in found {
            let a = params.add(format!("{site}.lora_A"), a)?;
            let b = params.add(format!("{site}.lora_B"), b)?;
            if !projs.iter().any(|p| p == site.proj.name()) {
                projs.push(site.proj.name().to_string());
            }
            pairs.insert(site, LoraPair { a, b, scaling });
        }
        Ok(Self {
            config: LoraConfig {
                target_modules: Targets(projs),
                ..config
            },
            pairs,
            params,
            merged: Cell::new(false),
            training: Cell::new(false),
            rng: RefCell::new(peftbench_backbone::Initializer::new(0x10a)),
            initial: BTreeMap::new(),
        })
    }
}

impl crate::MethodSpec for LoraConfig {
    fn name(&self) -> &'static str {
        "lora"
    }
    fn formula(&self) -> &'static str {
        "Σ_targets r·(in + out)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        LoraConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        LoraConfig::num_trainable(self, &model.config)
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "rank",
            value: self.rank,
        })
    }
    fn set_knob(&mut self, value: usize) {
        self.rank = value;
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(Lora::attach(self, ctx)?))
    }
}

/// LoRA+ (Hayou et al. 2024): LoRA whose B factors learn `loraplus_lr_ratio` times faster than
/// A (16 unless set). The adapter is a plain LoRA; only the optimizer differs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LoraPlusConfig(pub LoraConfig);

/// The paper's and PEFT's `create_loraplus_optimizer` default.
pub const LORAPLUS_DEFAULT_RATIO: f64 = 16.0;

impl LoraPlusConfig {
    /// The LoRA configuration with the ratio filled in.
    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            loraplus_lr_ratio: Some(self.0.loraplus_lr_ratio.unwrap_or(LORAPLUS_DEFAULT_RATIO)),
            ..self.0.clone()
        }
    }
}

impl crate::MethodSpec for LoraPlusConfig {
    fn name(&self) -> &'static str {
        "lora_plus"
    }
    fn formula(&self) -> &'static str {
        "Σ_targets r·(in + out)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        self.lora().validate(model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        self.lora().num_trainable(&model.config)
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
        Ok(Box::new(Lora::attach(&self.lora(), ctx)?))
    }
}
