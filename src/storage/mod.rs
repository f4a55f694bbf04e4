//! Safetensors files with a format name, a version, a JSON payload and a CRC-32:
//! the shared plumbing of ledger and model files.

mod buf;
mod file;

pub(crate) use buf::Buf;
pub(crate) use file::{MappedFile, map_file, with_mapped, write_atomic};

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use ndarray::Array2;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::error::{Error, Result};
use crate::float::Float;

pub(crate) fn corrupt(reason: impl Into<String>) -> Error {
    Error::CorruptLedger {
        reason: reason.into(),
    }
}

/// A tensor to serialise: its bytes borrowed from the array that holds them
/// (little-endian platforms) or, failing that, converted.
pub(crate) struct Tensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

impl safetensors::View for &Tensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn float_dtype<T: Float>() -> Dtype {
    if T::DTYPE == "F32" {
        Dtype::F32
    } else {
        Dtype::F64
    }
}

/// A float tensor viewing `values` (no copy on little-endian platforms).
pub(crate) fn floats<T: Float>(values: &[T], shape: Vec<usize>) -> Tensor<'_> {
    let bytes = if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        let mut b = Vec::with_capacity(std::mem::size_of_val(values));
        values.iter().for_each(|v| v.write_le(&mut b));
        Cow::Owned(b)
    };
    Tensor {
        dtype: float_dtype::<T>(),
        shape,
        bytes,
    }
}

/// A float tensor from values in any layout (copied).
pub(crate) fn floats_owned<T: Float>(
    values: impl IntoIterator<Item = T>,
    shape: Vec<usize>,
) -> Tensor<'static> {
    let mut bytes = Vec::new();
    values.into_iter().for_each(|v| v.write_le(&mut bytes));
    Tensor {
        dtype: float_dtype::<T>(),
        shape,
        bytes: Cow::Owned(bytes),
    }
}

pub(crate) fn u32s(values: &[u32]) -> Tensor<'_> {
    let bytes = if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    };
    Tensor {
        dtype: Dtype::U32,
        shape: vec![values.len()],
        bytes,
    }
}

/// A `bf16` tensor viewing `values` (no copy on little-endian platforms).
pub(crate) fn bf16s(values: &[half::bf16], shape: Vec<usize>) -> Tensor<'_> {
    let bytes = if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    };
    Tensor {
        dtype: Dtype::BF16,
        shape,
        bytes,
    }
}

/// A matrix of any float type as a tensor (no copy when contiguous).
pub(crate) fn matrix<T: Float>(m: &Array2<T>) -> Tensor<'_> {
    match m.as_slice() {
        Some(v) => floats(v, m.shape().to_vec()),
        None => floats_owned(m.iter().copied(), m.shape().to_vec()),
    }
}

impl Tensor<'_> {
    /// Whether every value of a float tensor is finite (loading refuses the rest).
    fn is_finite(&self) -> bool {
        fn all<const N: usize>(bytes: &[u8], finite: impl Fn([u8; N]) -> bool) -> bool {
            bytes
                .chunks_exact(N)
                .all(|c| finite(c.try_into().expect("invariant: N bytes")))
        }
        match self.dtype {
            Dtype::F64 => match bytemuck::try_cast_slice::<u8, f64>(&self.bytes) {
                Ok(v) if cfg!(target_endian = "little") => v.iter().all(|x| x.is_finite()),
                _ => all(&self.bytes, |b| f64::from_le_bytes(b).is_finite()),
            },
            Dtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(&self.bytes) {
                Ok(v) if cfg!(target_endian = "little") => v.iter().all(|x| x.is_finite()),
                _ => all(&self.bytes, |b| f32::from_le_bytes(b).is_finite()),
            },
            Dtype::BF16 => all(&self.bytes, |b| half::bf16::from_le_bytes(b).is_finite()),
            _ => true,
        }
    }
}

