//! Stochastic gradient descent with momentum, Nesterov, dampening, weight decay
//! and a learning-rate schedule.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

use super::{LinearRule, Optimizer, OptimizerState, check_params, positive};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::{ParamId, ParamMut};

/// The learning rate as a function of the step number `t` (from 0).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum LrSchedule {
    /// `lr` at every step. The default.
    Constant,
    /// `lr · gamma^⌊t / every⌋`.
    Step {
        /// Steps between decays.
        every: u64,
        /// Decay factor.
        gamma: f64,
    },
    /// `lr · gamma^t`.
    Exponential {
        /// Decay factor per step.
        gamma: f64,
    },
    /// `lr · factors[t]` (the last factor after the list ends).
    Factors(Vec<f64>),
}

impl LrSchedule {
    fn factor(&self, t: u64) -> f64 {
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Step { every, gamma } => gamma.powi((t / every) as i32),
            LrSchedule::Exponential { gamma } => gamma.powi(t as i32),
            LrSchedule::Factors(f) => *f
                .get(t as usize)
                .or(f.last())
                .expect("invariant: validated non-empty"),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidConfig {
                what: "lr schedule",
                reason,
            })
        };
        match self {
            LrSchedule::Constant => Ok(()),
            LrSchedule::Step { every, gamma } if *every == 0 || !positive(*gamma) => bad(format!(
                "needs every > 0 and finite gamma > 0, found every {every}, gamma {gamma}"
            )),
            LrSchedule::Exponential { gamma } if !positive(*gamma) => {
                bad(format!("needs finite gamma > 0, found {gamma}"))
            }
            LrSchedule::Factors(f)
                if f.is_empty() || f.iter().any(|x| !x.is_finite() || *x < 0.0) =>
            {
                bad(format!(
                    "needs a non-empty list of finite factors >= 0, found {f:?}"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// Configuration of [`Sgd`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Base learning rate.
    pub lr: f64,
    /// Momentum `μ`. Default: 0.
    pub momentum: f64,
    /// Dampening. Default: 0.
    pub dampening: f64,
    /// Nesterov momentum (needs `μ > 0` and no dampening). Default: false.
    pub nesterov: bool,
    /// L2 weight decay `λ`. Default: 0.
    pub weight_decay: f64,
    /// Learning-rate schedule. Default: constant.
    pub schedule: LrSchedule,
}

impl SgdConfig {
    /// Plain SGD with learning rate `lr`.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            schedule: LrSchedule::Constant,
        }
    }
    /// Sets the momentum.
    pub fn with_momentum(mut self, momentum: f64) -> Self {
        self.momentum = momentum;
        self
    }
    /// Sets the dampening.
    pub fn with_dampening(mut self, dampening: f64) -> Self {
        self.dampening = dampening;
        self
    }
    /// Turns Nesterov momentum on or off.
    pub fn with_nesterov(mut self, nesterov: bool) -> Self {
        self.nesterov = nesterov;
        self
    }
    /// Sets the L2 weight decay.
    pub fn with_weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = weight_decay;
        self
    }
    /// Sets the learning-rate schedule.
    pub fn with_schedule(mut self, schedule: LrSchedule) -> Self {
        self.schedule = schedule;
        self
    }

    /// Validates the configuration and builds the optimizer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `lr ≤ 0`, `μ ∉ [0, 1)`, dampening outside `[0, 1]`,
    /// negative decay, Nesterov without momentum, or a bad schedule.
    pub fn build<F: Float>(&self) -> Result<Sgd<F>> {
        if !positive(self.lr) {
            return Err(Error::InvalidConfig {
                what: "sgd lr",
                reason: format!("must be finite and > 0, found {}", self.lr),
            });
        }
        // The ranges of the rule the optimizer will report: checked in one place.
        LinearRule {
            lr: self.lr,
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            first_step: true,
        }
        .validate()?;
        self.schedule.validate()?;
        Ok(Sgd {
            config: self.clone(),
            state: SgdState::default(),
        })
    }
}

/// The state of [`Sgd`]: the step count and one momentum buffer per parameter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct SgdState<F: Float = f32> {
    /// Steps taken.
    pub step: u64,
    /// Momentum buffer per parameter (empty without momentum).
    pub momentum: BTreeMap<ParamId, ArrayD<F>>,
}

/// Stochastic gradient descent (PyTorch semantics; see [`LinearRule`]).
///
/// # Example
/// ```
/// use ndarray::array;
/// use refinement_ledger::{Optimizer, ParamId, ParamMut, optim::SgdConfig};
/// let mut w = array![1.0f64, 2.0].into_dyn();
/// let g = array![0.5f64, -1.0].into_dyn();
/// let mut sgd = SgdConfig::new(0.1).build::<f64>()?;
/// sgd.step(&mut [ParamMut { id: ParamId("w".into()), value: w.view_mut(), grad: g.view() }])?;
/// assert!((w[0] - 0.95).abs() < 1e-12 && (w[1] - 2.1).abs() < 1e-12);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Sgd<F: Float = f32> {
    config: SgdConfig,
    state: SgdState<F>,
}

impl<F: Float> Sgd<F> {
    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
    /// The state (step count, momentum buffers).
    pub fn state(&self) -> &SgdState<F> {
        &self.state
    }
    /// Replaces the state (to resume a run).
    pub fn load_state(&mut self, state: SgdState<F>) {
        self.state = state;
    }
    /// The learning rate of step `t`.
    pub fn lr_at(&self, t: u64) -> f64 {
        self.config.lr * self.config.schedule.factor(t)
    }
}

