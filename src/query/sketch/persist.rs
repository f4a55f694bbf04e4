//! Saving and loading sketches: safetensors with a versioned JSON header and a
//! CRC-32 over everything.

use std::path::Path;

use ndarray::Array1;
use serde::{Deserialize, Serialize};

use super::project::{MAX_OPERATOR_VALUES, operator_values};
use super::{LedgerSketch, Projection, Projector};
use crate::error::Result;
use crate::ledger::{LayerMeta, SourceMeta};
use crate::storage::{Reader, bf16s, decode, floats, matrix, save_atomic, with_mapped};

/// The sketch file's format name and version.
const SKETCH_FORMAT: &str = "refinement-ledger-sketch";
const SKETCH_VERSION: u32 = 2;

/// What a sketch file's JSON payload holds besides its tensors.
#[derive(Serialize, Deserialize)]
struct SketchHeader {
    layers: Vec<LayerMeta>,
    sources: Vec<SourceMeta>,
    seed: u64,
    dims: Vec<usize>,
    exact_bytes: Vec<usize>,
    /// Absent in files of version 1 (tensor sketches).
    #[serde(default)]
    projection: Projection,
    /// Per layer, the Kronecker projection's `k_out` (empty for a tensor sketch).
    #[serde(default)]
    k_out: Vec<usize>,
}

impl LedgerSketch {
    /// Saves the sketch to `path` atomically, as safetensors (per layer the
    /// `bf16` sketch `[N, k]`, the parameter change and the residual's sketch in
    /// `f64`; sources, layers, seed and dimensions in a versioned JSON header;
    /// a CRC-32 over everything).
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the file cannot be written.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query, query::{LedgerSketch, SketchConfig}};
    /// let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(8))?;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("run.sketch");
    /// sketch.save(&path)?;
    /// let back = LedgerSketch::load(&path)?;
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// assert_eq!(back.scores(&q, Lens::Dot, LayerSel::All)?, sketch.scores(&q, Lens::Dot, LayerSel::All)?);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = SketchHeader {
            layers: self.layers.clone(),
            sources: self.sources.clone(),
            seed: self.seed,
            dims: self.dims.clone(),
            exact_bytes: self.exact_bytes.clone(),
            projection: self.projection,
            k_out: match self.projection {
                Projection::Tensor => Vec::new(),
                Projection::Kronecker => self.projectors.iter().map(Projector::k_out).collect(),
            },
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
    /// [`Error::Io`](crate::Error::Io) when the file cannot be opened; [`Error::CorruptLedger`](crate::Error::CorruptLedger)
    /// for a truncated, corrupted or foreign file.
    ///
    /// # Example
    /// ```
    /// use refinement_ledger::query::LedgerSketch;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("missing.sketch");
    /// assert!(LedgerSketch::load(&path).is_err());
    /// ```
    pub fn load(path: &Path) -> Result<Self> {
        with_mapped(path, Self::from_bytes)
    }

    /// Parses the bytes of a saved sketch (see [`load`](Self::load)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`](crate::Error::CorruptLedger) for anything that is not a valid sketch.
    ///
    /// # Example
    /// ```
    /// use refinement_ledger::query::LedgerSketch;
    /// assert!(LedgerSketch::from_bytes(b"not a sketch").is_err());
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        // Version 1 files are tensor sketches without the projection fields.
        let (st, json) = match decode(bytes, SKETCH_FORMAT, SKETCH_VERSION) {
            Ok(v) => v,
            Err(e) => decode(bytes, SKETCH_FORMAT, 1).map_err(|_| e)?,
        };
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
        for (l, (&k, meta)) in h.dims.iter().zip(&h.layers).enumerate() {
            // Checked: never more dimensions than `build` allows, whatever the
            // header says (the query operators are `k × (fan_out + aug_in)`).
            let full = meta
                .shape
                .fan_in
                .checked_add(usize::from(meta.shape.has_bias))
                .and_then(|ai| ai.checked_mul(meta.shape.fan_out));
            if full.is_none_or(|full| k > super::max_dims(full)) || meta.shape.fan_out == 0 {
                return Err(crate::storage::corrupt(format!(
                    "sketch layer {l}: {k} dimensions for a {:?} layer",
                    meta.shape
                )));
            }
        }
        let kronecker = h.projection == Projection::Kronecker;
        if kronecker != (h.k_out.len() == n_layers) || (!kronecker && !h.k_out.is_empty()) {
            return Err(crate::storage::corrupt(format!(
                "sketch header: a {:?} projection with {} Kronecker sides for {n_layers} layers",
                h.projection,
                h.k_out.len()
            )));
        }
        let mut splits = Vec::with_capacity(n_layers);
        for (l, (&k, meta)) in h.dims.iter().zip(&h.layers).enumerate() {
            let (fan_out, aug_in) = (meta.shape.fan_out, meta.shape.aug_in());
            let split = if kronecker {
                let k_out = h.k_out[l];
                let fits = k_out >= 1 && k_out <= fan_out && k % k_out == 0;
                if !fits || k / k_out > aug_in {
                    return Err(crate::storage::corrupt(format!(
                        "sketch layer {l}: {k} dimensions cannot split with k_out = {k_out} for a {fan_out} × {aug_in} layer"
                    )));
                }
                (k_out, k / k_out)
            } else {
                (k, k)
            };
            if operator_values(h.projection, split, fan_out, aug_in)
                .is_none_or(|v| v > MAX_OPERATOR_VALUES)
            {
                return Err(crate::storage::corrupt(format!(
                    "sketch layer {l}: projection operators for {k} dimensions of a {fan_out} × {aug_in} layer exceed {MAX_OPERATOR_VALUES} values"
                )));
            }
            splits.push(split);
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
        // Built once every tensor is known to be there: the file bounds the sizes.
        let projectors = (h.layers.iter().zip(splits).enumerate())
            .map(|(l, (meta, split))| {
                let (fan_out, aug_in) = (meta.shape.fan_out, meta.shape.aug_in());
                Projector::new(h.projection, h.seed, l, split, fan_out, aug_in)
            })
            .collect();
        Ok(Self {
            layers: h.layers,
            sources: h.sources,
            seed: h.seed,
            projection: h.projection,
            dims: h.dims,
            projectors,
            change,
            sketch,
            residual,
            exact_bytes: h.exact_bytes,
        })
    }
}
