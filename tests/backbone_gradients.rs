//! Backward through the backbone agrees with finite differences, and frozen weights get none.

mod common;

use candle_core::{Device, Tensor, Var};
use common::tiny_model;
use peftbench_backbone::{lm_logits, Initializer, Inputs, NoIntervention, Transformer};

fn batch() -> Inputs {
    let ids =
        Tensor::from_vec(vec![1u32, 7, 3, 9, 22, 4, 5, 8, 2, 0], (2, 5), &Device::Cpu).unwrap();
    let mask =
        Tensor::from_vec(vec![1u32, 1, 1, 1, 1, 1, 1, 1, 0, 0], (2, 5), &Device::Cpu).unwrap();
    Inputs {
        input_ids: ids,
        attention_mask: mask,
        token_type_ids: None,
        packing: None,
    }
}

/// A scalar loss: logits weighted by a fixed random tensor (every logit matters).
fn loss(model: &Transformer, probe: &Tensor) -> Tensor {
    let enc = model.forward(&batch(), &NoIntervention).unwrap();
    let logits = lm_logits(model, &enc).unwrap();
    (logits * probe).unwrap().sum_all().unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Turns every weight into a variable and checks d(loss)/d(w) at a few entries of each
/// tensor against central differences.
fn check_family(model_type: &str) {
    let mut model = tiny_model(model_type, 3);
    let mut vars: Vec<(String, Var)> = Vec::new();
    model.for_each_weight_mut(&mut |name, t| {
        let v = Var::from_tensor(t).unwrap();
        *t = v.as_tensor().clone();
        vars.push((name.to_string(), v));
    });
    let vocab = model.config.vocab_size;
    let probe = Initializer::new(9)
        .normal((2, 5, vocab), 1.0, &Device::Cpu)
        .unwrap();
    let grads = loss(&model, &probe).backward().unwrap();
    let mut init = Initializer::new(17);
    let eps = 1e-2f32;
    let mut checked = 0;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = var.elem_count();
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for _ in 0..2 {
            let i = init.index(n);
            let mut plus = base.clone();
            plus[i] += eps;
            var.set(&Tensor::from_vec(plus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lp = scalar(&loss(&model, &probe));
            let mut minus = base.clone();
            minus[i] -= eps;
            var.set(&Tensor::from_vec(minus, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let lm = scalar(&loss(&model, &probe));
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (lp - lm) / (2.0 * eps as f64);
            let analytic = g[i] as f64;
            let tol = 2e-3 + 2e-2 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() <= tol,
                "{model_type} {name}[{i}]: analytic {analytic} vs numeric {numeric}"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "{model_type}: only {checked} entries checked"
    );
}

#[test]
fn bert_gradients_match_finite_differences() {
    check_family("bert");
}

#[test]
fn gpt2_gradients_match_finite_differences() {
    check_family("gpt2");
}

#[test]
fn llama_gradients_match_finite_differences() {
    check_family("llama");
}

#[test]
fn frozen_weights_receive_no_gradient() {
    // With plain-tensor weights and one trainable input perturbation, only that variable
    // appears in the gradient store.
    let model = tiny_model("llama", 1);
    struct Nudge(Tensor);
    impl peftbench_backbone::Intervention for Nudge {
        fn after_block(
            &self,
            _l: usize,
            _b: peftbench_backbone::Block,
            out: Tensor,
        ) -> candle_core::Result<Tensor> {
            out.broadcast_add(&self.0)
        }
    }
    let v = Var::zeros(16, candle_core::DType::F32, &Device::Cpu).unwrap();
    let enc = model
        .forward(&batch(), &Nudge(v.as_tensor().clone()))
        .unwrap();
    let grads = enc.hidden.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(v.as_tensor()).is_some());
    model.for_each_weight(&mut |name, t| {
        assert!(!t.is_variable(), "{name} is a variable");
        assert!(grads.get(t).is_none(), "{name} received a gradient");
    });
}
