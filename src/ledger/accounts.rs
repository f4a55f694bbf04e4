//! One traced layer's accounts within one segment.
//!
//! Two exact forms, whichever is smaller per source (DESIGN §2.4):
//! * **factored rows**: rank-1 terms `κ_g · d ãᵀ` with `ã = [a; 1]` a patch
//!   (bias column appended), `d` the matching output delta and `κ_g` the
//!   applied coefficient of the step group `g` the row was recorded in;
//! * **dense accounts** `[fan_out, aug_in]` in `f64`.
//!
//! While a segment is open, rows are appended in step order. Closing the
//! segment ([`Accounts::compact`]) densifies the sources whose rows outweigh a
//! dense account, drops rows of zero coefficient, and sorts rows and dense
//! slots by source so that a query reads each source's terms contiguously.

use std::collections::HashMap;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, s};

use crate::Float;

/// Accounts of one layer in one segment.
#[derive(Clone, Debug)]
pub(crate) struct Accounts<F> {
    pub(crate) aug_in: usize,
    pub(crate) fan_out: usize,
    /// Factored rows: patches `[n_rows, aug_in]`, row-major.
    pub(crate) a: Vec<F>,
    /// Factored rows: deltas `[n_rows, fan_out]`, row-major.
    pub(crate) d: Vec<F>,
    /// Source index of each row.
    pub(crate) row_source: Vec<u32>,
    /// Step group of each row (index into the segment's coefficient table).
    pub(crate) row_group: Vec<u32>,
    /// Source index of each dense slot.
    pub(crate) dense_source: Vec<u32>,
    /// Dense accounts `[n_slots, fan_out, aug_in]`, row-major.
    pub(crate) dense: Vec<f64>,
    /// Slot of each source with a dense account.
    slot_of: HashMap<u32, usize>,
    /// Updates not credited to any source `[fan_out, aug_in]`.
    pub(crate) residual: Array2<f64>,
    /// Whether rows and slots are sorted by source (true after `compact`).
    pub(crate) sorted: bool,
}

impl<F: Float> Accounts<F> {
    pub(crate) fn new(aug_in: usize, fan_out: usize) -> Self {
        Self {
            aug_in,
            fan_out,
            a: Vec::new(),
            d: Vec::new(),
            row_source: Vec::new(),
            row_group: Vec::new(),
            dense_source: Vec::new(),
            dense: Vec::new(),
            slot_of: HashMap::new(),
            residual: Array2::zeros((fan_out, aug_in)),
            sorted: true,
        }
    }

    pub(crate) fn n_rows(&self) -> usize {
        self.row_source.len()
    }

    pub(crate) fn n_slots(&self) -> usize {
        self.dense_source.len()
    }

    /// Appends one factored row; `patch` has `fan_in` values (the bias column is added here).
    pub(crate) fn push_row(
        &mut self,
        source: u32,
        group: u32,
        patch: ArrayView1<'_, F>,
        delta: ArrayView1<'_, F>,
    ) {
        debug_assert!(patch.len() + 1 == self.aug_in || patch.len() == self.aug_in);
        debug_assert_eq!(delta.len(), self.fan_out);
        self.a.extend(patch.iter().copied());
        if patch.len() < self.aug_in {
            self.a.push(F::one());
        }
        self.d.extend(delta.iter().copied());
        self.row_source.push(source);
        self.row_group.push(group);
        self.sorted = false;
    }

    /// Copies row `j` of `other` into this account under a new group.
    pub(crate) fn copy_row_from(&mut self, other: &Self, j: usize, group: u32) {
        let (ai, fo) = (self.aug_in, self.fan_out);
        self.a.extend_from_slice(&other.a[j * ai..(j + 1) * ai]);
        self.d.extend_from_slice(&other.d[j * fo..(j + 1) * fo]);
        self.row_source.push(other.row_source[j]);
        self.row_group.push(group);
        self.sorted = false;
    }

