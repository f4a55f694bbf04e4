//! Checkpoints of a training run in progress: the ledger so far (its open
//! segment and rows in step order), the hook's own state (pending momentum
//! shares, the decay buffer, the update check's predicted momentum buffer, its
//! copy of the parameters, counters) and the optimizer's state, in one
//! safetensors file, so that a run stopped after any step and resumed gives a
//! ledger bit-identical to the run that never stopped.
//!
//! Tensors: the ledger's (as [`Ledger::save`] names them), `hook.current.{l}`
//! (`F`, the traced parameters `[W | b]` after the last step),
//! `hook.momentum.{l}` and `hook.decay_buf.{l}` (`F64`, when in use),
//! `hook.pending.buf` (`F64`, the weight of each pending group in the momentum
//! buffer), `hook.pending.layer.{l}` (`F`, `[n_terms, fan_out, aug_in]`: the
//! pending dense per-example terms of layer `l`, in the order the payload
//! lists them) and `optimizer.{name}` (`F`, the optimizer's buffers). The
//! payload holds the ledger's header and the hook's (configuration, counters,
//! the pending groups and their terms' layer and source, the optimizer's kind
//! and step). Written atomically with a CRC like a ledger file.

use std::path::Path;

use ndarray::{Array2, ArrayD, IxDyn};
use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use super::check::Momentum;
use super::external::EXTERNAL_KIND;
use super::per_example::{Pending, Shares};
use super::{HookConfig, OptimizerHook, StepCheck};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{LayerMeta, Ledger};
use crate::optim::{Optimizer, OptimizerState};
use crate::storage::{
    Reader, corrupt, decode, dtype, floats_owned, matrix, save_atomic, with_mapped,
};
use crate::trace::{Traceable, write_params};

/// The checkpoint format's name, in the header.
pub const CHECKPOINT_FORMAT: &str = "refinement-ledger-checkpoint";
/// The checkpoint format's version.
pub const CHECKPOINT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Payload {
    ledger: serde_json::Value,
    config: HookConfig,
    per_example: bool,
    step: u64,
    mismatched: Vec<u64>,
    sharded: bool,
    /// `scale`, `misfit`, `allowed` as Rust float literals (`inf` included).
    last_check: Option<[String; 3]>,
    momentum: bool,
    decay: bool,
    /// Per pending group: its step group and its dense terms' `(layer, source)`.
    pending: Vec<(u32, Vec<(usize, u32)>)>,
    optimizer_kind: String,
    optimizer_step: u64,
    optimizer_tensors: Vec<String>,
}

