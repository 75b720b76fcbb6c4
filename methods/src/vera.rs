//! VeRA (Kopiczko et al. 2024): one pair of frozen random matrices A `[r, in_max]` and
//! B `[out_max, r]`, shared by every targeted projection (each takes the top-left slice it
//! needs), and per projection two trained vectors: ΔW = diag(λ_b)·B·diag(λ_d)·A. λ_b starts at
//! zero, so training starts from the unchanged model; λ_d at `d_initial`.

use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method, Targets};
use candle_core::{DType, Tensor};
use peftbench_backbone::hf_names::{fused_qkv, module_path, target_name};
use peftbench_backbone::ops::{matmul_t, scale_columns};
use peftbench_backbone::{
    Initializer, Intervention, ModelConfig, Site, TrainableParams, Transformer,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

const NAME: &str = "vera";
/// PEFT's `peft_type`.
pub const PEFT_TYPE: &str = "VERA";
const A_KEY: &str = "base_model.vera_A";
const B_KEY: &str = "base_model.vera_B";

/// VeRA's configuration (PEFT's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VeraConfig {
    /// Rank of the shared random matrices.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Which projections get an update.
    #[serde(default)]
    pub target_modules: Targets,
    /// Seed of the shared A and B (this project's generator, not torch's: the matrices are
    /// always saved with the adapter).
    #[serde(default)]
    pub projection_prng_key: u64,
    /// λ_d's initial value.
    #[serde(default = "default_d")]
    pub d_initial: f64,
}

fn default_r() -> usize {
    256
}

fn default_d() -> f64 {
    0.1
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self {
            r: default_r(),
            target_modules: Targets::default(),
            projection_prng_key: 0,
            d_initial: default_d(),
        }
    }
}

impl VeraConfig {
    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            return Err(invalid(NAME, "r must be at least 1"));
        }
        if !self.d_initial.is_finite() {
            return Err(invalid(
                NAME,
                format!("d_initial {} is not finite", self.d_initial),
            ));
        }
        self.target_modules.sites(model, NAME).map(|_| ())
    }

    /// Closed form: Σ over targets of `out + r` (λ_b and λ_d); A and B are frozen.
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self
            .target_modules
            .sites(model, NAME)?
            .iter()
            .map(|s| crate::site_shape(model, s.proj).1 + self.r)
            .sum())
    }
}

/// One adapted projection: its vectors and its slices of the shared matrices.
struct Part {
    lambda_b: Tensor,
    lambda_d: Tensor,
    /// `A[:, :in]` and `B[:out, :]`, contiguous, and `A[:, :in]ᵀ` for building ΔW; shared
    /// by the projections of the same widths.
    a: Tensor,
    b: Tensor,
    a_t: Tensor,
}

/// How `x·ΔWᵀ` is computed for `rows` input rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Through the factors: `λ_b ⊙ (B·(λ_d ⊙ (A·x)))`, `2·rows·r·(in + out)` multiply-adds
    /// forward and backward.
    Factors,
    /// ΔW built (`r·in·out` each way) and folded into W by the backbone: only ΔW's gradient
    /// (`rows·in·out`) is extra.
    Fold,
    /// ΔW built and multiplied beside a weight that cannot take it (packed, or on another
    /// device): three `rows·in·out` products.
    Beside,
}

impl Part {
    fn route(&self, input: &Tensor, can_fold: bool) -> candle_core::Result<Route> {
        let (r, i) = self.a.dims2()?;
        let o = self.b.dim(0)?;
        let rows = input.elem_count() / i.max(1);
        let factors = 2 * rows * r * (i + o);
        let dense = 2 * r * i * o + if can_fold { rows } else { 3 * rows } * i * o;
        Ok(match (dense < factors, can_fold) {
            (false, _) => Route::Factors,
            (true, true) => Route::Fold,
            (true, false) => Route::Beside,
        })
    }

