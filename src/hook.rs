//! [`OptimizerHook`]: wraps an optimizer and books every step into a [`Ledger`].
//!
//! Per-example mode (optimizers with a [`LinearRule`]: SGD with momentum,
//! Nesterov, dampening, weight decay and schedules) credits each example with
//! its share `δ_i ã_iᵀ` of the batch gradient, times the total weight with
//! which that share reaches the weights (`γ_s = Σ_{t≥s} η_t μ^{t−s}` and its
//! Nesterov/dampening variants, DESIGN §2.3). Shares still in the momentum
//! buffer are kept *pending*: their coefficient grows step by step until
//! `μ^{t−s}` is below [`HookConfig::fold_tolerance`]. The `λ W` part of the
//! gradient is credited to [`SourceId::Decay`].
//!
//! Batch mode (any other optimizer, or on request) diffs the traced parameters
//! around the inner step and credits the exact update to the step's batch
//! ([`SourceId::Batch`]).
//!
//! In both modes, whatever the optimizer did that was not credited (rounding,
//! a gradient the factors do not explain, a change made outside the hook, a
//! momentum tail folded away) goes to the residual: the ledger always balances.

use std::collections::{HashSet, VecDeque};

use ndarray::{Array2, ArrayView3, Axis, s};
use serde::{Deserialize, Serialize};

use crate::error::{FiniteScan, check_finite, shape_str};
use crate::ledger::{Rows, Segment};
use crate::{
    Error, ExampleId, Float, Ledger, LinearRule, Optimizer, ParamMut, Result, SourceId, Traceable,
};

/// What each update is credited to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credit {
    /// Per example when the optimizer reports a [`LinearRule`], per batch otherwise. Default.
    #[default]
    Auto,
    /// Per example; the optimizer must report a [`LinearRule`] at every step.
    PerExample,
    /// Per batch, whatever the optimizer (the paper's class-pure batch protocol).
    Batch,
}

/// Configuration of an [`OptimizerHook`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookConfig {
    /// Crediting mode. Default: [`Credit::Auto`].
    pub credit: Credit,
    /// A pending gradient share is folded into its account once its weight left
    /// in the momentum buffer, `μ^{t−s}` (times the entry weight), drops below
    /// this; what it would still add goes to the residual. Default: 1e-12.
    pub fold_tolerance: f64,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            credit: Credit::Auto,
            fold_tolerance: 1e-12,
        }
    }
}

impl HookConfig {
    /// Sets the crediting mode.
    pub fn with_credit(mut self, credit: Credit) -> Self {
        self.credit = credit;
        self
    }
    /// Sets the fold tolerance.
    pub fn with_fold_tolerance(mut self, tol: f64) -> Self {
        self.fold_tolerance = tol;
        self
    }
}

/// The examples of one step: ids and labels, row for row with the batch, and
/// optionally which rows are *ghosts* (forwarded, carrying no loss, credited nothing).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// One id per batch row.
    pub ids: &'a [ExampleId],
    /// One label per batch row.
    pub labels: &'a [usize],
    /// `true` for ghost rows.
    pub ghosts: Option<&'a [bool]>,
}

impl<'a> Batch<'a> {
    /// A batch without ghosts.
    pub fn new(ids: &'a [ExampleId], labels: &'a [usize]) -> Self {
        Self {
            ids,
            labels,
            ghosts: None,
        }
    }
    /// Marks ghost rows.
    pub fn with_ghosts(mut self, ghosts: &'a [bool]) -> Self {
        self.ghosts = Some(ghosts);
        self
    }
    fn is_ghost(&self, i: usize) -> bool {
        self.ghosts.is_some_and(|g| g[i])
    }
}