impl<F: Float> Optimizer<F> for Sgd<F> {
    fn step(&mut self, params: &mut [ParamMut<'_, F>]) -> Result<()> {
        check_params(params, "Sgd::step")?;
        let rule = self.linear_rule().expect("invariant: sgd is linear");
        let lr = F::narrow(rule.lr);
        let wd = F::narrow(rule.weight_decay);
        for p in params.iter_mut() {
            let g: ArrayD<F> = if rule.weight_decay != 0.0 {
                &p.grad + &p.value.mapv(|w| w * wd)
            } else {
                p.grad.to_owned()
            };
            if rule.momentum == 0.0 {
                Zip::from(&mut p.value)
                    .and(&g)
                    .for_each(|w, &gi| *w -= lr * gi);
                continue;
            }
            let buf = self
                .state
                .momentum
                .entry(p.id.clone())
                .or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            if buf.shape() != g.shape() {
                return Err(Error::ShapeMismatch {
                    op: "Sgd::step (momentum buffer)",
                    expected: format!("{:?} for {}", buf.shape(), p.id),
                    got: format!("{:?}", g.shape()),
                });
            }
            Zip::from(&mut p.value)
                .and(&mut *buf)
                .and(&g)
                .for_each(|w, b, &gi| *w -= lr * rule.advance(b, gi));
        }
        self.state.step = self.state.step.saturating_add(1);
        Ok(())
    }

    fn linear_rule(&self) -> Option<LinearRule> {
        Some(LinearRule {
            lr: self.lr_at(self.state.step),
            momentum: self.config.momentum,
            dampening: self.config.dampening,
            nesterov: self.config.nesterov,
            weight_decay: self.config.weight_decay,
            first_step: self.state.step == 0,
        })
    }

    fn export_state(&self) -> Result<OptimizerState<F>> {
        let mut state = OptimizerState::new("sgd");
        state.step = self.state.step;
        state.push_buffers("momentum", &self.state.momentum);
        Ok(state)
    }

    fn import_state(&mut self, state: OptimizerState<F>) -> Result<()> {
        state.expect_kind("sgd")?;
        self.state = SgdState {
            step: state.step,
            momentum: state.buffers("momentum"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    /// Runs `steps` steps from `w0` with the gradients `grads[t]` and returns the weights after each.
    fn run(cfg: SgdConfig, w0: f64, grads: &[f64]) -> Vec<f64> {
        let mut sgd = cfg.build::<f64>().unwrap();
        let mut w = ArrayD::from_elem(IxDyn(&[1]), w0);
        grads
            .iter()
            .map(|&g| {
                let g = ArrayD::from_elem(IxDyn(&[1]), g);
                let mut p = [ParamMut {
                    id: ParamId("w".into()),
                    value: w.view_mut(),
                    grad: g.view(),
                }];
                sgd.step(&mut p).unwrap();
                w[0]
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn momentum_golden_values() {
        // buf: 1, 1.9, 2.71 → w: −0.1, −0.29, −0.561
        close(
            &run(SgdConfig::new(0.1).with_momentum(0.9), 0.0, &[1.0; 3]),
            &[-0.1, -0.29, -0.561],
        );
    }

    #[test]
    fn nesterov_golden_values() {
        // d = g + μ·buf: 1.9, then 1 + 0.9·1.9 = 2.71 → w: −0.19, −0.461
        close(
            &run(
                SgdConfig::new(0.1).with_momentum(0.9).with_nesterov(true),
                0.0,
                &[1.0; 2],
            ),
            &[-0.19, -0.461],
        );
    }

    #[test]
    fn dampening_skips_the_first_step() {
        // buf: 1 (undampened), 0.9 + 0.5 = 1.4 → w: −0.1, −0.24
        close(
            &run(
                SgdConfig::new(0.1).with_momentum(0.9).with_dampening(0.5),
                0.0,
                &[1.0; 2],
            ),
            &[-0.1, -0.24],
        );
    }

    #[test]
    fn weight_decay_and_schedule_golden_values() {
        // g' = 0.1·w: w = 1 − 0.1·0.1 = 0.99; then lr halves: 0.99 − 0.05·0.099 = 0.98505
        let cfg = SgdConfig::new(0.1)
            .with_weight_decay(0.1)
            .with_schedule(LrSchedule::Step {
                every: 1,
                gamma: 0.5,
            });
        close(&run(cfg, 1.0, &[0.0; 2]), &[0.99, 0.98505]);
    }

    #[test]
    fn linear_rule_reports_the_next_step() {
        let mut sgd = SgdConfig::new(0.2)
            .with_momentum(0.5)
            .with_schedule(LrSchedule::Factors(vec![1.0, 0.5]))
            .build::<f32>()
            .unwrap();
        let r0 = sgd.linear_rule().unwrap();
        assert!(r0.first_step && (r0.lr - 0.2).abs() < 1e-12);
        let mut w = ArrayD::<f32>::zeros(IxDyn(&[1]));
        let g = ArrayD::<f32>::ones(IxDyn(&[1]));
        sgd.step(&mut [ParamMut {
            id: ParamId("w".into()),
            value: w.view_mut(),
            grad: g.view(),
        }])
        .unwrap();
        let r1 = sgd.linear_rule().unwrap();
        assert!(!r1.first_step && (r1.lr - 0.1).abs() < 1e-12);
    }
}
