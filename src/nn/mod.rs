//! A small built-in network on ndarray, so the crate works out of the box.
//!
//! Layers: [`Dense`], [`Conv2d`] (both [`Traceable`]), [`Relu`], [`Tanh`],
//! [`Sigmoid`], [`MaxPool2d`], [`Flatten`], stacked in a [`Sequential`]; loss:
//! [`SoftmaxCrossEntropy`]. Inputs are batch first: `[batch, features]` or
//! `[batch, channels, h, w]`.

mod activation;
mod conv2d;
mod dense;
mod init;
mod loss;
mod params_io;
mod pool;

pub use activation::{Relu, Sigmoid, Tanh};
pub use conv2d::{Conv2d, Conv2dConfig};
pub use dense::{Dense, DenseConfig};
pub use init::Init;
pub use loss::{LossOutput, Reduction, SoftmaxCrossEntropy, softmax};
pub use params_io::{MODEL_FORMAT, MODEL_VERSION};
pub use pool::{Flatten, MaxPool2d};

/// Most values a built-in layer's weight may hold (2^28): building a larger
/// one is an [`Error::InvalidConfig`], not an
/// allocation failure.
pub const MAX_LAYER_PARAMS: usize = 1 << 28;

use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewD, AsArray, Dimension, Ix2};

use crate::error::{Error, Result, shape_str};
use crate::float::Float;
use crate::trace::Traceable;

/// A network layer with a batched forward and backward pass.
///
/// `backward` takes `∂L/∂output` of the last `forward` and returns `∂L/∂input`,
/// storing parameter gradients inside the layer.
pub trait Layer<F: Float = f32>: Send {
    /// A short name for messages (`"relu"`, or the layer id of a traced layer).
    fn name(&self) -> &str;
    /// Forward pass on a batch; caches what `backward` needs.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::NonFinite`] for bad input.
    fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>>;
    /// Backward pass for the last forward.
    ///
    /// # Errors
    /// [`Error::NoForwardCache`] before any forward, [`Error::ShapeMismatch`]
    /// when the gradient's shape is not the output's.
    fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>>;
    /// This layer as a [`Traceable`], if its parameters are traced.
    fn as_traceable(&self) -> Option<&dyn Traceable<F>> {
        None
    }
    /// This layer as a mutable [`Traceable`], if its parameters are traced.
    fn as_traceable_mut(&mut self) -> Option<&mut dyn Traceable<F>> {
        None
    }
}

/// Views `x` as `[batch, features]`, checking the feature count.
pub(crate) fn as_2d<'a, F: Float>(
    x: ArrayViewD<'a, F>,
    op: &'static str,
    features: usize,
) -> Result<ArrayView2<'a, F>> {
    let shape = x.shape().to_vec();
    x.into_dimensionality::<Ix2>()
        .ok()
        .filter(|x| x.ncols() == features && x.nrows() > 0)
        .ok_or_else(|| Error::ShapeMismatch {
            op,
            expected: format!("[batch>0, {features}]"),
            got: shape_str(&shape),
        })
}

/// Layers applied in order.
///
/// # Example
/// ```
/// use ndarray::Array2;
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f32>::new()
///     .with(DenseConfig::new(4, 8).build("fc1", &mut rng)?)
///     .with(Relu::new())
///     .with(DenseConfig::new(8, 3).build("fc2", &mut rng)?);
/// let loss = net.train_batch(Array2::<f32>::ones((2, 4)).view().into_dyn(), &[0, 2])?;
/// assert!(loss.is_finite());
/// assert_eq!(net.traceables().len(), 2);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Default)]
pub struct Sequential<F: Float = f32> {
    layers: Vec<Box<dyn Layer<F>>>,
    loss: SoftmaxCrossEntropy,
}

impl<F: Float> Sequential<F> {
    /// An empty network with mean softmax cross-entropy.
    pub fn new() -> Self {
        Self {
            layers: Vec::new(),
            loss: SoftmaxCrossEntropy::default(),
        }
    }

    /// Appends a layer.
    pub fn with(mut self, layer: impl Layer<F> + 'static) -> Self {
        self.layers.push(Box::new(layer));
        self
    }

    /// Appends a boxed layer.
    pub fn push(&mut self, layer: Box<dyn Layer<F>>) {
        self.layers.push(layer);
    }

    /// The layers, in order.
    pub fn layers(&self) -> &[Box<dyn Layer<F>>] {
        &self.layers
    }

