//! What a layer exposes so its training can be traced.
//!
//! A traced layer is one whose pre-activation is linear in its parameters and
//! acts on its input through *patches*: for an input `a`, the layer forms
//! patches `a_p` (`p` = 1..P positions, each of `fan_in` numbers) and computes
//! `z_p = W a_p + b` with `W: [fan_out, fan_in]`. A dense layer has one
//! position (`a_p = a`); a convolution has one per output pixel (im2col).
//! Anything of that form (Conv1d, attention projections, a user's own layer)
//! can implement [`Traceable`].
//!
//! The weight tensor may have any shape whose row-major reshape is
//! `[fan_out, fan_in]` (a Conv2d weight `[c_out, c_in, kh, kw]` does, with
//! patches ordered `(c_in, kh, kw)`).

use std::fmt;

use ndarray::{ArrayView1, ArrayView3, ArrayViewD, ArrayViewMutD};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::float::Float;

/// The name of a traced layer (`"fc1"`, `"conv2"`); unique within a network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LayerId(pub String);

impl LayerId {
    /// A layer id from a name.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The dotted name of a parameter (`"fc1.weight"`): the key of optimizer state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ParamId(pub String);

impl ParamId {
    /// The id of parameter `param` of layer `layer` (`fc1.weight`).
    pub fn of(layer: &LayerId, param: &str) -> Self {
        Self(format!("{}.{param}", layer.0))
    }
}

impl fmt::Display for ParamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The largest number of classes a ledger accepts: labels are `0..MAX_CLASSES`
/// (per-class results hold one column per class up to the largest label).
pub const MAX_CLASSES: usize = 1 << 16;

/// The caller's id of one training example (its index in the training set, say).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExampleId(pub u64);

impl fmt::Display for ExampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What an update is credited to.
///
/// Ordered so that ties between equal scores break deterministically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourceId {
    /// One training example (per-example mode).
    Example(ExampleId),
    /// One optimizer step's whole batch (batch-level mode), by step number.
    Batch(u64),
    /// The weight-decay pseudo-source: the `λ W` part of every gradient.
    Decay,
}

impl fmt::Display for SourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceId::Example(e) => write!(f, "example {e}"),
            SourceId::Batch(s) => write!(f, "batch of step {s}"),
            SourceId::Decay => f.write_str("weight decay"),
        }
    }
}

/// The shape of a traced layer's linear map: `W: [fan_out, fan_in]`, optional bias `[fan_out]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracedShape {
    /// Numbers per input patch.
    pub fan_in: usize,
    /// Numbers per output position (output features or channels).
    pub fan_out: usize,
    /// Whether the layer has a bias.
    pub has_bias: bool,
    /// The weight tensor's own shape (its row-major reshape is `[fan_out, fan_in]`).
    pub weight_shape: Vec<usize>,
}

impl TracedShape {
    /// Columns of the augmented weight `[W | b]`: `fan_in + 1` with a bias, else `fan_in`.
    pub fn aug_in(&self) -> usize {
        self.fan_in + usize::from(self.has_bias)
    }
}

/// One parameter as an optimizer sees it: its id, its value, and its gradient.
pub struct ParamMut<'a, F> {
    /// Dotted name, the key of optimizer state.
    pub id: ParamId,
    /// The value, updated in place by [`Optimizer::step`](crate::Optimizer::step).
    pub value: ArrayViewMutD<'a, F>,
    /// The gradient of the batch loss.
    pub grad: ArrayViewD<'a, F>,
}

