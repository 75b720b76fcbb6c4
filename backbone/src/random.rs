//! A freshly initialised model of a given shape (pretraining from scratch, tests).

use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::init::Initializer;
use crate::linear::Linear;
use crate::model::{gated, Embeddings, Layer, Norm, Transformer};
use candle_core::{DType, Device, Tensor};

impl Transformer {
    /// A model with Hugging Face's default init: weights N(0, 0.02), biases 0, norm scales 1.
    pub fn random(config: ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut init = Initializer::new(seed);
        let (h, f) = (config.hidden_size, config.intermediate_size);
        let kv = config.num_kv_heads * config.head_dim();
        let has_bias = config.family != Family::Llama;
        let mut lin = |out: usize, inp: usize| -> Result<Linear> {
            let w = init.normal((out, inp), 0.02, device)?;
            let b = if has_bias {
                Some(Tensor::zeros(out, DType::F32, device)?)
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let norm = || -> Result<Norm> {
            let weight = Tensor::ones(h, DType::F32, device)?;
            Ok(if config.family == Family::Llama {
                Norm::Rms {
                    weight,
                    eps: config.norm_eps,
                }
            } else {
                Norm::Layer {
                    weight,
                    bias: Tensor::zeros(h, DType::F32, device)?,
                    eps: config.norm_eps,
                }
            })
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            layers.push(Layer {
                query: lin(h, h)?,
                key: lin(kv, h)?,
                value: lin(kv, h)?,
                attn_out: lin(h, h)?,
                up: lin(f, h)?,
                gate: if gated(config.activation, config.family) {
                    Some(lin(f, h)?)
                } else {
                    None
                },
                down: lin(h, f)?,
                attn_norm: norm()?,
                ffn_norm: norm()?,
            });
        }
        let word = init.normal((config.vocab_size, h), 0.02, device)?;
        let position = if config.family == Family::Llama {
            None
        } else {
            Some(init.normal((config.max_position_embeddings, h), 0.02, device)?)
        };
        let (token_type, emb_norm, final_norm) = match config.family {
            Family::Bert => (
                Some(init.normal((config.type_vocab_size, h), 0.02, device)?),
                Some(norm()?),
                None,
            ),
            _ => (None, None, Some(norm()?)),
        };
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(init.normal((config.vocab_size, h), 0.02, device)?)
        };
        let embeddings = Embeddings {
            word,
            position,
            token_type,
            norm: emb_norm,
        };
        Ok(Transformer::from_parts(
            config, embeddings, layers, final_norm, None, lm_head,
        ))
    }
}
