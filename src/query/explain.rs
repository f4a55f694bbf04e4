//! [`Explanation`]: every representation score of every source for a batch of
//! queries, per layer, with the ledger's balance per query — the paper's full
//! answer, and the input of its ridge plots ([`ClassDistributions`]).

use std::fmt;

use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use super::lens::{LayerSel, Lens, Parts};
use super::scores::{Influences, Scores};
use crate::error::{Error, Result};
use crate::ledger::SourceMeta;
use crate::trace::LayerId;

/// Every score of every source for a batch of queries at one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerExplanation {
    /// The layer.
    pub layer: LayerId,
    /// `⟨c_s, r⟩`, `[n_queries, n_sources]`.
    pub dot: Array2<f64>,
    /// `‖c_s‖`, `[n_queries, n_sources]`.
    pub norm: Array2<f64>,
    /// `‖r‖` per query.
    pub refinement_norm: Array1<f64>,
    /// `⟨c_residual, r⟩` per query.
    pub residual_dot: Array1<f64>,
    /// `‖Σ_s c_s + c_residual − r‖ / ‖r‖` per query: the ledger's balance (≈ rounding).
    pub balance_error: Array1<f64>,
}

impl LayerExplanation {
    /// The layer's parts as the lenses read them.
    pub(crate) fn parts(&self) -> Parts {
        Parts {
            dot: self.dot.clone(),
            norm2: Some(self.norm.mapv(|v| v * v)),
            t2: self.refinement_norm.mapv(|v| v * v),
        }
    }
}

/// The representation lenses' full answer for a batch of queries: all scores,
/// per layer, for every source.
///
/// `Display` prints, per layer and query, the refinement's norm, the
/// residual's share `⟨c_residual, r⟩/‖r‖²`, the balance error and the three
/// sources with the largest share; `Serialize` writes every array and the
/// sources.
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{LayerSel, Lens, Query};
/// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
/// let explanation = ledger.explain(&query)?;
/// // The ledger balances: contributions add up to the refinement.
/// assert!(explanation.layers.iter().all(|l| l.balance_error[0] < 1e-9));
/// let cos = explanation.scores(Lens::Cos, LayerSel::Layer(1))?;
/// assert!(cos.iter().all(|c| c.abs() <= 1.0 + 1e-12));
/// assert!(explanation.to_string().starts_with("fc1 query 0: ‖r‖ "));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug, Serialize)]
pub struct Explanation<'a> {
    /// Per traced layer.
    pub layers: Vec<LayerExplanation>,
    /// The sources, in column order.
    pub sources: &'a [SourceMeta],
}

