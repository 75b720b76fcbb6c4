//! Property tests of every method's invariants over random shapes, ranks, lengths, seeds and
//! inputs. Each test is named after the invariant it checks.

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::Optimizer;
use peftbench_backbone::{
    lm_logits, pad_rows, pool, HeadKind, Initializer, Inputs, Intervention, ModelConfig,
    NoIntervention, Pooling, SequenceHead, TrainableParams, Transformer,
};
use peftbench_methods::*;
use proptest::prelude::*;
use serde_json::json;
use std::path::Path;

const FAMILIES: [&str; 3] = ["bert", "gpt2", "llama"];

/// A random small model of one family.
fn model(family: &str, heads: usize, head_dim: usize, layers: usize, seed: u64) -> Transformer {
    let h = heads * head_dim;
    let v = match family {
        "bert" => json!({"model_type": "bert", "vocab_size": 40, "hidden_size": h,
            "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 2 * h,
            "max_position_embeddings": 96, "type_vocab_size": 2}),
        "gpt2" => json!({"model_type": "gpt2", "vocab_size": 40, "n_embd": h, "n_layer": layers,
            "n_head": heads, "n_inner": 2 * h, "n_positions": 96}),
        _ => json!({"model_type": "llama", "vocab_size": 40, "hidden_size": h,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": if heads.is_multiple_of(2) { heads / 2 } else { heads },
            "intermediate_size": 2 * h, "max_position_embeddings": 96}),
    };
    let cfg = ModelConfig::from_json(&v, Path::new("test/config.json")).unwrap();
    Transformer::random(cfg, seed, &Device::Cpu).unwrap()
}

/// Random token rows of the given lengths, right-padded.
fn batch(lens: &[usize], seed: u64) -> Inputs {
    let mut init = Initializer::new(seed);
    let rows: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| 1 + init.index(39) as u32).collect())
        .collect();
    pad_rows(&rows, None, 0, &Device::Cpu).unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    max_abs(a, b) / scale
}

fn hidden(m: &Transformer, x: &Inputs, iv: &dyn Intervention) -> Tensor {
    m.forward(x, iv).unwrap().hidden
}

/// Sets every variable of a method to random values (so it is not at its identity init).
fn randomize(params: &TrainableParams, seed: u64, std: f64) {
    let mut init = Initializer::new(seed);
    for (_, v) in params.entries() {
        v.set(&init.normal(v.shape(), std, v.device()).unwrap())
            .unwrap();
    }
}

/// Every method with small random size knobs.
fn any_method() -> impl Strategy<Value = MethodConfig> {
    (0usize..16, 1usize..5, 0usize..4, any::<bool>()).prop_map(|(k, n, p, flag)| match k {
        0 => MethodConfig::Lora(LoraConfig {
            use_rslora: flag,
            target_modules: Targets(vec!["all-linear".into()]),
            // Factors from W need rank ≤ the smallest side (2 in the smallest models).
            init: [
                LoraInit::Kaiming,
                LoraInit::Gaussian,
                LoraInit::Pissa,
                LoraInit::Olora,
            ][p],
            rank: if p >= 2 { n.min(2) } else { n },
            ..Default::default()
        }),
        1 => MethodConfig::Adalora(AdaLoraConfig {
            init_r: n + 1,
            target_r: n,
            total_step: 10,
            ..Default::default()
        }),
        2 => MethodConfig::Adapter(AdapterConfig {
            bottleneck: n,
            variant: if flag {
                AdapterVariant::Houlsby
            } else {
                AdapterVariant::Pfeiffer
            },
            ..Default::default()
        }),
        3 => MethodConfig::PrefixTuning(PrefixTuningConfig {
            num_virtual_tokens: p + 1,
            encoder_hidden_size: n + 2,
        }),
        4 => MethodConfig::PromptTuning(PromptTuningConfig {
            num_virtual_tokens: p + 1,
            init: PromptInit::SampleVocab,
            input_keeps_positions: false,
        }),
        5 => MethodConfig::PTuning(PTuningConfig {
            num_virtual_tokens: p + 1,
            encoder_type: if flag {
                PromptEncoderType::Lstm
            } else {
                PromptEncoderType::Mlp
            },
            encoder_hidden_size: n + 1,
            input_keeps_positions: false,
        }),
        6 => MethodConfig::PTuningV2(PTuningV2Config {
            num_virtual_tokens: p + 1,
            prefix_projection: flag,
            encoder_hidden_size: n + 2,
        }),
        7 => MethodConfig::Ia3(Ia3Config {
            target_modules: flag.then(|| Targets(vec!["query".into(), "up".into(), "down".into()])),
            feedforward_modules: flag.then(|| Targets(vec!["down".into()])),
        }),
        8 => MethodConfig::LnTuning(LnTuningConfig {
            target_modules: if flag {
                vec!["all".into()]
            } else {
                vec!["attn_norm".into()]
            },
        }),
        9 => MethodConfig::BitFit(BitFitConfig { norm_biases: flag }),
        10 => MethodConfig::LoraPlus(LoraPlusConfig(LoraConfig {
            rank: n,
            ..Default::default()
        })),
        _ => MethodConfig::full_finetune(),
    })
}

