//! Online compact recording: a ledger whose accounts are kept projected.
//!
//! In this mode every traced layer `l` has a seeded linear projection `φ_l`
//! (see [`Projection`](crate::query::Projection)) and the ledger books
//! `φ_l(update)` instead of the update: each example's share of a step is
//! projected as it is credited (the hook never stores factored rows or dense
//! per-example accounts), so an account takes `k_l` numbers per source and
//! segment whatever the layer's size. Because `φ` is linear, everything the
//! booking interface does carries over unchanged — momentum shares (a pending
//! share is its projection, weighted by its group's coefficient when folded),
//! weight decay and batch credits (their dense updates projected), segments —
//! and the residual is settled in projected space:
//!
//! ```text
//! φ(residual_k) = φ(W_end(k) − W_start(k)) − Σ_s φ(G_{s,k})
//! ```
//!
//! An online ledger answers queries only as a
//! [`LedgerSketch`](crate::query::LedgerSketch)
//! ([`OptimizerHook::finish_sketch`](crate::OptimizerHook::finish_sketch)); its
//! own query, save and merge methods refuse it with an error.

use ndarray::{Array2, ArrayView2};

use super::Ledger;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::query::{Projection, Projector, SketchConfig};

/// What an online ledger projects with.
#[derive(Clone, Debug)]
pub(crate) struct Online {
    pub(crate) seed: u64,
    pub(crate) projection: Projection,
    pub(crate) projectors: Vec<Projector>,
    /// Per layer, what the exact ledger would hold: bytes of factored rows,
    /// and dense accounts (one per source and segment it was credited in).
    exact_row_bytes: Vec<usize>,
    exact_dense_slots: Vec<usize>,
    /// Per layer, the sources with a dense account in the current segment.
    touched: Vec<std::collections::HashSet<u32>>,
}

impl<F: Float> Ledger<F> {
    /// Turns this empty ledger online: projecting with `config` (its dimensions as
    /// [`SketchConfig::with_dims`]; a ratio is measured against the exact
    /// ledger of a single source).
    pub(crate) fn go_online(&mut self, config: &SketchConfig) -> Result<()> {
        let ledger = self;
        let exact: Vec<usize> = ledger
            .layers
            .iter()
            .map(|m| m.shape.fan_out.saturating_mul(m.shape.aug_in()) * 8)
            .collect();
        let projectors = config.projectors(&ledger.layers, &exact, 1)?;
        let n = projectors.len();
        ledger.online = Some(Online {
            seed: config.seed_value(),
            projection: config.projection_value(),
            projectors,
            exact_row_bytes: vec![0; n],
            exact_dense_slots: vec![0; n],
            touched: vec![Default::default(); n],
        });
        let dims = ledger.account_dims();
        ledger.segments[0] = super::segment::Segment::new(ledger.initial.clone(), 0, &dims);
        Ok(())
    }

    /// The online projection, if the ledger keeps its accounts projected.
    pub(crate) fn online(&self) -> Option<&Online> {
        self.online.as_ref()
    }

    /// Layer `l`'s projector in an online ledger.
    pub(crate) fn projector(&self, l: usize) -> Option<&Projector> {
        self.online.as_ref().map(|o| &o.projectors[l])
    }

    /// Per layer, the shape an account is kept in: `[fan_out, aug_in]`, or
    /// `[1, k]` projected.
    pub(crate) fn account_dims(&self) -> Vec<(usize, usize)> {
        (0..self.layers.len())
            .map(|l| match self.projector(l) {
                Some(p) => (1, p.dims()),
                None => (self.layers[l].shape.fan_out, self.layers[l].shape.aug_in()),
            })
            .collect()
    }

    /// A `[fan_out, aug_in]` matrix of layer `l` in the space its accounts are kept in.
    pub(crate) fn account_space(&self, l: usize, m: Array2<f64>) -> Array2<f64> {
        match self.projector(l) {
            Some(p) => {
                let phi = p.project_dense(m.view());
                let k = phi.len();
                phi.into_shape_with_order((1, k))
                    .expect("invariant: a vector is one row")
            }
            None => m,
        }
    }

    /// Adds the exact update `m` (`[fan_out, aug_in]`) to `source`'s account of
    /// `layer` in the current segment (projected in an online ledger).
    pub(crate) fn credit_update(&mut self, layer: usize, source: u32, m: ArrayView2<'_, f64>) {
        match self.projector(layer) {
            Some(p) => {
                let phi = p.project_dense(m);
                let mut acc = self.dense_account_mut(layer, source);
                acc.row_mut(0).zip_mut_with(&phi, |a, &v| *a += v);
            }
            None => {
                let mut acc = self.dense_account_mut(layer, source);
                acc += &m;
            }
        }
    }

    /// Counts what the exact ledger would have stored for `sources` credited
    /// at `layer` this step: `positions` factored rows each, or (`factored`
    /// false) a dense account per source and segment.
    pub(crate) fn note_exact_credit(
        &mut self,
        layer: usize,
        sources: &[u32],
        factored: bool,
        positions: usize,
    ) {
        let shape = &self.layers[layer].shape;
        let row = (shape.aug_in() + shape.fan_out) * std::mem::size_of::<F>() + 8;
        let Some(o) = self.online.as_mut() else {
            return;
        };
        if factored {
            o.exact_row_bytes[layer] += sources.len() * positions * row;
        } else {
            for &s in sources {
                if o.touched[layer].insert(s) {
                    o.exact_dense_slots[layer] += 1;
                }
            }
        }
    }

    /// A new segment starts: dense accounts are per segment.
    pub(crate) fn note_exact_segment(&mut self) {
        if let Some(o) = self.online.as_mut() {
            o.touched.iter_mut().for_each(|t| t.clear());
        }
    }

    /// Per layer, the bytes the exact ledger of the same run would hold at its
    /// end before compaction (factored rows, dense accounts, residuals and
    /// the parameters at every boundary) — computed, never allocated. For an
    /// exact ledger, [`bytes_per_layer`](Self::bytes_per_layer).
    pub(crate) fn exact_bytes_estimate(&self) -> Vec<usize> {
        let Some(o) = &self.online else {
            return self.bytes_per_layer();
        };
        let n_seg = self.segments.len();
        (0..self.layers.len())
            .map(|l| {
                let full = self.initial[l].len() * 8;
                let coef: usize = self.segments.iter().map(|s| s.coef.len() * 8).sum();
                full * (1 + 2 * n_seg)
                    + coef
                    + o.exact_row_bytes[l]
                    + o.exact_dense_slots[l] * (full + 4)
            })
            .collect()
    }

    /// Refuses an online ledger where exact accounts are needed.
    pub(crate) fn check_exact(&self, op: &'static str) -> Result<()> {
        match self.online {
            None => Ok(()),
            Some(_) => Err(Error::InvalidConfig {
                what: "online ledger",
                reason: format!(
                    "{op}: this ledger keeps its accounts projected (online recording), so it has no exact accounts to query, save or merge; take OptimizerHook::finish_sketch (or snapshot_sketch) and query the LedgerSketch"
                ),
            }),
        }
    }
}
