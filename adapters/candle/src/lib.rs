//! Trace a [candle](https://docs.rs/candle-core) training loop with
//! [`refinement_ledger`]: keep your model, loss, data loader and candle's own
//! optimizer; wrap the layers to trace in [`TracedLinear`] / [`TracedConv2d`],
//! and after each optimizer step hand the hook what the step did.
//!
//! # How it works
//! candle keeps no gradients of intermediate tensors, but it does of every
//! [`Var`]. A traced layer's forward adds a zero `Var` (a *probe*) of the
//! shape of its pre-activation `z = W a + b` and keeps its input `a`; after
//! `loss.backward()` the probe's gradient is exactly `∂L/∂z`. With the input
//! (for a convolution, its im2col patches) these are the factors of the
//! layer's weight gradient `Σ_{i,p} ∂L/∂z_{ip} a_{ip}ᵀ`, which is all the ledger
//! needs. [`collect`] copies them and the parameters after the step to the
//! host as [`CapturedLayer`]s; [`OptimizerHook::record_step`](refinement_ledger::OptimizerHook::record_step) checks that the
//! update is what the factors and the optimizer's rule predict and books it.
//!
//! candle's `SGD` is plain SGD ([`sgd_rule`] reads its rule): every example is
//! credited exactly. `AdamW` is not linear in the gradients: credit it per
//! batch (`HookConfig::default().with_credit(Credit::Batch)`, rule `None`).
//!
//! # Example
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{Module, Optimizer, SGD, VarBuilder, VarMap, linear};
//! use refinement_ledger::{Batch, ExampleId, HookConfig, OptimizerHook};
//! use refinement_ledger_candle::{TracedLinear, Traced, collect, sgd_rule, snapshot, traceables};
//!
//! let dev = Device::Cpu;
//! let vars = VarMap::new();
//! let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
//! let fc1 = TracedLinear::new("fc1", linear(2, 8, vb.pp("fc1"))?);
//! let fc2 = TracedLinear::new("fc2", linear(8, 2, vb.pp("fc2"))?);
//! let layers: [&dyn Traced; 2] = [&fc1, &fc2];
//! let mut sgd = SGD::new(vars.all_vars(), 0.1)?;
//! let mut hook = OptimizerHook::external(&traceables(&snapshot(&layers)?), HookConfig::default())?;
//!
//! let x = Tensor::new(&[[1.0f32, 0.0], [0.0, 1.0]], &dev)?;
//! let y = Tensor::new(&[0u32, 1], &dev)?;
//! let (ids, labels) = ([ExampleId(0), ExampleId(1)], [0, 1]);
//! for _ in 0..5 {
//!     let logits = fc2.forward(&fc1.forward(&x)?.relu()?)?;   // your forward, traced layers
//!     let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
//!     let grads = loss.backward()?;
//!     sgd.step(&grads)?;                                       // candle's optimizer
//!     let captured = collect(&layers, &grads)?;                // factors + parameters now
//!     hook.record_step(&traceables(&captured), &Batch::new(&ids, &labels), Some(sgd_rule(&sgd)))?;
//! }
//! let ledger = hook.finish()?;
//! assert!(ledger.residual_fraction().iter().all(|&r| r < 1e-4));
//! # Ok::<(), refinement_ledger_candle::Error>(())
//! ```

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::{Conv2d, Linear, Module, Optimizer};
use refinement_ledger::ndarray::{Array1, Array3, Array4, ArrayD, IxDyn};
use refinement_ledger::{CapturedLayer, ConvGeometry, LinearRule, Traceable, next_pass_id};

