//! Batch-level crediting for any optimizer: the exact update of a step,
//! `W_after − W_before`, credited to the step's batch ([`SourceId::Batch`]).
//! With class-pure batches this gives exact class attribution for Adam or any
//! other optimizer.

use std::collections::HashSet;

use ndarray::Array2;

use super::Batch;
use crate::error::Result;
use crate::float::Float;
use crate::ledger::Ledger;
use crate::trace::{ExampleId, SourceId};

/// Credits the update `after − before` of every layer to the batch source of
/// step `step` (both read and checked by [`super::params::read_into`]).
pub(super) fn record_batch<F: Float>(
    ledger: &mut Ledger<F>,
    before: &[Array2<F>],
    after: &[Array2<F>],
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
    let s = ledger.register_source(SourceId::Batch(step), label, members)?;
    for (l, (w0, w1)) in before.iter().zip(after).enumerate() {
        // In f64: the difference of two F values is exact there.
        let mut update = Array2::<f64>::zeros(w0.raw_dim());
        ndarray::Zip::from(&mut update)
            .and(w0)
            .and(w1)
            .for_each(|a, &x0, &x1| *a = x1.widen() - x0.widen());
        ledger.credit_update(l, s, update.view());
    }
    Ok(())
}
