//! The per-step check that the optimizer did what the factors and the update
//! rule say it did (the math is on [`StepCheck`]).

use ndarray::{Array2, ArrayView2, Axis};

use crate::error::Result;
use crate::float::Float;
use crate::ledger::Ledger;
use crate::optim::LinearRule;
use crate::trace::Traceable;

/// What the per-step update check found for one step.
///
/// The factors of a step give its batch gradient `G = Σ_{i,p} δ_{ip} ã_{ip}ᵀ`
/// (`ã` the patch with a 1 for the bias). The rule is linear in the gradient,
/// so the update it predicts from the parameters before the step `W`, the
/// momentum buffer `buf` and a scale `c` of the gradient is
///
/// ```text
/// ΔŴ(c) = A + c·B,   A = −η·dir(buf, λW),   B = −η·k·G
/// ```
///
/// where `dir(buf, g)` is the rule's update direction and `k` the weight of a
/// new gradient in it (1 without momentum, the entry weight with momentum,
/// `1 + μ·w` with Nesterov). The scale that fits the observed update `ΔW` best
/// is `c = ⟨ΔW − A, B⟩ / ⟨B, B⟩`, one for the whole network: gradient-norm
/// clipping, loss scaling and a dampening the rule did not declare are all
/// such a uniform scale, and crediting `c·δ ãᵀ` per example is then exact.
/// The step is accepted when `c > 0` and the misfit
/// `‖ΔW − A − c·B‖` is within the tolerance times `‖ΔW‖` plus a rounding floor
/// (`16·ε` times the size of what the optimizer and the gradient summed).
/// Anything else — negated or stale factors, one layer's gradient scaled
/// differently, a wrong learning rate or momentum, a change made outside the
/// optimizer — does not fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCheck {
    /// The scale of the gradient the optimizer applied relative to the
    /// factors' gradient (1 unless the gradient was clipped or rescaled).
    pub scale: f64,
    /// `‖ΔW − ΔŴ‖ / ‖ΔW‖`: how far the update is from the prediction (0 when
    /// the parameters did not move).
    pub misfit: f64,
    /// The misfit allowed for this step (the tolerance plus the rounding floor, relative).
    pub allowed: f64,
}

impl StepCheck {
    /// Whether the update is the predicted one.
    pub fn fits(&self) -> bool {
        self.scale > 0.0 && self.scale.is_finite() && self.misfit <= self.allowed
    }
}

/// Each layer's batch gradient from its factors, `[fan_out, aug_in]` in `f64`,
/// and the rounding scale `Σ_{i,p} ‖δ_{ip}‖·‖ã_{ip}‖` of summing it.
pub(super) fn factor_gradients<F: Float>(
    layers: &[&dyn Traceable<F>],
    has_bias: &[bool],
) -> Result<(Vec<Array2<f64>>, f64)> {
    let mut out = Vec::with_capacity(layers.len());
    let mut spread = 0.0;
    for (layer, &bias) in layers.iter().zip(has_bias) {
        let (a, d) = (layer.input_patches()?, layer.output_deltas()?);
        spread += row_spread(a, d, bias);
        let (n, p, fan_in) = a.dim();
        let fan_out = d.dim().2;
        let (a, d) = (a.as_standard_layout(), d.as_standard_layout());
        let a2 = ArrayView2::from_shape((n * p, fan_in), a.as_slice().expect("standard layout"))
            .expect("invariant: shape checked by check_factors");
        let d2 = ArrayView2::from_shape((n * p, fan_out), d.as_slice().expect("standard layout"))
            .expect("invariant: shape checked by check_factors");
        let gw = d2.t().dot(&a2);
        let mut g = Array2::<f64>::zeros((fan_out, fan_in + usize::from(bias)));
        g.slice_mut(ndarray::s![.., ..fan_in])
            .assign(&gw.mapv(F::widen));
        if bias {
            let gb = d2.sum_axis(Axis(0));
            g.column_mut(fan_in).assign(&gb.mapv(F::widen));
        }
        out.push(g);
    }
    Ok((out, spread))
}

