//! Hugging Face PEFT's on-disk adapter format: `adapter_config.json` beside
//! `adapter_model.safetensors`, with PEFT's field and tensor names, so an adapter trained here
//! loads in PEFT (and vLLM, llama.cpp's converter) and one trained there loads here.
//!
//! Each method says what it keeps ([`PeftState`], from [`crate::Method::peft_state`]); this
//! module names the tensors as PEFT does for the model's family and task class, adds the task
//! head (`modules_to_save`), writes and reads the files, and refuses a wrong base, an unknown
//! `peft_type`, missing or extra tensors, naming the key.

use crate::error::{MethodError, Result};
use crate::Method;
use candle_core::{DType, Device, Tensor};
use peftbench_backbone::hf_names::{
    base_prefix, fused_qkv, head_module, module_path, target_name, HfTask,
};
use peftbench_backbone::{Family, ModelConfig, Proj, Site, Transformer};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The config file's name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file's name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Where a tensor of a method's state lives in PEFT's key space.
#[derive(Debug, Clone, PartialEq)]
pub enum PeftKey {
    /// Inside the backbone: `encoder.layer.0.attention.self.query.lora_A.weight`, written as
    /// `base_model.model.<backbone prefix><this>`.
    Module(String),
    /// At the top level of the file (`prompt_embeddings`).
    Top(String),
}

/// What a method keeps, in PEFT's terms.
#[derive(Debug, Clone)]
pub struct PeftState {
    /// PEFT's `peft_type` (`LORA`, `ADALORA`, `PROMPT_TUNING`, …) or this project's own type
    /// for methods PEFT lacks.
    pub peft_type: String,
    /// The method's own fields of `adapter_config.json`, with PEFT's names.
    pub config: Map<String, Value>,
    /// Its tensors.
    pub tensors: Vec<(PeftKey, Tensor)>,
}

impl PeftState {
    /// Whether PEFT names this method's keys like a prompt-learning method (no `.model`).
    fn is_prompt_learning(&self) -> bool {
        matches!(
            self.peft_type.as_str(),
            "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING"
        )
    }
}

/// A trained task head to save with the adapter (`modules_to_save`).
pub struct HeadWeights {
    /// `[outputs, hidden]`.
    pub weight: Tensor,
    /// `[outputs]`, when the head has one.
    pub bias: Option<Tensor>,
    /// How it summarises a sequence, where that is not what transformers' task model does
    /// (the pooled first token for encoders, the last token for decoders): kept in the config
    /// as `peftbench_head_pooling`, which PEFT ignores with a warning.
    pub pooling: Option<peftbench_backbone::Pooling>,
}

/// transformers' pooling for a sequence head on this family.
pub fn hf_pooling(model: &ModelConfig) -> peftbench_backbone::Pooling {
    match model.is_causal() {
        true => peftbench_backbone::Pooling::LastToken,
        false => peftbench_backbone::Pooling::First,
    }
}

/// The config field holding a head's pooling when it is not transformers'.
const POOLING_FIELD: &str = "peftbench_head_pooling";

/// An adapter directory read from disk.
pub struct PeftFiles {
    dir: PathBuf,
    /// `adapter_config.json`.
    pub config: Map<String, Value>,
    tensors: HashMap<String, Tensor>,
}

fn format_error(path: PathBuf, message: impl Into<String>) -> MethodError {
    MethodError::PeftFormat {
        path,
        message: message.into(),
    }
}