impl<O: Optimizer<F>, F: Float> OptimizerHook<O, F> {
    /// Saves everything a resumed run needs to continue exactly where this one
    /// is: the ledger so far, the hook's state, the optimizer's state
    /// ([`Optimizer::export_state`]) and the traced parameters. Atomic like
    /// [`Ledger::save`]: a crash during the save leaves the previous checkpoint.
    ///
    /// Parameters of layers the hook does not trace, the data order and any
    /// random state are the training loop's to save (seed each epoch's shuffle
    /// from the epoch number and they need no saving).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an optimizer that does not export its
    /// state; [`Error::NonFinite`] for NaN or infinity in what would be
    /// written; [`Error::Io`].
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::{Batch, ExampleId, OptimizerHook, nn::{DenseConfig, Sequential}, optim::SgdConfig};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("run.ckpt");
    /// let net_of = |seed| -> refinement_ledger::Result<Sequential<f64>> {
    ///     Ok(Sequential::new().with(DenseConfig::new(2, 2).build("fc", &mut StdRng::seed_from_u64(seed))?))
    /// };
    /// let sgd = || SgdConfig::new(0.1).with_momentum(0.9).build();
    /// let (x, batch) = (array![[1.0, 0.0], [0.0, 1.0]].into_dyn(), [ExampleId(0), ExampleId(1)]);
    /// let train = |net: &mut Sequential<f64>, hook: &mut OptimizerHook<_, f64>| -> refinement_ledger::Result<()> {
    ///     net.train_batch(x.view(), &[0, 1])?;
    ///     hook.step(&mut net.traceables_mut(), &Batch::new(&batch, &[0, 1]))
    /// };
    /// // A run of four steps…
    /// let mut net = net_of(0)?;
    /// let mut hook = OptimizerHook::new(sgd()?, &net.traceables())?;
    /// for _ in 0..4 { train(&mut net, &mut hook)?; }
    /// let whole = hook.finish()?;
    /// // …and one stopped after two, resumed (in another process) on a fresh network.
    /// let mut net = net_of(0)?;
    /// let mut hook = OptimizerHook::new(sgd()?, &net.traceables())?;
    /// for _ in 0..2 { train(&mut net, &mut hook)?; }
    /// hook.save_checkpoint(&path)?;
    /// let mut net = net_of(7)?; // the checkpoint restores the traced parameters
    /// let mut hook = OptimizerHook::resume(sgd()?, &mut net.traceables_mut(), &path)?;
    /// for _ in 0..2 { train(&mut net, &mut hook)?; }
    /// let resumed = hook.finish()?;
    /// for s in whole.sources() { // bit-identical accounts, residual and parameters
    ///     assert_eq!(resumed.account(0, s.id)?, whole.account(0, s.id)?);
    /// }
    /// assert_eq!(resumed.residual(0)?, whole.residual(0)?);
    /// assert_eq!(resumed.final_params(0)?, whole.final_params(0)?);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn save_checkpoint(&self, path: &Path) -> Result<()> {
        let state = self.optimizer.export_state()?;
        let (mut tensors, ledger) = self.ledger.open_parts()?;
        for (l, m) in self.current.iter().enumerate() {
            tensors.push((format!("hook.current.{l}"), matrix(m)));
        }
        let momentum = self.momentum.buffer();
        for (l, m) in momentum.iter().enumerate() {
            tensors.push((format!("hook.momentum.{l}"), matrix(m)));
        }
        for (l, m) in self.shares.decay_buf.iter().enumerate() {
            tensors.push((format!("hook.decay_buf.{l}"), matrix(m)));
        }
        let pending = &self.shares.pending;
        let bufs: Vec<f64> = pending.iter().map(|p| p.buf).collect();
        tensors.push((
            "hook.pending.buf".into(),
            floats_owned(bufs, vec![pending.len()]),
        ));
        for (l, meta) in self.ledger.layers().iter().enumerate() {
            let terms: Vec<&Array2<F>> = pending
                .iter()
                .flat_map(|p| p.dense.iter().filter(|t| t.0 == l).map(|t| &t.2))
                .collect();
            let shape = vec![terms.len(), meta.shape.fan_out, meta.shape.aug_in()];
            let values = terms.into_iter().flat_map(|m| m.iter().copied());
            tensors.push((
                format!("hook.pending.layer.{l}"),
                floats_owned(values, shape),
            ));
        }
        for (name, t) in &state.tensors {
            let values = floats_owned(t.iter().copied(), t.shape().to_vec());
            tensors.push((format!("optimizer.{name}"), values));
        }
        let payload = Payload {
            ledger,
            config: self.config.clone(),
            per_example: self.per_example,
            step: self.step,
            mismatched: self.mismatched.clone(),
            sharded: self.sharded,
            last_check: self
                .last_check
                .map(|c| [c.scale, c.misfit, c.allowed].map(|v| format!("{v:?}"))),
            momentum: !momentum.is_empty(),
            decay: !self.shares.decay_buf.is_empty(),
            pending: pending
                .iter()
                .map(|p| (p.group, p.dense.iter().map(|t| (t.0, t.1)).collect()))
                .collect(),
            optimizer_kind: state.kind,
            optimizer_step: state.step,
            optimizer_tensors: state.tensors.into_iter().map(|(n, _)| n).collect(),
        };
        let json = serde_json::to_string(&payload)
            .map_err(|e| corrupt(format!("checkpoint header: {e}")))?;
        save_atomic(path, tensors, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, json)
    }

    /// Resumes a run from a checkpoint [`save_checkpoint`](Self::save_checkpoint)
    /// wrote: `optimizer` is a new optimizer configured as the saved one (its
    /// state is replaced by the saved state), `layers` are the traced layers
    /// (their parameters are set to the saved ones). Training then continues
    /// with the next batch as if it had never stopped.
    ///
    /// # Errors
    /// [`Error::CorruptLedger`] for a file that is not a whole, consistent
    /// checkpoint of float type `F`; [`Error::LayerMismatch`] when `layers`
    /// are not the layers the checkpoint traced (ids and shapes);
    /// [`Error::InvalidConfig`] for an optimizer of another kind, or one whose
    /// crediting mode (per example or per batch) differs; [`Error::Io`].
    pub fn resume(optimizer: O, layers: &mut [&mut dyn Traceable<F>], path: &Path) -> Result<Self> {
        with_mapped(path, |bytes| Self::resume_from(optimizer, layers, bytes))
    }

    fn resume_from(
        mut optimizer: O,
        layers: &mut [&mut dyn Traceable<F>],
        bytes: &[u8],
    ) -> Result<Self> {
        let (st, json) = decode(bytes, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)?;
        let p: Payload =
            serde_json::from_str(&json).map_err(|e| corrupt(format!("checkpoint header: {e}")))?;
        let reader = Reader { st: &st, map: None };
        let (ledger, n_ledger) = Ledger::<F>::from_open_parts(&reader, p.ledger)?;
        let n_layers = ledger.layers().len();
        let expected = n_ledger
            + n_layers * (2 + usize::from(p.momentum) + usize::from(p.decay))
            + 1
            + p.optimizer_tensors.len();
        if st.len() != expected {
            return Err(corrupt(format!(
                "{} tensors, expected {expected}",
                st.len()
            )));
        }
        let shapes: Vec<(usize, usize)> = ledger
            .layers()
            .iter()
            .map(|m| (m.shape.fan_out, m.shape.aug_in()))
            .collect();
        let current = (0..n_layers)
            .map(|l| read_f::<F>(&reader, &format!("hook.current.{l}"), shapes[l]))
            .collect::<Result<Vec<_>>>()?;
        // Per-layer f64 buffers, present only when the hook had used them.
        let buffers = |prefix: &str, present: bool| -> Result<Vec<Array2<f64>>> {
            (0..n_layers)
                .filter(|_| present)
                .map(|l| reader.matrix(&format!("{prefix}.{l}"), shapes[l]))
                .collect()
        };
        let momentum = buffers("hook.momentum", p.momentum)?;
        let decay_buf = buffers("hook.decay_buf", p.decay)?;
        let booked = ledger
            .steps_per_segment()
            .iter()
            .try_fold(0u64, |a, &n| a.checked_add(n));
        if booked != Some(p.step) {
            return Err(corrupt(format!(
                "{} steps, but the ledger's segments count {booked:?}",
                p.step
            )));
        }
        let shares = read_pending(&reader, &p.pending, &shapes, &ledger, decay_buf)?;
        let mut state = OptimizerState::new(p.optimizer_kind.clone());
        state.step = p.optimizer_step;
        for name in p.optimizer_tensors {
            let full = format!("optimizer.{name}");
            let t = reader
                .st
                .tensor(&full)
                .map_err(|_| corrupt(format!("tensor {full} missing")))?;
            if t.dtype() != dtype::<F>() {
                return Err(corrupt(format!(
                    "tensor {full}: expected {:?}",
                    dtype::<F>()
                )));
            }
            let values = reader.floats::<F>(&t, &full)?;
            let shape = IxDyn(t.shape());
            state
                .tensors
                .push((name, ArrayD::from_shape_vec(shape, values)?));
        }
        let last_check = p.last_check.map(|[s, m, a]| {
            let f = |v: String| {
                v.parse::<f64>()
                    .map_err(|e| corrupt(format!("last check {v:?}: {e}")))
            };
            Ok::<_, Error>(StepCheck {
                scale: f(s)?,
                misfit: f(m)?,
                allowed: f(a)?,
            })
        });
        let last_check = last_check.transpose()?;
        // The layers must be the traced ones, and the optimizer the saved
        // kind in the saved crediting mode, before anything changes.
        let found: Vec<LayerMeta> = layers
            .iter()
            .map(|l| LayerMeta {
                id: l.layer_id().clone(),
                shape: l.traced_shape(),
            })
            .collect();
        if found != ledger.layers() {
            let describe = |m: &[LayerMeta]| {
                m.iter()
                    .map(|m| format!("{} {:?}", m.id, m.shape.weight_shape))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Error::LayerMismatch {
                op: "OptimizerHook::resume",
                expected: describe(ledger.layers()),
                got: describe(&found),
            });
        }
        p.config.validate()?;
        // An external hook is told each step's rule: its mode is its own.
        let per_example = if p.optimizer_kind == EXTERNAL_KIND {
            p.config.per_example_external()
        } else {
            p.config.per_example(optimizer.linear_rule().is_some())?
        };
        if per_example != p.per_example {
            return Err(Error::InvalidConfig {
                what: "resumed optimizer",
                reason: format!(
                    "the checkpoint credits per {}, this optimizer would be credited per {}",
                    if p.per_example { "example" } else { "batch" },
                    if per_example { "example" } else { "batch" },
                ),
            });
        }
        optimizer.import_state(state)?;
        let widened: Vec<Array2<f64>> = current.iter().map(|m| m.mapv(F::widen)).collect();
        write_params(layers, &widened)?;
        Ok(Self {
            optimizer,
            config: p.config,
            per_example,
            ledger,
            step: p.step,
            shares,
            current,
            before: Vec::new(),
            scratch: Vec::new(),
            momentum: Momentum::from_buffer(momentum),
            last_check,
            mismatched: p.mismatched,
            sharded: p.sharded,
        })
    }
}