/// The update check of a per-example step (see [`StepCheck`]) from the
/// parameters `before` and `after` it. Online (`projected`: the batch's
/// projected shares), in projected space: the parameters, the update, the
/// gradient and the momentum buffer all through the layer's projection —
/// linear, so the rule's prediction carries over, and a random projection
/// keeps norms (a wrong update does not vanish in it).
pub(super) fn check_update<F: Float>(
    momentum: &mut Momentum,
    ledger: &Ledger<F>,
    (layers, rule): (&[&dyn Traceable<F>], LinearRule),
    (before, after): (&[Array2<F>], &[Array2<F>]),
    projected: Option<&[Array2<f32>]>,
    tolerance: f64,
) -> Result<StepCheck> {
    let has_bias: Vec<bool> = ledger.layers().iter().map(|m| m.shape.has_bias).collect();
    let eps = F::epsilon().widen();
    let Some(projected) = projected else {
        let (grads, spread) = factor_gradients(layers, &has_bias)?;
        return Ok(momentum.check(rule, before, after, &grads, spread, tolerance, eps));
    };
    let spread = factor_spread(layers, &has_bias)?;
    let (mut w0, mut w1, mut grads) = (Vec::new(), Vec::new(), Vec::new());
    for (l, phi) in projected.iter().enumerate() {
        let start = ledger.account_space(l, before[l].mapv(F::widen));
        let mut change = Array2::<f64>::zeros(before[l].raw_dim());
        ndarray::Zip::from(&mut change)
            .and(&before[l])
            .and(&after[l])
            .for_each(|c, &x0, &x1| *c = x1.widen() - x0.widen());
        w1.push(&start + &ledger.account_space(l, change));
        w0.push(start);
        let g = phi.sum_axis(Axis(0)).mapv(f64::from);
        grads.push(g.insert_axis(Axis(0)));
    }
    Ok(momentum.check(rule, &w0, &w1, &grads, spread, tolerance, eps))
}

/// The rounding scale `Σ_{i,p} ‖δ_{ip}‖·‖ã_{ip}‖` of a step's factors (as
/// [`factor_gradients`], without the gradients).
pub(super) fn factor_spread<F: Float>(
    layers: &[&dyn Traceable<F>],
    has_bias: &[bool],
) -> Result<f64> {
    let mut spread = 0.0;
    for (layer, &bias) in layers.iter().zip(has_bias) {
        let (a, d) = (layer.input_patches()?, layer.output_deltas()?);
        spread += row_spread(a, d, bias);
    }
    Ok(spread)
}

/// `Σ_rows ‖δ‖·‖ã‖` over the `(example, position)` rows of one layer.
fn row_spread<F: Float>(
    a: ndarray::ArrayView3<'_, F>,
    d: ndarray::ArrayView3<'_, F>,
    bias: bool,
) -> f64 {
    let sq = |r: ndarray::ArrayView1<'_, F>| r.iter().map(|v| v.widen() * v.widen()).sum::<f64>();
    let mut spread = 0.0;
    for (ai, di) in a.outer_iter().zip(d.outer_iter()) {
        for (ar, dr) in ai.outer_iter().zip(di.outer_iter()) {
            spread += ((sq(ar) + f64::from(u8::from(bias))) * sq(dr)).sqrt();
        }
    }
    spread
}

/// An owned array's values (the hook's parameter copies, gradients and
/// buffers are all allocated in standard layout).
fn slice<T>(m: &Array2<T>) -> &[T] {
    m.as_slice().expect("invariant: standard layout")
}

/// The optimizer's momentum buffer as the rule predicts it (`f64`, per layer).
#[derive(Clone, Debug, Default)]
pub(super) struct Momentum {
    buf: Vec<Array2<f64>>,
    /// The buffer after the step being checked, kept by [`commit`](Self::commit).
    next: Vec<Array2<f64>>,
}

