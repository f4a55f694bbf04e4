//! The query kernels: every source's contribution to a batch of queries, by
//! matrix products over the ledger's contiguous rows and dense slots.
//!
//! A query of layer `l` is its patches `ã_{q,p}` (bias column appended) and a
//! *target* `t_{q,p}` (the refinement `r` for the representation lens, the loss
//! gradient `δ` for the loss lens). For a source `s` with factored rows
//! `κ_j d_j ã_jᵀ` and a dense account `G_s`, its contribution at `(q, p)` is
//! `c_s[q,p] = Σ_j κ_j (ã_j·ã_{q,p}) d_j + G_s ã_{q,p}`.
//!
//! * [`materialize`] forms `c_s` for a chunk of sources at a time (one GEMM for
//!   the rows' patch products, one per chunk for the dense slots) and reduces it
//!   to `⟨c_s, t⟩` and `‖c_s‖²` — needed for `norm` and `cos`.
//! * [`dots`] computes only `⟨c_s, t⟩ = Σ_j κ_j Σ_p (ã_j·ã_{q,p})(d_j·t_{q,p}) + ⟨G_s, Q_q⟩`
//!   with `Q_q = Σ_p t_{q,p} ã_{q,p}ᵀ`: two GEMMs over the rows and one over the slots.
//!
//! Chunks run in parallel (rayon); their results are combined in a fixed order,
//! so the output does not depend on the number of threads.

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, CowArray, Ix2, s};
use rayon::prelude::*;

use crate::float::Float;
use crate::ledger::LayerView;
use crate::ledger::accounts::{DenseAccounts, Rows};

/// One layer's query: patches and targets, flattened over `(query, position)`.
pub(crate) struct LayerInput<F> {
    pub(crate) n_q: usize,
    pub(crate) positions: usize,
    /// `[n_q·P, aug_in]` in `f64`.
    pub(crate) a64: Array2<f64>,
    /// `[n_q·P, aug_in]` in `F`.
    pub(crate) af: Array2<F>,
    /// `[n_q·P, fan_out]`.
    pub(crate) target: Array2<f64>,
}

impl<F: Float> LayerInput<F> {
    /// Builds the input from patches `[n_q, P, fan_in]` and a target `[n_q·P, fan_out]`.
    pub(crate) fn new(
        patches: ndarray::ArrayView3<'_, F>,
        has_bias: bool,
        target: Array2<f64>,
    ) -> Self {
        let (n_q, positions, fan_in) = patches.dim();
        let aug_in = fan_in + usize::from(has_bias);
        let mut af = Array2::<F>::ones((n_q * positions, aug_in));
        let flat = patches
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((n_q * positions, fan_in))
            .expect("invariant: standard layout");
        af.slice_mut(s![.., ..fan_in]).assign(&flat);
        Self {
            n_q,
            positions,
            a64: af.mapv(F::widen),
            af,
            target,
        }
    }

    /// The same input restricted to query `q`.
    pub(crate) fn single(&self, q: usize) -> Self {
        let rows = q * self.positions..(q + 1) * self.positions;
        Self {
            n_q: 1,
            positions: self.positions,
            a64: self.a64.slice(s![rows.clone(), ..]).to_owned(),
            af: self.af.slice(s![rows.clone(), ..]).to_owned(),
            target: self.target.slice(s![rows, ..]).to_owned(),
        }
    }

    /// `Σ_p ⟨x[q,p], y[q,p]⟩` per query, for two `[n_q·P, k]` matrices.
    pub(crate) fn per_query_dot(
        &self,
        x: ArrayView2<'_, f64>,
        y: ArrayView2<'_, f64>,
    ) -> Array1<f64> {
        let mut out = Array1::zeros(self.n_q);
        for (r, (xr, yr)) in x.rows().into_iter().zip(y.rows()).enumerate() {
            out[r / self.positions] += xr.dot(&yr);
        }
        out
    }

    /// The contribution of a dense matrix `[fan_out, aug_in]`: `[n_q·P, fan_out]`.
    pub(crate) fn apply(&self, m: ArrayView2<'_, f64>) -> Array2<f64> {
        self.a64.dot(&m.t())
    }
}

/// Results of [`materialize`] for one layer.
pub(crate) struct Materialized {
    /// `⟨c_s, t⟩`, `[n_src, n_q]`.
    pub(crate) dot: Array2<f64>,
    /// `‖c_s‖²`, `[n_src, n_q]`.
    pub(crate) norm2: Array2<f64>,
    /// `Σ_s c_s`, `[n_q·P, fan_out]`.
    pub(crate) total: Array2<f64>,
}

