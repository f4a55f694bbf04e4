//! [`OptimizerHook`]: wraps an optimizer and books every step into a [`Ledger`].
//!
//! Per-example mode (optimizers with a [`LinearRule`](crate::LinearRule): SGD with momentum,
//! Nesterov, dampening, weight decay and schedules) credits each example with
//! its share of the batch gradient times the weight with which that share
//! reaches the parameters (see [`per_example`]). Batch mode (any other
//! optimizer, or on request) credits the exact update of each step to the
//! step's batch (see [`batch`]).
//!
//! The hook owns what is the optimizer's business — calling its step, its
//! update rule, the momentum shares still pending; the [`Ledger`] owns the
//! accounts and computes the residual (whatever the optimizer did that was not
//! credited: rounding, a gradient the factors do not explain, a change made
//! outside the hook, a folded momentum tail), so it always balances.

mod batch;
mod check;
mod checkpoint;
mod config;
mod external;
mod online;
mod params;
mod per_example;
mod validate;

pub use check::StepCheck;
pub use checkpoint::{CHECKPOINT_FORMAT, CHECKPOINT_VERSION};
pub use config::{Batch, Credit, HookConfig, OnMismatch};
pub use external::External;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::Ledger;
use crate::optim::{LinearRule, Optimizer};
use crate::trace::{ParamMut, Traceable};
use per_example::{Shares, register_examples};

/// Wraps an [`Optimizer`] and records into a [`Ledger`] what each step did and who caused it.
///
/// # Example
/// ```
/// use ndarray::Array2;
/// use rand::{SeedableRng, rngs::StdRng};
/// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Relu, Sequential}, optim::SgdConfig};
/// let mut rng = StdRng::seed_from_u64(0);
/// let mut net = Sequential::<f64>::new()
///     .with(DenseConfig::new(2, 4).build("fc1", &mut rng)?)
///     .with(Relu::new())
///     .with(DenseConfig::new(4, 2).build("fc2", &mut rng)?);
/// let sgd = SgdConfig::new(0.1).with_momentum(0.9).build()?;
/// let mut hook = OptimizerHook::new(sgd, &net.traceables())?;
/// let x = Array2::from_shape_vec((2, 2), vec![1.0, 0.5, -1.0, 0.2]).unwrap();
/// for _ in 0..5 {
///     net.train_batch(x.view().into_dyn(), &[0, 1])?;
///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1)], &[0, 1]))?;
/// }
/// let ledger = hook.finish()?;
/// assert_eq!(ledger.sources().len(), 2);
/// assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-9));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Debug)]
pub struct OptimizerHook<O, F: Float = f32> {
    optimizer: O,
    config: HookConfig,
    per_example: bool,
    ledger: Ledger<F>,
    step: u64,
    shares: Shares<F>,
    /// Per layer: `[W | b]` after the last step, in `F` (the segment's end when it closes).
    current: Vec<Array2<F>>,
    /// Per layer: `[W | b]` before the last step (allocated with weight decay only).
    before: Vec<Array2<F>>,
    /// Per layer: where a step reads the parameters before they become `current`.
    scratch: Vec<Array2<F>>,
    /// The optimizer's momentum buffer as the rule predicts it.
    momentum: check::Momentum,
    last_check: Option<StepCheck>,
    mismatched: Vec<u64>,
    /// Whether a step was a shard of a global batch or had ghost rows.
    sharded: bool,
}

impl<O: Optimizer<F>, F: Float> OptimizerHook<O, F> {
    /// Wraps `optimizer` with the default [`HookConfig`]; `layers` are the traced
    /// layers at their initial parameters, in the order later steps pass them.
    ///
    /// # Errors
    /// As [`with_config`](Self::with_config).
    pub fn new(optimizer: O, layers: &[&dyn Traceable<F>]) -> Result<Self> {
        Self::with_config(optimizer, layers, HookConfig::default())
    }

