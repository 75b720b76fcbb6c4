//! The per-layer key/value table shared by prefix tuning and P-Tuning v2, and the MLP that
//! reparametrises it while training.

use crate::error::Result;
use candle_core::Tensor;
use peftbench_backbone::{Initializer, KvPrefix, Linear, ModelConfig, TrainableParams};

/// Width of one layer's keys (or values): kv_heads · head_dim.
pub fn kv_dim(model: &ModelConfig) -> usize {
    model.num_kv_heads * model.head_dim()
}

/// Width of the whole table row: 2 (key, value) · layers · kv_dim.
pub fn table_width(model: &ModelConfig) -> usize {
    2 * model.num_layers * kv_dim(model)
}

/// Splits a `[p, 2·layers·kv_dim]` table into one key/value prefix per layer. Row layout per
/// token: layer-major, key before value (as PEFT's `past_key_values` split).
pub fn split_table(table: &Tensor, model: &ModelConfig) -> candle_core::Result<Vec<KvPrefix>> {
    let p = table.dims()[0];
    let kv = kv_dim(model);
    let t = table.reshape((p, model.num_layers, 2, kv))?;
    (0..model.num_layers)
        .map(|l| {
            Ok(KvPrefix {
                key: t.narrow(1, l, 1)?.narrow(2, 0, 1)?.reshape((p, kv))?,
                value: t.narrow(1, l, 1)?.narrow(2, 1, 1)?.reshape((p, kv))?,
            })
        })
        .collect()
}

/// embedding → Linear → tanh → Linear, producing the table (Li & Liang 2021; PEFT's
/// `prefix_projection`).
pub struct PrefixMlp {
    /// Virtual-token embeddings `[p, hidden]`.
    pub embedding: Tensor,
    /// hidden → mid.
    pub first: Linear,
    /// mid → 2·layers·kv_dim.
    pub second: Linear,
}

impl PrefixMlp {
    /// Creates the MLP's variables under `prefix` in `params`.
    pub fn new(
        model: &ModelConfig,
        p: usize,
        mid: usize,
        params: &mut TrainableParams,
        init: &mut Initializer,
        dev: &candle_core::Device,
    ) -> Result<Self> {
        let h = model.hidden_size;
        let w = table_width(model);
        let embedding = params.add("prefix.embedding", init.normal((p, h), 1.0, dev)?)?;
        let first = Linear::new(
            params.add("prefix.mlp.0.weight", init.kaiming_uniform(mid, h, dev)?)?,
            Some(params.add(
                "prefix.mlp.0.bias",
                init.uniform(mid, 1.0 / (h as f64).sqrt(), dev)?,
            )?),
        );
        let second = Linear::new(
            params.add("prefix.mlp.2.weight", init.kaiming_uniform(w, mid, dev)?)?,
            Some(params.add(
                "prefix.mlp.2.bias",
                init.uniform(w, 1.0 / (mid as f64).sqrt(), dev)?,
            )?),
        );
        Ok(Self {
            embedding,
            first,
            second,
        })
    }

    /// Closed form: p·h + (h·mid + mid) + (mid·W + W).
    pub fn num_parameters(model: &ModelConfig, p: usize, mid: usize) -> usize {
        let (h, w) = (model.hidden_size, table_width(model));
        p * h + h * mid + mid + mid * w + w
    }

    /// The table `[p, 2·layers·kv_dim]`.
    pub fn table(&self) -> candle_core::Result<Tensor> {
        self.second
            .forward(&self.first.forward(&self.embedding)?.tanh()?)
    }
}
