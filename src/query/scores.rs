//! [`Scores`]: the one result type of every scorer, and the rankings drawn from it.

use std::fmt;
use std::ops::Deref;

use ndarray::{Array1, Array2, ArrayView1};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::Query;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::SourceMeta;
use crate::trace::{LayerId, SourceId};

/// Scores of every source for a batch of queries, `[n_queries, n_sources]`,
/// with the sources they belong to (columns in [`sources`](Self::sources) order).
///
/// Dereferences to the score matrix; ranks with ties broken by source id.
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{ExampleId, LayerSel, Lens, Query, SourceId};
/// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
/// let scores = ledger.scores(&query, Lens::Cos, LayerSel::Layer(1))?;
/// assert_eq!(scores.dim(), (1, 4));
/// let top = scores.top_k(0, 2)?;
/// // The two class-1 examples look most like a point near (1, 1).
/// assert!(top.proponents.iter().all(|p| p.label == Some(1)));
/// let s1 = scores.value(0, SourceId::Example(ExampleId(1)))?;
/// assert_eq!(s1, top.proponents.iter().find(|p| p.source == SourceId::Example(ExampleId(1))).unwrap().score);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Scores<'a> {
    values: Array2<f64>,
    sources: &'a [SourceMeta],
}

impl Deref for Scores<'_> {
    type Target = Array2<f64>;
    fn deref(&self) -> &Array2<f64> {
        &self.values
    }
}

impl<'a> Scores<'a> {
    pub(crate) fn new(values: Array2<f64>, sources: &'a [SourceMeta]) -> Self {
        debug_assert_eq!(values.ncols(), sources.len());
        Self { values, sources }
    }

