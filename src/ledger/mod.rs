//! The ledger: per traced layer and per source, the sum of the updates credited
//! to that source, so that every query's refinement splits exactly into one
//! contribution per source (DESIGN §2).
//!
//! A ledger is written by an [`OptimizerHook`](crate::OptimizerHook) and read by
//! the queries in [`crate::query`]. It holds, per traced layer, the initial
//! parameters `[W₀ | b₀]`, and per *segment* of training (one by default, or
//! e.g. one per epoch) the parameters at the segment's end, the accounts of
//! every source and a residual for anything not credited. It balances:
//!
//! ```text
//! W₀ + Σ_segments (Σ_sources G + residual) = W_T
//! ```

pub(crate) mod accounts;
mod buf;

pub(crate) use buf::Buf;
mod merge;
mod persist;

pub use persist::{FORMAT, VERSION};

use std::collections::HashMap;

use ndarray::{Array2, ArrayViewMutD};
use serde::{Deserialize, Serialize};

use crate::error::shape_str;
use crate::{Error, ExampleId, Float, LayerId, Result, SourceId, Traceable, TracedShape};
pub(crate) use accounts::{DenseAccounts, Rows, augmented};

/// A traced layer as the ledger knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerMeta {
    /// The layer's id.
    pub id: LayerId,
    /// Its linear map's shape.
    pub shape: TracedShape,
}

/// What the ledger knows about a source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceMeta {
    /// The source.
    pub id: SourceId,
    /// Its class: the example's label, a class-pure batch's label, `None` otherwise.
    pub label: Option<usize>,
    /// For a batch source, the examples it was made of (ghosts excluded).
    pub members: Vec<ExampleId>,
}

/// One segment of training: its coefficients, dense accounts and residuals,
/// and the parameters at its end.
#[derive(Clone, Debug)]
pub(crate) struct Segment {
    /// `[W | b]` per layer at the segment's end.
    pub(crate) end: Vec<Array2<f64>>,
    /// The first step group this segment weights.
    pub(crate) first_group: u32,
    /// Coefficient of groups `first_group..` in this segment (shared by all layers).
    pub(crate) coef: Vec<f64>,
    /// Dense accounts and residual per layer.
    pub(crate) layers: Vec<DenseAccounts>,
    /// Optimizer steps recorded in this segment.
    pub(crate) n_steps: u64,
}

impl Segment {
    pub(crate) fn new(end: Vec<Array2<f64>>, first_group: u32, layers: &[LayerMeta]) -> Self {
        Self {
            end,
            first_group,
            coef: Vec::new(),
            layers: layers
                .iter()
                .map(|m| DenseAccounts::new(m.shape.aug_in(), m.shape.fan_out))
                .collect(),
            n_steps: 0,
        }
    }

    /// The coefficient of group `g` in this segment (0 outside its range).
    pub(crate) fn coef_of(&self, g: u32) -> f64 {
        g.checked_sub(self.first_group)
            .and_then(|i| self.coef.get(i as usize))
            .copied()
            .unwrap_or(0.0)
    }

    /// The coefficient entry of group `g`, which must be in range.
    pub(crate) fn coef_mut(&mut self, g: u32) -> &mut f64 {
        &mut self.coef[(g - self.first_group) as usize]
    }
}

/// The exact record of who refined each traced layer.
///
/// Obtained from [`OptimizerHook::finish`](crate::OptimizerHook::finish) or
/// [`OptimizerHook::snapshot`](crate::OptimizerHook::snapshot); queried with
/// [`explain`](Self::explain), [`top_k_influences`](Self::top_k_influences),
/// [`class_attribution`](Self::class_attribution) and friends.
#[derive(Clone, Debug)]
pub struct Ledger<F: Float = f32> {
    pub(crate) layers: Vec<LayerMeta>,
    pub(crate) initial: Vec<Array2<f64>>,
    pub(crate) sources: Vec<SourceMeta>,
    pub(crate) index: HashMap<SourceId, u32>,
    /// Factored rows per layer, over the whole run.
    pub(crate) rows: Vec<Rows<F>>,
    /// Step groups allocated so far.
    pub(crate) n_groups: u32,
    pub(crate) segments: Vec<Segment>,
}

