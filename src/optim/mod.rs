//! Optimizers: the step of an iterative method over parameters and their gradients.
//!
//! An optimizer that is linear in past gradients reports its [`LinearRule`]; the
//! [`OptimizerHook`](crate::OptimizerHook) then credits every example exactly.
//! Any other optimizer is traced by a before/after diff credited to the batch.

mod adam;
mod sgd;

pub use adam::{Adam, AdamConfig, AdamState};
pub use sgd::{LrSchedule, Sgd, SgdConfig, SgdState};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::trace::ParamMut;

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
}

impl<F: Float, O: Optimizer<F> + ?Sized> Optimizer<F> for Box<O> {
    fn step(&mut self, params: &mut [ParamMut<'_, F>]) -> Result<()> {
        (**self).step(params)
    }
    fn linear_rule(&self) -> Option<LinearRule> {
        (**self).linear_rule()
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
