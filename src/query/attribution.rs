//! Class attribution: which classes built a query's representation — the sum
//! of the shares `⟨c_s, r⟩ / ‖r‖²` of each class's sources, per layer.
//!
//! Per query and layer the class shares, the share of unlabelled sources
//! (weight decay, mixed batches) and the residual's share sum to 1. They are
//! not a probability distribution: a class whose updates pulled the
//! representation away from where it ended has a negative share.

use std::fmt;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use super::input::Query;
use super::kernel::dots;
use crate::error::Result;
use crate::float::Float;
use crate::ledger::{Ledger, Segments};
use crate::trace::LayerId;

/// Class attribution of one layer (or all layers) for a batch of queries:
/// the sum of shares `⟨c_s, r⟩/‖r‖²` per source label.
///
/// The shares of the classes, of unlabelled sources and of the residual sum to
/// 1 per query, but they are not a probability distribution: a class whose
/// updates pulled the representation away from where it ended has a negative
/// share, and others then have more than their part.
///
/// `Display` prints one line per query; `Serialize` writes the arrays (the
/// `ndarray` serde form: `{"v": 1, "dim": [..], "data": [..]}`).
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::Query;
/// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
/// let fc2 = &ledger.class_attribution(&query, None)?[1];
/// let line = fc2.to_string();
/// assert!(line.starts_with("fc2 query 0: class 0 ") && line.contains(" residual "));
/// let json = serde_json::to_value(fc2).unwrap();
/// assert_eq!(json["layer"], "fc2");
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassAttribution {
    /// The layer (`"all"` for the mean over layers).
    pub layer: LayerId,
    /// `[n_queries, n_classes]`.
    pub per_class: Array2<f64>,
    /// Share of sources without a label (weight decay, mixed batches), per query.
    pub unlabeled: Array1<f64>,
    /// Share of the residual, per query. `per_class` rows + `unlabeled` + `residual` = 1.
    pub residual: Array1<f64>,
}

impl fmt::Display for ClassAttribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (q, row) in self.per_class.rows().into_iter().enumerate() {
            write!(f, "{} query {q}:", self.layer)?;
            for (c, share) in row.iter().enumerate() {
                write!(f, " class {c} {share:+.3}")?;
            }
            writeln!(
                f,
                ", unlabelled {:+.3}, residual {:+.3}",
                self.unlabeled[q], self.residual[q]
            )?;
        }
        Ok(())
    }
}

impl<F: Float> Ledger<F> {
    /// Which classes built each query's representation, per layer and (last
    /// entry, layer `"all"`) averaged over layers. With `segment = Some(k)` only
    /// the updates of segment `k` count (when in training the representation was built).
    ///
    /// # Errors
    /// As [`scores`](Self::scores); [`Error::IndexOutOfRange`](crate::Error::IndexOutOfRange) for a bad segment.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Query;
    /// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let by_layer = ledger.class_attribution(&query, None)?;
    /// let all = by_layer.last().unwrap(); // the mean over layers
    /// let total = all.per_class.row(0).sum() + all.unlabeled[0] + all.residual[0];
    /// assert!((total - 1.0).abs() < 1e-9);
    /// // Class 1 built most of a class-1 point's last-layer representation.
    /// assert!(by_layer[1].per_class[[0, 1]] > by_layer[1].per_class[[0, 0]]);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn class_attribution(
        &self,
        query: &Query<F>,
        segment: Option<usize>,
    ) -> Result<Vec<ClassAttribution>> {
        const OP: &str = "Ledger::class_attribution";
        self.check_query(query, OP)?;
        let segs = segment.map_or(Segments::All, Segments::One);
        let n_classes = self
            .sources()
            .iter()
            .filter_map(|s| s.label)
            .max()
            .map_or(0, |m| m + 1);
        let mut out = Vec::with_capacity(self.layers().len() + 1);
        for l in 0..self.layers().len() {
            let input = self.representation_input(query, l);
            let r = input.target.clone();
            let ll = self.layer_view(l, segs)?;
            let dot = dots(&ll, &input, self.sources().len(), query.len()); // [n_src, n_q]
            let r2 = input.per_query_dot(r.view(), r.view());
            let inv = r2.mapv(|v| if v == 0.0 { 0.0 } else { 1.0 / v });
            let mut per_class = Array2::zeros((query.len(), n_classes));
            let mut unlabeled = Array1::zeros(query.len());
            for (s, meta) in self.sources().iter().enumerate() {
                let share = &dot.row(s) * &inv;
                match meta.label {
                    Some(c) => per_class.column_mut(c).scaled_add(1.0, &share),
                    None => unlabeled += &share,
                }
            }
            let residual_m = ll.residual();
            let residual =
                input.per_query_dot(input.apply(residual_m.view()).view(), r.view()) * &inv;
            out.push(ClassAttribution {
                layer: self.layers()[l].id.clone(),
                per_class,
                unlabeled,
                residual,
            });
        }
        let n_l = out.len() as f64;
        let mut all = ClassAttribution {
            layer: LayerId::new("all"),
            per_class: Array2::zeros((query.len(), n_classes)),
            unlabeled: Array1::zeros(query.len()),
            residual: Array1::zeros(query.len()),
        };
        for ca in &out {
            all.per_class.scaled_add(1.0 / n_l, &ca.per_class);
            all.unlabeled.scaled_add(1.0 / n_l, &ca.unlabeled);
            all.residual.scaled_add(1.0 / n_l, &ca.residual);
        }
        out.push(all);
        Ok(out)
    }
}