impl<F: Float> Ledger<F> {
    /// An empty ledger for `layers` at their current (initial) parameters.
    pub(crate) fn new(layers: &[&dyn Traceable<F>]) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::Empty {
                op: "Ledger::new",
                what: "list of traced layers",
            });
        }
        let mut metas = Vec::with_capacity(layers.len());
        let mut initial = Vec::with_capacity(layers.len());
        for layer in layers {
            let shape = layer.traced_shape();
            let id = layer.layer_id().clone();
            if metas.iter().any(|m: &LayerMeta| m.id == id) {
                return Err(Error::InvalidConfig {
                    what: "traced layers",
                    reason: format!("layer ids must be unique, found {id} twice"),
                });
            }
            let params = read_params(*layer, &shape, "Ledger::new")?;
            metas.push(LayerMeta { id, shape });
            initial.push(params);
        }
        let segment = Segment::new(initial.clone(), 0, &metas);
        Ok(Self {
            rows: metas
                .iter()
                .map(|m| Rows::new(m.shape.aug_in(), m.shape.fan_out))
                .collect(),
            layers: metas,
            initial,
            sources: Vec::new(),
            index: HashMap::new(),
            n_groups: 0,
            segments: vec![segment],
        })
    }

    /// The traced layers, in order.
    pub fn layers(&self) -> &[LayerMeta] {
        &self.layers
    }

    /// Every source, in the order the ledger first saw them (the column order of scores).
    pub fn sources(&self) -> &[SourceMeta] {
        &self.sources
    }

    /// The column of `source` in score matrices.
    ///
    /// # Errors
    /// [`Error::UnknownSource`] when the ledger never credited `source`.
    pub fn source_index(&self, source: SourceId) -> Result<usize> {
        self.index
            .get(&source)
            .map(|&i| i as usize)
            .ok_or_else(|| Error::UnknownSource {
                op: "Ledger::source_index",
                source_id: source.to_string(),
            })
    }

    /// Number of segments.
    pub fn n_segments(&self) -> usize {
        self.segments.len()
    }

    /// Optimizer steps recorded in each segment.
    pub fn steps_per_segment(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.n_steps).collect()
    }

    /// Index of the layer with id `layer`.
    ///
    /// # Errors
    /// [`Error::LayerMismatch`] when no traced layer has that id.
    pub fn layer_index(&self, layer: &LayerId) -> Result<usize> {
        self.layers
            .iter()
            .position(|m| &m.id == layer)
            .ok_or_else(|| Error::LayerMismatch {
                op: "Ledger::layer_index",
                expected: format!(
                    "one of {:?}",
                    self.layers
                        .iter()
                        .map(|m| m.id.0.as_str())
                        .collect::<Vec<_>>()
                ),
                got: layer.to_string(),
            })
    }

    fn check_layer(&self, layer: usize, op: &'static str) -> Result<()> {
        if layer < self.layers.len() {
            Ok(())
        } else {
            Err(Error::IndexOutOfRange {
                op,
                what: "layer",
                index: layer,
                len: self.layers.len(),
            })
        }
    }

    /// Initial parameters `[W₀ | b₀]` of layer `layer`, `[fan_out, aug_in]`.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    pub fn initial_params(&self, layer: usize) -> Result<&Array2<f64>> {
        self.check_layer(layer, "Ledger::initial_params")?;
        Ok(&self.initial[layer])
    }

    /// Parameters `[W | b]` of layer `layer` at the end of segment `segment`.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer or segment index.
    pub fn segment_end_params(&self, segment: usize, layer: usize) -> Result<&Array2<f64>> {
        self.check_layer(layer, "Ledger::segment_end_params")?;
        let seg = self.segments.get(segment).ok_or(Error::IndexOutOfRange {
            op: "Ledger::segment_end_params",
            what: "segment",
            index: segment,
            len: self.segments.len(),
        })?;
        Ok(&seg.end[layer])
    }

    /// Final parameters `[W_T | b_T]` of layer `layer`.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    pub fn final_params(&self, layer: usize) -> Result<&Array2<f64>> {
        self.segment_end_params(self.segments.len() - 1, layer)
    }

    /// The whole account `G` of `source` in layer `layer`, summed over segments,
    /// as a dense `[fan_out, aug_in]` matrix (bias in the last column).
    ///
    /// # Errors
    /// [`Error::UnknownSource`], [`Error::IndexOutOfRange`].
    pub fn account(&self, layer: usize, source: SourceId) -> Result<Array2<f64>> {
        self.check_layer(layer, "Ledger::account")?;
        let s = self.source_index(source)? as u32;
        let coef = self.coef_table(&self.segments.iter().collect::<Vec<_>>());
        let rows = &self.rows[layer];
        let mut acc = Array2::zeros(self.initial[layer].raw_dim());
        for j in (0..rows.len()).filter(|&j| rows.source[j] == s) {
            acc += &rows.sum(j, j + 1, |g| coef[g as usize]);
        }
        for seg in &self.segments {
            if let Some(d) = seg.layers[layer].get(s) {
                acc += &d;
            }
        }
        Ok(acc)
    }

    /// The residual of layer `layer` (updates credited to no source), summed over segments.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    pub fn residual(&self, layer: usize) -> Result<Array2<f64>> {
        self.check_layer(layer, "Ledger::residual")?;
        let mut acc = Array2::zeros(self.initial[layer].raw_dim());
        for seg in &self.segments {
            acc += &seg.layers[layer].residual;
        }
        Ok(acc)
    }

    /// Per layer, the balance of parameters:
    /// `‖W₀ + Σ G + residual − W_T‖ / ‖W_T − W₀‖` (0 when nothing changed).
    pub fn parameter_balance(&self) -> Vec<f64> {
        (0..self.layers.len())
            .map(|l| {
                let mut sum = self.initial[l].clone();
                let mut prev_end = &self.initial[l];
                let mut change_norm2 = 0.0;
                let rows = &self.rows[l];
                for seg in &self.segments {
                    sum += &rows.sum(0, rows.len(), |g| seg.coef_of(g));
                    sum += &seg.layers[l].total();
                    sum += &seg.layers[l].residual;
                    change_norm2 += (&seg.end[l] - prev_end).mapv(|v| v * v).sum();
                    prev_end = &seg.end[l];
                }
                let err = (&sum - &self.segments[self.segments.len() - 1].end[l])
                    .mapv(|v| v * v)
                    .sum()
                    .sqrt();
                let scale = change_norm2.sqrt();
                if scale == 0.0 { err } else { err / scale }
            })
            .collect()
    }

    /// Relative size of the residual per layer: `‖residual‖ / ‖W_T − W₀‖`.
    pub fn residual_fraction(&self) -> Vec<f64> {
        (0..self.layers.len())
            .map(|l| {
                let res = self.residual(l).expect("invariant: layer in range");
                let change =
                    self.final_params(l).expect("invariant: layer in range") - &self.initial[l];
                let c = change.mapv(|v| v * v).sum().sqrt();
                let r = res.mapv(|v| v * v).sum().sqrt();
                if c == 0.0 { r } else { r / c }
            })
            .collect()
    }

    /// Bytes the ledger's accounts take per layer (factors, dense accounts,
    /// residuals, and the parameters kept at every boundary).
    pub fn bytes_per_layer(&self) -> Vec<usize> {
        (0..self.layers.len())
            .map(|l| {
                let params = self.initial[l].len() * 8 * (1 + self.segments.len());
                let coef = self
                    .segments
                    .iter()
                    .map(|s| s.coef.len() * 8)
                    .sum::<usize>();
                let dense = self
                    .segments
                    .iter()
                    .map(|s| s.layers[l].bytes())
                    .sum::<usize>();
                params + coef + self.rows[l].bytes() + dense
            })
            .collect()
    }

    /// Bytes of accounts served straight from a memory-mapped file (after
    /// [`load`](Self::load)); 0 for a ledger in memory.
    pub fn mapped_bytes(&self) -> usize {
        let rows: usize = self
            .rows
            .iter()
            .map(|r| r.a.mapped_bytes() + r.d.mapped_bytes())
            .sum();
        let dense: usize = self
            .segments
            .iter()
            .flat_map(|s| &s.layers)
            .map(|a| a.dense.mapped_bytes())
            .sum();
        rows + dense
    }

    /// Checks that `layers` are the layers this ledger traced (ids and shapes, in order).
    pub(crate) fn check_layers(
        &self,
        layers: &[&dyn Traceable<F>],
        op: &'static str,
    ) -> Result<()> {
        let got: Vec<(LayerId, TracedShape)> = layers
            .iter()
            .map(|l| (l.layer_id().clone(), l.traced_shape()))
            .collect();
        check_metas(&self.layers, &got, op)
    }

    /// Index of `id`, registering it (with `label` and `members`) if new.
    pub(crate) fn source_or_insert(
        &mut self,
        id: SourceId,
        label: Option<usize>,
        members: Vec<ExampleId>,
    ) -> Result<u32> {
        if let Some(&s) = self.index.get(&id) {
            let known = self.sources[s as usize].label;
            if known != label {
                return Err(Error::InconsistentSource {
                    op: "OptimizerHook::step",
                    reason: format!("{id} was recorded with label {known:?}, now found {label:?}"),
                });
            }
            return Ok(s);
        }
        let s = u32::try_from(self.sources.len()).map_err(|_| Error::InvalidConfig {
            what: "number of sources",
            reason: format!("must fit in u32, found {}", self.sources.len()),
        })?;
        self.sources.push(SourceMeta { id, label, members });
        self.index.insert(id, s);
        Ok(s)
    }
}

