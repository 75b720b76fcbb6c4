//! GGUF checkpoints: a Llama written the way llama.cpp's converter writes one loads back with
//! the same outputs (f32 exactly; Q8_0 as its dequantized weights), the tokenizer is built from
//! the metadata, bad files get errors naming the file and field, and the real
//! SmolLM2-135M-Instruct file matches transformers (when fetched).

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::max_abs_diff;
use peftbench_backbone::load::to_hf_tensors;
use peftbench_backbone::{
    lm_logits, load_model, pad_rows, GgufFile, ModelConfig, NoIntervention, TextTokenizer,
    Transformer,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;

fn tiny_llama(tied: bool, seed: u64) -> Transformer {
    let v = serde_json::json!({"model_type": "llama", "vocab_size": 40, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": 64, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied});
    let cfg = ModelConfig::from_json(&v, Path::new("tiny/config.json")).unwrap();
    Transformer::random(cfg, seed, &Device::Cpu).unwrap()
}

/// llama.cpp's converter: Hugging Face names to its own, Q and K rows interleaved per head.
fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("unmapped {other}"),
    };
    format!("blk.{layer}.{part}")
}

fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    w.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn llama_metadata(m: &Transformer) -> Vec<(String, Value)> {
    let c = &m.config;
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(c.num_layers as u32)),
        (
            "llama.embedding_length".into(),
            Value::U32(c.hidden_size as u32),
        ),
        (
            "llama.feed_forward_length".into(),
            Value::U32(c.intermediate_size as u32),
        ),
        (
            "llama.attention.head_count".into(),
            Value::U32(c.num_heads as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(c.num_kv_heads as u32),
        ),
        (
            "llama.context_length".into(),
            Value::U32(c.max_position_embeddings as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(c.rope_theta as f32),
        ),
        ("llama.vocab_size".into(), Value::U32(c.vocab_size as u32)),
    ]
}

/// Writes `m` as llama.cpp would: projections in `dtype`, norms in F32.
fn write_gguf(path: &Path, m: &Transformer, dtype: GgmlDType, metadata: &[(String, Value)]) {
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut hf: Vec<(String, Tensor)> = to_hf_tensors(m).unwrap().into_iter().collect();
    hf.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, t) in hf {
        let t = if name.ends_with("q_proj.weight") {
            permute(&t, HEADS)
        } else if name.ends_with("k_proj.weight") {
            permute(&t, KV_HEADS)
        } else {
            t
        };
        let d = if t.rank() == 1 { GgmlDType::F32 } else { dtype };
        tensors.push((gguf_name(&name), QTensor::quantize(&t, d).unwrap()));
    }
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &ts).unwrap();
}

fn logits(m: &Transformer, rows: &[Vec<u32>]) -> Tensor {
    let x = pad_rows(rows, None, 0, &Device::Cpu).unwrap();
    let enc = m.forward(&x, &NoIntervention).unwrap();
    lm_logits(m, &enc).unwrap()
}

fn rows() -> Vec<Vec<u32>> {
    vec![vec![3, 17, 5, 9, 30, 2, 11], vec![8, 1, 39, 4, 4, 20, 6]]
}

#[test]
fn a_llama_written_by_llama_cpps_rules_loads_back_with_the_same_outputs() {
    let dir = tempfile::tempdir().unwrap();
    for tied in [true, false] {
        let m = tiny_llama(tied, 7);
        let path = dir.path().join(format!("tiny-{tied}.gguf"));
        write_gguf(&path, &m, GgmlDType::F32, &llama_metadata(&m));
        let back = load_model(&path, &Device::Cpu).unwrap();
        assert_eq!(back.config.tie_word_embeddings, tied);
        assert_eq!(back.config.num_kv_heads, KV_HEADS);
        let d = max_abs_diff(&logits(&back, &rows()), &logits(&m, &rows()));
        assert!(d <= 1e-6, "tied={tied}: max abs {d}");
    }
}