    /// Scores of your own (a baseline, another method) over `sources`, to rank
    /// them like any scorer's.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] unless there is one column per source.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Scores;
    /// let baseline = Scores::from_values(ndarray::array![[0.1, 0.4, 0.3, 0.2]], ledger.sources())?;
    /// assert_eq!(baseline.top_k(0, 1)?.proponents[0].source, ledger.sources()[1].id);
    /// assert!(Scores::from_values(ndarray::array![[0.1]], ledger.sources()).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn from_values(values: Array2<f64>, sources: &'a [SourceMeta]) -> Result<Self> {
        if values.ncols() != sources.len() {
            return Err(Error::ShapeMismatch {
                op: "Scores::from_values",
                expected: format!("{} columns (one per source)", sources.len()),
                got: values.ncols().to_string(),
            });
        }
        Ok(Self::new(values, sources))
    }

    /// The score matrix `[n_queries, n_sources]`.
    pub fn values(&self) -> &Array2<f64> {
        &self.values
    }

    /// The score matrix, owned.
    pub fn into_values(self) -> Array2<f64> {
        self.values
    }

    /// The sources, in column order.
    pub fn sources(&self) -> &'a [SourceMeta] {
        self.sources
    }

    /// Number of queries (rows).
    pub fn n_queries(&self) -> usize {
        self.values.nrows()
    }

    fn check_query(&self, q: usize, op: &'static str) -> Result<()> {
        if q < self.n_queries() {
            Ok(())
        } else {
            Err(Error::IndexOutOfRange {
                op,
                what: "query",
                index: q,
                len: self.n_queries(),
            })
        }
    }

    fn column(&self, source: SourceId, op: &'static str) -> Result<usize> {
        self.sources
            .iter()
            .position(|s| s.id == source)
            .ok_or_else(|| Error::UnknownSource {
                op,
                source_id: source.to_string(),
            })
    }

    /// The `k` highest (proponents) and lowest (opponents) scoring sources of
    /// query `q`, ties broken by source id.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad query.
    pub fn top_k(&self, q: usize, k: usize) -> Result<Ranking> {
        self.check_query(q, "Scores::top_k")?;
        Ok(rank(self.values.row(q), self.sources, k))
    }

    /// [`top_k`](Self::top_k) of every query.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query};
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9], [-1.0, -1.0]].view().into_dyn())?;
    /// let all = ledger.scores(&q, Lens::Influence, LayerSel::All)?.top_k_all(1);
    /// assert_eq!(all.len(), 2);
    /// assert_eq!(all[0].proponents[0].label, Some(1));
    /// assert_eq!(all[1].proponents[0].label, Some(0));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn top_k_all(&self, k: usize) -> Vec<Ranking> {
        (0..self.n_queries())
            .map(|q| rank(self.values.row(q), self.sources, k))
            .collect()
    }

    /// The score of `source` for query `q`.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad query, [`Error::UnknownSource`].
    pub fn value(&self, q: usize, source: SourceId) -> Result<f64> {
        self.check_query(q, "Scores::value")?;
        Ok(self.values[[q, self.column(source, "Scores::value")?]])
    }

    /// Self-scores: for query `q` (a training example run through the final
    /// network), the score of `sources[q]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when there is not one source per query;
    /// [`Error::UnknownSource`].
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{ExampleId, LayerSel, Lens, Query, SourceId};
    /// let x = ndarray::array![[-1.0, -0.8], [0.9, 1.1]]; // training examples 0 and 1
    /// let q = Query::forward(&mut net, x.view().into_dyn())?;
    /// let ids = [SourceId::Example(ExampleId(0)), SourceId::Example(ExampleId(1))];
    /// let own = ledger.scores(&q, Lens::Share, LayerSel::All)?.diagonal(&ids)?;
    /// let direct = ledger.self_scores(&q, &ids, Lens::Share)?;
    /// assert!((own[0] - direct[0]).abs() < 1e-12);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn diagonal(&self, sources: &[SourceId]) -> Result<Array1<f64>> {
        const OP: &str = "Scores::diagonal";
        if sources.len() != self.n_queries() {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!("{} source ids (one per query)", self.n_queries()),
                got: sources.len().to_string(),
            });
        }
        sources
            .iter()
            .enumerate()
            .map(|(q, &s)| Ok(self.values[[q, self.column(s, OP)?]]))
            .collect()
    }

    /// The exact top `k` of every query, by re-scoring these (approximate)
    /// scores' `shortlist` best and worst sources with `exact` — e.g. a
    /// sketch's scores re-ranked by the memory-mapped ledger it was built from,
    /// of which only the shortlisted accounts are read. Exact whenever the true
    /// top `k` are among the `shortlist` best (or worst).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `exact` scores other sources; any error of
    /// `exact` for this query.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query, query::{LedgerSketch, SketchConfig}};
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(4))?;
    /// let approx = sketch.scores(&q, Lens::Influence, LayerSel::All)?;
    /// // With every source on the shortlist the re-ranked answer is the exact one.
    /// let exact = ledger.scores(&q, Lens::Influence, LayerSel::All)?.top_k(0, 2)?;
    /// let reranked = approx.rerank(&ledger.lens(Lens::Influence), &q, 2, 4)?;
    /// assert_eq!(reranked[0].proponents, exact.proponents);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn rerank<F: Float>(
        &self,
        exact: &(dyn super::Scorer<'_, F> + Sync),
        query: &Query<F>,
        k: usize,
        shortlist: usize,
    ) -> Result<Vec<Ranking>> {
        if exact.sources() != self.sources {
            return Err(Error::ShapeMismatch {
                op: "Scores::rerank",
                expected: format!("a scorer of the same {} sources", self.sources.len()),
                got: format!("{} sources", exact.sources().len()),
            });
        }
        let n = self.sources.len();
        let shortlist = shortlist.max(k).min(n);
        (0..self.n_queries())
            .into_par_iter()
            .map(|q| {
                let row = self.values.row(q);
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]));
                let mut cand: Vec<usize> = order[..shortlist]
                    .iter()
                    .chain(&order[n - shortlist..])
                    .copied()
                    .collect();
                cand.sort_unstable();
                cand.dedup();
                let values = exact.scores_of(query, q, &cand)?;
                let metas: Vec<SourceMeta> =
                    cand.iter().map(|&s| self.sources[s].clone()).collect();
                Ok(rank(ArrayView1::from(&values), &metas, k))
            })
            .collect()
    }
}

/// One source in a ranking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Influence {
    /// The source.
    pub source: SourceId,
    /// Its label, if it has one.
    pub label: Option<usize>,
    /// Its score under the lens.
    pub score: f64,
}

/// The highest (proponents) and lowest (opponents) scoring sources.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Ranking {
    /// Highest scores first.
    pub proponents: Vec<Influence>,
    /// Lowest scores first.
    pub opponents: Vec<Influence>,
}

