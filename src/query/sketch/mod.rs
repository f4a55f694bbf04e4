//! Compact mode: a seeded random-projection sketch of every account.
//!
//! Each traced layer's account `G_s` (`fan_out × aug_in`) is projected to `k`
//! numbers
//!
//! ```text
//! φ(G)_m = l_mᵀ G r_m / √k,   l_m ∈ {±1}^fan_out,  r_m ∈ {±1}^aug_in  (seeded Rademacher)
//! ```
//!
//! a tensor (Khatri–Rao) sketch: a factored row `d ãᵀ` maps to `(L d) ⊙ (R ã) / √k`
//! without forming the outer product, and `E⟨φ(X), φ(Y)⟩ = ⟨X, Y⟩`. Every lens
//! that is linear in the account — [`Lens::Dot`], [`Lens::Influence`],
//! [`Lens::Share`], [`Lens::Loss`] — is therefore estimated from the sketch
//! alone, with an error of order `‖Q‖ ‖G_s‖ / √k` per score. The norm lenses
//! ([`Lens::Norm`], [`Lens::Cos`]) are not linear and are not served.
//!
//! The sketch is stored in `bf16` (`2k` bytes per source per layer, any
//! number of epochs or segments), so it answers queries for ledgers whose exact
//! form would not fit in memory: save the ledger, [`Ledger::load`] it
//! (memory-mapped), build the sketch, and drop the ledger. Because `φ` is
//! linear, the sketch balances like the ledger: `Σ_s φ(G_s) + φ(residual) =
//! φ(W_T − W₀)` up to the `bf16` rounding, which [`LedgerSketch::balance_error`]
//! reports.
//!
//! The same features serve the ridge lens at any `N`: with `S = [φ₁(G) … φ_L(G)]`
//! (`N × Σk`), `K ≈ S Sᵀ` and `(K + λI)⁻¹ S g = S (SᵀS + λI)⁻¹ g` needs only a
//! `Σk × Σk` solve ([`SketchRidge`]).

mod build;
mod persist;
mod project;
mod ridge;
mod score;

pub use project::Projection;
pub(crate) use project::Projector;
pub use ridge::SketchRidge;
pub use score::SketchLens;

use half::bf16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array1, Array2, s};
use rayon::prelude::*;

use super::kernel::LayerInput;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{LayerMeta, SourceMeta};

/// How many sketch dimensions each layer gets.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dims {
    Fixed(usize),
    Ratio(f64),
}

/// Configuration of a [`LedgerSketch`]: its size and seed.
#[derive(Clone, Debug, PartialEq)]
pub struct SketchConfig {
    dims: Dims,
    seed: u64,
    projection: Projection,
}

impl SketchConfig {
    /// `k` dimensions for every layer (past a layer's `fan_out · aug_in` the
    /// exact dense form is smaller; the error falls as `1/√k`).
    pub fn with_dims(k: usize) -> Self {
        Self {
            dims: Dims::Fixed(k),
            seed: 0x5EED,
            projection: Projection::Tensor,
        }
    }

    /// Per layer, as many dimensions as make the sketch (with the parameter
    /// change it keeps) `ratio` times smaller than that layer's exact ledger
    /// bytes (at least 1, at most `fan_out · aug_in`).
    pub fn with_ratio(ratio: f64) -> Self {
        Self {
            dims: Dims::Ratio(ratio),
            seed: 0x5EED,
            projection: Projection::Tensor,
        }
    }

    /// The seed of the projections (default `0x5EED`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The projection (default [`Projection::Tensor`]). With
    /// [`Projection::Kronecker`] a layer gets `k_out · k_in ≤ k` dimensions,
    /// the two sides balanced (`k_out ≈ √k`) within its shape.
    pub fn projection(mut self, projection: Projection) -> Self {
        self.projection = projection;
        self
    }

    pub(crate) fn seed_value(&self) -> u64 {
        self.seed
    }

    pub(crate) fn projection_value(&self) -> Projection {
        self.projection
    }

