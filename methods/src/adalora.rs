//! AdaLoRA (Zhang et al. 2023): SVD-form updates P·Λ·Q whose ranks are reallocated during
//! training. Importance of each singular triplet comes from the sensitivity |w·∇w| of Λ, P's
//! column and Q's row, smoothed by EMA (β1) and weighted by its uncertainty (β2); one global
//! threshold keeps the budget, which falls from init_r to target_r on a cubic schedule.
//! Follows PEFT's `AdaLoraModel`/`RankAllocator`, except that the final mask keeps exactly the
//! budget (ties are broken by position) rather than every triplet at the threshold.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method, Targets};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use peftbench_backbone::{Intervention, ModelConfig, Site, TrainableParams};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// AdaLoRA's configuration (PEFT's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaLoraConfig {
    /// Rank every matrix starts with.
    #[serde(default = "d_init_r")]
    pub init_r: usize,
    /// Average rank per matrix after allocation.
    #[serde(default = "d_target_r")]
    pub target_r: usize,
    /// Scaling numerator α (the update is (α/init_r)·P·Λ·Q).
    #[serde(default = "d_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the low-rank path while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which projections get an update.
    #[serde(default)]
    pub target_modules: Targets,
    /// Steps of warm-up before any pruning.
    #[serde(default)]
    pub tinit: usize,
    /// Steps at the end with the final rank pattern fixed.
    #[serde(default)]
    pub tfinal: usize,
    /// Reallocate every `delta_t` steps.
    #[serde(default = "d_delta_t")]
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    #[serde(default = "d_beta")]
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    #[serde(default = "d_beta")]
    pub beta2: f64,
    /// Weight of the orthogonality regulariser on P and Q.
    #[serde(default = "d_orth")]
    pub orth_reg_weight: f64,
    /// Total training steps T (the harness sets it from the run).
    #[serde(default = "d_total")]
    pub total_step: usize,
}

fn d_init_r() -> usize {
    12
}
fn d_target_r() -> usize {
    8
}
fn d_alpha() -> f64 {
    8.0
}
fn d_delta_t() -> usize {
    1
}
fn d_beta() -> f64 {
    0.85
}
fn d_orth() -> f64 {
    0.5
}
fn d_total() -> usize {
    1000
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        Self {
            init_r: d_init_r(),
            target_r: d_target_r(),
            lora_alpha: d_alpha(),
            lora_dropout: 0.0,
            target_modules: Targets::default(),
            tinit: 0,
            tfinal: 0,
            delta_t: d_delta_t(),
            beta1: d_beta(),
            beta2: d_beta(),
            orth_reg_weight: d_orth(),
            total_step: d_total(),
        }
    }
}

impl AdaLoraConfig {
    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.target_r == 0 || self.init_r < self.target_r {
            return Err(invalid(
                "adalora",
                format!(
                    "need 1 ≤ target_r ≤ init_r, got target_r {} and init_r {}",
                    self.target_r, self.init_r
                ),
            ));
        }
        if self.tinit + self.tfinal >= self.total_step {
            return Err(invalid(
                "adalora",
                format!(
                    "tinit {} + tfinal {} leave no budgeting phase in total_step {}",
                    self.tinit, self.tfinal, self.total_step
                ),
            ));
        }
        if self.delta_t == 0 {
            return Err(invalid("adalora", "delta_t must be at least 1"));
        }
        self.target_modules.sites(model, "adalora").map(|_| ())
    }

    /// Closed form: Σ over targeted projections of init_r·(in + out + 1).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self
            .target_modules
            .sites(model, "adalora")?
            .iter()
            .map(|s| {
                let (i, o) = crate::site_shape(model, s.proj);
                self.init_r * (i + o + 1)
            })
            .sum())
    }

    /// The total rank budget at `step` for `matrices` adapted matrices, and whether to mask
    /// then: init budget until tinit, a cubic fall to the target until T − tfinal, then the
    /// target.
    pub fn budget_schedule(&self, matrices: usize, step: usize) -> (usize, bool) {
        let init = self.init_r * matrices;
        let target = self.target_r * matrices;
        if step <= self.tinit {
            (init, false)
        } else if step > self.total_step - self.tfinal {
            (target, true)
        } else {
            let span = (self.total_step - self.tfinal - self.tinit) as f64;
            let mul = 1.0 - (step - self.tinit) as f64 / span;
            let budget = ((init - target) as f64 * mul.powi(3) + target as f64) as usize;
            (budget, step.is_multiple_of(self.delta_t))
        }
    }
}