/// Target bytes of one chunk's contribution block.
const CHUNK_BYTES: usize = 16 << 20;

/// Slot range of sources `[s0, s1)` in sorted dense accounts.
fn slot_range(acc: &DenseAccounts, s0: u32, s1: u32) -> (usize, usize) {
    debug_assert!(acc.sorted);
    (
        acc.source.partition_point(|&s| s < s0),
        acc.source.partition_point(|&s| s < s1),
    )
}

/// `⟨c_s, t⟩` and `‖c_s‖²` for every source over the layer's segments, and `Σ_s c_s`.
///
/// The dot products take the fast path ([`dots`]). Norms of sources held only
/// as dense accounts use `‖G Ãᵀ‖² = ⟨GᵀG, ÃᵀÃ⟩` when `aug_in² < fan_out·n_q·P`
/// (convolutions); every other source's contribution is materialised, a chunk
/// of sources at a time.
pub(crate) fn materialize<F: Float>(
    layer: &LayerView<'_, F>,
    n_src: usize,
    input: &LayerInput<F>,
) -> Materialized {
    let width = input.n_q * input.positions;
    let (fan_out, aug_in) = (input.target.ncols(), input.a64.ncols());
    let dot = dots(layer, input, n_src, input.n_q);
    let rows = layer.rows;
    let total_account = layer.total_account();
    let mut has_rows = vec![false; n_src];
    for (&s, &g) in rows.source.iter().zip(&rows.group) {
        if layer.coef[g as usize] != 0.0 {
            has_rows[s as usize] = true;
        }
    }
    let gram = aug_in * aug_in < fan_out * width;
    let needs_material = |s: usize| has_rows[s] || !gram;
    let mut norm2 = Array2::<f64>::zeros((n_src, input.n_q));

    // Materialised sources, in contiguous chunks that hold at least one of them.
    let chunk = (CHUNK_BYTES / (width * fan_out * 8).max(1)).clamp(1, n_src.max(1));
    let starts: Vec<usize> = (0..n_src)
        .step_by(chunk)
        .filter(|&s0| (s0..(s0 + chunk).min(n_src)).any(needs_material))
        .collect();
    let parts: Vec<Array2<f64>> = starts
        .par_iter()
        .map(|&s0| {
            let s1 = (s0 + chunk).min(n_src);
            let c = chunk_contributions(layer, s0, s1, input);
            let mut n2 = Array2::zeros((s1 - s0, input.n_q));
            for (m, cs) in c.axis_iter(Axis(0)).enumerate() {
                if needs_material(s0 + m) {
                    n2.row_mut(m).assign(&input.per_query_dot(cs, cs));
                }
            }
            n2
        })
        .collect();
    for (&s0, n2) in starts.iter().zip(parts) {
        for (m, row) in n2.rows().into_iter().enumerate() {
            if needs_material(s0 + m) {
                norm2.row_mut(s0 + m).assign(&row);
            }
        }
    }

    // Dense-only sources by their Gram matrices GᵀG against the queries' ÃᵀÃ.
    if gram {
        let (sources, dense) = layer.combined_dense();
        let keep: Vec<usize> = (0..sources.len())
            .filter(|&k| !has_rows[sources[k] as usize])
            .collect();
        if !keep.is_empty() {
            let mut m = Array2::<f64>::zeros((input.n_q, aug_in * aug_in));
            for q in 0..input.n_q {
                let a = input
                    .a64
                    .slice(s![q * input.positions..(q + 1) * input.positions, ..]);
                let ata = a.t().dot(&a);
                m.row_mut(q).assign(&ndarray::ArrayView1::from(
                    ata.as_slice().expect("invariant: standard layout"),
                ));
            }
            let h_rows: Vec<Array1<f64>> = keep
                .par_iter()
                .map(|&k| {
                    let g = dense
                        .row(k)
                        .into_shape_with_order((fan_out, aug_in))
                        .expect("invariant: dense row");
                    Array1::from_iter(g.t().dot(&g).iter().copied())
                })
                .collect();
            let mut h = Array2::<f64>::zeros((keep.len(), aug_in * aug_in));
            for (i, r) in h_rows.iter().enumerate() {
                h.row_mut(i).assign(r);
            }
            let n2 = h.dot(&m.t()); // [keep, n_q]
            for (i, &k) in keep.iter().enumerate() {
                norm2.row_mut(sources[k] as usize).assign(&n2.row(i));
            }
        }
    }
    Materialized {
        dot,
        norm2,
        total: input.apply(total_account.view()),
    }
}