impl<'a> Explanation<'a> {
    /// Scores `[n_queries, n_sources]` under a representation lens.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer; [`Error::InvalidConfig`] for
    /// a lens that is not a representation lens (use [`Ledger::scores`](crate::Ledger::scores)).
    pub fn scores(&self, lens: Lens, layers: LayerSel) -> Result<Scores<'a>> {
        if !lens.is_representation() {
            return Err(Error::InvalidConfig {
                what: "lens",
                reason: format!("{lens:?} is not a representation lens; use Ledger::scores"),
            });
        }
        let selected = layers.resolve(self.layers.len(), lens, "Explanation::scores")?;
        let parts: Vec<Parts> = selected.iter().map(|&l| self.layers[l].parts()).collect();
        Ok(Scores::new(lens.spec().scores(&parts), self.sources))
    }

    /// The top `k` proponents and opponents of query `q` per layer and combined.
    ///
    /// # Errors
    /// As [`scores`](Self::scores); [`Error::IndexOutOfRange`] for a bad query.
    pub fn top_k(&self, q: usize, lens: Lens, k: usize) -> Result<Influences> {
        let per_layer = (0..self.layers.len())
            .map(|l| {
                let s = self.scores(lens, LayerSel::Layer(l))?;
                Ok((self.layers[l].layer.clone(), s.top_k(q, k)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Influences {
            query: q,
            per_layer,
            combined: self.scores(lens, LayerSel::All)?.top_k(q, k)?,
        })
    }
}

impl fmt::Display for Explanation<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for layer in &self.layers {
            for (q, dots) in layer.dot.rows().into_iter().enumerate() {
                let t2 = layer.refinement_norm[q] * layer.refinement_norm[q];
                let share = |dot: f64| if t2 > 0.0 { dot / t2 } else { 0.0 };
                write!(
                    f,
                    "{} query {q}: ‖r‖ {:.3e}, residual share {:+.2e}, balance error {:.1e}; largest shares:",
                    layer.layer,
                    layer.refinement_norm[q],
                    share(layer.residual_dot[q]),
                    layer.balance_error[q]
                )?;
                let top = super::scores::rank(dots, self.sources, 3);
                for inf in &top.proponents {
                    write!(f, " {} {:+.3}", inf.source, share(inf.score))?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

/// Per class, the `norm`-weighted density of `cos` over that class's sources
/// (Gaussian kernel on a grid over `[−1, 1]`), normalised by the total weight
/// of all classes: the rows of the paper's ridge plot.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassDistributions {
    /// Grid points in `[−1, 1]`.
    pub grid: Vec<f64>,
    /// Per class, the density at each grid point.
    pub density: Vec<Vec<f64>>,
    /// Per class, its share of the total `norm` weight.
    pub weight: Vec<f64>,
}

impl Explanation<'_> {
    /// The ridge-plot distributions of query `q` at layer `layer` for classes
    /// `0..n_classes`, kernel bandwidth `bandwidth` (e.g. 0.05), 101 grid points.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad query or layer; [`Error::InvalidConfig`]
    /// for a bandwidth that is not positive.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Query;
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let rows = ledger.explain(&q)?.class_distributions(0, 1, 2, 0.05)?;
    /// assert_eq!(rows.density.len(), 2); // one ridge-plot row per class
    /// // Each class's weight is its share of the total `norm` weight.
    /// assert!((rows.weight.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn class_distributions(
        &self,
        q: usize,
        layer: usize,
        n_classes: usize,
        bandwidth: f64,
    ) -> Result<ClassDistributions> {
        const OP: &str = "Explanation::class_distributions";
        let le = self.layers.get(layer).ok_or(Error::IndexOutOfRange {
            op: OP,
            what: "layer",
            index: layer,
            len: self.layers.len(),
        })?;
        if q >= le.dot.nrows() {
            return Err(Error::IndexOutOfRange {
                op: OP,
                what: "query",
                index: q,
                len: le.dot.nrows(),
            });
        }
        if !(bandwidth.is_finite() && bandwidth > 0.0) {
            return Err(Error::InvalidConfig {
                what: "bandwidth",
                reason: format!("must be finite and > 0, found {bandwidth}"),
            });
        }
        let cos = Lens::Cos.spec().scores(&[le.parts()]);
        let grid: Vec<f64> = (0..101).map(|i| -1.0 + 2.0 * i as f64 / 100.0).collect();
        let mut density = vec![vec![0.0; grid.len()]; n_classes];
        let mut weight = vec![0.0; n_classes];
        let mut total = 0.0;
        for (s, meta) in self.sources.iter().enumerate() {
            let w = le.norm[[q, s]];
            total += w;
            let Some(c) = meta.label.filter(|&c| c < n_classes) else {
                continue;
            };
            weight[c] += w;
            let x = cos[[q, s]];
            for (g, d) in grid.iter().zip(density[c].iter_mut()) {
                let z = (g - x) / bandwidth;
                *d += w * (-0.5 * z * z).exp();
            }
        }
        let norm = if total > 0.0 {
            1.0 / (total * bandwidth * (2.0 * std::f64::consts::PI).sqrt())
        } else {
            0.0
        };
        for (row, w) in density.iter_mut().zip(weight.iter_mut()) {
            row.iter_mut().for_each(|d| *d *= norm);
            *w = if total > 0.0 { *w / total } else { 0.0 };
        }
        Ok(ClassDistributions {
            grid,
            density,
            weight,
        })
    }
}