/// One adapted projection: P `[out, r]`, Λ `[r]`, Q `[r, in]`.
#[derive(Debug, Clone)]
pub struct SvdTriplet {
    /// Left factor P (PEFT's lora_B).
    pub p: Var,
    /// Singular values Λ (PEFT's lora_E).
    pub lambda: Var,
    /// Right factor Q (PEFT's lora_A).
    pub q: Var,
}

/// Smoothed sensitivity and uncertainty of one tensor's entries.
#[derive(Debug, Clone)]
struct Importance {
    ipt: Tensor,
    unc: Tensor,
}

/// AdaLoRA attached to a model.
pub struct AdaLora {
    config: AdaLoraConfig,
    triplets: BTreeMap<Site, SvdTriplet>,
    params: TrainableParams,
    importance: BTreeMap<(Site, u8), Importance>,
    /// Kept triplets per site, once a final pattern is fixed.
    rank_pattern: Option<BTreeMap<Site, Vec<bool>>>,
    /// Per-site scaling of an adapter read from PEFT's format (α over its saved rank, as PEFT
    /// computes it on reload); empty for one trained here (α / init_r everywhere).
    loaded_scaling: BTreeMap<Site, f64>,
    /// Whether the updates currently live in the base weights.
    merged: Cell<bool>,
    training: Cell<bool>,
    rng: RefCell<peftbench_backbone::Initializer>,
}

impl AdaLora {
    /// Creates P, Q ~ N(0, 0.02) and Λ = 0 for every targeted projection (as PEFT).
    pub fn attach(config: &AdaLoraConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let dev = ctx.model.device().clone();
        let r = config.init_r;
        let mut params = TrainableParams::new();
        let mut triplets = BTreeMap::new();
        for site in config.target_modules.sites(&ctx.model.config, "adalora")? {
            let (inp, out) = crate::site_shape(&ctx.model.config, site.proj);
            params.add(
                format!("{site}.lora_A"),
                ctx.init.normal((r, inp), 0.02, &dev)?,
            )?;
            params.add(
                format!("{site}.lora_E"),
                Tensor::zeros(r, DType::F32, &dev)?,
            )?;
            params.add(
                format!("{site}.lora_B"),
                ctx.init.normal((out, r), 0.02, &dev)?,
            )?;
            let get = |k: &str| {
                params
                    .get(&format!("{site}.{k}"))
                    .expect("just added")
                    .clone()
            };
            triplets.insert(
                site,
                SvdTriplet {
                    q: get("lora_A"),
                    lambda: get("lora_E"),
                    p: get("lora_B"),
                },
            );
        }
        Ok(Self {
            config: config.clone(),
            triplets,
            params,
            importance: BTreeMap::new(),
            rank_pattern: None,
            loaded_scaling: BTreeMap::new(),
            merged: Cell::new(false),
            training: Cell::new(false),
            rng: RefCell::new(peftbench_backbone::Initializer::new(ctx.seed ^ 0xada)),
        })
    }

    /// The adapted projections' factors.
    pub fn triplets(&self) -> &BTreeMap<Site, SvdTriplet> {
        &self.triplets
    }

    /// The configuration in force.
    pub fn config(&self) -> &AdaLoraConfig {
        &self.config
    }

    /// Mean over P's and Q's of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (PEFT's regulariser, unweighted).
    pub fn orthogonality_penalty(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        let mut n = 0usize;
        for t in self.triplets.values() {
            let p = t.p.as_tensor();
            let q = t.q.as_tensor();
            for cov in [p.t()?.matmul(p)?, q.matmul(&q.t()?)?] {
                let r = cov.dims()[0];
                let eye = Tensor::eye(r, DType::F32, cov.device())?;
                let fro = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
                total = Some(match total {
                    None => fro,
                    Some(acc) => (acc + fro)?,
                });
                n += 1;
            }
        }
        match total {
            Some(t) => Ok((t / n as f64)?),
            None => {
                // No triplets: a zero where the parameters would live.
                let dev = self.params.vars().first().map(|v| v.device().clone());
                Ok(Tensor::zeros(
                    (),
                    DType::F32,
                    &dev.unwrap_or(candle_core::Device::Cpu),
                )?)
            }
        }
    }

