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
//! Header metadata: `format` = `refinement-ledger`, `version` = `1`, `ledger` = a
//! JSON document (float type, layers, sources, segments' first group and step
//! count, number of groups), and `crc32` = the CRC-32 of the `ledger` JSON and
//! every tensor's bytes in name order (safetensors has no checksum of its own).
//!
//! Loading reads the file through a memory map and copies it into the ledger's
//! own arrays after checking it; queries then run on the in-memory ledger.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use ndarray::Array2;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use super::{DenseAccounts, LayerMeta, Ledger, Rows, Segment, SourceMeta};
use crate::{Error, Float, Result};

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

fn corrupt(reason: impl Into<String>) -> Error {
    Error::CorruptLedger {
        reason: reason.into(),
    }
}

/// An owned tensor to serialise.
struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn floats<T: Float>(values: impl IntoIterator<Item = T>, shape: Vec<usize>) -> Tensor {
    let mut bytes = Vec::new();
    for v in values {
        v.write_le(&mut bytes);
    }
    let dtype = if T::DTYPE == "F32" {
        Dtype::F32
    } else {
        Dtype::F64
    };
    Tensor {
        dtype,
        shape,
        bytes,
    }
}

fn u32s(values: &[u32]) -> Tensor {
    Tensor {
        dtype: Dtype::U32,
        shape: vec![values.len()],
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn matrix(m: &Array2<f64>) -> Tensor {
    floats(m.iter().copied(), m.shape().to_vec())
}

impl<F: Float> Ledger<F> {
    /// The ledger as the bytes of a safetensors file (see [`save`](Self::save)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`] if serialisation fails (it does not for a valid ledger).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (l, rows) in self.rows.iter().enumerate() {
            tensors.push((format!("layer.{l}.initial"), matrix(&self.initial[l])));
            tensors.push((
                format!("layer.{l}.rows.a"),
                floats(rows.a.iter().copied(), vec![rows.len(), rows.aug_in]),
            ));
            tensors.push((
                format!("layer.{l}.rows.d"),
                floats(rows.d.iter().copied(), vec![rows.len(), rows.fan_out]),
            ));
            tensors.push((format!("layer.{l}.rows.source"), u32s(&rows.source)));
            tensors.push((format!("layer.{l}.rows.group"), u32s(&rows.group)));
        }
        for (k, seg) in self.segments.iter().enumerate() {
            tensors.push((
                format!("segment.{k}.coef"),
                floats(seg.coef.iter().copied(), vec![seg.coef.len()]),
            ));
            for (l, acc) in seg.layers.iter().enumerate() {
                tensors.push((format!("segment.{k}.layer.{l}.end"), matrix(&seg.end[l])));
                tensors.push((
                    format!("segment.{k}.layer.{l}.dense"),
                    floats(
                        acc.dense.iter().copied(),
                        vec![acc.n_slots(), acc.fan_out, acc.aug_in],
                    ),
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
        let json = serde_json::to_string(&header).map_err(|e| corrupt(format!("header: {e}")))?;
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let mut crc = crc32fast::Hasher::new();
        crc.update(json.as_bytes());
        for (_, t) in &tensors {
            crc.update(&t.bytes);
        }
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("version".to_string(), VERSION.to_string()),
            ("ledger".to_string(), json),
            ("crc32".to_string(), format!("{:08x}", crc.finalize())),
        ]);
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta))
            .map_err(|e| corrupt(format!("serialise: {e}")))
    }

    /// Saves the ledger to `path` atomically (a temporary file in the same
    /// folder, synced, then renamed): an interrupted save never leaves a
    /// half-written ledger under `path`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error, p: &Path| Error::Io {
            path: p.display().to_string(),
            source: e,
        };
        let bytes = self.to_bytes()?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
        })?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, &tmp))?;
        f.write_all(&bytes).map_err(|e| io(e, &tmp))?;
        f.sync_all().map_err(|e| io(e, &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io(e, path))
    }

    /// Loads a ledger saved by [`save`](Self::save), reading the file through a
    /// memory map. Checks the format and version, the float type, the checksum,
    /// every shape, finiteness, and the consistency of indices.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be opened; [`Error::CorruptLedger`]
    /// for a truncated, corrupted or foreign file, or one saved with the other float type.
    pub fn load(path: &Path) -> Result<Self> {
        let io = |e: std::io::Error| Error::Io {
            path: path.display().to_string(),
            source: e,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and lives only for this call, during which
        // every value is copied out and checked (checksum, shapes, finiteness).
        // A file truncated or rewritten concurrently by another process is
        // outside this crate's control, as with any mapped file.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(&map)
    }

    /// Parses the bytes of a safetensors ledger (see [`load`](Self::load)).
    ///
    /// # Errors
    /// [`Error::CorruptLedger`] for anything that is not a valid ledger of float type `F`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| corrupt(format!("header: {e}")))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| corrupt(format!("tensors: {e}")))?;
        let info = meta
            .metadata()
            .as_ref()
            .ok_or_else(|| corrupt("no metadata"))?;
        let get = |k: &str| {
            info.get(k)
                .ok_or_else(|| corrupt(format!("metadata key {k:?} missing")))
        };
        if get("format")? != FORMAT {
            return Err(corrupt(format!(
                "format {:?}, expected {FORMAT:?}",
                get("format")?
            )));
        }
        if get("version")? != &VERSION.to_string() {
            return Err(corrupt(format!(
                "version {:?}, this build reads version {VERSION}",
                get("version")?
            )));
        }
        let json = get("ledger")?;
        let mut names: Vec<&str> = st.names();
        names.sort_unstable();
        let mut crc = crc32fast::Hasher::new();
        crc.update(json.as_bytes());
        for n in &names {
            crc.update(st.tensor(n).map_err(|e| corrupt(e.to_string()))?.data());
        }
        let want = format!("{:08x}", crc.finalize());
        if get("crc32")? != &want {
            return Err(corrupt(format!(
                "checksum {} does not match the data ({want})",
                get("crc32")?
            )));
        }
        let header: Header =
            serde_json::from_str(json).map_err(|e| corrupt(format!("ledger header: {e}")))?;
        if header.dtype != F::DTYPE {
            return Err(corrupt(format!(
                "float type {}, expected {}",
                header.dtype,
                F::DTYPE
            )));
        }
        Reader { st: &st }.ledger(header)
    }
}