/// Checks traced layers against the ledger's metadata.
pub(crate) fn check_metas(
    metas: &[LayerMeta],
    got: &[(LayerId, TracedShape)],
    op: &'static str,
) -> Result<()> {
    let describe = |id: &LayerId, s: &TracedShape| {
        format!(
            "{id} [{} → {}{}]",
            s.fan_in,
            s.fan_out,
            if s.has_bias { ", bias" } else { "" }
        )
    };
    if metas.len() != got.len() {
        return Err(Error::LayerMismatch {
            op,
            expected: format!("{} traced layers", metas.len()),
            got: format!("{} layers", got.len()),
        });
    }
    for (m, (id, shape)) in metas.iter().zip(got) {
        if &m.id != id || &m.shape != shape {
            return Err(Error::LayerMismatch {
                op,
                expected: describe(&m.id, &m.shape),
                got: describe(id, shape),
            });
        }
    }
    Ok(())
}

/// Reads a layer's `[W | b]` in `f64`, checking it against `shape`.
pub(crate) fn read_params<F: Float>(
    layer: &dyn Traceable<F>,
    shape: &TracedShape,
    op: &'static str,
) -> Result<Array2<f64>> {
    let w = layer.weight();
    let b = layer.bias();
    if b.is_some() != shape.has_bias {
        return Err(Error::LayerMismatch {
            op,
            expected: format!("{} with has_bias = {}", layer.layer_id(), shape.has_bias),
            got: format!("bias present = {}", b.is_some()),
        });
    }
    let m = augmented(w.view(), b, shape.fan_out, shape.fan_in).ok_or_else(|| {
        Error::ShapeMismatch {
            op,
            expected: format!(
                "weight of {} values and bias of {}",
                shape.fan_out * shape.fan_in,
                shape.fan_out
            ),
            got: format!(
                "weight {}, bias {:?}",
                shape_str(w.shape()),
                b.map(|b| b.len())
            ),
        }
    })?;
    let values = m.as_slice().expect("invariant: standard layout");
    crate::error::check_finite(values, op, &format!("parameters of {}", layer.layer_id()))?;
    Ok(m)
}

