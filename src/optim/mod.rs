//! Optimizers: the step of an iterative method over parameters and their gradients.
//!
//! An optimizer that is linear in past gradients reports its [`LinearRule`]; the
//! [`OptimizerHook`](crate::OptimizerHook) then credits every example exactly.
//! Any other optimizer is traced by a before/after diff credited to the batch.

mod adam;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamState};
pub use sgd::{LrSchedule, Sgd, SgdConfig, SgdState};

use std::collections::BTreeMap;

use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::trace::{ParamId, ParamMut};

/// The next step of an SGD-family optimizer, in PyTorch's semantics:
///
/// ```text
/// g   = ∇ + λ·w
/// buf = g                        on the first step
///     = μ·buf + (1 − dampening)·g   after it
/// d   = g + μ·buf  (Nesterov)  or  buf  (μ > 0)  or  g  (μ = 0)
/// w  ← w − lr·d
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearRule {
    /// Learning rate of this step.
    pub lr: f64,
    /// Momentum `μ` (0 for plain SGD).
    pub momentum: f64,
    /// Dampening of new gradients in the buffer.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay `λ` (added to the gradient).
    pub weight_decay: f64,
    /// Whether this is the first step (the buffer starts as the undampened gradient).
    pub first_step: bool,
}

impl LinearRule {
    /// The weight with which a gradient entering the buffer this step enters it:
    /// 1 on the first step, `1 − dampening` after it.
    pub fn entry_weight(&self) -> f64 {
        if self.first_step || self.momentum == 0.0 {
            1.0
        } else {
            1.0 - self.dampening
        }
    }

    /// Checks that the rule is one the hook can credit: a finite learning rate
    /// `≥ 0`, momentum in `[0, 1)`, dampening in `[0, 1]`, finite weight decay
    /// `≥ 0`, and Nesterov only with momentum (with dampening too, as burn
    /// allows; PyTorch does not).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the first value out of range (an
    /// optimizer reporting such a rule would give a ledger that cannot be saved).
    ///
    /// # Example
    /// ```
    /// use refinement_ledger::LinearRule;
    /// let rule = LinearRule { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: true,
    ///                         weight_decay: 1e-4, first_step: true };
    /// assert!(rule.validate().is_ok());
    /// assert!(LinearRule { lr: f64::NAN, ..rule }.validate().is_err());
    /// assert!(LinearRule { weight_decay: f64::INFINITY, ..rule }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        check_range("linear rule lr", self.lr, 0.0, f64::MAX, true)?;
        check_range("linear rule momentum", self.momentum, 0.0, 1.0, false)?;
        check_range("linear rule dampening", self.dampening, 0.0, 1.0, true)?;
        check_range(
            "linear rule weight_decay",
            self.weight_decay,
            0.0,
            f64::MAX,
            true,
        )?;
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::InvalidConfig {
                what: "linear rule nesterov",
                reason: "needs momentum > 0, found momentum 0".into(),
            });
        }
        Ok(())
    }

    /// One step of the momentum recursion for one value: the buffer entry
    /// becomes `μ·buf + w·g` (`w` = [`entry_weight`](Self::entry_weight)) and
    /// the update direction is returned (`g + μ·buf` with Nesterov, `buf` with
    /// momentum, `g` without; the step is `w ← w − lr·direction`).
    ///
    /// The optimizer applies it to every gradient value, the hook to the weight
    /// a past gradient share still has in the buffer (`g = 0`) and to this
    /// step's share (`g = 1`): the recursion is written once.
    ///
    /// # Example
    /// ```
    /// use refinement_ledger::LinearRule;
    /// let rule = LinearRule { lr: 0.1, momentum: 0.9, dampening: 0.0, nesterov: false,
    ///                         weight_decay: 0.0, first_step: false };
    /// let mut buf = 1.0;
    /// assert!((rule.advance(&mut buf, 1.0) - 1.9f64).abs() < 1e-12);
    /// assert!((buf - 1.9f64).abs() < 1e-12);
    /// ```
    #[inline]
    pub fn advance<T: Float>(&self, buf: &mut T, g: T) -> T {
        if self.momentum == 0.0 {
            return g;
        }
        let mu = T::narrow(self.momentum);
        *buf = mu * *buf + T::narrow(self.entry_weight()) * g;
        if self.nesterov { g + mu * *buf } else { *buf }
    }
}

