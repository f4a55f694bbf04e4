//! What a step is checked for before anything is booked: the layers, the
//! batch, the factors and the rule, and the error of an update that does not
//! fit.

use std::collections::HashSet;

use super::{Batch, OptimizerHook, StepCheck};
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::optim::LinearRule;
use crate::trace::{MAX_CLASSES, SourceId, Traceable};

impl<O, F: Float> OptimizerHook<O, F> {
    /// The rule a step is credited with: `Some` (validated) in per-example mode.
    pub(super) fn step_rule(&self, rule: Option<LinearRule>) -> Result<Option<LinearRule>> {
        if !self.per_example {
            return Ok(None);
        }
        let rule = rule.ok_or(Error::InvalidConfig {
            what: "optimizer",
            reason: "reported no linear rule for a per-example step; give the step's rule \
                     (an External optimizer's steps are recorded by record_step with their \
                     rule), or credit per batch (HookConfig::with_credit(Credit::Batch))"
                .into(),
        })?;
        rule.validate()?;
        Ok(Some(rule))
    }

    /// What can be checked before the parameters move: layers, batch, factors.
    pub(super) fn precheck(
        &self,
        layers: &[&dyn Traceable<F>],
        batch: &Batch<'_>,
        rule: Option<LinearRule>,
    ) -> Result<()> {
        const OP: &str = "OptimizerHook::step";
        self.ledger.check_layers(layers, OP)?;
        self.check_batch(batch)?;
        if rule.is_some() {
            for (l, layer) in layers.iter().enumerate() {
                self.check_factors(*layer, batch.ids.len())?;
                let pass = layer.pass_id();
                if pass.is_some() && self.ledger.last_passes().get(l) == Some(&pass) {
                    return Err(Error::StalePass {
                        op: OP,
                        layer: layer.layer_id().to_string(),
                    });
                }
            }
        }
        Ok(())
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

/// The error of a step whose update does not fit, with what to check.
pub(super) fn mismatch(step: u64, rule: LinearRule, found: &StepCheck) -> Error {
    let hint = if !(found.scale > 0.0 && found.scale.is_finite()) {
        format!(
            "the factors point against the update (fitted gradient scale {:.3e}): a traced \
             layer's deltas are not ∂L/∂z of the loss the optimizer stepped on",
            found.scale
        )
    } else {
        format!(
            "check that the rule (lr {}, momentum {}, dampening {}, nesterov {}, weight decay {}) \
             is the optimizer's, that every traced layer's patches and deltas are those of this \
             step's forward and backward pass, and that only the optimizer changed the \
             parameters since the last step; to book such steps to the residual instead, use \
             HookConfig::with_mismatch(OnMismatch::Residual)",
            rule.lr, rule.momentum, rule.dampening, rule.nesterov, rule.weight_decay
        )
    };
    Error::UpdateMismatch {
        op: "OptimizerHook::step",
        step,
        misfit: found.misfit,
        allowed: found.allowed,
        hint,
    }
}
