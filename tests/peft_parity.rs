//! Parity with Hugging Face PEFT, from committed fixtures (scripts/peft-fixtures.py): each
//! adapter PEFT trained and saved loads here and gives PEFT's logits; what this project writes
//! reads back bit for bit; a wrong base, an unknown type, missing or extra tensors are errors
//! naming the key.

mod common;

use candle_core::{Device, Tensor};
use peftbench_backbone::{
    lm_logits, load_model_dir, HeadKind, HfTask, Inputs, Linear, Pooling, SequenceHead, Transformer,
};
use peftbench_methods::peft::{self, HeadWeights, LoadedAdapter};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft")
}

fn inputs(case: &Path) -> Inputs {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("inputs.json")).unwrap()).unwrap();
    let rows = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(v[k].clone()).unwrap() };
    let t = |r: Vec<Vec<u32>>| {
        let (b, s) = (r.len(), r[0].len());
        Tensor::from_vec(r.concat(), (b, s), &Device::Cpu).unwrap()
    };
    Inputs {
        input_ids: t(rows("input_ids")),
        attention_mask: t(rows("attention_mask")),
        token_type_ids: None,
        packing: None,
    }
}

fn expected(case: &Path) -> Tensor {
    candle_core::safetensors::load(case.join("expected.safetensors"), &Device::Cpu).unwrap()
        ["logits"]
        .clone()
}

/// The adapter's logits on the fixture's inputs: a sequence head for SEQ_CLS, LM logits at
/// real (unpadded) positions otherwise.
fn logits(model: &Transformer, a: &LoadedAdapter, x: &Inputs) -> Tensor {
    let enc = model.forward(x, a.method.as_ref()).unwrap();
    match (&a.task, &a.head) {
        (HfTask::SeqCls, Some(h)) => head(h).forward(model, &enc).unwrap(),
        (HfTask::CausalLm, None) => {
            let l = lm_logits(model, &enc).unwrap();
            let mask = x.attention_mask.to_dtype(candle_core::DType::F32).unwrap();
            l.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap()
        }
        other => panic!("unexpected task/head {:?}", other.0),
    }
}

fn head(h: &HeadWeights) -> SequenceHead {
    SequenceHead {
        kind: HeadKind::Classifier {
            num_labels: h.weight.dims()[0],
        },
        pooling: h.pooling.unwrap_or(Pooling::First),
        out: Linear::new(h.weight.clone(), h.bias.clone()),
    }
}

fn masked(case: &Path, l: Tensor, x: &Inputs) -> Tensor {
    if l.rank() == 3 {
        let mask = x.attention_mask.to_dtype(candle_core::DType::F32).unwrap();
        return l.broadcast_mul(&mask.unsqueeze(2).unwrap()).unwrap();
    }
    let _ = case;
    l
}

fn base_for(case: &str) -> Option<Transformer> {
    if case.starts_with("minilm") {
        let dir = common::minilm_dir()?;
        Some(load_model_dir(&dir, &Device::Cpu).unwrap())
    } else {
        let name = if case.starts_with("tiny-gpt2") {
            "tiny-gpt2"
        } else {
            "tiny-llama"
        };
        Some(load_model_dir(&fixtures().join(name), &Device::Cpu).unwrap())
    }
}

const CASES: [&str; 22] = [
    "minilm-lora",
    "minilm-rslora",
    "minilm-adalora",
    "minilm-prefix",
    "minilm-prefix-noproj",
    "minilm-prompt",
    "minilm-ptuning-mlp",
    "minilm-ptuning-lstm",
    "tiny-gpt2-lora",
    "tiny-llama-lora",
    "minilm-ln-tuning",
    "tiny-llama-ln-tuning",
    "minilm-ia3",
    "tiny-llama-ia3",
    "minilm-dora",
    "tiny-llama-dora",
    "minilm-vera",
    "tiny-llama-vera",
    "minilm-loha",
    "tiny-llama-loha",
    "minilm-lokr",
    "tiny-llama-lokr",
];