/// A layer whose training can be traced.
///
/// Implemented by [`Dense`](crate::nn::Dense) and [`Conv2d`](crate::nn::Conv2d);
/// implement it for your own layers to trace a hand-written network. The
/// contract (checked by the hook, which returns an error when it is broken):
///
/// * after a forward pass on a batch, [`input_patches`](Self::input_patches)
///   returns that batch's patches `[batch, positions, fan_in]`;
/// * after the backward pass, [`output_deltas`](Self::output_deltas) returns
///   `∂L/∂z` `[batch, positions, fan_out]` for the *batch loss* `L` the
///   gradients were taken of, so that the weight gradient is
///   `Σ_{i,p} δ_{i,p} a_{i,p}ᵀ` and the bias gradient `Σ_{i,p} δ_{i,p}`.
///
/// # Example
/// A bias-free linear layer `z = W a`, traced:
/// ```
/// use ndarray::{Array2, Array3, ArrayView1, ArrayView3, ArrayViewD};
/// use refinement_ledger::{Error, LayerId, ParamId, ParamMut, Result, Traceable, TracedShape};
///
/// struct Linear { id: LayerId, w: Array2<f32>, gw: Array2<f32>,
///                 a: Option<Array3<f32>>, d: Option<Array3<f32>> }
///
/// impl Traceable for Linear {
///     fn layer_id(&self) -> &LayerId { &self.id }
///     fn traced_shape(&self) -> TracedShape {
///         TracedShape { fan_in: self.w.ncols(), fan_out: self.w.nrows(), has_bias: false,
///                       weight_shape: self.w.shape().to_vec() }
///     }
///     fn weight(&self) -> ArrayViewD<'_, f32> { self.w.view().into_dyn() }
///     fn bias(&self) -> Option<ArrayView1<'_, f32>> { None }
///     fn params_mut(&mut self) -> Vec<ParamMut<'_, f32>> {
///         vec![ParamMut { id: ParamId::of(&self.id, "weight"),
///                         value: self.w.view_mut().into_dyn(), grad: self.gw.view().into_dyn() }]
///     }
///     fn input_patches(&self) -> Result<ArrayView3<'_, f32>> {
///         self.a.as_ref().map(|a| a.view()).ok_or(Error::NoForwardCache {
///             layer: self.id.to_string(), op: "input_patches" })
///     }
///     fn output_deltas(&self) -> Result<ArrayView3<'_, f32>> {
///         self.d.as_ref().map(|d| d.view()).ok_or(Error::NoBackwardCache {
///             layer: self.id.to_string(), op: "output_deltas" })
///     }
/// }
/// let layer = Linear { id: LayerId::new("lin"), w: Array2::zeros((2, 3)), gw: Array2::zeros((2, 3)),
///                      a: None, d: None };
/// assert_eq!(layer.traced_shape().aug_in(), 3);
/// assert!(layer.input_patches().is_err());
/// ```
pub trait Traceable<F: Float = f32> {
    /// The layer's name, unique within the network.
    fn layer_id(&self) -> &LayerId;
    /// The shape of the layer's linear map.
    fn traced_shape(&self) -> TracedShape;
    /// The current weight, any shape whose row-major reshape is `[fan_out, fan_in]`.
    fn weight(&self) -> ArrayViewD<'_, F>;
    /// The current bias `[fan_out]`, if the layer has one.
    fn bias(&self) -> Option<ArrayView1<'_, F>>;
    /// The weight (first) and bias (second, if any) with their gradients, for the optimizer.
    fn params_mut(&mut self) -> Vec<ParamMut<'_, F>>;
    /// Patches of the last forward pass's input: `[batch, positions, fan_in]`.
    ///
    /// # Errors
    /// [`Error::NoForwardCache`](crate::Error::NoForwardCache) before any forward pass.
    fn input_patches(&self) -> Result<ArrayView3<'_, F>>;
    /// `∂L/∂z` of the last backward pass: `[batch, positions, fan_out]`.
    ///
    /// # Errors
    /// [`Error::NoBackwardCache`](crate::Error::NoBackwardCache) before any backward pass.
    fn output_deltas(&self) -> Result<ArrayView3<'_, F>>;

    /// An id of the backward pass the cached deltas come from, new for every
    /// backward pass ([`next_pass_id`] gives one). The hook books the factors
    /// of one pass once: a second step on the same pass (a forgotten
    /// backward) is an [`Error::StalePass`](crate::Error::StalePass). The
    /// default, `None`, opts out of that check.
    fn pass_id(&self) -> Option<u64> {
        None
    }
}

/// A fresh id for a backward pass, unique in the process (see
/// [`Traceable::pass_id`]).
///
/// # Example
/// ```
/// use refinement_ledger::next_pass_id;
/// assert_ne!(next_pass_id(), next_pass_id());
/// ```
pub fn next_pass_id() -> u64 {
    static PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The traced layers' parameters as `[W | b]` matrices `[fan_out, aug_in]`
/// in `f64` (the bias column only with a bias): what [`write_params`] writes,
/// e.g. to start a built-in network from another framework's weights.
///
/// # Errors
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) for a weight or bias
/// of another size than the layer's traced shape.
///
/// # Example
/// ```
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::{Traceable, read_params, nn::DenseConfig};
/// let mut rng = StdRng::seed_from_u64(1);
/// let fc = DenseConfig::new(2, 1).build::<f64>("fc", &mut rng)?;
/// let p = read_params(&[&fc as &dyn Traceable<f64>])?;
/// assert_eq!(p[0].dim(), (1, 3));
/// assert_eq!(p[0][[0, 1]], fc.weight()[[0, 1]]);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
pub fn read_params<F: Float>(layers: &[&dyn Traceable<F>]) -> Result<Vec<ndarray::Array2<f64>>> {
    layers
        .iter()
        .map(|layer| {
            let s = layer.traced_shape();
            let w = layer.weight();
            let b = layer.bias();
            if w.len() != s.fan_out * s.fan_in
                || b.map(|b| b.len()) != s.has_bias.then_some(s.fan_out)
            {
                return Err(crate::Error::ShapeMismatch {
                    op: "read_params",
                    expected: format!(
                        "{}: [{}, {}] and a bias: {}",
                        layer.layer_id(),
                        s.fan_out,
                        s.fan_in,
                        s.has_bias
                    ),
                    got: format!("weight {:?}, bias {:?}", w.shape(), b.map(|b| b.len())),
                });
            }
            let mut m = ndarray::Array2::zeros((s.fan_out, s.aug_in()));
            for (k, v) in w.as_standard_layout().iter().enumerate() {
                m[[k / s.fan_in, k % s.fan_in]] = v.widen();
            }
            if let Some(b) = b {
                m.column_mut(s.fan_in).assign(&b.mapv(F::widen));
            }
            Ok(m)
        })
        .collect()
}

