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

use half::bf16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array1, Array2, ArrayView2, Axis, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::kernel::{LayerInput, dots_for};
use super::ridge::{cholesky, solve_cholesky};
use super::{Explanation, Influences, LayerExplanation, Ranking, rank, select_layers};
use crate::ledger::LayerView;
use crate::ledger::{LayerMeta, SourceMeta};
use crate::storage::{Reader, bf16s, decode, floats, matrix, save_atomic, with_mapped};
use crate::{Error, Float, LayerSel, Ledger, Lens, Query, Result};

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
}

impl SketchConfig {
    /// `k` dimensions for every layer (past a layer's `fan_out · aug_in` the
    /// exact dense form is smaller; the error falls as `1/√k`).
    pub fn with_dims(k: usize) -> Self {
        Self {
            dims: Dims::Fixed(k),
            seed: 0x5EED,
        }
    }

    /// Per layer, as many dimensions as make the sketch (with the parameter
    /// change it keeps) `ratio` times smaller than that layer's exact ledger
    /// bytes (at least 1, at most `fan_out · aug_in`).
    pub fn with_ratio(ratio: f64) -> Self {
        Self {
            dims: Dims::Ratio(ratio),
            seed: 0x5EED,
        }
    }

    /// The seed of the projections (default `0x5EED`).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

/// A compact, approximate ledger: every account projected to `k` numbers per
/// layer (see the [module docs](self)).
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
/// let ledger = hook.finish();
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
    dims: Vec<usize>,
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
/// Factored rows per GEMM block when building.
const ROW_BLOCK: usize = 2048;

/// The seeded Rademacher operators `L` (`k × fan_out`) and `R` (`k × aug_in`) of layer `l`.
fn operators(seed: u64, l: usize, k: usize, fan_out: usize, aug_in: usize) -> [Array2<f64>; 2] {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut sign = |_: (usize, usize)| if rng.random::<bool>() { 1.0 } else { -1.0 };
    let lm = Array2::from_shape_fn((k, fan_out), &mut sign);
    let rm = Array2::from_shape_fn((k, aug_in), &mut sign);
    [lm, rm]
}

/// `φ(M)` of a dense `[fan_out, aug_in]` matrix.
fn sketch_dense(m: ArrayView2<'_, f64>, lm: &Array2<f64>, rm: &Array2<f64>) -> Array1<f64> {
    let t = m.dot(&rm.t()); // [fan_out, k]
    (&t * &lm.t()).sum_axis(Axis(0)) / (lm.nrows() as f64).sqrt()
}

impl LedgerSketch {
    /// Projects every account of `ledger` (all segments summed) with the seeded operators.
    ///
    /// Costs `(fan_out + aug_in)·k` multiply-adds per factored row and
    /// `fan_out·aug_in·k` per dense account, in parallel over sources.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero dimensions or a ratio that is not finite and > 0.
    pub fn build<F: Float>(ledger: &Ledger<F>, config: &SketchConfig) -> Result<Self> {
        let n = ledger.sources().len();
        let exact_bytes = ledger.bytes_per_layer();
        let mut dims = Vec::with_capacity(ledger.layers().len());
        for (meta, &bytes) in ledger.layers().iter().zip(&exact_bytes) {
            let full = meta.shape.fan_out * meta.shape.aug_in();
            let k = match config.dims {
                Dims::Fixed(0) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch dimensions",
                        reason: "must be at least 1, found 0".into(),
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
            dims.push(k);
        }
        let mut sketch = Vec::with_capacity(dims.len());
        let mut residual = Vec::with_capacity(dims.len());
        let mut change = Vec::with_capacity(dims.len());
        for (l, &k) in dims.iter().enumerate() {
            let meta = &ledger.layers()[l];
            let [lm, rm] = operators(config.seed, l, k, meta.shape.fan_out, meta.shape.aug_in());
            let layer = ledger.whole_layer(l);
            sketch.push(sketch_layer(&layer, n, &lm, &rm));
            residual.push(sketch_dense(ledger.residual(l)?.view(), &lm, &rm));
            change.push(ledger.final_params(l)? - ledger.initial_params(l)?);
        }
        Ok(Self {
            layers: ledger.layers().to_vec(),
            sources: ledger.sources().to_vec(),
            seed: config.seed,
            dims,
            change,
            sketch,
            residual,
            exact_bytes,
        })
    }

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

    /// Bytes of the sketch per layer (`2k` per source, plus the layer's
    /// parameter change kept for the refinement).
    pub fn bytes_per_layer(&self) -> Vec<usize> {
        self.sketch
            .iter()
            .zip(&self.change)
            .map(|(s, c)| s.len() * 2 + c.len() * 8)
            .collect()
    }

    /// Bytes per layer of the exact ledger the sketch was built from.
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
                let [lm, rm] = self.operators(l);
                let target = sketch_dense(self.change[l].view(), &lm, &rm);
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

    fn operators(&self, l: usize) -> [Array2<f64>; 2] {
        let shape = &self.layers[l].shape;
        operators(self.seed, l, self.dims[l], shape.fan_out, shape.aug_in())
    }

    /// `φ(Q_q)` for every query of layer `l`: `[n_q, k]`.
    fn sketch_queries<F: Float>(&self, l: usize, input: &LayerInput<F>) -> Array2<f64> {
        let [lm, rm] = self.operators(l);
        let ra = input.a64.dot(&rm.t()); // [n_q·P, k]
        let lt = input.target.dot(&lm.t());
        let prod = ra * lt;
        let k = self.dims[l];
        let mut out = Array2::zeros((input.n_q, k));
        for (r, row) in prod.rows().into_iter().enumerate() {
            let mut o = out.row_mut(r / input.positions);
            o += &row;
        }
        out / (k as f64).sqrt()
    }

    /// `⟨φ(Q_q), φ(G_s)⟩` of layer `l`: `[n_q, N]`.
    fn sketch_dots(&self, l: usize, phi_q: &Array2<f64>) -> Array2<f64> {
        let k = self.dims[l];
        let n = self.sources.len();
        let qf = phi_q.mapv(|v| v as f32);
        let parts: Vec<Array2<f32>> = self.sketch[l]
            .par_chunks(SOURCE_CHUNK * k)
            .map(|chunk| {
                let mut f = vec![0f32; chunk.len()];
                chunk.convert_to_f32_slice(&mut f);
                let m = Array2::from_shape_vec((chunk.len() / k, k), f)
                    .expect("invariant: chunk holds whole sources");
                qf.dot(&m.t())
            })
            .collect();
        let mut out = Array2::zeros((phi_q.nrows(), n));
        for (i, p) in parts.iter().enumerate() {
            let s0 = i * SOURCE_CHUNK;
            out.slice_mut(s![.., s0..s0 + p.ncols()])
                .assign(&p.mapv(f64::from));
        }
        out
    }

    fn check_query<F: Float>(&self, query: &Query<F>, op: &'static str) -> Result<()> {
        query.check(&self.layers, op)
    }

    /// The representation lens's dot products, approximated, as an [`Explanation`]
    /// (norms unavailable: zero).
    fn representation<F: Float>(&self, query: &Query<F>, selected: &[usize]) -> Explanation<'_> {
        let layers = selected
            .iter()
            .map(|&l| {
                let input = query.representation_input(l, &self.change[l]);
                let dot = self.sketch_dots(l, &self.sketch_queries(l, &input));
                LayerExplanation::dots_only(self.layers[l].id.clone(), dot, &input)
            })
            .collect();
        Explanation {
            layers,
            sources: &self.sources,
        }
    }

