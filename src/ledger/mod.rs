//! The ledger: per traced layer and per source, the sum of the updates credited
//! to that source, so that every query's refinement splits exactly into one
//! contribution per source.
//!
//! A ledger is written by an [`OptimizerHook`](crate::OptimizerHook) through
//! its booking interface (register a source, open a step group, credit rows and
//! dense accounts, close a segment, finish), which settles the residual in one
//! place, and read by the queries in [`crate::query`] through read-only
//! per-layer views. Nothing else touches its fields. It holds, per traced layer, the initial
//! parameters `[W₀ | b₀]`, and per *segment* of training (one by default, or
//! e.g. one per epoch) the parameters at the segment's end, the accounts of
//! every source and a residual for anything not credited. It balances:
//!
//! ```text
//! W₀ + Σ_segments (Σ_sources G + residual) = W_T
//! ```

pub(crate) mod accounts;
mod book;
mod merge;
mod online;
mod persist;
mod segment;
mod view;

pub use persist::{FORMAT, VERSION};
pub(crate) use view::{LayerView, Segments};

use std::collections::HashMap;

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, shape_str};
use crate::float::Float;
use crate::trace::{ExampleId, LayerId, SourceId, Traceable, TracedShape};
use accounts::{Rows, augmented};
use segment::Segment;

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

/// The exact record of who refined each traced layer.
///
/// Obtained from [`OptimizerHook::finish`](crate::OptimizerHook::finish) or
/// [`OptimizerHook::snapshot`](crate::OptimizerHook::snapshot); queried with
/// [`explain`](Self::explain), [`top_k_influences`](Self::top_k_influences),
/// [`class_attribution`](Self::class_attribution) and friends.
///
/// # Example
/// ```
/// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{ExampleId, LayerId, SourceId};
/// assert_eq!(ledger.layers().len(), 2);
/// assert_eq!(ledger.layer_index(&LayerId::new("fc2"))?, 1);
/// assert_eq!(ledger.sources().len(), 4); // one source per training example
/// assert_eq!(ledger.source_index(SourceId::Example(ExampleId(3)))?, 3);
/// assert_eq!(ledger.steps_per_segment(), vec![20, 20]); // a segment per 10 epochs
/// assert_eq!(ledger.segment_end_params(1, 0)?, ledger.final_params(0)?);
/// assert_eq!(ledger.initial_params(0)?.dim(), (4, 3));
/// assert!(ledger.bytes_per_layer().iter().all(|&b| b > 0));
/// assert_eq!(ledger.mapped_bytes(), 0); // in memory, not loaded from a file
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Ledger<F: Float = f32> {
    layers: Vec<LayerMeta>,
    initial: Vec<Array2<f64>>,
    sources: Vec<SourceMeta>,
    index: HashMap<SourceId, u32>,
    /// Factored rows per layer, over the whole run.
    rows: Vec<Rows<F>>,
    /// Step groups allocated so far.
    n_groups: u32,
    segments: Vec<Segment>,
    /// Per layer, the backward pass the last step booked (while tracing; not
    /// saved): a query built from that pass is stale.
    last_passes: Vec<Option<u64>>,
    /// The file the accounts are served from, after `load` (checked unchanged before reads).
    file: Option<std::sync::Arc<crate::storage::MappedFile>>,
    /// Online recording: the projection the accounts are kept in.
    online: Option<online::Online>,
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
            let weight_len = shape
                .weight_shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d));
            if shape.fan_in == 0
                || shape.fan_out == 0
                || weight_len != shape.fan_out.checked_mul(shape.fan_in)
            {
                return Err(Error::InvalidConfig {
                    what: "traced shape",
                    reason: format!(
                        "{id}: needs fan_in > 0, fan_out > 0 and a weight of fan_out × fan_in values, found {shape:?}"
                    ),
                });
            }
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
        let dims: Vec<(usize, usize)> = metas
            .iter()
            .map(|m| (m.shape.fan_out, m.shape.aug_in()))
            .collect();
        let segment = Segment::new(initial.clone(), 0, &dims);
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
            last_passes: Vec::new(),
            file: None,
            online: None,
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

    /// Whether any optimizer step was recorded.
    pub(crate) fn has_steps(&self) -> bool {
        self.segments.iter().any(|s| s.n_steps > 0)
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

/// A CRC-32 of the layers' `[W | b]` in `f64` (little-endian), in order: the
/// identity of a network's parameters, as the ledger keeps them.
pub(crate) fn params_checksum<'a>(params: impl IntoIterator<Item = &'a Array2<f64>>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for m in params {
        for v in m.iter() {
            h.update(&v.to_le_bytes());
        }
    }
    h.finalize()
}

impl<F: Float> Ledger<F> {
    /// The checksum of the final parameters (see [`params_checksum`]).
    pub(crate) fn final_checksum(&self) -> u32 {
        params_checksum(&self.segments[self.segments.len() - 1].end)
    }
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
