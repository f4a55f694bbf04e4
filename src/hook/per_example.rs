//! Per-example crediting for optimizers with a [`LinearRule`](crate::LinearRule).
//!
//! Each example is credited with its share `δ_i ã_iᵀ` of the batch gradient,
//! times the total weight with which that share reaches the weights: for a
//! share entering at step `s`, `γ_s = Σ_{t≥s} η_t · (its weight in step t's
//! update direction)`, which [`LinearRule::advance`] gives step by step
//! (momentum `μ`, dampening, Nesterov). Shares still in the momentum buffer are
//! *pending*: their group's coefficient grows every step until their weight
//! left in the buffer is below [`HookConfig::fold_tolerance`](super::HookConfig::fold_tolerance).
//! The `λ W` part of the gradient is credited to [`SourceId::Decay`].

use std::collections::VecDeque;

use ndarray::{Array2, ArrayView3, Axis, s};

use super::Batch;
use crate::error::Result;
use crate::float::Float;
use crate::ledger::Ledger;
use crate::optim::LinearRule;
use crate::trace::{SourceId, Traceable};

/// A step group whose gradient shares are still in the momentum buffer.
#[derive(Debug, Clone)]
pub(super) struct Pending<F> {
    /// The ledger's step group.
    pub(super) group: u32,
    /// Weight of the group's shares in the momentum buffer now.
    pub(super) buf: f64,
    /// Dense per-example terms `(layer, source, δᵀã)` of layers where they are smaller than factors.
    pub(super) dense: Vec<(usize, u32, Array2<F>)>,
}

impl<F> Pending<F> {
    /// Group `group`, of weight `buf` in the momentum buffer, without terms yet.
    pub(super) fn new(group: u32, buf: f64) -> Self {
        Self {
            group,
            buf,
            dense: Vec::new(),
        }
    }
}

/// The momentum state of the shares credited per example.
#[derive(Debug, Clone, Default)]
pub(super) struct Shares<F> {
    pub(super) pending: VecDeque<Pending<F>>,
    /// Per layer: the momentum buffer of the decay shares (empty until decay is used).
    pub(super) decay_buf: Vec<Array2<f64>>,
}

impl<F: Float> Shares<F> {
    /// Books the pending dense terms with their coefficient so far (when a
    /// segment closes or a ledger is finished).
    pub(super) fn book_pending(&self, ledger: &mut Ledger<F>) {
        for p in &self.pending {
            let k = ledger.coef(p.group);
            if k == 0.0 {
                continue; // not weighted in this segment (yet)
            }
            for (l, s, g) in &p.dense {
                ledger.credit_dense(*l, *s, g.view(), k);
            }
        }
    }

    /// The first group still pending (`None` when none is).
    pub(super) fn first_pending(&self) -> Option<u32> {
        self.pending.front().map(|p| p.group)
    }

    /// Credits this step's weight-decay update, as the optimizer applies it
    /// (momentum, dampening, Nesterov), to [`SourceId::Decay`]; `before` holds
    /// the parameters before the step.
    pub(super) fn record_decay(
        &mut self,
        ledger: &mut Ledger<F>,
        before: &[Array2<F>],
        rule: LinearRule,
    ) -> Result<()> {
        let s = ledger.register_source(SourceId::Decay, None, Vec::new())?;
        if self.decay_buf.is_empty() {
            self.decay_buf = before.iter().map(|m| Array2::zeros(m.raw_dim())).collect();
        }
        for (l, w) in before.iter().enumerate() {
            let buf = self.decay_buf[l]
                .as_slice_mut()
                .expect("invariant: standard layout");
            let w = w.as_slice().expect("invariant: standard layout");
            let step =
                |b: &mut f64, w: &F| -(rule.lr * rule.advance(b, rule.weight_decay * w.widen()));
            if ledger.projector(l).is_none() {
                // Exact: straight into the decay account.
                let mut acc = ledger.dense_account_mut(l, s);
                let acc = acc.as_slice_mut().expect("invariant: standard layout");
                for ((a, b), w) in acc.iter_mut().zip(buf.iter_mut()).zip(w) {
                    *a += step(b, w);
                }
            } else {
                // Online: the step's decay update, projected.
                let update: Vec<f64> = buf.iter_mut().zip(w).map(|(b, w)| step(b, w)).collect();
                let update = Array2::from_shape_vec(self.decay_buf[l].raw_dim(), update)
                    .expect("invariant: one value per parameter");
                ledger.credit_update(l, s, update.view());
            }
        }
        Ok(())
    }

