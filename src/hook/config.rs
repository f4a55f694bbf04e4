//! What a hook is told: its crediting mode and tolerance ([`HookConfig`]) and,
//! at each step, the examples of the batch ([`Batch`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::trace::ExampleId;

/// What each update is credited to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credit {
    /// Per example when the optimizer reports a [`LinearRule`](crate::LinearRule), per batch otherwise. Default.
    #[default]
    Auto,
    /// Per example; the optimizer must report a [`LinearRule`](crate::LinearRule) at every step.
    PerExample,
    /// Per batch, whatever the optimizer (the paper's class-pure batch protocol).
    Batch,
}

/// What a per-example step whose update does not fit its factors and rule does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnMismatch {
    /// The step is an [`Error::UpdateMismatch`](crate::Error::UpdateMismatch)
    /// and nothing is booked. Default.
    #[default]
    Error,
    /// The step is booked with the best-fitting scale; what the factors do not
    /// explain lands in the residual, and the step is listed by
    /// [`OptimizerHook::mismatched_steps`](crate::OptimizerHook::mismatched_steps).
    Residual,
}

/// Configuration of an [`OptimizerHook`](crate::OptimizerHook).
///
/// # Example
/// ```
/// use refinement_ledger::{Credit, HookConfig};
/// let config = HookConfig::default().with_credit(Credit::Batch).with_fold_tolerance(1e-10);
/// assert_eq!(config.credit, Credit::Batch);
/// assert_eq!(HookConfig::default().fold_tolerance, 1e-12);
/// assert_eq!(HookConfig::default().max_residual_fraction, 1e-2);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookConfig {
    /// Crediting mode. Default: [`Credit::Auto`].
    pub credit: Credit,
    /// A pending gradient share is folded into its account once its weight left
    /// in the momentum buffer, `μ^{t−s}` (times the entry weight), drops below
    /// this; what it would still add goes to the residual. Default: 1e-12.
    pub fold_tolerance: f64,
    /// Per-example steps: the relative misfit `‖ΔW − ΔŴ‖ / ‖ΔW‖` allowed
    /// between the optimizer's update and the one the factors and the rule
    /// predict, on top of a rounding floor. Default: 1e-3.
    pub update_tolerance: f64,
    /// What a step that does not fit does. Default: [`OnMismatch::Error`].
    pub on_mismatch: OnMismatch,
    /// Largest residual, as a fraction `‖residual‖ / ‖W_T − W₀‖` of a layer's
    /// change, with which closing a segment or finishing succeeds
    /// ([`Error::Unbalanced`](crate::Error::Unbalanced) past it; not checked
    /// for the shard of a data-parallel run or a run with ghost rows, whose
    /// residual holds the other shards' shares). Default: 1e-2.
    pub max_residual_fraction: f64,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            credit: Credit::Auto,
            fold_tolerance: 1e-12,
            update_tolerance: 1e-3,
            on_mismatch: OnMismatch::Error,
            max_residual_fraction: 1e-2,
        }
    }
}

impl HookConfig {
    /// Checks every value is in range (a checkpoint's configuration is too).
    pub(super) fn validate(&self) -> Result<()> {
        if !(self.fold_tolerance > 0.0 && self.fold_tolerance < 1.0) {
            return Err(Error::InvalidConfig {
                what: "hook fold_tolerance",
                reason: format!("must be in (0, 1), found {}", self.fold_tolerance),
            });
        }
        if !(self.update_tolerance >= 0.0 && self.update_tolerance.is_finite()) {
            return Err(Error::InvalidConfig {
                what: "hook update_tolerance",
                reason: format!("must be finite and >= 0, found {}", self.update_tolerance),
            });
        }
        if self.max_residual_fraction.is_nan() || self.max_residual_fraction < 0.0 {
            return Err(Error::InvalidConfig {
                what: "hook max_residual_fraction",
                reason: format!("must be >= 0, found {}", self.max_residual_fraction),
            });
        }
        Ok(())
    }

