//! `peftbench pretrain`: a tokenizer and decoder trained on a corpus load like any checkpoint
//! and beat the untrained model on held-out text.

use peftbench_backbone::{load_model_dir, NoIntervention, TextTokenizer};
use peftbench_harness::optim::OptimConfig;
use peftbench_harness::pretrain::{pretrain_corpus, CorpusPretrain, PretrainConfig};

fn corpus() -> String {
    let shared =
        peftbench_datasets::shared_datasets_root().map(|r| r.join("tinyshakespeare/input.txt"));
    match shared.and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(t) => t[..200_000].to_string(),
        // A generated corpus keeps the test meaningful without the shared data.
        None => (0..4000)
            .map(|i| {
                format!(
                    "the cat {} the dog number {} .\n\n",
                    ["sees", "likes", "finds"][i % 3],
                    i % 17
                )
            })
            .collect(),
    }
}

#[test]
fn pretrained_decoder_loads_as_a_checkpoint_and_learned_the_corpus() {
    for family in ["gpt2", "llama"] {
        let out = tempfile::tempdir().unwrap();
        let cfg = CorpusPretrain {
            family: family.into(),
            vocab_size: 300,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            max_len: 32,
            train: PretrainConfig {
                steps: 60,
                batch_size: 16,
                optim: OptimConfig {
                    lr: 5e-3,
                    ..Default::default()
                },
                seed: 0,
            },
        };
        let r = pretrain_corpus(&corpus(), &cfg, out.path(), &candle_core::Device::Cpu).unwrap();
        assert!(
            r.last_loss < r.first_loss,
            "{family}: loss {} -> {}",
            r.first_loss,
            r.last_loss
        );
        assert!(
            r.val_perplexity < r.val_perplexity_untrained / 2.0,
            "{family}: {r:?}"
        );

        let model = load_model_dir(out.path(), &candle_core::Device::Cpu).unwrap();
        assert_eq!(model.config.model_type, family);
        let tok = TextTokenizer::from_file(&out.path().join("tokenizer.json"), 32).unwrap();
        let ids = tok.encode_ids("the cat sees", false).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(tok.decode(&ids).unwrap(), "the cat sees");
        let inputs =
            peftbench_backbone::pad_rows(&[ids], None, tok.pad_id, &candle_core::Device::Cpu)
                .unwrap();
        model.forward(&inputs, &NoIntervention).unwrap();
    }
}