#[test]
fn a_q8_0_llama_loads_as_its_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(true, 11);
    let path = dir.path().join("tiny-q8.gguf");
    write_gguf(&path, &m, GgmlDType::Q8_0, &llama_metadata(&m));
    let back = load_model(&path, &Device::Cpu).unwrap();
    // Q8_0 blocks run along rows, which the Q/K reordering only moves: the expected model is the
    // original with every matrix through Q8_0 and back.
    let mut expected = m.clone();
    for s in m.sites() {
        let w = &m.linear(s).unwrap().weight;
        let q = QTensor::quantize(w, GgmlDType::Q8_0).unwrap();
        expected.linear_mut(s).unwrap().weight = q.dequantize(&Device::Cpu).unwrap();
    }
    let emb = QTensor::quantize(m.lm_head_weight(), GgmlDType::Q8_0).unwrap();
    let emb = emb.dequantize(&Device::Cpu).unwrap();
    let hf: HashMap<String, Tensor> = to_hf_tensors(&back).unwrap();
    assert!(max_abs_diff(&hf["model.embed_tokens.weight"], &emb) == 0.0);
    for s in m.sites() {
        let d = max_abs_diff(
            &back.linear(s).unwrap().weight,
            &expected.linear(s).unwrap().weight,
        );
        assert_eq!(d, 0.0, "{s}");
    }
    // And it is not the f32 model: the quantization is real.
    assert!(max_abs_diff(&logits(&back, &rows()), &logits(&m, &rows())) > 0.0);
}

fn tokenizer_metadata(pre: &str, add_bos: bool) -> Vec<(String, Value)> {
    // A byte-level vocabulary: the control tokens, single characters ('Ġ' is the space), and
    // two merges.
    let mut tokens: Vec<&str> = vec!["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(["a", "b", "c", "1", "2", "3", "Ġ", "Ċ", "ab", "Ġa", "12"]);
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                tokens
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                ["a b", "Ġ a", "1 2"]
                    .iter()
                    .map(|t| Value::String(t.to_string()))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
    ]
}

fn write_meta_only(path: &Path, meta: &[(String, Value)]) {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &[]).unwrap();
}

#[test]
fn the_tokenizer_comes_from_the_metadata_with_llama_cpps_pre_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tok = |pre: &str, add_bos: bool| -> TextTokenizer {
        let p = dir.path().join(format!("tok-{pre}-{add_bos}.gguf"));
        write_meta_only(&p, &tokenizer_metadata(pre, add_bos));
        TextTokenizer::for_model(&p, 32).unwrap()
    };
    let gpt2 = tok("gpt2", false);
    let smollm = tok("smollm", false);
    // GPT-2's split keeps a run of digits together, so the merge `1 2` applies; smollm isolates
    // every digit first, as SmolLM's own tokenizer does.
    // Ids: 3 a, 6 1, 7 2, 9 Ġ, 11 ab, 12 Ġa, 13 12.
    assert_eq!(gpt2.encode_ids("ab 12", false).unwrap(), vec![11, 9, 13]);
    assert_eq!(
        smollm.encode_ids("ab 12", false).unwrap(),
        vec![11, 9, 6, 7]
    );
    // Control tokens are special and whole; no BOS unless the file asks for one.
    assert_eq!(
        smollm.encode_ids("<|im_start|>a<|im_end|>", true).unwrap(),
        vec![1, 3, 2]
    );
    assert_eq!(smollm.decode(&[11, 12]).unwrap(), "ab a");
    assert_eq!(smollm.pad_id, 2);
    assert_eq!(smollm.eos_id(), Some(2));
    let bos = tok("smollm", true);
    assert_eq!(bos.encode_ids("ab", true).unwrap(), vec![1, 11]);
    assert_eq!(bos.encode_ids("ab", false).unwrap(), vec![11]);
}

