//! The backbone reproduces candle-transformers' reference models on the same weights.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{bert, bigcode, llama};
use common::{max_abs_diff, minilm_dir, tiny_model};
use peftbench_backbone::{
    lm_logits, load_model_dir, save_model_dir, Inputs, NoIntervention, TextTokenizer,
};
use std::collections::HashMap;

fn full_mask(ids: &Tensor) -> Inputs {
    Inputs {
        input_ids: ids.clone(),
        attention_mask: Tensor::ones(ids.dims(), DType::U32, ids.device()).unwrap(),
        token_type_ids: None,
        packing: None,
    }
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn minilm_hidden_states_match_candle_bert() {
    let Some(dir) = minilm_dir() else { return };
    let dev = Device::Cpu;
    let ours = load_model_dir(&dir, &dev).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let batch = tok
        .encode_batch(
            &[
                ("A man is eating food.", None),
                (
                    "The girl is carrying a baby, and it is a long sentence.",
                    None,
                ),
                ("Is this a pair?", Some("Yes, it is a pair.")),
            ],
            &dev,
        )
        .unwrap();
    let got = ours.forward(&batch, &NoIntervention).unwrap().hidden;

    let cfg: bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
            .unwrap()
    };
    let reference = bert::BertModel::load(vb, &cfg).unwrap();
    let want = reference
        .forward(
            &batch.input_ids,
            batch.token_type_ids.as_ref().unwrap(),
            Some(&batch.attention_mask),
        )
        .unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

fn mean_pooled(model: &peftbench_backbone::Transformer, tok: &TextTokenizer, text: &str) -> Tensor {
    let batch = tok.encode_batch(&[(text, None)], &Device::Cpu).unwrap();
    let enc = model.forward(&batch, &NoIntervention).unwrap();
    peftbench_backbone::pool(&enc, peftbench_backbone::Pooling::Mean)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn cosine(a: &Tensor, b: &Tensor) -> f32 {
    let dot = (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let na = a
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let nb = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    dot / (na * nb)
}

#[test]
fn minilm_sentence_similarity_matches_sentence_transformers() {
    let Some(dir) = minilm_dir() else { return };
    let model = load_model_dir(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let a = mean_pooled(&model, &tok, "A man is eating food.");
    let b = mean_pooled(&model, &tok, "A man is eating a piece of bread.");
    let c = mean_pooled(&model, &tok, "The girl is carrying a baby.");
    let ab = cosine(&a, &b);
    let ac = cosine(&a, &c);
    assert!((ab - 0.7553).abs() <= 1e-3, "cos(food, bread) = {ab}");
    assert!((ac - -0.1050).abs() <= 1e-3, "cos(food, baby) = {ac}");
}

#[test]
fn padding_does_not_change_minilm_outputs_at_real_tokens() {
    let Some(dir) = minilm_dir() else { return };
    let model = load_model_dir(&dir, &Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let alone = tok
        .encode_batch(&[("short one", None)], &Device::Cpu)
        .unwrap();
    let padded = tok
        .encode_batch(
            &[
                ("short one", None),
                ("a much longer sentence that forces padding", None),
            ],
            &Device::Cpu,
        )
        .unwrap();
    let h1 = model.forward(&alone, &NoIntervention).unwrap().hidden;
    let h2 = model.forward(&padded, &NoIntervention).unwrap().hidden;
    let t = h1.dims()[1];
    let diff = max_abs_diff(&h1.i(0).unwrap(), &h2.i((0, 0..t)).unwrap());
    assert!(diff <= 1e-5, "padding changed real tokens by {diff}");
}

#[test]
fn llama_logits_match_candle_llama() {
    let dev = Device::Cpu;
    let model = tiny_model("llama", 7);
    let dir = tempfile::tempdir().unwrap();
    save_model_dir(&model, dir.path()).unwrap();
    let ours = load_model_dir(dir.path(), &dev).unwrap();

    let cfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let cfg = cfg.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &dev,
        )
        .unwrap()
    };
    let reference = llama::Llama::load(vb, &cfg).unwrap();
    let input = ids(&[&[1, 5, 9, 3, 44, 2, 17], &[8, 8, 30, 12, 1, 0, 49]]);
    let mut cache = llama::Cache::new(false, DType::F32, &cfg, &dev).unwrap();
    let want = reference.forward(&input, 0, &mut cache).unwrap();

    let enc = ours.forward(&full_mask(&input), &NoIntervention).unwrap();
    let got = lm_logits(&ours, &enc).unwrap().i((.., 6)).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

/// Re-lays a GPT-2-family model's tensors as GPT-BigCode stores them (Linear `[out, in]`,
/// multi-query `c_attn` rows `[q | k | v]`, all under `transformer.`).
fn bigcode_tensors(m: &peftbench_backbone::Transformer) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let mut put = |k: String, t: &Tensor| {
        out.insert(format!("transformer.{k}"), t.contiguous().unwrap());
    };
    let e = &m.embeddings;
    put("wte.weight".into(), &e.word);
    put("wpe.weight".into(), e.position.as_ref().unwrap());
    let norm = |n: &peftbench_backbone::model::Norm| match n {
        peftbench_backbone::model::Norm::Layer { weight, bias, .. } => {
            (weight.clone(), bias.clone())
        }
        _ => unreachable!(),
    };
    for (i, l) in m.layers.iter().enumerate() {
        let w = Tensor::cat(&[&l.query.weight, &l.key.weight, &l.value.weight], 0).unwrap();
        let b = Tensor::cat(
            &[
                l.query.bias.as_ref().unwrap(),
                l.key.bias.as_ref().unwrap(),
                l.value.bias.as_ref().unwrap(),
            ],
            0,
        )
        .unwrap();
        put(format!("h.{i}.attn.c_attn.weight"), &w);
        put(format!("h.{i}.attn.c_attn.bias"), &b);
        for (name, lin) in [
            ("attn.c_proj", &l.attn_out),
            ("mlp.c_fc", &l.up),
            ("mlp.c_proj", &l.down),
        ] {
            put(format!("h.{i}.{name}.weight"), &lin.weight);
            put(format!("h.{i}.{name}.bias"), lin.bias.as_ref().unwrap());
        }
        let (w1, b1) = norm(&l.attn_norm);
        put(format!("h.{i}.ln_1.weight"), &w1);
        put(format!("h.{i}.ln_1.bias"), &b1);
        let (w2, b2) = norm(&l.ffn_norm);
        put(format!("h.{i}.ln_2.weight"), &w2);
        put(format!("h.{i}.ln_2.bias"), &b2);
    }
    let (wf, bf) = norm(m.final_norm.as_ref().unwrap());
    put("ln_f.weight".into(), &wf);
    put("ln_f.bias".into(), &bf);
    out
}

#[test]
fn gpt2_family_logits_match_candle_bigcode() {
    let dev = Device::Cpu;
    let model = tiny_model("gpt_bigcode", 11);
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&bigcode_tensors(&model), &st).unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&model.config.to_hf_json()).unwrap(),
    )
    .unwrap();
    let ours = load_model_dir(dir.path(), &dev).unwrap();

    let c = &model.config;
    let cfg = bigcode::Config {
        vocab_size: c.vocab_size,
        max_position_embeddings: c.max_position_embeddings,
        num_hidden_layers: c.num_layers,
        hidden_size: c.hidden_size,
        layer_norm_epsilon: c.norm_eps,
        n_inner: Some(c.intermediate_size),
        num_attention_heads: c.num_heads,
        multi_query: true,
        use_cache: false,
    };
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[st], DType::F32, &dev).unwrap() };
    let mut reference = bigcode::GPTBigCode::load(vb, cfg).unwrap();
    let input = ids(&[&[3, 14, 15, 9, 26, 5, 35, 8]]);
    let want = reference.forward(&input, 0).unwrap();
    let enc = ours.forward(&full_mask(&input), &NoIntervention).unwrap();
    let got = lm_logits(&ours, &enc).unwrap().i((.., 7)).unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

#[test]
fn gpt2_conv1d_checkpoint_round_trips() {
    // GPT-2 stores Conv1D weights transposed and q/k/v fused; writing and reading them back
    // must give the same model.
    let dev = Device::Cpu;
    let model = tiny_model("gpt2", 5);
    let dir = tempfile::tempdir().unwrap();
    save_model_dir(&model, dir.path()).unwrap();
    let back = load_model_dir(dir.path(), &dev).unwrap();
    let input = ids(&[&[1, 2, 3, 4, 5, 6], &[7, 8, 9, 10, 11, 12]]);
    let a = model
        .forward(&full_mask(&input), &NoIntervention)
        .unwrap()
        .hidden;
    let b = back
        .forward(&full_mask(&input), &NoIntervention)
        .unwrap()
        .hidden;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // The fused c_attn is stored [in, 3·hidden], as GPT-2 checkpoints are.
    let raw = candle_core::safetensors::load(dir.path().join("model.safetensors"), &dev).unwrap();
    assert_eq!(raw["h.0.attn.c_attn.weight"].dims(), &[16, 48]);
}