    /// `φ` of each query's negative loss gradient, per selected layer.
    fn loss_sketches<F: Float>(
        &self,
        query: &Query<F>,
        selected: &[usize],
        op: &'static str,
    ) -> Result<Vec<Array2<f64>>> {
        selected
            .iter()
            .map(|&l| Ok(self.sketch_queries(l, &query.loss_input(l, op)?)))
            .collect()
    }

    /// Approximate scores `[n_queries, n_sources]` under a linear lens
    /// (`Dot`, `Influence`, `Share`, `Loss`), combined over layers as
    /// [`Ledger::scores`] does.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `Norm`, `Cos` and `Margin`;
    /// [`Error::LayerMismatch`] for a query of other layers;
    /// [`Error::NoBackwardCache`] for `Loss` without gradients;
    /// [`Error::IndexOutOfRange`] for a bad layer.
    pub fn scores<F: Float>(
        &self,
        query: &Query<F>,
        lens: Lens,
        layers: LayerSel,
    ) -> Result<Array2<f64>> {
        const OP: &str = "LedgerSketch::scores";
        self.check_query(query, OP)?;
        let selected = select_layers(self.layers.len(), layers, OP)?;
        match lens {
            Lens::Loss => {
                let phis = self.loss_sketches(query, &selected, OP)?;
                let mut total = Array2::zeros((query.n, self.sources.len()));
                for (&l, phi) in selected.iter().zip(&phis) {
                    total += &self.sketch_dots(l, phi);
                }
                Ok(total)
            }
            Lens::Dot | Lens::Influence | Lens::Share => {
                let sel = if selected.len() == 1 {
                    LayerSel::Layer(0)
                } else {
                    LayerSel::All
                };
                self.representation(query, &selected).scores(lens, sel)
            }
            _ => Err(Error::InvalidConfig {
                what: "lens",
                reason: format!(
                    "a sketch serves the lenses linear in the account (Dot, Influence, Share, Loss), found {lens:?}; use the exact Ledger"
                ),
            }),
        }
    }

