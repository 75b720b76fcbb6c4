//! LoKr (LyCORIS; Edalati et al. 2022): the update is a Kronecker product,
//! ΔW = (α/r)·W1 ⊗ W2 with W1 `[out_l, in_m]` and W2 `[out_k, in_n]`, `out = out_l·out_k` and
//! `in = in_m·in_n` factored as PEFT's `factorization` does; a factor with a side over 2·r is
//! itself a low-rank product (W2 always may, W1 with `decompose_both`). As in PEFT, W1 (or its
//! first factor) starts at zero, so ΔW = 0, and the rest Kaiming-uniform.

use crate::dense_delta::{Delta, DeltaSites};
use crate::error::{invalid, Result};
use crate::peft::{PeftKey, PeftReader, PeftState};
use crate::{AttachContext, Method, Targets};
use candle_core::{DType, Tensor};
use peftbench_backbone::hf_names::{fused_qkv, module_path, target_name};
use peftbench_backbone::ops::{kronecker_product, matmul_t};
use peftbench_backbone::{Intervention, ModelConfig, Site, TrainableParams, Transformer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const NAME: &str = "lokr";
/// PEFT's `peft_type`.
pub const PEFT_TYPE: &str = "LOKR";

/// LoKr's configuration (PEFT's field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LokrConfig {
    /// Rank of a decomposed factor.
    #[serde(default = "crate::defaults::rank")]
    pub r: usize,
    /// Scaling numerator α (the update is scaled by α/r).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Decompose W1 as well as W2 when it is large enough.
    #[serde(default)]
    pub decompose_both: bool,
    /// The divisor the factorisation aims for; -1 is near the square root.
    #[serde(default = "default_factor")]
    pub decompose_factor: i64,
    /// Which projections get an update.
    #[serde(default)]
    pub target_modules: Targets,
}

fn default_alpha() -> f64 {
    8.0
}

fn default_factor() -> i64 {
    -1
}

impl Default for LokrConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: default_alpha(),
            decompose_both: false,
            decompose_factor: default_factor(),
            target_modules: Targets::default(),
        }
    }
}

/// PEFT's `factorization`: `(m, n)` with `m·n = dimension`, `m ≤ n`, `m` the divisor nearest
/// `factor` (or the square root for -1) from below.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        // The smaller first here too, as PEFT swaps them (40 at factor 8 is (5, 8)).
        let (m, n) = (factor as usize, dimension / factor as usize);
        return (m.min(n), m.max(n));
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// The shapes of one projection's factors: `((out_l, out_k), (in_m, in_n))` and whether W1 and
/// W2 are kept whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    out: (usize, usize),
    inp: (usize, usize),
    whole_w1: bool,
    whole_w2: bool,
}

impl LokrConfig {
    fn shape(&self, inp: usize, out: usize) -> Shape {
        let inp = factorization(inp, self.decompose_factor);
        let out = factorization(out, self.decompose_factor);
        let r = self.r as f64;
        Shape {
            out,
            inp,
            whole_w1: !(self.decompose_both && r < out.0.max(inp.0) as f64 / 2.0),
            whole_w2: r >= out.1.max(inp.1) as f64 / 2.0,
        }
    }

    /// Checks the configuration against a model.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.r == 0 {
            return Err(invalid(NAME, "r must be at least 1"));
        }
        if self.decompose_factor == 0 || self.decompose_factor < -1 {
            return Err(invalid(
                NAME,
                format!(
                    "decompose_factor must be -1 or positive, got {}",
                    self.decompose_factor
                ),
            ));
        }
        self.target_modules.sites(model, NAME).map(|_| ())
    }

    /// Closed form: Σ over targets of |W1| + |W2|, a whole factor a·c and a decomposed one
    /// r·(a + c).
    pub fn num_trainable(&self, model: &ModelConfig) -> Result<usize> {
        Ok(self
            .target_modules
            .sites(model, NAME)?
            .iter()
            .map(|s| {
                let (i, o) = crate::site_shape(model, s.proj);
                let sh = self.shape(i, o);
                let part =
                    |whole: bool, a: usize, c: usize| if whole { a * c } else { self.r * (a + c) };
                part(sh.whole_w1, sh.out.0, sh.inp.0) + part(sh.whole_w2, sh.out.1, sh.inp.1)
            })
            .sum())
    }
}