    /// Credits every non-ghost example's share of this step (`sources[i]` for
    /// batch row `i`), its factors times `scale` (the gradient's scale the
    /// optimizer applied), and moves the coefficients of every pending group.
    pub(super) fn record_step(
        &mut self,
        ledger: &mut Ledger<F>,
        layers: &[&dyn Traceable<F>],
        sources: &[Option<u32>],
        (rule, scale): (LinearRule, f64),
        fold_tolerance: f64,
        projected: Option<Vec<Array2<f32>>>,
    ) -> Result<()> {
        let projected = match projected {
            None if ledger.online().is_some() => Some(project_batch(ledger, layers)?),
            p => p,
        };
        let group = ledger.open_group();
        let mut new = Pending::new(group, 0.0);
        for (l, layer) in layers.iter().enumerate() {
            let (a, d) = (layer.input_patches()?, layer.output_deltas()?);
            let phi = projected.as_ref().map(|p| &p[l]);
            credit_rows(ledger, &mut new.dense, l, sources, group, (a, d), phi);
        }
        // This step's direction: weight `scale` for the new shares, 0 for the old ones.
        ledger.add_coef(group, -rule.lr * rule.advance(&mut new.buf, scale));
        for p in &mut self.pending {
            ledger.add_coef(p.group, -rule.lr * rule.advance(&mut p.buf, 0.0));
        }
        self.pending.push_back(new);
        // Fold groups whose weight left in the buffer is negligible (all of them
        // without momentum); the tail the optimizer still applies lands in the residual.
        while self
            .pending
            .front()
            .is_some_and(|p| rule.momentum == 0.0 || p.buf.abs() < fold_tolerance)
        {
            let p = self.pending.pop_front().expect("invariant: front exists");
            let k = ledger.coef(p.group);
            for (l, s, g) in p.dense {
                ledger.credit_dense(l, s, g.view(), k);
            }
        }
        Ok(())
    }
}

/// The sources of the batch's examples (`None` for ghosts), registered.
pub(super) fn register_examples<F: Float>(
    ledger: &mut Ledger<F>,
    batch: &Batch<'_>,
) -> Result<Vec<Option<u32>>> {
    let mut sources = vec![None; batch.ids.len()];
    for i in (0..batch.ids.len()).filter(|&i| !batch.is_ghost(i)) {
        sources[i] = Some(ledger.register_source(
            SourceId::Example(batch.ids[i]),
            Some(batch.labels[i]),
            Vec::new(),
        )?);
    }
    Ok(sources)
}

/// Books one layer's per-example shares of a step as factored rows, or into
/// `dense` (per-example `δᵀã`, when that is smaller; online, the rows of
/// `projected`, the batch's projected shares).
fn credit_rows<F: Float>(
    ledger: &mut Ledger<F>,
    dense: &mut Vec<(usize, u32, Array2<F>)>,
    layer: usize,
    sources: &[Option<u32>],
    group: u32,
    (a, d): (ArrayView3<'_, F>, ArrayView3<'_, F>),
    projected: Option<&Array2<f32>>,
) {
    let (_, positions, fan_in) = a.dim();
    let fan_out = d.dim().2;
    let aug_in = ledger.layers()[layer].shape.aug_in();
    let factored_bytes = positions * ((aug_in + fan_out) * std::mem::size_of::<F>() + 8);
    let factored = factored_bytes <= aug_in * fan_out * 8;
    let credited = sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .filter(|&(i, _)| d.index_axis(Axis(0), i).iter().any(|v| *v != F::zero()));
    if let Some(phi) = projected {
        let credited: Vec<(usize, u32)> = credited.collect();
        let ids: Vec<u32> = credited.iter().map(|&(_, s)| s).collect();
        ledger.note_exact_credit(layer, &ids, factored, positions);
        for (i, s) in credited {
            let row = phi.row(i).mapv(|v| F::narrow(f64::from(v)));
            dense.push((layer, s, row.insert_axis(Axis(0))));
        }
        return;
    }
    if !factored {
        // One patch buffer for the step; its bias column stays 1.
        let mut a_aug = Array2::<F>::ones((positions, aug_in));
        for (i, s) in credited {
            a_aug
                .slice_mut(s![.., ..fan_in])
                .assign(&a.index_axis(Axis(0), i));
            dense.push((layer, s, d.index_axis(Axis(0), i).t().dot(&a_aug)));
        }
        return;
    }
    for (i, s) in credited {
        let (ai, di) = (a.index_axis(Axis(0), i), d.index_axis(Axis(0), i));
        for p in 0..positions {
            ledger.credit_row(layer, s, group, ai.row(p), di.row(p));
        }
    }
}

/// Online recording: every batch row's share `Σ_p d_p ã_pᵀ` of each layer,
/// projected (in `f32`): per layer `[batch, k]`.
pub(super) fn project_batch<F: Float>(
    ledger: &Ledger<F>,
    layers: &[&dyn Traceable<F>],
) -> Result<Vec<Array2<f32>>> {
    let mut out = Vec::with_capacity(layers.len());
    for (l, layer) in layers.iter().enumerate() {
        let Some(proj) = ledger.projector(l) else {
            return Ok(Vec::new());
        };
        out.push(proj.project_factors(layer.input_patches()?, layer.output_deltas()?));
    }
    Ok(out)
}
