//! Malformed checkpoints fail with errors naming the file and tensor, never a panic.

mod common;

use candle_core::{Device, Tensor};
use common::tiny_model;
use peftbench_backbone::{load_model_dir, save_model_dir, BackboneError};
use std::path::Path;

fn saved(model_type: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    save_model_dir(&tiny_model(model_type, 2), dir.path()).unwrap();
    dir
}

fn load_err(dir: &Path) -> (BackboneError, String) {
    let e = load_model_dir(dir, &Device::Cpu).expect_err("loading should fail");
    let msg = e.to_string();
    (e, msg)
}

#[test]
fn missing_config_names_the_file() {
    let dir = saved("bert");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, BackboneError::Io { .. }), "{msg}");
    assert!(msg.contains("config.json"), "{msg}");
}

#[test]
fn garbled_config_names_file_and_position() {
    let dir = saved("bert");
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"bert\",\n  \"hidden_size\": }",
    )
    .unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, BackboneError::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("line 2"),
        "{msg}"
    );
}

#[test]
fn config_missing_a_key_names_the_key() {
    let dir = saved("llama");
    let path = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(&path, v.to_string()).unwrap();
    let (_, msg) = load_err(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("num_attention_heads"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let dir = saved("gpt2");
    let path = dir.path().join("config.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"gpt2\"", "\"mamba\"");
    std::fs::write(&path, text).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(
        matches!(e, BackboneError::UnknownArchitecture { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("mamba") && msg.contains("config.json"),
        "{msg}"
    );
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn missing_tensor_names_file_and_tensor() {
    let dir = saved("llama");
    rewrite_weights(dir.path(), |t| {
        t.remove("model.layers.1.self_attn.k_proj.weight");
    });
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, BackboneError::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("model.layers.1.self_attn.k_proj.weight"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let dir = saved("bert");
    rewrite_weights(dir.path(), |t| {
        t.insert(
            "encoder.layer.0.attention.self.query.weight".into(),
            Tensor::zeros((16, 15), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, BackboneError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("encoder.layer.0.attention.self.query.weight")
            && msg.contains("[16, 15]")
            && msg.contains("[16, 16]"),
        "{msg}"
    );
}

#[test]
fn truncated_safetensors_is_an_error_not_a_panic() {
    let dir = saved("gpt2");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (e, msg) = load_err(dir.path());
    assert!(matches!(e, BackboneError::Safetensors { .. }), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn missing_tokenizer_names_the_file() {
    let dir = saved("bert");
    let err = peftbench_backbone::TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 16)
        .err()
        .expect("no tokenizer there");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let model = tiny_model("bert", 1);
    let inputs = peftbench_backbone::pad_rows(&[vec![1, 2, 999]], None, 0, &Device::Cpu).unwrap();
    let err = model
        .forward(&inputs, &peftbench_backbone::NoIntervention)
        .unwrap_err();
    assert!(err.to_string().contains("999"), "{err}");
}
