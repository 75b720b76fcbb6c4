//! A differentiable transformer backbone (BERT-, GPT-2- and Llama-style) with intervention
//! points through which parameter-efficient methods attach. It names no method.

pub mod alloc;
mod attention;
pub mod bf16_gemm;
pub mod bf16_matmul;
pub mod chat;
pub mod config;
pub mod error;
mod frozen_matmul;
mod fused;
mod gated;
pub mod gemm_floor;
pub mod gguf;
pub mod heads;
pub mod heap;
pub mod hf_names;
pub mod init;
pub mod intervention;
pub mod kernels;
mod kronecker;
pub mod linalg;
pub mod linear;
pub mod lm_loss;
pub mod load;
mod low_rank;
pub mod model;
mod no_grad;
pub mod ops;
pub mod params;
mod prepend;
mod quantized;
pub mod random;
pub mod read;
mod rope;
mod small_gemm;
pub mod tokenizer;
mod trained_matmul;
pub mod weights;

pub use alloc::keep_freed_memory;
pub use config::{Activation, Family, ModelConfig};
pub use error::{BackboneError, Result};
pub use gguf::{is_gguf, GgufFile};
pub use heads::{lm_logits, pool, HeadKind, Pooling, SequenceHead};
pub use hf_names::HfTask;
pub use init::Initializer;
pub use intervention::{
    Block, Intervention, KvPrefix, NoIntervention, NormParams, NormSite, Proj, Site,
};
pub use kernels::{device_name, kernels, parse_device, parse_dtype, with_kernels, Kernels};
pub use linear::Linear;
pub use load::{load_model, load_model_dir, save_model_dir};
pub use model::{Encoded, Inputs, KvCache, Norm, Packing, Transformer};
pub use no_grad::{grad_enabled, no_grad};
pub use params::TrainableParams;
pub use read::Read;
pub use tokenizer::{pad_rows, TextTokenizer};