impl Momentum {
    /// Checks one step's update `after − before` against the rule and the
    /// factor gradients `grads` (`spread`: their rounding scale; `eps`: the
    /// network's float precision, whatever type the arrays are in). The buffer
    /// after the step is kept aside until [`commit`](Self::commit).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check<F: Float>(
        &mut self,
        rule: LinearRule,
        before: &[Array2<F>],
        after: &[Array2<F>],
        grads: &[Array2<f64>],
        spread: f64,
        tolerance: f64,
        eps: f64,
    ) -> StepCheck {
        // The rule is linear in (buffer, gradient): its direction is
        // `cb·b + cg·g` and the buffer after it `mb·b + mg·g`; `cg` is the
        // weight of a unit new gradient in the direction.
        let (cb, mb) = {
            let mut b = 1.0;
            (rule.advance(&mut b, 0.0), b)
        };
        let (cg, mg) = {
            let mut b = 0.0;
            (rule.advance(&mut b, 1.0), b)
        };
        if rule.first_step || self.buf.len() != before.len() {
            self.buf = before.iter().map(|w| Array2::zeros(w.raw_dim())).collect();
        }
        if self.next.len() != before.len() {
            self.next = before.iter().map(|w| Array2::zeros(w.raw_dim())).collect();
        }
        let (lr, decay) = (rule.lr, rule.weight_decay);
        // First pass: the fitted scale (sums in four lanes, so they vectorise).
        let mut acc = [[0.0f64; 4]; 5]; // num, den, ‖W‖², ‖ΔW‖², ‖buf‖²
        for l in 0..before.len() {
            let (w0s, w1s) = (slice(&before[l]), slice(&after[l]));
            let (gs, bs) = (slice(&grads[l]), slice(&self.buf[l]));
            for (i, (((w0, w1), &g), &b)) in w0s.iter().zip(w1s).zip(gs).zip(bs).enumerate() {
                let (w0, w1) = (w0.widen(), w1.widen());
                let a = -lr * (cb * b + cg * decay * w0);
                let bb = -lr * cg * g;
                let dw = w1 - w0;
                let lane = i & 3;
                acc[0][lane] += (dw - a) * bb;
                acc[1][lane] += bb * bb;
                acc[2][lane] += w0 * w0;
                acc[3][lane] += dw * dw;
                acc[4][lane] += b * b;
            }
        }
        let [num, den, wnorm, dnorm, bufnorm] = acc.map(|a| (a[0] + a[1]) + (a[2] + a[3]));
        let k = cg;
        let (wnorm, dnorm) = (wnorm.sqrt(), dnorm.sqrt());
        let floor_without = 16.0
            * eps
            * (wnorm
                + dnorm
                + rule.lr * (rule.momentum * bufnorm.sqrt() + rule.weight_decay * wnorm));
        // A gradient below rounding cannot be scaled measurably: take it as is.
        let scale = if den.sqrt() > floor_without {
            num / den
        } else {
            1.0
        };
        let floor = floor_without + 16.0 * eps * rule.lr * k * scale.abs() * spread;
        // Second pass: the misfit at that scale, and the buffer after the step.
        let mut miss = [0.0f64; 4];
        for l in 0..before.len() {
            let (w0s, w1s) = (slice(&before[l]), slice(&after[l]));
            let gs = slice(&grads[l]);
            let bs = self.buf[l].as_slice().expect("invariant: standard layout");
            let next = self.next[l]
                .as_slice_mut()
                .expect("invariant: standard layout");
            let entries = w0s.iter().zip(w1s).zip(gs).zip(bs).zip(next.iter_mut());
            for (i, ((((w0, w1), &g), &b), n)) in entries.enumerate() {
                let w0 = w0.widen();
                let total = decay * w0 + scale * g;
                let predicted = -lr * (cb * b + cg * total);
                *n = mb * b + mg * total;
                let r = w1.widen() - w0 - predicted;
                miss[i & 3] += r * r;
            }
        }
        let miss = (miss[0] + miss[1]) + (miss[2] + miss[3]);
        let miss = miss.sqrt();
        if dnorm == 0.0 {
            let misfit = if miss <= floor { 0.0 } else { f64::INFINITY };
            StepCheck {
                scale,
                misfit,
                allowed: tolerance,
            }
        } else {
            StepCheck {
                scale,
                misfit: miss / dnorm,
                allowed: tolerance + floor / dnorm,
            }
        }
    }

    /// The predicted buffer (empty before the first checked step).
    pub(super) fn buffer(&self) -> &[Array2<f64>] {
        &self.buf
    }

    /// A predicted buffer restored from a checkpoint.
    pub(super) fn from_buffer(buf: Vec<Array2<f64>>) -> Self {
        Self {
            buf,
            next: Vec::new(),
        }
    }

    /// Keeps the buffer of the step last checked (once it is booked).
    pub(super) fn commit(&mut self) {
        std::mem::swap(&mut self.buf, &mut self.next);
    }
}