fn error_of<T>(r: peftbench_backbone::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// The byte offset of the u32 ggml type of tensor `name` in the header.
fn dtype_offset(bytes: &[u8], name: &str) -> usize {
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .unwrap();
    let n_dims = u32::from_le_bytes(
        bytes[at + name.len()..at + name.len() + 4]
            .try_into()
            .unwrap(),
    );
    at + name.len() + 4 + 8 * n_dims as usize
}

#[test]
fn bad_gguf_files_get_errors_naming_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_llama(true, 3);
    let good = dir.path().join("good.gguf");
    write_gguf(&good, &m, GgmlDType::F32, &llama_metadata(&m));
    let bytes = std::fs::read(&good).unwrap();

    // Truncated in the tensor data.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let e = error_of(load_model(&cut, &Device::Cpu));
    assert!(
        e.contains("cut.gguf") && e.contains("tensor `") && e.contains("remaining"),
        "{e}"
    );

    // Truncated in the header.
    let head = dir.path().join("head.gguf");
    std::fs::write(&head, &bytes[..200]).unwrap();
    let e = error_of(load_model(&head, &Device::Cpu));
    assert!(
        e.contains("head.gguf") && e.contains("not a readable GGUF file"),
        "{e}"
    );

    // Not a GGUF file at all.
    let text = dir.path().join("text.gguf");
    std::fs::write(&text, b"this is not a model").unwrap();
    let e = error_of(load_model(&text, &Device::Cpu));
    assert!(
        e.contains("text.gguf") && e.contains("not a readable GGUF file"),
        "{e}"
    );

    // An unknown quantization type.
    let mut odd = bytes.clone();
    let at = dtype_offset(&odd, "blk.0.attn_q.weight");
    odd[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let qt = dir.path().join("qtype.gguf");
    std::fs::write(&qt, &odd).unwrap();
    let e = error_of(load_model(&qt, &Device::Cpu));
    assert!(e.contains("qtype.gguf") && e.contains("99"), "{e}");

    // An architecture the backbone lacks.
    let mut meta = llama_metadata(&m);
    meta[0].1 = Value::String("mamba".into());
    let arch = dir.path().join("mamba.gguf");
    write_gguf(&arch, &m, GgmlDType::F32, &meta);
    let e = error_of(load_model(&arch, &Device::Cpu));
    assert!(
        e.contains("mamba.gguf") && e.contains("general.architecture") && e.contains("`mamba`"),
        "{e}"
    );

    // A missing shape field.
    let meta: Vec<_> = llama_metadata(&m)
        .into_iter()
        .filter(|(k, _)| k != "llama.feed_forward_length")
        .collect();
    let noffn = dir.path().join("noffn.gguf");
    write_gguf(&noffn, &m, GgmlDType::F32, &meta);
    let e = error_of(load_model(&noffn, &Device::Cpu));
    assert!(
        e.contains("noffn.gguf") && e.contains("llama.feed_forward_length"),
        "{e}"
    );

    // No tokenizer metadata.
    let e = error_of(TextTokenizer::for_model(&good, 32));
    assert!(
        e.contains("good.gguf") && e.contains("tokenizer.ggml.model"),
        "{e}"
    );
    // A pre-tokenizer not implemented.
    let p = dir.path().join("pre.gguf");
    write_meta_only(&p, &tokenizer_metadata("qwen2", false));
    let e = error_of(TextTokenizer::for_model(&p, 32));
    assert!(
        e.contains("pre.gguf") && e.contains("tokenizer.ggml.pre") && e.contains("qwen2"),
        "{e}"
    );
    // A GGUF file that is only a tokenizer has no model to load.
    let e = error_of(GgufFile::open(&p).unwrap().load_model(&Device::Cpu));
    assert!(e.contains("pre.gguf") && e.contains("llama."), "{e}");
}

fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("PEFTBENCH_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/peftbench/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} not found (run scripts/fetch-smollm2.sh)",
            p.display()
        );
        None
    }
}

