//! Incremental decoding: a decoder fed its tokens one at a time through the key/value cache
//! gives the hidden states of one forward over the whole sequence, for every method (prefixes
//! and input prompts included), and greedy decoding with the cache equals decoding without.

mod common;

use candle_core::{Device, Tensor};
use common::{max_rel_diff, tiny_model};
use peftbench_backbone::{Initializer, Inputs, KvCache, TrainableParams};
use peftbench_harness::generate::{greedy, greedy_uncached};
use peftbench_methods::*;
use proptest::prelude::*;

fn row(ids: &[u32]) -> Inputs {
    Inputs {
        input_ids: Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap(),
        attention_mask: Tensor::ones((1, ids.len()), candle_core::DType::U32, &Device::Cpu)
            .unwrap(),
        token_type_ids: None,
        packing: None,
    }
}

/// Moves every variable off its identity start, so each method changes the outputs.
fn perturb(params: &TrainableParams, seed: u64) {
    let mut init = Initializer::new(seed);
    for v in params.vars() {
        let noise = init.normal(v.shape(), 0.1, v.device()).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
}

/// `config` (at size 2 where it has a knob) attached to a copy of `base`, its variables
/// moved off their start, in evaluation mode; `None` where the method refuses the model.
fn attached(
    base: &peftbench_backbone::Transformer,
    config: MethodConfig,
    seed: u64,
) -> Option<(peftbench_backbone::Transformer, Box<dyn Method>)> {
    config.validate(&base.config).ok()?;
    let config = match config.knob() {
        Some(_) => config.with_knob(2),
        None => config,
    };
    let mut model = base.clone();
    let method = config
        .attach(&mut AttachContext::new(&mut model, seed))
        .unwrap();
    perturb(method.params(), seed ^ 3);
    method.set_training(false);
    Some((model, method))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn cached_steps_give_the_full_forwards_hidden_states(
        llama in any::<bool>(),
        prompt_len in 1usize..6,
        steps in 1usize..5,
        seed in any::<u64>(),
    ) {
        let base = tiny_model(if llama { "llama" } else { "gpt2" }, seed);
        for config in MethodConfig::defaults() {
            // BitFit refuses bias-free Llama.
            let Some((model, method)) = attached(&base, config.clone(), seed) else { continue };
            let mut init = Initializer::new(seed ^ 9);
            let ids: Vec<u32> = (0..prompt_len + steps).map(|_| 1 + init.index(45) as u32).collect();
            let full = model.forward(&row(&ids), method.as_ref()).unwrap().hidden;
            let mut cache = KvCache::new();
            let first = model.forward_cached(&row(&ids[..prompt_len]), method.as_ref(), &mut cache).unwrap();
            let p = first.input_prefix_len;
            let mut parts = vec![first.hidden];
            for i in prompt_len..ids.len() {
                parts.push(model.forward_cached(&row(&ids[i..i + 1]), method.as_ref(), &mut cache).unwrap().hidden);
            }
            let cached = Tensor::cat(&parts, 1).unwrap();
            prop_assert_eq!(cached.dims(), full.dims());
            let e = max_rel_diff(&cached, &full);
            prop_assert!(e <= 1e-5, "{}: cached hidden states differ by {} relative (input prefix {})", config.name(), e, p);
        }
    }

    #[test]
    fn greedy_with_the_cache_equals_greedy_without(
        llama in any::<bool>(),
        prompt_len in 1usize..6,
        seed in any::<u64>(),
    ) {
        let base = tiny_model(if llama { "llama" } else { "gpt2" }, seed);
        for config in MethodConfig::defaults() {
            let Some((model, method)) = attached(&base, config.clone(), seed ^ 1) else { continue };
            let mut init = Initializer::new(seed ^ 7);
            let prompt: Vec<u32> = (0..prompt_len).map(|_| 1 + init.index(45) as u32).collect();
            let eos = Some(2);
            let a = greedy(&model, method.as_ref(), &prompt, 8, eos).unwrap();
            let b = greedy_uncached(&model, method.as_ref(), &prompt, 8, eos).unwrap();
            prop_assert_eq!(&a, &b, "{}", config.name());
        }
    }
}

#[test]
fn a_cache_refuses_encoders_and_padded_rows() {
    let bert = tiny_model("bert", 1);
    let e = bert
        .forward_cached(
            &row(&[3, 4]),
            &peftbench_backbone::NoIntervention,
            &mut KvCache::new(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("causal decoder"), "{e}");
    let gpt2 = tiny_model("gpt2", 1);
    let mut x = row(&[3, 4, 5]);
    x.attention_mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
    let e = gpt2
        .forward_cached(&x, &peftbench_backbone::NoIntervention, &mut KvCache::new())
        .unwrap_err();
    assert!(e.to_string().contains("unpadded"), "{e}");
}

/// An SFT task with `generate` records ROUGE-L before and after training and keeps sample
/// generations, which the report shows.
#[test]
fn an_sft_task_records_rouge_l_and_sample_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::synthetic_base(tmp.path());
    let text = r#"
name = "gen"
model = "synthetic"
budgets = ["3%"]
max_budget_deviation = 0.3

[train]
steps = 4
batch_size = 8

[methods.lora]
lr = 5e-3

[methods.prompt_tuning]
lr = 5e-2

[[tasks]]
name = "antonyms"
kind = "synthetic"
objective = "sft"
generate = { examples = 5, max_new_tokens = 6, show = 2 }
"#;
    let suite = peftbench_harness::Suite::parse(text, "gen.toml").unwrap();
    let tasks = common::synthetic_tasks(&suite, &base);
    let results = tmp.path().join("results");
    peftbench_harness::run_grid(
        &suite,
        &base,
        &tasks,
        &results,
        peftbench_harness::Shard { index: 0, count: 1 },
    )
    .unwrap();
    let records = peftbench_reports::load::load_records(&results.join("gen/runs")).unwrap();
    assert_eq!(records.len(), 2);
    for r in &records {
        assert_eq!(r.status, peftbench_reports::RunStatus::Ok, "{}", r.run_id);
        let after = r.metrics_final["rouge_l"];
        let before = r.extra["initial_metrics"]["rouge_l"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&after) && (0.0..=1.0).contains(&before));
        let shown = r.extra["generations"].as_array().unwrap();
        assert_eq!(shown.len(), 2, "{}", r.run_id);
        for g in shown {
            assert!(!g["prompt"].as_str().unwrap().is_empty());
            assert!(!g["reference"].as_str().unwrap().is_empty());
            assert!(g["generated"].is_string() && g["generated_before_training"].is_string());
        }
    }
    let mut report = String::new();
    peftbench_reports::markdown::generations(&mut report, &records, "antonyms");
    assert!(report.contains("### Sample generations"), "{report}");
    assert!(report.contains("**Prompt 2**") && report.contains("Reference:"));
    for r in &records {
        assert!(report.contains(&format!("`{}`", r.run_id)));
    }
}