/// Writes `[W | b]` matrices (as the ledger keeps them) into traced layers, e.g. to
/// evaluate the model at a segment boundary for the per-segment loss lens.
///
/// # Errors
/// [`Error::LayerMismatch`] or [`Error::ShapeMismatch`] when a layer does not
/// match its matrix.
///
/// # Example
/// ```
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::{Traceable, load_params, nn::DenseConfig};
/// let mut rng = StdRng::seed_from_u64(1);
/// let mut fc = DenseConfig::new(2, 1).build::<f64>("fc", &mut rng)?;
/// load_params(&mut [&mut fc as &mut dyn Traceable<f64>], &[ndarray::array![[1.0, 2.0, 3.0]]])?;
/// assert_eq!(fc.bias().unwrap()[0], 3.0);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
pub fn load_params<F: Float>(
    layers: &mut [&mut dyn Traceable<F>],
    params: &[Array2<f64>],
) -> Result<()> {
    const OP: &str = "load_params";
    if layers.len() != params.len() {
        return Err(Error::LayerMismatch {
            op: OP,
            expected: format!("{} layers", params.len()),
            got: format!("{} layers", layers.len()),
        });
    }
    for (layer, m) in layers.iter_mut().zip(params) {
        let shape = layer.traced_shape();
        if m.dim() != (shape.fan_out, shape.aug_in()) {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: shape_str(&[shape.fan_out, shape.aug_in()]),
                got: shape_str(m.shape()),
            });
        }
        let mut params = layer.params_mut();
        let write = |p: &mut ArrayViewMutD<'_, F>, values: &mut dyn Iterator<Item = f64>| {
            for (dst, v) in p.iter_mut().zip(values) {
                *dst = F::narrow(v);
            }
        };
        if let Some(w) = params.get_mut(0) {
            let mut it = m.rows().into_iter().flat_map(|r| {
                r.into_iter()
                    .take(shape.fan_in)
                    .copied()
                    .collect::<Vec<_>>()
            });
            write(&mut w.value, &mut it);
        }
        if shape.has_bias {
            if let Some(b) = params.get_mut(1) {
                let mut it = m.column(shape.fan_in).to_vec().into_iter();
                write(&mut b.value, &mut it);
            }
        }
    }
    Ok(())
}

