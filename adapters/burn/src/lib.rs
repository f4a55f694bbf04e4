//! Trace a [burn](https://burn.dev) training loop with [`refinement_ledger`]:
//! keep your model, loss, data loader and burn's own optimizer; run the layers
//! to trace through a [`Tape`] in your forward, hand the tape the gradients
//! after `backward`, and after the optimizer's step hand the hook what the
//! step did.
//!
//! # How it works
//! burn keeps no gradients of intermediate tensors, but it does of every
//! tensor that requires them. [`Tape::linear`] and [`Tape::conv2d`] add a zero
//! tensor that requires gradients (a *probe*) to the layer's pre-activation
//! `z = W a + b` and keep its input `a`; after `loss.backward()` the probe's
//! gradient is exactly `∂L/∂z`. With the input (for a convolution, its im2col
//! patches) these are the factors of the layer's weight gradient
//! `Σ_{i,p} ∂L/∂z_{ip} a_{ip}ᵀ`. [`Tape::backward`] copies the gradients to
//! the host before burn's optimizer consumes them; [`Tape::capture`], after
//! the step, adds the parameters the step left (burn's `Linear` stores its
//! weight as `[d_input, d_output]`; the ledger's is `[d_output, d_input]`).
//! [`OptimizerHook::record_step`](refinement_ledger::OptimizerHook::record_step)
//! checks that the update is what the factors and [`sgd_rule`] predict and
//! books it.
//!
//! burn's `Sgd` (momentum, dampening, Nesterov, L2 weight decay, any learning
//! rate per step) is credited exactly per example. burn's own gradient
//! clipping clips each parameter tensor separately, which is not a uniform
//! scale of the gradient: such steps are errors (clip by the global norm
//! yourself, or credit per batch). Adam, AdamW and the others: per batch
//! (`HookConfig::default().with_credit(Credit::Batch)`, rule `None`).
//!
//! # Example
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig, loss::CrossEntropyLossConfig};
//! use burn::optim::{GradientsParams, SgdConfig, momentum::MomentumConfig};
//! use burn::tensor::{Device, Int, Tensor, TensorData};
//! use refinement_ledger::{Batch, ExampleId, HookConfig, OptimizerHook};
//! use refinement_ledger_burn::{Layer, Tape, sgd_rule, snapshot, traceables};
//!
//! #[derive(Module, Debug)]
//! struct Net { fc1: Linear, fc2: Linear }
//! impl Net {
//!     fn layers(&self) -> [Layer<'_>; 2] { [Layer::Linear("fc1", &self.fc1), Layer::Linear("fc2", &self.fc2)] }
//! }
//!
//! let device = Device::default().autodiff();
//! let mut net = Net { fc1: LinearConfig::new(2, 8).init(&device), fc2: LinearConfig::new(8, 2).init(&device) };
//! let config = SgdConfig::new().with_momentum(Some(MomentumConfig::new())); // burn's default dampening 0.1
//! let mut optim = config.init();
//! let mut hook = OptimizerHook::external(&traceables(&snapshot(&net.layers())?), HookConfig::default())?;
//! let tape = Tape::new();
//! let x = Tensor::<2>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [2, 2]), &device);
//! let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
//! let (ids, labels) = ([ExampleId(0), ExampleId(1)], [0, 1]);
//! for step in 0..5 {
//!     let h = burn::tensor::activation::relu(tape.linear("fc1", &net.fc1, x.clone()));
//!     let logits = tape.linear("fc2", &net.fc2, h);                 // your forward, traced layers
//!     let loss = CrossEntropyLossConfig::new().init(&device).forward(logits, y.clone());
//!     let grads = loss.backward();
//!     tape.backward(&grads)?;                                       // ∂L/∂z to the host
//!     let grads = GradientsParams::from_grads(grads, &net);
//!     net = optim.step(0.1, net, grads);                            // burn's optimizer
//!     let captured = tape.capture(&net.layers())?;                   // factors + parameters now
//!     hook.record_step(&traceables(&captured), &Batch::new(&ids, &labels), Some(sgd_rule(&config, 0.1, step == 0)?))?;
//! }
//! let ledger = hook.finish()?;
//! assert!(ledger.residual_fraction().iter().all(|&r| r < 1e-4));
//! # Ok::<(), refinement_ledger_burn::Error>(())
//! ```