fn fixture() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

#[test]
fn smollm2_tokenizes_like_transformers() {
    let Some(path) = smollm2() else { return };
    let tok = TextTokenizer::for_model(&path, 512).unwrap();
    assert_eq!(tok.vocab_size(), 49_152);
    for case in fixture()["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode_ids(text, false).unwrap(), want, "{text:?}");
        // Decoding drops special tokens; byte-level text comes back exactly.
        if !text.contains("<|") {
            assert_eq!(tok.decode(&want).unwrap(), text, "decode {text:?}");
        }
    }
}

#[test]
fn smollm2_last_position_logits_match_transformers() {
    let Some(path) = smollm2() else { return };
    let m = load_model(&path, &Device::Cpu).unwrap();
    assert_eq!(
        (
            m.config.num_layers,
            m.config.hidden_size,
            m.config.num_kv_heads
        ),
        (30, 576, 3)
    );
    for case in fixture()["logits"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let out = logits(&m, std::slice::from_ref(&ids));
        let last = out.get(0).unwrap().get(ids.len() - 1).unwrap();
        let got: Vec<f32> = last.to_vec1().unwrap();
        let at: Vec<usize> = serde_json::from_value(case["at"].clone()).unwrap();
        let want: Vec<f32> = serde_json::from_value(case["values"].clone()).unwrap();
        let worst = at
            .iter()
            .zip(&want)
            .map(|(&i, &w)| (got[i] - w).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "{:?}: max abs {worst:.2e} over {} logits",
            case["prompt"],
            at.len()
        );
        assert!(worst <= 1e-3, "{:?}: max abs {worst}", case["prompt"]);
        let argmax = got
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(argmax as u64, case["argmax"].as_u64().unwrap());
    }
}

