//! Read-only views of a ledger: one traced layer over some segments, as every
//! reader (queries, the ridge lens, sketches) sees it, and the ledger's
//! derived reads (whole accounts, residuals, balance).
//!
//! A source's account in layer `l` over a set of segments is
//!
//! ```text
//! G_s = Σ_j κ(g_j) d_j ã_jᵀ  +  Σ_k D_{k,s}
//! ```
//!
//! over its factored rows `j` (step group `g_j`, weighted by `κ(g)`, the sum of
//! the selected segments' coefficients of group `g`) plus its dense accounts
//! `D_{k,s}` in the selected segments. This module is the one place that
//! combines them; readers never touch the ledger's fields.

use std::borrow::Cow;

use ndarray::{Array2, ArrayView2, CowArray, Ix2};

use super::Ledger;
use super::accounts::{DenseAccounts, Rows};
use super::segment::Segment;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::SourceId;

/// One traced layer of a ledger over a set of segments, read-only.
#[derive(Clone, Debug)]
pub(crate) struct LayerView<'a, F> {
    /// The layer's factored rows (the whole run's).
    pub(crate) rows: &'a Rows<F>,
    /// Per global step group, its coefficient summed over the selected segments.
    pub(crate) coef: Vec<f64>,
    /// The layer's dense accounts (and residual) in each selected segment.
    pub(crate) dense: Vec<&'a DenseAccounts>,
}

impl<'a, F: Float> LayerView<'a, F> {
    /// The layer's residual summed over the selected segments.
    pub(crate) fn residual(&self) -> Array2<f64> {
        let acc = self.dense[0];
        let mut out = Array2::zeros((acc.fan_out, acc.aug_in));
        for acc in &self.dense {
            out += &acc.residual;
        }
        out
    }

    /// `Σ_s G_s`: every credited account summed (rows and dense accounts).
    pub(crate) fn total_account(&self) -> Array2<f64> {
        let mut total = self.rows.sum(0, self.rows.len(), |g| self.coef[g as usize]);
        for acc in &self.dense {
            total += &acc.total();
        }
        total
    }

    /// Every source's dense accounts summed over the selected segments:
    /// `(sources, [n, fan_out·aug_in])`, sources ascending. One segment's accounts
    /// are borrowed as they are (no copy of what can be gigabytes).
    pub(crate) fn combined_dense(&self) -> (Cow<'a, [u32]>, CowArray<'a, f64, Ix2>) {
        if let [acc] = self.dense.as_slice() {
            if acc.sorted {
                return (Cow::Borrowed(&acc.source), CowArray::from(acc.stack()));
            }
        }
        let acc0 = self.dense[0];
        let size = acc0.fan_out * acc0.aug_in;
        let mut sources: Vec<u32> = self
            .dense
            .iter()
            .flat_map(|acc| acc.source.iter().copied())
            .collect();
        sources.sort_unstable();
        sources.dedup();
        let mut out = Array2::<f64>::zeros((sources.len(), size));
        for acc in &self.dense {
            for (k, &src) in acc.source.iter().enumerate() {
                let row = sources
                    .binary_search(&src)
                    .expect("invariant: source collected");
                let mut dst = out.row_mut(row);
                dst += &acc.stack().row(k);
            }
        }
        (Cow::Owned(sources), CowArray::from(out))
    }

    /// The whole account of source index `s` as a dense `[fan_out, aug_in]` matrix.
    pub(crate) fn account(&self, s: u32) -> Array2<f64> {
        let rows = self.rows;
        let mut out = Array2::zeros((rows.fan_out, rows.aug_in));
        for j in (0..rows.len()).filter(|&j| rows.source[j] == s) {
            out += &rows.sum(j, j + 1, |g| self.coef[g as usize]);
        }
        for acc in &self.dense {
            if let Some(d) = acc.get(s) {
                out += &d;
            }
        }
        out
    }
}

/// Which segments a view covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Segments {
    /// Every segment (the whole run).
    All,
    /// One segment.
    One(usize),
}

impl<F: Float> Ledger<F> {
    fn selected(&self, segments: Segments, op: &'static str) -> Result<Vec<&Segment>> {
        match segments {
            Segments::All => Ok(self.segments.iter().collect()),
            Segments::One(k) => Ok(vec![self.segments.get(k).ok_or(
                Error::IndexOutOfRange {
                    op,
                    what: "segment",
                    index: k,
                    len: self.segments.len(),
                },
            )?]),
        }
    }

