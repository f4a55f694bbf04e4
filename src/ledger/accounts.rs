//! Storage of one traced layer's accounts.
//!
//! Two exact forms, whichever is smaller per source:
//! * **factored rows** ([`Rows`], one arena per layer for the whole run): rank-1
//!   terms `d ãᵀ` with `ã = [a; 1]` a patch (bias column appended) and `d` its
//!   output delta, recorded in step *group* `g`. A row's weight in segment `k`
//!   is that segment's coefficient of `g`, so a gradient share whose momentum
//!   tail spans a segment boundary is stored once and weighted in both;
//! * **dense accounts** ([`DenseAccounts`], per segment) `[fan_out, aug_in]` in `f64`.
//!
//! While training, rows are appended in step order. [`Rows::compact`] (when a
//! ledger is finished) densifies the sources whose rows outweigh their dense
//! accounts and sorts rows by source, so a query reads each source's terms
//! contiguously.

use std::collections::HashMap;

use ndarray::{Array2, ArrayView1, ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use crate::float::Float;
use crate::storage::Buf;

/// The factored rows of one layer.
#[derive(Clone, Debug)]
pub(crate) struct Rows<F> {
    pub(crate) aug_in: usize,
    pub(crate) fan_out: usize,
    /// Patches `[n_rows, aug_in]`, row-major.
    pub(crate) a: Buf<F>,
    /// Deltas `[n_rows, fan_out]`, row-major.
    pub(crate) d: Buf<F>,
    /// Source index of each row.
    pub(crate) source: Vec<u32>,
    /// Global step group of each row.
    pub(crate) group: Vec<u32>,
    /// Whether rows are sorted by source (true after `compact`).
    pub(crate) sorted: bool,
    /// How far the arenas' spare capacity has been pre-faulted.
    prefaulted: [Prefaulted; 2],
}

/// The extent of a vector's capacity already pre-faulted: its base address
/// (a reallocation elsewhere starts over) and the bytes from there.
#[derive(Clone, Copy, Debug, Default)]
struct Prefaulted {
    base: usize,
    bytes: usize,
}

/// Bytes pre-faulted ahead of a growing arena at a time.
#[cfg(target_os = "linux")]
const PREFAULT_BYTES: usize = 4 << 20;

/// Makes the next [`PREFAULT_BYTES`] of `v`'s spare capacity resident in one
/// system call, so appending to it does not trap once per 4 KiB page (the
/// kernel's page-fault work was the largest part of the MLP's tracing
/// overhead). A hint: failure (old kernels) changes nothing.
#[cfg(target_os = "linux")]
fn prefault<T>(v: &Vec<T>, done: &mut Prefaulted) {
    let size = std::mem::size_of::<T>();
    let base = v.as_ptr() as usize;
    if base != done.base {
        *done = Prefaulted {
            base,
            bytes: v.len() * size,
        };
    }
    let (len, cap) = (v.len() * size, v.capacity() * size);
    if len + PREFAULT_BYTES / 2 < done.bytes || done.bytes >= cap {
        return;
    }
    let page = 4096;
    let start = (base + done.bytes.max(len)).next_multiple_of(page);
    let end = ((base + cap).min(base + len + PREFAULT_BYTES) / page) * page;
    if end > start {
        // SAFETY: [start, end) lies in whole pages inside the vector's own
        // allocation, past its initialised length; MADV_POPULATE_WRITE only
        // makes those pages resident (zero-filled), it reads or writes no data.
        #[allow(unsafe_code)]
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
    }
    done.bytes = end.max(start) - base;
}

#[cfg(not(target_os = "linux"))]
fn prefault<T>(_: &Vec<T>, _: &mut Prefaulted) {}

impl<F: Float> Rows<F> {
    pub(crate) fn new(aug_in: usize, fan_out: usize) -> Self {
        Self {
            aug_in,
            fan_out,
            a: Buf::default(),
            d: Buf::default(),
            source: Vec::new(),
            group: Vec::new(),
            sorted: true,
            prefaulted: Default::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.source.len()
    }

    /// Appends one row; `patch` has `fan_in` values (the bias column is added here).
    pub(crate) fn push(
        &mut self,
        source: u32,
        group: u32,
        patch: ArrayView1<'_, F>,
        delta: ArrayView1<'_, F>,
    ) {
        debug_assert!(patch.len() + 1 == self.aug_in || patch.len() == self.aug_in);
        debug_assert_eq!(delta.len(), self.fan_out);
        let a = self.a.to_mut();
        match patch.as_slice() {
            Some(p) => a.extend_from_slice(p),
            None => a.extend(patch.iter().copied()),
        }
        if patch.len() < self.aug_in {
            a.push(F::one());
        }
        prefault(a, &mut self.prefaulted[0]);
        let d = self.d.to_mut();
        match delta.as_slice() {
            Some(v) => d.extend_from_slice(v),
            None => d.extend(delta.iter().copied()),
        }
        prefault(d, &mut self.prefaulted[1]);
        if self.source.last().is_some_and(|&last| last > source) {
            self.sorted = false;
        }
        self.source.push(source);
        self.group.push(group);
    }

    /// Rows `[start, end)` as `(patches, deltas)` views.
    pub(crate) fn view(&self, start: usize, end: usize) -> (ArrayView2<'_, F>, ArrayView2<'_, F>) {
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

    /// `Σ_j κ(g_j) d_j ã_jᵀ` over rows `[start, end)`, in `f64`: blocks of rows
    /// in parallel, added in a fixed order (the same result for any thread count).
    pub(crate) fn sum(
        &self,
        start: usize,
        end: usize,
        coef: impl Fn(u32) -> f64 + Sync,
    ) -> Array2<f64> {
        const BLOCK: usize = 2048;
        let block_sum = |b0: usize| {
            let b1 = (b0 + BLOCK).min(end);
            // Rows of weight 0 (another segment's groups) are skipped.
            let keep: Vec<usize> = (b0..b1).filter(|&j| coef(self.group[j]) != 0.0).collect();
            let (a, d) = self.view(b0, b1);
            let rel: Vec<usize> = keep.iter().map(|&j| j - b0).collect();
            let (a, d) = if keep.len() == b1 - b0 {
                (a.mapv(F::widen), d.mapv(F::widen))
            } else {
                (
                    a.select(Axis(0), &rel).mapv(F::widen),
                    d.select(Axis(0), &rel).mapv(F::widen),
                )
            };
            let mut d64 = d;
            for (mut row, &j) in d64.rows_mut().into_iter().zip(&keep) {
                row *= coef(self.group[j]);
            }
            d64.t().dot(&a)
        };
        let mut total = Array2::zeros((self.fan_out, self.aug_in));
        let starts: Vec<usize> = (start..end).step_by(BLOCK).collect();
        // A few blocks per thread at a time bound the partial sums held.
        for wave in starts.chunks(4 * rayon::current_num_threads()) {
            let parts: Vec<Array2<f64>> = wave.par_iter().map(|&b0| block_sum(b0)).collect();
            for p in parts {
                total += &p;
            }
        }
        total
    }

    /// Whether rows are in step-group order (as appended while training).
    pub(crate) fn sorted_by_group(&self) -> bool {
        self.group.windows(2).all(|w| w[0] <= w[1])
    }

    /// Row range of sources `[s0, s1)` (rows sorted by source).
    pub(crate) fn range(&self, s0: u32, s1: u32) -> (usize, usize) {
        debug_assert!(self.sorted);
        (
            self.source.partition_point(|&s| s < s0),
            self.source.partition_point(|&s| s < s1),
        )
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        (self.a.len() + self.d.len()) * std::mem::size_of::<F>()
            + (self.source.len() + self.group.len()) * 4
    }

    /// Bytes of one row.
    pub(crate) fn row_bytes(&self) -> usize {
        (self.aug_in + self.fan_out) * std::mem::size_of::<F>() + 8
    }

    /// Keeps the rows for which `keep(j)` holds, sorted by (source, group).
    pub(crate) fn retain_sorted(&mut self, keep: impl Fn(usize) -> bool) {
        let mut order: Vec<usize> = (0..self.len()).filter(|&j| keep(j)).collect();
        order.sort_by_key(|&j| (self.source[j], self.group[j]));
        let (ai, fo) = (self.aug_in, self.fan_out);
        let mut a = Vec::with_capacity(order.len() * ai);
        let mut d = Vec::with_capacity(order.len() * fo);
        for &j in &order {
            a.extend_from_slice(&self.a[j * ai..(j + 1) * ai]);
            d.extend_from_slice(&self.d[j * fo..(j + 1) * fo]);
        }
        self.source = order.iter().map(|&j| self.source[j]).collect();
        self.group = order.iter().map(|&j| self.group[j]).collect();
        self.a = Buf::Owned(a);
        self.d = Buf::Owned(d);
        self.sorted = true;
    }
}

/// Dense accounts and the residual of one layer in one segment.
#[derive(Clone, Debug)]
pub(crate) struct DenseAccounts {
    pub(crate) aug_in: usize,
    pub(crate) fan_out: usize,
    /// Source index of each slot.
    pub(crate) source: Vec<u32>,
    /// Dense accounts `[n_slots, fan_out, aug_in]`, row-major.
    pub(crate) dense: Buf<f64>,
    slot_of: HashMap<u32, usize>,
    /// Updates not credited to any source `[fan_out, aug_in]`.
    pub(crate) residual: Array2<f64>,
    /// Whether slots are sorted by source.
    pub(crate) sorted: bool,
}

impl DenseAccounts {
    pub(crate) fn new(aug_in: usize, fan_out: usize) -> Self {
        Self {
            aug_in,
            fan_out,
            source: Vec::new(),
            dense: Buf::default(),
            slot_of: HashMap::new(),
            residual: Array2::zeros((fan_out, aug_in)),
            sorted: true,
        }
    }

    pub(crate) fn n_slots(&self) -> usize {
        self.source.len()
    }

    fn size(&self) -> usize {
        self.fan_out * self.aug_in
    }

    /// The dense account of `source`, created at zero if absent.
    pub(crate) fn dense_mut(&mut self, source: u32) -> ArrayViewMut2<'_, f64> {
        let size = self.size();
        let slot = match self.slot_of.get(&source) {
            Some(&slot) => slot,
            None => {
                let slot = self.source.len();
                if self.source.last().is_some_and(|&last| last > source) {
                    self.sorted = false;
                }
                self.source.push(source);
                let n = self.dense.len();
                self.dense.to_mut().resize(n + size, 0.0);
                self.slot_of.insert(source, slot);
                slot
            }
        };
        ArrayViewMut2::from_shape(
            (self.fan_out, self.aug_in),
            &mut self.dense.to_mut()[slot * size..(slot + 1) * size],
        )
        .expect("invariant: slot holds fan_out × aug_in values")
    }

    /// Adds `scale · m` to the dense account of `source`.
    pub(crate) fn add(&mut self, source: u32, m: ArrayView2<'_, f64>, scale: f64) {
        self.dense_mut(source).scaled_add(scale, &m);
    }

    /// The dense account in `slot`.
    pub(crate) fn slot(&self, slot: usize) -> ArrayView2<'_, f64> {
        let size = self.size();
        ArrayView2::from_shape(
            (self.fan_out, self.aug_in),
            &self.dense[slot * size..(slot + 1) * size],
        )
        .expect("invariant: slot holds fan_out × aug_in values")
    }

    /// All slots as `[n_slots, fan_out · aug_in]`.
    pub(crate) fn stack(&self) -> ArrayView2<'_, f64> {
        ArrayView2::from_shape((self.n_slots(), self.size()), &self.dense)
            .expect("invariant: slots hold fan_out × aug_in values")
    }

    /// The dense account of `source`, if it has one.
    pub(crate) fn get(&self, source: u32) -> Option<ArrayView2<'_, f64>> {
        self.slot_of.get(&source).map(|&k| self.slot(k))
    }

    /// Sum of all dense accounts.
    pub(crate) fn total(&self) -> Array2<f64> {
        let mut acc = Array2::zeros((self.fan_out, self.aug_in));
        for k in 0..self.n_slots() {
            acc += &self.slot(k);
        }
        acc
    }

    /// Bytes held (slots and residual).
    pub(crate) fn bytes(&self) -> usize {
        self.dense.len() * 8 + self.source.len() * 4 + self.residual.len() * 8
    }

    /// Dense accounts from stored parts; `None` unless the sizes agree and
    /// sources are unique — and strictly ascending when `sorted` (a finished
    /// ledger's; a segment still open keeps its slots in the order they came).
    pub(crate) fn from_parts(
        aug_in: usize,
        fan_out: usize,
        source: Vec<u32>,
        dense: Buf<f64>,
        residual: Array2<f64>,
        sorted: bool,
    ) -> Option<Self> {
        let ascending = source.windows(2).all(|w| w[0] < w[1]);
        let slot_of: HashMap<u32, usize> =
            source.iter().enumerate().map(|(k, &s)| (s, k)).collect();
        let ok = (ascending || !sorted)
            && slot_of.len() == source.len()
            && dense.len() == source.len() * aug_in * fan_out
            && residual.dim() == (fan_out, aug_in);
        ok.then(|| Self {
            aug_in,
            fan_out,
            slot_of,
            source,
            dense,
            residual,
            sorted: ascending,
        })
    }

    /// Sorts slots by source.
    pub(crate) fn sort(&mut self) {
        if self.sorted {
            return;
        }
        let size = self.size();
        let mut order: Vec<usize> = (0..self.n_slots()).collect();
        order.sort_by_key(|&k| self.source[k]);
        let mut dense = Vec::with_capacity(self.dense.len());
        for &k in &order {
            dense.extend_from_slice(&self.dense[k * size..(k + 1) * size]);
        }
        self.source = order.iter().map(|&k| self.source[k]).collect();
        self.dense = Buf::Owned(dense);
        self.slot_of = self
            .source
            .iter()
            .enumerate()
            .map(|(k, &s)| (s, k))
            .collect();
        self.sorted = true;
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
    let mut m = Array2::<f64>::zeros((fan_out, aug_in));
    let w = weight.as_standard_layout();
    let w = w.as_slice().expect("invariant: standard layout");
    for (row, src) in m.rows_mut().into_iter().zip(w.chunks_exact(fan_in)) {
        let row = row.into_slice().expect("invariant: standard layout");
        for (dst, &v) in row.iter_mut().zip(src) {
            *dst = v.widen();
        }
    }
    if let Some(b) = bias {
        m.slice_mut(s![.., fan_in]).assign(&b.mapv(F::widen));
    }
    Some(m)
}
