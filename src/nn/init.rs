//! Seeded weight initialisation.

use ndarray::{Array, Dimension, IntoDimension};
use ndarray_rand::RandomExt;
use rand::Rng;
use rand_distr::{Normal, Uniform};
use serde::{Deserialize, Serialize};

use super::MAX_LAYER_PARAMS;
use crate::error::{Error, Result};
use crate::float::Float;

/// How a layer's weights are drawn. Biases start at zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Init {
    /// He (Kaiming) normal: `N(0, 2 / fan_in)`, for ReLU networks. The default.
    #[default]
    He,
    /// Xavier (Glorot) uniform: `U(±sqrt(6 / (fan_in + fan_out)))`, for tanh/sigmoid.
    Xavier,
}

impl Init {
    /// Draws an array of `shape` with the given fans from `rng`.
    pub(crate) fn sample<F: Float, D: Dimension>(
        self,
        shape: impl IntoDimension<Dim = D>,
        fan_in: usize,
        fan_out: usize,
        rng: &mut impl Rng,
    ) -> Result<Array<F, D>> {
        if fan_in == 0 || fan_out == 0 {
            return Err(Error::InvalidConfig {
                what: "layer size",
                reason: format!("must be positive, found fan_in {fan_in}, fan_out {fan_out}"),
            });
        }
        let shape = shape.into_dimension();
        match shape.size_checked() {
            Some(n) if n <= MAX_LAYER_PARAMS => {}
            _ => {
                return Err(Error::InvalidConfig {
                    what: "layer size",
                    reason: format!(
                        "a weight {:?} is more than {MAX_LAYER_PARAMS} values (the built-in \
                         layers' limit; 1 GiB in f32)",
                        shape.slice()
                    ),
                });
            }
        }
        let values: Array<f64, D> = match self {
            Init::He => {
                let std = (2.0 / fan_in as f64).sqrt();
                let dist = Normal::new(0.0, std).map_err(|e| Error::InvalidConfig {
                    what: "init",
                    reason: e.to_string(),
                })?;
                Array::random_using(shape, dist, rng)
            }
            Init::Xavier => {
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                let dist = Uniform::new(-bound, bound).map_err(|e| Error::InvalidConfig {
                    what: "init",
                    reason: e.to_string(),
                })?;
                Array::random_using(shape, dist, rng)
            }
        };
        Ok(values.mapv(F::narrow))
    }
}
