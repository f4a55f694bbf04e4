//! Adam and AdamW.

use std::collections::BTreeMap;

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

use super::{Optimizer, OptimizerState, check_params, check_range, positive};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::{ParamId, ParamMut};

/// Configuration of [`Adam`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    /// Learning rate. Default in [`new`](Self::new): 1e-3.
    pub lr: f64,
    /// First-moment decay. Default: 0.9.
    pub beta1: f64,
    /// Second-moment decay. Default: 0.999.
    pub beta2: f64,
    /// Denominator offset. Default: 1e-8.
    pub eps: f64,
    /// Weight decay `λ`. Default: 0.
    pub weight_decay: f64,
    /// Decoupled decay (AdamW: `w ← w − lr·λ·w`) instead of L2 in the gradient. Default: false.
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }
}

impl AdamConfig {
    /// Adam with learning rate `lr` and the usual betas.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            ..Self::default()
        }
    }
    /// Sets the betas.
    pub fn with_betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }
    /// Sets the weight decay, decoupled (AdamW) or not.
    pub fn with_weight_decay(mut self, weight_decay: f64, decoupled: bool) -> Self {
        self.weight_decay = weight_decay;
        self.decoupled = decoupled;
        self
    }

    /// Validates the configuration and builds the optimizer.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for `lr ≤ 0`, betas outside `[0, 1)`, `eps ≤ 0` or negative decay.
    pub fn build<F: Float>(&self) -> Result<Adam<F>> {
        if !positive(self.lr) || !positive(self.eps) {
            return Err(Error::InvalidConfig {
                what: "adam lr/eps",
                reason: format!(
                    "must be finite and > 0, found lr {}, eps {}",
                    self.lr, self.eps
                ),
            });
        }
        check_range("adam beta1", self.beta1, 0.0, 1.0, false)?;
        check_range("adam beta2", self.beta2, 0.0, 1.0, false)?;
        check_range(
            "adam weight_decay",
            self.weight_decay,
            0.0,
            f64::INFINITY,
            false,
        )?;
        Ok(Adam {
            config: self.clone(),
            state: AdamState::default(),
        })
    }
}

/// The state of [`Adam`]: step count and both moment estimates per parameter.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(bound = "F: Float")]
pub struct AdamState<F: Float = f32> {
    /// Steps taken.
    pub step: u64,
    /// First moments.
    pub m: BTreeMap<ParamId, ArrayD<F>>,
    /// Second moments.
    pub v: BTreeMap<ParamId, ArrayD<F>>,
}

/// Adam (Kingma & Ba) with bias correction; AdamW with `decoupled` decay.
///
/// Not linear in the gradients: the hook traces it by a before/after diff
/// credited to each step's batch.
///
/// # Example
/// ```
/// use refinement_ledger::{Optimizer, ParamId, ParamMut, optim::AdamConfig};
/// let mut adam = AdamConfig::new(0.1).build::<f64>()?;
/// assert!(adam.linear_rule().is_none());
/// let mut w = ndarray::array![1.0].into_dyn();
/// let g = ndarray::array![0.5].into_dyn();
/// adam.step(&mut [ParamMut { id: ParamId("w".into()), value: w.view_mut(), grad: g.view() }])?;
/// // The first bias-corrected Adam step moves by lr · sign(g).
/// assert!((w[[0]] - 0.9).abs() < 1e-6);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Adam<F: Float = f32> {
    config: AdamConfig,
    state: AdamState<F>,
}

impl<F: Float> Adam<F> {
    /// The state.
    pub fn state(&self) -> &AdamState<F> {
        &self.state
    }
    /// Replaces the state (to resume a run).
    pub fn load_state(&mut self, state: AdamState<F>) {
        self.state = state;
    }
}