    /// Rank of each adapted matrix: kept triplets of the final pattern once fixed, else the
    /// non-zero Λ entries.
    pub fn ranks(&self) -> Result<BTreeMap<Site, usize>> {
        if let Some(p) = &self.rank_pattern {
            return Ok(p
                .iter()
                .map(|(s, k)| (*s, k.iter().filter(|x| **x).count()))
                .collect());
        }
        self.triplets
            .iter()
            .map(|(s, t)| {
                let v: Vec<f32> = t.lambda.as_tensor().to_vec1()?;
                Ok((*s, v.iter().filter(|x| **x != 0.0).count()))
            })
            .collect()
    }

    /// The fixed final rank pattern, once tfinal has begun.
    pub fn rank_pattern(&self) -> Option<&BTreeMap<Site, Vec<bool>>> {
        self.rank_pattern.as_ref()
    }

    fn update_importance(&mut self, grads: &GradStore) -> Result<()> {
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        for (site, t) in &self.triplets {
            for (k, var) in [(0u8, &t.q), (1, &t.lambda), (2, &t.p)] {
                let Some(g) = grads.get(var.as_tensor()) else {
                    continue;
                };
                let ipt = (var.as_tensor().detach() * g.detach())?.abs()?;
                let entry = self.importance.entry((*site, k));
                let cur = match entry {
                    std::collections::btree_map::Entry::Vacant(v) => v.insert(Importance {
                        ipt: ipt.zeros_like()?,
                        unc: ipt.zeros_like()?,
                    }),
                    std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                };
                let new_ipt = ((&cur.ipt * b1)? + (&ipt * (1.0 - b1))?)?;
                let new_unc = ((&cur.unc * b2)? + ((ipt - &new_ipt)?.abs()? * (1.0 - b2))?)?;
                cur.ipt = new_ipt;
                cur.unc = new_unc;
            }
        }
        Ok(())
    }

    /// Score of every triplet: s(Λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), with s = ipt·unc.
    fn triplet_scores(&self) -> Result<BTreeMap<Site, Vec<f32>>> {
        let r = self.config.init_r;
        let score = |site: Site, k: u8| -> Result<Option<Tensor>> {
            Ok(match self.importance.get(&(site, k)) {
                Some(i) => Some((&i.ipt * &i.unc)?),
                None => None,
            })
        };
        let mut out = BTreeMap::new();
        for site in self.triplets.keys() {
            let mut s = vec![0f32; r];
            if let Some(q) = score(*site, 0)? {
                add(&mut s, &q.mean(1)?.to_vec1()?);
            }
            if let Some(l) = score(*site, 1)? {
                add(&mut s, &l.to_vec1()?);
            }
            if let Some(p) = score(*site, 2)? {
                add(&mut s, &p.mean(0)?.to_vec1()?);
            }
            out.insert(*site, s);
        }
        Ok(out)
    }

    /// Keeps the `budget` highest-scoring triplets over all matrices and zeroes Λ elsewhere.
    fn mask_to_budget(&self, budget: usize) -> Result<BTreeMap<Site, Vec<bool>>> {
        let scores = self.triplet_scores()?;
        let mut all: Vec<(f32, Site, usize)> = scores
            .iter()
            .flat_map(|(s, v)| v.iter().enumerate().map(move |(i, x)| (*x, *s, i)))
            .collect();
        // Highest first; ties broken by position so the kept count is exactly the budget.
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut pattern: BTreeMap<Site, Vec<bool>> = self
            .triplets
            .keys()
            .map(|s| (*s, vec![false; self.config.init_r]))
            .collect();
        for (_, s, i) in all.iter().take(budget) {
            pattern.get_mut(s).expect("site")[*i] = true;
        }
        self.apply_pattern(&pattern)?;
        Ok(pattern)
    }

    fn apply_pattern(&self, pattern: &BTreeMap<Site, Vec<bool>>) -> Result<()> {
        for (site, keep) in pattern {
            let lam = &self.triplets[site].lambda;
            let m: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let m = Tensor::from_vec(m, keep.len(), lam.device())?;
            lam.set(&(lam.as_tensor().detach() * m)?)?;
        }
        Ok(())
    }

