//! The ridge lens on a sketch: `S (SᵀS + λI)⁻¹ φ(g)`, a `Σk × Σk` solve.

use half::slice::HalfFloatSliceExt;
use ndarray::{Array2, ArrayView2, s};
use rayon::prelude::*;

use super::{LedgerSketch, SOURCE_CHUNK};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::SourceMeta;
use crate::linalg::{cholesky, solve_cholesky_many};
use crate::query::{Query, Scorer, Scores};

impl LedgerSketch {
    /// The ridge lens on the sketch: `S (SᵀS + λI)⁻¹ φ(g)` with `S` the sketches
    /// of all layers side by side and `λ = c · ‖S‖²_F / N` (≈ `c · trace(K) / N`
    /// of the exact lens). Factors a `Σk × Σk` system once.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `c ≤ 0` or a singular system;
    /// [`Error::Empty`] for a sketch without sources.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{Scorer, query::{LedgerSketch, SketchConfig}};
    /// let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(16))?;
    /// let ridge = sketch.ridge(0.1)?;
    /// let top = ridge.top_k(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn(), 2)?;
    /// assert_eq!(top[0].proponents.len(), 2);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn ridge(&self, c: f64) -> Result<SketchRidge<'_>> {
        let n = self.sources.len();
        if n == 0 {
            return Err(Error::Empty {
                op: "LedgerSketch::ridge",
                what: "sketch (no sources)",
            });
        }
        if !(c.is_finite() && c > 0.0) {
            return Err(Error::InvalidConfig {
                what: "ridge c",
                reason: format!("must be finite and > 0, found {c}"),
            });
        }
        let total: usize = self.dims.iter().sum();
        let starts: Vec<usize> = (0..n).step_by(SOURCE_CHUNK).collect();
        let gram = starts
            .par_iter()
            .map(|&s0| {
                let s1 = (s0 + SOURCE_CHUNK).min(n);
                let m = self.features(s0, s1);
                m.t().dot(&m)
            })
            .reduce(|| Array2::zeros((total, total)), |a, b| a + b);
        let lambda = c * gram.diag().sum() / n as f64;
        let mut a = gram;
        for i in 0..total {
            a[[i, i]] += lambda.max(f64::MIN_POSITIVE);
        }
        Ok(SketchRidge {
            sketch: self,
            chol: cholesky(a)?,
            lambda,
            c,
        })
    }

    /// `S` for sources `[s0, s1)`: `[s1 − s0, Σk]` in `f64`.
    fn features(&self, s0: usize, s1: usize) -> Array2<f64> {
        let total: usize = self.dims.iter().sum();
        let mut m = Array2::zeros((s1 - s0, total));
        let mut col = 0;
        for (l, &k) in self.dims.iter().enumerate() {
            let mut f = vec![0f32; (s1 - s0) * k];
            self.sketch[l][s0 * k..s1 * k].convert_to_f32_slice(&mut f);
            let block = ArrayView2::from_shape((s1 - s0, k), &f).expect("invariant: k per source");
            m.slice_mut(s![.., col..col + k])
                .assign(&block.mapv(f64::from));
            col += k;
        }
        m
    }
}

/// A factored sketched ridge system (see [`LedgerSketch::ridge`]), a [`Scorer`]:
/// `α ≈ (K + λI)⁻¹ L g(x)` for every query, `[n_queries, n_sources]`, from
/// queries with gradients at the final parameters.
#[derive(Clone, Debug)]
pub struct SketchRidge<'a> {
    sketch: &'a LedgerSketch,
    chol: Array2<f64>,
    lambda: f64,
    c: f64,
}

impl SketchRidge<'_> {
    /// The regularisation `λ` in use.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The `c` it was fitted with.
    pub fn c(&self) -> f64 {
        self.c
    }
}

impl<'a, F: Float> Scorer<'a, F> for SketchRidge<'a> {
    fn sources(&self) -> &'a [SourceMeta] {
        &self.sketch.sources
    }

    fn needs_gradients(&self) -> bool {
        true
    }

    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>> {
        const OP: &str = "SketchRidge::scores";
        let sketch = self.sketch;
        let all: Vec<usize> = (0..sketch.layers.len()).collect();
        let phis = sketch.loss_sketches(query, &all, OP)?;
        let total: usize = sketch.dims.iter().sum();
        let mut g = Array2::zeros((query.len(), total));
        let mut col = 0;
        for (phi, &k) in phis.iter().zip(&sketch.dims) {
            g.slice_mut(s![.., col..col + k]).assign(phi);
            col += k;
        }
        // β = (SᵀS + λI)⁻¹ φ(g) per query, then α = S β.
        let beta = solve_cholesky_many(
            &self.chol,
            g.reversed_axes().as_standard_layout().into_owned(),
        )
        .reversed_axes()
        .as_standard_layout()
        .into_owned();
        let mut col = 0;
        let mut out = Array2::zeros((query.len(), sketch.sources.len()));
        for (l, &k) in sketch.dims.iter().enumerate() {
            out += &sketch.sketch_dots(l, &beta.slice(s![.., col..col + k]).to_owned());
            col += k;
        }
        Ok(Scores::new(out, &sketch.sources))
    }
}
