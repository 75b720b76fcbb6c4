//! Which final positions a caller reads. A sequence head reads one position per example, and
//! every position's last layer past its keys and values feeds nothing else, so the last layer
//! computes its queries, attention output, feed-forward and norms at the read positions only.

use candle_core::{DType, Tensor};

use crate::error::{BackboneError, Result};
use crate::heads::last_token_positions;

/// The final hidden states a forward pass returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Every position: `hidden` is `[batch, prefix + len, hidden]`.
    All,
    /// Position 0 of each row (BERT's [CLS], or the first virtual token): `[batch, 1, hidden]`.
    First,
    /// Each row's last real position: `[batch, 1, hidden]`.
    Last,
    /// These flat `row · (prefix + len) + position` indices, in order: `[n, 1, hidden]`.
    At(Vec<u32>),
}

/// A [`Read`] resolved against a batch: the positions each row computes in the last layer.
pub(crate) struct Rows {
    /// `[b, k]` u32 positions of the extended sequence (a row reading fewer repeats one).
    pub at: Tensor,
    /// The same as flat `row · seq + position` indices, `[b·k]`.
    flat: Tensor,
    seq: usize,
    /// For [`Read::At`]: where each requested index lands among the `b·k` computed rows.
    order: Option<Tensor>,
}

impl Rows {
    /// The rows `read` asks for over a `[b, seq]` mask; `None` for [`Read::All`].
    pub fn resolve(read: &Read, mask: &Tensor) -> Result<Option<Rows>> {
        let (b, seq) = mask.dims2()?;
        let dev = mask.device();
        let (at, order) = match read {
            Read::All => return Ok(None),
            Read::First => (Tensor::zeros((b, 1), DType::U32, dev)?, None),
            Read::Last => (last_token_positions(mask)?.reshape((b, 1))?, None),
            Read::At(flat) => {
                if let Some(&f) = flat.iter().find(|&&f| f as usize >= b * seq) {
                    return Err(BackboneError::Input(format!(
                        "read position {f} is outside the batch's {b} × {seq} positions"
                    )));
                }
                // Each row's distinct positions, in first-asked order.
                let mut rows: Vec<Vec<u32>> = vec![Vec::new(); b];
                let mut slot = Vec::with_capacity(flat.len());
                for &f in flat {
                    let (r, p) = (f as usize / seq, f % seq as u32);
                    let j = match rows[r].iter().position(|&q| q == p) {
                        Some(j) => j,
                        None => {
                            rows[r].push(p);
                            rows[r].len() - 1
                        }
                    };
                    slot.push((r, j));
                }
                let k = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
                let mut at = Vec::with_capacity(b * k);
                for row in &rows {
                    let fill = row.first().copied().unwrap_or(0);
                    at.extend(row.iter().copied().chain(std::iter::repeat(fill)).take(k));
                }
                let order: Vec<u32> = slot.iter().map(|&(r, j)| (r * k + j) as u32).collect();
                let n = order.len();
                (
                    Tensor::from_vec(at, (b, k), dev)?,
                    Some(Tensor::from_vec(order, n, dev)?),
                )
            }
        };
        let k = at.dim(1)?;
        let rows = Tensor::arange(0u32, b as u32, dev)?
            .affine(seq as f64, 0.0)?
            .reshape((b, 1))?
            .broadcast_as((b, k))?;
        let flat = (rows + &at)?.flatten_all()?;
        Ok(Some(Rows {
            at,
            flat,
            seq,
            order,
        }))
    }

    /// The read rows of `x [b, seq, w]`: `[b, k, w]`.
    pub fn gather(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, seq, w) = x.dims3()?;
        let k = self.at.dim(1)?;
        x.reshape((b * seq, w))?
            .index_select(&self.flat, 0)?
            .reshape((b, k, w))
    }

    /// Rotary tables for the read rows: from `[seq, d]` (shared) or `[b·seq, d]` (a row per
    /// token) to `[b·k, d]`.
    pub fn tables(&self, cos: &Tensor) -> candle_core::Result<Tensor> {
        if cos.dim(0)? == self.seq {
            cos.index_select(&self.at.flatten_all()?, 0)
        } else {
            cos.index_select(&self.flat, 0)
        }
    }

    /// The last layer's `[b, k, h]` as the caller asked: `[b, 1, h]`, or `[n, 1, h]` in the
    /// order of [`Read::At`].
    pub fn finish(&self, h: Tensor) -> candle_core::Result<Tensor> {
        match &self.order {
            None => Ok(h),
            Some(order) => {
                let (b, k, w) = h.dims3()?;
                let n = order.dim(0)?;
                h.reshape((b * k, w))?
                    .index_select(order, 0)?
                    .reshape((n, 1, w))
            }
        }
    }
}
