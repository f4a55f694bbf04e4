//! MNIST-format IDX files (MNIST, Fashion-MNIST), raw or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};

use super::Dataset;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::ExampleId;

/// Which part of an MNIST-format folder to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdxSplit {
    /// `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (60,000 examples).
    Train,
    /// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` (10,000 examples).
    Test,
}

impl IdxSplit {
    fn prefix(self) -> &'static str {
        match self {
            IdxSplit::Train => "train",
            IdxSplit::Test => "t10k",
        }
    }
}

fn bad(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::CorruptData {
        what: "IDX file",
        reason: format!("{}: {reason}", path.display()),
    }
}

/// The file `name` or `name.gz` in `dir`, decompressed.
fn read_maybe_gz(dir: &Path, name: &str) -> Result<(PathBuf, Vec<u8>)> {
    for (file, gz) in [(format!("{name}.gz"), true), (name.to_string(), false)] {
        let path = dir.join(&file);
        if !path.exists() {
            continue;
        }
        let raw = std::fs::read(&path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if !gz {
            return Ok((path, raw));
        }
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| bad(&path, format!("gzip: {e}")))?;
        return Ok((path, out));
    }
    Err(Error::Io {
        path: dir.join(name).display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {name} nor {name}.gz exists"),
        ),
    })
}

/// Parses an IDX file of unsigned bytes with `dims` dimensions: `(shape, data)`.
fn parse(path: &Path, bytes: &[u8], dims: u8) -> Result<(Vec<usize>, Vec<u8>)> {
    let header = 4 + 4 * dims as usize;
    if bytes.len() < header {
        return Err(bad(
            path,
            format!(
                "{} bytes, shorter than the {header}-byte header",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] != dims {
        return Err(bad(
            path,
            format!(
                "magic {:02x?}, expected [00, 00, 08, {dims:02x}] (unsigned bytes, {dims} dimensions)",
                &bytes[..4]
            ),
        ));
    }
    let shape: Vec<usize> = (0..dims as usize)
        .map(|i| {
            u32::from_be_bytes(
                bytes[4 + 4 * i..8 + 4 * i]
                    .try_into()
                    .expect("invariant: 4 bytes"),
            ) as usize
        })
        .collect();
    let n: usize = shape.iter().product();
    if bytes.len() != header + n {
        return Err(bad(
            path,
            format!(
                "shape {shape:?} needs {} bytes of data, found {}",
                n,
                bytes.len() - header
            ),
        ));
    }
    Ok((shape, bytes[header..].to_vec()))
}

impl<F: Float> Dataset<F> {
    /// Loads an MNIST-format split from `dir` (the IDX files, each raw or `.gz`):
    /// inputs `[n, rows·cols]` scaled to `[0, 1]`, labels 0–9, ids `0..n`.
    /// Debian's `dataset-fashion-mnist` installs Fashion-MNIST under
    /// `/usr/share/datasets/fashion-mnist/`.
    ///
    /// # Errors
    /// [`Error::Io`] when a file is missing or unreadable; [`Error::CorruptData`]
    /// for a wrong magic number, a size that does not match the header, labels
    /// above 9, or image and label counts that differ.
    pub fn load_idx(dir: &Path, split: IdxSplit) -> Result<Self> {
        let (ipath, ibytes) = read_maybe_gz(dir, &format!("{}-images-idx3-ubyte", split.prefix()))?;
        let (lpath, lbytes) = read_maybe_gz(dir, &format!("{}-labels-idx1-ubyte", split.prefix()))?;
        let (ishape, pixels) = parse(&ipath, &ibytes, 3)?;
        let (lshape, labels) = parse(&lpath, &lbytes, 1)?;
        if ishape[0] != lshape[0] {
            return Err(bad(
                &lpath,
                format!("{} labels for {} images", lshape[0], ishape[0]),
            ));
        }
        if let Some(&l) = labels.iter().find(|&&l| l > 9) {
            return Err(bad(&lpath, format!("label {l} out of range 0..10")));
        }
        let n = ishape[0];
        let x = ArrayD::from_shape_vec(
            IxDyn(&[n, ishape[1] * ishape[2]]),
            pixels
                .iter()
                .map(|&p| F::narrow(f64::from(p) / 255.0))
                .collect(),
        )?;
        Dataset::new(
            x,
            labels.into_iter().map(usize::from).collect(),
            (0..n as u64).map(ExampleId).collect(),
            10,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn loads_raw_and_gzip_files() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..2 * 2 * 3).map(|i| (i * 20) as u8).collect();
        std::fs::write(
            dir.path().join("train-images-idx3-ubyte.gz"),
            gz(&idx(&[2, 2, 3], &pixels)),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx(&[2], &[7, 3]),
        )
        .unwrap();
        let d = Dataset::<f32>::load_idx(dir.path(), IdxSplit::Train).unwrap();
        assert_eq!((d.len(), d.x().shape()), (2, &[2, 6][..]));
        assert_eq!(d.labels(), &[7, 3]);
        assert!((d.x()[[1, 0]] - 120.0 / 255.0).abs() < 1e-7);
    }

    #[test]
    fn missing_and_malformed_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = Dataset::<f32>::load_idx(dir.path(), IdxSplit::Test).unwrap_err();
        assert!(e.to_string().contains("t10k-images-idx3-ubyte"), "{e}");
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx(&[1, 2, 2], &[0, 1, 2]),
        )
        .unwrap();
        std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), idx(&[1], &[1])).unwrap();
        let e = Dataset::<f32>::load_idx(dir.path(), IdxSplit::Test).unwrap_err();
        assert!(
            e.to_string().contains("needs 4 bytes of data, found 3"),
            "{e}"
        );
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx(&[1, 2, 2], &[0, 1, 2, 3]),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            [0, 0, 8, 3, 0, 0, 0, 1, 1],
        )
        .unwrap();
        let e = Dataset::<f32>::load_idx(dir.path(), IdxSplit::Test).unwrap_err();
        assert!(e.to_string().contains("magic"), "{e}");
        std::fs::write(
            dir.path().join("t10k-labels-idx1-ubyte"),
            idx(&[2], &[1, 12]),
        )
        .unwrap();
        let e = Dataset::<f32>::load_idx(dir.path(), IdxSplit::Test).unwrap_err();
        assert!(e.to_string().contains("2 labels for 1 images"), "{e}");
    }
}
