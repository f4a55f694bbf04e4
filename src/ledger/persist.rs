//! Saving and loading ledgers as safetensors files.
//!
//! Tensors (little-endian; `F` is the ledger's float type, `F32` or `F64`):
//!
//! | name | dtype | shape |
//! |---|---|---|
//! | `layer.{l}.initial` | F64 | `[fan_out, aug_in]` (`[W₀ | b₀]`) |
//! | `layer.{l}.rows.a` / `.rows.d` | F | `[n_rows, aug_in]` / `[n_rows, fan_out]` |
//! | `layer.{l}.rows.source` / `.rows.group` | U32 | `[n_rows]` |
//! | `segment.{k}.coef` | F64 | `[n_groups_in_segment]` |
//! | `segment.{k}.layer.{l}.end` | F64 | `[fan_out, aug_in]` |
//! | `segment.{k}.layer.{l}.dense` | F64 | `[n_slots, fan_out, aug_in]` |
//! | `segment.{k}.layer.{l}.dense_source` | U32 | `[n_slots]` |
//! | `segment.{k}.layer.{l}.residual` | F64 | `[fan_out, aug_in]` |
//!
//! Header metadata: `format` = `refinement-ledger`, `version` = `1`, `payload` = a
//! JSON document (float type, layers, sources, segments' first group and step
//! count, number of groups), and `crc32` = the CRC-32 of the `payload` JSON and
//! every tensor's bytes in name order (safetensors has no checksum of its own).
//!
//! [`Ledger::load`] memory-maps the file and, after checking it, serves the
//! factored rows and dense accounts straight from the map (no copy; the pages
//! are read on demand and can be dropped by the OS), so a ledger larger than
//! memory can be queried. [`Ledger::from_bytes`] copies instead.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use super::accounts::{DenseAccounts, Rows};
use super::segment::Segment;
use super::{LayerMeta, Ledger, SourceMeta};
use crate::error::Result;
use crate::float::Float;
use crate::storage::{
    MappedFile, Reader, Tensor, corrupt, decode, dtype, encode, floats, map_file, matrix,
    save_atomic, u32s,
};
use crate::trace::MAX_CLASSES;

/// The file format's name, in the header.
pub const FORMAT: &str = "refinement-ledger";
/// The file format's version, in the header.
pub const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Header {
    dtype: String,
    layers: Vec<LayerMeta>,
    sources: Vec<SourceMeta>,
    n_groups: u32,
    segments: Vec<SegmentHeader>,
}

#[derive(Serialize, Deserialize)]
struct SegmentHeader {
    first_group: u32,
    n_steps: u64,
}