    /// Wraps `optimizer` with `config`.
    ///
    /// # Errors
    /// [`Error::Empty`] without layers, [`Error::InvalidConfig`] for duplicate
    /// layer ids, a bad tolerance, or [`Credit::PerExample`] with an optimizer
    /// that has no [`LinearRule`](crate::LinearRule); [`Error::NonFinite`] for non-finite parameters.
    ///
    /// # Example
    /// ```
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Credit, HookConfig, OptimizerHook, nn::{DenseConfig, Sequential}, optim::{AdamConfig, SgdConfig}};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// // The paper's class-pure batch protocol credits each batch, even for SGD.
    /// let config = HookConfig::default().with_credit(Credit::Batch);
    /// let hook = OptimizerHook::with_config(SgdConfig::new(0.1).build()?, &net.traceables(), config)?;
    /// assert!(!hook.is_per_example());
    /// // Per-example crediting needs a linear rule; Adam has none.
    /// let per_example = HookConfig::default().with_credit(Credit::PerExample);
    /// assert!(OptimizerHook::with_config(AdamConfig::new(0.01).build()?, &net.traceables(), per_example).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn with_config(
        optimizer: O,
        layers: &[&dyn Traceable<F>],
        config: HookConfig,
    ) -> Result<Self> {
        config.validate()?;
        let per_example = config.per_example(optimizer.linear_rule().is_some())?;
        let ledger = Ledger::new(layers)?;
        let current = (0..layers.len())
            .map(|l| Ok(ledger.initial_params(l)?.mapv(F::narrow)))
            .collect::<Result<_>>()?;
        Ok(Self {
            optimizer,
            config,
            per_example,
            ledger,
            step: 0,
            shares: Shares::default(),
            before: Vec::new(),
            scratch: Vec::new(),
            current,
            momentum: check::Momentum::default(),
            last_check: None,
            mismatched: Vec::new(),
            sharded: false,
        })
    }

    /// The wrapped optimizer.
    pub fn optimizer(&self) -> &O {
        &self.optimizer
    }

    /// Whether updates are credited per example (else per batch).
    pub fn is_per_example(&self) -> bool {
        self.per_example
    }

    /// Steps recorded so far.
    pub fn n_steps(&self) -> u64 {
        self.step
    }

    /// Takes one optimizer step on `layers` (their gradients and factors from the
    /// last backward pass) and records it. `batch` names the rows of that pass.
    ///
    /// In per-example mode the update is checked against the factors and the
    /// optimizer's [`LinearRule`](crate::LinearRule) (see [`StepCheck`]): a
    /// uniform scale of the gradient (clipping) is credited exactly, anything
    /// else that does not fit is an [`Error::UpdateMismatch`] (or, with
    /// [`OnMismatch::Residual`], booked to the residual).
    ///
    /// On error nothing is recorded: the ledger, the hook's momentum shares and
    /// its copy of the parameters stay at the last good step, so `snapshot`,
    /// `finish` and `save` give the ledger of the steps that succeeded. The
    /// network's parameters (and the optimizer's state) are unchanged unless
    /// the inner optimizer ran — then they are as it left them (e.g. with
    /// non-finite values): restore them from a checkpoint before going on.
    ///
    /// # Errors
    /// [`Error::LayerMismatch`] when `layers` are not the traced layers;
    /// [`Error::Empty`], [`Error::ShapeMismatch`] or [`Error::InconsistentSource`]
    /// for a bad batch (empty, lengths differ from the factors' batch, duplicate
    /// ids, an id seen before with another label); [`Error::NoForwardCache`] /
    /// [`Error::NoBackwardCache`] when a layer has no factors (per-example mode);
    /// [`Error::StalePass`] for factors an earlier step booked;
    /// [`Error::NonFinite`] for NaN or infinity in factors, gradients or the
    /// update; [`Error::UpdateMismatch`]; any error of the inner optimizer.
    pub fn step(&mut self, layers: &mut [&mut dyn Traceable<F>], batch: &Batch<'_>) -> Result<()> {
        let rule = self.step_rule(self.optimizer.linear_rule())?;
        {
            let shared = shared(layers);
            self.precheck(&shared, batch, rule)?;
            params::read_into(self.ledger.layers(), &shared, &mut self.before)?;
        }
        let mut params: Vec<ParamMut<'_, F>> =
            layers.iter_mut().flat_map(|l| l.params_mut()).collect();
        self.optimizer.step(&mut params)?;
        drop(params);
        self.book(&shared(layers), batch, rule, true)
    }

    /// Books a step whose parameters before are `before` (`fresh`: read before
    /// the optimizer ran) or the hook's copy after the last step, and after are
    /// read from `layers` now. Nothing is booked on error.
    fn book(
        &mut self,
        layers: &[&dyn Traceable<F>],
        batch: &Batch<'_>,
        rule: Option<LinearRule>,
        fresh: bool,
    ) -> Result<()> {
        params::read_into(self.ledger.layers(), layers, &mut self.scratch)?;
        let before = if fresh { &self.before } else { &self.current };
        let mut checked = None;
        match rule {
            None => {
                batch::record_batch(&mut self.ledger, before, &self.scratch, batch, self.step)?;
            }
            Some(rule) => {
                // Online: the batch's shares projected once, for the check and the booking.
                let projected = match self.ledger.online() {
                    Some(_) => Some(per_example::project_batch(&self.ledger, layers)?),
                    None => None,
                };
                let scale = match batch.global_size {
                    // A shard: the other ranks' shares are in the update, so it
                    // cannot be checked here; its rows' share of the average.
                    Some(global) => batch.ids.len() as f64 / global as f64,
                    None => {
                        let found = check::check_update(
                            &mut self.momentum,
                            &self.ledger,
                            (layers, rule),
                            (before, &self.scratch),
                            projected.as_deref(),
                            self.config.update_tolerance,
                        )?;
                        if !found.fits() && self.config.on_mismatch == OnMismatch::Error {
                            return Err(validate::mismatch(self.step, rule, &found));
                        }
                        checked = Some(found);
                        if found.scale > 0.0 && found.scale.is_finite() {
                            found.scale
                        } else {
                            1.0
                        }
                    }
                };
                let sources = register_examples(&mut self.ledger, batch)?;
                if rule.weight_decay != 0.0 {
                    self.shares.record_decay(&mut self.ledger, before, rule)?;
                }
                self.shares.record_step(
                    &mut self.ledger,
                    layers,
                    &sources,
                    (rule, scale),
                    self.config.fold_tolerance,
                    projected,
                )?;
            }
        }
        if let Some(found) = checked {
            self.momentum.commit();
            if !found.fits() {
                self.mismatched.push(self.step);
            }
        }
        // A shard's residual holds the other shards' shares (as does one whose
        // ghost rows are another rank's): only the merged ledger can balance.
        if batch.global_size.is_some() || batch.ghosts.is_some_and(|g| g.contains(&true)) {
            self.sharded = true;
        }
        self.last_check = checked;
        std::mem::swap(&mut self.current, &mut self.scratch);
        self.ledger.count_step();
        self.step += 1;
        self.ledger
            .note_passes(layers.iter().map(|l| l.pass_id()).collect());
        Ok(())
    }

    /// What the update check found at the last step (per-example mode, not for shards).
    pub fn last_check(&self) -> Option<StepCheck> {
        self.last_check
    }

    /// The steps booked despite an update that did not fit (with [`OnMismatch::Residual`]).
    pub fn mismatched_steps(&self) -> &[u64] {
        &self.mismatched
    }

    /// Closes the current segment (e.g. at an epoch's end): later steps are booked
    /// in a new segment, and the parameters now are kept as the boundary. Shares
    /// still in the momentum buffer continue into the new segment.
    ///
    /// # Errors
    /// [`Error::Empty`] when the current segment has no steps (nothing
    /// changes); [`Error::Unbalanced`] when, with the segment closed, a layer's
    /// residual is more than [`HookConfig::max_residual_fraction`] of its
    /// change (the segment stays closed: the error reports what was not credited).
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Sequential}, optim::SgdConfig};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// let mut hook = OptimizerHook::new(SgdConfig::new(0.1).with_momentum(0.9).build()?, &net.traceables())?;
    /// let x = array![[1.0, 0.0], [0.0, 1.0]].into_dyn();
    /// for _epoch in 0..3 {
    ///     net.train_batch(x.view(), &[0, 1])?;
    ///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1)], &[0, 1]))?;
    ///     hook.close_segment()?;
    /// }
    /// assert!(hook.close_segment().is_err()); // nothing recorded since the last close
    /// let ledger = hook.finish()?;
    /// assert_eq!(ledger.steps_per_segment(), vec![1, 1, 1]); // no trailing empty segment
    /// assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-12));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn close_segment(&mut self) -> Result<()> {
        if self.ledger.current_steps() == 0 {
            return Err(Error::Empty {
                op: "OptimizerHook::close_segment",
                what: "current segment",
            });
        }
        self.shares.book_pending(&mut self.ledger);
        let carry = self
            .shares
            .first_pending()
            .unwrap_or(self.ledger.n_groups());
        self.ledger.close_segment(&self.current, carry);
        self.check_residual("OptimizerHook::close_segment", &self.ledger)
    }

    /// The residual check of [`HookConfig::max_residual_fraction`] (not for shards).
    fn check_residual(&self, op: &'static str, ledger: &Ledger<F>) -> Result<()> {
        if self.sharded {
            return Ok(());
        }
        ledger.check_residual_in(op, self.config.max_residual_fraction)
    }

    /// A copy of the ledger as it stands, balanced for the parameters now.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Sequential}, optim::SgdConfig};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// let mut hook = OptimizerHook::new(SgdConfig::new(0.1).with_momentum(0.9).build()?, &net.traceables())?;
    /// net.train_batch(array![[1.0, 0.0]].into_dyn().view(), &[0])?;
    /// hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0)], &[0]))?;
    /// let so_far = hook.snapshot(); // training goes on with `hook`
    /// assert_eq!(so_far.sources().len(), 1);
    /// assert!(so_far.parameter_balance()[0] < 1e-12);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn snapshot(&self) -> Ledger<F> {
        let mut ledger = self.ledger.clone();
        self.shares.book_pending(&mut ledger);
        ledger.finish(&self.current);
        ledger
    }

    /// Ends tracing and returns the ledger.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an [`online`](Self::online) hook (use
    /// [`finish_sketch`](Self::finish_sketch));
    /// [`Error::Unbalanced`] when a layer's residual is more than
    /// [`HookConfig::max_residual_fraction`] of its change (the ledger is
    /// dropped: take a [`snapshot`](Self::snapshot) first to keep it whatever
    /// its balance).
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Sequential}, optim::AdamConfig};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// // Adam has no linear rule: each step's exact update is credited to its batch.
    /// let mut hook = OptimizerHook::new(AdamConfig::new(0.01).build()?, &net.traceables())?;
    /// assert!(!hook.is_per_example());
    /// net.train_batch(array![[1.0, 0.0]].into_dyn().view(), &[0])?;
    /// hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0)], &[0]))?;
    /// let ledger = hook.finish()?;
    /// assert_eq!(ledger.sources()[0].id, refinement_ledger::SourceId::Batch(0));
    /// assert!(ledger.residual_fraction()[0] < 1e-12);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn finish(mut self) -> Result<Ledger<F>> {
        self.ledger.check_exact("OptimizerHook::finish")?;
        self.shares.book_pending(&mut self.ledger);
        self.ledger.finish(&self.current);
        self.check_residual("OptimizerHook::finish", &self.ledger)?;
        Ok(self.ledger)
    }
}

/// The layers as the hook reads them.
fn shared<'a, F: Float>(layers: &'a [&mut dyn Traceable<F>]) -> Vec<&'a dyn Traceable<F>> {
    layers.iter().map(|l| &**l as &dyn Traceable<F>).collect()
}