/// A step group whose gradient shares are still in the momentum buffer.
#[derive(Debug, Clone)]
struct Pending<F> {
    /// Group index in the current segment's coefficient table.
    group: u32,
    /// Weight of the group's shares in the momentum buffer now.
    buf: f64,
    /// Dense per-example terms `(layer, source, δᵀã)` of layers where they are smaller than factors.
    dense: Vec<(usize, u32, Array2<F>)>,
}

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
    pending: VecDeque<Pending<F>>,
    /// Per layer: `[W | b]` after the last step, in `F` (the segment's end when it closes).
    current: Vec<Array2<F>>,
    /// Per layer: `[W | b]` before the last step (allocated with weight decay only).
    before: Vec<Array2<F>>,
    /// Per layer: the momentum buffer of the decay shares.
    decay_buf: Vec<Array2<f64>>,
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
    /// that has no [`LinearRule`]; [`Error::NonFinite`] for non-finite parameters.
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
        let current: Vec<Array2<F>> = ledger.initial.iter().map(|m| m.mapv(F::narrow)).collect();
        let decay_buf = ledger
            .initial
            .iter()
            .map(|m| Array2::zeros(m.raw_dim()))
            .collect();
        Ok(Self {
            optimizer,
            config,
            per_example,
            ledger,
            step: 0,
            pending: VecDeque::new(),
            before: Vec::new(),
            current,
            decay_buf,
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
    /// On error nothing is recorded; the parameters are unchanged unless the
    /// inner optimizer ran (and failed part-way, or left non-finite values).
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
            Some(self.optimizer.linear_rule().ok_or(Error::InvalidConfig {
                what: "optimizer",
                reason: "reported no linear rule in per-example mode".into(),
            })?)
        } else {
            None
        };
        if rule.is_some() {
            for layer in layers.iter() {
                self.check_factors(&**layer, batch.ids.len())?;
            }
        }
        // The residual is settled per segment (when it closes) as what the
        // parameters did minus what was credited, so a step touches the
        // parameters only to copy them (and, with weight decay, to credit it).
        match rule {
            None => {
                self.refresh_current(layers)?;
                self.run_optimizer(layers)?;
                self.record_batch(layers, batch)?;
            }
            Some(rule) => {
                let decay = rule.weight_decay != 0.0;
                if decay {
                    // The decay's share is `λ W` at the parameters before the step.
                    self.refresh_current(layers)?;
                }
                // Nothing is booked until the optimizer has stepped and the
                // parameters it left are finite.
                self.run_optimizer(layers)?;
                if decay {
                    if self.before.is_empty() {
                        self.before = self.current.clone();
                    }
                    std::mem::swap(&mut self.current, &mut self.before);
                }
                self.refresh_current(layers)?;
                let sources = self.register_examples(batch)?;
                if decay {
                    self.record_decay(rule)?;
                }
                self.record_per_example(layers, &sources, rule)?;
            }
        }
        let seg = self.ledger.segments.len() - 1;
        self.ledger.segments[seg].n_steps += 1;
        self.step += 1;
        Ok(())
    }

    fn run_optimizer(&mut self, layers: &mut [&mut dyn Traceable<F>]) -> Result<()> {
        let mut params: Vec<ParamMut<'_, F>> =
            layers.iter_mut().flat_map(|l| l.params_mut()).collect();
        self.optimizer.step(&mut params)
    }

    /// Copies every layer's `[W | b]` into `current`, checking it is finite.
    fn refresh_current(&mut self, layers: &[&mut dyn Traceable<F>]) -> Result<()> {
        const OP: &str = "OptimizerHook::step (parameters)";
        for (l, layer) in layers.iter().enumerate() {
            let shape = &self.ledger.layers[l].shape;
            let (fan_in, aug_in) = (shape.fan_in, shape.aug_in());
            let cur = self.current[l]
                .as_slice_mut()
                .expect("invariant: standard layout");
            let w = layer.weight();
            let w = w.as_standard_layout();
            let w = w.as_slice().expect("invariant: standard layout");
            // One pass that runs every step: copy a row (memcpy), then scan the
            // copy for NaN/inf while it is still in cache.
            let mut probe = F::zero();
            for (dst, src) in cur.chunks_exact_mut(aug_in).zip(w.chunks_exact(fan_in)) {
                dst[..fan_in].copy_from_slice(src);
                probe += dst[..fan_in].scan();
            }
            if let Some(b) = layer.bias() {
                for (dst, &v) in cur.chunks_exact_mut(aug_in).zip(b.iter()) {
                    dst[fan_in] = v;
                    probe += v * F::zero();
                }
            }
            if !probe.is_finite() {
                return Err(Error::NonFinite {
                    op: OP,
                    what: format!("parameters of {}", layer.layer_id()),
                });
            }
        }
        Ok(())
    }

    /// Closes the current segment (e.g. at an epoch's end): later steps are booked
    /// in a new segment, and the parameters now are kept as the boundary. Shares
    /// still in the momentum buffer continue into the new segment.
    ///
    /// # Errors
    /// [`Error::Empty`] when the current segment has no steps.
    pub fn close_segment(&mut self) -> Result<()> {
        let seg = self.ledger.segments.len() - 1;
        if self.ledger.segments[seg].n_steps == 0 {
            return Err(Error::Empty {
                op: "OptimizerHook::close_segment",
                what: "current segment",
            });
        }
        // Pending groups are a contiguous suffix of the groups; the new segment
        // weights them from zero on, their rows stay where they are.
        let first = self
            .pending
            .front()
            .map_or(self.ledger.n_groups, |p| p.group);
        debug_assert!(self.pending.iter().zip(first..).all(|(p, g)| p.group == g));
        book_pending(&self.pending, &mut self.ledger.segments[seg]);
        settle(&mut self.ledger, seg, &self.current);
        let mut next = Segment::new(
            self.ledger.segments[seg].end.clone(),
            first,
            &self.ledger.layers,
        );
        next.coef = vec![0.0; (self.ledger.n_groups - first) as usize];
        for acc in &mut self.ledger.segments[seg].layers {
            acc.sort();
        }
        self.ledger.segments.push(next);
        Ok(())
    }

    /// A copy of the ledger as it stands, balanced for the parameters now.
    pub fn snapshot(&self) -> Ledger<F> {
        let mut ledger = self.ledger.clone();
        Self::flush(&self.pending, &mut ledger, &self.current);
        ledger
    }

    /// Ends tracing and returns the ledger.
    pub fn finish(mut self) -> Ledger<F> {
        Self::flush(&self.pending, &mut self.ledger, &self.current);
        self.ledger
    }

    /// Books pending dense terms with their coefficient so far, settles the
    /// last segment, and compacts the ledger.
    fn flush(pending: &VecDeque<Pending<F>>, ledger: &mut Ledger<F>, current: &[Array2<F>]) {
        let seg = ledger.segments.len() - 1;
        book_pending(pending, &mut ledger.segments[seg]);
        settle(ledger, seg, current);
        ledger.compact();
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
            if !seen.insert(id) {
                return Err(Error::InconsistentSource {
                    op: OP,
                    reason: format!("example {id} appears twice in one batch"),
                });
            }
            if batch.is_ghost(i) || !self.per_example {
                continue;
            }
            if let Some(&s) = self.ledger.index.get(&SourceId::Example(id)) {
                let known = self.ledger.sources[s as usize].label;
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

    /// Credits the batch's update `W_after − W_before` (`current` holds
    /// `W_before`) to the step's batch source, and refreshes `current`.
    fn record_batch(&mut self, layers: &[&mut dyn Traceable<F>], batch: &Batch<'_>) -> Result<()> {
        let members: Vec<ExampleId> = (0..batch.ids.len())
            .filter(|&i| !batch.is_ghost(i))
            .map(|i| batch.ids[i])
            .collect();
        let labels: HashSet<usize> = (0..batch.ids.len())
            .filter(|&i| !batch.is_ghost(i))
            .map(|i| batch.labels[i])
            .collect();
        let label =
            (labels.len() == 1).then(|| *labels.iter().next().expect("invariant: one label"));
        for (l, layer) in layers.iter().enumerate() {
            let mut finite = true;
            for_each_param(&**layer, &self.ledger.layers[l].shape, |_, v| {
                finite &= v.is_finite();
            });
            if !finite {
                return Err(Error::NonFinite {
                    op: "OptimizerHook::step (parameters)",
                    what: format!("parameters of {}", layer.layer_id()),
                });
            }
        }
        let s = self
            .ledger
            .source_or_insert(SourceId::Batch(self.step), label, members)?;
        let segment = self
            .ledger
            .segments
            .last_mut()
            .expect("invariant: at least one segment");
        for (l, layer) in layers.iter().enumerate() {
            let mut acc = segment.layers[l].dense_mut(s);
            let acc = acc.as_slice_mut().expect("invariant: standard layout");
            let cur = self.current[l]
                .as_slice_mut()
                .expect("invariant: standard layout");
            for_each_param(&**layer, &self.ledger.layers[l].shape, |k, v| {
                acc[k] += v.widen() - cur[k].widen();
                cur[k] = v;
            });
        }
        Ok(())
    }

    /// The sources of the batch's examples (`None` for ghosts), registered.
    fn register_examples(&mut self, batch: &Batch<'_>) -> Result<Vec<Option<u32>>> {
        let mut sources = vec![None; batch.ids.len()];
        for i in (0..batch.ids.len()).filter(|&i| !batch.is_ghost(i)) {
            sources[i] = Some(self.ledger.source_or_insert(
                SourceId::Example(batch.ids[i]),
                Some(batch.labels[i]),
                Vec::new(),
            )?);
        }
        Ok(sources)
    }

    /// Credits this step's weight-decay update, as the optimizer applies it
    /// (momentum, dampening, Nesterov), to [`SourceId::Decay`]; `before` holds
    /// the parameters before the step.
    fn record_decay(&mut self, rule: LinearRule) -> Result<()> {
        let s = self
            .ledger
            .source_or_insert(SourceId::Decay, None, Vec::new())?;
        let (lr, mu, entry, decay) = (
            rule.lr,
            rule.momentum,
            rule.entry_weight(),
            rule.weight_decay,
        );
        let segment = self
            .ledger
            .segments
            .last_mut()
            .expect("invariant: at least one segment");
        for (l, cur) in self.before.iter().enumerate() {
            let mut acc = segment.layers[l].dense_mut(s);
            let acc = acc.as_slice_mut().expect("invariant: standard layout");
            let buf = slice_mut(&mut self.decay_buf[l]);
            let w = cur.as_slice().expect("invariant: standard layout");
            for ((a, b), &w) in acc.iter_mut().zip(buf.iter_mut()).zip(w) {
                let dg = decay * w.widen();
                let dp = if mu == 0.0 {
                    dg
                } else {
                    *b = mu * *b + entry * dg;
                    if rule.nesterov { dg + mu * *b } else { *b }
                };
                *a -= lr * dp;
            }
        }
        Ok(())
    }

    fn record_per_example(
        &mut self,
        layers: &mut [&mut dyn Traceable<F>],
        sources: &[Option<u32>],
        rule: LinearRule,
    ) -> Result<()> {
        let (mu, lr, entry) = (rule.momentum, rule.lr, rule.entry_weight());
        let seg_idx = self.ledger.segments.len() - 1;
        let group = self.ledger.n_groups;
        self.ledger.n_groups += 1;
        let segment = &mut self.ledger.segments[seg_idx];
        debug_assert_eq!(
            segment.first_group as usize + segment.coef.len(),
            group as usize
        );
        segment.coef.push(0.0);
        let mut new = Pending {
            group,
            buf: entry,
            dense: Vec::new(),
        };
        for (l, layer) in layers.iter_mut().enumerate() {
            let a = layer.input_patches()?;
            let d = layer.output_deltas()?;
            credit_rows(
                &mut self.ledger.rows[l],
                &mut new.dense,
                l,
                sources,
                group,
                a,
                d,
            );
        }
        // Coefficients of every group whose shares are in the buffer.
        if mu == 0.0 {
            *segment.coef_mut(group) = -lr;
            for (l, s, g) in new.dense.drain(..) {
                segment.layers[l].add(s, g.mapv(F::widen).view(), -lr);
            }
            return Ok(());
        }
        for p in &mut self.pending {
            p.buf *= mu;
        }
        self.pending.push_back(new);
        for p in &self.pending {
            let inc = if rule.nesterov {
                mu * p.buf + if p.group == group { 1.0 } else { 0.0 }
            } else {
                p.buf
            };
            *segment.coef_mut(p.group) -= lr * inc;
        }
        // Fold groups whose weight left in the buffer is negligible; the tail
        // the optimizer still applies lands in the residual.
        while self
            .pending
            .front()
            .is_some_and(|p| p.buf < self.config.fold_tolerance)
        {
            let p = self.pending.pop_front().expect("invariant: front exists");
            let k = segment.coef_of(p.group);
            for (l, s, g) in p.dense {
                segment.layers[l].add(s, g.mapv(F::widen).view(), k);
            }
        }
        Ok(())
    }
}

/// Books the pending dense terms into `segment` with their coefficient so far.
fn book_pending<F: Float>(pending: &VecDeque<Pending<F>>, segment: &mut Segment) {
    for p in pending {
        let k = segment.coef_of(p.group);
        for (l, s, g) in &p.dense {
            segment.layers[*l].add(*s, g.mapv(F::widen).view(), k);
        }
    }
}

/// Closes the books of segment `seg` at parameters `current`: its end, and its
/// residual `W_end − W_start − (credited rows + dense accounts)` per layer —
/// rounding, folded momentum tails, changes made outside the hook.
fn settle<F: Float>(ledger: &mut Ledger<F>, seg: usize, current: &[Array2<F>]) {
    for (l, cur) in current.iter().enumerate() {
        let end = cur.mapv(F::widen);
        let start = if seg == 0 {
            &ledger.initial[l]
        } else {
            &ledger.segments[seg - 1].end[l]
        };
        let segment = &ledger.segments[seg];
        let rows = &ledger.rows[l];
        // Rows are in step order while training: the segment's groups are a suffix.
        debug_assert!(rows.group.windows(2).all(|w| w[0] <= w[1]));
        let r0 = rows.group.partition_point(|&g| g < segment.first_group);
        let mut residual = &end - start;
        residual -= &rows.sum(r0, rows.len(), |g| segment.coef_of(g));
        residual -= &segment.layers[l].total();
        let segment = &mut ledger.segments[seg];
        segment.layers[l].residual = residual;
        segment.end[l] = end;
    }
}

/// Visits every traced parameter of `layer` as `(index in [W | b], value)`.
fn for_each_param<F: Float>(
    layer: &dyn Traceable<F>,
    shape: &crate::TracedShape,
    mut f: impl FnMut(usize, F),
) {
    let (fan_in, aug_in) = (shape.fan_in, shape.aug_in());
    let w = layer.weight();
    let w = w.as_standard_layout();
    let w = w.as_slice().expect("invariant: standard layout");
    for (o, row) in w.chunks_exact(fan_in).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            f(o * aug_in + i, v);
        }
    }
    if let Some(b) = layer.bias() {
        for (o, &v) in b.iter().enumerate() {
            f(o * aug_in + fan_in, v);
        }
    }
}

