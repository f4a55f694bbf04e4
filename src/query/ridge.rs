//! The ridge lens: which training accounts best reconstruct the query's gradient.
//!
//! Stack every source's ledger row over all traced layers into `L` (`N × D`),
//! form `K = L Lᵀ`, and for a query `x` with `g(x) = −∇_θ ℓ(x, ŷ; θ_T)` solve
//!
//! ```text
//! α = (K + λ I)⁻¹ L g(x),   λ = c · trace(K) / N.
//! ```
//!
//! `L g(x)` is exactly the loss lens's score vector, so the ridge lens is the
//! loss lens decorrelated by the accounts' Gram matrix: sources whose updates
//! explain the query's gradient *jointly* rank high. It answers "which examples
//! caused this prediction?" best among the lenses (see the README's evaluation).
//!
//! **Size limit:** `K` is `N × N` in `f64` and is factored once (Cholesky,
//! `N³/3` flops) and reused for every query: 8 N² bytes, e.g. 16 MB for the
//! 1,437 digits, 2.9 GB for 19,000 sources. Beyond that, use the sketched ridge
//! lens ([`LedgerSketch::ridge`](super::LedgerSketch::ridge): every account
//! projected to `k` numbers per layer, a `Σk × Σk` solve), or the loss lens.

use ndarray::Array2;

use super::Scorer;
use super::input::Query;
use super::lens::{LayerSel, Lens};
use super::scores::Scores;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{Ledger, SourceMeta};
use crate::linalg::{add_gram, cholesky, solve_cholesky_many};

/// A factored ridge system for one ledger, reused across queries.
///
/// # Example
/// ```
/// use ndarray::array;
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::nn::{DenseConfig, Sequential};
/// use refinement_ledger::{Batch, ExampleId, OptimizerHook, Query, Scorer, optim::SgdConfig, query::RidgeLens};
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
/// let mut hook = OptimizerHook::new(SgdConfig::new(0.1).build()?, &net.traceables())?;
/// let x = array![[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]].into_dyn();
/// for _ in 0..10 {
///     net.train_batch(x.view(), &[0, 1, 1])?;
///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1), ExampleId(2)], &[0, 1, 1]))?;
/// }
/// let ledger = hook.finish()?;
/// let ridge = RidgeLens::fit(&ledger, 0.1)?;          // K = L Lᵀ, λ = 0.1 · trace(K) / N
/// net.loss_gradients(array![[0.9, 0.1]].into_dyn().view(), &[0])?;
/// let alpha = ridge.scores(&Query::with_gradients(&net.traceables())?)?;
/// assert_eq!(alpha.shape(), &[1, 3]);
/// // Example 0 (class 0, at the query's side) explains the query's gradient most.
/// assert_eq!(alpha.top_k(0, 1)?.proponents[0].source, refinement_ledger::SourceId::Example(ExampleId(0)));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RidgeLens<'a, F: Float = f32> {
    ledger: &'a Ledger<F>,
    gram: Array2<f64>,
    chol: Array2<f64>,
    lambda: f64,
    c: f64,
}

/// Most sources [`RidgeLens::fit`] takes (its three `N × N` matrices are
/// 9.6 GB at this size).
pub const MAX_RIDGE_SOURCES: usize = 20_000;

/// Most values of one layer's `[N, parameters]` account matrix `fit` builds (8 GiB).
const MAX_ACCOUNT_VALUES: usize = 1 << 30;

impl<'a, F: Float> RidgeLens<'a, F> {
    /// Builds `K` from the ledger's accounts and factors `K + λI` with `λ = c · trace(K)/N`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `c ≤ 0` or a ledger past
    /// [`MAX_RIDGE_SOURCES`] (or whose account matrices would be larger than
    /// 8 GiB); [`Error::Empty`] for a ledger without sources.
    pub fn fit(ledger: &'a Ledger<F>, c: f64) -> Result<Self> {
        let n = ledger.sources().len();
        if n == 0 {
            return Err(Error::Empty {
                op: "RidgeLens::fit",
                what: "ledger (no sources)",
            });
        }
        if n > MAX_RIDGE_SOURCES {
            return Err(Error::InvalidConfig {
                what: "RidgeLens::fit",
                reason: format!(
                    "{n} sources is more than {MAX_RIDGE_SOURCES}: the exact ridge lens holds \
                     three N×N f64 matrices; use the sketch's ridge (LedgerSketch::ridge) instead"
                ),
            });
        }
        for (l, meta) in ledger.layers().iter().enumerate() {
            let values = meta
                .shape
                .fan_out
                .saturating_mul(meta.shape.aug_in())
                .saturating_mul(n);
            if values > MAX_ACCOUNT_VALUES {
                return Err(Error::InvalidConfig {
                    what: "RidgeLens::fit",
                    reason: format!(
                        "layer {l}'s account matrix [{n}, {}] is more than {MAX_ACCOUNT_VALUES} \
                         values; use the sketch's ridge (LedgerSketch::ridge) instead",
                        meta.shape.fan_out * meta.shape.aug_in()
                    ),
                });
            }
        }
        let mut gram = Array2::<f64>::zeros((n, n));
        for l in 0..ledger.layers().len() {
            let m = ledger.account_matrix(l)?;
            add_gram(&m, &mut gram);
        }
        Self::from_gram(ledger, gram, c)
    }

    fn from_gram(ledger: &'a Ledger<F>, gram: Array2<f64>, c: f64) -> Result<Self> {
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidConfig {
                what: "ridge c",
                reason: format!("must be finite and > 0, found {c}"),
            });
        }
        let n = gram.nrows();
        let lambda = c * gram.diag().sum() / n as f64;
        let mut a = gram.clone();
        for i in 0..n {
            a[[i, i]] += lambda.max(f64::MIN_POSITIVE);
        }
        let chol = cholesky(a)?;
        Ok(Self {
            ledger,
            gram,
            chol,
            lambda,
            c,
        })
    }

    /// The same Gram matrix refactored with another `c`.
    ///
    /// # Errors
    /// As [`fit`](Self::fit).
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::query::RidgeLens;
    /// let ridge = RidgeLens::fit(&ledger, 0.1)?;
    /// let stronger = ridge.with_c(1.0)?; // the Gram matrix is reused
    /// assert!(stronger.lambda() > ridge.lambda());
    /// assert!(ridge.with_c(0.0).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn with_c(&self, c: f64) -> Result<Self> {
        Self::from_gram(self.ledger, self.gram.clone(), c)
    }

    /// The regularisation `λ` in use.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The `c` it was fitted with.
    pub fn c(&self) -> f64 {
        self.c
    }
}

/// `α = (K + λI)⁻¹ L g(x)` for every query, `[n_queries, n_sources]`, where
/// `L g(x)` is the loss lens's scores for the query (with the query's pairing).
impl<'a, F: Float> Scorer<'a, F> for RidgeLens<'a, F> {
    fn sources(&self) -> &'a [SourceMeta] {
        self.ledger.sources()
    }

    fn needs_gradients(&self) -> bool {
        true
    }

    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>> {
        let lg = self
            .ledger
            .scores(query, Lens::Loss, LayerSel::All)?
            .into_values(); // [n_q, N] = (L g)ᵀ
        let alpha = solve_cholesky_many(
            &self.chol,
            lg.reversed_axes().as_standard_layout().into_owned(),
        );
        Ok(Scores::new(
            alpha.reversed_axes().as_standard_layout().into_owned(),
            self.ledger.sources(),
        ))
    }
}