impl<F: Float> Optimizer<F> for Adam<F> {
    fn step(&mut self, params: &mut [ParamMut<'_, F>]) -> Result<()> {
        check_params(params, "Adam::step")?;
        let c = &self.config;
        let t = self.state.step.saturating_add(1);
        let (b1, b2) = (F::narrow(c.beta1), F::narrow(c.beta2));
        let bc1 = F::narrow(1.0 - c.beta1.powi(t as i32));
        let bc2 = F::narrow(1.0 - c.beta2.powi(t as i32));
        let (lr, eps, wd) = (F::narrow(c.lr), F::narrow(c.eps), F::narrow(c.weight_decay));
        for p in params.iter_mut() {
            let mut g = p.grad.to_owned();
            if c.weight_decay != 0.0 {
                if c.decoupled {
                    p.value.mapv_inplace(|w| w - lr * wd * w);
                } else {
                    Zip::from(&mut g)
                        .and(&p.value)
                        .for_each(|gi, &w| *gi += wd * w);
                }
            }
            let m = self
                .state
                .m
                .entry(p.id.clone())
                .or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            let v = self
                .state
                .v
                .entry(p.id.clone())
                .or_insert_with(|| ArrayD::zeros(g.raw_dim()));
            if m.shape() != g.shape() || v.shape() != g.shape() {
                return Err(Error::ShapeMismatch {
                    op: "Adam::step (moments)",
                    expected: format!("{:?} for {}", m.shape(), p.id),
                    got: format!("{:?}", g.shape()),
                });
            }
            Zip::from(&mut p.value)
                .and(&mut *m)
                .and(&mut *v)
                .and(&g)
                .for_each(|w, m, v, &gi| {
                    *m = b1 * *m + (F::one() - b1) * gi;
                    *v = b2 * *v + (F::one() - b2) * gi * gi;
                    let m_hat = *m / bc1;
                    let v_hat = *v / bc2;
                    *w -= lr * m_hat / (v_hat.sqrt() + eps);
                });
        }
        self.state.step = t;
        Ok(())
    }

    fn export_state(&self) -> Result<OptimizerState<F>> {
        let mut state = OptimizerState::new("adam");
        state.step = self.state.step;
        state.push_buffers("m", &self.state.m);
        state.push_buffers("v", &self.state.v);
        Ok(state)
    }

    fn import_state(&mut self, state: OptimizerState<F>) -> Result<()> {
        state.expect_kind("adam")?;
        self.state = AdamState {
            step: state.step,
            m: state.buffers("m"),
            v: state.buffers("v"),
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::IxDyn;

    fn run(cfg: AdamConfig, w0: f64, grads: &[f64]) -> Vec<f64> {
        let mut adam = cfg.build::<f64>().unwrap();
        let mut w = ArrayD::from_elem(IxDyn(&[1]), w0);
        grads
            .iter()
            .map(|&g| {
                let g = ArrayD::from_elem(IxDyn(&[1]), g);
                adam.step(&mut [ParamMut {
                    id: ParamId("w".into()),
                    value: w.view_mut(),
                    grad: g.view(),
                }])
                .unwrap();
                w[0]
            })
            .collect()
    }

    #[test]
    fn adam_golden_values() {
        // g = 1, −1: m̂ = 1 then −0.01/0.19, v̂ = 1 both times (eps 1e-8)
        let w = run(AdamConfig::new(0.1), 0.0, &[1.0, -1.0]);
        let step1 = -0.1 / (1.0 + 1e-8);
        let v_hat2: f64 = (0.999 * 0.001 + 0.001) / (1.0 - 0.999f64.powi(2));
        let step2 = step1 - 0.1 * (-0.01 / 0.19) / (v_hat2.sqrt() + 1e-8);
        assert!(
            (w[0] - step1).abs() < 1e-12 && (w[1] - step2).abs() < 1e-12,
            "{w:?}"
        );
        assert!((w[1] + 0.094_736_842).abs() < 1e-6);
    }

    #[test]
    fn adamw_decays_decoupled_from_the_gradient() {
        // g = 0: moments stay 0, only w ← w − lr·λ·w acts: 1 → 0.99 → 0.9801
        let w = run(
            AdamConfig::new(0.1).with_weight_decay(0.1, true),
            1.0,
            &[0.0, 0.0],
        );
        assert!(
            (w[0] - 0.99).abs() < 1e-12 && (w[1] - 0.9801).abs() < 1e-12,
            "{w:?}"
        );
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let cfg = AdamConfig::new(0.05);
        let mut a = cfg.build::<f64>().unwrap();
        let mut w = ArrayD::from_elem(IxDyn(&[2]), 0.5);
        let g = ArrayD::from_elem(IxDyn(&[2]), 0.3);
        a.step(&mut [ParamMut {
            id: ParamId("w".into()),
            value: w.view_mut(),
            grad: g.view(),
        }])
        .unwrap();
        let mut b = cfg.build::<f64>().unwrap();
        b.load_state(a.state().clone());
        let mut w2 = w.clone();
        a.step(&mut [ParamMut {
            id: ParamId("w".into()),
            value: w.view_mut(),
            grad: g.view(),
        }])
        .unwrap();
        b.step(&mut [ParamMut {
            id: ParamId("w".into()),
            value: w2.view_mut(),
            grad: g.view(),
        }])
        .unwrap();
        assert_eq!(w, w2);
    }
}