use std::cell::RefCell;
use std::collections::HashMap;

use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::optim::SgdConfig;
use burn::tensor::{Gradients, Tensor};
use refinement_ledger::ndarray::{Array1, Array3, Array4, ArrayD, Ix4, IxDyn};
use refinement_ledger::{CapturedLayer, ConvGeometry, LinearRule, Traceable, next_pass_id};

/// What can go wrong: the ledger's errors, and reading burn's tensors or configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ledger refused something (shapes, a stale pass, an update that does not fit, …).
    #[error(transparent)]
    Ledger(#[from] refinement_ledger::Error),
    /// A burn tensor or configuration could not be read.
    #[error("burn: {0}")]
    Burn(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A traced layer of a burn model, named, for [`snapshot`] and [`Tape::capture`].
#[derive(Clone, Copy, Debug)]
pub enum Layer<'a> {
    /// A `Linear` (its weight `[d_input, d_output]`).
    Linear(&'a str, &'a Linear),
    /// A `Conv2d` (groups 1; equal stride, dilation and symmetric padding on both axes).
    Conv2d(&'a str, &'a Conv2d),
}

impl Layer<'_> {
    fn id(&self) -> &str {
        match self {
            Layer::Linear(id, _) | Layer::Conv2d(id, _) => id,
        }
    }
}

/// What a traced forward kept: the input and the probe on `z`.
enum Kept {
    Linear { input: Tensor<2>, probe: Tensor<2> },
    Conv { input: Tensor<4>, probe: Tensor<4> },
}

struct Entry {
    kept: Kept,
    pass: u64,
    /// `∂L/∂z` `[batch, positions, fan_out]`, after [`Tape::backward`].
    deltas: Option<Array3<f32>>,
}

/// Records the traced layers' forward passes (inputs and probes) of the
/// current step, by layer name.
#[derive(Default)]
pub struct Tape {
    entries: RefCell<HashMap<String, Entry>>,
}

