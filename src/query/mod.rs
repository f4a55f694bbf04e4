//! Queries: which sources built the representation a traced network computes for
//! an input, layer by layer, and which caused its prediction.
//!
//! For a query `x` and traced layer `l` with final input `a = a_l(x)`, the
//! refinement `r = (W_T − W₀) ⊛ a` splits into one contribution per source,
//! `c_s = G_s ⊛ a`, plus the residual's. Each [`Lens`] scores sources from
//! `⟨c, t⟩`, `‖c‖²` and `‖t‖²` against a target `t`:
//!
//! | lens | score | question it answers |
//! |---|---|---|
//! | [`Lens::Dot`] | `⟨c, r⟩` | raw alignment |
//! | [`Lens::Norm`] | `‖c‖` | how much a source moved the representation |
//! | [`Lens::Cos`] | `⟨c, r⟩ / (‖c‖‖r‖)` | *which training examples does this look like?* (strong at the last layer) |
//! | [`Lens::Influence`] | `⟨c, r⟩ / ‖r‖` | the paper's ranking; sums over sources to `‖r‖` |
//! | [`Lens::Share`] | `⟨c, r⟩ / ‖r‖²` | the paper's attribution; sums to 1 with the residual |
//! | [`Lens::Loss`] | `−⟨G, ∇_W ℓ(x)⟩` | TracIn over every step: *which examples lowered this loss?*; its self-score finds mislabelled examples |
//! | [`Lens::Margin`] | `c[ŷ] − c[runner-up]` at the logits | which updates widened the winning margin |
//! | [`RidgeLens`] | `(K + λI)⁻¹ L g(x)` | *which examples caused this prediction?* (deletion test, LDS) |
//! | [`SegmentRidge`] | `Σ_k (K_k + λ_k I)⁻¹ L_k g_k(x)`, one system per segment | the same question, better: the highest linear datamodeling score (LDS) of one run |
//!
//! Across layers ([`LayerSel::All`]): `Share` is the mean of per-layer shares;
//! the other lenses treat the layers' representations as one concatenated
//! vector (dots and squared norms add). Each lens is described once
//! (`Lens::spec`: target, what it needs, formula, layer rule) and every scorer
//! reads that description.
//!
//! # One query surface
//! A [`Scorer`] — an exact lens over a ledger ([`Ledger::lens`](crate::Ledger::lens)),
//! a lens over a sketch ([`LedgerSketch::lens`]), the ridge lenses
//! ([`RidgeLens`], [`SketchRidge`], [`SegmentRidge`]) — turns a [`Query`] into [`Scores`], which
//! rank ([`Scores::top_k`], ties broken by source id), look up
//! ([`Scores::value`], [`Scores::diagonal`]) and re-rank exactly
//! ([`Scores::rerank`]). [`Scorer::top_k`] goes from a network and an input to
//! rankings in one call, building the query the scorer needs.
//! [`Ledger::explain`](crate::Ledger::explain) (all representation scores and
//! the balance) and [`Ledger::class_attribution`](crate::Ledger::class_attribution)
//! complete the picture.
//!
//! # Compact forms: projected accounts
//! A [`LedgerSketch`] keeps every account `G_s` of layer `l` as `k` numbers
//! `φ_l(G_s)`, a seeded random [`Projection`] that is linear and unbiased,
//! `E⟨φ(X), φ(Y)⟩ = ⟨X, Y⟩`:
//!
//! ```text
//! tensor:    φ(G)_m = l_mᵀ G r_m / √k          (l_m, r_m Rademacher)
//! Kronecker: φ(G)   = S_out G S_inᵀ            (S_out: k_out × fan_out, S_in: k_in × aug_in,
//!                                               Rademacher / √side, k = k_out·k_in)
//! ```
//!
//! so every lens linear in the account (`Dot`, `Influence`, `Share`, `Loss`,
//! the sketched ridge lens) is estimated from `⟨φ(Q), φ(G_s)⟩`, with an error
//! of order `‖Q‖ ‖G_s‖ / √k` per score; the norm lenses (`Norm`, `Cos`) and
//! `Margin` are refused with an error. A factored row `d ãᵀ` projects without
//! forming the outer product: `(L d) ⊙ (R ã) / √k` (tensor, `k (fan_out +
//! aug_in)` multiply-adds) or `(S_out d)(S_in ã)ᵀ` (Kronecker, `k_out fan_out +
//! k_in aug_in + k` — about `√k` times fewer). A side at least as large as the
//! layer's is the identity, so a projection as large as a layer is exact.
//!
//! A sketch is made either **offline**, from an exact ledger
//! ([`LedgerSketch::build`]), or **online**, while training
//! ([`OptimizerHook::online`](crate::OptimizerHook::online)): each example's
//! share of every step is projected as it is booked and the exact accounts are
//! never stored — memory is `k` numbers per source, layer and segment, whatever
//! the layer's size, which is what lets a network of a million parameters be
//! traced over 60,000 examples. Because `φ` is linear, momentum shares, decay,
//! segments and the balance carry over: the residual is settled as
//! `φ(W_end − W_start) − Σ_s φ(G_s)`, and online and offline sketches of the
//! same run agree up to rounding.