fn lora_plus_default() -> f64 {
    peftbench_methods::lora::LORAPLUS_DEFAULT_RATIO
}

/// Sets every variable of a method to 1 plus noise (scaling vectors away from their identity).
fn randomize_around_one(params: &TrainableParams, seed: u64, std: f64) {
    let mut init = Initializer::new(seed);
    for (_, v) in params.entries() {
        let noise = init.normal(v.shape(), std, v.device()).unwrap();
        v.set(&(noise + 1.0).unwrap()).unwrap();
    }
}

fn shape() -> impl Strategy<Value = (usize, usize, usize, usize, u64)> {
    (
        0usize..3,
        1usize..4,
        prop::sample::select(vec![2usize, 4]),
        1usize..3,
        any::<u64>(),
    )
}

/// `n` cases, or `PROPTEST_CASES` when set, for longer hunts for failing inputs.
fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(n);
    ProptestConfig {
        cases: n,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn lora_zero_b_leaves_output_unchanged((f, heads, hd, layers, seed) in shape(), rank in 1usize..6, len in 1usize..7) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[len, len.max(2) - 1], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = LoraConfig { rank, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let lora = Lora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &lora), &base), 0.0);
    }

    #[test]
    fn adalora_zero_lambda_leaves_output_unchanged((f, heads, hd, layers, seed) in shape(), r in 1usize..6) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[5, 3], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = AdaLoraConfig { init_r: r + 1, target_r: r, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let ada = AdaLora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        // P and Q are random at init; Λ = 0 alone must make the update vanish.
        prop_assert_eq!(max_abs(&hidden(&m, &x, &ada), &base), 0.0);
    }

    #[test]
    fn lora_merged_forward_equals_unmerged((f, heads, hd, layers, seed) in shape(), rank in 1usize..6, rs in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[6, 4], seed);
        let cfg = LoraConfig { rank, use_rslora: rs, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let lora = Lora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(lora.params(), seed ^ 1, 0.1);
        let unmerged = hidden(&m, &x, &lora);
        lora.merge(&mut m).unwrap();
        let merged = hidden(&m, &x, &lora);
        // x·(W + sBA)ᵀ and x·Wᵀ + s(x·Aᵀ)·Bᵀ round differently in f32, and layer norm over a
        // hidden size of 2 amplifies that by up to 1/√eps ≈ 300 (1.2e-5 seen), so 1e-4; a wrong
        // scale or a transposed delta moves the output by O(1).
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
    }

    #[test]
    fn lora_unmerge_restores_base_weights((f, heads, hd, layers, seed) in shape(), rank in 1usize..6) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let cfg = LoraConfig { rank, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let lora = Lora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(lora.params(), seed ^ 2, 0.1);
        lora.merge(&mut m).unwrap();
        let moved = m.sites().iter().any(|s| max_abs(&m.linear(*s).unwrap().weight, &before.linear(*s).unwrap().weight) > 0.0);
        prop_assert!(moved, "merge changed no weight");
        lora.unmerge(&mut m).unwrap();
        for s in m.sites() {
            let d = max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight);
            prop_assert!(d <= 1e-6, "{} differs by {}", s, d);
        }
    }

    #[test]
    fn ia3_at_ones_is_the_identity((f, heads, hd, layers, seed) in shape(), len in 1usize..7) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[len, len.max(2) - 1], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = Ia3Config { target_modules: Some(Targets(vec!["all-linear".into()])), feedforward_modules: Some(Targets(vec!["down".into(), "attn_out".into()])) };
        let ia3 = Ia3::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &ia3), &base), 0.0);
    }

    #[test]
    fn ia3_merged_forward_equals_unmerged_and_unmerge_restores((f, heads, hd, layers, seed) in shape()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[6, 4], seed);
        let cfg = Ia3Config { target_modules: Some(Targets(vec!["all-linear".into()])), feedforward_modules: Some(Targets(vec!["down".into(), "up".into()])) };
        let ia3 = Ia3::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        randomize_around_one(ia3.params(), seed ^ 7, 0.2);
        let unmerged = hidden(&m, &x, &ia3);
        // A LayerNorm over 2 values outputs ±1 whatever the scale, so only wider models show it.
        if m.config.hidden_size > 2 {
            prop_assert!(max_abs(&unmerged, &hidden(&m, &x, &NoIntervention)) > 0.0, "the vectors change nothing");
        }
        ia3.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, &ia3);
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        ia3.unmerge_from(&mut m).unwrap();
        for s in m.sites() {
            let d = max_rel(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight);
            prop_assert!(d <= 1e-6, "{} differs by {}", s, d);
        }
    }

    #[test]
    fn ln_tuning_at_init_is_the_identity_and_merges_exactly((f, heads, hd, layers, seed) in shape()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[5, 3], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let ln = LnTuning::attach(&LnTuningConfig::default(), &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &ln), &base), 0.0);
        prop_assert_eq!(ln.norms().len(), m.norm_sites().len());
        randomize_around_one(ln.params(), seed ^ 9, 0.2);
        let unmerged = hidden(&m, &x, &ln);
        prop_assert!(max_abs(&unmerged, &base) > 0.0, "the trained norms change nothing");
        ln.merge_into(&mut m).unwrap();
        // Merging swaps the same tensors in: the same arithmetic, the same bits.
        prop_assert_eq!(max_abs(&hidden(&m, &x, &ln), &unmerged), 0.0);
        ln.unmerge_from(&mut m).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &NoIntervention), &base), 0.0);
        for s in m.norm_sites() {
            let (mut a, mut b) = (m.clone(), before.clone());
            let ta: Vec<Tensor> = a.norm_mut(s).unwrap().tensors_mut().into_iter().map(|(_, t)| t.clone()).collect();
            let tb: Vec<Tensor> = b.norm_mut(s).unwrap().tensors_mut().into_iter().map(|(_, t)| t.clone()).collect();
            for (x, y) in ta.iter().zip(&tb) {
                prop_assert_eq!(max_abs(x, y), 0.0, "{} not restored", s);
            }
        }
    }

    #[test]
    fn bitfit_at_init_is_the_identity_and_merges((f, heads, hd, layers, seed) in shape(), norms in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[5, 3], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = BitFitConfig { norm_biases: norms };
        let attached = MethodConfig::BitFit(cfg.clone()).attach(&mut AttachContext::new(&mut m, seed));
        if FAMILIES[f] == "llama" {
            let e = attached.err().expect("a bias-free model is refused").to_string();
            prop_assert!(e.contains("no bias"), "{}", e);
            return Ok(());
        }
        let bf = attached.unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, bf.as_ref()), &base), 0.0);
        randomize(bf.params(), seed ^ 11, 0.2);
        let unmerged = hidden(&m, &x, bf.as_ref());
        // A LayerNorm over 2 values outputs ±1: only its own bias shows through there.
        if m.config.hidden_size > 2 || norms {
            prop_assert!(max_abs(&unmerged, &base) > 0.0, "the offsets change nothing");
        }
        bf.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, bf.as_ref());
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        // Only biases moved: every projection weight is bit-identical.
        for s in m.sites() {
            prop_assert_eq!(max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight), 0.0);
        }
        bf.unmerge_from(&mut m).unwrap();
        prop_assert!(max_rel(&hidden(&m, &x, &NoIntervention), &base) <= 1e-5);
    }

    #[test]
    fn lora_plus_puts_every_b_in_a_group_at_the_ratio((f, heads, hd, layers, seed) in shape(), rank in 1usize..5, ratio in 0.5f64..64.0, set in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let lora = LoraConfig { rank, loraplus_lr_ratio: set.then_some(ratio), target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let want = if set { ratio } else { lora_plus_default() };
        let attached = MethodConfig::LoraPlus(LoraPlusConfig(lora)).attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        let groups = attached.lr_groups();
        prop_assert_eq!(groups.len(), 2);
        let names: std::collections::HashMap<_, _> = attached.params().entries().iter().map(|(n, v)| (v.as_tensor().id(), n.clone())).collect();
        let (a, b) = (&groups[0], &groups[1]);
        prop_assert_eq!(a.1, 1.0);
        prop_assert_eq!(b.1, want);
        prop_assert!(a.0.iter().all(|v| names[&v.as_tensor().id()].ends_with(".lora_A")));
        prop_assert!(b.0.iter().all(|v| names[&v.as_tensor().id()].ends_with(".lora_B")));
        prop_assert_eq!(a.0.len() + b.0.len(), attached.params().entries().len());
        prop_assert_eq!(a.0.len(), b.0.len());
        // Plain LoRA keeps one group at the rate.
        let plain = MethodConfig::Lora(LoraConfig { rank, ..Default::default() }).attach(&mut AttachContext::new(&mut model(FAMILIES[f], heads, hd, layers, seed), seed)).unwrap();
        prop_assert_eq!(plain.lr_groups().len(), 1);
    }

    #[test]
    fn dora_equals_the_base_at_init_and_merged_equals_unmerged((f, heads, hd, layers, seed) in shape(), rank in 1usize..5) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[6, 4], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = DoraConfig(LoraConfig { rank, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() });
        let dora = Dora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &dora), &base), 0.0);
        // B and the magnitudes off their initial values.
        let mut init = Initializer::new(seed ^ 13);
        for (name, v) in dora.params().entries() {
            let noise = init.normal(v.shape(), 0.1, v.device()).unwrap();
            if name.ends_with(".lora_magnitude") {
                let t = (v.as_tensor().detach().copy().unwrap() * (noise + 1.0).unwrap()).unwrap();
                v.set(&t).unwrap();
            } else if name.ends_with(".lora_B") {
                v.set(&noise).unwrap();
            }
        }
        let unmerged = hidden(&m, &x, &dora);
        if m.config.hidden_size > 2 {
            prop_assert!(max_abs(&unmerged, &base) > 0.0, "DoRA changed nothing");
        }
        dora.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, &dora);
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        dora.unmerge_from(&mut m).unwrap();
        for s in m.sites() {
            prop_assert_eq!(max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight), 0.0);
        }
    }

    #[test]
    fn dora_dropout_acts_only_in_training_and_on_both_terms((f, heads, hd, layers, seed) in shape(), rank in 1usize..4, p in 0.1f64..0.6) {
        let x = batch(&[6, 4], seed);
        let attach = |dropout: f64, m: &mut Transformer| {
            let cfg = DoraConfig(LoraConfig { rank, lora_dropout: dropout, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() });
            Dora::attach(&cfg, &mut AttachContext::new(m, seed)).unwrap()
        };
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let base = hidden(&m, &x, &NoIntervention);
        let dora = attach(p, &mut m);
        dora.set_training(true);
        // At init DoRA adds exact zeros, whatever the mask.
        prop_assert_eq!(max_abs(&hidden(&m, &x, &dora), &base), 0.0);
        // Magnitudes off ‖W‖ with B still zero: the only change is (m/‖W‖ − 1)·W·x̃, so the
        // mask shows unless W·x is (wrongly) taken from the undropped output.
        let mut init = Initializer::new(seed ^ 29);
        for (name, v) in dora.params().entries() {
            if name.ends_with(".lora_magnitude") {
                let noise = init.normal(v.shape(), 0.2, v.device()).unwrap();
                let t = (v.as_tensor().detach().copy().unwrap() * (noise + 1.0).unwrap()).unwrap();
                v.set(&t).unwrap();
            }
        }
        let trained = hidden(&m, &x, &dora);
        dora.set_training(false);
        let eval = hidden(&m, &x, &dora);
        if m.config.hidden_size > 2 {
            prop_assert!(max_abs(&trained, &eval) > 0.0, "dropout left the base term alone");
        }
        // Out of training, dropout is off: the same parameters without dropout give the same output.
        let mut m0 = model(FAMILIES[f], heads, hd, layers, seed);
        let plain = attach(0.0, &mut m0);
        for ((n0, v0), (n, v)) in plain.params().entries().iter().zip(dora.params().entries()) {
            prop_assert_eq!(n0, n);
            v0.set(v.as_tensor()).unwrap();
        }
        prop_assert_eq!(max_abs(&hidden(&m0, &x, &plain), &eval), 0.0);
    }

    #[test]
    fn dora_magnitude_starts_at_the_row_norms_of_w((f, heads, hd, layers, seed) in shape(), rank in 1usize..5) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let cfg = DoraConfig(LoraConfig { rank, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() });
        let dora = Dora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        for site in dora.lora().pairs().keys() {
            let w = &m.linear(*site).unwrap().weight;
            let want = w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
            let got = dora.params().get(&format!("{site}.lora_magnitude")).unwrap();
            prop_assert!(max_rel(got.as_tensor(), &want) <= 1e-6, "{}", site);
        }
    }

    #[test]
    fn vera_is_the_identity_at_init_merges_and_remakes_its_matrices_from_the_seed((f, heads, hd, layers, seed) in shape(), r in 1usize..6, key in any::<u64>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[6, 4], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = VeraConfig { r, target_modules: Targets(vec!["all-linear".into()]), projection_prng_key: key, ..Default::default() };
        let vera = Vera::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &vera), &base), 0.0);
        // The shared matrices depend on the key alone, not on the run's seed.
        let again = Vera::attach(&cfg, &mut AttachContext::new(&mut m.clone(), seed ^ 99)).unwrap();
        let mc = m.config.clone();
        let (sa, sb) = (vera.peft_state(&mc, peftbench_backbone::HfTask::FeatureExtraction), again.peft_state(&mc, peftbench_backbone::HfTask::FeatureExtraction));
        if FAMILIES[f] != "gpt2" {
            let (sa, sb) = (sa.unwrap().unwrap(), sb.unwrap().unwrap());
            for k in 0..2 {
                prop_assert_eq!(max_abs(&sa.tensors[k].1, &sb.tensors[k].1), 0.0);
            }
        }
        randomize(vera.params(), seed ^ 17, 0.3);
        let unmerged = hidden(&m, &x, &vera);
        vera.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, &vera);
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        vera.unmerge_from(&mut m).unwrap();
        for s in m.sites() {
            let d = max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight);
            prop_assert!(d <= 1e-6, "{} differs by {}", s, d);
        }
    }

    #[test]
    fn loha_gives_zero_delta_at_init_and_merges((f, heads, hd, layers, seed) in shape(), r in 1usize..5) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[6, 4], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = LohaConfig { r, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let loha = Loha::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &loha), &base), 0.0);
        randomize(loha.params(), seed ^ 19, 0.3);
        let unmerged = hidden(&m, &x, &loha);
        loha.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, &loha);
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        loha.unmerge_from(&mut m).unwrap();
        for s in m.sites() {
            let d = max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight);
            prop_assert!(d <= 1e-6, "{} differs by {}", s, d);
        }
    }

    #[test]
    fn lokr_gives_zero_delta_at_init_and_merges((f, heads, hd, layers, seed) in shape(), r in 1usize..5, both in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let before = m.clone();
        let x = batch(&[6, 4], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = LokrConfig { r, decompose_both: both, target_modules: Targets(vec!["all-linear".into()]), ..Default::default() };
        let lokr = Lokr::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &lokr), &base), 0.0);
        randomize(lokr.params(), seed ^ 23, 0.3);
        let unmerged = hidden(&m, &x, &lokr);
        lokr.merge_into(&mut m).unwrap();
        let merged = hidden(&m, &x, &lokr);
        prop_assert!(max_rel(&merged, &unmerged) <= 1e-4, "rel diff {}", max_rel(&merged, &unmerged));
        lokr.unmerge_from(&mut m).unwrap();
        for s in m.sites() {
            let d = max_abs(&m.linear(s).unwrap().weight, &before.linear(s).unwrap().weight);
            prop_assert!(d <= 1e-6, "{} differs by {}", s, d);
        }
    }

    #[test]
    fn lokr_factorization_multiplies_back_with_the_smaller_first(dim in 1usize..5000, factor in prop::sample::select(vec![-1i64, 2, 3, 4, 8, 16])) {
        let (m, n) = peftbench_methods::lokr::factorization(dim, factor);
        prop_assert_eq!(m * n, dim);
        prop_assert!(m <= n);
    }

    #[test]
    fn pissa_and_olora_residual_plus_update_is_w_and_save_converts_to_the_original_base((f, heads, hd, layers, seed) in (0usize..3, 1usize..4, prop::sample::select(vec![4usize, 8]), 1usize..3, any::<u64>()), rank in 1usize..4, olora in any::<bool>()) {
        let original = model(FAMILIES[f], heads, hd, layers, seed);
        let mut m = original.clone();
        let init = if olora { LoraInit::Olora } else { LoraInit::Pissa };
        let cfg = LoraConfig { rank, init, target_modules: Targets(vec!["query".into(), "value".into()]), ..Default::default() };
        let lora = Lora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        for (site, pair) in lora.pairs() {
            let rebuilt = (&m.linear(*site).unwrap().weight + (pair.b.matmul(&pair.a).unwrap() * pair.scaling).unwrap()).unwrap();
            let w = &original.linear(*site).unwrap().weight;
            prop_assert!(max_rel(&rebuilt, w) <= 1e-5, "{}: residual + s·B·A is {} from W", site, max_rel(&rebuilt, w));
        }
        let x = batch(&[5, 3], seed);
        randomize(lora.params(), seed ^ 29, 0.2);
        let trained = hidden(&m, &x, &lora);
        if FAMILIES[f] == "gpt2" {
            return Ok(());
        }
        // Saved in PEFT's form, the adapter applies to the original base.
        let task = peftbench_backbone::HfTask::FeatureExtraction;
        let state = lora.peft_state(&original.config, task).unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        peft::write(dir.path(), &state, &original.config, task, "base", None).unwrap();
        let read = peft::read(dir.path(), &original).unwrap();
        let again = hidden(&original, &x, read.method.as_ref());
        prop_assert!(max_rel(&again, &trained) <= 1e-4, "rel diff {}", max_rel(&again, &trained));
    }

    #[test]
    fn adapter_zero_up_projection_is_identity((f, heads, hd, layers, seed) in shape(), m_ in 1usize..6, houlsby in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[4, 6], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = AdapterConfig { bottleneck: m_, variant: if houlsby { AdapterVariant::Houlsby } else { AdapterVariant::Pfeiffer }, ..Default::default() };
        let ad = Adapter::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, &ad), &base), 0.0);
    }

    #[test]
    fn adapter_computes_x_plus_f_x((f, heads, hd, layers, seed) in shape(), m_ in 1usize..6, rows in 1usize..5) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let ad = Adapter::attach(&AdapterConfig { bottleneck: m_, ..Default::default() }, &mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(ad.params(), seed ^ 3, 0.3);
        let h = m.config.hidden_size;
        let x = Initializer::new(seed).normal((rows, 3, h), 1.0, &Device::Cpu).unwrap();
        let out = ad.after_block(0, peftbench_backbone::Block::Ffn, x.clone()).unwrap();
        let fx = ad.branch(0, peftbench_backbone::Block::Ffn, &x).unwrap().unwrap();
        prop_assert!(max_abs(&out, &(&x + &fx).unwrap()) <= 1e-6);
        prop_assert!(max_abs(&fx, &x.zeros_like().unwrap()) > 0.0, "f(x) is zero after randomising");
    }

    #[test]
    fn zero_length_prefix_leaves_output_unchanged((f, heads, hd, layers, seed) in shape(), v2 in any::<bool>(), proj in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[5, 2], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = if v2 {
            MethodConfig::PTuningV2(PTuningV2Config { num_virtual_tokens: 0, prefix_projection: proj, encoder_hidden_size: 4 })
        } else {
            MethodConfig::PrefixTuning(PrefixTuningConfig { num_virtual_tokens: 0, encoder_hidden_size: 4 })
        };
        let method = cfg.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        prop_assert_eq!(max_abs(&hidden(&m, &x, method.as_ref()), &base), 0.0);
    }

    #[test]
    fn a_prompt_without_positions_leaves_the_input_at_its_own((f, heads, hd, layers, seed) in shape(), ptuning in any::<bool>(), p in 1usize..5, len in 1usize..6) {
        // Position rows past the input's own are what a shifted input reads: changing them
        // must move the input's hidden states only when the prompt takes positions.
        let family = ["bert", "gpt2"][f % 2];
        for keeps in [true, false] {
            let mut m = model(family, heads, hd, layers, seed);
            let cfg = if ptuning {
                MethodConfig::PTuning(PTuningConfig { num_virtual_tokens: p, encoder_hidden_size: 3, input_keeps_positions: keeps, ..Default::default() })
            } else {
                MethodConfig::PromptTuning(PromptTuningConfig { num_virtual_tokens: p, init: PromptInit::SampleVocab, input_keeps_positions: keeps })
            };
            let method = cfg.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
            randomize(method.params(), seed ^ 9, 0.5);
            let x = batch(&[len], seed);
            let input = |m: &Transformer| hidden(m, &x, method.as_ref()).i((.., p.., ..)).unwrap();
            let before = input(&m);
            let table = m.embeddings.position.clone().unwrap();
            let h = table.dims()[1];
            let from = m.config.position_offset + len;
            let bump = Tensor::arange(0f32, (p * h) as f32, &Device::Cpu).unwrap().reshape((p, h)).unwrap().sin().unwrap();
            let rows = (table.i(from..from + p).unwrap() + bump).unwrap();
            m.embeddings.position = Some(Tensor::cat(&[table.i(..from).unwrap(), rows, table.i(from + p..).unwrap()], 0).unwrap());
            let d = max_abs(&input(&m), &before);
            if keeps {
                prop_assert_eq!(d, 0.0, "{}: the input moved with rows it does not sit at", family);
            } else if h > 2 {
                // (Layer norm over two values keeps only their order, so a change can vanish.)
                prop_assert!(d > 1e-4, "{}: a shifted input did not read rows {}..{} ({})", family, from, from + p, d);
            }
        }
    }

    #[test]
    fn a_prompt_without_positions_is_refused_on_rotary_models(seed in any::<u64>(), ptuning in any::<bool>()) {
        let mut m = model("llama", 2, 2, 1, seed);
        let cfg = if ptuning {
            MethodConfig::PTuning(PTuningConfig { input_keeps_positions: true, ..Default::default() })
        } else {
            MethodConfig::PromptTuning(PromptTuningConfig { input_keeps_positions: true, ..Default::default() })
        };
        let err = cfg.attach(&mut AttachContext::new(&mut m, seed)).err().expect("refused").to_string();
        prop_assert!(err.contains("input_keeps_positions") && err.contains("Llama"), "{}", err);
    }

    #[test]
    fn zero_virtual_tokens_leave_output_unchanged((f, heads, hd, layers, seed) in shape(), ptuning in any::<bool>(), lstm in any::<bool>()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[3, 5], seed);
        let base = hidden(&m, &x, &NoIntervention);
        let cfg = if ptuning {
            MethodConfig::PTuning(PTuningConfig { num_virtual_tokens: 0, encoder_type: if lstm { PromptEncoderType::Lstm } else { PromptEncoderType::Mlp }, encoder_hidden_size: 3, input_keeps_positions: false })
        } else {
            MethodConfig::PromptTuning(PromptTuningConfig { num_virtual_tokens: 0, init: PromptInit::Random, input_keeps_positions: false })
        };
        let method = cfg.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        let out = m.forward(&x, method.as_ref()).unwrap();
        prop_assert_eq!(out.input_prefix_len, 0);
        prop_assert_eq!(max_abs(&out.hidden, &base), 0.0);
    }

    #[test]
    fn padding_never_changes_outputs_at_real_tokens((f, heads, hd, layers, seed) in shape(), method in any_method(), len in 1usize..6, extra in 1usize..4) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m.config).is_ok());
        let attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(attached.params(), seed ^ 4, 0.05);
        let alone = batch(&[len], seed);
        // The same row, padded because a longer row shares its batch.
        let ids: Vec<u32> = alone.input_ids.i(0).unwrap().to_vec1().unwrap();
        let longer: Vec<u32> = (0..len + extra).map(|i| 1 + (i as u32 * 7) % 39).collect();
        let padded = pad_rows(&[ids, longer], None, 0, &Device::Cpu).unwrap();
        let a = m.forward(&alone, attached.as_ref()).unwrap();
        let b = m.forward(&padded, attached.as_ref()).unwrap();
        let n = a.input_prefix_len + len;
        let d = max_abs(&a.hidden.i(0).unwrap(), &b.hidden.i((0, 0..n)).unwrap());
        prop_assert!(d <= 1e-5, "{}: padding moved real tokens by {}", method.name(), d);
    }

    #[test]
    fn mean_pooling_reads_only_the_inputs_own_tokens((f, heads, hd, layers, seed) in shape(), method in any_method(), len in 1usize..6, extra in 0usize..4) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m.config).is_ok());
        let attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(attached.params(), seed ^ 6, 0.05);
        let x = batch(&[len, len + extra], seed);
        let enc = m.forward(&x, attached.as_ref()).unwrap();
        let pooled = pool(&enc, Pooling::Mean).unwrap();
        let p = enc.input_prefix_len;
        for (row, n) in [len, len + extra].into_iter().enumerate() {
            let want = enc.hidden.i((row, p..p + n)).unwrap().mean(0).unwrap();
            let d = max_abs(&pooled.i(row).unwrap(), &want);
            prop_assert!(d <= 1e-5, "{}: row {} pooled {} away from its tokens' mean", method.name(), row, d);
        }
    }

    #[test]
    fn decoder_position_never_sees_later_tokens((f, heads, hd, layers, seed) in (1usize..3, 1usize..4, prop::sample::select(vec![2usize, 4]), 1usize..3, any::<u64>()), method in any_method(), len in 2usize..7, cut in 0usize..5) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m.config).is_ok());
        let attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        randomize(attached.params(), seed ^ 5, 0.05);
        let t = cut % (len - 1);
        let a = batch(&[len], seed);
        let mut ids: Vec<u32> = a.input_ids.i(0).unwrap().to_vec1().unwrap();
        for id in ids.iter_mut().skip(t + 1) {
            *id = 1 + (*id + 5) % 39;
        }
        let b = pad_rows(&[ids], None, 0, &Device::Cpu).unwrap();
        let ea = m.forward(&a, attached.as_ref()).unwrap();
        let eb = m.forward(&b, attached.as_ref()).unwrap();
        let n = ea.input_prefix_len + t + 1;
        let d = max_abs(&ea.hidden.i((.., 0..n)).unwrap(), &eb.hidden.i((.., 0..n)).unwrap());
        prop_assert!(d <= 1e-6, "{}: position {} saw later tokens ({})", method.name(), t, d);
    }

    #[test]
    fn exported_prefix_matches_training_form((f, heads, hd, layers, seed) in shape(), p in 1usize..6, mid in 1usize..8) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let x = batch(&[4, 6], seed);
        let cfg = PrefixTuningConfig { num_virtual_tokens: p, encoder_hidden_size: mid };
        let pt = PrefixTuning::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        let exported = pt.export().unwrap();
        prop_assert_eq!(exported.table().elem_count(), cfg.num_kept(&m.config));
        let a = lm_logits(&m, &m.forward(&x, &pt).unwrap()).unwrap();
        let b = lm_logits(&m, &m.forward(&x, &exported).unwrap()).unwrap();
        prop_assert_eq!(max_abs(&a, &b), 0.0);
    }

    #[test]
    fn trainable_count_matches_variables_and_formula((f, heads, hd, layers, seed) in shape(), method in any_method()) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m.config).is_ok());
        let formula = method.num_trainable(&m).unwrap();
        let attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        let counted: usize = attached.params().vars().iter().map(|v| v.elem_count()).sum();
        prop_assert_eq!(attached.params().count(), counted);
        prop_assert_eq!(counted, formula, "{}", method.name());
    }
}