impl PeftFiles {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| format_error(cfg_path.clone(), e.to_string()))?;
        let config = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => return Err(format_error(cfg_path, "not a JSON object")),
            Err(e) => return Err(format_error(cfg_path, format!("line {}: {e}", e.line()))),
        };
        let st = dir.join(WEIGHTS_FILE);
        if !st.exists() {
            return Err(format_error(st, "file not found"));
        }
        let tensors = candle_core::safetensors::load(&st, &Device::Cpu)
            .map_err(|e| format_error(st.clone(), format!("not a readable safetensors file: {e}")))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tensors,
        })
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// The names of the tensors not yet taken.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// A config field, or an error naming it.
    pub fn field(&self, key: &str) -> Result<&Value> {
        self.config
            .get(key)
            .filter(|v| !v.is_null())
            .ok_or_else(|| format_error(self.config_path(), format!("missing field `{key}`")))
    }

    /// A whole-number field.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.field(key)?
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| {
                format_error(
                    self.config_path(),
                    format!("field `{key}` is not a whole number"),
                )
            })
    }

    /// A number field.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.field(key)?.as_f64().ok_or_else(|| {
            format_error(self.config_path(), format!("field `{key}` is not a number"))
        })
    }

    /// A field read as `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        serde_json::from_value(self.field(key)?.clone())
            .map_err(|e| self.config_error(format!("field `{key}`: {e}")))
    }

    /// A boolean field, false when absent.
    pub fn flag(&self, key: &str) -> bool {
        self.config
            .get(key)
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// A config error naming the file.
    pub fn config_error(&self, message: impl Into<String>) -> MethodError {
        format_error(self.config_path(), message)
    }

    /// Whether a tensor exists.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The shape of a tensor, if present.
    pub fn dims(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|t| t.dims().to_vec())
    }

    /// Takes a tensor, checking its shape where one is given.
    pub fn take(&mut self, key: &str, shape: Option<&[usize]>) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(key)
            .ok_or_else(|| format_error(self.weights_path(), format!("missing tensor `{key}`")))?;
        if let Some(shape) = shape {
            if t.dims() != shape {
                return Err(format_error(
                    self.weights_path(),
                    format!(
                        "tensor `{key}` has shape {:?}, this base model needs {shape:?}: was the adapter trained on another base?",
                        t.dims()
                    ),
                ));
            }
        }
        Ok(t)
    }

    /// Fails when tensors were left unread: a partial load would silently drop them.
    fn ensure_all_used(&self) -> Result<()> {
        let mut left: Vec<&String> = self.tensors.keys().collect();
        if left.is_empty() {
            return Ok(());
        }
        left.sort();
        Err(format_error(
            self.weights_path(),
            format!(
                "{} tensors this adapter type does not use, e.g. `{}`",
                left.len(),
                left[0]
            ),
        ))
    }
}

/// The file key of a state tensor.
fn file_key(key: &PeftKey, prompt_learning: bool, backbone: &str) -> String {
    match key {
        PeftKey::Top(k) => k.clone(),
        PeftKey::Module(k) if prompt_learning => format!("base_model.{backbone}{k}"),
        PeftKey::Module(k) => format!("base_model.model.{backbone}{k}"),
    }
}

/// The file key of the head's tensor (`weight` or `bias`): PEFT saves `modules_to_save`
/// without its wrapper's name.
fn head_key(model: &ModelConfig, prompt_learning: bool, tensor: &str) -> String {
    let head = head_module(model);
    if prompt_learning {
        format!("base_model.{head}.{tensor}")
    } else {
        format!("base_model.model.{head}.{tensor}")
    }
}

/// Writes `state` (and the head, for a sequence task) into `dir` as PEFT does.
pub fn write(
    dir: &Path,
    state: &PeftState,
    model: &ModelConfig,
    task: HfTask,
    base_model_name_or_path: &str,
    head: Option<&HeadWeights>,
) -> Result<()> {
    let io = |path: PathBuf| move |e: std::io::Error| format_error(path.clone(), e.to_string());
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let prompt = state.is_prompt_learning();
    let backbone = base_prefix(model, task);
    let mut tensors: HashMap<String, Tensor> = state
        .tensors
        .iter()
        .map(|(k, t)| (file_key(k, prompt, &backbone), t.clone()))
        .collect();
    let mut config = Map::new();
    config.insert("peft_type".into(), state.peft_type.clone().into());
    config.insert("task_type".into(), task.peft_name().into());
    config.insert(
        "base_model_name_or_path".into(),
        base_model_name_or_path.into(),
    );
    config.insert("inference_mode".into(), true.into());
    config.insert("peft_version".into(), "0.21.2".into());
    for (k, v) in &state.config {
        config.insert(k.clone(), v.clone());
    }
    match head {
        Some(h) => {
            if task != HfTask::SeqCls {
                return Err(format_error(
                    dir.join(CONFIG_FILE),
                    "a task head is saved only with task_type SEQ_CLS",
                ));
            }
            if model.family != Family::Bert && h.bias.is_some() {
                return Err(format_error(
                    dir.join(CONFIG_FILE),
                    format!(
                        "{}ForSequenceClassification's `score` has no bias, but this head has one",
                        model.model_type
                    ),
                ));
            }
            tensors.insert(head_key(model, prompt, "weight"), h.weight.clone());
            if let Some(b) = &h.bias {
                tensors.insert(head_key(model, prompt, "bias"), b.clone());
            }
            config.insert(
                "modules_to_save".into(),
                Value::Array(vec![head_module(model).into()]),
            );
            if let Some(p) = h.pooling.filter(|p| *p != hf_pooling(model)) {
                config.insert(
                    POOLING_FIELD.into(),
                    serde_json::to_value(p).expect("pooling serialises"),
                );
            }
        }
        None => {
            config.insert("modules_to_save".into(), Value::Null);
        }
    }
    let text = serde_json::to_string_pretty(&Value::Object(config)).expect("JSON serialises");
    let cfg_path = dir.join(CONFIG_FILE);
    std::fs::write(&cfg_path, text + "\n").map_err(io(cfg_path.clone()))?;
    candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
    Ok(())
}

