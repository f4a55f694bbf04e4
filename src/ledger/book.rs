//! The booking interface: the only way a ledger's accounts change.
//!
//! A writer (the [`OptimizerHook`](crate::OptimizerHook)) registers sources,
//! opens one *step group* per per-example step, credits factored rows and dense
//! accounts, moves group coefficients as the optimizer's rule dictates, and
//! closes segments with the parameters at their end. The residual is computed
//! here and nowhere else ([`Ledger::settle`]):
//!
//! ```text
//! residual_k = W_end(k) − W_start(k) − Σ_s G_{s,k}
//! ```
//!
//! so the ledger balances by construction, whatever the writer credited.

use std::collections::{BTreeSet, HashMap};

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2};

use super::segment::Segment;
use super::{Ledger, SourceMeta};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::{ExampleId, SourceId};

impl<F: Float> Ledger<F> {
    /// The label `id` was registered with: `None` for a new source.
    pub(crate) fn known_label(&self, id: SourceId) -> Option<Option<usize>> {
        self.index.get(&id).map(|&s| self.sources[s as usize].label)
    }

    /// Index of `id`, registering it (with `label` and `members`) if new.
    ///
    /// # Errors
    /// [`Error::InconsistentSource`] when `id` is known with another label;
    /// [`Error::InvalidConfig`] past `u32::MAX` sources.
    pub(crate) fn register_source(
        &mut self,
        id: SourceId,
        label: Option<usize>,
        members: Vec<ExampleId>,
    ) -> Result<u32> {
        if let Some(&s) = self.index.get(&id) {
            let known = self.sources[s as usize].label;
            if known != label {
                return Err(Error::InconsistentSource {
                    op: "OptimizerHook::step",
                    reason: format!("{id} was recorded with label {known:?}, now found {label:?}"),
                });
            }
            return Ok(s);
        }
        let s = u32::try_from(self.sources.len()).map_err(|_| Error::InvalidConfig {
            what: "number of sources",
            reason: format!("must fit in u32, found {}", self.sources.len()),
        })?;
        self.sources.push(SourceMeta { id, label, members });
        self.index.insert(id, s);
        Ok(s)
    }

    fn current(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("invariant: at least one segment")
    }

    /// Step groups opened so far.
    pub(crate) fn n_groups(&self) -> u32 {
        self.n_groups
    }

    /// The first step group the open (last) segment weights.
    pub(crate) fn open_segment_first_group(&self) -> u32 {
        self.segments[self.segments.len() - 1].first_group
    }

    /// Opens a new step group, weighted 0 in the current segment until
    /// [`add_coef`](Self::add_coef) moves it.
    pub(crate) fn open_group(&mut self) -> u32 {
        let g = self.n_groups;
        self.n_groups += 1;
        let seg = self.current();
        debug_assert_eq!(seg.first_group as usize + seg.coef.len(), g as usize);
        seg.coef.push(0.0);
        g
    }

    /// Adds `delta` to group `g`'s coefficient in the current segment.
    pub(crate) fn add_coef(&mut self, g: u32, delta: f64) {
        let seg = self.current();
        seg.coef[(g - seg.first_group) as usize] += delta;
    }

    /// Group `g`'s coefficient in the current segment.
    pub(crate) fn coef(&self, g: u32) -> f64 {
        self.segments[self.segments.len() - 1].coef_of(g)
    }

    /// Credits the factored row `delta · [patch; 1]ᵀ` of group `group` to `source`.
    pub(crate) fn credit_row(
        &mut self,
        layer: usize,
        source: u32,
        group: u32,
        patch: ArrayView1<'_, F>,
        delta: ArrayView1<'_, F>,
    ) {
        self.rows[layer].push(source, group, patch, delta);
    }

    /// Adds `scale · m` to `source`'s dense account of `layer` in the current segment.
    pub(crate) fn credit_dense<T: Float>(
        &mut self,
        layer: usize,
        source: u32,
        m: ArrayView2<'_, T>,
        scale: f64,
    ) {
        let mut acc = self.current().layers[layer].dense_mut(source);
        ndarray::Zip::from(&mut acc)
            .and(&m)
            .for_each(|a, &v| *a += scale * v.widen());
    }