/// Training steps on a classification loss; returns the last step's gradients.
fn train_steps(
    m: &Transformer,
    method: &mut dyn Method,
    head: &SequenceHead,
    head_params: &TrainableParams,
    steps: usize,
    seed: u64,
) -> candle_core::backprop::GradStore {
    let mut vars = method.params().vars();
    vars.extend(head_params.vars());
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let x = batch(&[5, 3, 4], seed);
    let labels = Tensor::new(&[0u32, 1, 1], &Device::Cpu).unwrap();
    let mut last = None;
    method.set_training(true);
    for step in 1..=steps {
        let enc = m.forward(&x, method).unwrap();
        let logits = head.forward(m, &enc).unwrap();
        let mut loss = peftbench_backbone::ops::cross_entropy(&logits, &labels, None).unwrap();
        if let Some(extra) = method.extra_loss().unwrap() {
            loss = (loss + extra).unwrap();
        }
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        method.after_step(step, &grads).unwrap();
        last = Some(grads);
    }
    last.unwrap()
}

fn with_head(m: &Transformer, seed: u64) -> (SequenceHead, TrainableParams) {
    let mut hp = TrainableParams::new();
    let head = SequenceHead::new(
        m,
        HeadKind::Classifier { num_labels: 2 },
        &mut hp,
        &mut Initializer::new(seed),
    )
    .unwrap();
    (head, hp)
}