/// What [`read`] loaded.
pub struct LoadedAdapter {
    /// The method, attached to nothing: it acts through the intervention points.
    pub method: Box<dyn Method>,
    /// The task head from `modules_to_save`, if the adapter has one.
    pub head: Option<HeadWeights>,
    /// PEFT's `task_type`.
    pub task: HfTask,
    /// PEFT's `peft_type`.
    pub peft_type: String,
}

/// Tensor access for a method reading its state: keys are given as in [`PeftState`].
pub struct PeftReader<'a> {
    /// The files.
    pub files: &'a mut PeftFiles,
    prompt_learning: bool,
    backbone: String,
}

impl PeftReader<'_> {
    /// Whether a state tensor exists.
    pub fn contains(&self, key: &PeftKey) -> bool {
        self.files
            .contains(&file_key(key, self.prompt_learning, &self.backbone))
    }

    /// The shape of a state tensor, if present.
    pub fn dims(&self, key: &PeftKey) -> Option<Vec<usize>> {
        self.files
            .dims(&file_key(key, self.prompt_learning, &self.backbone))
    }

    /// Takes a state tensor, checking its shape where one is given.
    pub fn take(&mut self, key: &PeftKey, shape: Option<&[usize]>) -> Result<Tensor> {
        let k = file_key(key, self.prompt_learning, &self.backbone);
        self.files.take(&k, shape)
    }
}