/// Sorts `tensors` by name, checks that every float value is finite (a file
/// the loader would refuse is never written), and returns the metadata:
/// `format`, `version`, `payload` (JSON) and `crc32` over the payload and every
/// tensor's bytes in name order.
///
/// # Errors
/// [`Error::NonFinite`] naming the first tensor with NaN or infinity.
fn metadata(
    tensors: &mut [(String, Tensor<'_>)],
    format: &str,
    version: u32,
    payload: String,
) -> Result<HashMap<String, String>> {
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some((name, _)) = tensors.iter().find(|(_, t)| !t.is_finite()) {
        return Err(Error::NonFinite {
            op: "save",
            what: format!("tensor {name} (a file holding it could not be loaded back)"),
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(payload.as_bytes());
    for (_, t) in tensors.iter() {
        crc.update(&t.bytes);
    }
    Ok(HashMap::from([
        ("format".to_string(), format.to_string()),
        ("version".to_string(), version.to_string()),
        ("payload".to_string(), payload),
        ("crc32".to_string(), format!("{:08x}", crc.finalize())),
    ]))
}

/// Serialises `tensors` with their metadata (see [`metadata`]) into memory.
pub(crate) fn encode(
    mut tensors: Vec<(String, Tensor<'_>)>,
    format: &str,
    version: u32,
    payload: String,
) -> Result<Vec<u8>> {
    let meta = metadata(&mut tensors, format, version, payload)?;
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta))
        .map_err(|e| corrupt(format!("serialise: {e}")))
}

/// Writes `tensors` with their metadata to `path` atomically, streaming them
/// to the file (no in-memory copy of the whole file).
pub(crate) fn save_atomic(
    path: &Path,
    mut tensors: Vec<(String, Tensor<'_>)>,
    format: &str,
    version: u32,
    payload: String,
) -> Result<()> {
    let meta = metadata(&mut tensors, format, version, payload)?;
    write_atomic(path, |tmp| {
        safetensors::serialize_to_file(tensors.iter().map(|(n, t)| (n.clone(), t)), Some(meta), tmp)
            .map_err(|e| Error::Io {
                path: tmp.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            })
    })
}

/// Parses and checks a file written by [`encode`]; returns the tensors and the payload.
pub(crate) fn decode<'a>(
    bytes: &'a [u8],
    format: &str,
    version: u32,
) -> Result<(SafeTensors<'a>, String)> {
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
    if get("format")? != format {
        return Err(corrupt(format!(
            "format {:?}, expected {format:?}",
            get("format")?
        )));
    }
    if get("version")? != &version.to_string() {
        return Err(corrupt(format!(
            "version {:?}, this build reads version {version}",
            get("version")?
        )));
    }
    let payload = get("payload")?.clone();
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    let mut crc = crc32fast::Hasher::new();
    crc.update(payload.as_bytes());
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
    Ok((st, payload))
}

/// The safetensors dtype of `F`.
pub(crate) fn dtype<F: Float>() -> Dtype {
    if F::DTYPE == "F32" {
        Dtype::F32
    } else {
        Dtype::F64
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) st: &'a SafeTensors<'a>,
    /// The mapped file the tensors live in, to serve them without copying.
    pub(crate) map: Option<&'a std::sync::Arc<MappedFile>>,
}

impl Reader<'_> {
    pub(crate) fn tensor(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
    ) -> Result<TensorView<'_>> {
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
    pub(crate) fn leading(
        &self,
        name: &str,
        dtype: Dtype,
        rest: &[usize],
    ) -> Result<(usize, TensorView<'_>)> {
        let t = self
            .st
            .tensor(name)
            .map_err(|_| corrupt(format!("tensor {name} missing")))?;
        let n = t.shape().first().copied().unwrap_or(0);
        let mut shape = vec![n];
        shape.extend_from_slice(rest);
        Ok((n, self.tensor(name, dtype, &shape)?))
    }

    /// A `bf16` tensor of exactly `shape`, checked finite.
    pub(crate) fn bf16s(&self, name: &str, shape: &[usize]) -> Result<Vec<half::bf16>> {
        let t = self.tensor(name, Dtype::BF16, shape)?;
        let v: Vec<half::bf16> = t
            .data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]))
            .collect();
        if v.iter().all(|x| x.is_finite()) {
            Ok(v)
        } else {
            Err(corrupt(format!("tensor {name}: non-finite value")))
        }
    }

    pub(crate) fn floats<T: Float>(&self, t: &TensorView<'_>, name: &str) -> Result<Vec<T>> {
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

    /// A float tensor checked for finiteness, served from the map when possible.
    pub(crate) fn buf<T: Float>(&self, t: &TensorView<'_>, name: &str) -> Result<Buf<T>> {
        if let Some(b) = self.map.and_then(|m| Buf::<T>::mapped(m, t.data())) {
            crate::error::check_finite(&b[..], "Ledger::load", name)
                .map_err(|_| corrupt(format!("tensor {name}: non-finite value")))?;
            return Ok(b);
        }
        Ok(Buf::Owned(self.floats(t, name)?))
    }

    pub(crate) fn matrix(&self, name: &str, shape: (usize, usize)) -> Result<Array2<f64>> {
        let t = self.tensor(name, Dtype::F64, &[shape.0, shape.1])?;
        Ok(Array2::from_shape_vec(
            shape,
            self.floats::<f64>(&t, name)?,
        )?)
    }

    pub(crate) fn u32s(&self, name: &str, n: usize, below: u32, what: &str) -> Result<Vec<u32>> {
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
}