    /// The approximate top `k` proponents and opponents of every query, per
    /// layer and across all layers (as [`Ledger::top_k_influences`]).
    ///
    /// # Errors
    /// As [`scores`](Self::scores).
    pub fn top_k_influences<F: Float>(
        &self,
        query: &Query<F>,
        lens: Lens,
        k: usize,
    ) -> Result<Vec<Influences>> {
        let per_layer: Vec<Array2<f64>> = (0..self.layers.len())
            .map(|l| self.scores(query, lens, LayerSel::Layer(l)))
            .collect::<Result<_>>()?;
        let combined = self.scores(query, lens, LayerSel::All)?;
        Ok((0..query.n)
            .map(|q| Influences {
                query: q,
                per_layer: per_layer
                    .iter()
                    .enumerate()
                    .map(|(l, s)| (self.layers[l].id.clone(), rank(s.row(q), &self.sources, k)))
                    .collect(),
                combined: rank(combined.row(q), &self.sources, k),
            })
            .collect())
    }

    /// The *exact* top `k` proponents and opponents (all layers combined) of
    /// every query, found by re-scoring the sketch's `shortlist` best and worst sources exactly from
    /// `ledger` — typically the saved ledger memory-mapped with [`Ledger::load`],
    /// of which only the shortlisted accounts are read. Exact whenever the true
    /// top `k` are among the sketch's top `shortlist` (the README's Performance
    /// section measures how often). Lenses: `Dot`, `Influence`, `Share`, `Loss`.
    ///
    /// # Errors
    /// As [`scores`](Self::scores); [`Error::ShapeMismatch`] when `ledger` is
    /// not the one the sketch was built from (other layers or sources).
    pub fn top_k_reranked<F: Float>(
        &self,
        ledger: &Ledger<F>,
        query: &Query<F>,
        lens: Lens,
        k: usize,
        shortlist: usize,
    ) -> Result<Vec<Ranking>> {
        const OP: &str = "LedgerSketch::top_k_reranked";
        if ledger.layers() != self.layers.as_slice() || ledger.sources() != self.sources.as_slice()
        {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "the ledger the sketch was built from ({} layers, {} sources)",
                    self.layers.len(),
                    self.sources.len()
                ),
                got: format!(
                    "a ledger of {} layers, {} sources",
                    ledger.layers().len(),
                    ledger.sources().len()
                ),
            });
        }
        let approx = self.scores(query, lens, LayerSel::All)?;
        let n_layers = self.layers.len();
        // Each layer's query input with the lens's target.
        let inputs: Vec<LayerInput<F>> = (0..n_layers)
            .map(|l| {
                if lens == Lens::Loss {
                    query.loss_input(l, OP)
                } else {
                    Ok(ledger.representation_input(query, l).0)
                }
            })
            .collect::<Result<_>>()?;
        let layers: Vec<LayerView<'_, F>> = (0..n_layers).map(|l| ledger.whole_layer(l)).collect();
        let shortlist = shortlist.max(k).min(self.sources.len());
        Ok((0..query.n)
            .into_par_iter()
            .map(|q| {
                let row = approx.row(q);
                // The sketch's best and worst `shortlist` sources.
                let mut order: Vec<usize> = (0..row.len()).collect();
                order.sort_unstable_by(|&a, &b| row[b].total_cmp(&row[a]));
                let mut cand: Vec<usize> = order[..shortlist]
                    .iter()
                    .chain(&order[order.len() - shortlist..])
                    .copied()
                    .collect();
                cand.sort_unstable();
                cand.dedup();
                let single: Vec<LayerInput<F>> = inputs.iter().map(|i| i.single(q)).collect();
                let r2: Vec<f64> = single
                    .iter()
                    .map(|i| i.per_query_dot(i.target.view(), i.target.view())[0])
                    .collect();
                let per_layer: Vec<Vec<f64>> = (0..n_layers)
                    .map(|l| dots_for(&layers[l], &cand, self.sources.len(), &single[l]))
                    .collect();
                let mut dots = vec![0.0; n_layers];
                let exact: Vec<f64> = (0..cand.len())
                    .map(|c| {
                        for (d, layer) in dots.iter_mut().zip(&per_layer) {
                            *d = layer[c];
                        }
                        combine(lens, &dots, &r2)
                    })
                    .collect();
                let metas: Vec<SourceMeta> =
                    cand.iter().map(|&s| self.sources[s].clone()).collect();
                rank(ndarray::ArrayView1::from(&exact), &metas, k)
            })
            .collect())
    }

    /// The ridge lens on the sketch: `S (SᵀS + λI)⁻¹ φ(g)` with `S` the sketches
    /// of all layers side by side and `λ = c · ‖S‖²_F / N` (≈ `c · trace(K) / N`
    /// of the exact lens). Factors a `Σk × Σk` system once.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `c ≤ 0` or a singular system;
    /// [`Error::Empty`] for a sketch without sources.
    pub fn ridge(&self, c: f64) -> Result<SketchRidge> {
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
            chol: cholesky(a)?,
            lambda,
            c,
            n_sources: n,
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

/// The sketch file's format name and version.
const SKETCH_FORMAT: &str = "refinement-ledger-sketch";
const SKETCH_VERSION: u32 = 1;

/// What a sketch file's JSON payload holds besides its tensors.
#[derive(Serialize, Deserialize)]
struct SketchHeader {
    layers: Vec<LayerMeta>,
    sources: Vec<SourceMeta>,
    seed: u64,
    dims: Vec<usize>,
    exact_bytes: Vec<usize>,
}

impl LedgerSketch {
    /// Saves the sketch to `path` atomically, as safetensors (per layer the
    /// `bf16` sketch `[N, k]`, the parameter change and the residual's sketch in
    /// `f64`; sources, layers, seed and dimensions in a versioned JSON header;
    /// a CRC-32 over everything).
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = SketchHeader {
            layers: self.layers.clone(),
            sources: self.sources.clone(),
            seed: self.seed,
            dims: self.dims.clone(),
            exact_bytes: self.exact_bytes.clone(),
        };
        let json = serde_json::to_string(&header)
            .map_err(|e| crate::storage::corrupt(format!("sketch header: {e}")))?;
        let n = self.sources.len();
        let mut tensors = Vec::new();
        for (l, &k) in self.dims.iter().enumerate() {
            tensors.push((
                format!("layer.{l}.sketch"),
                bf16s(&self.sketch[l], vec![n, k]),
            ));
            tensors.push((format!("layer.{l}.change"), matrix(&self.change[l])));
            let res = self.residual[l]
                .as_slice()
                .expect("invariant: standard layout");
            tensors.push((format!("layer.{l}.residual"), floats(res, vec![k])));
        }
        save_atomic(path, tensors, SKETCH_FORMAT, SKETCH_VERSION, json)
    }

    /// Loads a sketch saved by [`save`](Self::save), checking the format,
    /// version, checksum, every shape and finiteness.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened; [`Error::CorruptLedger`]
    /// for a truncated, corrupted or foreign file.
    pub fn load(path: &Path) -> Result<Self> {
        with_mapped(path, Self::from_bytes)
    }

    /// Parses the bytes of a saved sketch (see [`load`](Self::load)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`] for anything that is not a valid sketch.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (st, json) = decode(bytes, SKETCH_FORMAT, SKETCH_VERSION)?;
        let h: SketchHeader = serde_json::from_str(&json)
            .map_err(|e| crate::storage::corrupt(format!("sketch header: {e}")))?;
        let n_layers = h.layers.len();
        if h.dims.len() != n_layers || h.exact_bytes.len() != n_layers || h.dims.contains(&0) {
            return Err(crate::storage::corrupt(format!(
                "sketch header: {n_layers} layers but {} dimensions ({:?}) and {} byte counts",
                h.dims.len(),
                h.dims,
                h.exact_bytes.len()
            )));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(s) = h.sources.iter().find(|s| !seen.insert(s.id)) {
            return Err(crate::storage::corrupt(format!(
                "sketch header: source {} listed twice",
                s.id
            )));
        }
        let reader = Reader { st: &st, map: None };
        let n = h.sources.len();
        let (mut sketch, mut change, mut residual) = (Vec::new(), Vec::new(), Vec::new());
        for (l, (&k, meta)) in h.dims.iter().zip(&h.layers).enumerate() {
            let shape = (meta.shape.fan_out, meta.shape.aug_in());
            sketch.push(reader.bf16s(&format!("layer.{l}.sketch"), &[n, k])?);
            change.push(reader.matrix(&format!("layer.{l}.change"), shape)?);
            let name = format!("layer.{l}.residual");
            let t = reader.tensor(&name, safetensors::Dtype::F64, &[k])?;
            residual.push(Array1::from(reader.floats::<f64>(&t, &name)?));
        }
        Ok(Self {
            layers: h.layers,
            sources: h.sources,
            seed: h.seed,
            dims: h.dims,
            change,
            sketch,
            residual,
            exact_bytes: h.exact_bytes,
        })
    }
}

