//! Softmax cross-entropy over a batch of logits.

use ndarray::{Array1, Array2, ArrayView2, Axis};

use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;

/// How per-example losses combine into the batch loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reduction {
    /// Mean over the examples that carry loss (the usual training loss). Default.
    #[default]
    Mean,
    /// Sum: the deltas are then per-example gradients (used by the loss lens).
    Sum,
}

/// The loss value, the per-example losses, and `∂L/∂logits`.
#[derive(Clone, Debug)]
pub struct LossOutput<F> {
    /// The batch loss.
    pub loss: F,
    /// Each example's own cross-entropy `−log softmax(z)[y]` (0 for ghosts).
    pub per_example: Array1<F>,
    /// `∂L/∂logits`, `[batch, classes]`.
    pub grad: Array2<F>,
}

/// Softmax cross-entropy `ℓ = −log softmax(z)[y]`, numerically stable at any logit scale.
///
/// # Example
/// ```
/// use ndarray::array;
/// use refinement_ledger::nn::SoftmaxCrossEntropy;
/// let out = SoftmaxCrossEntropy::default().loss_and_grad(array![[0.0f64, 0.0]].view(), &[1])?;
/// assert!((out.loss - 2f64.ln()).abs() < 1e-12);
/// assert!((out.grad[[0, 1]] + 0.5).abs() < 1e-12);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct SoftmaxCrossEntropy {
    /// Mean (default) or sum over the batch.
    pub reduction: Reduction,
}

impl SoftmaxCrossEntropy {
    /// Cross-entropy with the given reduction.
    pub fn new(reduction: Reduction) -> Self {
        Self { reduction }
    }

    /// Loss and gradient for `logits [batch, classes]` and one label per row.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the label count differs from the batch,
    /// [`Error::LabelOutOfRange`], [`Error::Empty`] for an empty batch,
    /// [`Error::NonFinite`] for NaN or infinite logits.
    pub fn loss_and_grad<F: Float>(
        &self,
        logits: ArrayView2<'_, F>,
        labels: &[usize],
    ) -> Result<LossOutput<F>> {
        self.loss_and_grad_masked(logits, labels, None)
    }

    /// As [`loss_and_grad`](Self::loss_and_grad), but rows whose `mask` entry is
    /// `false` are *ghosts*: forwarded, carrying no loss and no gradient.
    ///
    /// # Errors
    /// As [`loss_and_grad`](Self::loss_and_grad); also [`Error::Empty`] when every row is a ghost.
    pub fn loss_and_grad_masked<F: Float>(
        &self,
        logits: ArrayView2<'_, F>,
        labels: &[usize],
        mask: Option<&[bool]>,
    ) -> Result<LossOutput<F>> {
        const OP: &str = "SoftmaxCrossEntropy::loss_and_grad";
        let (b, c) = logits.dim();
        if b == 0 {
            return Err(Error::Empty {
                op: OP,
                what: "batch",
            });
        }
        if labels.len() != b || mask.is_some_and(|m| m.len() != b) {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!("{b} labels and mask entries (one per logit row)"),
                got: format!(
                    "{} labels, {:?} mask entries",
                    labels.len(),
                    mask.map(<[bool]>::len)
                ),
            });
        }
        if let Some(&label) = labels.iter().find(|&&y| y >= c) {
            return Err(Error::LabelOutOfRange {
                op: OP,
                label,
                n_classes: c,
            });
        }
        check_finite(&logits, OP, "logits")?;
        let active = |i: usize| mask.is_none_or(|m| m[i]);
        let n_active = (0..b).filter(|&i| active(i)).count();
        if n_active == 0 {
            return Err(Error::Empty {
                op: OP,
                what: "set of non-ghost rows",
            });
        }
        let scale = match self.reduction {
            Reduction::Mean => F::one() / F::narrow(n_active as f64),
            Reduction::Sum => F::one(),
        };
        let mut grad = Array2::zeros((b, c));
        let mut per_example = Array1::zeros(b);
        for (i, row) in logits.axis_iter(Axis(0)).enumerate() {
            if !active(i) {
                continue;
            }
            let max = row.fold(F::neg_infinity(), |m, &v| m.max(v));
            let sum_exp = row.fold(F::zero(), |s, &v| s + (v - max).exp());
            let log_z = max + sum_exp.ln();
            per_example[i] = log_z - row[labels[i]];
            for (j, &v) in row.iter().enumerate() {
                let p = (v - log_z).exp();
                let target = if j == labels[i] { F::one() } else { F::zero() };
                grad[[i, j]] = (p - target) * scale;
            }
        }
        let loss = per_example.sum() * scale;
        debug_assert!(
            grad.iter().all(|g| g.is_finite()),
            "{}",
            shape_str(grad.shape())
        );
        Ok(LossOutput {
            loss,
            per_example,
            grad,
        })
    }
}

/// Row-wise softmax probabilities of `logits [batch, classes]`.
pub fn softmax<F: Float>(logits: ArrayView2<'_, F>) -> Array2<F> {
    let mut out = logits.to_owned();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let max = row.fold(F::neg_infinity(), |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
    }
    out
}