    /// Whether an [`External`](super::External) hook (told each step's rule)
    /// with this configuration credits per example: unless asked per batch.
    pub(super) fn per_example_external(&self) -> bool {
        self.credit != Credit::Batch
    }

    /// Whether a hook with this configuration credits per example, for an
    /// optimizer that has (`has_rule`) or has not a linear rule.
    pub(super) fn per_example(&self, has_rule: bool) -> Result<bool> {
        Ok(match self.credit {
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
        })
    }

    /// Sets the crediting mode (default [`Credit::Auto`]).
    pub fn with_credit(mut self, credit: Credit) -> Self {
        self.credit = credit;
        self
    }
    /// Sets the fold tolerance (default 1e-12).
    pub fn with_fold_tolerance(mut self, tol: f64) -> Self {
        self.fold_tolerance = tol;
        self
    }
    /// Sets the relative misfit allowed per step (default 1e-3).
    pub fn with_update_tolerance(mut self, tol: f64) -> Self {
        self.update_tolerance = tol;
        self
    }
    /// Sets what a step that does not fit does (default [`OnMismatch::Error`]).
    pub fn with_mismatch(mut self, on_mismatch: OnMismatch) -> Self {
        self.on_mismatch = on_mismatch;
        self
    }
    /// Sets the largest residual fraction accepted (default 1e-2; `f64::INFINITY` turns the check off).
    pub fn with_max_residual_fraction(mut self, max: f64) -> Self {
        self.max_residual_fraction = max;
        self
    }
}

/// The examples of one step: ids and labels, row for row with the batch, and
/// optionally which rows are *ghosts* (forwarded, carrying no loss, credited
/// nothing), or that the batch is one rank's shard of a global batch.
///
/// # Example
/// ```
/// use refinement_ledger::{Batch, ExampleId};
/// let ids = [ExampleId(3), ExampleId(4)];
/// let batch = Batch::new(&ids, &[0, 1]).with_ghosts(&[false, true]);
/// assert_eq!(batch.ids.len(), 2);
/// // Rank 1 of a data-parallel run with a global batch of 4, two per rank.
/// let shard = Batch::new(&ids, &[0, 1]).shard_of(4);
/// assert_eq!(shard.global_size, Some(4));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// One id per batch row.
    pub ids: &'a [ExampleId],
    /// One label per batch row.
    pub labels: &'a [usize],
    /// `true` for ghost rows.
    pub ghosts: Option<&'a [bool]>,
    /// `Some(n)` when these rows are one rank's shard of a global batch of `n`
    /// rows whose gradients the ranks average (data-parallel training).
    pub global_size: Option<usize>,
}

impl<'a> Batch<'a> {
    /// A batch without ghosts.
    pub fn new(ids: &'a [ExampleId], labels: &'a [usize]) -> Self {
        Self {
            ids,
            labels,
            ghosts: None,
            global_size: None,
        }
    }
    /// Marks ghost rows.
    pub fn with_ghosts(mut self, ghosts: &'a [bool]) -> Self {
        self.ghosts = Some(ghosts);
        self
    }
    /// Marks the batch as this rank's shard of a global batch of `global_size`
    /// rows. Each rank's loss is the mean over its own rows and the ranks
    /// average their gradients, so each row's share of the applied gradient is
    /// its share of the rank's gradient times `rows / global_size`. The hook
    /// cannot check a shard's update against its factors (the other ranks'
    /// shares are in it): check the merged ledger with
    /// [`Ledger::check_residual`](crate::Ledger::check_residual).
    pub fn shard_of(mut self, global_size: usize) -> Self {
        self.global_size = Some(global_size);
        self
    }
    pub(crate) fn is_ghost(&self, i: usize) -> bool {
        self.ghosts.is_some_and(|g| g[i])
    }
}