proptest! {
    #![proptest_config(cases(16))]

    #[test]
    fn frozen_weights_stay_bit_identical_and_only_method_and_head_get_gradients((f, heads, hd, layers, seed) in shape(), method in any_method()) {
        prop_assume!(method != MethodConfig::full_finetune());
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m.config).is_ok());
        let mut attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
        // The base as training starts: PiSSA and OLoRA replace W by its residual at attach.
        let before = m.clone();
        let (head, hp) = with_head(&m, seed);
        let grads = train_steps(&m, attached.as_mut(), &head, &hp, 2, seed);
        let mut frozen = Vec::new();
        m.for_each_weight(&mut |name, t| frozen.push((name.to_string(), t.clone())));
        let mut old = Vec::new();
        before.for_each_weight(&mut |_, t| old.push(t.clone()));
        for ((name, t), o) in frozen.iter().zip(&old) {
            prop_assert!(!t.is_variable(), "{} became a variable", name);
            prop_assert!(grads.get(t).is_none(), "{} received a gradient", name);
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = o.flatten_all().unwrap().to_vec1().unwrap();
            prop_assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{} changed", name);
        }
        for v in hp.vars() { prop_assert!(grads.get(v.as_tensor()).is_some(), "head got no gradient"); }
        let with_grad = attached.params().vars().iter().filter(|v| grads.get(v.as_tensor()).is_some()).count();
        prop_assert!(with_grad > 0, "{}: no method variable received a gradient", method.name());
    }

    #[test]
    fn save_then_load_gives_identical_outputs((f, heads, hd, layers, seed) in shape(), method in any_method()) {
        let mut m1 = model(FAMILIES[f], heads, hd, layers, seed);
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&m1.config).is_ok());
        let mut m2 = m1.clone();
        let a = method.attach(&mut AttachContext::new(&mut m1, seed)).unwrap();
        randomize(a.params(), seed ^ 6, 0.05);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("method.safetensors");
        a.save(&path).unwrap();
        let mut b = method.attach(&mut AttachContext::new(&mut m2, seed.wrapping_add(1))).unwrap();
        b.load(&path).unwrap();
        let x = batch(&[4, 2], seed);
        let d = max_abs(&hidden(&m1, &x, a.as_ref()), &hidden(&m2, &x, b.as_ref()));
        prop_assert_eq!(d, 0.0, "{}", method.name());
    }

    #[test]
    fn same_seed_gives_identical_trained_parameters((f, heads, hd, layers, seed) in shape(), method in any_method()) {
        // BitFit refuses bias-free (Llama-style) models.
        prop_assume!(method.validate(&model(FAMILIES[f], heads, hd, layers, seed).config).is_ok());
        let run = || {
            let mut m = model(FAMILIES[f], heads, hd, layers, seed);
            let mut attached = method.attach(&mut AttachContext::new(&mut m, seed)).unwrap();
            let (head, hp) = with_head(&m, seed);
            train_steps(&m, attached.as_mut(), &head, &hp, 2, seed);
            let mut out = attached.params().snapshot().unwrap();
            out.extend(hp.snapshot().unwrap());
            out
        };
        let (a, b) = (run(), run());
        prop_assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = b[k].flatten_all().unwrap().to_vec1().unwrap();
            prop_assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{} differs", k);
        }
    }

    #[test]
    fn adalora_budget_schedule_is_non_increasing_with_fixed_ends(init_r in 2usize..16, dt in 1usize..5, tinit in 0usize..20, tfinal in 0usize..20, span in 1usize..60, matrices in 1usize..30) {
        let cfg = AdaLoraConfig { init_r, target_r: init_r / 2, delta_t: dt, tinit, tfinal, total_step: tinit + tfinal + span, ..Default::default() };
        let mut prev = usize::MAX;
        for step in 0..=cfg.total_step + 3 {
            let (b, _) = cfg.budget_schedule(matrices, step);
            prop_assert!(b <= prev, "budget rose at step {}", step);
            if step <= tinit { prop_assert_eq!(b, init_r * matrices); }
            if step > cfg.total_step - tfinal { prop_assert_eq!(b, cfg.target_r * matrices); }
            // The cubic reaches the target exactly where the final phase begins.
            if step == cfg.total_step - tfinal && step > tinit { prop_assert_eq!(b, cfg.target_r * matrices); }
            prev = b;
        }
    }

    #[test]
    fn adalora_final_ranks_sum_to_target_budget((f, heads, hd, layers, seed) in shape(), target_r in 1usize..4, extra in 1usize..4, tfinal in 1usize..3) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        let total = 6;
        let cfg = AdaLoraConfig { init_r: target_r + extra, target_r, tinit: 1, tfinal, total_step: total, target_modules: Targets(vec!["query".into(), "value".into(), "down".into()]), ..Default::default() };
        let mut ada = AdaLora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        let (head, hp) = with_head(&m, seed);
        train_steps(&m, &mut ada, &head, &hp, total, seed);
        let ranks = ada.ranks().unwrap();
        let kept: usize = ranks.values().sum();
        prop_assert_eq!(kept, target_r * ada.triplets().len());
        // Pruned triplets have Λ = 0 in the model, so the effective rank matches the pattern.
        for (site, keep) in ada.rank_pattern().unwrap() {
            let lam: Vec<f32> = ada.triplets()[site].lambda.as_tensor().to_vec1().unwrap();
            for (k, l) in keep.iter().zip(&lam) { if !k { prop_assert_eq!(*l, 0.0); } }
        }
    }

    #[test]
    fn adalora_orthogonality_penalty_is_zero_only_for_orthonormal_factors((f, heads, hd, layers, seed) in shape(), r in 1usize..4) {
        let mut m = model(FAMILIES[f], heads, hd, layers, seed);
        prop_assume!(r < heads * hd);
        let cfg = AdaLoraConfig { init_r: r + 1, target_r: r, target_modules: Targets(vec!["query".into()]), ..Default::default() };
        let ada = AdaLora::attach(&cfg, &mut AttachContext::new(&mut m, seed)).unwrap();
        let random = ada.orthogonality_penalty().unwrap().to_scalar::<f32>().unwrap();
        prop_assert!(random > 0.0);
        for t in ada.triplets().values() {
            // Slices of the identity: PᵀP = I and QQᵀ = I.
            let (out, rr) = t.p.as_tensor().dims2().unwrap();
            let (_, inp) = t.q.as_tensor().dims2().unwrap();
            t.p.set(&Tensor::eye(out, DType::F32, &Device::Cpu).unwrap().narrow(1, 0, rr).unwrap()).unwrap();
            t.q.set(&Tensor::eye(inp, DType::F32, &Device::Cpu).unwrap().narrow(0, 0, rr).unwrap()).unwrap();
        }
        prop_assert_eq!(ada.orthogonality_penalty().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
}