fn slice_mut(m: &mut Array2<f64>) -> &mut [f64] {
    m.as_slice_mut().expect("invariant: standard layout")
}

/// Books one layer's per-example shares of a step into `acc` (factored rows) or
/// `dense` (per-example `δᵀã`, when smaller).
fn credit_rows<F: Float>(
    acc: &mut Rows<F>,
    dense: &mut Vec<(usize, u32, Array2<F>)>,
    layer: usize,
    sources: &[Option<u32>],
    group: u32,
    a: ArrayView3<'_, F>,
    d: ArrayView3<'_, F>,
) {
    let (_, positions, fan_in) = a.dim();
    let (aug_in, fan_out) = (acc.aug_in, acc.fan_out);
    let factored_bytes = positions * ((aug_in + fan_out) * std::mem::size_of::<F>() + 8);
    let factored = factored_bytes <= aug_in * fan_out * 8;
    let credited: Vec<(usize, u32)> = sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .filter(|&(i, _)| d.index_axis(Axis(0), i).iter().any(|v| *v != F::zero()))
        .collect();
    if !factored {
        // One patch buffer for the step; its bias column stays 1.
        let mut a_aug = Array2::<F>::ones((positions, aug_in));
        for &(i, s) in &credited {
            a_aug
                .slice_mut(s![.., ..fan_in])
                .assign(&a.index_axis(Axis(0), i));
            dense.push((layer, s, d.index_axis(Axis(0), i).t().dot(&a_aug)));
        }
        return;
    }
    for &(i, s) in &credited {
        let (ai, di) = (a.index_axis(Axis(0), i), d.index_axis(Axis(0), i));
        for p in 0..positions {
            acc.push(s, group, ai.row(p), di.row(p));
        }
    }
}
