//! How LoRA's factors start. Kaiming (A uniform, B zero) and Gaussian (A ~ N(0, 1/r), B zero)
//! leave the base untouched; PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024) take the
//! factors from W itself, the top-r singular triplets or the first r columns' QR, and leave
//! W − s·B·A as the base to train on, as PEFT's `init_lora_weights` does.

use crate::error::{invalid, Result};
use candle_core::{DType, Device, Tensor};
use peftbench_backbone::linalg::{orthonormal_columns, svd_top, Mat};
use peftbench_backbone::Initializer;
use serde::{Deserialize, Serialize};

/// LoRA's initialisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A Kaiming-uniform, B zero (PEFT's default).
    #[default]
    Kaiming,
    /// A ~ N(0, 1/r), B zero.
    Gaussian,
    /// A = √(S/s)·Vᵀ and B = U·√(S/s) from W's top-r singular triplets; the base becomes
    /// W − s·B·A.
    Pissa,
    /// B = Q and A = R from the QR of W's first r columns; the base becomes W − s·B·A.
    Olora,
}

impl LoraInit {
    /// Whether the factors come from W (and the base is replaced by the residual).
    pub fn from_weight(self) -> bool {
        matches!(self, LoraInit::Pissa | LoraInit::Olora)
    }

    pub(crate) fn is_default(&self) -> bool {
        *self == LoraInit::Kaiming
    }
}

/// Initial factors `(A [r, in], B [out, r])` and, for PiSSA and OLoRA, the residual base.
pub(crate) fn factors(
    init: LoraInit,
    weight: &Tensor,
    r: usize,
    scaling: f64,
    rng: &mut Initializer,
    dev: &Device,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = weight.dims2()?;
    let zeros_b = || Tensor::zeros((out, r), DType::F32, dev);
    let (a, b) = match init {
        LoraInit::Kaiming => return Ok((rng.kaiming_uniform(r, inp, dev)?, zeros_b()?, None)),
        LoraInit::Gaussian => {
            return Ok((rng.normal((r, inp), 1.0 / r as f64, dev)?, zeros_b()?, None))
        }
        LoraInit::Pissa | LoraInit::Olora if r > out.min(inp) => {
            return Err(invalid(
                "lora",
                format!("init {init:?}: rank {r} exceeds the {out}×{inp} weight's"),
            ))
        }
        LoraInit::Pissa => {
            let w = to_mat(weight)?;
            let (u, s, v) = svd_top(&w, r);
            if s.len() < r {
                return Err(invalid(
                    "lora",
                    format!("init pissa: W has fewer than {r} singular values"),
                ));
            }
            let root: Vec<f64> = s.iter().map(|x| (x / scaling).max(0.0).sqrt()).collect();
            let a = Mat::new(
                r,
                inp,
                (0..r * inp)
                    .map(|k| root[k / inp] * v.at(k % inp, k / inp))
                    .collect(),
            );
            let b = Mat::new(
                out,
                r,
                (0..out * r)
                    .map(|k| u.at(k / r, k % r) * root[k % r])
                    .collect(),
            );
            (a, b)
        }
        LoraInit::Olora => {
            let w = to_mat(weight)?;
            let first = Mat::new(out, r, (0..out * r).map(|k| w.at(k / r, k % r)).collect());
            let q = orthonormal_columns(&first);
            if q.cols < r {
                return Err(invalid(
                    "lora",
                    format!("init olora: W's first {r} columns are not independent"),
                ));
            }
            let rr = q.t().matmul(&w);
            (rr, q)
        }
    };
    let (a, b) = (from_mat(&a, dev)?, from_mat(&b, dev)?);
    let residual = (weight - (b.matmul(&a)? * scaling)?)?;
    Ok((a, b, Some(residual)))
}

fn to_mat(t: &Tensor) -> Result<Mat> {
    let (rows, cols) = t.dims2()?;
    let data = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(Mat::new(rows, cols, data))
}

fn from_mat(m: &Mat, dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(m.data.clone(), (m.rows, m.cols), dev)?.to_dtype(DType::F32)?)
}