/// Reads a PEFT adapter directory for `model`.
pub fn read(dir: &Path, model: &Transformer) -> Result<LoadedAdapter> {
    let mut files = PeftFiles::read(dir)?;
    let peft_type = files
        .field("peft_type")?
        .as_str()
        .ok_or_else(|| files.config_error("field `peft_type` is not a string"))?
        .to_string();
    let task_name = files
        .config
        .get("task_type")
        .and_then(Value::as_str)
        .map(str::to_string);
    let task = HfTask::from_peft_name(task_name.as_deref()).ok_or_else(|| {
        files.config_error(format!(
            "task_type `{}` is not one this project reads (SEQ_CLS, CAUSAL_LM, FEATURE_EXTRACTION)",
            task_name.unwrap_or_default()
        ))
    })?;
    let prompt_learning = matches!(
        peft_type.as_str(),
        "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING"
    );
    let cfg = &model.config;
    let mut reader = PeftReader {
        files: &mut files,
        prompt_learning,
        backbone: base_prefix(cfg, task),
    };
    let method: Box<dyn Method> = match peft_type.as_str() {
        "LORA" if reader.files.flag("use_dora") => {
            Box::new(crate::dora::Dora::from_peft(&mut reader, model)?)
        }
        "LORA" => Box::new(crate::lora::Lora::from_peft(&mut reader, cfg)?),
        "ADALORA" => Box::new(crate::adalora::AdaLora::from_peft(&mut reader, cfg)?),
        // PEFT saves P-Tuning's encoder output: at inference it is a plain soft prompt.
        "PROMPT_TUNING" | "P_TUNING" => Box::new(crate::prompt_tuning::PromptTuning::from_peft(
            &mut reader,
            cfg,
        )?),
        // Prefix tuning and P-Tuning v2 both save the computed key/value table.
        "PREFIX_TUNING" => Box::new(crate::prefix_tuning::PrefixTable::from_peft(
            &mut reader,
            cfg,
        )?),
        crate::bitfit::PEFT_TYPE => Box::new(crate::bitfit::BitFit::from_peft(&mut reader, model)?),
        crate::lokr::PEFT_TYPE => Box::new(crate::lokr::Lokr::from_peft(&mut reader, cfg)?),
        crate::loha::PEFT_TYPE => Box::new(crate::loha::Loha::from_peft(&mut reader, cfg)?),
        crate::vera::PEFT_TYPE => Box::new(crate::vera::Vera::from_peft(&mut reader, cfg)?),
        crate::ia3::PEFT_TYPE => Box::new(crate::ia3::Ia3::from_peft(&mut reader, cfg)?),
        crate::ln_tuning::PEFT_TYPE => Box::new(crate::ln_tuning::LnTuning::from_peft(&mut reader, cfg)?),
        crate::adapter::PEFT_TYPE => Box::new(crate::adapter::Adapter::from_peft(&mut reader, cfg)?),
        crate::head_only::PEFT_TYPE => Box::new(crate::head_only::HeadOnly::default()),
        other => {
            return Err(files.config_error(format!(
                "peft_type `{other}` is not one this project reads (LORA, ADALORA, PROMPT_TUNING, P_TUNING, PREFIX_TUNING, VERA, LOHA, LOKR, IA3, LN_TUNING, {}, {}, {})",
                crate::adapter::PEFT_TYPE,
                crate::bitfit::PEFT_TYPE,
                crate::head_only::PEFT_TYPE
            )))
        }
    };
    let head = read_head(&mut files, cfg, prompt_learning)?;
    files.ensure_all_used()?;
    Ok(LoadedAdapter {
        method,
        head,
        task,
        peft_type,
    })
}

fn read_head(
    files: &mut PeftFiles,
    cfg: &ModelConfig,
    prompt_learning: bool,
) -> Result<Option<HeadWeights>> {
    let w = head_key(cfg, prompt_learning, "weight");
    if !files.contains(&w) {
        return Ok(None);
    }
    let dims = files.dims(&w).unwrap_or_default();
    if dims.len() != 2 || dims[1] != cfg.hidden_size {
        return Err(format_error(
            files.weights_path(),
            format!(
                "head `{w}` has shape {dims:?}, expected [labels, {}]",
                cfg.hidden_size
            ),
        ));
    }
    let weight = files.take(&w, None)?;
    let b = head_key(cfg, prompt_learning, "bias");
    let bias = if files.contains(&b) {
        Some(files.take(&b, Some(&[dims[0]]))?)
    } else {
        None
    };
    let pooling = match files.config.get(POOLING_FIELD) {
        Some(_) => Some(files.parse(POOLING_FIELD)?),
        None => Some(hf_pooling(cfg)),
    };
    Ok(Some(HeadWeights {
        weight,
        bias,
        pooling,
    }))
}

/// One adapted projection's LoRA factors: `(site, A [r, in], B [out, r], scaling)`.
pub type LoraFactors = (Site, Tensor, Tensor, f64);

/// LoRA's scaling for rank `r` and `alpha` (rsLoRA: α/√r).
fn lora_scaling(r: usize, alpha: f64, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// The α that gives `scaling` at rank `r`.
fn alpha_for(scaling: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        scaling * (r as f64).sqrt()
    } else {
        scaling * r as f64
    }
}

/// Projections whose leaf name is shared by another module of the family (BERT's `dense`,
/// GPT-2's `c_proj`): `target_modules` then lists full module paths.
fn ambiguous_leaf(model: &ModelConfig, proj: Proj) -> bool {
    match model.family {
        Family::Bert => matches!(proj, Proj::AttnOut | Proj::Up | Proj::Down),
        Family::Gpt2 => matches!(proj, Proj::AttnOut | Proj::Down),
        Family::Llama => false,
    }
}