    /// `x·ΔWᵀ` through the factors. A and B are frozen: as the base's projections, their
    /// products return only the input's gradient (a matmul would also compute A's and B's,
    /// then drop them).
    fn through_factors(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let frozen =
            |w: &Tensor, x: &Tensor| peftbench_backbone::Linear::new(w.clone(), None).forward(x);
        let low = scale_columns(&frozen(&self.a, x)?, &self.lambda_d)?;
        scale_columns(&frozen(&self.b, &low)?, &self.lambda_b)
    }

    /// diag(λ_b)·B·diag(λ_d)·A, trained through λ_b and λ_d only.
    fn trained_delta(&self) -> candle_core::Result<Tensor> {
        let bd = scale_columns(&self.b, &self.lambda_d)?;
        matmul_t(&bd, &self.a_t)?.broadcast_mul(&self.lambda_b.unsqueeze(1)?)
    }
}

/// VeRA attached to a model.
pub struct Vera {
    r: usize,
    /// The shared frozen matrices.
    shared_a: Tensor,
    shared_b: Tensor,
    parts: BTreeMap<Site, Part>,
    params: TrainableParams,
    merged: Cell<bool>,
}

/// The largest `(in, out)` over the targets: the shared matrices' size.
fn largest(model: &ModelConfig, sites: &[Site]) -> (usize, usize) {
    sites.iter().fold((0, 0), |(i, o), s| {
        let (si, so) = crate::site_shape(model, s.proj);
        (i.max(si), o.max(so))
    })
}

impl Vera {
    fn build(
        model: &ModelConfig,
        r: usize,
        shared_a: Tensor,
        shared_b: Tensor,
        vectors: BTreeMap<Site, (Tensor, Tensor)>,
    ) -> Result<Self> {
        let mut params = TrainableParams::new();
        let mut parts = BTreeMap::new();
        // One slice of A (and its transpose) per input width, one of B per output width.
        let mut a_of: BTreeMap<usize, (Tensor, Tensor)> = BTreeMap::new();
        let mut b_of: BTreeMap<usize, Tensor> = BTreeMap::new();
        for (site, (lb, ld)) in vectors {
            let (i, o) = crate::site_shape(model, site.proj);
            let (a, a_t) = match a_of.entry(i) {
                Entry::Occupied(e) => e.get().clone(),
                Entry::Vacant(e) => {
                    let a = shared_a.narrow(1, 0, i)?.contiguous()?;
                    let a_t = a.t()?.contiguous()?;
                    e.insert((a, a_t)).clone()
                }
            };
            let b = match b_of.entry(o) {
                Entry::Occupied(e) => e.get().clone(),
                Entry::Vacant(e) => e.insert(shared_b.narrow(0, 0, o)?.contiguous()?).clone(),
            };
            let lambda_b = params.add(format!("{site}.vera_lambda_b"), lb)?;
            let lambda_d = params.add(format!("{site}.vera_lambda_d"), ld)?;
            parts.insert(
                site,
                Part {
                    lambda_b,
                    lambda_d,
                    a,
                    b,
                    a_t,
                },
            );
        }
        Ok(Self {
            r,
            shared_a,
            shared_b,
            parts,
            params,
            merged: Cell::new(false),
        })
    }

    /// Shared A and B (Kaiming-uniform from `projection_prng_key`), λ_b = 0, λ_d = d_initial.
    pub fn attach(config: &VeraConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let cfg = &ctx.model.config;
        let sites = config.target_modules.sites(cfg, NAME)?;
        let (in_max, out_max) = largest(cfg, &sites);
        let dev = ctx.model.device().clone();
        let mut init = Initializer::new(config.projection_prng_key);
        let shared_a = init.kaiming_uniform(config.r, in_max, &dev)?;
        let shared_b = init.kaiming_uniform(out_max, config.r, &dev)?;
        let mut vectors = BTreeMap::new();
        for site in sites {
            let out = crate::site_shape(cfg, site.proj).1;
            let lb = Tensor::zeros(out, DType::F32, &dev)?;
            let ld = (Tensor::ones(config.r, DType::F32, &dev)? * config.d_initial)?;
            vectors.insert(site, (lb, ld));
        }
        Self::build(cfg, config.r, shared_a, shared_b, vectors)
    }