impl fmt::Display for Ranking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (title, list) in [
            ("proponents", &self.proponents),
            ("opponents", &self.opponents),
        ] {
            writeln!(f, "{title}:")?;
            for (i, inf) in list.iter().enumerate() {
                let label = inf.label.map_or("-".to_string(), |c| c.to_string());
                writeln!(
                    f,
                    "  {:>3}. {} (class {label}): {:+.4e}",
                    i + 1,
                    inf.source,
                    inf.score
                )?;
            }
        }
        Ok(())
    }
}

/// Rankings for one query: per traced layer, and across all layers
/// (`Display` prints them all, `Serialize` writes them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Influences {
    /// Index of the query in its batch.
    pub query: usize,
    /// Per traced layer.
    pub per_layer: Vec<(LayerId, Ranking)>,
    /// All layers combined (see [`LayerSel::All`](super::LayerSel::All)).
    pub combined: Ranking,
}

impl fmt::Display for Influences {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (layer, ranking) in &self.per_layer {
            writeln!(f, "query {} at {layer}:", self.query)?;
            write!(f, "{ranking}")?;
        }
        writeln!(f, "query {} across layers:", self.query)?;
        write!(f, "{}", self.combined)
    }
}

/// Top and bottom `k` of `scores`, ties broken by source id: one pass over the
/// scores per side, keeping the best `k` in order (`O(N)` comparisons for small `k`).
pub(crate) fn rank(scores: ArrayView1<'_, f64>, sources: &[SourceMeta], k: usize) -> Ranking {
    let k = k.min(scores.len());
    let owned;
    let v: &[f64] = match scores.as_slice() {
        Some(v) => v,
        None => {
            owned = scores.to_vec();
            &owned
        }
    };
    let pick = |higher: bool| -> Vec<Influence> {
        // Whether source `a` ranks before source `b`.
        let before = |a: usize, b: usize| {
            let by_score = if higher {
                v[b].total_cmp(&v[a])
            } else {
                v[a].total_cmp(&v[b])
            };
            by_score
                .then_with(|| sources[a].id.cmp(&sources[b].id))
                .is_lt()
        };
        let mut top: Vec<usize> = Vec::with_capacity(k + 1);
        // The k-th best score so far: most sources fall below it on one comparison.
        let mut threshold: Option<f64> = None;
        if k > 0 {
            for (i, &x) in v.iter().enumerate() {
                if let Some(t) = threshold {
                    let worse = if higher {
                        x.total_cmp(&t).is_lt()
                    } else {
                        x.total_cmp(&t).is_gt()
                    };
                    if worse || !before(i, *top.last().expect("invariant: k > 0")) {
                        continue;
                    }
                }
                let at = top.partition_point(|&j| before(j, i));
                top.insert(at, i);
                top.truncate(k);
                if top.len() == k {
                    threshold = Some(v[top[k - 1]]);
                }
            }
        }
        top.into_iter()
            .map(|i| Influence {
                source: sources[i].id,
                label: sources[i].label,
                score: v[i],
            })
            .collect()
    };
    Ranking {
        proponents: pick(true),
        opponents: pick(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::ExampleId;

    #[test]
    fn rank_matches_a_full_sort_with_ties_broken_by_id() {
        // Scores with many ties, sources in scrambled id order.
        let n = 200;
        let sources: Vec<SourceMeta> = (0..n)
            .map(|i| SourceMeta {
                id: SourceId::Example(ExampleId(((i * 37) % n) as u64)),
                label: Some(i % 3),
                members: Vec::new(),
            })
            .collect();
        let scores = Array1::from_iter((0..n).map(|i| ((i * 7919) % 13) as f64 - 6.0));
        for k in [0, 1, 10, n, n + 5] {
            let r = rank(scores.view(), &sources, k);
            for (higher, got) in [(true, &r.proponents), (false, &r.opponents)] {
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| {
                    let by_score = if higher {
                        scores[b].total_cmp(&scores[a])
                    } else {
                        scores[a].total_cmp(&scores[b])
                    };
                    by_score.then(sources[a].id.cmp(&sources[b].id))
                });
                let want: Vec<SourceId> = order.iter().take(k).map(|&i| sources[i].id).collect();
                let got: Vec<SourceId> = got.iter().map(|i| i.source).collect();
                assert_eq!(got, want, "higher = {higher}, k = {k}");
            }
        }
    }
}
