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
mod config;
mod params;
mod per_example;

pub use config::{Batch, Credit, HookConfig};

use std::collections::HashSet;

use ndarray::Array2;

use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::ledger::Ledger;
use crate::optim::Optimizer;
use crate::trace::{MAX_CLASSES, ParamMut, SourceId, Traceable};
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
/// let ledger = hook.finish();
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
        if !(config.fold_tolerance > 0.0 && config.fold_tolerance < 1.0) {
            return Err(Error::InvalidConfig {
                what: "hook fold_tolerance",
                reason: format!("must be in (0, 1), found {}", config.fold_tolerance),
            });
        }
        let has_rule = optimizer.linear_rule().is_some();
        let per_example = match config.credit {
            Credit::Auto => has_rule,
            Credit::Batch => false,
            Credit::PerExample if has_rule => true,
            Credit::PerExample => {
                return Err(Error::InvalidConfig {
                    what: "hook credit",
                    reason:
                        "PerExample needs an optimizer with a linear rule (SGD family), found none"
                            .into(),
                });
            }
        };
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
    /// [`Error::NonFinite`] for NaN or infinity in factors, gradients or the update;
    /// any error of the inner optimizer.
    pub fn step(&mut self, layers: &mut [&mut dyn Traceable<F>], batch: &Batch<'_>) -> Result<()> {
        const OP: &str = "OptimizerHook::step";
        {
            let shared: Vec<&dyn Traceable<F>> =
                layers.iter().map(|l| &**l as &dyn Traceable<F>).collect();
            self.ledger.check_layers(&shared, OP)?;
        }
        self.check_batch(batch)?;
        let rule = if self.per_example {
            let rule = self.optimizer.linear_rule().ok_or(Error::InvalidConfig {
                what: "optimizer",
                reason: "reported no linear rule in per-example mode".into(),
            })?;
            rule.validate()?;
            Some(rule)
        } else {
            None
        };
        let passes: Vec<Option<u64>> = layers.iter().map(|l| l.pass_id()).collect();
        if rule.is_some() {
            for (l, layer) in layers.iter().enumerate() {
                self.check_factors(&**layer, batch.ids.len())?;
                if passes[l].is_some() && self.ledger.last_passes().get(l) == Some(&passes[l]) {
                    return Err(Error::StalePass {
                        op: OP,
                        layer: layer.layer_id().to_string(),
                    });
                }
            }
        }
        // The residual is settled per segment (when it closes) as what the
        // parameters did minus what was credited, so a step touches the
        // parameters only to copy them (and, with weight decay, to credit it).
        match rule {
            None => {
                // The parameters before the step (changes made outside the hook
                // included), so the batch is credited with the step's update only.
                params::read_into(self.ledger.layers(), layers, &mut self.scratch)?;
                self.run_optimizer(layers)?;
                batch::record_batch(
                    &mut self.ledger,
                    &mut self.scratch,
                    layers,
                    batch,
                    self.step,
                )?;
                std::mem::swap(&mut self.current, &mut self.scratch);
            }
            Some(rule) => {
                let decay = rule.weight_decay != 0.0;
                if decay {
                    // The decay's share is `λ W` at the parameters before the step.
                    params::read_into(self.ledger.layers(), layers, &mut self.before)?;
                }
                // Nothing is booked, and the hook's copy of the parameters is
                // not replaced, until the optimizer has stepped and the
                // parameters it left are read and finite.
                self.run_optimizer(layers)?;
                params::read_into(self.ledger.layers(), layers, &mut self.scratch)?;
                let sources = register_examples(&mut self.ledger, batch)?;
                if decay {
                    self.shares
                        .record_decay(&mut self.ledger, &self.before, rule)?;
                }
                self.shares.record_step(
                    &mut self.ledger,
                    layers,
                    &sources,
                    rule,
                    self.config.fold_tolerance,
                )?;
                std::mem::swap(&mut self.current, &mut self.scratch);
            }
        }
        self.ledger.count_step();
        self.step += 1;
        self.ledger.note_passes(passes);
        Ok(())
    }

    fn run_optimizer(&mut self, layers: &mut [&mut dyn Traceable<F>]) -> Result<()> {
        let mut params: Vec<ParamMut<'_, F>> =
            layers.iter_mut().flat_map(|l| l.params_mut()).collect();
        self.optimizer.step(&mut params)
    }

    /// Closes the current segment (e.g. at an epoch's end): later steps are booked
    /// in a new segment, and the parameters now are kept as the boundary. Shares
    /// still in the momentum buffer continue into the new segment.
    ///
    /// # Errors
    /// [`Error::Empty`] when the current segment has no steps.
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
    /// let ledger = hook.finish();
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
        Ok(())
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

    /// Ends tracing and returns the ledger (see the type's example).
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
    /// let ledger = hook.finish();
    /// assert_eq!(ledger.sources()[0].id, refinement_ledger::SourceId::Batch(0));
    /// assert!(ledger.residual_fraction()[0] < 1e-12);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn finish(mut self) -> Ledger<F> {
        self.shares.book_pending(&mut self.ledger);
        self.ledger.finish(&self.current);
        self.ledger
    }

    fn check_batch(&self, batch: &Batch<'_>) -> Result<()> {
        const OP: &str = "OptimizerHook::step";
        let n = batch.ids.len();
        if n == 0 {
            return Err(Error::Empty {
                op: OP,
                what: "batch",
            });
        }
        if batch.labels.len() != n || batch.ghosts.is_some_and(|g| g.len() != n) {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!("{n} labels and ghost flags (one per id)"),
                got: format!(
                    "{} labels, {:?} ghost flags",
                    batch.labels.len(),
                    batch.ghosts.map(<[bool]>::len)
                ),
            });
        }
        let mut seen = HashSet::with_capacity(n);
        for (i, (&id, &label)) in batch.ids.iter().zip(batch.labels).enumerate() {
            if label >= MAX_CLASSES {
                return Err(Error::LabelOutOfRange {
                    op: OP,
                    label,
                    n_classes: MAX_CLASSES,
                });
            }
            if !seen.insert(id) {
                return Err(Error::InconsistentSource {
                    op: OP,
                    reason: format!("example {id} appears twice in one batch"),
                });
            }
            if batch.is_ghost(i) || !self.per_example {
                continue;
            }
            if let Some(known) = self.ledger.known_label(SourceId::Example(id)) {
                if known != Some(label) {
                    return Err(Error::InconsistentSource {
                        op: OP,
                        reason: format!(
                            "example {id} was recorded with label {known:?}, now found {label}"
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn check_factors(&self, layer: &dyn Traceable<F>, n: usize) -> Result<()> {
        const OP: &str = "OptimizerHook::step (factors)";
        let shape = layer.traced_shape();
        let a = layer.input_patches()?;
        let d = layer.output_deltas()?;
        let p = a.shape()[1];
        if a.shape() != [n, p, shape.fan_in] || d.shape() != [n, p, shape.fan_out] {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "{}: patches [{n}, P, {}] and deltas [{n}, P, {}]",
                    layer.layer_id(),
                    shape.fan_in,
                    shape.fan_out
                ),
                got: format!(
                    "patches {}, deltas {}",
                    shape_str(a.shape()),
                    shape_str(d.shape())
                ),
            });
        }
        check_finite(&a, OP, &format!("input patches of {}", layer.layer_id()))?;
        check_finite(&d, OP, &format!("output deltas of {}", layer.layer_id()))
    }
}
