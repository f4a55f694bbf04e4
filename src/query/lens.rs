//! The lenses: each described once, in [`Lens::spec`], and read by every
//! scorer (exact ledger, sketch, self-scores, re-ranking).
//!
//! Per traced layer `l`, a scorer computes for every query and source the
//! *parts* `⟨c, t⟩`, `‖c‖²` (only when the lens needs it) and `‖t‖²`, where
//! `c` is the source's contribution and `t` the lens's target at that layer.
//! A lens is then a formula of those parts and a rule for combining layers.
//! Adding a lens means adding its variant and its [`LensSpec`] here (and its
//! tests); every scorer picks it up.

use ndarray::{Array1, Array2, ArrayView1, ArrayViewMut1};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a source is scored for a query. See the [module docs](crate::query)
/// for the question each lens answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Lens {
    /// `⟨c, r⟩`.
    Dot,
    /// `‖c‖`.
    Norm,
    /// `⟨c, r⟩ / (‖c‖ ‖r‖)`: representativeness — "which training examples does
    /// this look like?" without gradients; use it at the last layer (digits:
    /// agreement@10 0.86 MLP / 0.88 CNN; earlier layers much lower).
    Cos,
    /// `⟨c, r⟩ / ‖r‖`: the paper's ranking of influential examples. Weak on its
    /// own (digits: agreement@10 0.55; deletion drop far below the ridge lens).
    Influence,
    /// `⟨c, r⟩ / ‖r‖²`: the paper's share of the refinement (sums to 1 with the
    /// residual); summed per class it is the class attribution. As a self-score it
    /// ranks mislabelled examples in reverse (digits: AUC 0.17 MLP).
    Share,
    /// `−⟨G, ∇_W ℓ(x)⟩`: the exact TracIn sum over every step. Needs a query
    /// with gradients ([`Query::gradients`](crate::Query::gradients)). With a
    /// segment per epoch and a query paired with the segments
    /// ([`Pairing::Midpoint`](crate::query::Pairing)) it answers "which examples
    /// does this look like?" best (digits: agreement@10 0.97–0.98), and its
    /// self-score finds mislabelled examples (ROC AUC 0.995 MLP, 0.998 CNN).
    Loss,
    /// `c_s[ŷ] − c_s[runner-up]` at the last traced layer, which must output the
    /// logits: how much a source's updates widened the query's winning margin
    /// (digits: deletion drop 1.8 / 2.4, below the ridge lens's 4.1 / 3.6).
    Margin,
}

/// The target `t` a lens scores contributions against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The refinement `r = (W_T − W₀) ⊛ a` of each layer.
    Refinement,
    /// The negative per-example loss gradient `−∇_z ℓ` (needs query gradients).
    LossGradient,
    /// `e_ŷ − e_runner-up` at the last layer, from the final logits.
    Margin,
}

/// How per-layer parts make one score across layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Combine {
    /// The layers as one concatenated representation: parts add, then the formula.
    Concat,
    /// The formula per layer, then the mean over layers.
    MeanOfLayers,
    /// Only the last traced layer exists for this lens.
    LastLayer,
}

/// A lens's score from the parts `⟨c, t⟩`, `‖c‖²`, `‖t‖²` (0 where a
/// denominator is 0, never NaN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Formula {
    /// `⟨c, t⟩`.
    Dot,
    /// `‖c‖`.
    Norm,
    /// `⟨c, t⟩ / ‖t‖`.
    DotPerTargetNorm,
    /// `⟨c, t⟩ / ‖t‖²`.
    DotPerTargetNorm2,
    /// `⟨c, t⟩ / (‖c‖ ‖t‖)`.
    Cosine,
}

impl Formula {
    /// Whether the formula reads `‖c‖²` (not linear in the account: exact ledgers only).
    pub(crate) fn needs_norm(self) -> bool {
        matches!(self, Formula::Norm | Formula::Cosine)
    }

    /// Applies the formula to one query's row of dot products `dot` (in
    /// place), with that row's `‖c‖²` and the query's `‖t‖²`; per-query
    /// factors are computed once per row.
    fn apply_row(
        self,
        mut dot: ArrayViewMut1<'_, f64>,
        norm2: Option<ArrayView1<'_, f64>>,
        t2: f64,
    ) {
        let t = t2.sqrt();
        let div = |x: f64, y: f64| if y == 0.0 { 0.0 } else { x / y };
        match (self, norm2) {
            (Formula::Dot, _) => {}
            (Formula::DotPerTargetNorm, _) => dot.mapv_inplace(|d| div(d, t)),
            (Formula::DotPerTargetNorm2, _) => dot.mapv_inplace(|d| div(d, t2)),
            (Formula::Norm, Some(n2)) => dot.zip_mut_with(&n2, |d, &n| *d = n.sqrt()),
            (Formula::Cosine, Some(n2)) => {
                dot.zip_mut_with(&n2, |d, &n| *d = div(*d, n.sqrt() * t))
            }
            (Formula::Norm | Formula::Cosine, None) => {
                unreachable!("invariant: scorers compute norms for the lenses that need them")
            }
        }
    }
}

/// Everything a scorer needs to know about a lens.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LensSpec {
    pub(crate) target: Target,
    /// Whether the formula reads `‖c‖²` (not linear in the account: exact ledgers only).
    pub(crate) needs_norm: bool,
    pub(crate) combine: Combine,
    /// The score from the parts.
    pub(crate) formula: Formula,
}