/// Row offset and height of a projection's output inside GPT-2's fused `c_attn`.
fn fused_rows(model: &ModelConfig, proj: Proj) -> (usize, usize) {
    let h = model.hidden_size;
    let kv = model.num_kv_heads * model.head_dim();
    match proj {
        Proj::Query => (0, h),
        Proj::Key => (h, kv),
        _ => (h + kv, kv),
    }
}

/// PEFT's state of a LoRA-family adapter from per-site factors `(site, A [r, in], B [out, r],
/// scaling)`. GPT-2's query, key and value LoRAs of a layer become one LoRA on the fused
/// `c_attn`: A stacked, B block-diagonal, each block's own scaling folded into it, so PEFT's
/// single module computes exactly the three updates.
pub fn lora_state(
    peft_type: &str,
    model: &ModelConfig,
    pairs: &[LoraFactors],
    rank: usize,
    alpha: f64,
    rslora: bool,
    mut config: Map<String, Value>,
) -> Result<PeftState> {
    // Group sites by the module PEFT sees.
    let mut modules: Vec<(String, Vec<&LoraFactors>)> = Vec::new();
    for p in pairs {
        let path = module_path(model, p.0);
        match modules.iter_mut().find(|(m, _)| *m == path) {
            Some((_, v)) => v.push(p),
            None => modules.push((path, vec![p])),
        }
    }
    let mut tensors = Vec::new();
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    let mut leaves: Vec<String> = Vec::new();
    let mut full_paths = false;
    for (path, sites) in &modules {
        let fused =
            fused_qkv(model) && matches!(sites[0].0.proj, Proj::Query | Proj::Key | Proj::Value);
        let (a, b, scaling, r) = if !fused {
            let (_, a, b, s) = sites[0];
            (a.clone(), b.clone(), *s, a.dims()[0])
        } else {
            let s_f = sites[0].3;
            let r: usize = sites.iter().map(|p| p.1.dims()[0]).sum();
            let a = Tensor::cat(&sites.iter().map(|p| p.1.clone()).collect::<Vec<_>>(), 0)?;
            let (h, kv) = (model.hidden_size, model.num_kv_heads * model.head_dim());
            let mut b = Tensor::zeros((h + 2 * kv, r), DType::F32, a.device())?;
            let mut col = 0;
            for (site, _, bj, sj) in sites.iter().map(|p| (&p.0, &p.1, &p.2, p.3)) {
                let (row, height) = fused_rows(model, site.proj);
                let rj = bj.dims()[1];
                let block = (bj * (sj / s_f))?;
                b = b.slice_assign(&[row..row + height, col..col + rj], &block)?;
                col += rj;
            }
            (a, b, s_f, r)
        };
        tensors.push((
            PeftKey::Module(format!("{path}.lora_A.weight")),
            a.contiguous()?,
        ));
        tensors.push((
            PeftKey::Module(format!("{path}.lora_B.weight")),
            b.contiguous()?,
        ));
        let module_alpha = alpha_for(scaling, r, rslora);
        if r != rank {
            rank_pattern.insert(path.clone(), r.into());
        }
        if (module_alpha - alpha).abs() > 1e-9 * alpha.abs().max(1.0) {
            alpha_pattern.insert(path.clone(), module_alpha.into());
        }
        let proj = sites[0].0.proj;
        full_paths |= ambiguous_leaf(model, proj);
        let leaf = target_name(model, proj).to_string();
        if !leaves.contains(&leaf) {
            leaves.push(leaf);
        }
    }
    // Ambiguous leaves would also adapt modules that were never trained: name paths instead.
    let targets: Vec<Value> = if full_paths {
        modules.iter().map(|(p, _)| p.clone().into()).collect()
    } else {
        leaves.into_iter().map(Value::from).collect()
    };
    config.insert("r".into(), rank.into());
    config.insert("lora_alpha".into(), alpha.into());
    config.insert("use_rslora".into(), rslora.into());
    config.insert("target_modules".into(), Value::Array(targets));
    config.insert("fan_in_fan_out".into(), fused_qkv(model).into());
    config.insert("rank_pattern".into(), Value::Object(rank_pattern));
    config.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
    Ok(PeftState {
        peft_type: peft_type.into(),
        config,
        tensors,
    })
}