/// A `[rows, cols]` matrix of type `F`, checked finite.
fn read_f<F: Float>(reader: &Reader<'_>, name: &str, shape: (usize, usize)) -> Result<Array2<F>> {
    let t = reader.tensor(name, dtype::<F>(), &[shape.0, shape.1])?;
    Ok(Array2::from_shape_vec(
        shape,
        reader.floats::<F>(&t, name)?,
    )?)
}

/// The pending momentum shares: each group's weight in the buffer and its
/// dense terms, taken in order from the per-layer tensors.
fn read_pending<F: Float>(
    reader: &Reader<'_>,
    pending: &[(u32, Vec<(usize, u32)>)],
    shapes: &[(usize, usize)],
    ledger: &Ledger<F>,
    decay_buf: Vec<Array2<f64>>,
) -> Result<Shares<F>> {
    let bufs = reader.tensor("hook.pending.buf", Dtype::F64, &[pending.len()])?;
    let bufs = reader.floats::<f64>(&bufs, "hook.pending.buf")?;
    let mut terms = Vec::with_capacity(shapes.len());
    for (l, &(fo, ai)) in shapes.iter().enumerate() {
        let name = format!("hook.pending.layer.{l}");
        let (n, t) = reader.leading(&name, dtype::<F>(), &[fo, ai])?;
        let values = reader.floats::<F>(&t, &name)?;
        let arr = ndarray::Array3::from_shape_vec((n, fo, ai), values)?;
        terms.push((arr, 0usize));
    }
    // Pending groups are the last ones opened, all weighted by the open segment.
    let (first, n_groups) = (ledger.open_segment_first_group(), ledger.n_groups());
    let n_sources = ledger.sources().len();
    let mut out = Shares::default();
    let mut last_group = None;
    for (&(group, ref dense), &buf) in pending.iter().zip(&bufs) {
        if group < first || group >= n_groups || last_group.is_some_and(|g| g >= group) {
            return Err(corrupt(format!(
                "pending group {group} out of order or range"
            )));
        }
        last_group = Some(group);
        let mut p = Pending::new(group, buf);
        for &(l, s) in dense {
            let (arr, next) = terms
                .get_mut(l)
                .ok_or_else(|| corrupt(format!("pending term of layer {l}")))?;
            if s as usize >= n_sources || *next >= arr.dim().0 {
                return Err(corrupt(format!(
                    "pending term of layer {l}, source {s}: beyond the stored terms or sources"
                )));
            }
            p.dense
                .push((l, s, arr.index_axis(ndarray::Axis(0), *next).to_owned()));
            *next += 1;
        }
        out.pending.push_back(p);
    }
    if terms.iter().any(|(arr, next)| *next != arr.dim().0) {
        return Err(corrupt("pending terms stored but not listed"));
    }
    out.decay_buf = decay_buf;
    Ok(out)
}