impl<F: Float> Ledger<F> {
    /// The ledger as the bytes of a safetensors file (see [`save`](Self::save)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`](crate::Error::CorruptLedger) if serialisation fails (it does not for a valid ledger).
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Ledger;
    /// let bytes = ledger.to_bytes()?;
    /// let back = Ledger::<f64>::from_bytes(&bytes)?;
    /// assert_eq!(back.sources(), ledger.sources());
    /// // A flipped bit is an error, never another ledger.
    /// let mut bad = bytes.clone();
    /// let last = bad.len() - 1;
    /// bad[last] ^= 1;
    /// assert!(Ledger::<f64>::from_bytes(&bad).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let (tensors, json) = self.tensors()?;
        encode(tensors, FORMAT, VERSION, json)
    }

    /// Every stored array (borrowed) and the JSON header.
    fn tensors(&self) -> Result<(Vec<(String, Tensor<'_>)>, String)> {
        let (tensors, header) = self.stored_parts(false)?;
        let json = serde_json::to_string(&header).map_err(|e| corrupt(format!("header: {e}")))?;
        Ok((tensors, json))
    }

    /// The ledger as it stands while training — rows in step order, the last
    /// segment still open — as tensors and a header, for a checkpoint (see
    /// [`OptimizerHook::save_checkpoint`](crate::OptimizerHook::save_checkpoint)).
    pub(crate) fn open_parts(&self) -> Result<(Vec<(String, Tensor<'_>)>, serde_json::Value)> {
        let (tensors, header) = self.stored_parts(true)?;
        let json = serde_json::to_value(&header).map_err(|e| corrupt(format!("header: {e}")))?;
        Ok((tensors, json))
    }

    /// A ledger saved by [`open_parts`](Self::open_parts), and how many
    /// tensors of the file are its. Checked as [`load`](Self::load) checks,
    /// except that rows and the open segment's slots may be in step order and
    /// the open segment is not balanced yet (it is when it closes).
    pub(crate) fn from_open_parts(
        reader: &Reader<'_>,
        header: serde_json::Value,
    ) -> Result<(Self, usize)> {
        let header: Header =
            serde_json::from_value(header).map_err(|e| corrupt(format!("ledger header: {e}")))?;
        if header.dtype != F::DTYPE {
            return Err(corrupt(format!(
                "float type {}, expected {}",
                header.dtype,
                F::DTYPE
            )));
        }
        let n = expected_tensors(&header);
        Ok((read_ledger(reader, header, true)?, n))
    }

    /// Every stored array (borrowed) and the header.
    fn stored_parts(&self, open: bool) -> Result<(Vec<(String, Tensor<'_>)>, Header)> {
        self.check_file()?;
        let closed = self.segments.len() - usize::from(open);
        self.check_balance(
            closed,
            "refusing to write a file that could not be loaded back: ",
        )?;
        let mut tensors: Vec<(String, Tensor<'_>)> = Vec::new();
        for (l, rows) in self.rows.iter().enumerate() {
            tensors.push((format!("layer.{l}.initial"), matrix(&self.initial[l])));
            tensors.push((
                format!("layer.{l}.rows.a"),
                floats(&rows.a, vec![rows.len(), rows.aug_in]),
            ));
            tensors.push((
                format!("layer.{l}.rows.d"),
                floats(&rows.d, vec![rows.len(), rows.fan_out]),
            ));
            tensors.push((format!("layer.{l}.rows.source"), u32s(&rows.source)));
            tensors.push((format!("layer.{l}.rows.group"), u32s(&rows.group)));
        }
        for (k, seg) in self.segments.iter().enumerate() {
            tensors.push((
                format!("segment.{k}.coef"),
                floats(&seg.coef, vec![seg.coef.len()]),
            ));
            for (l, acc) in seg.layers.iter().enumerate() {
                tensors.push((format!("segment.{k}.layer.{l}.end"), matrix(&seg.end[l])));
                tensors.push((
                    format!("segment.{k}.layer.{l}.dense"),
                    floats(&acc.dense, vec![acc.n_slots(), acc.fan_out, acc.aug_in]),
                ));
                tensors.push((
                    format!("segment.{k}.layer.{l}.dense_source"),
                    u32s(&acc.source),
                ));
                tensors.push((
                    format!("segment.{k}.layer.{l}.residual"),
                    matrix(&acc.residual),
                ));
            }
        }
        let header = Header {
            dtype: F::DTYPE.to_string(),
            layers: self.layers.clone(),
            sources: self.sources.clone(),
            n_groups: self.n_groups,
            segments: self
                .segments
                .iter()
                .map(|s| SegmentHeader {
                    first_group: s.first_group,
                    n_steps: s.n_steps,
                })
                .collect(),
        };
        Ok((tensors, header))
    }

    /// Saves the ledger to `path` atomically (a temporary file in the same
    /// folder, synced, then renamed): an interrupted save never leaves a
    /// half-written ledger under `path`.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the file cannot be written.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Ledger, Lens, Query};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("run.ledger");
    /// ledger.save(&path)?;
    /// let loaded = Ledger::<f64>::load(&path)?; // memory-mapped
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// assert_eq!(loaded.scores(&q, Lens::Cos, LayerSel::All)?, ledger.scores(&q, Lens::Cos, LayerSel::All)?);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn save(&self, path: &Path) -> Result<()> {
        let (tensors, json) = self.tensors()?;
        save_atomic(path, tensors, FORMAT, VERSION, json)
    }

    /// Loads a ledger saved by [`save`](Self::save), reading the file through a
    /// memory map. Checks the format and version, the float type, the checksum,
    /// every shape (with checked arithmetic), finiteness, the consistency of
    /// indices, and that every segment balances.
    ///
    /// The accounts stay in the file (pages are read on demand), so the file
    /// must stay as it is while the ledger is used: every query, save or merge
    /// first checks that its size and modification time are unchanged and
    /// returns [`Error::Io`](crate::Error::Io) if not (re-load it). A file
    /// replaced by [`save`](Self::save) (a rename) leaves this ledger on the old
    /// contents; truncating or rewriting it in place *during* a query is outside
    /// what the check can catch.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the file cannot be opened; [`Error::CorruptLedger`](crate::Error::CorruptLedger)
    /// for a truncated, corrupted or foreign file, or one saved with the other float type.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Ledger;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("run.ledger");
    /// ledger.save(&path)?;
    /// let loaded = Ledger::<f64>::load(&path)?;
    /// assert_eq!(loaded.parameter_balance(), ledger.parameter_balance());
    /// assert!(loaded.mapped_bytes() > 0);
    /// // The other float type, or a file that is not a ledger, is an error.
    /// assert!(Ledger::<f32>::load(&path).is_err());
    /// std::fs::write(&path, b"not a ledger").unwrap();
    /// assert!(Ledger::<f64>::load(&path).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn load(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let mut ledger = Self::parse(&map, Some(&map))?;
        ledger.file = Some(map);
        Ok(ledger)
    }

    /// Parses the bytes of a safetensors ledger (see [`load`](Self::load)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`](crate::Error::CorruptLedger) for anything that is not a valid ledger of float type `F`.
    ///
    /// # Example
    /// ```
    /// # let (ledger, _net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Ledger;
    /// let back = Ledger::<f64>::from_bytes(&ledger.to_bytes()?)?;
    /// assert_eq!(back.steps_per_segment(), ledger.steps_per_segment());
    /// assert!(Ledger::<f64>::from_bytes(&[0u8; 16]).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        Self::parse(bytes, None)
    }

    /// Parses `bytes`, serving large tensors from `map` (which holds `bytes`) when given.
    fn parse(bytes: &[u8], map: Option<&std::sync::Arc<MappedFile>>) -> Result<Self> {
        let (st, json) = decode(bytes, FORMAT, VERSION)?;
        let header: Header =
            serde_json::from_str(&json).map_err(|e| corrupt(format!("ledger header: {e}")))?;
        if header.dtype != F::DTYPE {
            return Err(corrupt(format!(
                "float type {}, expected {}",
                header.dtype,
                F::DTYPE
            )));
        }
        if st.len() != expected_tensors(&header) {
            return Err(corrupt(format!(
                "{} tensors, expected {}",
                st.len(),
                expected_tensors(&header)
            )));
        }
        read_ledger(&Reader { st: &st, map }, header, false)
    }
}