impl Lens {
    /// The lens's description: its target, what it needs, its formula and how
    /// layers combine. The one place a lens is defined.
    pub(crate) fn spec(self) -> LensSpec {
        use Combine::*;
        use Formula::*;
        let spec = |target, combine, formula: Formula| LensSpec {
            target,
            needs_norm: formula.needs_norm(),
            combine,
            formula,
        };
        match self {
            Lens::Dot => spec(Target::Refinement, Concat, Dot),
            Lens::Norm => spec(Target::Refinement, Concat, Norm),
            Lens::Cos => spec(Target::Refinement, Concat, Cosine),
            Lens::Influence => spec(Target::Refinement, Concat, DotPerTargetNorm),
            Lens::Share => spec(Target::Refinement, MeanOfLayers, DotPerTargetNorm2),
            Lens::Loss => spec(Target::LossGradient, Concat, Dot),
            Lens::Margin => spec(Target::Margin, LastLayer, Dot),
        }
    }

    /// Whether the lens scores a source's contribution against the refinement
    /// (`Dot`, `Norm`, `Cos`, `Influence`, `Share`) — the paper's lenses.
    pub fn is_representation(self) -> bool {
        self.spec().target == Target::Refinement
    }

    /// Whether the lens needs a query with loss gradients.
    pub fn needs_gradients(self) -> bool {
        self.spec().target == Target::LossGradient
    }
}

/// Which layers a score covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerSel {
    /// One traced layer, by index.
    Layer(usize),
    /// All traced layers combined (as the lens combines layers).
    All,
}

impl LayerSel {
    /// The layer indices selected among `n` traced layers for `lens` (a lens
    /// that lives on the last layer gets only that one).
    pub(crate) fn resolve(self, n: usize, lens: Lens, op: &'static str) -> Result<Vec<usize>> {
        match self {
            LayerSel::Layer(l) if l >= n => Err(Error::IndexOutOfRange {
                op,
                what: "layer",
                index: l,
                len: n,
            }),
            _ if lens.spec().combine == Combine::LastLayer => Ok(vec![n - 1]),
            LayerSel::Layer(l) => Ok(vec![l]),
            LayerSel::All => Ok((0..n).collect()),
        }
    }
}

/// One layer's parts for a batch of queries: `[n_q, n_src]` each (`norm2` only
/// when the lens needs it) and `‖t‖²` per query.
#[derive(Clone, Debug)]
pub(crate) struct Parts {
    pub(crate) dot: Array2<f64>,
    pub(crate) norm2: Option<Array2<f64>>,
    pub(crate) t2: Array1<f64>,
}

impl LensSpec {
    /// The scores `[n_q, n_src]` from the parts of the selected layers.
    pub(crate) fn scores(&self, parts: &[Parts]) -> Array2<f64> {
        if self.combine == Combine::MeanOfLayers && parts.len() > 1 {
            let mut acc = self.apply(parts[0].dot.clone(), parts[0].norm2.as_ref(), &parts[0].t2);
            for p in &parts[1..] {
                acc += &self.apply(p.dot.clone(), p.norm2.as_ref(), &p.t2);
            }
            return acc / parts.len() as f64;
        }
        // One layer, or the layers as one concatenated representation: the
        // parts add, then the formula.
        let mut dot = parts[0].dot.clone();
        let mut t2 = parts[0].t2.clone();
        let mut norm2 = parts[0].norm2.clone();
        for p in &parts[1..] {
            dot += &p.dot;
            t2 += &p.t2;
            if let (Some(a), Some(b)) = (&mut norm2, &p.norm2) {
                *a += b;
            }
        }
        self.apply(dot, norm2.as_ref(), &t2)
    }

    /// The formula applied in place to `dot` (`[n_q, n_src]`).
    fn apply(
        &self,
        mut dot: Array2<f64>,
        norm2: Option<&Array2<f64>>,
        t2: &Array1<f64>,
    ) -> Array2<f64> {
        for (q, row) in dot.rows_mut().into_iter().enumerate() {
            self.formula
                .apply_row(row, norm2.map(|n2| n2.row(q)), t2[q]);
        }
        dot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_follow_their_definitions() {
        let parts = |d: f64, n2: f64, t2: f64| Parts {
            dot: ndarray::array![[d]],
            norm2: Some(ndarray::array![[n2]]),
            t2: ndarray::array![t2],
        };
        let one = |lens: Lens, p: &[Parts]| lens.spec().scores(p)[[0, 0]];
        let p = [parts(3.0, 4.0, 9.0)];
        assert_eq!(one(Lens::Dot, &p), 3.0);
        assert_eq!(one(Lens::Norm, &p), 2.0);
        assert!((one(Lens::Cos, &p) - 0.5).abs() < 1e-15);
        assert!((one(Lens::Influence, &p) - 1.0).abs() < 1e-15);
        assert!((one(Lens::Share, &p) - 1.0 / 3.0).abs() < 1e-15);
        // Two layers: shares average, influence concatenates.
        let two = [parts(3.0, 4.0, 9.0), parts(1.0, 1.0, 16.0)];
        assert!((one(Lens::Share, &two) - (1.0 / 3.0 + 1.0 / 16.0) / 2.0).abs() < 1e-15);
        assert!((one(Lens::Influence, &two) - 4.0 / 5.0).abs() < 1e-15);
        assert!((one(Lens::Cos, &two) - 4.0 / (5.0f64.sqrt() * 5.0)).abs() < 1e-15);
        // A zero target scores 0, never NaN.
        assert_eq!(one(Lens::Share, &[parts(1.0, 1.0, 0.0)]), 0.0);
    }
}