/// What can go wrong: candle's errors and the ledger's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The ledger refused something (shapes, a stale pass, an update that does not fit, …).
    #[error(transparent)]
    Ledger(#[from] refinement_ledger::Error),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The input and probe of a layer's last traced forward.
struct Tape {
    input: Tensor,
    probe: Var,
    pass: u64,
}

/// A layer whose training is traced: its parameters and the factors of its
/// last forward (and backward) pass, copied to the host.
pub trait Traced {
    /// The layer's name, unique within the network.
    fn id(&self) -> &str;
    /// The parameters now and, with `grads`, the factors of the last traced
    /// forward; without, the parameters only (`factors = false`) or with the
    /// input patches of the last forward (a query).
    fn capture(&self, factors: bool, grads: Option<&GradStore>) -> Result<CapturedLayer<f32>>;
}

/// A candle [`Linear`] whose forward keeps its input and adds a probe.
pub struct TracedLinear {
    id: String,
    inner: Linear,
    tape: RefCell<Option<Tape>>,
}

/// A candle [`Conv2d`] (groups 1) whose forward keeps its input and adds a probe.
pub struct TracedConv2d {
    id: String,
    inner: Conv2d,
    tape: RefCell<Option<Tape>>,
}

impl TracedLinear {
    /// Traces `inner` under the name `id`.
    pub fn new(id: &str, inner: Linear) -> Self {
        Self {
            id: id.into(),
            inner,
            tape: RefCell::new(None),
        }
    }
    /// The wrapped layer.
    pub fn inner(&self) -> &Linear {
        &self.inner
    }
}

impl TracedConv2d {
    /// Traces `inner` under the name `id`.
    pub fn new(id: &str, inner: Conv2d) -> Self {
        Self {
            id: id.into(),
            inner,
            tape: RefCell::new(None),
        }
    }
    /// The wrapped layer.
    pub fn inner(&self) -> &Conv2d {
        &self.inner
    }
}

/// `z + probe`, keeping `x` and the probe for [`collect`].
fn probed(tape: &RefCell<Option<Tape>>, x: &Tensor, z: Tensor) -> candle_core::Result<Tensor> {
    let probe = Var::zeros(z.shape(), z.dtype(), z.device())?;
    let out = z.add(probe.as_tensor())?;
    *tape.borrow_mut() = Some(Tape {
        input: x.clone(),
        probe,
        pass: next_pass_id(),
    });
    Ok(out)
}

impl Module for TracedLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.inner.forward(x)?;
        probed(&self.tape, x, z)
    }
}

impl Module for TracedConv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.inner.forward(x)?;
        probed(&self.tape, x, z)
    }
}

/// A tensor's values as `f32`, row-major.
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn array(t: &Tensor) -> Result<ArrayD<f32>> {
    Ok(
        ArrayD::from_shape_vec(IxDyn(t.dims()), host(t)?)
            .map_err(refinement_ledger::Error::from)?,
    )
}

/// The probe's gradient, or the error that says the layer was not in the loss's graph.
fn probe_grad<'g>(id: &str, tape: &Tape, grads: &'g GradStore) -> Result<&'g Tensor> {
    grads.get(tape.probe.as_tensor()).ok_or_else(|| {
        Error::Ledger(refinement_ledger::Error::NoBackwardCache {
            layer: id.into(),
            op: "collect (the loss of this backward pass does not depend on the layer's last traced forward)",
        })
    })
}

fn no_forward(id: &str) -> Error {
    Error::Ledger(refinement_ledger::Error::NoForwardCache {
        layer: id.into(),
        op: "collect (run the traced forward first)",
    })
}

/// `[a, b, c]` or `[a, c]` (one position) as `[a, positions, c]`.
fn rows3(x: ArrayD<f32>) -> Result<Array3<f32>> {
    let d = x.shape().to_vec();
    let (n, c) = (d[0], d[d.len() - 1]);
    let p = x.len() / (n * c).max(1);
    Ok(x.into_shape_with_order((n, p, c))
        .map_err(refinement_ledger::Error::from)?)
}

impl Traced for TracedLinear {
    fn id(&self) -> &str {
        &self.id
    }
    fn capture(&self, factors: bool, grads: Option<&GradStore>) -> Result<CapturedLayer<f32>> {
        let bias = self
            .inner
            .bias()
            .map(|b| Ok::<_, Error>(Array1::from(host(b)?)))
            .transpose()?;
        let layer = CapturedLayer::new(&self.id, array(self.inner.weight())?, bias)?;
        if !factors {
            return Ok(layer);
        }
        let tape = self.tape.borrow();
        let tape = tape.as_ref().ok_or_else(|| no_forward(&self.id))?;
        let patches = rows3(array(&tape.input)?)?;
        let deltas = match grads {
            Some(g) => Some(rows3(array(probe_grad(&self.id, tape, g)?)?)?),
            None => None,
        };
        Ok(layer.with_factors(patches, deltas, tape.pass)?)
    }
}