fn values<const D: usize>(t: &Tensor<D>) -> Result<ArrayD<f32>> {
    let data = t.to_data().convert::<f32>();
    let v = data
        .try_to_vec::<f32>()
        .map_err(|e| Error::Burn(format!("{e:?}")))?;
    Ok(ArrayD::from_shape_vec(IxDyn(&t.dims()), v).map_err(refinement_ledger::Error::from)?)
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    fn keep(&self, id: &str, kept: Kept) {
        let entry = Entry {
            kept,
            pass: next_pass_id(),
            deltas: None,
        };
        self.entries.borrow_mut().insert(id.to_string(), entry);
    }

    /// `layer.forward(x)`, traced under the name `id`.
    pub fn linear(&self, id: &str, layer: &Linear, x: Tensor<2>) -> Tensor<2> {
        let z = layer.forward(x.clone());
        let probe = z.zeros_like().require_grad();
        self.keep(
            id,
            Kept::Linear {
                input: x,
                probe: probe.clone(),
            },
        );
        z + probe
    }

    /// `layer.forward(x)`, traced under the name `id`.
    pub fn conv2d(&self, id: &str, layer: &Conv2d, x: Tensor<4>) -> Tensor<4> {
        let z = layer.forward(x.clone());
        let probe = z.zeros_like().require_grad();
        self.keep(
            id,
            Kept::Conv {
                input: x,
                probe: probe.clone(),
            },
        );
        z + probe
    }

    /// Copies every traced layer's `∂L/∂z` from `grads` to the host; call it
    /// after `loss.backward()` and before the optimizer takes the gradients.
    ///
    /// # Errors
    /// [`refinement_ledger::Error::NoBackwardCache`] for a layer whose last
    /// traced forward the loss does not depend on; [`Error::Burn`].
    pub fn backward(&self, grads: &Gradients) -> Result<()> {
        for (id, entry) in self.entries.borrow_mut().iter_mut() {
            let missing = || {
                Error::Ledger(refinement_ledger::Error::NoBackwardCache {
                    layer: id.clone(),
                    op: "Tape::backward (the loss does not depend on the layer's last traced forward)",
                })
            };
            let d = match &entry.kept {
                Kept::Linear { probe, .. } => values(&probe.grad(grads).ok_or_else(missing)?)?,
                Kept::Conv { probe, .. } => {
                    // [n, c_out, h, w] → [n, h·w, c_out]
                    let d = values(&probe.grad(grads).ok_or_else(missing)?)?
                        .into_dimensionality::<Ix4>()
                        .map_err(refinement_ledger::Error::from)?;
                    let (n, c, h, w) = d.dim();
                    d.permuted_axes([0, 2, 3, 1])
                        .as_standard_layout()
                        .into_owned()
                        .into_shape_with_order((n, h * w, c))
                        .map_err(refinement_ledger::Error::from)?
                        .into_dyn()
                }
            };
            let (n, f) = (d.shape()[0], d.shape()[d.ndim() - 1]);
            let p = d.len() / (n * f).max(1);
            entry.deltas = Some(
                d.into_shape_with_order((n, p, f))
                    .map_err(refinement_ledger::Error::from)?,
            );
        }
        Ok(())
    }

    /// The layers' parameters now with the factors of their last traced
    /// forward (and of the backward pass given to [`backward`](Self::backward)
    /// since, if any): after the optimizer's step, for
    /// [`OptimizerHook::record_step`](refinement_ledger::OptimizerHook::record_step);
    /// after a forward of query inputs, for
    /// [`Query::from_layers`](refinement_ledger::Query::from_layers).
    ///
    /// # Errors
    /// [`refinement_ledger::Error::NoForwardCache`] for a layer the tape has
    /// not seen; [`refinement_ledger::Error::InvalidConfig`] for a convolution
    /// the adapter cannot trace; [`Error::Burn`].
    pub fn capture(&self, layers: &[Layer<'_>]) -> Result<Vec<CapturedLayer<f32>>> {
        let entries = self.entries.borrow();
        layers
            .iter()
            .map(|layer| {
                let entry = entries.get(layer.id()).ok_or_else(|| {
                    Error::Ledger(refinement_ledger::Error::NoForwardCache {
                        layer: layer.id().into(),
                        op: "Tape::capture (run the layer through the tape first)",
                    })
                })?;
                let patches = match (&entry.kept, layer) {
                    (Kept::Linear { input, .. }, Layer::Linear(..)) => {
                        let x = values(input)?;
                        let (n, f) = (x.shape()[0], x.shape()[1]);
                        x.into_shape_with_order((n, 1, f))
                            .map_err(refinement_ledger::Error::from)?
                    }
                    (Kept::Conv { input, .. }, Layer::Conv2d(_, conv)) => {
                        let x: Array4<f32> = values(input)?
                            .into_dimensionality()
                            .map_err(refinement_ledger::Error::from)?;
                        let (_, _, h, w) = x.dim();
                        geometry(conv, h, w)?.patches(x.view())?
                    }
                    _ => {
                        return Err(Error::Ledger(refinement_ledger::Error::InvalidConfig {
                            what: "Tape::capture",
                            reason: format!("{} was traced as another kind of layer", layer.id()),
                        }));
                    }
                };
                Ok(params(layer)?.with_factors(patches, entry.deltas.clone(), entry.pass)?)
            })
            .collect()
    }
}

/// The geometry of a burn convolution, when the ledger can trace it.
fn geometry(conv: &Conv2d, h: usize, w: usize) -> Result<ConvGeometry> {
    let pads = match conv.padding {
        PaddingConfig2d::Valid => Some((0, 0)),
        PaddingConfig2d::Explicit(top, left, bottom, right) => {
            (top == bottom && left == right).then_some((top, left))
        }
        // burn's Same: symmetric for stride 1 and odd kernels.
        PaddingConfig2d::Same => (conv.stride == [1, 1]
            && conv.kernel_size.iter().all(|k| k % 2 == 1))
        .then(|| ((conv.kernel_size[0] - 1) / 2, (conv.kernel_size[1] - 1) / 2)),
    };
    let unsupported = |what: String| {
        Error::Ledger(refinement_ledger::Error::InvalidConfig {
            what: "traced burn Conv2d",
            reason: format!("{what} is not supported (input {h}×{w})"),
        })
    };
    let (ph, pw) = pads.ok_or_else(|| unsupported(format!("padding {:?}", conv.padding)))?;
    if ph != pw || conv.stride[0] != conv.stride[1] || conv.dilation[0] != conv.dilation[1] {
        return Err(unsupported(format!(
            "unequal padding ({ph}, {pw}), stride {:?} or dilation {:?} per axis",
            conv.stride, conv.dilation
        )));
    }
    if conv.groups != 1 {
        return Err(unsupported(format!("groups {}", conv.groups)));
    }
    Ok(ConvGeometry {
        kernel: conv.kernel_size,
        stride: conv.stride[0],
        padding: ph,
        dilation: conv.dilation[0],
    })
}

/// A layer's parameters now, in the ledger's layout.
fn params(layer: &Layer<'_>) -> Result<CapturedLayer<f32>> {
    let bias = |b: &Option<burn::module::Param<Tensor<1>>>| {
        b.as_ref()
            .map(|b| Ok::<_, Error>(Array1::from(values(&b.val())?.into_raw_vec_and_offset().0)))
            .transpose()
    };
    match layer {
        Layer::Linear(id, l) => {
            // [d_input, d_output] → [d_output, d_input]
            let w = values(&l.weight.val())?;
            let w = w.t().as_standard_layout().into_owned();
            Ok(CapturedLayer::new(id, w, bias(&l.bias)?)?)
        }
        Layer::Conv2d(id, c) => Ok(CapturedLayer::new(
            id,
            values(&c.weight.val())?,
            bias(&c.bias)?,
        )?),
    }
}

/// The layers' parameters, without factors: what
/// [`OptimizerHook::external`](refinement_ledger::OptimizerHook::external) is created from.
///
/// # Errors
/// [`Error::Burn`] when a tensor cannot be read; [`Error::Ledger`] for a shape
/// the ledger cannot trace.
pub fn snapshot(layers: &[Layer<'_>]) -> Result<Vec<CapturedLayer<f32>>> {
    layers.iter().map(params).collect()
}

/// The captured layers as the hook and the queries take them.
pub fn traceables(captured: &[CapturedLayer<f32>]) -> Vec<&dyn Traceable<f32>> {
    captured.iter().map(|c| c as &dyn Traceable<f32>).collect()
}

/// The rule of a step of burn's `Sgd` built from `config`, at learning rate
/// `lr` (`first_step`: the optimizer's first step, whose momentum buffer
/// starts as the undampened gradient).
///
/// # Errors
/// [`Error::Burn`] when the configuration cannot be read;
/// [`refinement_ledger::Error::InvalidConfig`] when it clips gradients (burn
/// clips each parameter separately, which is not a uniform scale).
pub fn sgd_rule(config: &SgdConfig, lr: f64, first_step: bool) -> Result<LinearRule> {
    let v = serde_json::to_value(config).map_err(|e| Error::Burn(e.to_string()))?;
    if !v["gradient_clipping"].is_null() {
        return Err(Error::Ledger(refinement_ledger::Error::InvalidConfig {
            what: "burn SgdConfig",
            reason: "gradient_clipping clips each parameter tensor separately, which the ledger \
                     cannot credit per example; clip by the global norm before the step, or \
                     credit per batch"
                .into(),
        }));
    }
    let number = |x: &serde_json::Value, what: &str| {
        x.as_f64()
            .ok_or_else(|| Error::Burn(format!("SgdConfig {what} is not a number: {x}")))
    };
    let m = &v["momentum"];
    let (momentum, dampening, nesterov) = if m.is_null() {
        (0.0, 0.0, false)
    } else {
        (
            number(&m["momentum"], "momentum")?,
            number(&m["dampening"], "dampening")?,
            m["nesterov"].as_bool().unwrap_or(false),
        )
    };
    let weight_decay = match &v["weight_decay"] {
        serde_json::Value::Null => 0.0,
        d => number(&d["penalty"], "weight decay penalty")?,
    };
    let rule = LinearRule {
        lr,
        momentum,
        dampening,
        nesterov,
        weight_decay,
        first_step,
    };
    rule.validate()?;
    Ok(rule)
}
