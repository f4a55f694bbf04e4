//! Fully connected layer `z = W a + b`.

use ndarray::{Array1, Array2, ArrayD, ArrayView1, ArrayView3, ArrayViewD, Axis, Ix2};
use rand::Rng;

use super::{Init, Layer, as_2d};
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::trace::{LayerId, ParamId, ParamMut, Traceable, TracedShape};

/// Configuration of a [`Dense`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseConfig {
    /// Input features.
    pub in_features: usize,
    /// Output features.
    pub out_features: usize,
    /// Weight initialisation. Default: [`Init::He`].
    pub init: Init,
}

impl DenseConfig {
    /// A layer from `in_features` to `out_features`, He-initialised.
    pub fn new(in_features: usize, out_features: usize) -> Self {
        Self {
            in_features,
            out_features,
            init: Init::He,
        }
    }

    /// Sets the weight initialisation.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Builds the layer named `name`, drawing its weights from `rng`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when a size is zero.
    pub fn build<F: Float>(&self, name: &str, rng: &mut impl Rng) -> Result<Dense<F>> {
        let w = self.init.sample(
            (self.out_features, self.in_features),
            self.in_features,
            self.out_features,
            rng,
        )?;
        Dense::from_weights(name, w, Array1::zeros(self.out_features))
    }
}

/// Fully connected layer: `z = W a + b`, `W: [out_features, in_features]`.
///
/// # Shapes
/// input `[batch, in_features]` → output `[batch, out_features]`.
///
/// # Example
/// ```
/// use ndarray::array;
/// use refinement_ledger::nn::{Dense, Layer};
/// let mut fc = Dense::from_weights("fc", array![[1.0f32, 2.0], [0.0, -1.0]], array![0.5, 0.0])?;
/// let z = fc.forward(array![[1.0f32, 1.0]].into_dyn().view())?;
/// assert_eq!(z, array![[3.5f32, -1.0]].into_dyn());
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Dense<F: Float = f32> {
    id: LayerId,
    weight: Array2<F>,
    bias: Array1<F>,
    grad_weight: Array2<F>,
    grad_bias: Array1<F>,
    input: Option<Array2<F>>,
    delta: Option<Array2<F>>,
    /// Id of the backward pass `delta` comes from.
    pass: Option<u64>,
}

impl<F: Float> Dense<F> {
    /// A layer with the given weight `[out, in]` and bias `[out]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the bias length is not the weight's row count,
    /// [`Error::NonFinite`] when a value is NaN or infinite,
    /// [`Error::InvalidConfig`] when a dimension is zero.
    pub fn from_weights(name: &str, weight: Array2<F>, bias: Array1<F>) -> Result<Self> {
        let (out, inp) = weight.dim();
        if out == 0 || inp == 0 {
            return Err(Error::InvalidConfig {
                what: "dense weight",
                reason: format!("must have positive dimensions, found {:?}", weight.shape()),
            });
        }
        if bias.len() != out {
            return Err(Error::ShapeMismatch {
                op: "Dense::from_weights (bias)",
                expected: shape_str(&[out]),
                got: shape_str(bias.shape()),
            });
        }
        check_finite(&weight, "Dense::from_weights", "weight")?;
        check_finite(&bias, "Dense::from_weights", "bias")?;
        Ok(Self {
            id: LayerId::new(name),
            grad_weight: Array2::zeros(weight.raw_dim()),
            grad_bias: Array1::zeros(out),
            weight,
            bias,
            input: None,
            delta: None,
            pass: None,
        })
    }

    /// The weight `[out_features, in_features]`.
    pub fn weight_array(&self) -> &Array2<F> {
        &self.weight
    }

    /// The bias `[out_features]`.
    pub fn bias_array(&self) -> &Array1<F> {
        &self.bias
    }

    /// The weight gradient of the last backward pass.
    pub fn grad_weight(&self) -> &Array2<F> {
        &self.grad_weight
    }
}

impl<F: Float> Layer<F> for Dense<F> {
    fn name(&self) -> &str {
        &self.id.0
    }

    fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let x = as_2d(x, "Dense::forward", self.weight.ncols())?;
        check_finite(&x, "Dense::forward", "input")?;
        let z = x.dot(&self.weight.t()) + &self.bias;
        self.input = Some(x.to_owned());
        self.delta = None;
        self.pass = None;
        Ok(z.into_dyn())
    }

    fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let input = self.input.as_ref().ok_or_else(|| Error::NoForwardCache {
            layer: self.id.to_string(),
            op: "backward",
        })?;
        let got = shape_str(grad_out.shape());
        let delta = grad_out
            .into_dimensionality::<Ix2>()
            .ok()
            .filter(|d| d.dim() == (input.nrows(), self.weight.nrows()))
            .ok_or_else(|| Error::ShapeMismatch {
                op: "Dense::backward",
                expected: shape_str(&[input.nrows(), self.weight.nrows()]),
                got,
            })?;
        check_finite(&delta, "Dense::backward", "output gradient")?;
        self.grad_weight = delta.t().dot(input);
        self.grad_bias = delta.sum_axis(Axis(0));
        let grad_in = delta.dot(&self.weight);
        self.delta = Some(delta.to_owned());
        self.pass = Some(crate::trace::next_pass_id());
        Ok(grad_in.into_dyn())
    }

    fn as_traceable(&self) -> Option<&dyn Traceable<F>> {
        Some(self)
    }

    fn as_traceable_mut(&mut self) -> Option<&mut dyn Traceable<F>> {
        Some(self)
    }
}

impl<F: Float> Traceable<F> for Dense<F> {
    fn layer_id(&self) -> &LayerId {
        &self.id
    }

    fn traced_shape(&self) -> TracedShape {
        TracedShape {
            fan_in: self.weight.ncols(),
            fan_out: self.weight.nrows(),
            has_bias: true,
            weight_shape: self.weight.shape().to_vec(),
        }
    }

    fn weight(&self) -> ArrayViewD<'_, F> {
        self.weight.view().into_dyn()
    }

    fn bias(&self) -> Option<ArrayView1<'_, F>> {
        Some(self.bias.view())
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_, F>> {
        vec![
            ParamMut {
                id: ParamId::of(&self.id, "weight"),
                value: self.weight.view_mut().into_dyn(),
                grad: self.grad_weight.view().into_dyn(),
            },
            ParamMut {
                id: ParamId::of(&self.id, "bias"),
                value: self.bias.view_mut().into_dyn(),
                grad: self.grad_bias.view().into_dyn(),
            },
        ]
    }

    fn input_patches(&self) -> Result<ArrayView3<'_, F>> {
        self.input
            .as_ref()
            .map(|a| a.view().insert_axis(Axis(1)))
            .ok_or_else(|| Error::NoForwardCache {
                layer: self.id.to_string(),
                op: "input_patches",
            })
    }

    fn output_deltas(&self) -> Result<ArrayView3<'_, F>> {
        self.delta
            .as_ref()
            .map(|d| d.view().insert_axis(Axis(1)))
            .ok_or_else(|| Error::NoBackwardCache {
                layer: self.id.to_string(),
                op: "output_deltas",
            })
    }
    fn pass_id(&self) -> Option<u64> {
        self.pass
    }
}
