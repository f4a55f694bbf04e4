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

use ndarray::{Array1, Array2, Array3, ArrayView2, Axis, s};
use rayon::prelude::*;

use crate::Float;
use crate::ledger::{Accounts, Segment};

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

/// Every source's dense accounts of layer `l` summed over `segments`:
/// `(sources, [n, fan_out·aug_in])`, sources ascending.
pub(crate) fn combined_dense<F: Float>(
    segments: &[&Segment<F>],
    l: usize,
) -> (Vec<u32>, Array2<f64>) {
    let acc0 = &segments[0].layers[l];
    let size = acc0.fan_out * acc0.aug_in;
    let mut sources: Vec<u32> = segments
        .iter()
        .flat_map(|s| s.layers[l].dense_source.iter().copied())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let mut out = Array2::<f64>::zeros((sources.len(), size));
    for seg in segments {
        let acc = &seg.layers[l];
        for (k, &src) in acc.dense_source.iter().enumerate() {
            let row = sources
                .binary_search(&src)
                .expect("invariant: source collected");
            let mut dst = out.row_mut(row);
            dst += &ndarray::ArrayView1::from(&acc.dense[k * size..(k + 1) * size]);
        }
    }
    (sources, out)
}

/// `⟨c_s, t⟩` and `‖c_s‖²` for every source of layer `l` over all `segments`,
/// and `Σ_s c_s`.
///
/// The dot products take the fast path ([`dots`]). Norms of sources held only
/// as dense accounts use `‖G Ãᵀ‖² = ⟨GᵀG, ÃᵀÃ⟩` when `aug_in² < fan_out·n_q·P`
/// (convolutions); every other source's contribution is materialised, a chunk
/// of sources at a time.
pub(crate) fn materialize<F: Float>(
    segments: &[Segment<F>],
    l: usize,
    n_src: usize,
    input: &LayerInput<F>,
) -> Materialized {
    let width = input.n_q * input.positions;
    let (fan_out, aug_in) = (input.target.ncols(), input.a64.ncols());
    let parts: Vec<_> = segments.iter().map(|s| (s, input)).collect();
    let dot = dots(&parts, l, n_src, input.n_q);
    let mut total_account = Array2::<f64>::zeros((fan_out, aug_in));
    let mut has_rows = vec![false; n_src];
    for seg in segments {
        total_account += &seg.layers[l].total(&seg.coef);
        for &s in &seg.layers[l].row_source {
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
            let c = chunk_contributions(segments, l, s0, s1, input);
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
        let refs: Vec<&Segment<F>> = segments.iter().collect();
        let (sources, dense) = combined_dense(&refs, l);
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
                    let h = g.t().dot(&g);
                    Array1::from_iter(h.iter().copied())
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
    segments: &[Segment<F>],
    l: usize,
    s0: usize,
    s1: usize,
    input: &LayerInput<F>,
) -> Array3<f64> {
    let width = input.n_q * input.positions;
    let fan_out = input.target.ncols();
    let mut c = Array3::<f64>::zeros((s1 - s0, width, fan_out));
    for seg in segments {
        let acc: &Accounts<F> = &seg.layers[l];
        let ((r0, r1), (k0, k1)) = acc.ranges(s0 as u32, s1 as u32);
        if r1 > r0 {
            let (a_rows, d_rows) = acc.rows(r0, r1);
            // κ_j (ã_j · ã_{q,p}): [rows, n_q·P]
            let mut w = a_rows.dot(&input.af.t()).mapv(F::widen);
            for (mut row, &g) in w.rows_mut().into_iter().zip(&acc.row_group[r0..r1]) {
                row *= seg.coef[g as usize];
            }
            let d64 = d_rows.mapv(F::widen);
            let mut j = 0;
            while j < r1 - r0 {
                let s = acc.row_source[r0 + j];
                let mut e = j + 1;
                while e < r1 - r0 && acc.row_source[r0 + e] == s {
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
        if k1 > k0 {
            let aug_in = acc.aug_in;
            let stack = ArrayView2::from_shape(
                ((k1 - k0) * fan_out, aug_in),
                &acc.dense[k0 * fan_out * aug_in..k1 * fan_out * aug_in],
            )
            .expect("invariant: slots hold fan_out × aug_in values");
            let prod = stack.dot(&input.a64.t()); // [(slots)·fan_out, n_q·P]
            for k in k0..k1 {
                let s = acc.dense_source[k] as usize;
                let block = prod.slice(s![(k - k0) * fan_out..(k - k0 + 1) * fan_out, ..]);
                let mut cs = c.index_axis_mut(Axis(0), s - s0);
                cs += &block.t();
            }
        }
    }
    c
}

/// Rows per parallel block of [`dots`].
const ROW_BLOCK: usize = 4096;

/// `⟨c_s, t⟩` for every source of layer `l`, `[n_src, n_q]`, summing over
/// `(segment, input)` pairs (each segment read with its own query input).
pub(crate) fn dots<F: Float>(
    parts: &[(&Segment<F>, &LayerInput<F>)],
    l: usize,
    n_src: usize,
    n_q: usize,
) -> Array2<f64> {
    let mut out = Array2::<f64>::zeros((n_src, n_q));
    let shared = parts.len() > 1 && parts.iter().all(|(_, i)| std::ptr::eq(*i, parts[0].1));
    for &(seg, input) in parts {
        let acc = &seg.layers[l];
        let tf = input.target.mapv(F::narrow);
        let blocks: Vec<usize> = (0..acc.n_rows()).step_by(ROW_BLOCK).collect();
        let row_vals: Vec<Array2<f64>> = blocks
            .par_iter()
            .map(|&r0| {
                let r1 = (r0 + ROW_BLOCK).min(acc.n_rows());
                let (a_rows, d_rows) = acc.rows(r0, r1);
                let aa = a_rows.dot(&input.af.t()); // [rows, n_q·P]
                let dt = d_rows.dot(&tf.t()); // [rows, n_q·P]
                let mut vals = Array2::<f64>::zeros((r1 - r0, n_q));
                for j in 0..r1 - r0 {
                    let k = seg.coef[acc.row_group[r0 + j] as usize];
                    for q in 0..n_q {
                        let mut v = 0.0;
                        for p in q * input.positions..(q + 1) * input.positions {
                            v += aa[[j, p]].widen() * dt[[j, p]].widen();
                        }
                        vals[[j, q]] = k * v;
                    }
                }
                vals
            })
            .collect();
        for (&r0, vals) in blocks.iter().zip(&row_vals) {
            for (j, row) in vals.rows().into_iter().enumerate() {
                let s = acc.row_source[r0 + j] as usize;
                out.row_mut(s).scaled_add(1.0, &row);
            }
        }
        if !shared && acc.n_slots() > 0 {
            let stack =
                ArrayView2::from_shape((acc.n_slots(), acc.fan_out * acc.aug_in), &acc.dense)
                    .expect("invariant: slots hold fan_out × aug_in values");
            dense_dots(&mut out, &acc.dense_source, stack, input);
        }
    }
    if shared {
        // One input for every segment: sum the dense accounts first (query-independent).
        let refs: Vec<&Segment<F>> = parts.iter().map(|(s, _)| *s).collect();
        let (sources, dense) = combined_dense(&refs, l);
        if !sources.is_empty() {
            dense_dots(&mut out, &sources, dense.view(), parts[0].1);
        }
    }
    out
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
