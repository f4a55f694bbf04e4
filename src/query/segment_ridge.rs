//! The ridge lens per segment: the single-run analogue of an ensemble.
//!
//! Each segment `k` of training (e.g. an epoch) has its own accounts `L_k`
//! (`N × D`: what every source changed during that segment) and its own
//! parameters. Pairing each segment's accounts with the query's loss gradient
//! `g_k(x)` at that segment's boundary (as the loss lens's
//! [`Pairing::SegmentEnd`] and [`Pairing::Midpoint`] do), the lens solves one
//! ridge system per segment and adds the solutions:
//!
//! ```text
//! α(x) = Σ_k (K_k + λ_k I)⁻¹ L_k g_k(x),   K_k = L_k L_kᵀ,   λ_k = c · trace(K_k) / N
//! ```
//!
//! Within a segment an example is (typically) visited once, so `L_k`'s rows are
//! its loss gradients at about that segment's parameters, scaled by the
//! learning rate — TRAK's features at one checkpoint, exact rather than
//! projected — and the sum over segments ensembles the checkpoints of one run.
//!
//! `K_k` is computed from the ledger's factored rows without materialising the
//! accounts (each source's rows of the segment read as a query against every
//! source), so its cost is that of scoring `N` queries per segment.
//!
//! **Size limit:** `S` segments hold `S` Gram matrices and their factors,
//! `16 · S · N²` bytes (e.g. 8 GB for 5,000 sources and 20 segments); `fit`
//! refuses more than [`MAX_SEGMENT_RIDGE_BYTES`].

use ndarray::{Array2, s};

use super::Scorer;
use super::input::{Pairing, Query, Targets};
use super::kernel::{LayerInput, dots};
use super::scores::Scores;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{LayerView, Ledger, Segments, SourceMeta};
use crate::linalg::{cholesky, solve_cholesky_many};
use crate::trace::TracedModel;

/// Most bytes [`SegmentRidge::fit`] holds (Gram matrices and factors): 16 GiB.
pub const MAX_SEGMENT_RIDGE_BYTES: usize = 16 << 30;

/// Sources read as queries at a time when forming a Gram matrix.
const SOURCE_BATCH: usize = 256;

/// The ridge lens per segment, a [`Scorer`] of queries paired with the
/// ledger's segments: `α(x) = Σ_k (K_k + λ_k I)⁻¹ L_k g_k(x)` with `L_k` the
/// accounts of segment `k` (`N × D`), `K_k = L_k L_kᵀ`, `λ_k = c · trace(K_k) / N`
/// and `g_k(x)` the query's loss gradient at segment `k`'s end
/// ([`Pairing::SegmentEnd`], or [`Pairing::Midpoint`]). Within a segment (an
/// epoch) an example is visited about once, so `L_k`'s rows are its loss
/// gradients near that segment's parameters times the learning rate: one
/// checkpoint's exact features, and the sum over segments ensembles the
/// checkpoints of one run. Holds `16 · S · N²` bytes for `S` segments (at most
/// [`MAX_SEGMENT_RIDGE_BYTES`]).
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{Scorer, query::SegmentRidge};
/// let ridge = SegmentRidge::fit(&ledger, 0.1)?; // one system per segment
/// assert_eq!(ridge.lambdas().len(), ledger.n_segments());
/// let top = ridge.top_k(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn(), 2)?;
/// assert!(top[0].proponents.iter().all(|p| p.label == Some(1)));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct SegmentRidge<'a, F: Float = f32> {
    ledger: &'a Ledger<F>,
    grams: Vec<Array2<f64>>,
    chols: Vec<Array2<f64>>,
    lambdas: Vec<f64>,
    c: f64,
    pairing: Pairing,
}