    /// One allocation step, as PEFT's `update_and_allocate` (called after the optimizer step).
    pub fn update_and_allocate(&mut self, step: usize, grads: &GradStore) -> Result<()> {
        let matrices = self.triplets.len();
        let last = self.config.total_step - self.config.tfinal;
        if step < last {
            self.update_importance(grads)?;
            let (budget, mask) = self.config.budget_schedule(matrices, step);
            if mask {
                self.mask_to_budget(budget)?;
            }
        } else if step == last || self.rank_pattern.is_none() {
            let (budget, _) = self.config.budget_schedule(matrices, step);
            let budget = budget.min(self.config.target_r * matrices);
            self.rank_pattern = Some(self.mask_to_budget(budget)?);
            self.importance.clear();
        } else if let Some(p) = &self.rank_pattern {
            self.apply_pattern(p)?;
        }
        Ok(())
    }
}

fn add(acc: &mut [f32], v: &[f32]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += *b;
    }
}

impl AdaLora {
    /// An AdaLoRA read from PEFT's format. As PEFT does on reload, every module scales by
    /// α / (init_r + 1e-5), whatever rank its `rank_pattern` kept.
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        let f = &r.files;
        let num = |k: &str, d: f64| f.config.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let config = AdaLoraConfig {
            init_r: f.usize("init_r")?,
            target_r: f.usize("target_r")?,
            lora_alpha: f.f64("lora_alpha")?,
            lora_dropout: num("lora_dropout", 0.0),
            target_modules: Targets::default(),
            tinit: num("tinit", 0.0) as usize,
            tfinal: num("tfinal", 0.0) as usize,
            delta_t: num("deltaT", 1.0) as usize,
            beta1: num("beta1", 0.85),
            beta2: num("beta2", 0.85),
            orth_reg_weight: num("orth_reg_weight", 0.5),
            total_step: num("total_step", 1000.0) as usize,
        };
        let has_pattern = f.config.get("rank_pattern").is_some_and(|v| v.is_object());
        let mut params = TrainableParams::new();
        let mut triplets = BTreeMap::new();
        let mut loaded_scaling = BTreeMap::new();
        let mut projs: Vec<String> = Vec::new();
        for layer in 0..model.num_layers {
            for proj in peftbench_backbone::Proj::ALL {
                let site = Site { layer, proj };
                if peftbench_backbone::hf_names::fused_qkv(model)
                    && matches!(
                        proj,
                        peftbench_backbone::Proj::Query
                            | peftbench_backbone::Proj::Key
                            | peftbench_backbone::Proj::Value
                    )
                {
                    continue;
                }
                let path = peftbench_backbone::hf_names::module_path(model, site);
                let a_key = PeftKey::Module(format!("{path}.lora_A"));
                if !r.contains(&a_key) {
                    continue;
                }
                let (inp, out) = crate::site_shape(model, proj);
                let k = r.dims(&a_key).map_or(0, |d| d[0]);
                if !has_pattern && k != config.init_r {
                    return Err(r.files.config_error(format!(
                        "`{path}.lora_A` has rank {k}, but init_r is {} and there is no rank_pattern",
                        config.init_r
                    )));
                }
                let q = r.take(&a_key, Some(&[k, inp]))?;
                let e = r.take(&PeftKey::Module(format!("{path}.lora_E")), Some(&[k, 1]))?;
                let p = r.take(&PeftKey::Module(format!("{path}.lora_B")), Some(&[out, k]))?;
                let add = |params: &mut TrainableParams, n: &str, t: Tensor| -> Result<Var> {
                    params.add(format!("{site}.{n}"), t)?;
                    Ok(params
                        .get(&format!("{site}.{n}"))
                        .expect("just added")
                        .clone())
                };
                loaded_scaling.insert(site, config.lora_alpha / (config.init_r as f64 + 1e-5));
                triplets.insert(
                    site,
                    SvdTriplet {
                        q: add(&mut params, "lora_A", q)?,
                        lambda: add(&mut params, "lora_E", e.squeeze(1)?)?,
                        p: add(&mut params, "lora_B", p)?,
                    },
                );
                if !projs.iter().any(|x| x == proj.name()) {
                    projs.push(proj.name().to_string());
                }
            }
        }
        if triplets.is_empty() {
            return Err(r
                .files
                .config_error("no `*.lora_A` tensor names a projection of this model"));
        }
        Ok(Self {
            config: AdaLoraConfig {
                target_modules: Targets(projs),
                ..config
            },
            triplets,
            params,
            importance: BTreeMap::new(),
            rank_pattern: None,
            loaded_scaling,
            merged: Cell::new(false),
            training: Cell::new(false),
            rng: RefCell::new(peftbench_backbone::Initializer::new(0xada)),
        })
    }
}