    /// The projectors of `layers` for `exact_bytes` (per layer) of exact
    /// ledger and `n` sources.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero or too many dimensions, or a ratio that is
    /// not finite and > 0.
    pub(crate) fn projectors(
        &self,
        layers: &[LayerMeta],
        exact_bytes: &[usize],
        n: usize,
    ) -> Result<Vec<Projector>> {
        let mut out = Vec::with_capacity(layers.len());
        for (l, (meta, &bytes)) in layers.iter().zip(exact_bytes).enumerate() {
            let (fan_out, aug_in) = (meta.shape.fan_out, meta.shape.aug_in());
            let full = fan_out.saturating_mul(aug_in);
            let k = match self.dims {
                Dims::Fixed(0) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch dimensions",
                        reason: "must be at least 1, found 0".into(),
                    });
                }
                Dims::Fixed(k) if k > max_dims(full) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch dimensions",
                        reason: format!(
                            "at most {} for layer {} ({full} entries), found {k}",
                            max_dims(full),
                            meta.id
                        ),
                    });
                }
                Dims::Fixed(k) => k,
                Dims::Ratio(r) if r.is_finite() && r > 0.0 => {
                    // The budget, less the parameter change every sketch keeps.
                    let budget = (bytes as f64 / r - (full * 8) as f64).max(0.0);
                    ((budget / (2.0 * n.max(1) as f64)).floor() as usize).clamp(1, full)
                }
                Dims::Ratio(r) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch ratio",
                        reason: format!("must be finite and > 0, found {r}"),
                    });
                }
            };
            let split = match self.projection {
                Projection::Tensor => (k, k),
                Projection::Kronecker => project::kronecker_split(k, fan_out, aug_in),
            };
            if project::operator_values(self.projection, split, fan_out, aug_in)
                .is_none_or(|v| v > project::MAX_OPERATOR_VALUES)
            {
                return Err(Error::InvalidConfig {
                    what: "sketch dimensions",
                    reason: format!(
                        "layer {}: the projection of {k} dimensions for a {fan_out} × {aug_in} layer would hold more than {} operator values; use fewer dimensions",
                        meta.id,
                        project::MAX_OPERATOR_VALUES
                    ),
                });
            }
            out.push(Projector::new(
                self.projection,
                self.seed,
                l,
                split,
                fan_out,
                aug_in,
            ));
        }
        Ok(out)
    }
}

/// A compact, approximate ledger: every account projected to `k` numbers per
/// layer (see the [module docs](crate::query) and the estimator below).
///
/// # Example
/// ```
/// use ndarray::array;
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::nn::{DenseConfig, Sequential};
/// use refinement_ledger::query::{LedgerSketch, SketchConfig};
/// use refinement_ledger::{Batch, ExampleId, LayerSel, Lens, OptimizerHook, Query, optim::SgdConfig};
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
/// let mut hook = OptimizerHook::new(SgdConfig::new(0.1).build()?, &net.traceables())?;
/// let x = array![[1.0, 0.0], [0.0, 1.0]].into_dyn();
/// for _ in 0..5 {
///     net.train_batch(x.view(), &[0, 1])?;
///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1)], &[0, 1]))?;
/// }
/// let ledger = hook.finish()?;
/// let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(64))?;
/// net.forward(array![[1.0, 0.2]].into_dyn().view())?;
/// let query = Query::from_layers(&net.traceables())?;
/// let approx = sketch.scores(&query, Lens::Dot, LayerSel::All)?;
/// let exact = ledger.scores(&query, Lens::Dot, LayerSel::All)?;
/// assert_eq!(approx.dim(), exact.dim());
/// assert!(sketch.balance_error().iter().all(|&e| e < 1e-2));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct LedgerSketch {
    layers: Vec<LayerMeta>,
    sources: Vec<SourceMeta>,
    seed: u64,
    projection: Projection,
    dims: Vec<usize>,
    /// Per layer, the seeded operators (regenerated from the seed on load).
    projectors: Vec<Projector>,
    /// `W_T − W₀` per layer, for the refinement.
    change: Vec<Array2<f64>>,
    /// Per layer, `[N, k]` row-major.
    sketch: Vec<Vec<bf16>>,
    /// Per layer, `φ(residual)`.
    residual: Vec<Array1<f64>>,
    exact_bytes: Vec<usize>,
}

/// Sources per parallel chunk when building and scoring.
const SOURCE_CHUNK: usize = 512;
/// Sources per chunk of a query's dot products (their `f32` copy stays in cache).
const DOT_CHUNK: usize = 128;
/// The most dimensions a layer's sketch may have beyond its account's own
/// size (`fan_out · aug_in`, past which the exact dense form is smaller).
pub(crate) const MAX_EXTRA_DIMS: usize = 1 << 16;

