//! One segment of training: the coefficients of the step groups it weights,
//! its dense accounts and residual per layer, and the parameters at its end.
//!
//! Owned by [`Ledger`](super::Ledger); nothing outside the `ledger` module
//! holds a `Segment` mutably.

use ndarray::Array2;

use super::accounts::DenseAccounts;

#[derive(Clone, Debug)]
pub(crate) struct Segment {
    /// `[W | b]` per layer at the segment's end.
    pub(super) end: Vec<Array2<f64>>,
    /// The first step group this segment weights.
    pub(super) first_group: u32,
    /// Coefficient of groups `first_group..` in this segment (shared by all layers).
    pub(super) coef: Vec<f64>,
    /// Dense accounts and residual per layer.
    pub(super) layers: Vec<DenseAccounts>,
    /// Optimizer steps recorded in this segment.
    pub(super) n_steps: u64,
}

impl Segment {
    /// A segment from `end` whose accounts are `dims` (per layer `(fan_out, aug_in)`, or `(1, k)` projected).
    pub(super) fn new(end: Vec<Array2<f64>>, first_group: u32, dims: &[(usize, usize)]) -> Self {
        Self {
            end,
            first_group,
            coef: Vec::new(),
            layers: dims
                .iter()
                .map(|&(fan_out, aug_in)| DenseAccounts::new(aug_in, fan_out))
                .collect(),
            n_steps: 0,
        }
    }

    /// The coefficient of group `g` in this segment (0 outside its range).
    pub(super) fn coef_of(&self, g: u32) -> f64 {
        g.checked_sub(self.first_group)
            .and_then(|i| self.coef.get(i as usize))
            .copied()
            .unwrap_or(0.0)
    }
}