    /// The dense account of `source`, created at zero if absent.
    pub(crate) fn dense_mut(&mut self, source: u32) -> ArrayViewMut2<'_, f64> {
        let size = self.fan_out * self.aug_in;
        let slot = match self.slot_of.get(&source) {
            Some(&slot) => slot,
            None => {
                let slot = self.dense_source.len();
                self.dense_source.push(source);
                self.dense.resize(self.dense.len() + size, 0.0);
                self.slot_of.insert(source, slot);
                if slot > 0 && self.dense_source[slot - 1] > source {
                    self.sorted = false;
                }
                slot
            }
        };
        ArrayViewMut2::from_shape(
            (self.fan_out, self.aug_in),
            &mut self.dense[slot * size..(slot + 1) * size],
        )
        .expect("invariant: slot holds fan_out × aug_in values")
    }

    /// The dense account in `slot`.
    pub(crate) fn slot(&self, slot: usize) -> ArrayView2<'_, f64> {
        let size = self.fan_out * self.aug_in;
        ArrayView2::from_shape(
            (self.fan_out, self.aug_in),
            &self.dense[slot * size..(slot + 1) * size],
        )
        .expect("invariant: slot holds fan_out × aug_in values")
    }

    /// Rows `[start, end)` as `(patches, deltas)` views.
    pub(crate) fn rows(&self, start: usize, end: usize) -> (ArrayView2<'_, F>, ArrayView2<'_, F>) {
        let a = ArrayView2::from_shape(
            (end - start, self.aug_in),
            &self.a[start * self.aug_in..end * self.aug_in],
        )
        .expect("invariant: rows hold aug_in values");
        let d = ArrayView2::from_shape(
            (end - start, self.fan_out),
            &self.d[start * self.fan_out..end * self.fan_out],
        )
        .expect("invariant: rows hold fan_out values");
        (a, d)
    }

    /// `Σ_j κ_j d_j ã_jᵀ` over rows `[start, end)`, `κ` from the segment's coefficient table.
    pub(crate) fn rows_sum(&self, start: usize, end: usize, coef: &[f64]) -> Array2<f64> {
        let (a, d) = self.rows(start, end);
        let a64 = a.mapv(F::widen);
        let mut d64 = d.mapv(F::widen);
        for (mut row, &g) in d64.rows_mut().into_iter().zip(&self.row_group[start..end]) {
            row *= coef[g as usize];
        }
        d64.t().dot(&a64)
    }

    /// Bytes held by this account (factors, dense slots, residual).
    pub(crate) fn bytes(&self) -> usize {
        let f = std::mem::size_of::<F>();
        (self.a.len() + self.d.len()) * f
            + (self.row_source.len() + self.row_group.len()) * 4
            + self.dense.len() * 8
            + self.dense_source.len() * 4
            + self.residual.len() * 8
    }

    /// Closes the segment's accounts: densifies sources whose rows outweigh a dense
    /// account, drops rows with a zero coefficient, sorts rows and slots by source.
    pub(crate) fn compact(&mut self, coef: &[f64]) {
        let row_bytes = (self.aug_in + self.fan_out) * std::mem::size_of::<F>() + 8;
        let dense_bytes = self.aug_in * self.fan_out * 8;
        let mut rows_of: HashMap<u32, usize> = HashMap::new();
        for &s in &self.row_source {
            *rows_of.entry(s).or_default() += 1;
        }
        let densify = |n: usize, has_slot: bool| has_slot || n * row_bytes > dense_bytes;
        // Row order: by source, then by original position (stable).
        let mut order: Vec<usize> = (0..self.n_rows()).collect();
        order.sort_by_key(|&j| self.row_source[j]);
        let (ai, fo) = (self.aug_in, self.fan_out);
        let mut keep = Vec::with_capacity(order.len());
        for &j in &order {
            let s = self.row_source[j];
            let k = coef[self.row_group[j] as usize];
            if k == 0.0 {
                continue;
            }
            if densify(rows_of[&s], self.slot_of.contains_key(&s)) {
                let a: Vec<f64> = self.a[j * ai..(j + 1) * ai]
                    .iter()
                    .map(|v| v.widen())
                    .collect();
                let d: Vec<f64> = self.d[j * fo..(j + 1) * fo]
                    .iter()
                    .map(|v| v.widen() * k)
                    .collect();
                let mut acc = self.dense_mut(s);
                for (o, &dv) in d.iter().enumerate() {
                    for (i, &av) in a.iter().enumerate() {
                        acc[[o, i]] += dv * av;
                    }
                }
            } else {
                keep.push(j);
            }
        }
        let mut a = Vec::with_capacity(keep.len() * ai);
        let mut d = Vec::with_capacity(keep.len() * fo);
        for &j in &keep {
            a.extend_from_slice(&self.a[j * ai..(j + 1) * ai]);
            d.extend_from_slice(&self.d[j * fo..(j + 1) * fo]);
        }
        self.row_source = keep.iter().map(|&j| self.row_source[j]).collect();
        self.row_group = keep.iter().map(|&j| self.row_group[j]).collect();
        self.a = a;
        self.d = d;
        // Dense slots by source.
        let size = fo * ai;
        let mut slots: Vec<usize> = (0..self.n_slots()).collect();
        slots.sort_by_key(|&k| self.dense_source[k]);
        let mut dense = Vec::with_capacity(self.dense.len());
        for &k in &slots {
            dense.extend_from_slice(&self.dense[k * size..(k + 1) * size]);
        }
        self.dense_source = slots.iter().map(|&k| self.dense_source[k]).collect();
        self.dense = dense;
        self.slot_of = self
            .dense_source
            .iter()
            .enumerate()
            .map(|(k, &s)| (s, k))
            .collect();
        self.sorted = true;
    }

    /// Row range and slot range of sources `[s0, s1)` (requires sorted accounts).
    pub(crate) fn ranges(&self, s0: u32, s1: u32) -> ((usize, usize), (usize, usize)) {
        debug_assert!(self.sorted);
        let r0 = self.row_source.partition_point(|&s| s < s0);
        let r1 = self.row_source.partition_point(|&s| s < s1);
        let k0 = self.dense_source.partition_point(|&s| s < s0);
        let k1 = self.dense_source.partition_point(|&s| s < s1);
        ((r0, r1), (k0, k1))
    }

    /// The whole account of `source` (rows and dense), `[fan_out, aug_in]`.
    pub(crate) fn account_of(&self, source: u32, coef: &[f64]) -> Array2<f64> {
        let mut acc = Array2::zeros((self.fan_out, self.aug_in));
        if let Some(&slot) = self.slot_of.get(&source) {
            acc += &self.slot(slot);
        }
        if self.sorted {
            let ((r0, r1), _) = self.ranges(source, source + 1);
            if r1 > r0 {
                acc += &self.rows_sum(r0, r1, coef);
            }
        } else {
            for j in (0..self.n_rows()).filter(|&j| self.row_source[j] == source) {
                acc += &self.rows_sum(j, j + 1, coef);
            }
        }
        acc
    }

    /// Sum of every account (rows and dense), excluding the residual.
    pub(crate) fn total(&self, coef: &[f64]) -> Array2<f64> {
        let mut acc = if self.n_rows() > 0 {
            self.rows_sum(0, self.n_rows(), coef)
        } else {
            Array2::zeros((self.fan_out, self.aug_in))
        };
        for k in 0..self.n_slots() {
            acc += &self.slot(k);
        }
        acc
    }

    /// Adds `scale · m` to the dense account of `source`.
    pub(crate) fn add_dense(&mut self, source: u32, m: ArrayView2<'_, f64>, scale: f64) {
        self.dense_mut(source).scaled_add(scale, &m);
    }
}

/// A `[fan_out, aug_in]` matrix as `[W | b]` from a weight and an optional bias.
pub(crate) fn augmented<F: Float>(
    weight: ndarray::ArrayViewD<'_, F>,
    bias: Option<ndarray::ArrayView1<'_, F>>,
    fan_out: usize,
    fan_in: usize,
) -> Option<Array2<f64>> {
    if weight.len() != fan_out * fan_in || bias.is_some_and(|b| b.len() != fan_out) {
        return None;
    }
    let aug_in = fan_in + usize::from(bias.is_some());
    let mut m = Array2::zeros((fan_out, aug_in));
    let w = weight.as_standard_layout();
    let w = w.as_slice().expect("invariant: standard layout");
    for o in 0..fan_out {
        for i in 0..fan_in {
            m[[o, i]] = w[o * fan_in + i].widen();
        }
    }
    if let Some(b) = bias {
        m.slice_mut(s![.., fan_in]).assign(&b.mapv(F::widen));
    }
    Some(m)
}