/// Writes `[W | b]` matrices (`[fan_out, aug_in]`, bias in the last column, as a
/// [`Ledger`](crate::Ledger) keeps parameters) into traced layers, e.g. to run
/// the model at a segment boundary.
///
/// # Errors
/// [`Error::LayerMismatch`](crate::Error::LayerMismatch) or
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) when a layer does not
/// match its matrix.
///
/// # Example
/// ```
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::{Traceable, write_params, nn::DenseConfig};
/// let mut rng = StdRng::seed_from_u64(1);
/// let mut fc = DenseConfig::new(2, 1).build::<f64>("fc", &mut rng)?;
/// write_params(&mut [&mut fc as &mut dyn Traceable<f64>], &[ndarray::array![[1.0, 2.0, 3.0]]])?;
/// assert_eq!(fc.bias().unwrap()[0], 3.0);
/// assert_eq!(fc.weight()[[0, 1]], 2.0);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
pub fn write_params<F: Float>(
    layers: &mut [&mut dyn Traceable<F>],
    params: &[ndarray::Array2<f64>],
) -> Result<()> {
    const OP: &str = "write_params";
    if layers.len() != params.len() {
        return Err(crate::Error::LayerMismatch {
            op: OP,
            expected: format!("{} layers", params.len()),
            got: format!("{} layers", layers.len()),
        });
    }
    for (layer, m) in layers.iter_mut().zip(params) {
        let shape = layer.traced_shape();
        if m.dim() != (shape.fan_out, shape.aug_in()) {
            return Err(crate::Error::ShapeMismatch {
                op: OP,
                expected: crate::error::shape_str(&[shape.fan_out, shape.aug_in()]),
                got: crate::error::shape_str(m.shape()),
            });
        }
        let mut params = layer.params_mut();
        if let Some(w) = params.get_mut(0) {
            let values = m.rows().into_iter().flat_map(|r| {
                r.into_iter()
                    .take(shape.fan_in)
                    .copied()
                    .collect::<Vec<_>>()
            });
            for (dst, v) in w.value.iter_mut().zip(values) {
                *dst = F::narrow(v);
            }
        }
        if shape.has_bias {
            if let Some(b) = params.get_mut(1) {
                for (dst, &v) in b.value.iter_mut().zip(m.column(shape.fan_in)) {
                    *dst = F::narrow(v);
                }
            }
        }
    }
    Ok(())
}

/// A network whose traced layers queries can be run through, so the crate can
/// build a query from an input for you ([`Query::forward`](crate::Query::forward),
/// [`Query::gradients`](crate::Query::gradients)). The built-in
/// [`Sequential`](crate::nn::Sequential) implements it; implement it for your
/// own network (a forward pass, and a forward and backward pass of the summed
/// loss).
pub trait TracedModel<F: Float = f32> {
    /// The traced layers, in the order the ledger knows them.
    fn traced(&self) -> Vec<&dyn Traceable<F>>;
    /// The traced layers, mutably (to run the model at other parameters).
    fn traced_mut(&mut self) -> Vec<&mut dyn Traceable<F>>;
    /// Runs the network on the batch `x`, caching every traced layer's patches;
    /// returns the logits `[batch, classes]`.
    ///
    /// # Errors
    /// Shape and non-finite errors of the network.
    fn run(&mut self, x: ArrayViewD<'_, F>) -> Result<ndarray::Array2<F>>;
    /// Forward and backward of the *summed* loss against `targets`, so every
    /// traced layer's deltas are per-example loss gradients; returns the logits.
    ///
    /// # Errors
    /// Shape, label and non-finite errors of the network and its loss.
    fn run_loss_gradients(
        &mut self,
        x: ArrayViewD<'_, F>,
        targets: &[usize],
    ) -> Result<ndarray::Array2<F>>;
}