    /// `source`'s dense account of `layer` in the current segment, to credit in place.
    pub(crate) fn dense_account_mut(
        &mut self,
        layer: usize,
        source: u32,
    ) -> ArrayViewMut2<'_, f64> {
        self.current().layers[layer].dense_mut(source)
    }

    /// Notes the backward pass (per layer) whose factors the last step used.
    pub(crate) fn note_passes(&mut self, passes: Vec<Option<u64>>) {
        self.last_passes = passes;
    }

    /// Per layer, the backward pass whose factors the last step used.
    pub(crate) fn last_passes(&self) -> &[Option<u64>] {
        &self.last_passes
    }

    /// Whether `passes` (a query's, per layer) are those of the last step: a
    /// query built without running the network on its inputs.
    pub(crate) fn is_last_step_pass(&self, passes: &[Option<u64>]) -> bool {
        !passes.is_empty() && passes.iter().all(Option::is_some) && passes == self.last_passes
    }

    /// Counts one optimizer step in the current segment.
    pub(crate) fn count_step(&mut self) {
        self.current().n_steps += 1;
    }

    /// Steps recorded in the current segment.
    pub(crate) fn current_steps(&self) -> u64 {
        self.segments[self.segments.len() - 1].n_steps
    }

    /// Closes the current segment at parameters `end` (per layer `[W | b]`) and
    /// opens the next. Groups from `carry` on are still in the optimizer's
    /// momentum buffer: the next segment weights them from zero on (their rows
    /// stay where they are).
    pub(crate) fn close_segment(&mut self, end: &[Array2<F>], carry: u32) {
        let k = self.segments.len() - 1;
        self.settle(k, end);
        let seg = &mut self.segments[k];
        for acc in &mut seg.layers {
            acc.sort();
        }
        let end = seg.end.clone();
        self.note_exact_segment();
        let mut next = Segment::new(end, carry, &self.account_dims());
        next.coef = vec![0.0; (self.n_groups - carry) as usize];
        self.segments.push(next);
    }

    /// Settles the last segment at parameters `end` and compacts the storage
    /// for queries. A last segment in which nothing happened (closed at the
    /// end of the last epoch: no step, no credit, no parameter change) is
    /// dropped rather than kept empty.
    pub(crate) fn finish(&mut self, end: &[Array2<F>]) {
        let k = self.segments.len() - 1;
        self.settle(k, end);
        let last = &self.segments[k];
        let empty = k > 0
            && last.n_steps == 0
            && last.coef.iter().all(|&c| c == 0.0)
            && last
                .layers
                .iter()
                .all(|a| a.n_slots() == 0 && a.residual.iter().all(|&r| r == 0.0));
        if empty {
            self.segments.pop();
        }
        self.compact();
    }

    /// Closes the books of segment `k` at parameters `end`: its end, and its
    /// residual `W_end − W_start − (credited rows + dense accounts)` per layer —
    /// rounding, folded momentum tails, changes made outside the hook.
    pub(super) fn settle(&mut self, k: usize, end: &[Array2<F>]) {
        for (l, e) in end.iter().enumerate() {
            self.segments[k].end[l] = e.mapv(F::widen);
        }
        self.settle_residual(k);
    }

    /// Recomputes segment `k`'s residual from its end parameters: the one
    /// place the balance is made.
    pub(super) fn settle_residual(&mut self, k: usize) {
        for l in 0..self.layers.len() {
            let start = if k == 0 {
                &self.initial[l]
            } else {
                &self.segments[k - 1].end[l]
            };
            let segment = &self.segments[k];
            let rows = &self.rows[l];
            // While training, rows are in step order and the segment's groups a
            // suffix; after compaction, every row is looked at.
            let r0 = if rows.sorted_by_group() {
                rows.group.partition_point(|&g| g < segment.first_group)
            } else {
                0
            };
            let mut residual = self.account_space(l, &segment.end[l] - start);
            if self.online.is_none() {
                residual -= &rows.sum(r0, rows.len(), |g| segment.coef_of(g));
            }
            residual -= &segment.layers[l].total();
            self.segments[k].layers[l].residual = residual;
        }
    }

    /// Finishes the storage for queries: densifies the sources whose rows outweigh
    /// the dense accounts they would need, drops rows of zero weight, and sorts
    /// rows and slots by source.
    fn compact(&mut self) {
        let all: Vec<&Segment> = self.segments.iter().collect();
        let total = self.coef_table(&all);
        for l in 0..self.layers.len() {
            let rows = &self.rows[l];
            let dense_bytes = rows.aug_in * rows.fan_out * 8;
            let mut n_rows = vec![0usize; self.sources.len()];
            let mut touched: Vec<BTreeSet<usize>> = vec![Default::default(); self.sources.len()];
            for j in 0..rows.len() {
                let s = rows.source[j] as usize;
                n_rows[s] += 1;
                for (k, seg) in self.segments.iter().enumerate() {
                    if seg.coef_of(rows.group[j]) != 0.0 {
                        touched[s].insert(k);
                    }
                }
            }
            // Rows become dense once they outweigh the dense accounts they would
            // need (one per segment that weights them). A layer with several rows
            // per example and step (a convolution's positions) densifies once its
            // rows outweigh a single dense account: each of those rows is read at
            // every query position, so dense accounts are also the faster form.
            let mut per_term: HashMap<(u32, u32), usize> = HashMap::new();
            for j in 0..rows.len() {
                *per_term.entry((rows.source[j], rows.group[j])).or_default() += 1;
            }
            let multi_position = per_term.values().any(|&n| n > 1);
            let densify: Vec<bool> = (0..self.sources.len())
                .map(|s| {
                    let budget = if multi_position { 1 } else { touched[s].len() };
                    !touched[s].is_empty() && n_rows[s] * rows.row_bytes() > budget * dense_bytes
                })
                .collect();
            for j in 0..rows.len() {
                let s = rows.source[j];
                if !densify[s as usize] {
                    continue;
                }
                for seg in self.segments.iter_mut() {
                    let k = seg.coef_of(rows.group[j]);
                    if k != 0.0 {
                        let g = rows.sum(j, j + 1, |_| k);
                        seg.layers[l].add(s, g.view(), 1.0);
                    }
                }
            }
            let rows = &mut self.rows[l];
            let keep: Vec<bool> = (0..rows.len())
                .map(|j| !densify[rows.source[j] as usize] && total[rows.group[j] as usize] != 0.0)
                .collect();
            rows.retain_sorted(|j| keep[j]);
            for seg in self.segments.iter_mut() {
                seg.layers[l].sort();
            }
        }
    }
}