/// A factored sketched ridge system (see [`LedgerSketch::ridge`]).
#[derive(Clone, Debug)]
pub struct SketchRidge {
    chol: Array2<f64>,
    lambda: f64,
    c: f64,
    n_sources: usize,
}

impl SketchRidge {
    /// The regularisation `λ` in use.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// The `c` it was fitted with.
    pub fn c(&self) -> f64 {
        self.c
    }

    /// `α ≈ (K + λI)⁻¹ L g(x)` for every query, `[n_queries, n_sources]`;
    /// `query` must carry gradients.
    ///
    /// # Errors
    /// As [`LedgerSketch::scores`] with [`Lens::Loss`];
    /// [`Error::ShapeMismatch`] for another sketch than the one it was fitted on.
    pub fn scores<F: Float>(&self, sketch: &LedgerSketch, query: &Query<F>) -> Result<Array2<f64>> {
        const OP: &str = "SketchRidge::scores";
        let total: usize = sketch.dims.iter().sum();
        if total != self.chol.nrows() || sketch.sources.len() != self.n_sources {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "the sketch it was fitted on ({} sources, {} dimensions)",
                    self.n_sources,
                    self.chol.nrows()
                ),
                got: format!("{} sources, {total} dimensions", sketch.sources.len()),
            });
        }
        sketch.check_query(query, OP)?;
        let all: Vec<usize> = (0..sketch.layers.len()).collect();
        let phis = sketch.loss_sketches(query, &all, OP)?;
        let mut g = Array2::zeros((query.n, total));
        let mut col = 0;
        for (phi, &k) in phis.iter().zip(&sketch.dims) {
            g.slice_mut(s![.., col..col + k]).assign(phi);
            col += k;
        }
        // β = (SᵀS + λI)⁻¹ φ(g) per query, then α = S β.
        let mut beta = Array2::zeros((query.n, total));
        for (q, row) in g.rows().into_iter().enumerate() {
            beta.row_mut(q)
                .assign(&solve_cholesky(&self.chol, row.to_owned()));
        }
        let mut col = 0;
        let mut out = Array2::zeros((query.n, self.n_sources));
        for (l, &k) in sketch.dims.iter().enumerate() {
            out += &sketch.sketch_dots(l, &beta.slice(s![.., col..col + k]).to_owned());
            col += k;
        }
        Ok(out)
    }
}

