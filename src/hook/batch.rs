//! Batch-level crediting for any optimizer: the exact update of a step,
//! `W_after − W_before`, credited to the step's batch ([`SourceId::Batch`]).
//! With class-pure batches this gives exact class attribution for Adam or any
//! other optimizer.

use std::collections::HashSet;

use ndarray::Array2;

use super::Batch;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::Ledger;
use crate::trace::{ExampleId, SourceId, Traceable, TracedShape};

/// Credits the update `W_after − W_before` of every layer (`current` holds
/// `W_before` and is refreshed to `W_after`) to the batch source of step `step`.
pub(super) fn record_batch<F: Float>(
    ledger: &mut Ledger<F>,
    current: &mut [Array2<F>],
    layers: &[&mut dyn Traceable<F>],
    batch: &Batch<'_>,
    step: u64,
) -> Result<()> {
    let members: Vec<ExampleId> = (0..batch.ids.len())
        .filter(|&i| !batch.is_ghost(i))
        .map(|i| batch.ids[i])
        .collect();
    let labels: HashSet<usize> = (0..batch.ids.len())
        .filter(|&i| !batch.is_ghost(i))
        .map(|i| batch.labels[i])
        .collect();
    let label = (labels.len() == 1).then(|| *labels.iter().next().expect("invariant: one label"));
    let shapes: Vec<TracedShape> = ledger.layers().iter().map(|m| m.shape.clone()).collect();
    for (layer, shape) in layers.iter().zip(&shapes) {
        let mut finite = true;
        for_each_param(&**layer, shape, |_, v| finite &= v.is_finite());
        if !finite {
            return Err(Error::NonFinite {
                op: "OptimizerHook::step (parameters)",
                what: format!("parameters of {}", layer.layer_id()),
            });
        }
    }
    let s = ledger.register_source(SourceId::Batch(step), label, members)?;
    for (l, (layer, shape)) in layers.iter().zip(&shapes).enumerate() {
        let mut acc = ledger.dense_account_mut(l, s);
        let acc = acc.as_slice_mut().expect("invariant: standard layout");
        let cur = current[l]
            .as_slice_mut()
            .expect("invariant: standard layout");
        for_each_param(&**layer, shape, |k, v| {
            acc[k] += v.widen() - cur[k].widen();
            cur[k] = v;
        });
    }
    Ok(())
}

/// Visits every traced parameter of `layer` as `(index in [W | b], value)`.
fn for_each_param<F: Float>(
    layer: &dyn Traceable<F>,
    shape: &TracedShape,
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