    /// Layer `l` over `segments`, read-only.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer or segment; [`Error::Io`]
    /// when the ledger's mapped file changed since it was loaded.
    pub(crate) fn layer_view(&self, l: usize, segments: Segments) -> Result<LayerView<'_, F>> {
        self.check_file()?;
        self.view_unchecked(l, segments)
    }

    /// [`layer_view`](Self::layer_view) without the file check (for callers
    /// that checked already, or a ledger being loaded).
    fn view_unchecked(&self, l: usize, segments: Segments) -> Result<LayerView<'_, F>> {
        const OP: &str = "Ledger::layer_view";
        self.check_layer(l, OP)?;
        let segs = self.selected(segments, OP)?;
        Ok(LayerView {
            rows: &self.rows[l],
            coef: self.coef_table(&segs),
            dense: segs.iter().map(|s| &s.layers[l]).collect(),
        })
    }

    /// Layer `l` over the whole run (`l` must be in range; the caller has
    /// checked the mapped file, e.g. through `check_query`).
    pub(crate) fn whole_layer(&self, l: usize) -> LayerView<'_, F> {
        self.view_unchecked(l, Segments::All)
            .expect("invariant: layer in range")
    }

    /// For a ledger served from a mapped file: the file is as it was loaded.
    ///
    /// # Errors
    /// [`Error::Io`] when it shrank or was rewritten since.
    /// [`Error::InvalidConfig`] for an online ledger (projected accounts).
    pub(crate) fn check_file(&self) -> Result<()> {
        self.check_exact("Ledger")?;
        self.check_mapped()
    }

    /// The file check alone (for what an online ledger also answers: its balance).
    pub(crate) fn check_mapped(&self) -> Result<()> {
        self.file.as_ref().map_or(Ok(()), |f| f.check_unchanged())
    }

    /// Per global step group, the sum of its coefficients over `segments`.
    pub(super) fn coef_table(&self, segments: &[&Segment]) -> Vec<f64> {
        let mut t = vec![0.0; self.n_groups as usize];
        for seg in segments {
            for (i, &c) in seg.coef.iter().enumerate() {
                t[seg.first_group as usize + i] += c;
            }
        }
        t
    }

    /// The whole account `G` of `source` in layer `layer`, summed over segments,
    /// as a dense `[fan_out, aug_in]` matrix (bias in the last column).
    ///
    /// # Errors
    /// [`Error::UnknownSource`], [`Error::IndexOutOfRange`].
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{ExampleId, SourceId};
    /// let g = ledger.account(0, SourceId::Example(ExampleId(0)))?;
    /// assert_eq!(g.dim(), (4, 3)); // fc1: 4 outputs, 2 inputs and the bias
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn account(&self, layer: usize, source: SourceId) -> Result<Array2<f64>> {
        self.check_layer(layer, "Ledger::account")?;
        self.check_file()?;
        let s = self.source_index(source)? as u32;
        Ok(self.whole_layer(layer).account(s))
    }

    /// Every source's whole account of layer `layer` (summed over segments) as
    /// one row: `[n_sources, fan_out · aug_in]`, `f64`. Memory: that many numbers.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// let m = ledger.account_matrix(1)?; // fc2: 2 outputs × (4 inputs + bias)
    /// assert_eq!(m.dim(), (ledger.sources().len(), 2 * 5));
    /// let g = ledger.account(1, ledger.sources()[0].id)?;
    /// assert!((m[[0, 4]] - g[[0, 4]]).abs() < 1e-15);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn account_matrix(&self, layer: usize) -> Result<Array2<f64>> {
        let view = self.layer_view(layer, Segments::All)?;
        let (fan_out, aug_in) = self.initial[layer].dim();
        let mut m = Array2::<f64>::zeros((self.sources.len(), fan_out * aug_in));
        let (sources, dense) = view.combined_dense();
        for (k, &s) in sources.iter().enumerate() {
            let mut row = m.row_mut(s as usize);
            row += &dense.row(k);
        }
        let rows = view.rows;
        for j in 0..rows.len() {
            let k = view.coef[rows.group[j] as usize];
            let (a, d) = rows.view(j, j + 1);
            let mut row = m.row_mut(rows.source[j] as usize);
            let row = row.as_slice_mut().expect("invariant: standard layout");
            for (o, &dv) in d.row(0).iter().enumerate() {
                let dk = dv.widen() * k;
                for (i, &av) in a.row(0).iter().enumerate() {
                    row[o * aug_in + i] += dk * av.widen();
                }
            }
        }
        Ok(m)
    }

    /// The residual of layer `layer` (updates credited to no source), summed over segments.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// // W₀ + Σ G + residual = W_T.
    /// let mut sum = ledger.initial_params(0)? + &ledger.residual(0)?;
    /// for s in ledger.sources() {
    ///     sum += &ledger.account(0, s.id)?;
    /// }
    /// assert!((&sum - ledger.final_params(0)?).iter().all(|v| v.abs() < 1e-12));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn residual(&self, layer: usize) -> Result<Array2<f64>> {
        Ok(self.layer_view(layer, Segments::All)?.residual())
    }

    /// Per layer, the balance of parameters:
    /// `‖W₀ + Σ G + residual − W_T‖ / ‖W_T − W₀‖`, the denominator at least
    /// `‖Σ G‖`, `‖residual‖` and `1e-12·‖W_T‖` (a layer whose credited updates
    /// cancel barely moves: its rounding is not a large error); NaN for a
    /// loaded ledger whose file changed on disk since.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-9));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn parameter_balance(&self) -> Vec<f64> {
        if self.check_mapped().is_err() {
            return vec![f64::NAN; self.layers.len()];
        }
        (0..self.layers.len())
            .map(|l| {
                let (err, change, terms, size) = self.balance_parts(l);
                relative(err, change.max(terms), size)
            })
            .collect()
    }

    /// Layer `l`'s `(‖W₀ + Σ G + residual − W_T‖, ‖total change‖, the larger of
    /// ‖Σ G‖ and ‖residual‖, ‖W_T‖)`: one pass over the rows with every
    /// segment's coefficients summed.
    pub(super) fn balance_parts(&self, l: usize) -> (f64, f64, f64, f64) {
        let whole = self.whole_layer(l);
        let (credited, residual) = (whole.total_account(), whole.residual());
        let terms = sq_norm(&credited.view())
            .max(sq_norm(&residual.view()))
            .sqrt();
        let sum = &self.initial[l] + &credited + &residual;
        let mut prev_end = &self.initial[l];
        let mut change_norm2 = 0.0;
        for seg in &self.segments {
            change_norm2 += sq_norm(&(&seg.end[l] - prev_end).view());
            prev_end = &seg.end[l];
        }
        (
            sq_norm(&(&sum - prev_end).view()).sqrt(),
            change_norm2.sqrt(),
            terms,
            sq_norm(&prev_end.view()).sqrt(),
        )
    }

    /// Segment `k`'s balance in layer `l`: `(‖start + Σ G_k + residual_k − end‖,
    /// ‖end − start‖, ‖end‖)` (rows of other segments' groups are skipped).
    pub(super) fn segment_balance(&self, l: usize, k: usize) -> (f64, f64, f64) {
        let view = self
            .view_unchecked(l, Segments::One(k))
            .expect("invariant: in range");
        let start = if k == 0 {
            &self.initial[l]
        } else {
            &self.segments[k - 1].end[l]
        };
        let end = &self.segments[k].end[l];
        let diff = start + &view.total_account() + view.residual() - end;
        (
            sq_norm(&diff.view()).sqrt(),
            sq_norm(&(end - start).view()).sqrt(),
            sq_norm(&end.view()).sqrt(),
        )
    }

    /// Relative size of the residual per layer: `‖residual‖ / ‖W_T − W₀‖` (the
    /// denominator at least `1e-12·‖W_T‖`; NaN for a loaded ledger whose file
    /// changed on disk since).
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// // Plain SGD in f64: every update is credited, the residual is rounding.
    /// assert!(ledger.residual_fraction().iter().all(|&r| r < 1e-9));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn residual_fraction(&self) -> Vec<f64> {
        if self.check_mapped().is_err() {
            return vec![f64::NAN; self.layers.len()];
        }
        (0..self.layers.len())
            .map(|l| {
                let res = self.whole_layer(l).residual();
                let end = &self.segments[self.segments.len() - 1].end[l];
                let change = self.account_space(l, end - &self.initial[l]);
                let (c, r) = (sq_norm(&change.view()).sqrt(), sq_norm(&res.view()).sqrt());
                relative(r, c, sq_norm(&end.view()).sqrt())
            })
            .collect()
    }
}