impl AdaLora {
    /// The factor applied to P·Λ·Q at `site`.
    fn scaling(&self, site: Site) -> f64 {
        self.loaded_scaling
            .get(&site)
            .copied()
            .unwrap_or(self.config.lora_alpha / self.config.init_r as f64)
    }

    /// ΔW = scaling · P·diag(Λ)·Q at each site, detached.
    fn deltas(&self) -> Result<Vec<(Site, Tensor)>> {
        self.triplets
            .iter()
            .map(|(site, t)| {
                let qe =
                    t.q.as_tensor()
                        .broadcast_mul(&t.lambda.as_tensor().unsqueeze(1)?)?;
                let d = (t.p.as_tensor().matmul(&qe)?.detach() * self.scaling(*site))?;
                Ok((*site, d))
            })
            .collect()
    }

    fn fold(&self, model: &mut peftbench_backbone::Transformer, sign: f64) -> Result<()> {
        for (site, d) in self.deltas()? {
            let lin = model.linear_mut(site).expect("site exists");
            lin.add_to_weight(&(d * sign)?)?;
        }
        Ok(())
    }
}

impl Intervention for AdaLora {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        let Some(t) = self.triplets.get(&site) else {
            return Ok(output);
        };
        if self.merged.get() {
            return Ok(output);
        }
        let x = if self.training.get() && self.config.lora_dropout > 0.0 {
            crate::lora::dropout(input, self.config.lora_dropout, &self.rng)
                .map_err(candle_core::Error::wrap)?
        } else {
            input.clone()
        };
        let qe =
            t.q.as_tensor()
                .broadcast_mul(&t.lambda.as_tensor().unsqueeze(1)?)?;
        output
            + peftbench_backbone::ops::low_rank_delta(&x, &qe, t.p.as_tensor(), self.scaling(site))?
    }
}