    /// Forward pass of a batch through every layer; returns the logits. The
    /// batch is any array or view (`[batch, features]`, `[batch, c, h, w]`, …).
    ///
    /// # Errors
    /// The first layer error (shape, non-finite input).
    pub fn forward<'x, D: Dimension>(&mut self, x: impl AsArray<'x, F, D>) -> Result<ArrayD<F>>
    where
        F: 'x,
    {
        let mut h = x.into().into_dyn().to_owned();
        for layer in &mut self.layers {
            h = layer.forward(h.view())?;
        }
        Ok(h)
    }

    /// Backward pass from `∂L/∂logits`; returns `∂L/∂input`.
    ///
    /// # Errors
    /// The first layer error.
    pub fn backward(&mut self, grad: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let mut g = grad.to_owned();
        for layer in self.layers.iter_mut().rev() {
            g = layer.backward(g.view())?;
        }
        Ok(g)
    }

    /// Logits `[batch, classes]` of a batch.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); [`Error::ShapeMismatch`] when the output is not 2-d.
    pub fn logits<'x, D: Dimension>(&mut self, x: impl AsArray<'x, F, D>) -> Result<Array2<F>>
    where
        F: 'x,
    {
        let out = self.forward(x)?;
        let shape = out.shape().to_vec();
        out.into_dimensionality::<Ix2>()
            .map_err(|_| Error::ShapeMismatch {
                op: "Sequential::logits",
                expected: "[batch, classes]".into(),
                got: shape_str(&shape),
            })
    }

    /// Predicted class (arg-max logit) of each row.
    ///
    /// # Errors
    /// As [`logits`](Self::logits).
    pub fn predict<'x, D: Dimension>(&mut self, x: impl AsArray<'x, F, D>) -> Result<Vec<usize>>
    where
        F: 'x,
    {
        Ok(argmax_rows(self.logits(x)?.view()))
    }

    /// Forward, mean cross-entropy against `labels`, and backward: fills every
    /// layer's gradients and the traced layers' factors. Returns the loss.
    ///
    /// # Errors
    /// Shape, label and non-finite errors from the layers and the loss.
    pub fn train_batch<'x, D: Dimension>(
        &mut self,
        x: impl AsArray<'x, F, D>,
        labels: &[usize],
    ) -> Result<F>
    where
        F: 'x,
    {
        self.train_batch_masked(x, labels, None)
    }

    /// As [`train_batch`](Self::train_batch), with ghost rows (`mask[i] == false`)
    /// forwarded but carrying no loss.
    ///
    /// # Errors
    /// As [`train_batch`](Self::train_batch).
    pub fn train_batch_masked<'x, D: Dimension>(
        &mut self,
        x: impl AsArray<'x, F, D>,
        labels: &[usize],
        mask: Option<&[bool]>,
    ) -> Result<F>
    where
        F: 'x,
    {
        let logits = self.logits(x)?;
        let out = self
            .loss
            .loss_and_grad_masked(logits.view(), labels, mask)?;
        self.backward(out.grad.view().into_dyn())?;
        Ok(out.loss)
    }

    /// Forward and backward of the *summed* loss against `targets`, so every traced
    /// layer's deltas are per-example loss gradients (the input of the loss lens).
    /// Returns the logits.
    ///
    /// # Errors
    /// As [`train_batch`](Self::train_batch).
    pub fn loss_gradients<'x, D: Dimension>(
        &mut self,
        x: impl AsArray<'x, F, D>,
        targets: &[usize],
    ) -> Result<Array2<F>>
    where
        F: 'x,
    {
        let logits = self.logits(x)?;
        let out = SoftmaxCrossEntropy::new(Reduction::Sum).loss_and_grad(logits.view(), targets)?;
        self.backward(out.grad.view().into_dyn())?;
        Ok(logits)
    }

    /// The traced layers, in order.
    pub fn traceables(&self) -> Vec<&dyn Traceable<F>> {
        self.layers
            .iter()
            .filter_map(|l| l.as_traceable())
            .collect()
    }

    /// The traced layers, mutably, in order: what [`OptimizerHook::step`](crate::OptimizerHook::step) takes.
    pub fn traceables_mut(&mut self) -> Vec<&mut dyn Traceable<F>> {
        self.layers
            .iter_mut()
            .filter_map(|l| l.as_traceable_mut())
            .collect()
    }
}

/// Index of the largest value in each row (first on ties).
pub use crate::query::argmax_rows;

impl<F: Float> crate::trace::TracedModel<F> for Sequential<F> {
    fn traced(&self) -> Vec<&dyn Traceable<F>> {
        self.traceables()
    }
    fn traced_mut(&mut self) -> Vec<&mut dyn Traceable<F>> {
        self.traceables_mut()
    }
    fn run(&mut self, x: ArrayViewD<'_, F>) -> Result<Array2<F>> {
        self.logits(x)
    }
    fn run_loss_gradients(&mut self, x: ArrayViewD<'_, F>, targets: &[usize]) -> Result<Array2<F>> {
        self.loss_gradients(x, targets)
    }
}
