//! Merging the ledgers of the shards of a data-parallel run.
//!
//! Each shard's hook sees the same parameters and the same (all-reduced)
//! update, but credits only its own examples; the other shards' shares land in
//! its residual. An example may be in several shards (a sampler that
//! reshuffles every epoch gives it to different ranks), at different steps.
//! Merging unions the sources and rows, keeps one copy of the
//! decay account (every shard credits the whole decay), and settles the
//! residual afresh, as every ledger does (`W_end − W_start − Σ_s G_s` per
//! segment), so the merged ledger balances.

use std::collections::HashMap;

use super::Ledger;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::SourceId;

fn mismatch(reason: String) -> Error {
    Error::InvalidConfig {
        what: "ledger merge",
        reason,
    }
}

impl<F: Float> Ledger<F> {
    /// Merges the ledger of another shard of the same run: same layers, initial
    /// parameters, segments, steps and coefficients; an example credited by
    /// both shards at different steps is credited with both.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first thing that differs (layers,
    /// parameters, segment structure, coefficients, a batch source in both
    /// shards, or the same shard twice).
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Sequential}, optim::SgdConfig};
    /// // Two ranks apply the same update of a global batch of two; each credits
    /// // its own example and marks the other's row a ghost (its share lands in
    /// // the rank's residual).
    /// let build = || -> refinement_ledger::Result<Sequential<f64>> {
    ///     let mut rng = StdRng::seed_from_u64(0);
    ///     Ok(Sequential::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?))
    /// };
    /// let (mut net0, mut net1) = (build()?, build()?);
    /// let mut rank0 = OptimizerHook::new(SgdConfig::new(0.1).build()?, &net0.traceables())?;
    /// let mut rank1 = OptimizerHook::new(SgdConfig::new(0.1).build()?, &net1.traceables())?;
    /// let x = array![[1.0, 0.0], [0.0, 1.0]].into_dyn();
    /// let ids = [ExampleId(0), ExampleId(1)];
    /// for _ in 0..3 {
    ///     net0.train_batch(x.view(), &[0, 1])?;
    ///     rank0.step(&mut net0.traceables_mut(), &Batch::new(&ids, &[0, 1]).with_ghosts(&[false, true]))?;
    ///     net1.train_batch(x.view(), &[0, 1])?;
    ///     rank1.step(&mut net1.traceables_mut(), &Batch::new(&ids, &[0, 1]).with_ghosts(&[true, false]))?;
    /// }
    /// let (shard0, shard1) = (rank0.finish()?, rank1.finish()?);
    /// assert!(shard0.residual_fraction()[0] > 0.1); // the other rank's share
    /// let merged = shard0.merge(&shard1)?;
    /// assert_eq!(merged.sources().len(), 2);
    /// assert!(merged.residual_fraction()[0] < 1e-12);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn merge(&self, other: &Ledger<F>) -> Result<Ledger<F>> {
        self.check_file()?;
        other.check_file()?;
        if self.layers != other.layers {
            return Err(mismatch("the shards trace different layers".into()));
        }
        if self.initial != other.initial {
            return Err(mismatch(
                "the shards start from different parameters".into(),
            ));
        }
        if self.segments.len() != other.segments.len() || self.n_groups != other.n_groups {
            return Err(mismatch(format!(
                "segments/groups differ: {}/{} vs {}/{}",
                self.segments.len(),
                self.n_groups,
                other.segments.len(),
                other.n_groups
            )));
        }
        for (k, (a, b)) in self.segments.iter().zip(&other.segments).enumerate() {
            if a.first_group != b.first_group || a.coef != b.coef || a.n_steps != b.n_steps {
                return Err(mismatch(format!(
                    "segment {k}: steps or coefficients differ"
                )));
            }
            if a.end != b.end {
                return Err(mismatch(format!(
                    "segment {k}: the shards ended at different parameters"
                )));
            }
        }
        self.check_distinct(other)?;
        let mut out = self.clone();
        // Sources of `other`, re-indexed.
        let mut remap = HashMap::new();
        for (i, meta) in other.sources.iter().enumerate() {
            let j = match self.index.get(&meta.id) {
                Some(&j) if meta.id == SourceId::Decay => j,
                // An example a sampler gave to another rank in another epoch.
                Some(&j)
                    if matches!(meta.id, SourceId::Example(_))
                        && self.sources[j as usize].label == meta.label =>
                {
                    j
                }
                Some(_) => return Err(mismatch(format!("{} is in both shards", meta.id))),
                None => out.register_source(meta.id, meta.label, meta.members.clone())?,
            };
            remap.insert(i as u32, j);
        }
        // Both shards credit the whole decay: keep self's copy only.
        let decay_b = other
            .index
            .get(&SourceId::Decay)
            .copied()
            .filter(|_| self.index.contains_key(&SourceId::Decay));
        for (l, rows) in other.rows.iter().enumerate() {
            let dst = &mut out.rows[l];
            for j in 0..rows.len() {
                let (a, d) = rows.view(j, j + 1);
                dst.push(remap[&rows.source[j]], rows.group[j], a.row(0), d.row(0));
            }
            dst.retain_sorted(|_| true);
        }
        for (k, seg_b) in other.segments.iter().enumerate() {
            let seg = &mut out.segments[k];
            for (l, acc_b) in seg_b.layers.iter().enumerate() {
                for slot in 0..acc_b.n_slots() {
                    if Some(acc_b.source[slot]) != decay_b {
                        seg.layers[l].add(remap[&acc_b.source[slot]], acc_b.slot(slot), 1.0);
                    }
                }
                seg.layers[l].sort();
            }
            out.settle_residual(k);
        }
        Ok(out)
    }

    /// Two shards credit different parts of each update, so their residuals
    /// differ; equal residuals and sources are one shard merged twice.
    fn check_distinct(&self, other: &Ledger<F>) -> Result<()> {
        let same = self.sources == other.sources
            && (0..self.layers.len())
                .all(|l| self.whole_layer(l).residual() == other.whole_layer(l).residual());
        if same {
            return Err(mismatch(
                "the two ledgers credit the same sources with the same updates: \
                 one shard is in both shards"
                    .into(),
            ));
        }
        Ok(())
    }
}