impl<F: Float> Ledger<F> {
    /// Per global step group, the sum of its coefficients over `segments`.
    pub(crate) fn coef_table(&self, segments: &[&Segment]) -> Vec<f64> {
        let mut t = vec![0.0; self.n_groups as usize];
        for seg in segments {
            for (i, &c) in seg.coef.iter().enumerate() {
                t[seg.first_group as usize + i] += c;
            }
        }
        t
    }

    /// Finishes the storage for queries: densifies the sources whose rows outweigh
    /// the dense accounts they would need, drops rows of zero weight, and sorts
    /// rows and slots by source.
    pub(crate) fn compact(&mut self) {
        let all: Vec<&Segment> = self.segments.iter().collect();
        let total = self.coef_table(&all);
        for l in 0..self.layers.len() {
            let rows = &self.rows[l];
            let dense_bytes = rows.aug_in * rows.fan_out * 8;
            let mut n_rows = vec![0usize; self.sources.len()];
            let mut touched: Vec<std::collections::BTreeSet<usize>> =
                vec![Default::default(); self.sources.len()];
            for j in 0..rows.len() {
                let s = rows.source[j] as usize;
                n_rows[s] += 1;
                for (k, seg) in self.segments.iter().enumerate() {
                    if seg.coef_of(rows.group[j]) != 0.0 {
                        touched[s].insert(k);
                    }
                }
            }
            // Rows become dense once they outweigh the dense accounts they would
            // need (one per segment that weights them). A layer with several rows
            // per example and step (a convolution's positions) densifies once its
            // rows outweigh a single dense account: each of those rows is read at
            // every query position, so dense accounts are also the faster form.
            let mut per_term: HashMap<(u32, u32), usize> = HashMap::new();
            for j in 0..rows.len() {
                *per_term.entry((rows.source[j], rows.group[j])).or_default() += 1;
            }
            let multi_position = per_term.values().any(|&n| n > 1);
            let densify: Vec<bool> = (0..self.sources.len())
                .map(|s| {
                    let budget = if multi_position { 1 } else { touched[s].len() };
                    !touched[s].is_empty() && n_rows[s] * rows.row_bytes() > budget * dense_bytes
                })
                .collect();
            for j in 0..rows.len() {
                let s = rows.source[j];
                if !densify[s as usize] {
                    continue;
                }
                for seg in self.segments.iter_mut() {
                    let k = seg.coef_of(rows.group[j]);
                    if k != 0.0 {
                        let g = rows.sum(j, j + 1, |_| k);
                        seg.layers[l].add(s, g.view(), 1.0);
                    }
                }
            }
            let rows = &mut self.rows[l];
            let keep: Vec<bool> = (0..rows.len())
                .map(|j| !densify[rows.source[j] as usize] && total[rows.group[j] as usize] != 0.0)
                .collect();
            rows.retain_sorted(|j| keep[j]);
            for seg in self.segments.iter_mut() {
                seg.layers[l].sort();
            }
        }
    }

    /// Every source's whole account of layer `layer` (summed over segments) as
    /// one row: `[n_sources, fan_out · aug_in]`, `f64`. Memory: that many numbers.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for a bad layer index.
    pub fn account_matrix(&self, layer: usize) -> Result<Array2<f64>> {
        self.check_layer(layer, "Ledger::account_matrix")?;
        let (fan_out, aug_in) = self.initial[layer].dim();
        let mut m = Array2::<f64>::zeros((self.sources.len(), fan_out * aug_in));
        for seg in &self.segments {
            let acc = &seg.layers[layer];
            for k in 0..acc.n_slots() {
                let mut row = m.row_mut(acc.source[k] as usize);
                row += &ndarray::ArrayView1::from(
                    &acc.dense[k * fan_out * aug_in..(k + 1) * fan_out * aug_in],
                );
            }
        }
        let coef = self.coef_table(&self.segments.iter().collect::<Vec<_>>());
        let rows = &self.rows[layer];
        for j in 0..rows.len() {
            let k = coef[rows.group[j] as usize];
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
}