    /// A VeRA adapter read from PEFT's format; the shared matrices must have been saved
    /// (`save_projection`), since torch's generator is not reproduced here.
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        if fused_qkv(model) {
            return Err(r
                .files
                .config_error("VERA on GPT-2's fused c_attn is not read here"));
        }
        let rank = r.files.usize("r")?;
        if !r.contains(&PeftKey::Top(A_KEY.into())) {
            return Err(r.files.config_error(
                "save_projection: the adapter holds no vera_A / vera_B, and torch's generator that would remake them from projection_prng_key is not reproduced here",
            ));
        }
        let dims = r.dims(&PeftKey::Top(A_KEY.into())).unwrap_or_default();
        let shared_a = r.take(&PeftKey::Top(A_KEY.into()), None)?;
        let bdims = r.dims(&PeftKey::Top(B_KEY.into())).unwrap_or_default();
        let shared_b = r.take(&PeftKey::Top(B_KEY.into()), None)?;
        if dims.first() != Some(&rank) || bdims.get(1) != Some(&rank) {
            return Err(r.files.config_error(format!(
                "vera_A {dims:?} and vera_B {bdims:?} do not have rank r = {rank}"
            )));
        }
        let mut vectors = BTreeMap::new();
        for site in model_sites(model) {
            let path = module_path(model, site);
            let kb = PeftKey::Module(format!("{path}.vera_lambda_b"));
            if !r.contains(&kb) {
                continue;
            }
            let (i, o) = crate::site_shape(model, site.proj);
            if dims[1] < i || bdims[0] < o {
                return Err(r.files.config_error(format!(
                    "{path}: needs vera_A [{rank}, ≥{i}] and vera_B [≥{o}, {rank}], the adapter has {dims:?} and {bdims:?}"
                )));
            }
            let lb = r.take(&kb, Some(&[o]))?;
            let ld = r.take(
                &PeftKey::Module(format!("{path}.vera_lambda_d")),
                Some(&[rank]),
            )?;
            vectors.insert(site, (lb, ld));
        }
        if vectors.is_empty() {
            return Err(r
                .files
                .config_error("VERA: no `*.vera_lambda_b` of a projection this model has"));
        }
        Self::build(model, rank, shared_a, shared_b, vectors)
    }

    /// diag(λ_b)·B·diag(λ_d)·A for one site, detached.
    fn delta(&self, part: &Part) -> Result<Tensor> {
        let bd = part
            .b
            .broadcast_mul(&part.lambda_d.detach().unsqueeze(0)?)?;
        let w = bd.matmul(&part.a)?;
        Ok(w.broadcast_mul(&part.lambda_b.detach().unsqueeze(1)?)?)
    }

    fn fold(&self, model: &mut Transformer, sign: f64) -> Result<()> {
        for (site, part) in &self.parts {
            let lin = model
                .linear_mut(*site)
                .ok_or_else(|| invalid(NAME, format!("the model has no projection {site}")))?;
            lin.add_to_weight(&(self.delta(part)? * sign)?)?;
        }
        Ok(())
    }
}

/// Every projection site of the model (Gate only where there is one).
fn model_sites(model: &ModelConfig) -> Vec<Site> {
    let has_gate = model.family == peftbench_backbone::Family::Llama;
    (0..model.num_layers)
        .flat_map(|layer| {
            peftbench_backbone::Proj::ALL
                .into_iter()
                .filter(move |p| *p != peftbench_backbone::Proj::Gate || has_gate)
                .map(move |proj| Site { layer, proj })
        })
        .collect()
}