/// The value of a `rank_pattern` / `alpha_pattern` entry matching module `name` (PEFT matches
/// a key as the name's dotted suffix).
fn pattern_value<'a>(pattern: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    pattern?
        .as_object()?
        .iter()
        .find_map(|(k, v)| (name == k || name.ends_with(&format!(".{k}"))).then_some(v))
}

/// Reads every LoRA-style factor pair of the model's projections: `(site, A, B, scaling)`.
/// A fused GPT-2 `c_attn` pair is split back into query, key and value (each with the shared
/// A and its rows of B).
pub fn read_lora_pairs(
    r: &mut PeftReader,
    model: &ModelConfig,
    config: &crate::lora::LoraConfig,
    a_suffix: &str,
    b_suffix: &str,
) -> Result<Vec<LoraFactors>> {
    let rank_pattern = r.files.config.get("rank_pattern").cloned();
    let alpha_pattern = r.files.config.get("alpha_pattern").cloned();
    let mut out = Vec::new();
    for layer in 0..model.num_layers {
        let mut seen: Vec<String> = Vec::new();
        for proj in Proj::ALL {
            let site = Site { layer, proj };
            let path = module_path(model, site);
            if seen.contains(&path) {
                continue;
            }
            seen.push(path.clone());
            let a_key = PeftKey::Module(format!("{path}.{a_suffix}"));
            if !r.contains(&a_key) {
                continue;
            }
            let fused = fused_qkv(model) && matches!(proj, Proj::Query | Proj::Key | Proj::Value);
            let (inp, out_dim) = if fused {
                let (_, h) = fused_rows(model, Proj::Value);
                (model.hidden_size, fused_rows(model, Proj::Value).0 + h)
            } else {
                crate::site_shape(model, proj)
            };
            let rank = r.dims(&a_key).map_or(0, |d| d[0]);
            let a = r.take(&a_key, Some(&[rank, inp]))?;
            let b = r.take(
                &PeftKey::Module(format!("{path}.{b_suffix}")),
                Some(&[out_dim, rank]),
            )?;
            let name = format!("{}{path}", r.backbone);
            let want = pattern_value(rank_pattern.as_ref(), &name)
                .and_then(Value::as_u64)
                .map_or(config.rank, |v| v as usize);
            if want != rank {
                return Err(r.files.config_error(format!(
                    "`{name}` has rank {rank} in the weights but {want} in the config (r / rank_pattern)"
                )));
            }
            let alpha = pattern_value(alpha_pattern.as_ref(), &name)
                .and_then(Value::as_f64)
                .unwrap_or(config.lora_alpha);
            let scaling = lora_scaling(rank, alpha, config.use_rslora);
            if fused {
                for p in [Proj::Query, Proj::Key, Proj::Value] {
                    let (row, height) = fused_rows(model, p);
                    out.push((
                        Site { layer, proj: p },
                        a.clone(),
                        b.narrow(0, row, height)?.contiguous()?,
                        scaling,
                    ));
                }
            } else {
                out.push((site, a, b, scaling));
            }
        }
    }
    if out.is_empty() {
        return Err(r.files.config_error(format!(
            "no `*.{a_suffix}` tensor names a projection of this {} model",
            model.model_type
        )));
    }
    Ok(out)
}

/// The fields PEFT's prompt-learning configs share.
pub fn prompt_config(model: &ModelConfig, num_virtual_tokens: usize) -> Map<String, Value> {
    let mut c = Map::new();
    c.insert("num_virtual_tokens".into(), num_virtual_tokens.into());
    c.insert("token_dim".into(), model.hidden_size.into());
    c.insert("num_transformer_submodules".into(), 1.into());
    c.insert("num_attention_heads".into(), model.num_heads.into());
    c.insert("num_layers".into(), model.num_layers.into());
    c
}

/// Reads `prompt_embeddings` `[num_virtual_tokens, width]`, checking the config against it.
pub fn read_prompt_embeddings(r: &mut PeftReader, width: usize) -> Result<Tensor> {
    let p = r.files.usize("num_virtual_tokens")?;
    let subs = r
        .files
        .config
        .get("num_transformer_submodules")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    if subs != 1 {
        return Err(r.files.config_error(format!(
            "num_transformer_submodules is {subs}: encoder-decoder prompts are not implemented here"
        )));
    }
    r.take(&PeftKey::Top("prompt_embeddings".into()), Some(&[p, width]))
}