/// A Kronecker factor: whole, or a low-rank product `a·b`.
enum Factor {
    Whole(Tensor),
    Product(Tensor, Tensor),
}

impl Factor {
    fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Factor::Whole(w) => w.dims2(),
            Factor::Product(a, b) => Ok((a.dim(0)?, b.dim(1)?)),
        }
    }

    fn value(&self) -> candle_core::Result<Tensor> {
        match self {
            Factor::Whole(w) => Ok(w.clone()),
            Factor::Product(a, b) => a.matmul(b),
        }
    }
}

/// One adapted projection.
struct Kron {
    w1: Factor,
    w2: Factor,
    scaling: f64,
}

/// W1 ⊗ W2 for `[a, c]` and `[b, d]`: element `(i·b + k, j·d + l)` is `W1[i, j]·W2[k, l]`.
fn kron(w1: &Tensor, w2: &Tensor) -> candle_core::Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, d) = w2.dims2()?;
    let x = w1
        .reshape((a, 1, c, 1))?
        .broadcast_mul(&w2.reshape((1, b, 1, d))?)?;
    x.reshape((a * b, c * d))
}

impl Kron {
    /// Multiply-adds per input row of [`Delta::apply`] against a dense `[out, in]` product.
    fn costs(&self) -> candle_core::Result<(usize, usize)> {
        let ((a, c), (b, d)) = (self.w1.dims()?, self.w2.dims()?);
        Ok((c * d * b + b * c * a, a * b * c * d))
    }

    /// x·(scale·W1 ⊗ W2)ᵀ through the factors, whatever it costs.
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        kronecker_product(x, &self.w1.value()?, &self.w2.value()?, self.scaling)
    }
}

impl Delta for Kron {
    fn delta(&self) -> candle_core::Result<Tensor> {
        kron(&self.w1.value()?, &self.w2.value()?)? * self.scaling
    }

    /// With an input row seen as a `[c, d]` block X, its output as an `[a, b]` block is
    /// W1·X·W2ᵀ: two small products per row instead of one against all of ΔW, and no ΔW
    /// gradient the size of the weight.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.structured() {
            self.product(x)
        } else {
            matmul_t(x, &self.delta()?.contiguous()?)
        }
    }

    /// Where it takes under half the dense product's work (not when a dimension factors
    /// badly, e.g. a prime one, and a factor is nearly all of W).
    fn structured(&self) -> bool {
        self.costs().is_ok_and(|(s, dense)| 2 * s < dense)
    }
}

/// LoKr attached to a model.
pub struct Lokr {
    config: LokrConfig,
    parts: DeltaSites<Kron>,
    params: TrainableParams,
}

impl Lokr {
    /// Factors for every targeted projection, W1 (or W1a) at zero.
    pub fn attach(config: &LokrConfig, ctx: &mut AttachContext) -> Result<Self> {
        config.validate(&ctx.model.config)?;
        let dev = ctx.model.device().clone();
        let r = config.r;
        let mut params = TrainableParams::new();
        let mut parts = BTreeMap::new();
        for site in config.target_modules.sites(&ctx.model.config, NAME)? {
            let (i, o) = crate::site_shape(&ctx.model.config, site.proj);
            let sh = config.shape(i, o);
            let (a, c) = (sh.out.0, sh.inp.0);
            let (b, d) = (sh.out.1, sh.inp.1);
            let w1 = if sh.whole_w1 {
                Factor::Whole(params.add(
                    format!("{site}.lokr_w1"),
                    Tensor::zeros((a, c), DType::F32, &dev)?,
                )?)
            } else {
                Factor::Product(
                    params.add(
                        format!("{site}.lokr_w1_a"),
                        Tensor::zeros((a, r), DType::F32, &dev)?,
                    )?,
                    params.add(
                        format!("{site}.lokr_w1_b"),
                        ctx.init.kaiming_uniform(r, c, &dev)?,
                    )?,
                )
            };
            let w2 = if sh.whole_w2 {
                Factor::Whole(params.add(
                    format!("{site}.lokr_w2"),
                    ctx.init.kaiming_uniform(b, d, &dev)?,
                )?)
            } else {
                Factor::Product(
                    params.add(
                        format!("{site}.lokr_w2_a"),
                        ctx.init.kaiming_uniform(b, r, &dev)?,
                    )?,
                    params.add(
                        format!("{site}.lokr_w2_b"),
                        ctx.init.kaiming_uniform(r, d, &dev)?,
                    )?,
                )
            };
            parts.insert(
                site,
                Kron {
                    w1,
                    w2,
                    scaling: config.alpha / r as f64,
                },
            );
        }
        Ok(Self {
            config: config.clone(),
            parts: DeltaSites::new(NAME, parts),
            params,
        })
    }