/// `c_s` for sources `[s0, s1)`: `[s1 − s0, n_q·P, fan_out]`.
pub(crate) fn chunk_contributions<F: Float>(
    layer: &LayerView<'_, F>,
    s0: usize,
    s1: usize,
    input: &LayerInput<F>,
) -> Array3<f64> {
    let width = input.n_q * input.positions;
    let fan_out = input.target.ncols();
    let mut c = Array3::<f64>::zeros((s1 - s0, width, fan_out));
    let rows = layer.rows;
    let (r0, r1) = rows.range(s0 as u32, s1 as u32);
    if r1 > r0 {
        let (a_rows, d_rows) = rows.view(r0, r1);
        // κ_j (ã_j · ã_{q,p}): [rows, n_q·P]
        let mut w = a_rows.dot(&input.af.t()).mapv(F::widen);
        for (mut row, &g) in w.rows_mut().into_iter().zip(&rows.group[r0..r1]) {
            row *= layer.coef[g as usize];
        }
        let d64 = d_rows.mapv(F::widen);
        let mut j = 0;
        while j < r1 - r0 {
            let s = rows.source[r0 + j];
            let mut e = j + 1;
            while e < r1 - r0 && rows.source[r0 + e] == s {
                e += 1;
            }
            let mut cs = c.index_axis_mut(Axis(0), s as usize - s0);
            ndarray::linalg::general_mat_mul(
                1.0,
                &w.slice(s![j..e, ..]).t(),
                &d64.slice(s![j..e, ..]),
                1.0,
                &mut cs,
            );
            j = e;
        }
    }
    for &acc in &layer.dense {
        let (k0, k1) = slot_range(acc, s0 as u32, s1 as u32);
        if k1 > k0 {
            let aug_in = acc.aug_in;
            let stack = ArrayView2::from_shape(
                ((k1 - k0) * fan_out, aug_in),
                &acc.dense[k0 * fan_out * aug_in..k1 * fan_out * aug_in],
            )
            .expect("invariant: slots hold fan_out × aug_in values");
            let prod = stack.dot(&input.a64.t()); // [(slots)·fan_out, n_q·P]
            for slot in k0..k1 {
                let s = acc.source[slot] as usize;
                let block = prod.slice(s![(slot - k0) * fan_out..(slot - k0 + 1) * fan_out, ..]);
                let mut cs = c.index_axis_mut(Axis(0), s - s0);
                cs += &block.t();
            }
        }
    }
    c
}

/// Rows per parallel block of [`dots`].
const ROW_BLOCK: usize = 4096;

/// `⟨c_s, t⟩` for every source over the view's segments, `[n_src, n_q]`: rows
/// weighted by the view's coefficients (rows of other segments skipped), dense
/// accounts summed first.
pub(crate) fn dots<F: Float>(
    layer: &LayerView<'_, F>,
    input: &LayerInput<F>,
    n_src: usize,
    n_q: usize,
) -> Array2<f64> {
    let mut out = Array2::<f64>::zeros((n_src, n_q));
    let rows = layer.rows;
    let active: Vec<usize> = (0..rows.len())
        .filter(|&j| layer.coef[rows.group[j] as usize] != 0.0)
        .collect();
    let idx = (active.len() < rows.len()).then_some(active.as_slice());
    row_dots(rows, idx, &layer.coef, input, &mut out);
    let (sources, dense) = layer.combined_dense();
    if !sources.is_empty() {
        dense_dots(&mut out, &sources, dense.view(), input);
    }
    out
}

/// `⟨c_s, t⟩` of one query `input` for the sources `cand` only (in that order):
/// their rows gathered into one matrix product, their dense accounts read in
/// place — no allocation per source.
pub(crate) fn dots_for<F: Float>(
    layer: &LayerView<'_, F>,
    cand: &[usize],
    n_src: usize,
    input: &LayerInput<F>,
) -> Vec<f64> {
    debug_assert_eq!(input.n_q, 1);
    let rows = layer.rows;
    let mut out = Array2::<f64>::zeros((n_src, 1));
    let mut idx = Vec::new();
    for &s in cand {
        let (r0, r1) = rows.range(s as u32, s as u32 + 1);
        idx.extend(r0..r1);
    }
    if !idx.is_empty() {
        row_dots(rows, Some(&idx), &layer.coef, input, &mut out);
    }
    let q = query_matrices(input);
    let q = q.row(0);
    for &acc in &layer.dense {
        for &s in cand {
            if let Some(g) = acc.get(s as u32) {
                out[[s, 0]] += g.iter().zip(q.iter()).map(|(a, b)| a * b).sum::<f64>();
            }
        }
    }
    cand.iter().map(|&s| out[[s, 0]]).collect()
}

