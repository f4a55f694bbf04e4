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

use ndarray::{Array1, Array2, Axis};

use crate::{Error, Float, LayerSel, Ledger, Lens, Query, Result};

/// A factored ridge system for one ledger, reused across queries.
///
/// # Example
/// ```
/// use ndarray::array;
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::nn::{DenseConfig, Sequential};
/// use refinement_ledger::{Batch, ExampleId, OptimizerHook, Query, optim::SgdConfig, query::RidgeLens};
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
/// let mut hook = OptimizerHook::new(SgdConfig::new(0.1).build()?, &net.traceables())?;
/// let x = array![[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]].into_dyn();
/// for _ in 0..10 {
///     net.train_batch(x.view(), &[0, 1, 1])?;
///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1), ExampleId(2)], &[0, 1, 1]))?;
/// }
/// let ledger = hook.finish();
/// let ridge = RidgeLens::fit(&ledger, 0.1)?;          // K = L Lᵀ, λ = 0.1 · trace(K) / N
/// net.loss_gradients(array![[0.9, 0.1]].into_dyn().view(), &[0])?;
/// let alpha = ridge.scores(&ledger, &Query::with_gradients(&net.traceables())?)?;
/// assert_eq!(alpha.shape(), &[1, 3]);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct RidgeLens {
    /// A fingerprint of the ledger it was fitted on.
    fitted_on: (usize, u32),
    gram: Array2<f64>,
    chol: Array2<f64>,
    lambda: f64,
    c: f64,
}

impl RidgeLens {
    /// Builds `K` from the ledger's accounts and factors `K + λI` with `λ = c · trace(K)/N`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `c ≤ 0`; [`Error::Empty`] for a ledger without sources.
    pub fn fit<F: Float>(ledger: &Ledger<F>, c: f64) -> Result<Self> {
        let n = ledger.sources().len();
        if n == 0 {
            return Err(Error::Empty {
                op: "RidgeLens::fit",
                what: "ledger (no sources)",
            });
        }
        let mut gram = Array2::<f64>::zeros((n, n));
        for l in 0..ledger.layers().len() {
            let m = ledger.account_matrix(l)?;
            ndarray::linalg::general_mat_mul(1.0, &m, &m.t(), 1.0, &mut gram);
        }
        let fitted_on = ledger.fingerprint();
        Self::from_gram(gram, c, fitted_on)
    }

    fn from_gram(gram: Array2<f64>, c: f64, fitted_on: (usize, u32)) -> Result<Self> {
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
            fitted_on,
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
    pub fn with_c(&self, c: f64) -> Result<Self> {
        Self::from_gram(self.gram.clone(), c, self.fitted_on)
    }

    /// The regularisation `λ` in use.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The `c` it was fitted with.
    pub fn c(&self) -> f64 {
        self.c
    }

    /// `α = (K + λI)⁻¹ L g(x)` for every query, `[n_queries, n_sources]`.
    /// `query` must carry gradients ([`Query::with_gradients`]).
    ///
    /// # Errors
    /// As [`Ledger::scores`] with [`Lens::Loss`]; [`Error::ShapeMismatch`] for a
    /// ledger that is not the one the lens was fitted on.
    pub fn scores<F: Float>(&self, ledger: &Ledger<F>, query: &Query<F>) -> Result<Array2<f64>> {
        let same = ledger.fingerprint() == self.fitted_on;
        let lg = ledger.scores(query, Lens::Loss, LayerSel::All)?; // [n_q, N] = (L g)ᵀ
        if !same {
            return Err(Error::ShapeMismatch {
                op: "RidgeLens::scores",
                expected: format!(
                    "the ledger the lens was fitted on ({} sources, fingerprint {:08x})",
                    self.fitted_on.0, self.fitted_on.1
                ),
                got: format!(
                    "a ledger of {} sources, fingerprint {:08x}",
                    lg.ncols(),
                    ledger.fingerprint().1
                ),
            });
        }
        let mut out = lg;
        for mut row in out.axis_iter_mut(Axis(0)) {
            let alpha = solve_cholesky(&self.chol, row.to_owned());
            row.assign(&alpha);
        }
        Ok(out)
    }
}

/// Lower Cholesky factor of a symmetric positive definite matrix
/// (row-oriented, each entry a dot product of two contiguous row prefixes).
pub(super) fn cholesky(a: Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = a.as_standard_layout().into_owned();
    let v = l.as_slice_mut().expect("invariant: standard layout");
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (i * n, j * n);
            let dot: f64 = (0..j).map(|k| v[ri + k] * v[rj + k]).sum();
            let x = v[ri + j] - dot;
            if i == j {
                if x.is_nan() || x <= 0.0 {
                    return Err(Error::InvalidConfig {
                        what: "ridge system",
                        reason: format!(
                            "K + λI is not positive definite at pivot {i} (found {x:e}); increase c"
                        ),
                    });
                }
                v[ri + i] = x.sqrt();
            } else {
                v[ri + j] = x / v[rj + j];
            }
        }
        for j in i + 1..n {
            v[i * n + j] = 0.0;
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` by forward and back substitution.
pub(super) fn solve_cholesky(l: &Array2<f64>, mut b: Array1<f64>) -> Array1<f64> {
    let n = l.nrows();
    for i in 0..n {
        let row = l.row(i);
        let s: f64 = (0..i).map(|k| row[k] * b[k]).sum();
        b[i] = (b[i] - s) / row[i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[[k, i]] * b[k]).sum();
        b[i] = (b[i] - s) / l[[i, i]];
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solve_inverts_a_spd_system() {
        let m = ndarray::array![[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
        let l = cholesky(m.clone()).unwrap();
        let back = l.dot(&l.t());
        assert!((&back - &m).iter().all(|v| v.abs() < 1e-12));
        let b = ndarray::array![1.0, -2.0, 0.5];
        let x = solve_cholesky(&l, b.clone());
        assert!((&m.dot(&x) - &b).iter().all(|v| v.abs() < 1e-12));
        assert!(cholesky(ndarray::array![[1.0, 2.0], [2.0, 1.0]]).is_err());
    }
}