struct Reader<'a> {
    st: &'a SafeTensors<'a>,
}

impl Reader<'_> {
    fn tensor(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<TensorView<'_>> {
        let t = self
            .st
            .tensor(name)
            .map_err(|_| corrupt(format!("tensor {name} missing")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(corrupt(format!(
                "tensor {name}: expected {dtype:?} {shape:?}, found {:?} {:?}",
                t.dtype(),
                t.shape()
            )));
        }
        Ok(t)
    }

    /// A tensor whose first dimension is free, the rest fixed.
    fn leading(&self, name: &str, dtype: Dtype, rest: &[usize]) -> Result<(usize, TensorView<'_>)> {
        let t = self
            .st
            .tensor(name)
            .map_err(|_| corrupt(format!("tensor {name} missing")))?;
        let n = t.shape().first().copied().unwrap_or(0);
        let mut shape = vec![n];
        shape.extend_from_slice(rest);
        Ok((n, self.tensor(name, dtype, &shape)?))
    }

    fn floats<T: Float>(&self, t: &TensorView<'_>, name: &str) -> Result<Vec<T>> {
        let v: Vec<T> = t
            .data()
            .chunks_exact(std::mem::size_of::<T>())
            .map(T::read_le)
            .collect();
        if v.iter().all(|x| x.is_finite()) {
            Ok(v)
        } else {
            Err(corrupt(format!("tensor {name}: non-finite value")))
        }
    }

    fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Array2<f64>> {
        let t = self.tensor(name, Dtype::F64, &[shape.0, shape.1])?;
        Ok(Array2::from_shape_vec(
            shape,
            self.floats::<f64>(&t, name)?,
        )?)
    }

    fn u32s(&self, name: &str, n: usize, below: u32, what: &str) -> Result<Vec<u32>> {
        let t = self.tensor(name, Dtype::U32, &[n])?;
        let v: Vec<u32> = t
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("invariant: 4 bytes")))
            .collect();
        if let Some(bad) = v.iter().find(|&&x| x >= below) {
            return Err(corrupt(format!(
                "tensor {name}: {what} {bad} out of range 0..{below}"
            )));
        }
        Ok(v)
    }

    fn ledger<F: Float>(&self, header: Header) -> Result<Ledger<F>> {
        let n_src = u32::try_from(header.sources.len()).map_err(|_| corrupt("too many sources"))?;
        let mut index = HashMap::new();
        for (i, s) in header.sources.iter().enumerate() {
            if index.insert(s.id, i as u32).is_some() {
                return Err(corrupt(format!("source {} listed twice", s.id)));
            }
        }
        let dt = if F::DTYPE == "F32" {
            Dtype::F32
        } else {
            Dtype::F64
        };
        let mut initial = Vec::new();
        let mut rows = Vec::new();
        for (l, m) in header.layers.iter().enumerate() {
            let (fo, ai) = (m.shape.fan_out, m.shape.aug_in());
            if fo == 0
                || m.shape.fan_in == 0
                || m.shape.weight_shape.iter().product::<usize>() != fo * m.shape.fan_in
            {
                return Err(corrupt(format!(
                    "layer {l}: inconsistent shape {:?}",
                    m.shape
                )));
            }
            initial.push(self.matrix(&format!("layer.{l}.initial"), (fo, ai))?);
            let (n, a) = self.leading(&format!("layer.{l}.rows.a"), dt, &[ai])?;
            let d = self.tensor(&format!("layer.{l}.rows.d"), dt, &[n, fo])?;
            let mut r = Rows::new(ai, fo);
            r.a = self.floats(&a, "rows.a")?;
            r.d = self.floats(&d, "rows.d")?;
            r.source = self.u32s(&format!("layer.{l}.rows.source"), n, n_src, "source")?;
            r.group = self.u32s(
                &format!("layer.{l}.rows.group"),
                n,
                header.n_groups,
                "group",
            )?;
            if !r.source.windows(2).all(|w| w[0] <= w[1]) {
                return Err(corrupt(format!("layer {l}: rows not sorted by source")));
            }
            r.sorted = true;
            rows.push(r);
        }
        let mut segments = Vec::new();
        for (k, sh) in header.segments.iter().enumerate() {
            let (len, c) = self.leading(&format!("segment.{k}.coef"), Dtype::F64, &[])?;
            if sh.first_group as u64 + len as u64 > header.n_groups as u64 {
                return Err(corrupt(format!(
                    "segment {k}: groups {}..{} beyond {}",
                    sh.first_group,
                    sh.first_group as usize + len,
                    header.n_groups
                )));
            }
            let mut seg = Segment::new(Vec::new(), sh.first_group, &header.layers);
            seg.coef = self.floats(&c, "coef")?;
            seg.n_steps = sh.n_steps;
            for (l, m) in header.layers.iter().enumerate() {
                let (fo, ai) = (m.shape.fan_out, m.shape.aug_in());
                seg.end
                    .push(self.matrix(&format!("segment.{k}.layer.{l}.end"), (fo, ai))?);
                let name = format!("segment.{k}.layer.{l}.dense");
                let (slots, dense) = self.leading(&name, Dtype::F64, &[fo, ai])?;
                let source = self.u32s(
                    &format!("segment.{k}.layer.{l}.dense_source"),
                    slots,
                    n_src,
                    "source",
                )?;
                let residual = self.matrix(&format!("segment.{k}.layer.{l}.residual"), (fo, ai))?;
                seg.layers[l] = DenseAccounts::from_parts(
                    ai,
                    fo,
                    source,
                    self.floats(&dense, &name)?,
                    residual,
                )
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
        let expected =
            5 * header.layers.len() + header.segments.len() * (1 + 4 * header.layers.len());
        if self.st.len() != expected {
            return Err(corrupt(format!(
                "{} tensors, expected {expected}",
                self.st.len()
            )));
        }
        Ok(Ledger {
            layers: header.layers,
            initial,
            sources: header.sources,
            index,
            rows,
            n_groups: header.n_groups,
            segments,
        })
    }
}
