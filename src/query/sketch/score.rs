//! Scoring with a sketch: the lenses linear in the account, from `⟨φ(Q), φ(G)⟩`.

use ndarray::Array2;

use super::LedgerSketch;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::SourceMeta;
use crate::query::lens::{LayerSel, Lens, Parts, Target};
use crate::query::{Pairing, Query, Scorer, Scores};

/// A lens over a sketch: a [`Scorer`] of approximate scores. Obtained from
/// [`LedgerSketch::lens`]; serves the lenses linear in the account
/// ([`Lens::Dot`], [`Lens::Influence`], [`Lens::Share`], [`Lens::Loss`]) and
/// refuses the others with an error.
#[derive(Clone, Copy, Debug)]
pub struct SketchLens<'a> {
    sketch: &'a LedgerSketch,
    lens: Lens,
    layers: LayerSel,
}

impl SketchLens<'_> {
    /// Restricts the lens to `layers` (default: [`LayerSel::All`]).
    pub fn layers(mut self, layers: LayerSel) -> Self {
        self.layers = layers;
        self
    }
}

impl LedgerSketch {
    /// The lens `lens` over this sketch, all layers: a [`Scorer`].
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{Lens, Query, Scorer, query::{LedgerSketch, SketchConfig}};
    /// let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(16))?;
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// assert_eq!(sketch.lens(Lens::Share).scores(&q)?.dim(), (1, 4));
    /// // Norm lenses are not linear in the account: refused, never approximated.
    /// assert!(sketch.lens(Lens::Cos).scores(&q).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn lens(&self, lens: Lens) -> SketchLens<'_> {
        SketchLens {
            sketch: self,
            lens,
            layers: LayerSel::All,
        }
    }

    /// Approximate scores `[n_queries, n_sources]`: the scores of
    /// `self.lens(lens).layers(layers)`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a lens the sketch cannot serve (`Norm`,
    /// `Cos`, `Margin`) or a query paired with segments; [`Error::LayerMismatch`]
    /// for a query of other layers; [`Error::NoBackwardCache`] for `Loss`
    /// without gradients; [`Error::IndexOutOfRange`] for a bad layer.
    pub fn scores<F: Float>(
        &self,
        query: &Query<F>,
        lens: Lens,
        layers: LayerSel,
    ) -> Result<Scores<'_>> {
        const OP: &str = "LedgerSketch::scores";
        let sketch = self;
        query.check(&sketch.layers, OP)?;
        let spec = lens.spec();
        if spec.needs_norm {
            return Err(unserved(
                OP,
                &format!(
                    "{:?} needs the contributions' norms, which a sketch does not keep (it serves the lenses linear in the account: Dot, Influence, Share, Loss); use the exact Ledger",
                    lens
                ),
            ));
        }
        let selected = layers.resolve(sketch.layers.len(), lens, OP)?;
        let parts = match spec.target {
            Target::Margin => {
                return Err(unserved(
                    OP,
                    "the margin lens needs the final parameters of the logits layer, which a sketch does not keep; use the exact Ledger",
                ));
            }
            Target::Refinement => selected
                .iter()
                .map(|&l| {
                    let input = query.representation_input(l, &sketch.change[l]);
                    Parts {
                        dot: sketch.sketch_dots(l, &sketch.sketch_queries(l, &input)),
                        norm2: None,
                        t2: input.per_query_dot(input.target.view(), input.target.view()),
                    }
                })
                .collect(),
            Target::LossGradient => {
                let phis = sketch.loss_sketches(query, &selected, OP)?;
                selected
                    .iter()
                    .zip(phis)
                    .map(|(&l, phi)| Parts {
                        dot: sketch.sketch_dots(l, &phi),
                        norm2: None,
                        t2: ndarray::Array1::zeros(query.len()),
                    })
                    .collect::<Vec<_>>()
            }
        };
        Ok(Scores::new(spec.scores(&parts), &sketch.sources))
    }

    /// `φ` of each query's negative loss gradient, per selected layer.
    pub(super) fn loss_sketches<F: Float>(
        &self,
        query: &Query<F>,
        selected: &[usize],
        op: &'static str,
    ) -> Result<Vec<Array2<f64>>> {
        query.check(&self.layers, op)?;
        if query.pairing() != Pairing::Final {
            return Err(unserved(
                op,
                "a sketch sums every segment's accounts, so it cannot pair segments with gradients; score a paired query with the exact ledger",
            ));
        }
        selected
            .iter()
            .map(|&l| {
                // The target is −∇_z ℓ: project the deltas, negate the projection.
                let (a, d) = query.loss_factors(l, op)?;
                Ok(self.projectors[l]
                    .project_factors(a, d)
                    .mapv(|v| -f64::from(v)))
            })
            .collect()
    }
}

fn unserved(op: &'static str, reason: &str) -> Error {
    Error::InvalidConfig {
        what: "sketch lens",
        reason: format!("{op}: {reason}"),
    }
}

impl<'a, F: Float> Scorer<'a, F> for SketchLens<'a> {
    fn sources(&self) -> &'a [SourceMeta] {
        &self.sketch.sources
    }

    fn needs_gradients(&self) -> bool {
        self.lens.needs_gradients()
    }

    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>> {
        self.sketch.scores(query, self.lens, self.layers)
    }
}
