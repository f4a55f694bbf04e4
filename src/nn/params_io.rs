//! Saving and loading a [`Sequential`]'s traced parameters.
//!
//! A safetensors file with one tensor per parameter, named by its dotted id
//! (`fc1.weight` `[out, in]`, `fc1.bias` `[out]`, `conv1.weight`
//! `[c_out, c_in, kh, kw]`), in the network's float type; header metadata
//! `format` = `refinement-ledger-model`, `version` = `1`, `payload` = the JSON
//! list of layer ids and shapes, and a CRC-32 — like ledger files.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::Sequential;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::storage::{Reader, corrupt, decode, dtype, floats_owned, save_atomic, with_mapped};
use crate::trace::{LayerId, TracedShape};

/// The model file format's name.
pub const MODEL_FORMAT: &str = "refinement-ledger-model";
/// The model file format's version.
pub const MODEL_VERSION: u32 = 1;

#[derive(Serialize, Deserialize, PartialEq)]
struct ModelHeader {
    dtype: String,
    layers: Vec<(LayerId, TracedShape)>,
}

impl<F: Float> Sequential<F> {
    fn header(&self) -> ModelHeader {
        ModelHeader {
            dtype: F::DTYPE.to_string(),
            layers: self
                .traceables()
                .iter()
                .map(|l| (l.layer_id().clone(), l.traced_shape()))
                .collect(),
        }
    }

    /// Saves the traced layers' parameters to `path` atomically.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    ///
    /// # Example
    /// ```
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::nn::{DenseConfig, Sequential};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let net = Sequential::<f32>::new().with(DenseConfig::new(3, 2).build("fc", &mut rng)?);
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("model.safetensors");
    /// net.save_params(&path)?;
    /// let mut other = Sequential::<f32>::new().with(DenseConfig::new(3, 2).build("fc", &mut StdRng::seed_from_u64(9))?);
    /// other.load_params(&path)?;
    /// assert_eq!(other.traceables()[0].weight(), net.traceables()[0].weight());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn save_params(&self, path: &Path) -> Result<()> {
        let mut tensors = Vec::new();
        for layer in self.traceables() {
            let id = layer.layer_id();
            let w = layer.weight();
            tensors.push((
                format!("{id}.weight"),
                floats_owned(w.iter().copied(), w.shape().to_vec()),
            ));
            if let Some(b) = layer.bias() {
                tensors.push((
                    format!("{id}.bias"),
                    floats_owned(b.iter().copied(), vec![b.len()]),
                ));
            }
        }
        let payload =
            serde_json::to_string(&self.header()).map_err(|e| corrupt(format!("header: {e}")))?;
        save_atomic(path, tensors, MODEL_FORMAT, MODEL_VERSION, payload)
    }

    /// Loads parameters saved by [`save_params`](Self::save_params) into this
    /// network, which must have the same traced layers (ids and shapes).
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::CorruptLedger`] for a corrupted or foreign file;
    /// [`Error::LayerMismatch`] when the file's layers are not this network's.
    /// On error the network is unchanged.
    pub fn load_params(&mut self, path: &Path) -> Result<()> {
        let values = with_mapped(path, |bytes| {
            let (st, payload) = decode(bytes, MODEL_FORMAT, MODEL_VERSION)?;
            let header: ModelHeader = serde_json::from_str(&payload)
                .map_err(|e| corrupt(format!("model header: {e}")))?;
            let mine = self.header();
            if header != mine {
                return Err(Error::LayerMismatch {
                    op: "Sequential::load_params",
                    expected: format!(
                        "{} layers {:?}",
                        mine.dtype,
                        mine.layers
                            .iter()
                            .map(|(id, s)| (id.0.clone(), s.weight_shape.clone()))
                            .collect::<Vec<_>>()
                    ),
                    got: format!(
                        "{} layers {:?}",
                        header.dtype,
                        header
                            .layers
                            .iter()
                            .map(|(id, s)| (id.0.clone(), s.weight_shape.clone()))
                            .collect::<Vec<_>>()
                    ),
                });
            }
            let reader = Reader { st: &st, map: None };
            let mut values: Vec<Vec<Vec<F>>> = Vec::new();
            for (id, shape) in &header.layers {
                let name = format!("{id}.weight");
                let w = reader.tensor(&name, dtype::<F>(), &shape.weight_shape)?;
                let mut layer = vec![reader.floats::<F>(&w, &name)?];
                if shape.has_bias {
                    let name = format!("{id}.bias");
                    let b = reader.tensor(&name, dtype::<F>(), &[shape.fan_out])?;
                    layer.push(reader.floats::<F>(&b, &name)?);
                }
                values.push(layer);
            }
            Ok(values)
        })?;
        for (layer, vals) in self.traceables_mut().into_iter().zip(values) {
            for (p, v) in layer.params_mut().into_iter().zip(vals) {
                let mut value = p.value;
                value.iter_mut().zip(v).for_each(|(dst, src)| *dst = src);
            }
        }
        Ok(())
    }
}