impl<F: Float> Ledger<F> {
    /// Checks that no layer's [`residual_fraction`](Self::residual_fraction)
    /// exceeds `max_fraction` — e.g. for the merged ledger of a data-parallel
    /// run, whose shards cannot check it themselves.
    ///
    /// # Errors
    /// [`Error::Unbalanced`] naming the layer with the largest residual.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// ledger.check_residual(1e-9)?;
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn check_residual(&self, max_fraction: f64) -> Result<()> {
        self.check_residual_in("Ledger::check_residual", max_fraction)
    }

    pub(crate) fn check_residual_in(&self, op: &'static str, max_fraction: f64) -> Result<()> {
        self.check_mapped()?;
        let fractions = self.residual_fraction();
        let (worst, &fraction) = fractions
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("invariant: a ledger has layers");
        if fraction <= max_fraction {
            return Ok(());
        }
        Err(Error::Unbalanced {
            op,
            layer: self.layers[worst].id.to_string(),
            fraction,
            max: max_fraction,
        })
    }
}

/// `x` relative to a layer's change, or to `1e-12` of the layer's size when
/// the change is smaller than that (a layer that barely moved would otherwise
/// report its rounding as a large fraction).
fn relative(x: f64, change: f64, size: f64) -> f64 {
    let scale = change.max(1e-12 * size);
    if scale == 0.0 { x } else { x / scale }
}

fn sq_norm(m: &ArrayView2<'_, f64>) -> f64 {
    m.iter().map(|v| v * v).sum()
}