/// A Hugging Face directory's `tokenizer_config.json` template drives an SFT task's layout;
/// without a template, asking for one is a clear error.
#[test]
fn a_directorys_chat_template_lays_out_sft_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::synthetic_base(tmp.path());
    let data = tmp.path().join("a.json");
    std::fs::write(
        &data,
        r#"[{"instruction": "a b", "input": "", "output": "c d"}]"#,
    )
    .unwrap();
    let cfg: peftbench_harness::TaskConfig = toml::from_str(
        "name = \"chat\"\nkind = \"alpaca\"\npath = \"a.json\"\ndev_fraction = 0.0\nchat_template = true",
    )
    .unwrap();
    let e = peftbench_harness::load_task(&cfg, &base.tokenizer, tmp.path()).unwrap_err();
    assert!(e.to_string().contains("carries no chat template"), "{e}");
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|endoftext|>"}, "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"}"#,
    )
    .unwrap();
    let tok = peftbench_backbone::TextTokenizer::from_file(&tmp.path().join("tokenizer.json"), 64)
        .unwrap();
    let t = tok.chat_template.as_ref().unwrap();
    assert_eq!(t.eos_token, "<|endoftext|>");
    let task = peftbench_harness::load_task(&cfg, &tok, tmp.path()).unwrap();
    let peftbench_harness::data::Example::Lm {
        ids,
        response_start,
    } = task.train.iter().chain(&task.dev).next().unwrap()
    else {
        panic!("not an LM example")
    };
    let want_prompt = tok.encode_ids("user: a b\nassistant: ", false).unwrap();
    let want_reply = tok.encode_ids("c d<|endoftext|>\n", false).unwrap();
    assert_eq!(&ids[..*response_start], &want_prompt[..]);
    assert_eq!(&ids[*response_start..], &want_reply[..]);
}