/// SmolLM2's chat template from its GGUF metadata lays an Alpaca example out as ChatML, the
/// loss covers the assistant's reply and its `<|im_end|>` alone, and greedy generation from
/// the templated prompt stops at that end-of-turn.
#[test]
fn smollm2_sft_examples_follow_its_chat_template() {
    let Some(path) = smollm2() else { return };
    let tok = TextTokenizer::for_model(&path, 256).unwrap();
    let template = tok
        .chat_template
        .as_ref()
        .expect("SmolLM2 carries a chat template");
    assert!(template.origin.contains("tokenizer.chat_template"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.json"),
        r#"[{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]"#,
    )
    .unwrap();
    let cfg: peftbench_harness::TaskConfig = toml::from_str(
        "name = \"chat\"\nkind = \"alpaca\"\npath = \"a.json\"\ndev_fraction = 0.5\nchat_template = true",
    )
    .unwrap();
    let data = peftbench_harness::load_task(&cfg, &tok, dir.path()).unwrap();
    let all: Vec<_> = data.train.iter().chain(&data.dev).collect();
    assert_eq!(all.len(), 2);
    for e in all {
        let peftbench_harness::data::Example::Lm {
            ids,
            response_start,
        } = e
        else {
            panic!("not an LM example")
        };
        let text = |ids: &[u32]| tok.inner().decode(ids, false).unwrap();
        let prompt = text(&ids[..*response_start]);
        let reply = text(&ids[*response_start..]);
        assert!(
            prompt.starts_with("<|im_start|>system\n")
                && prompt.ends_with("<|im_start|>assistant\n"),
            "{prompt:?}"
        );
        assert!(
            reply == "Blue.<|im_end|>\n" || reply == "5<|im_end|>\n",
            "{reply:?}"
        );
        if reply.starts_with('5') {
            assert!(prompt.contains("<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>"));
        }
    }
    let m = load_model(&path, &Device::Cpu).unwrap();
    let (prompt, _) = template
        .prompt_and_reply("What is the capital of France?", "")
        .unwrap();
    let ids = tok.encode_ids(&prompt, false).unwrap();
    let out = peftbench_harness::generate::greedy(
        &m,
        &peftbench_backbone::NoIntervention,
        &ids,
        24,
        tok.eos_id(),
    )
    .unwrap();
    let answer = tok.decode(&out).unwrap();
    eprintln!("SmolLM2: {answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
    assert!(
        out.len() < 24,
        "generation did not stop at <|im_end|>: {answer:?}"
    );
}

/// HH-RLHF pairs rendered with SmolLM2's template: each side is the whole conversation as
/// ChatML, the chosen or rejected reply as the last assistant turn.
#[test]
fn smollm2_preference_pairs_render_as_chatml_conversations() {
    let Some(path) = smollm2() else { return };
    let tok = TextTokenizer::for_model(&path, 512).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.jsonl"),
        "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant: hello\\n\\nHuman: a prank?\\n\\nAssistant:\", \"chosen\": \" No.\", \"rejected\": \" Sure.\"}\n{\"prompt\": \"\\n\\nHuman: x\\n\\nAssistant:\", \"chosen\": \" y\", \"rejected\": \" z\"}\n",
    )
    .unwrap();
    let cfg: peftbench_harness::TaskConfig = toml::from_str(
        "name = \"hh\"\nkind = \"preference\"\npath = \"p.jsonl\"\ndev_fraction = 0.5\nchat_template = true",
    )
    .unwrap();
    let data = peftbench_harness::load_task(&cfg, &tok, dir.path()).unwrap();
    let text = |ids: &[u32]| tok.inner().decode(ids, false).unwrap();
    let sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    let mut seen = 0;
    for e in data.train.iter().chain(&data.dev) {
        let peftbench_harness::data::Example::Pair { chosen, rejected } = e else {
            panic!("not a pair")
        };
        let (c, r) = (text(chosen), text(rejected));
        if c.contains("prank") {
            assert_eq!(c, format!("{sys}<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\na prank?<|im_end|>\n<|im_start|>assistant\nNo.<|im_end|>\n"));
            assert!(
                r.ends_with("<|im_start|>assistant\nSure.<|im_end|>\n"),
                "{r:?}"
            );
        } else {
            assert_eq!(
                c,
                format!("{sys}<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n")
            );
        }
        seen += 1;
    }
    assert_eq!(seen, 2);
}

/// `peftbench merge` on a GGUF base writes a directory that keeps the model's tokenizer (the
/// same ids), its chat template and its end-of-turn EOS, so a merged SFT model can seed a
/// reward model or generate as the GGUF file does.
#[test]
fn a_model_merged_from_a_gguf_base_keeps_its_tokenizer_and_chat_template() {
    let Some(path) = smollm2() else { return };
    let mut model = load_model(&path, &Device::Cpu).unwrap();
    let config = peftbench_methods::MethodConfig::defaults()[0].with_knob(2);
    let method = config
        .attach(&mut peftbench_methods::AttachContext::new(&mut model, 0))
        .unwrap();
    let state = method
        .peft_state(&model.config, peftbench_backbone::HfTask::CausalLm)
        .unwrap()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    peftbench_methods::peft::write(
        &adapter,
        &state,
        &model.config,
        peftbench_backbone::HfTask::CausalLm,
        "smollm2",
        None,
    )
    .unwrap();
    let merged = dir.path().join("merged");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_peftbench"))
        .args(["merge", "--model"])
        .arg(&path)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gguf = TextTokenizer::for_model(&path, 512).unwrap();
    let dir_tok = TextTokenizer::for_model(&merged, 512).unwrap();
    for case in fixture()["tokens"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            dir_tok.encode_ids(text, false).unwrap(),
            gguf.encode_ids(text, false).unwrap(),
            "{text:?}"
        );
    }
    assert_eq!(dir_tok.eos_id(), gguf.eos_id());
    assert_eq!(dir_tok.eos_id(), Some(2));
    let (a, b) = (
        dir_tok.chat_template.as_ref().unwrap(),
        gguf.chat_template.as_ref().unwrap(),
    );
    assert_eq!((&a.source, &a.eos_token), (&b.source, &b.eos_token));
    // B = 0: the merged weights are the base's, so the logits are too.
    let m = load_model(&merged, &Device::Cpu).unwrap();
    let ids = gguf.encode_ids("The quick brown fox", false).unwrap();
    let d = max_abs_diff(
        &logits(&m, std::slice::from_ref(&ids)),
        &logits(
            &load_model(&path, &Device::Cpu).unwrap(),
            std::slice::from_ref(&ids),
        ),
    );
    assert!(d <= 1e-4, "merged logits differ by {d}");
}