/// The number of tensors a ledger with `header` is stored in.
fn expected_tensors(header: &Header) -> usize {
    5 * header.layers.len() + header.segments.len() * (1 + 4 * header.layers.len())
}

/// A ledger from a decoded file: every tensor checked against the header.
/// `open`: a ledger still training (rows and the last segment's slots in step
/// order, the last segment not yet balanced).
fn read_ledger<F: Float>(reader: &Reader<'_>, header: Header, open: bool) -> Result<Ledger<F>> {
    let n_src = u32::try_from(header.sources.len()).map_err(|_| corrupt("too many sources"))?;
    let mut index = HashMap::new();
    for (i, s) in header.sources.iter().enumerate() {
        if index.insert(s.id, i as u32).is_some() {
            return Err(corrupt(format!("source {} listed twice", s.id)));
        }
        if let Some(label) = s.label.filter(|&c| c >= MAX_CLASSES) {
            return Err(corrupt(format!(
                "source {} has label {label}, expected below {MAX_CLASSES}",
                s.id
            )));
        }
    }
    let dt = dtype::<F>();
    let mut initial = Vec::new();
    let mut rows = Vec::new();
    for (l, m) in header.layers.iter().enumerate() {
        // Checked arithmetic: the header is untrusted until its tensors agree.
        let (fo, fi) = (m.shape.fan_out, m.shape.fan_in);
        let weight = m
            .shape
            .weight_shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        let ai = fi.checked_add(usize::from(m.shape.has_bias));
        let size = ai.and_then(|ai| ai.checked_mul(fo)?.checked_mul(8));
        if fo == 0 || fi == 0 || size.is_none() || weight != fo.checked_mul(fi) {
            return Err(corrupt(format!(
                "layer {l}: inconsistent shape {:?}",
                m.shape
            )));
        }
        let ai = m.shape.aug_in();
        initial.push(reader.matrix(&format!("layer.{l}.initial"), (fo, ai))?);
        let (n, a) = reader.leading(&format!("layer.{l}.rows.a"), dt, &[ai])?;
        let d = reader.tensor(&format!("layer.{l}.rows.d"), dt, &[n, fo])?;
        let mut r = Rows::new(ai, fo);
        r.a = reader.buf(&a, "rows.a")?;
        r.d = reader.buf(&d, "rows.d")?;
        r.source = reader.u32s(&format!("layer.{l}.rows.source"), n, n_src, "source")?;
        r.group = reader.u32s(
            &format!("layer.{l}.rows.group"),
            n,
            header.n_groups,
            "group",
        )?;
        r.sorted = r.source.windows(2).all(|w| w[0] <= w[1]);
        if !r.sorted && !open {
            return Err(corrupt(format!("layer {l}: rows not sorted by source")));
        }
        rows.push(r);
    }
    let mut segments = Vec::new();
    for (k, sh) in header.segments.iter().enumerate() {
        let (len, c) = reader.leading(&format!("segment.{k}.coef"), Dtype::F64, &[])?;
        if sh.first_group as u64 + len as u64 > header.n_groups as u64 {
            return Err(corrupt(format!(
                "segment {k}: groups {}..{} beyond {}",
                sh.first_group,
                sh.first_group as usize + len,
                header.n_groups
            )));
        }
        let dims: Vec<(usize, usize)> = header
            .layers
            .iter()
            .map(|m| (m.shape.fan_out, m.shape.aug_in()))
            .collect();
        let mut seg = Segment::new(Vec::new(), sh.first_group, &dims);
        seg.coef = reader.floats(&c, "coef")?;
        seg.n_steps = sh.n_steps;
        for (l, m) in header.layers.iter().enumerate() {
            let (fo, ai) = (m.shape.fan_out, m.shape.aug_in());
            seg.end
                .push(reader.matrix(&format!("segment.{k}.layer.{l}.end"), (fo, ai))?);
            let name = format!("segment.{k}.layer.{l}.dense");
            let (slots, dense) = reader.leading(&name, Dtype::F64, &[fo, ai])?;
            let source = reader.u32s(
                &format!("segment.{k}.layer.{l}.dense_source"),
                slots,
                n_src,
                "source",
            )?;
            let residual = reader.matrix(&format!("segment.{k}.layer.{l}.residual"), (fo, ai))?;
            let sorted = !open || k + 1 < header.segments.len();
            let dense = reader.buf(&dense, &name)?;
            seg.layers[l] = DenseAccounts::from_parts(ai, fo, source, dense, residual, sorted)
                .ok_or_else(|| {
                    corrupt(format!(
                        "segment {k} layer {l}: dense sources not strictly ascending"
                    ))
                })?;
        }
        segments.push(seg);
    }
    if segments.is_empty() || header.layers.is_empty() {
        return Err(corrupt("no layers or no segments"));
    }
    // Step groups are opened in the last segment: its coefficients end at the
    // last group (so `n_groups` is bounded by a tensor in the file).
    let last = &segments[segments.len() - 1];
    if last.first_group as usize + last.coef.len() != header.n_groups as usize {
        return Err(corrupt(format!(
            "{} step groups, but the last segment's coefficients end at group {}",
            header.n_groups,
            last.first_group as usize + last.coef.len()
        )));
    }
    let ledger = Ledger {
        layers: header.layers,
        initial,
        sources: header.sources,
        index,
        rows,
        n_groups: header.n_groups,
        segments,
        last_passes: Vec::new(),
        file: None,
        online: None,
    };
    // What loads balances: an edited account, residual or coefficient (with a
    // valid checksum) is an error, not a ledger that no longer adds up.
    let closed = ledger.segments.len() - usize::from(open);
    ledger.check_balance(closed, "")?;
    Ok(ledger)
}

impl<F: Float> Ledger<F> {
    /// Checks that the first `n` segments balance as [`Ledger::load`] requires:
    /// a save checks it too, so that a ledger whose values have grown beyond
    /// what `f64` can add up (finite, but 1e200 next to 1) is refused when
    /// written rather than when read back.
    fn check_balance(&self, n: usize, when: &str) -> Result<()> {
        for l in 0..self.layers.len() {
            for k in 0..n {
                let (err, change, size) = self.segment_balance(l, k);
                // Relative to the change, with room for rounding relative to the
                // parameters themselves (a change far smaller than the weights).
                let within = err <= LOAD_BALANCE_TOLERANCE * change + 1e-12 * size;
                if !within || err.is_nan() {
                    return Err(corrupt(format!(
                        "{when}layer {l}, segment {k} does not balance: start + Σ G + residual differs from the end by {err:e} (change {change:e})"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The parameter balance a loaded ledger must meet (relative to the
/// parameters' total change; saved ledgers balance to about 1e-15).
const LOAD_BALANCE_TOLERANCE: f64 = 1e-6;
