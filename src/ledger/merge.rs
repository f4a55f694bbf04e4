//! Merging the ledgers of the shards of a data-parallel run.
//!
//! Each shard's hook sees the same parameters and the same (all-reduced)
//! update, but credits only its own examples; the other shards' shares land in
//! its residual. Merging unions the sources and rows, keeps one copy of the
//! decay account (every shard credits the whole decay), and recomputes the
//! residual so the merged ledger balances:
//!
//! ```text
//! residual = residual_a + residual_b + decay − (W_end − W_start)      (per segment)
//! ```

use std::collections::HashMap;

use super::{Ledger, Segment};
use crate::{Error, Float, Result, SourceId};

fn mismatch(reason: String) -> Error {
    Error::InvalidConfig {
        what: "ledger merge",
        reason,
    }
}

impl<F: Float> Ledger<F> {
    /// Merges the ledger of another shard of the same run: same layers, initial
    /// parameters, segments, steps and coefficients; disjoint example sources.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first thing that differs (layers,
    /// parameters, segment structure, coefficients, or a source in both shards).
    pub fn merge(&self, other: &Ledger<F>) -> Result<Ledger<F>> {
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
        let mut out = self.clone();
        // Sources of `other`, re-indexed.
        let mut remap = HashMap::new();
        for (i, meta) in other.sources.iter().enumerate() {
            let j = match self.index.get(&meta.id) {
                Some(&j) if meta.id == SourceId::Decay => j,
                Some(_) => return Err(mismatch(format!("{} is in both shards", meta.id))),
                None => out.source_or_insert(meta.id, meta.label, meta.members.clone())?,
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
            let start: Vec<_> = if k == 0 {
                self.initial.clone()
            } else {
                self.segments[k - 1].end.clone()
            };
            let seg: &mut Segment = &mut out.segments[k];
            for (l, acc_b) in seg_b.layers.iter().enumerate() {
                let mut decay = None;
                for slot in 0..acc_b.n_slots() {
                    if Some(acc_b.source[slot]) == decay_b {
                        decay = Some(acc_b.slot(slot).to_owned());
                        continue; // one copy of the decay account: self's
                    }
                    seg.layers[l].add(remap[&acc_b.source[slot]], acc_b.slot(slot), 1.0);
                }
                let change = &seg.end[l] - &start[l];
                let acc = &mut seg.layers[l];
                acc.residual += &acc_b.residual;
                acc.residual -= &change;
                if let Some(d) = decay {
                    acc.residual += &d;
                }
                acc.sort();
            }
        }
        Ok(out)
    }
}
