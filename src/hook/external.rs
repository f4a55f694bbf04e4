//! Tracing an optimizer that steps outside the hook — a framework's own
//! (burn's, candle's) or a hand-written one: the hook is told each step's
//! [`LinearRule`] (or credits per batch) and reads the parameters after it.
//!
//! The ledger is the one the hook would have built had it stepped itself: the
//! parameters before a step are those it read after the previous one, so the
//! update it books is everything that moved them in between — and in
//! per-example mode that update must fit the factors and the rule (see
//! [`StepCheck`](crate::StepCheck)).
//!
//! Exact per example: SGD with or without momentum, dampening, Nesterov and
//! L2 weight decay added to the gradient (PyTorch's, burn's and candle's SGD),
//! with any learning-rate schedule, and with the gradient uniformly scaled
//! (clipping by global norm, loss scaling). Adam, AdamW, RMSProp and every
//! other rule that is not linear in the gradients: per batch
//! ([`Credit::Batch`](super::Credit::Batch)).

use super::OptimizerHook;
use super::{Batch, HookConfig};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::optim::{LinearRule, Optimizer, OptimizerState};
use crate::trace::{ParamMut, Traceable};

/// The kind [`External`] exports its (empty) state as.
pub(super) const EXTERNAL_KIND: &str = "external";

/// The optimizer of an [`OptimizerHook::external`] hook: it steps outside the
/// hook, which is told each step's rule by [`OptimizerHook::record_step`].
#[derive(Clone, Copy, Debug, Default)]
pub struct External;

impl<F: Float> Optimizer<F> for External {
    fn step(&mut self, _params: &mut [ParamMut<'_, F>]) -> Result<()> {
        Err(Error::InvalidConfig {
            what: "External optimizer",
            reason: "steps outside the hook: step your optimizer, then call \
                     OptimizerHook::record_step"
                .into(),
        })
    }

    /// Stateless: the optimizer that steps outside keeps its own state (save
    /// it with its framework's checkpoint).
    fn export_state(&self) -> Result<OptimizerState<F>> {
        Ok(OptimizerState::new(EXTERNAL_KIND))
    }

    fn import_state(&mut self, state: OptimizerState<F>) -> Result<()> {
        state.expect_kind(EXTERNAL_KIND)
    }
}

impl<F: Float> OptimizerHook<External, F> {
    /// A hook for an optimizer that steps outside it; `layers` at their
    /// initial parameters. With [`Credit::Auto`](super::Credit::Auto) (the
    /// default) every step is credited per example and needs its rule; with
    /// [`Credit::Batch`](super::Credit::Batch) per batch.
    ///
    /// # Errors
    /// As [`OptimizerHook::with_config`].
    ///
    /// # Example
    /// A hand-written loop with its own SGD step (momentum 0.9, clipped gradient):
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, HookConfig, LinearRule, OptimizerHook, nn::{DenseConfig, Sequential}};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// let mut hook = OptimizerHook::external(&net.traceables(), HookConfig::default())?;
    /// let (x, y, ids) = (array![[1.0, 0.0], [0.0, 1.0]].into_dyn(), [0, 1], [ExampleId(0), ExampleId(1)]);
    /// let mut velocity = vec![0.0; 6];
    /// for step in 0..4 {
    ///     net.train_batch(x.view(), &y)?;
    ///     // The user's optimizer: clip to norm 0.1, then SGD with momentum.
    ///     for layer in net.traceables_mut() {
    ///         let mut params = layer.params_mut();
    ///         let norm = params.iter().flat_map(|p| p.grad.iter()).map(|g| g * g).sum::<f64>().sqrt();
    ///         let clip = (0.1 / norm).min(1.0);
    ///         let mut k = 0;
    ///         for p in &mut params {
    ///             let grad = p.grad.to_owned();
    ///             for (w, g) in p.value.iter_mut().zip(grad.iter()) {
    ///                 velocity[k] = if step == 0 { clip * g } else { 0.9 * velocity[k] + clip * g };
    ///                 *w -= 0.5 * velocity[k];
    ///                 k += 1;
    ///             }
    ///         }
    ///     }
    ///     let rule = LinearRule { lr: 0.5, momentum: 0.9, dampening: 0.0, nesterov: false,
    ///                             weight_decay: 0.0, first_step: step == 0 };
    ///     hook.record_step(&net.traceables(), &Batch::new(&ids, &y), Some(rule))?;
    ///     assert!(hook.last_check().unwrap().scale <= 1.0 + 1e-12); // the clipping, found
    /// }
    /// let ledger = hook.finish()?;
    /// assert!(ledger.residual_fraction()[0] < 1e-9);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn external(layers: &[&dyn Traceable<F>], config: HookConfig) -> Result<Self> {
        let mut hook = Self::with_config(External, layers, config)?;
        hook.per_example = hook.config.per_example_external();
        Ok(hook)
    }

    /// Records a step the optimizer has taken on `layers` (their factors from
    /// the backward pass it stepped on): `rule` is the step's update rule
    /// (`None` when crediting per batch). The parameters before the step are
    /// those read after the previous one.
    ///
    /// # Errors
    /// As [`OptimizerHook::step`], and [`Error::InvalidConfig`] for a
    /// per-example step without a rule.
    pub fn record_step(
        &mut self,
        layers: &[&dyn Traceable<F>],
        batch: &Batch<'_>,
        rule: Option<LinearRule>,
    ) -> Result<()> {
        let rule = self.step_rule(rule)?;
        self.precheck(layers, batch, rule)?;
        self.book(layers, batch, rule, false)
    }
}