impl<'a, F: Float> SegmentRidge<'a, F> {
    /// Forms every segment's Gram matrix `K_k` and factors `K_k + λ_k I`.
    ///
    /// # Errors
    /// [`Error::Empty`] for a ledger without sources; [`Error::InvalidConfig`]
    /// for `c ≤ 0`, more than [`MAX_SEGMENT_RIDGE_BYTES`], or a system that is
    /// not positive definite.
    pub fn fit(ledger: &'a Ledger<F>, c: f64) -> Result<Self> {
        let n = ledger.sources().len();
        if n == 0 {
            return Err(Error::Empty {
                op: "SegmentRidge::fit",
                what: "ledger (no sources)",
            });
        }
        let n_seg = ledger.n_segments();
        let bytes = n
            .checked_mul(n)
            .and_then(|v| v.checked_mul(16))
            .and_then(|v| v.checked_mul(n_seg));
        if bytes.is_none_or(|b| b > MAX_SEGMENT_RIDGE_BYTES) {
            return Err(Error::InvalidConfig {
                what: "SegmentRidge::fit",
                reason: format!(
                    "{n_seg} segments of {n} sources need {bytes:?} bytes, more than \
                     {MAX_SEGMENT_RIDGE_BYTES}; use fewer segments or the ridge lens (RidgeLens)"
                ),
            });
        }
        let grams = (0..n_seg)
            .map(|k| segment_gram(ledger, k))
            .collect::<Result<Vec<_>>>()?;
        Self::from_grams(ledger, grams, c)
    }

    fn from_grams(ledger: &'a Ledger<F>, grams: Vec<Array2<f64>>, c: f64) -> Result<Self> {
        let mut out = Self {
            ledger,
            grams,
            chols: Vec::new(),
            lambdas: Vec::new(),
            c,
            pairing: Pairing::SegmentEnd,
        };
        out.set_c(c)?;
        Ok(out)
    }

    /// Refactors the same Gram matrices with another `c`, in place (each
    /// segment's old factor is dropped before its new one is formed, so the
    /// memory stays that of one fit).
    ///
    /// # Errors
    /// As [`fit`](Self::fit); on error the lens has no factors left and
    /// scoring with it is an error until a `set_c` succeeds.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::query::SegmentRidge;
    /// let mut ridge = SegmentRidge::fit(&ledger, 0.1)?;
    /// let before = ridge.lambdas().to_vec();
    /// ridge.set_c(1.0)?; // the Gram matrices are reused
    /// assert!(ridge.lambdas().iter().zip(&before).all(|(a, b)| (a / b - 10.0).abs() < 1e-9));
    /// assert!(ridge.set_c(0.0).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn set_c(&mut self, c: f64) -> Result<()> {
        self.chols.clear();
        self.lambdas.clear();
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidConfig {
                what: "ridge c",
                reason: format!("must be finite and > 0, found {c}"),
            });
        }
        let n = self.ledger.sources().len();
        for gram in &self.grams {
            let lambda = (c * gram.diag().sum() / n as f64).max(f64::MIN_POSITIVE);
            let mut a = gram.clone();
            a.diag_mut().mapv_inplace(|v| v + lambda);
            self.chols.push(cholesky(a)?);
            self.lambdas.push(lambda);
        }
        self.c = c;
        Ok(())
    }

    /// How the queries this lens builds ([`Scorer::query`]) pair each segment
    /// with gradients (default [`Pairing::SegmentEnd`]).
    pub fn pairing(mut self, pairing: Pairing) -> Self {
        self.pairing = pairing;
        self
    }

    /// `λ_k` per segment.
    pub fn lambdas(&self) -> &[f64] {
        &self.lambdas
    }

    /// The `c` it was fitted with.
    pub fn c(&self) -> f64 {
        self.c
    }
}

impl<'a, F: Float> Scorer<'a, F> for SegmentRidge<'a, F> {
    fn sources(&self) -> &'a [SourceMeta] {
        self.ledger.sources()
    }

    fn needs_gradients(&self) -> bool {
        true
    }

    /// `Σ_k (K_k + λ_k I)⁻¹ L_k g_k(x)`: a query paired with the ledger's
    /// segments ([`Query::paired`]) brings `g_k`; an unpaired one uses its
    /// final gradient for every segment.
    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>> {
        const OP: &str = "SegmentRidge::scores";
        let ledger = self.ledger;
        ledger.check_query(query, OP)?;
        if self.chols.len() != ledger.n_segments() {
            return Err(Error::InvalidConfig {
                what: "SegmentRidge",
                reason: "has no factors (the last set_c failed); call set_c with a valid c".into(),
            });
        }
        let (n, n_q, n_seg) = (ledger.sources().len(), query.len(), ledger.n_segments());
        let mut per_layer = Vec::with_capacity(ledger.layers().len());
        for l in 0..ledger.layers().len() {
            per_layer.push(match query.paired_inputs(l, n_seg, OP)? {
                Some(per_segment) => per_segment,
                None => {
                    let input = query.loss_input(l, OP)?;
                    let mut all = Vec::with_capacity(n_seg);
                    all.push(vec![(input, 1.0)]);
                    all.resize_with(n_seg, Vec::new);
                    all
                }
            });
        }
        let mut alpha = Array2::<f64>::zeros((n, n_q));
        for k in 0..n_seg {
            let mut lg = Array2::<f64>::zeros((n, n_q));
            for (l, segments) in per_layer.iter().enumerate() {
                let view = ledger.layer_view(l, Segments::One(k))?;
                // An unpaired query's one input serves every segment.
                let inputs = if segments[k].is_empty() {
                    &segments[0]
                } else {
                    &segments[k]
                };
                for (input, w) in inputs {
                    lg.scaled_add(*w, &dots(&view, input, n, n_q));
                }
            }
            alpha += &solve_cholesky_many(&self.chols[k], lg);
        }
        Ok(Scores::new(
            alpha.reversed_axes().as_standard_layout().into_owned(),
            ledger.sources(),
        ))
    }

    /// The query paired with the ledger's segments (at the predicted class).
    fn query(
        &self,
        model: &mut dyn TracedModel<F>,
        x: ndarray::ArrayViewD<'_, F>,
    ) -> Result<Query<F>> {
        Query::paired(model, x, Targets::Predicted, self.ledger, self.pairing)
    }
}