/// The largest `k` a layer of `fan_out · aug_in = full` entries may be sketched to.
pub(crate) fn max_dims(full: usize) -> usize {
    full.max(MAX_EXTRA_DIMS)
}
/// Factored rows per GEMM block when building.
const ROW_BLOCK: usize = 2048;

impl LedgerSketch {
    /// The traced layers, in order.
    pub fn layers(&self) -> &[LayerMeta] {
        &self.layers
    }

    /// Every source, in column order of scores.
    pub fn sources(&self) -> &[SourceMeta] {
        &self.sources
    }

    /// Sketch dimensions per layer.
    pub fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The projection the sketch was made with.
    pub fn projection(&self) -> Projection {
        self.projection
    }

    /// Bytes of the sketch per layer (`2k` per source, plus the layer's
    /// parameter change kept for the refinement).
    pub fn bytes_per_layer(&self) -> Vec<usize> {
        self.sketch
            .iter()
            .zip(&self.change)
            .map(|(s, c)| s.len() * 2 + c.len() * 8)
            .collect()
    }

    /// Bytes per layer of the exact ledger the sketch was built from; for an
    /// online sketch ([`OptimizerHook::online`](crate::OptimizerHook::online)),
    /// what the exact ledger of the same run would have held — counted while
    /// booking (factored rows, one dense account per source and segment,
    /// residuals and the parameters at every boundary, before compaction),
    /// never allocated.
    pub fn exact_bytes_per_layer(&self) -> &[usize] {
        &self.exact_bytes
    }

    /// Per layer, `‖Σ_s φ(G_s) + φ(residual) − φ(W_T − W₀)‖ / ‖φ(W_T − W₀)‖`:
    /// the balance error the compact form introduces (`bf16` rounding of the
    /// stored sketches; the projection itself is linear and keeps the balance).
    pub fn balance_error(&self) -> Vec<f64> {
        (0..self.layers.len())
            .map(|l| {
                let k = self.dims[l];
                let target = self.projectors[l].project_dense(self.change[l].view());
                let mut total = self.residual[l].clone();
                let mut row = vec![0f32; k];
                for chunk in self.sketch[l].chunks_exact(k) {
                    chunk.convert_to_f32_slice(&mut row);
                    for (t, &v) in total.iter_mut().zip(&row) {
                        *t += f64::from(v);
                    }
                }
                let norm = target.dot(&target).sqrt();
                let err = (&total - &target).mapv(|v| v * v).sum().sqrt();
                if norm == 0.0 { err } else { err / norm }
            })
            .collect()
    }

    /// `φ(Q_q)` for every query of layer `l`: `[n_q, k]`.
    fn sketch_queries<F: Float>(&self, l: usize, input: &LayerInput<F>) -> Array2<f64> {
        let a = input.a64.mapv(|v| v as f32);
        let t = input.target.mapv(|v| v as f32);
        self.projectors[l]
            .project_rows(a.view(), t.view(), input.positions)
            .mapv(f64::from)
    }

    /// `⟨φ(Q_q), φ(G_s)⟩` of layer `l`: `[n_q, N]`.
    fn sketch_dots(&self, l: usize, phi_q: &Array2<f64>) -> Array2<f64> {
        let k = self.dims[l];
        let n = self.sources.len();
        let qf = phi_q.mapv(|v| v as f32);
        // Small chunks, each widened into one reused buffer per thread: the
        // widening stays in cache and no memory is allocated per chunk.
        let parts: Vec<Array2<f32>> = self.sketch[l]
            .par_chunks(DOT_CHUNK * k)
            .map_init(
                || vec![0f32; DOT_CHUNK * k],
                |buf, chunk| {
                    let bits: &[u16] = bytemuck::cast_slice(chunk);
                    for (o, &b) in buf.iter_mut().zip(bits) {
                        // bf16 is the top half of an f32.
                        *o = f32::from_bits(u32::from(b) << 16);
                    }
                    let m =
                        ndarray::ArrayView2::from_shape((chunk.len() / k, k), &buf[..chunk.len()])
                            .expect("invariant: chunk holds whole sources");
                    qf.dot(&m.t())
                },
            )
            .collect();
        let mut out = Array2::zeros((phi_q.nrows(), n));
        for (i, p) in parts.iter().enumerate() {
            let s0 = i * DOT_CHUNK;
            out.slice_mut(s![.., s0..s0 + p.ncols()])
                .assign(&p.mapv(f64::from));
        }
        out
    }
}