/// A linear lens's combined score from per-layer dots `⟨c, t_l⟩` and `‖t_l‖²`,
/// as [`Ledger::scores`] combines layers.
fn combine(lens: Lens, dots: &[f64], t2: &[f64]) -> f64 {
    let div = |x: f64, y: f64| if y == 0.0 { 0.0 } else { x / y };
    match lens {
        Lens::Influence => div(dots.iter().sum(), t2.iter().sum::<f64>().sqrt()),
        Lens::Share => {
            dots.iter().zip(t2).map(|(&d, &r)| div(d, r)).sum::<f64>() / dots.len() as f64
        }
        _ => dots.iter().sum(),
    }
}

/// `φ(G_s)` of every source of one layer, `[N, k]` in `bf16`.
fn sketch_layer<F: Float>(
    layer: &LayerView<'_, F>,
    n: usize,
    lm: &Array2<f64>,
    rm: &Array2<f64>,
) -> Vec<bf16> {
    let k = lm.nrows();
    let scale = 1.0 / (k as f64).sqrt();
    let (lf, rf) = (lm.mapv(F::narrow), rm.mapv(F::narrow));
    // Dense accounts are projected in f32: its rounding (1e-7) is far below the
    // sketch's own error, and the GEMM runs twice as fast.
    let (lt32, rt32) = (lm.t().mapv(|v| v as f32), rm.t().mapv(|v| v as f32));
    let rows = layer.rows;
    let mut out = vec![bf16::ZERO; n * k];
    out.par_chunks_mut(SOURCE_CHUNK * k)
        .enumerate()
        .for_each(|(i, dst)| {
            let s0 = i * SOURCE_CHUNK;
            let s1 = s0 + dst.len() / k;
            let mut acc = Array2::<f64>::zeros((s1 - s0, k));
            // Factored rows: (L d) ⊙ (R ã), weighted by the group's coefficient.
            let (r0, r1) = rows.range(s0 as u32, s1 as u32);
            for b0 in (r0..r1).step_by(ROW_BLOCK) {
                let b1 = (b0 + ROW_BLOCK).min(r1);
                let (a, d) = rows.view(b0, b1);
                let ra = a.dot(&rf.t());
                let ld = d.dot(&lf.t());
                for j in 0..b1 - b0 {
                    let w = layer.coef[rows.group[b0 + j] as usize] * scale;
                    if w == 0.0 {
                        continue;
                    }
                    let mut dst = acc.row_mut(rows.source[b0 + j] as usize - s0);
                    for ((o, &x), &y) in dst.iter_mut().zip(ra.row(j)).zip(ld.row(j)) {
                        *o += w * x.widen() * y.widen();
                    }
                }
            }
            // Dense accounts: l_mᵀ G r_m.
            for seg in &layer.segments {
                let dense = seg.dense;
                let (k0, k1) = (
                    dense.source.partition_point(|&s| (s as usize) < s0),
                    dense.source.partition_point(|&s| (s as usize) < s1),
                );
                let (fo, ai) = (dense.fan_out, dense.aug_in);
                for c0 in (k0..k1).step_by(64) {
                    let c1 = (c0 + 64).min(k1);
                    let stack = ArrayView2::from_shape(
                        ((c1 - c0) * fo, ai),
                        &dense.dense[c0 * fo * ai..c1 * fo * ai],
                    )
                    .expect("invariant: slots hold fan_out × aug_in values")
                    .mapv(|v| v as f32);
                    let t = stack.dot(&rt32); // [slots·fan_out, k]
                    for slot in c0..c1 {
                        let block = t.slice(s![(slot - c0) * fo..(slot - c0 + 1) * fo, ..]);
                        let phi = (&block * &lt32).sum_axis(Axis(0));
                        acc.row_mut(dense.source[slot] as usize - s0)
                            .zip_mut_with(&phi, |o, &v| *o += scale * f64::from(v));
                    }
                }
            }
            let flat: Vec<f32> = acc.iter().map(|&v| v as f32).collect();
            dst.convert_from_f32_slice(&flat);
        });
    out
}