impl Intervention for Vera {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        let Some(part) = self.parts.get(&site) else {
            return Ok(output);
        };
        if self.merged.get() {
            return Ok(output);
        }
        match part.route(input, false)? {
            Route::Beside => output + matmul_t(input, &part.trained_delta()?)?,
            _ => output + part.through_factors(input)?,
        }
    }

    /// ΔW where the weight takes it and building it costs less than the factor products (at
    /// large r: VeRA's budget buys r in the thousands where LoRA's buys 8).
    fn weight_delta(&self, site: Site, input: &Tensor) -> candle_core::Result<Option<Tensor>> {
        match self.parts.get(&site) {
            Some(part) if !self.merged.get() && part.route(input, true)? == Route::Fold => {
                Ok(Some(part.trained_delta()?))
            }
            _ => Ok(None),
        }
    }
}

impl Method for Vera {
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
    /// PEFT's `VERA` with the shared matrices saved (`save_projection`).
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if fused_qkv(model) {
            return Err(invalid(
                NAME,
                "PEFT's format for VeRA on GPT-2's fused c_attn is not written here",
            ));
        }
        let mut tensors = vec![
            (PeftKey::Top(A_KEY.into()), self.shared_a.clone()),
            (PeftKey::Top(B_KEY.into()), self.shared_b.clone()),
        ];
        let mut targets: Vec<serde_json::Value> = Vec::new();
        for (site, part) in &self.parts {
            let path = module_path(model, *site);
            tensors.push((
                PeftKey::Module(format!("{path}.vera_lambda_b")),
                part.lambda_b.detach(),
            ));
            tensors.push((
                PeftKey::Module(format!("{path}.vera_lambda_d")),
                part.lambda_d.detach(),
            ));
            // A leaf shared by two kinds of module (BERT's `dense`) would target both: name paths.
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
        config.insert("r".into(), self.r.into());
        config.insert("target_modules".into(), targets.into());
        config.insert("save_projection".into(), true.into());
        config.insert("vera_dropout".into(), 0.0.into());
        config.insert("bias".into(), "none".into());
        Ok(Some(PeftState {
            peft_type: PEFT_TYPE.into(),
            config,
            tensors,
        }))
    }
}

impl crate::MethodSpec for VeraConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_targets (out + r); the shared A [r, in_max] and B [out_max, r] are frozen"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        VeraConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        VeraConfig::num_trainable(self, &model.config)
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
        Ok(Box::new(Vera::attach(self, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::Part;
    use crate::test_util::{close, max_abs};
    use candle_core::{Device, Var};
    use peftbench_backbone::ops::matmul_t;
    use peftbench_backbone::Initializer;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Building ΔW gives the factor products' output and the same gradients for the
        /// input, λ_b and λ_d.
        #[test]
        fn building_delta_matches_the_factor_products(
            (r, i, o) in (1usize..40, 1usize..24, 1usize..24),
            rows in 1usize..30,
            seed in any::<u64>(),
        ) {
            let dev = Device::Cpu;
            let mut init = Initializer::new(seed);
            let mut var = |shape: &[usize]| Var::from_tensor(&init.normal(shape, 1.0, &dev).unwrap()).unwrap();
            let (lb, ld, x) = (var(&[o]), var(&[r]), var(&[rows, i]));
            let (a, b) = (var(&[r, i]).as_tensor().detach(), var(&[o, r]).as_tensor().detach());
            let g = var(&[rows, o]).as_tensor().detach();
            let part = Part {
                lambda_b: lb.as_tensor().clone(),
                lambda_d: ld.as_tensor().clone(),
                a_t: a.t().unwrap().contiguous().unwrap(),
                a,
                b,
            };
            let factors = part.through_factors(&x).unwrap();
            let built = matmul_t(&x, &part.trained_delta().unwrap()).unwrap();
            prop_assert!(close(&built, &factors, 1e-5), "value differs by {}", max_abs(&built, &factors));
            let gf = (&factors * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (&built * &g).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &lb, &ld] {
                let (p, q) = (gb.get(v).unwrap(), gf.get(v).unwrap());
                prop_assert!(close(p, q, 1e-5), "gradient differs by {}", max_abs(p, q));
            }
        }
    }
}
