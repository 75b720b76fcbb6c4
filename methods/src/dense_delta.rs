//! Methods whose update is a dense ΔW per projection, rebuilt from trained factors at every
//! forward (LoHa, LoKr): added to the projection's output while unmerged (through ΔW's
//! structure where it has a cheaper one), folded into W on merge and taken out again on
//! unmerge.

use crate::error::{invalid, Result};
use candle_core::Tensor;
use peftbench_backbone::{Site, Transformer};
use std::cell::Cell;
use std::collections::BTreeMap;

/// One projection's update.
pub(crate) trait Delta {
    /// ΔW `[out, in]`, scaling included.
    fn delta(&self) -> candle_core::Result<Tensor>;

    /// `x·ΔWᵀ`: by default one product with ΔW over the flattened rows (a batched matmul
    /// would take each row's product, and each row's share of ΔW's gradient, as a GEMM of
    /// its own); through ΔW's structure where [`Delta::structured`].
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        peftbench_backbone::ops::matmul_t(x, &self.delta()?.contiguous()?)
    }

    /// Whether [`Delta::apply`] goes through ΔW's structure. Then the backbone is not offered
    /// ΔW to fold into the weight either: the structured product beside the frozen one costs
    /// less than a product against W + ΔW and ΔW's dense gradient.
    fn structured(&self) -> bool {
        false
    }
}

/// The updates of every adapted projection, and whether they are folded into the weights.
pub(crate) struct DeltaSites<D> {
    pub(crate) sites: BTreeMap<Site, D>,
    merged: Cell<bool>,
    method: &'static str,
}

impl<D: Delta> DeltaSites<D> {
    pub(crate) fn new(method: &'static str, sites: BTreeMap<Site, D>) -> Self {
        Self {
            sites,
            merged: Cell::new(false),
            method,
        }
    }

    fn fold(&self, model: &mut Transformer, sign: f64) -> Result<()> {
        for (site, d) in &self.sites {
            let lin = model.linear_mut(*site).ok_or_else(|| {
                invalid(self.method, format!("the model has no projection {site}"))
            })?;
            lin.add_to_weight(&(d.delta()?.detach() * sign)?)?;
        }
        Ok(())
    }

    /// The projection's output plus x·ΔWᵀ, unless the update is merged.
    pub(crate) fn project(
        &self,
        site: Site,
        input: &Tensor,
        output: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.sites.get(&site) {
            Some(d) if !self.merged.get() => output + d.apply(input)?,
            _ => Ok(output),
        }
    }

    /// ΔW of `site` for the backbone to add to the weight, unless the update is merged.
    pub(crate) fn weight_delta(&self, site: Site) -> candle_core::Result<Option<Tensor>> {
        match self.sites.get(&site) {
            Some(d) if !self.merged.get() && !d.structured() => Ok(Some(d.delta()?)),
            _ => Ok(None),
        }
    }

    pub(crate) fn merge_into(&self, model: &mut Transformer) -> Result<bool> {
        if !self.merged.get() {
            self.fold(model, 1.0)?;
            self.merged.set(true);
        }
        Ok(true)
    }

    pub(crate) fn unmerge_from(&self, model: &mut Transformer) -> Result<bool> {
        if self.merged.get() {
            self.fold(model, -1.0)?;
            self.merged.set(false);
        }
        Ok(true)
    }
}