impl Method for AdaLora {
    fn name(&self) -> &'static str {
        "adalora"
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn set_training(&self, training: bool) {
        self.training.set(training);
    }
    fn extra_loss(&self) -> Result<Option<Tensor>> {
        if self.config.orth_reg_weight == 0.0 {
            return Ok(None);
        }
        Ok(Some(
            (self.orthogonality_penalty()? * self.config.orth_reg_weight)?,
        ))
    }
    fn after_step(&mut self, step: usize, grads: &GradStore) -> Result<()> {
        self.update_and_allocate(step, grads)
    }
    fn merge_into(&self, model: &mut peftbench_backbone::Transformer) -> Result<bool> {
        if !self.merged.get() {
            self.fold(model, 1.0)?;
            self.merged.set(true);
        }
        Ok(true)
    }
    fn unmerge_from(&self, model: &mut peftbench_backbone::Transformer) -> Result<bool> {
        if self.merged.get() {
            self.fold(model, -1.0)?;
            self.merged.set(false);
        }
        Ok(true)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if peftbench_backbone::hf_names::fused_qkv(model) {
            return Err(crate::error::invalid(
                "adalora",
                "PEFT-format export of AdaLoRA on GPT-2's fused c_attn is not implemented",
            ));
        }
        let c = &self.config;
        let mut tensors = Vec::new();
        let mut pattern = serde_json::Map::new();
        let needs_pattern = self.rank_pattern.is_some()
            || self
                .triplets
                .values()
                .any(|t| t.q.as_tensor().dims()[0] != c.init_r);
        let prefix = |site: Site| peftbench_backbone::hf_names::module_path(model, site);
        for (site, t) in &self.triplets {
            let path = prefix(*site);
            // A module read from a file may hold fewer rows than init_r: its kept ranks.
            let rows = t.q.as_tensor().dims()[0];
            let keep: Vec<bool> = match &self.rank_pattern {
                Some(p) => p.get(site).cloned().unwrap_or_else(|| vec![true; c.init_r]),
                None => (0..c.init_r).map(|i| i < rows).collect(),
            };
            let idx: Vec<u32> = match self.rank_pattern {
                Some(_) => (0..keep.len() as u32)
                    .filter(|&i| keep[i as usize])
                    .collect(),
                None => (0..rows as u32).collect(),
            };
            let k = idx.len();
            // PEFT scales by α / (init_r + 1e-5), also after a reload resized the module to its
            // kept rank; fold the 1e-5 into Λ so PEFT computes exactly this update.
            let peft_scaling = c.lora_alpha / (c.init_r as f64 + 1e-5);
            let ours = self
                .loaded_scaling
                .get(site)
                .copied()
                .unwrap_or(c.lora_alpha / c.init_r as f64);
            let fold = ours / peft_scaling;
            let dev = t.q.as_tensor().device().clone();
            let ids = Tensor::from_vec(idx.clone(), k, &dev)?;
            let (q, e, p) = if k == 0 {
                let (inp, out) = crate::site_shape(model, site.proj);
                (
                    Tensor::zeros((0, inp), DType::F32, &dev)?,
                    Tensor::zeros((0, 1), DType::F32, &dev)?,
                    Tensor::zeros((out, 0), DType::F32, &dev)?,
                )
            } else {
                (
                    t.q.as_tensor().index_select(&ids, 0)?,
                    match fold == 1.0 {
                        true => t.lambda.as_tensor().index_select(&ids, 0)?,
                        false => (t.lambda.as_tensor().index_select(&ids, 0)? * fold)?,
                    }
                    .unsqueeze(1)?,
                    t.p.as_tensor().index_select(&ids, 1)?,
                )
            };
            tensors.push((PeftKey::Module(format!("{path}.lora_A")), q.contiguous()?));
            tensors.push((PeftKey::Module(format!("{path}.lora_E")), e.contiguous()?));
            tensors.push((PeftKey::Module(format!("{path}.lora_B")), p.contiguous()?));
            if needs_pattern {
                let name = format!(
                    "{}{path}.lora_E",
                    peftbench_backbone::hf_names::base_prefix(model, task)
                );
                pattern.insert(name, serde_json::Value::from(keep));
            }
        }
        let targets: Vec<String> = {
            let mut v: Vec<String> = Vec::new();
            for site in self.triplets.keys() {
                let leaf = peftbench_backbone::hf_names::target_name(model, site.proj).to_string();
                if !v.contains(&leaf) {
                    v.push(leaf);
                }
            }
            v
        };
        let config = serde_json::json!({
            "init_r": c.init_r, "target_r": c.target_r, "r": c.init_r, "lora_alpha": c.lora_alpha,
            "lora_dropout": c.lora_dropout, "tinit": c.tinit, "tfinal": c.tfinal,
            "deltaT": c.delta_t, "beta1": c.beta1, "beta2": c.beta2,
            "orth_reg_weight": c.orth_reg_weight, "total_step": c.total_step,
            "target_modules": targets, "bias": "none", "init_lora_weights": true,
            "rank_pattern": if needs_pattern { serde_json::Value::Object(pattern) } else { serde_json::Value::Null },
        });
        let serde_json::Value::Object(config) = config else {
            unreachable!("a JSON object")
        };
        Ok(Some(PeftState {
            peft_type: "ADALORA".into(),
            config,
            tensors,
        }))
    }
    fn summary(&self) -> Result<serde_json::Value> {
        let ranks: serde_json::Map<String, serde_json::Value> = self
            .ranks()?
            .into_iter()
            .map(|(s, r)| (s.to_string(), r.into()))
            .collect();
        Ok(
            serde_json::json!({ "final_ranks": ranks, "target_budget": self.config.target_r * self.triplets.len() }),
        )
    }
}

impl crate::MethodSpec for AdaLoraConfig {
    fn name(&self) -> &'static str {
        "adalora"
    }
    fn formula(&self) -> &'static str {
        "Σ_targets init_r·(in + out + 1)"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        AdaLoraConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &peftbench_backbone::Transformer) -> Result<usize> {
        AdaLoraConfig::num_trainable(self, &model.config)
    }
    fn knob(&self) -> Option<crate::Knob> {
        Some(crate::Knob {
            name: "target_r",
            value: self.target_r,
        })
    }
    fn set_knob(&mut self, value: usize) {
        // The budget falls from init_r to target_r; keep PEFT's 1.5× head room.
        self.target_r = value;
        self.init_r = (value * 3).div_ceil(2).max(value + 1);
    }
    fn attach(&self, ctx: &mut AttachContext) -> Result<Box<dyn Method>> {
        Ok(Box::new(AdaLora::attach(self, ctx)?))
    }
}