    /// A LoKr adapter read from PEFT's format (linear layers; no per-module patterns).
    pub fn from_peft(r: &mut PeftReader, model: &ModelConfig) -> Result<Self> {
        if fused_qkv(model) {
            return Err(r
                .files
                .config_error("LOKR on GPT-2's fused c_attn is not read here"));
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
                    .config_error(format!("{key}: per-module LoKr ranks are not read here")));
            }
        }
        let config = LokrConfig {
            r: r.files.usize("r")?,
            alpha: r.files.f64("alpha")?,
            decompose_both: r.files.flag("decompose_both"),
            decompose_factor: r
                .files
                .config
                .get("decompose_factor")
                .and_then(|v| v.as_i64())
                .unwrap_or(-1),
            target_modules: Targets::default(),
        };
        let rank = config.r;
        let mut params = TrainableParams::new();
        let mut parts = BTreeMap::new();
        let mut projs: Vec<String> = Vec::new();
        for layer in 0..model.num_layers {
            for proj in peftbench_backbone::Proj::ALL {
                if model.family != peftbench_backbone::Family::Llama
                    && proj == peftbench_backbone::Proj::Gate
                {
                    continue;
                }
                let site = Site { layer, proj };
                let path = module_path(model, site);
                let key = |n: &str| PeftKey::Module(format!("{path}.{n}"));
                if !r.contains(&key("lokr_w1")) && !r.contains(&key("lokr_w1_a")) {
                    continue;
                }
                let (i, o) = crate::site_shape(model, proj);
                let sh = config.shape(i, o);
                let (a, c, b, d) = (sh.out.0, sh.inp.0, sh.out.1, sh.inp.1);
                let mut take = |n: &str, shape: [usize; 2]| -> Result<Tensor> {
                    let t = r.take(&key(n), Some(&shape))?;
                    Ok(params.add(format!("{site}.{n}"), t)?)
                };
                let w1 = if sh.whole_w1 {
                    Factor::Whole(take("lokr_w1", [a, c])?)
                } else {
                    Factor::Product(take("lokr_w1_a", [a, rank])?, take("lokr_w1_b", [rank, c])?)
                };
                let w2 = if sh.whole_w2 {
                    Factor::Whole(take("lokr_w2", [b, d])?)
                } else {
                    Factor::Product(take("lokr_w2_a", [b, rank])?, take("lokr_w2_b", [rank, d])?)
                };
                parts.insert(
                    site,
                    Kron {
                        w1,
                        w2,
                        scaling: config.alpha / rank as f64,
                    },
                );
                if !projs.iter().any(|p| p == proj.name()) {
                    projs.push(proj.name().to_string());
                }
            }
        }
        if parts.is_empty() {
            return Err(r.files.config_error(
                "LOKR: no `*.lokr_w1` or `*.lokr_w1_a` of a projection this model has",
            ));
        }
        Ok(Self {
            config: LokrConfig {
                target_modules: Targets(projs),
                ..config
            },
            parts: DeltaSites::new(NAME, parts),
            params,
        })
    }
}

impl Intervention for Lokr {
    fn project(&self, site: Site, input: &Tensor, output: Tensor) -> candle_core::Result<Tensor> {
        self.parts.project(site, input, output)
    }
    fn weight_delta(&self, site: Site, _input: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.parts.weight_delta(site)
    }
}

