//! The hook's copies of the traced parameters: read once per step, checked
//! against the shapes the ledger knows and for finiteness before they are
//! used, so a step that fails leaves the hook's last good copy in place.

use ndarray::Array2;

use crate::error::{Error, FiniteScan, Result, shape_str};
use crate::float::Float;
use crate::ledger::LayerMeta;
use crate::trace::Traceable;

/// Copies every layer's `[W | b]` into `into` (allocated on first use),
/// checking that the weight and bias have the sizes the ledger knows and hold
/// no NaN or infinity. On error `into` holds partial data: read into a scratch
/// buffer and keep it only on success.
///
/// # Errors
/// [`Error::ShapeMismatch`] for a weight or bias of another size than traced
/// (or a bias behind `has_bias = false`); [`Error::NonFinite`].
pub(super) fn read_into<F: Float>(
    metas: &[LayerMeta],
    layers: &[&dyn Traceable<F>],
    into: &mut Vec<Array2<F>>,
) -> Result<()> {
    const OP: &str = "OptimizerHook::step (parameters)";
    if into.len() != metas.len() {
        *into = metas
            .iter()
            .map(|m| Array2::zeros((m.shape.fan_out, m.shape.aug_in())))
            .collect();
    }
    for ((layer, meta), dst) in layers.iter().zip(metas).zip(into.iter_mut()) {
        let shape = &meta.shape;
        let (fan_in, aug_in) = (shape.fan_in, shape.aug_in());
        let w = layer.weight();
        let b = layer.bias();
        if w.len() != shape.fan_out * fan_in
            || b.is_some() != shape.has_bias
            || b.is_some_and(|b| b.len() != shape.fan_out)
        {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "{}: a weight of {} values{}, as traced",
                    meta.id,
                    shape.fan_out * fan_in,
                    if shape.has_bias {
                        format!(" and a bias of {}", shape.fan_out)
                    } else {
                        " and no bias".into()
                    }
                ),
                got: format!(
                    "weight {}, bias {:?}",
                    shape_str(w.shape()),
                    b.map(|b| b.len())
                ),
            });
        }
        let dst = dst.as_slice_mut().expect("invariant: standard layout");
        let w = w.as_standard_layout();
        let w = w.as_slice().expect("invariant: standard layout");
        // One pass that runs every step: copy a row (memcpy), then scan the
        // copy for NaN/inf while it is still in cache.
        let mut probe = F::zero();
        for (row, src) in dst.chunks_exact_mut(aug_in).zip(w.chunks_exact(fan_in)) {
            row[..fan_in].copy_from_slice(src);
            probe += row[..fan_in].scan();
        }
        if let Some(b) = b {
            for (row, &v) in dst.chunks_exact_mut(aug_in).zip(b.iter()) {
                row[fan_in] = v;
                probe += v * F::zero();
            }
        }
        if !probe.is_finite() {
            return Err(Error::NonFinite {
                op: OP,
                what: format!("parameters of {}", meta.id),
            });
        }
    }
    Ok(())
}
