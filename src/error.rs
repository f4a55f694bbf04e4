//! The crate's single error type.

/// Everything a caller of this crate can get wrong, and every file problem.
///
/// Messages are lowercase, name the operation, and say what was expected and
/// what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An array did not have the shape an operation needs.
    #[error("{op}: expected shape {expected}, found {got}")]
    ShapeMismatch {
        /// The operation that checked the shape.
        op: &'static str,
        /// The expected shape, as text (`[batch, 64]`).
        expected: String,
        /// The shape that was passed.
        got: String,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: {what} {reason}")]
    InvalidConfig {
        /// The setting.
        what: &'static str,
        /// Why it is invalid, with the value found.
        reason: String,
    },
    /// A backward pass or a gradient query ran before the forward pass it needs.
    #[error("{layer}: no cached forward pass (call forward before {op})")]
    NoForwardCache {
        /// The layer.
        layer: String,
        /// The operation that needed the cache.
        op: &'static str,
    },
    /// The hook or a query needed the gradients of a backward pass that has not run.
    #[error("{layer}: no cached backward pass (call backward before {op})")]
    NoBackwardCache {
        /// The layer.
        layer: String,
        /// The operation that needed the cache.
        op: &'static str,
    },
    /// A step on factors the previous step already booked (no backward pass since).
    #[error(
        "{op}: the factors of {layer} come from the backward pass the previous step booked; run forward and backward on this batch before stepping again"
    )]
    StalePass {
        /// The operation.
        op: &'static str,
        /// The layer.
        layer: String,
    },
    /// A query built from the layers' last training pass instead of a pass over the query inputs.
    #[error(
        "{op}: the query's layer inputs are those of the last training step, not of the query inputs; run the final network on the queries first (Query::forward or Query::gradients do)"
    )]
    StaleQuery {
        /// The operation.
        op: &'static str,
    },
    /// An optimizer's update is not what the step's factors and update rule predict.
    #[error(
        "{op}: step {step}: the update differs from the one the factors and the update rule predict by {misfit:.3e} of its size (allowed {allowed:.1e}); {hint}"
    )]
    UpdateMismatch {
        /// The operation.
        op: &'static str,
        /// The step (0-based) that did not fit.
        step: u64,
        /// `‖ΔW − ΔŴ‖ / ‖ΔW‖`.
        misfit: f64,
        /// The misfit allowed.
        allowed: f64,
        /// What to check.
        hint: String,
    },
    /// A ledger's residual (what no source was credited with) is larger than allowed.
    #[error(
        "{op}: the residual of {layer} is {fraction:.3e} of its change, more than the maximum {max:.1e}: updates made outside the hook, steps booked with OnMismatch::Residual, or (for one shard of a data-parallel run) the other shards' shares were not credited; find them, or raise HookConfig::max_residual_fraction"
    )]
    Unbalanced {
        /// The operation.
        op: &'static str,
        /// The layer with the largest residual fraction.
        layer: String,
        /// Its residual fraction `‖residual‖ / ‖W_T − W₀‖`.
        fraction: f64,
        /// The maximum allowed.
        max: f64,
    },
    /// A layer is not the one the ledger recorded (name or shape differs).
    #[error("layer mismatch in {op}: expected {expected}, found {got}")]
    LayerMismatch {
        /// The operation.
        op: &'static str,
        /// The layer the ledger knows.
        expected: String,
        /// The layer that was passed.
        got: String,
    },
    /// A source id is not in the ledger.
    #[error("unknown source {source_id} in {op}")]
    UnknownSource {
        /// The operation.
        op: &'static str,
        /// The id that was looked up.
        source_id: String,
    },
    /// The same example id appears twice in one step, or with two labels.
    #[error("{op}: {reason}")]
    InconsistentSource {
        /// The operation.
        op: &'static str,
        /// What is inconsistent, with the ids and labels found.
        reason: String,
    },
    /// An input, gradient or update holds NaN or infinity.
    #[error("{op}: non-finite value (NaN or infinity) in {what}")]
    NonFinite {
        /// The operation.
        op: &'static str,
        /// Which array held it.
        what: String,
    },
    /// A batch, query set or ledger is empty where data is needed.
    #[error("{op}: {what} is empty")]
    Empty {
        /// The operation.
        op: &'static str,
        /// What was empty.
        what: &'static str,
    },
    /// A label is outside `0..n_classes`.
    #[error("{op}: label {label} out of range, expected 0..{n_classes}")]
    LabelOutOfRange {
        /// The operation.
        op: &'static str,
        /// The label found.
        label: usize,
        /// The number of classes.
        n_classes: usize,
    },
    /// An index (segment, layer, row) is outside its range.
    #[error("{op}: {what} index {index} out of range, expected 0..{len}")]
    IndexOutOfRange {
        /// The operation.
        op: &'static str,
        /// What kind of index.
        what: &'static str,
        /// The index passed.
        index: usize,
        /// The number of valid indices.
        len: usize,
    },
    /// A saved ledger is truncated, corrupted, foreign or of another version.
    #[error("corrupt ledger: {reason}")]
    CorruptLedger {
        /// What is wrong, with the values found.
        reason: String,
    },
    /// A data file does not parse.
    #[error("corrupt data in {what}: {reason}")]
    CorruptData {
        /// The file or source.
        what: &'static str,
        /// What is wrong, where.
        reason: String,
    },
    /// Drawing a plot or encoding an image failed.
    #[error("{what}: {reason}")]
    Report {
        /// What was being drawn.
        what: &'static str,
        /// The backend's message.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An ndarray shape error.
    #[error(transparent)]
    Shape(#[from] ndarray::ShapeError),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a shape as `[a, b, c]` for error messages.
pub(crate) fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Values that can be scanned for NaN and infinity: slices and ndarray arrays
/// (contiguous ones as slices, so the scan vectorises).
pub(crate) trait FiniteScan<F> {
    /// `Σ x·0`: zero when every value is finite, NaN otherwise.
    fn scan(&self) -> F;
}

impl<F: crate::float::Float> FiniteScan<F> for [F] {
    fn scan(&self) -> F {
        // Sixteen independent lanes: no addition waits on the previous one.
        let mut acc = [F::zero(); 16];
        let chunks = self.chunks_exact(16);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &x) in acc.iter_mut().zip(c) {
                *a += x * F::zero();
            }
        }
        rest.iter()
            .chain(&acc)
            .fold(F::zero(), |t, &x| t + x * F::zero())
    }
}

impl<F, S, D> FiniteScan<F> for ndarray::ArrayBase<S, D>
where
    F: crate::float::Float,
    S: ndarray::Data<Elem = F>,
    D: ndarray::Dimension,
{
    fn scan(&self) -> F {
        match self.as_slice_memory_order() {
            Some(v) => v.scan(),
            None => self.iter().fold(F::zero(), |t, &x| t + x * F::zero()),
        }
    }
}

/// Returns `Err(NonFinite)` when any value is NaN or infinite.
pub(crate) fn check_finite<F: crate::float::Float, V: FiniteScan<F> + ?Sized>(
    values: &V,
    op: &'static str,
    what: &str,
) -> Result<()> {
    if values.scan().is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            op,
            what: what.to_string(),
        })
    }
}