impl Method for Lokr {
    fn name(&self) -> &'static str {
        NAME
    }
    fn params(&self) -> &TrainableParams {
        &self.params
    }
    fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        self.parts.merge_into(model)
    }
    fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        self.parts.unmerge_from(model)
    }
    fn peft_state(
        &self,
        model: &ModelConfig,
        _task: peftbench_backbone::HfTask,
    ) -> Result<Option<PeftState>> {
        if fused_qkv(model) {
            return Err(invalid(
                NAME,
                "PEFT's format for LoKr on GPT-2's fused c_attn is not written here",
            ));
        }
        let mut tensors = Vec::new();
        let mut targets: Vec<serde_json::Value> = Vec::new();
        for (site, k) in &self.parts.sites {
            let path = module_path(model, *site);
            let mut put = |n: &str, t: &Tensor| {
                tensors.push((PeftKey::Module(format!("{path}.{n}")), t.detach()));
            };
            match &k.w1 {
                Factor::Whole(w) => put("lokr_w1", w),
                Factor::Product(a, b) => {
                    put("lokr_w1_a", a);
                    put("lokr_w1_b", b);
                }
            }
            match &k.w2 {
                Factor::Whole(w) => put("lokr_w2", w),
                Factor::Product(a, b) => {
                    put("lokr_w2_a", a);
                    put("lokr_w2_b", b);
                }
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
        config.insert("decompose_both".into(), self.config.decompose_both.into());
        config.insert(
            "decompose_factor".into(),
            self.config.decompose_factor.into(),
        );
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

impl crate::MethodSpec for LokrConfig {
    fn name(&self) -> &'static str {
        NAME
    }
    fn formula(&self) -> &'static str {
        "Σ_targets |W1| + |W2| (whole: a·c; decomposed: r·(a + c))"
    }
    fn validate(&self, model: &ModelConfig) -> Result<()> {
        LokrConfig::validate(self, model)
    }
    fn num_trainable(&self, model: &Transformer) -> Result<usize> {
        LokrConfig::num_trainable(self, &model.config)
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
        Ok(Box::new(Lokr::attach(self, ctx)?))
    }
}

#[cfg(test)]
mod tests {
    use super::{factorization, kron, Factor, Kron};
    use crate::test_util::{close, max_abs};
    use candle_core::{Device, Var};
    use peftbench_backbone::kernels::{with_kernels, Kernels};
    use peftbench_backbone::Initializer;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// The structured product gives x·ΔWᵀ, and the same gradients for x and every factor.
        #[test]
        fn structured_product_matches_the_dense_delta(
            // b and d past 16 and 32 reach every column tile of the fused kernel.
            (a, b, c, d) in (1usize..7, 1usize..40, 1usize..7, 1usize..40),
            lead in prop::collection::vec(1usize..5, 1..3),
            decomposed in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let dev = Device::Cpu;
            let mut init = Initializer::new(seed);
            let mut var = |shape: &[usize]| Var::from_tensor(&init.normal(shape, 1.0, &dev).unwrap()).unwrap();
            let w1 = var(&[a, c]);
            let w2 = if decomposed { vec![var(&[b, 2]), var(&[2, d])] } else { vec![var(&[b, d])] };
            let mut xs = lead.clone();
            xs.push(c * d);
            let x = var(&xs);
            let mut ys = lead.clone();
            ys.push(a * b);
            let g = var(&ys).as_tensor().detach();
            let k = Kron {
                w1: Factor::Whole(w1.as_tensor().clone()),
                w2: match w2.as_slice() {
                    [w] => Factor::Whole(w.as_tensor().clone()),
                    [p, q] => Factor::Product(p.as_tensor().clone(), q.as_tensor().clone()),
                    _ => unreachable!(),
                },
                scaling: 0.75,
            };
            let delta = kron(&w1.as_tensor().clone(), &k.w2.value().unwrap()).unwrap();
            let dense = x.as_tensor().broadcast_matmul(&(delta * 0.75).unwrap().t().unwrap()).unwrap();
            let gd = (&dense * &g).unwrap().sum_all().unwrap().backward().unwrap();
            // The fused CPU op and the composition of candle ops other devices run.
            for kernels in [Kernels::Fused, Kernels::Composite] {
                let structured = with_kernels(kernels, || k.product(&x)).unwrap();
                prop_assert!(close(&structured, &dense, 2e-5), "{:?}: value", kernels);
                let gs = (structured * &g).unwrap().sum_all().unwrap().backward().unwrap();
                for v in std::iter::once(&x).chain([&w1]).chain(w2.iter()) {
                    let (s, d) = (gs.get(v).unwrap(), gd.get(v).unwrap());
                    prop_assert!(close(s, d, 2e-5), "{:?}: gradient differs by {}", kernels, max_abs(s, d));
                }
            }
        }
    }

    /// PEFT's docstring examples.
    #[test]
    fn factorization_matches_peft() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(40, 8), (5, 8));
    }
}