mod attribution;
mod exact;
mod explain;
mod input;
mod kernel;
pub(crate) mod lens;
mod ridge;
mod scores;
mod segment_ridge;
mod sketch;

pub use attribution::ClassAttribution;
pub use exact::ExactLens;
pub use explain::{ClassDistributions, Explanation, LayerExplanation};
pub use input::{Pairing, Query, Targets, argmax_rows};
pub use lens::{LayerSel, Lens};
pub use ridge::{MAX_RIDGE_SOURCES, RidgeLens};
pub use scores::{Influence, Influences, Ranking, Scores};
pub use segment_ridge::{MAX_SEGMENT_RIDGE_BYTES, SegmentRidge};
pub(crate) use sketch::Projector;
pub use sketch::{LedgerSketch, Projection, SketchConfig, SketchLens, SketchRidge};

use ndarray::{Array1, ArrayViewD};

use crate::error::Result;
use crate::float::Float;
use crate::ledger::SourceMeta;
use crate::trace::{SourceId, TracedModel};

/// Anything that scores every source of a ledger for a batch of queries: an
/// exact lens ([`ExactLens`]), a sketch's lens ([`SketchLens`]), the ridge
/// lenses ([`RidgeLens`], [`SketchRidge`], [`SegmentRidge`]).
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{Lens, Scorer, query::RidgeLens};
/// let x = ndarray::array![[1.0, 0.9]];
/// let ridge = RidgeLens::fit(&ledger, 0.1)?;
/// let scorers: [&dyn Scorer<'_, f64>; 2] = [&ledger.lens(Lens::Loss), &ridge];
/// for scorer in scorers {
///     let ranking = &scorer.top_k(&mut net, x.view().into_dyn(), 4)?[0];
///     assert_eq!(ranking.proponents.len(), 4);
/// }
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
pub trait Scorer<'a, F: Float = f32> {
    /// The sources, in the column order of scores.
    fn sources(&self) -> &'a [SourceMeta];

    /// Whether queries must carry loss gradients.
    fn needs_gradients(&self) -> bool;

    /// Scores of every source for every query, `[n_queries, n_sources]`.
    ///
    /// # Errors
    /// A query of other layers, without the gradients the scorer needs, or a
    /// lens the scorer cannot serve.
    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>>;

    /// The query this scorer needs for inputs `x`: a forward pass, and for a
    /// gradient scorer the loss gradients at the predicted class.
    ///
    /// # Errors
    /// Errors of the model's passes.
    fn query(&self, model: &mut dyn TracedModel<F>, x: ArrayViewD<'_, F>) -> Result<Query<F>> {
        if self.needs_gradients() {
            Query::gradients(model, x, input::Targets::Predicted)
        } else {
            Query::forward(model, x)
        }
    }

    /// From inputs to rankings in one call: builds the [`query`](Self::query),
    /// scores it and returns the top `k` of every input.
    ///
    /// # Errors
    /// As [`query`](Self::query) and [`scores`](Self::scores).
    fn top_k(
        &self,
        model: &mut dyn TracedModel<F>,
        x: ArrayViewD<'_, F>,
        k: usize,
    ) -> Result<Vec<Ranking>> {
        let query = self.query(model, x)?;
        Ok(self.scores(&query)?.top_k_all(k))
    }

    /// The scores of the sources at columns `sources` for query `q` only (what
    /// exact re-ranking reads). The default computes every score.
    ///
    /// # Errors
    /// As [`scores`](Self::scores).
    fn scores_of(&self, query: &Query<F>, q: usize, sources: &[usize]) -> Result<Vec<f64>> {
        let all = self.scores(query)?;
        Ok(sources.iter().map(|&s| all[[q, s]]).collect())
    }

    /// Self-scores: for query `q` (a training example run through the final
    /// network) the score of source `sources[q]`. The default computes every score.
    ///
    /// # Errors
    /// As [`scores`](Self::scores) and [`Scores::diagonal`].
    fn self_scores(&self, query: &Query<F>, sources: &[SourceId]) -> Result<Array1<f64>> {
        self.scores(query)?.diagonal(sources)
    }
}