// A quantized base (the projections in their GGUF blocks, dequantized inside the op) gives the
// dequantize-everything model's outputs and, through LoRA on every projection, the gradients
// that flow back through each frozen projection's input, for Q8_0 and Q4_1 files.
proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 8, ..Default::default() })]
    #[test]
    fn a_quantized_base_matches_the_dequantized_one_in_outputs_and_input_gradients(
        q8 in proptest::prelude::any::<bool>(),
        tied in proptest::prelude::any::<bool>(),
        seed in proptest::prelude::any::<u64>(),
    ) {
        let dtype = if q8 { GgmlDType::Q8_0 } else { GgmlDType::Q4_1 };
        quantized_matches_dequantized(dtype, tied, seed);
    }
}

fn quantized_matches_dequantized(dtype: GgmlDType, tied: bool, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    {
        let m = tiny_llama(tied, seed);
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &m, dtype, &llama_metadata(&m));
        let dense = load_model(&path, &Device::Cpu).unwrap();
        let mut quant = dense.clone();
        let n = GgufFile::open(&path)
            .unwrap()
            .quantize_projections(&mut quant)
            .unwrap();
        assert_eq!(n, dense.sites().len());
        assert!(quant.is_quantized() && !dense.is_quantized());
        assert!(
            quant.weight_bytes() < dense.weight_bytes() / 2,
            "{} vs {}",
            quant.weight_bytes(),
            dense.weight_bytes()
        );
        let run = |mut model: Transformer| {
            let config = peftbench_methods::MethodConfig::Lora(peftbench_methods::LoraConfig {
                target_modules: peftbench_methods::Targets(vec!["all-linear".into()]),
                ..Default::default()
            });
            let method = config
                .attach(&mut peftbench_methods::AttachContext::new(&mut model, seed))
                .unwrap();
            // B off zero, so the adapters' gradients depend on every frozen projection's.
            let mut init = peftbench_backbone::Initializer::new(seed ^ 5);
            for v in method.params().vars() {
                let noise = init.normal(v.shape(), 0.1, v.device()).unwrap();
                v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
            }
            let x = pad_rows(&rows(), None, 0, &Device::Cpu).unwrap();
            let enc = model.forward(&x, method.as_ref()).unwrap();
            let out = lm_logits(&model, &enc).unwrap();
            let probe = peftbench_backbone::Initializer::new(9)
                .normal(out.dims(), 1.0, &Device::Cpu)
                .unwrap();
            let grads = (&out * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g: Vec<Tensor> = method
                .params()
                .vars()
                .iter()
                .map(|v| grads.get(v.as_tensor()).unwrap().clone())
                .collect();
            (out, g)
        };
        let (out_d, grads_d) = run(dense);
        let (out_q, grads_q) = run(quant);
        let rel = |a: &Tensor, b: &Tensor| {
            let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            max_abs_diff(a, b) / scale
        };
        assert!(rel(&out_q, &out_d) <= 1e-5, "{dtype:?}: logits differ");
        for (i, (a, b)) in grads_q.iter().zip(&grads_d).enumerate() {
            assert!(
                rel(a, b) <= 1e-5,
                "{dtype:?}: gradient {i} differs by {}",
                rel(a, b)
            );
        }
    }
}