/// Adds `κ_j Σ_p (ã_j·ã_{q,p})(d_j·t_{q,p})` of the rows `idx` (all rows when `None`) to `out[source_j]`.
fn row_dots<F: Float>(
    rows: &Rows<F>,
    idx: Option<&[usize]>,
    coef: &[f64],
    input: &LayerInput<F>,
    out: &mut Array2<f64>,
) {
    let n = idx.map_or(rows.len(), <[usize]>::len);
    let n_q = input.n_q;
    let tf = input.target.mapv(F::narrow);
    let row_of = |i: usize| idx.map_or(i, |idx| idx[i]);
    let blocks: Vec<usize> = (0..n).step_by(ROW_BLOCK).collect();
    let vals: Vec<Array2<f64>> = blocks
        .par_iter()
        .map(|&b0| {
            let b1 = (b0 + ROW_BLOCK).min(n);
            // Contiguous rows are read in place; an index gathers them.
            let (a_rows, d_rows): (CowArray<'_, F, Ix2>, CowArray<'_, F, Ix2>) = match idx {
                None => {
                    let (a, d) = rows.view(b0, b1);
                    (a.into(), d.into())
                }
                Some(idx) => {
                    let (a, d) = rows.view(0, rows.len());
                    (
                        a.select(Axis(0), &idx[b0..b1]).into(),
                        d.select(Axis(0), &idx[b0..b1]).into(),
                    )
                }
            };
            let aa = a_rows.dot(&input.af.t()); // [rows, n_q·P]
            let dt = d_rows.dot(&tf.t()); // [rows, n_q·P]
            let mut v = Array2::<f64>::zeros((b1 - b0, n_q));
            let positions = input.positions;
            for (i, ((mut out, ar), dr)) in v
                .rows_mut()
                .into_iter()
                .zip(aa.rows())
                .zip(dt.rows())
                .enumerate()
            {
                let k = coef[rows.group[row_of(b0 + i)] as usize];
                let (ar, dr) = (
                    ar.to_slice().expect("invariant: standard layout"),
                    dr.to_slice().expect("invariant: standard layout"),
                );
                for (q, o) in out.iter_mut().enumerate() {
                    let span = q * positions..(q + 1) * positions;
                    let acc: f64 = ar[span.clone()]
                        .iter()
                        .zip(&dr[span])
                        .map(|(x, y)| x.widen() * y.widen())
                        .sum();
                    *o = k * acc;
                }
            }
            v
        })
        .collect();
    for (&b0, v) in blocks.iter().zip(&vals) {
        for (i, row) in v.rows().into_iter().enumerate() {
            out.row_mut(rows.source[row_of(b0 + i)] as usize)
                .scaled_add(1.0, &row);
        }
    }
}

/// Adds `⟨G_k, Q_q⟩` of dense accounts `stack [k, fan_out·aug_in]` to `out[sources[k]]`.
fn dense_dots<F: Float>(
    out: &mut Array2<f64>,
    sources: &[u32],
    stack: ArrayView2<'_, f64>,
    input: &LayerInput<F>,
) {
    let q_mats = query_matrices(input);
    let prod = stack.dot(&q_mats.t()); // [k, n_q]
    for (k, row) in prod.rows().into_iter().enumerate() {
        out.row_mut(sources[k] as usize).scaled_add(1.0, &row);
    }
}

/// `Q_q = Σ_p t_{q,p} ã_{q,p}ᵀ`, flattened: `[n_q, fan_out·aug_in]`.
pub(crate) fn query_matrices<F: Float>(input: &LayerInput<F>) -> Array2<f64> {
    let (fan_out, aug_in) = (input.target.ncols(), input.a64.ncols());
    let mut q = Array2::zeros((input.n_q, fan_out * aug_in));
    for qi in 0..input.n_q {
        let rows = qi * input.positions..(qi + 1) * input.positions;
        let m = input
            .target
            .slice(s![rows.clone(), ..])
            .t()
            .dot(&input.a64.slice(s![rows, ..]));
        q.row_mut(qi).assign(&Array1::from_iter(m.iter().copied()));
    }
    q
}