/// An iterative optimizer over named parameters.
///
/// Implement it to trace your own optimizer: the hook diffs the traced
/// parameters around [`step`](Self::step), so any update rule is traced exactly
/// at batch level. Report a [`LinearRule`] only when the step is exactly that
/// rule; the hook checks it and books any difference to the ledger's residual.
pub trait Optimizer<F: Float = f32> {
    /// Updates every parameter in place from its gradient.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when a gradient's shape is not its value's,
    /// [`Error::NonFinite`] when a gradient holds NaN or infinity.
    fn step(&mut self, params: &mut [ParamMut<'_, F>]) -> Result<()>;

    /// The rule of the next [`step`](Self::step), when it is linear in the gradients.
    fn linear_rule(&self) -> Option<LinearRule> {
        None
    }

    /// The optimizer's state (step count, buffers), for a checkpoint
    /// ([`OptimizerHook::save_checkpoint`](crate::OptimizerHook::save_checkpoint)).
    ///
    /// # Errors
    /// By default [`Error::InvalidConfig`]: an optimizer that does not say what
    /// its state is cannot be checkpointed (a resumed run would silently
    /// restart its buffers). A stateless optimizer returns
    /// `OptimizerState::new("name")`.
    fn export_state(&self) -> Result<OptimizerState<F>> {
        Err(no_state())
    }

    /// Replaces the optimizer's state by one [`export_state`](Self::export_state) gave.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for the state of another kind of optimizer (and
    /// by default, as [`export_state`](Self::export_state)).
    fn import_state(&mut self, state: OptimizerState<F>) -> Result<()> {
        let _ = state;
        Err(no_state())
    }
}

fn no_state() -> Error {
    Error::InvalidConfig {
        what: "optimizer state",
        reason: "this optimizer does not implement Optimizer::export_state and \
                 import_state; implement both to checkpoint a run with it"
            .into(),
    }
}

/// An optimizer's state as named tensors: what a checkpoint keeps of it.
///
/// # Example
/// ```
/// use ndarray::array;
/// use refinement_ledger::{Optimizer, ParamId, ParamMut, optim::SgdConfig};
/// let mut sgd = SgdConfig::new(0.1).with_momentum(0.9).build::<f64>()?;
/// let (mut w, g) = (array![1.0].into_dyn(), array![0.5].into_dyn());
/// sgd.step(&mut [ParamMut { id: ParamId("w".into()), value: w.view_mut(), grad: g.view() }])?;
/// let state = sgd.export_state()?;
/// assert_eq!((state.kind.as_str(), state.step, state.tensors.len()), ("sgd", 1, 1));
/// let mut resumed = SgdConfig::new(0.1).with_momentum(0.9).build::<f64>()?;
/// resumed.import_state(state)?;
/// assert_eq!(resumed.state(), sgd.state());
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState<F: Float = f32> {
    /// The kind of optimizer (`"sgd"`, `"adam"`, …): a state is imported only
    /// by the kind that exported it.
    pub kind: String,
    /// Steps taken.
    pub step: u64,
    /// Named buffers (e.g. `momentum.fc1.weight`).
    pub tensors: Vec<(String, ArrayD<F>)>,
}

impl<F: Float> OptimizerState<F> {
    /// An empty state of `kind` (a stateless optimizer's).
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            step: 0,
            tensors: Vec::new(),
        }
    }

    /// Checks that this is the state of `kind`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming both kinds.
    pub fn expect_kind(&self, kind: &str) -> Result<()> {
        if self.kind == kind {
            Ok(())
        } else {
            Err(Error::InvalidConfig {
                what: "optimizer state",
                reason: format!(
                    "the state of a {:?} optimizer cannot be imported into a {kind:?} one",
                    self.kind
                ),
            })
        }
    }

    /// The buffers whose names start with `prefix` (the prefix stripped), as a map by parameter.
    pub(crate) fn buffers(&self, prefix: &str) -> BTreeMap<ParamId, ArrayD<F>> {
        self.tensors
            .iter()
            .filter_map(|(n, t)| {
                let id = n.strip_prefix(prefix)?.strip_prefix('.')?;
                Some((ParamId(id.to_string()), t.clone()))
            })
            .collect()
    }

    /// Adds `buffers` named `prefix.{parameter}`.
    pub(crate) fn push_buffers(&mut self, prefix: &str, buffers: &BTreeMap<ParamId, ArrayD<F>>) {
        for (id, t) in buffers {
            self.tensors.push((format!("{prefix}.{}", id.0), t.clone()));
        }
    }
}

impl<F: Float, O: Optimizer<F> + ?Sized> Optimizer<F> for Box<O> {
    fn step(&mut self, params: &mut [ParamMut<'_, F>]) -> Result<()> {
        (**self).step(params)
    }
    fn linear_rule(&self) -> Option<LinearRule> {
        (**self).linear_rule()
    }
    fn export_state(&self) -> Result<OptimizerState<F>> {
        (**self).export_state()
    }
    fn import_state(&mut self, state: OptimizerState<F>) -> Result<()> {
        (**self).import_state(state)
    }
}

/// Checks that every gradient matches its value's shape and is finite.
pub(crate) fn check_params<F: Float>(params: &[ParamMut<'_, F>], op: &'static str) -> Result<()> {
    for p in params {
        if p.value.shape() != p.grad.shape() {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("gradient of {} shaped {}", p.id, shape_str(p.value.shape())),
                got: shape_str(p.grad.shape()),
            });
        }
        check_finite(&p.grad, op, &format!("gradient of {}", p.id))?;
    }
    Ok(())
}

/// Whether `x` is finite and strictly positive (false for NaN).
pub(crate) fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// Validates that `value` is finite and within `[lo, hi)` (or `[lo, hi]` when `inclusive`).
pub(crate) fn check_range(
    what: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    inclusive: bool,
) -> Result<()> {
    let ok = value.is_finite() && value >= lo && (value < hi || (inclusive && value <= hi));
    if ok {
        Ok(())
    } else {
        let close = if inclusive { ']' } else { ')' };
        Err(Error::InvalidConfig {
            what,
            reason: format!("must be in [{lo}, {hi}{close}, found {value}"),
        })
    }
}