impl Traced for TracedConv2d {
    fn id(&self) -> &str {
        &self.id
    }
    fn capture(&self, factors: bool, grads: Option<&GradStore>) -> Result<CapturedLayer<f32>> {
        let cfg = self.inner.config();
        if cfg.groups != 1 {
            return Err(Error::Ledger(refinement_ledger::Error::InvalidConfig {
                what: "traced Conv2d",
                reason: format!("groups must be 1, found {}", cfg.groups),
            }));
        }
        let weight = array(self.inner.weight())?;
        let bias = self
            .inner
            .bias()
            .map(|b| Ok::<_, Error>(Array1::from(host(b)?)))
            .transpose()?;
        let kernel = [weight.shape()[2], weight.shape()[3]];
        let layer = CapturedLayer::new(&self.id, weight, bias)?;
        if !factors {
            return Ok(layer);
        }
        let tape = self.tape.borrow();
        let tape = tape.as_ref().ok_or_else(|| no_forward(&self.id))?;
        let x = array(&tape.input)?
            .into_dimensionality::<refinement_ledger::ndarray::Ix4>()
            .map_err(refinement_ledger::Error::from)?;
        let geometry = ConvGeometry {
            kernel,
            stride: cfg.stride,
            padding: cfg.padding,
            dilation: cfg.dilation,
        };
        let patches = geometry.patches(x.view())?;
        let deltas = match grads {
            Some(g) => {
                // [n, c_out, h, w] → [n, h·w, c_out]
                let d: Array4<f32> = array(probe_grad(&self.id, tape, g)?)?
                    .into_dimensionality()
                    .map_err(refinement_ledger::Error::from)?;
                let (n, c, h, w) = d.dim();
                let d = d
                    .permuted_axes([0, 2, 3, 1])
                    .as_standard_layout()
                    .into_owned();
                Some(
                    d.into_shape_with_order((n, h * w, c))
                        .map_err(refinement_ledger::Error::from)?,
                )
            }
            None => None,
        };
        Ok(layer.with_factors(patches, deltas, tape.pass)?)
    }
}

/// The layers' parameters now, without factors: what
/// [`OptimizerHook::external`](refinement_ledger::OptimizerHook::external) is
/// created from.
///
/// # Errors
/// [`Error::Candle`] when a tensor cannot be read; [`Error::Ledger`] for a
/// parameter shape the ledger cannot trace.
pub fn snapshot(layers: &[&dyn Traced]) -> Result<Vec<CapturedLayer<f32>>> {
    layers.iter().map(|l| l.capture(false, None)).collect()
}

/// After the optimizer's step: every layer's parameters now and the factors
/// of its last traced forward and the backward pass `grads`, for
/// [`OptimizerHook::record_step`](refinement_ledger::OptimizerHook::record_step).
///
/// # Errors
/// [`Error::Ledger`] with `NoForwardCache` for a layer without a traced
/// forward, `NoBackwardCache` when `grads` has no gradient of its probe (the
/// loss does not depend on its last forward); [`Error::Candle`].
pub fn collect(layers: &[&dyn Traced], grads: &GradStore) -> Result<Vec<CapturedLayer<f32>>> {
    layers
        .iter()
        .map(|l| l.capture(true, Some(grads)))
        .collect()
}

/// After a traced forward of query inputs: the layers with their input
/// patches, for [`Query::from_layers`](refinement_ledger::Query::from_layers)
/// (and, from [`collect`] after a backward of the query's loss,
/// [`Query::with_gradients`](refinement_ledger::Query::with_gradients)).
///
/// # Errors
/// As [`collect`].
pub fn forwarded(layers: &[&dyn Traced]) -> Result<Vec<CapturedLayer<f32>>> {
    layers.iter().map(|l| l.capture(true, None)).collect()
}

/// The captured layers as the hook and the queries take them.
pub fn traceables(captured: &[CapturedLayer<f32>]) -> Vec<&dyn Traceable<f32>> {
    captured.iter().map(|c| c as &dyn Traceable<f32>).collect()
}

/// The rule of candle's `SGD` (plain SGD at its learning rate).
pub fn sgd_rule(sgd: &candle_nn::SGD) -> LinearRule {
    LinearRule {
        lr: sgd.learning_rate(),
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
        first_step: false,
    }
}