/// `K_k = L_k L_kᵀ` of segment `k` over every traced layer: the accounts of
/// [`SOURCE_BATCH`] sources at a time read as queries against all sources.
fn segment_gram<F: Float>(ledger: &Ledger<F>, k: usize) -> Result<Array2<f64>> {
    let n = ledger.sources().len();
    let mut gram = Array2::<f64>::zeros((n, n));
    for l in 0..ledger.layers().len() {
        let view = ledger.layer_view(l, Segments::One(k))?;
        for s0 in (0..n).step_by(SOURCE_BATCH) {
            let s1 = (s0 + SOURCE_BATCH).min(n);
            let input = accounts_as_input(&view, s0, s1);
            let mut block = gram.slice_mut(s![.., s0..s1]);
            block += &dots(&view, &input, n, s1 - s0);
        }
    }
    // Symmetric up to rounding: average the two triangles.
    let sym = (&gram + &gram.t()) * 0.5;
    Ok(sym)
}

/// The accounts of sources `[s0, s1)` in `view` as a query batch: each of a
/// source's rows `κ d ãᵀ` is a position (patch `ã`, target `κ d`), a dense
/// account `G` is `fan_out` positions (patch `G[o, :]`, target `e_o`), so
/// that a source's contribution dotted with this "query" is `⟨G_s, G_q⟩`.
fn accounts_as_input<F: Float>(view: &LayerView<'_, F>, s0: usize, s1: usize) -> LayerInput<F> {
    let rows = view.rows;
    let (aug_in, fan_out) = (rows.aug_in, rows.fan_out);
    let active = |s: usize| {
        let (r0, r1) = rows.range(s as u32, s as u32 + 1);
        (r0..r1).filter(|&j| view.coef[rows.group[j] as usize] != 0.0)
    };
    let dense = |s: usize| view.dense.iter().filter_map(move |acc| acc.get(s as u32));
    // Positions per source: its active rows, and fan_out per dense account.
    let p = (s0..s1)
        .map(|s| active(s).count() + dense(s).count() * fan_out)
        .max()
        .unwrap_or(0)
        .max(1);
    let n_q = s1 - s0;
    let mut a64 = Array2::<f64>::zeros((n_q * p, aug_in));
    let mut target = Array2::<f64>::zeros((n_q * p, fan_out));
    for (q, s) in (s0..s1).enumerate() {
        let mut at = q * p;
        for j in active(s) {
            let kappa = view.coef[rows.group[j] as usize];
            let (a, d) = rows.view(j, j + 1);
            a64.row_mut(at)
                .zip_mut_with(&a.row(0), |x, v| *x = v.widen());
            target
                .row_mut(at)
                .zip_mut_with(&d.row(0), |x, v| *x = kappa * v.widen());
            at += 1;
        }
        for g in dense(s) {
            for (o, row) in g.rows().into_iter().enumerate() {
                a64.row_mut(at).assign(&row);
                target[[at, o]] = 1.0;
                at += 1;
            }
        }
    }
    LayerInput {
        n_q,
        positions: p,
        af: a64.mapv(F::narrow),
        a64,
        target,
    }
}