#[test]
fn peft_saved_adapters_give_peft_logits_within_1e_4() {
    let mut report = Vec::new();
    for name in CASES {
        let Some(model) = base_for(name) else { return };
        let case = fixtures().join(name);
        let a = peft::read(&case, &model).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = inputs(&case);
        let ours = logits(&model, &a, &x);
        let want = masked(&case, expected(&case), &x);
        let diff = common::max_abs_diff(&ours, &want);
        report.push(format!("{name} ({}): max abs {diff:.2e}", a.peft_type));
        assert!(
            diff <= 1e-4,
            "{name}: max abs logit difference {diff} > 1e-4"
        );
        // The adapter matters: without it the logits differ.
        let plain = model
            .forward(&x, &peftbench_backbone::NoIntervention)
            .unwrap();
        let base = match &a.head {
            Some(h) => head(h).forward(&model, &plain).unwrap(),
            None => masked(&case, lm_logits(&model, &plain).unwrap(), &x),
        };
        assert!(
            common::max_abs_diff(&base, &want) > 1e-3,
            "{name}: the adapter changes nothing, so the comparison proves nothing"
        );
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn an_adapter_written_here_reads_back_bit_for_bit() {
    for name in CASES {
        let Some(model) = base_for(name) else { return };
        let case = fixtures().join(name);
        let a = peft::read(&case, &model).unwrap();
        let state = a
            .method
            .peft_state(&model.config, a.task)
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: no PEFT state"));
        let tmp = tempfile::tempdir().unwrap();
        peft::write(
            tmp.path(),
            &state,
            &model.config,
            a.task,
            "base",
            a.head.as_ref(),
        )
        .unwrap();
        let b = peft::read(tmp.path(), &model).unwrap_or_else(|e| panic!("{name}: {e}"));
        let x = inputs(&case);
        let (la, lb) = (logits(&model, &a, &x), logits(&model, &b, &x));
        assert_eq!(
            la.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            lb.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
        // Same tensors under the same names as PEFT wrote them, except what PEFT keeps that
        // inference does not need (P-Tuning's encoder, AdaLoRA's pruned ranks are already out).
        let theirs =
            candle_core::safetensors::load(case.join(peft::WEIGHTS_FILE), &Device::Cpu).unwrap();
        let ours =
            candle_core::safetensors::load(tmp.path().join(peft::WEIGHTS_FILE), &Device::Cpu)
                .unwrap();
        let mut k1: Vec<&String> = theirs.keys().collect();
        let mut k2: Vec<&String> = ours.keys().collect();
        k1.sort();
        k2.sort();
        if !name.contains("gpt2") && !name.contains("adalora") {
            assert_eq!(k1, k2, "{name}: key names");
            for k in k1 {
                assert_eq!(
                    theirs[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    ours[k].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    "{name}: {k}"
                );
            }
        } else {
            assert_eq!(k1, k2, "{name}: key names");
        }
    }
}

#[test]
fn a_wrong_base_unknown_type_missing_or_extra_tensor_is_an_error_naming_it() {
    let llama = load_model_dir(&fixtures().join("tiny-llama"), &Device::Cpu).unwrap();
    let gpt2 = load_model_dir(&fixtures().join("tiny-gpt2"), &Device::Cpu).unwrap();
    let copy = |name: &str| {
        let tmp = tempfile::tempdir().unwrap();
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            std::fs::copy(fixtures().join(name).join(f), tmp.path().join(f)).unwrap();
        }
        tmp
    };
    let err = |dir: &Path, model: &Transformer| match peft::read(dir, model) {
        Ok(_) => panic!("accepted {}", dir.display()),
        Err(e) => e.to_string(),
    };
    // The Llama adapter on the GPT-2 base: no projection of GPT-2 has its names.
    let e = err(&fixtures().join("tiny-llama-lora"), &gpt2);
    assert!(
        e.contains("adapter_model.safetensors") || e.contains("adapter_config.json"),
        "{e}"
    );
    assert!(e.contains("lora_A") || e.contains("q_proj"), "{e}");

    // A base of another width: the shape error names the tensor.
    let mut wide_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tiny-llama/config.json")).unwrap(),
    )
    .unwrap();
    wide_cfg["hidden_size"] = 48.into();
    let cfg = peftbench_backbone::ModelConfig::from_json(&wide_cfg, Path::new("wide/config.json"))
        .unwrap();
    let wide = Transformer::random(cfg, 1, &Device::Cpu).unwrap();
    let e = err(&fixtures().join("tiny-llama-lora"), &wide);
    assert!(
        e.contains("q_proj.lora_A.weight") && e.contains("another base"),
        "{e}"
    );

    // Unknown peft_type.
    let d = copy("tiny-llama-lora");
    let cfg_path = d.path().join(peft::CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(&cfg_path, text.replace("\"LORA\"", "\"BOFT\"")).unwrap();
    let e = err(d.path(), &llama);
    assert!(
        e.contains("peft_type `BOFT`") && e.contains("adapter_config.json"),
        "{e}"
    );

    // A missing tensor (one B of a pair) and an extra one.
    let d = copy("tiny-llama-lora");
    let st = d.path().join(peft::WEIGHTS_FILE);
    let mut t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let b = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
    assert!(t.remove(b).is_some());
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = err(d.path(), &llama);
    assert!(e.contains(&format!("missing tensor `{b}`")), "{e}");
    let d = copy("tiny-llama-lora");
    let st = d.path().join(peft::WEIGHTS_FILE);
    let mut t = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let extra = "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector";
    t.insert(
        extra.into(),
        Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &st).unwrap();
    let e = err(d.path(), &llama);
    assert!(e.contains(extra) && e.contains("does not use"), "{e}");

    // A malformed config names the file and line.
    let d = copy("tiny-llama-lora");
    std::fs::write(d.path().join(peft::CONFIG_FILE), "{\n  \"peft_type\": \n").unwrap();
    let e = err(d.path(), &llama);
    assert!(e.contains("adapter_config.json: line"), "{e}");
}

/// Every run writes its method and head in PEFT's format; reloaded from that directory alone,
/// they re-score the dev set exactly as the run's final evaluation did.
#[test]
fn a_runs_saved_adapter_reloads_and_reproduces_its_final_dev_metrics() {
    use peftbench_harness::objective::{evaluate, EvalBatches, Scorer};
    use peftbench_harness::{run_grid, Shard, Suite};
    let suite_text = r#"
name = "saved"
model = "synthetic"
seeds = [0]
budgets = ["3%"]
max_budget_deviation = 0.6
[train]
steps = 8
batch_size = 8
eval_every = 0
eval_batch_size = 32
[methods.lora]
lr = 1e-2
[methods.adalora]
lr = 1e-2
[methods.adapter]
lr = 1e-2
[methods.prefix_tuning]
lr = 1e-2
num_virtual_tokens = 4
[methods.prompt_tuning]
lr = 1e-2
[methods.p_tuning]
lr = 1e-2
num_virtual_tokens = 4
[methods.p_tuning_v2]
lr = 1e-2
[methods.ia3]
lr = 1e-2
[methods.ln_tuning]
lr = 1e-2
[methods.head_only]
lr = 1e-2
[[tasks]]
name = "polarity"
kind = "synthetic"
objective = "classification"
pooling = "mean"
[[tasks]]
name = "antonyms"
kind = "synthetic"
objective = "sft"
"#;
    let tmp = tempfile::tempdir().unwrap();
    let base = common::synthetic_base(tmp.path());
    let suite = Suite::parse(suite_text, "saved.toml").unwrap();
    let tasks = common::synthetic_tasks(&suite, &base);
    let results = tmp.path().join("results");
    run_grid(&suite, &base, &tasks, &results, Shard::ALL).unwrap();
    let runs = results.join("saved/runs");
    let records = peftbench_reports::load_records(&runs).unwrap();
    assert_eq!(records.len(), 20);
    for r in &records {
        assert_eq!(r.status, peftbench_reports::RunStatus::Ok, "{}", r.run_id);
        let path = runs.join(
            r.adapter_path
                .as_ref()
                .unwrap_or_else(|| panic!("{}: no adapter", r.run_id)),
        );
        assert!(
            path.join(peft::CONFIG_FILE).exists(),
            "{}: {}",
            r.run_id,
            path.display()
        );
        let size: u64 = [peft::CONFIG_FILE, peft::WEIGHTS_FILE]
            .iter()
            .map(|f| std::fs::metadata(path.join(f)).unwrap().len())
            .sum();
        assert_eq!(r.adapter_bytes, size, "{}", r.run_id);
        let a = peft::read(&path, &base.model).unwrap_or_else(|e| panic!("{}: {e}", r.run_id));
        let task = &tasks[&r.task];
        let head = a.head.as_ref().map(|h| SequenceHead {
            kind: task.objective.head_kind().unwrap(),
            pooling: h.pooling.unwrap(),
            out: Linear::new(h.weight.clone(), h.bias.clone()),
        });
        assert_eq!(head.is_some(), r.task == "polarity", "{}", r.run_id);
        if let Some(h) = &head {
            // Not transformers' pooling for a decoder: the config says so.
            assert_eq!(h.pooling, Pooling::Mean, "{}", r.run_id);
            let cfg = std::fs::read_to_string(path.join(peft::CONFIG_FILE)).unwrap();
            assert!(
                cfg.contains("\"peftbench_head_pooling\": \"mean\""),
                "{cfg}"
            );
        }
        let scorer = Scorer {
            model: &base.model,
            method: a.method.as_ref(),
            head: head.as_ref(),
        };
        let m = evaluate(
            &task.objective,
            &scorer,
            &task.dev,
            EvalBatches::padded(32, base.tokenizer.pad_id),
            &Device::Cpu,
        )
        .unwrap();
        for (k, v) in &r.metrics_final {
            let got = m[k];
            assert!(
                (got - v).abs() <= 1e-6 * v.abs().max(1.0),
                "{} {k}: recorded {v}, reloaded {got}",
                r.run_id
            );
        }
    }
}

/// `peftbench merge` writes a plain model directory whose logits (with the head it carries)
/// are the adapter's; a prompt adapter is refused.
#[test]
fn merge_writes_a_model_that_matches_the_unmerged_adapter() {
    for name in [
        "minilm-lora",
        "minilm-adalora",
        "tiny-llama-lora",
        "tiny-gpt2-lora",
        "minilm-ln-tuning",
        "tiny-llama-ln-tuning",
        "minilm-ia3",
        "tiny-llama-ia3",
        "minilm-dora",
        "tiny-llama-dora",
        "minilm-vera",
        "tiny-llama-vera",
        "minilm-loha",
        "tiny-llama-loha",
        "minilm-lokr",
        "tiny-llama-lokr",
    ] {
        let Some(model) = base_for(name) else { return };
        let base_dir = if name.starts_with("minilm") {
            common::minilm_dir().unwrap()
        } else {
            fixtures().join(if name.contains("gpt2") {
                "tiny-gpt2"
            } else {
                "tiny-llama"
            })
        };
        let case = fixtures().join(name);
        let out = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_peftbench"))
            .args([
                "merge",
                "--model",
                base_dir.to_str().unwrap(),
                "--adapter",
                case.to_str().unwrap(),
                "--out",
                out.path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let merged =
            load_model_dir(out.path(), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let a = peft::read(&case, &model).unwrap();
        let x = inputs(&case);
        let want = logits(&model, &a, &x);
        let enc = merged
            .forward(&x, &peftbench_backbone::NoIntervention)
            .unwrap();
        let got = match &a.head {
            Some(_) => {
                let t = candle_core::safetensors::load(
                    out.path().join("model.safetensors"),
                    &Device::Cpu,
                )
                .unwrap();
                let h = HeadWeights {
                    weight: t["classifier.weight"].clone(),
                    bias: t.get("classifier.bias").cloned(),
                    pooling: None,
                };
                head(&h).forward(&merged, &enc).unwrap()
            }
            None => masked(&case, lm_logits(&merged, &enc).unwrap(), &x),
        };
        let diff = common::max_abs_diff(&got, &want);
        assert!(diff <= 1e-5, "{name}: merged vs unmerged {diff}");
        if name.starts_with("minilm") {
            assert!(out.path().join("tokenizer.json").exists());
            let cfg = std::fs::read_to_string(out.path().join("config.json")).unwrap();
            assert!(cfg.contains("BertForSequenceClassification"), "{cfg}");
        }
    }
    let Some(_) = base_for("minilm-prompt") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_peftbench"))
        .args([
            "merge",
            "--model",
            "minilm",
            "--adapter",
            fixtures().join("minilm-prompt").to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("PROMPT_TUNING adapter does not fold"));
}

/// BitFit has no PEFT type: its offsets go under this project's own, on BERT and GPT-2 bases,
/// and read back to the same logits; a bias-free Llama base is refused with the reason.
#[test]
fn bitfit_written_here_reads_back_bit_for_bit() {
    use peftbench_methods::{AttachContext, BitFitConfig, MethodConfig};
    for name in ["minilm-lora", "tiny-gpt2-lora", "tiny-llama-lora"] {
        let Some(mut model) = base_for(name) else {
            return;
        };
        let cfg = MethodConfig::BitFit(BitFitConfig::default());
        let attached = cfg.attach(&mut AttachContext::new(&mut model, 3));
        if name.contains("llama") {
            let e = attached.err().expect("refused").to_string();
            assert!(e.contains("no bias terms"), "{e}");
            continue;
        }
        let method = attached.unwrap();
        let mut init = peftbench_backbone::Initializer::new(5);
        for (_, v) in method.params().entries() {
            v.set(&init.normal(v.shape(), 0.1, v.device()).unwrap())
                .unwrap();
        }
        let task = if name.starts_with("minilm") {
            HfTask::SeqCls
        } else {
            HfTask::CausalLm
        };
        let state = method.peft_state(&model.config, task).unwrap().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        peft::write(tmp.path(), &state, &model.config, task, "base", None).unwrap();
        let b = peft::read(tmp.path(), &model).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(b.peft_type, peftbench_methods::bitfit::PEFT_TYPE);
        let x = inputs(&fixtures().join(name));
        let hidden = |iv: &dyn peftbench_backbone::Intervention| {
            model
                .forward(&x, iv)
                .unwrap()
                .hidden
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (ours, read) = (hidden(method.as_ref()), hidden(b.method.as_ref()));
        assert_eq!(ours, read, "{name}");
        assert_ne!(
            ours,
            hidden(&peftbench_backbone::NoIntervention),
            "{name}: BitFit changed nothing"
        );
    }
}

/// PiSSA's and OLoRA's initial factors, computed here from all-MiniLM-L6-v2's weights, match
/// the ones PEFT 0.21.2 saved before any step: s·B·A within 1e-3 of the largest entry, and each
/// factor up to the sign of each rank component.
#[test]
fn pissa_and_olora_start_from_peft_s_factors_up_to_sign() {
    use peftbench_methods::{AttachContext, Lora, LoraConfig, LoraInit, Targets};
    for (name, init) in [
        ("minilm-pissa-init", LoraInit::Pissa),
        ("minilm-olora-init", LoraInit::Olora),
    ] {
        let Some(mut model) = base_for(name) else {
            return;
        };
        let cfg = LoraConfig {
            rank: 4,
            lora_alpha: 8.0,
            init,
            target_modules: Targets(vec!["query".into(), "value".into()]),
            ..Default::default()
        };
        let lora = Lora::attach(&cfg, &mut AttachContext::new(&mut model, 0)).unwrap();
        let theirs = candle_core::safetensors::load(
            fixtures().join(name).join(peft::WEIGHTS_FILE),
            &Device::Cpu,
        )
        .unwrap();
        let mut worst: f32 = 0.0;
        for (site, pair) in lora.pairs() {
            let path = peftbench_backbone::hf_names::module_path(&model.config, *site);
            let key = |f: &str| format!("base_model.model.bert.{path}.lora_{f}.weight");
            let (a, b) = (&theirs[&key("A")], &theirs[&key("B")]);
            let ours = pair.b.matmul(&pair.a).unwrap();
            let want = b.matmul(a).unwrap();
            let scale = common::largest(std::slice::from_ref(&want));
            let d = common::max_abs_diff(&ours, &want) / scale;
            worst = worst.max(d);
            // PEFT's float32 SVD is itself 1.2e-4 from a float64 one on layer 1's query, where
            // σ₄ and σ₅ are 0.16% apart; this f64 Jacobi matches the float64 one.
            assert!(
                d <= 1e-3,
                "{name} {site}: B·A differs by {d} of its largest entry"
            );
            let abs_diff =
                |x: &Tensor, y: &Tensor| common::max_abs_diff(&x.abs().unwrap(), &y.abs().unwrap());
            assert!(abs_diff(&pair.a, a) <= 1e-3, "{name} {site}: |A| differs");
            assert!(abs_diff(&pair.b, b) <= 1e-3, "{name} {site}: |B| differs");
        }
        eprintln!("{name}: B·A within {worst:.2e} of PEFT's (relative to its largest entry)");
    }
}
