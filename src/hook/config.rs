//! What a hook is told: its crediting mode and tolerance ([`HookConfig`]) and,
//! at each step, the examples of the batch ([`Batch`]).

use serde::{Deserialize, Serialize};

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

/// Configuration of an [`OptimizerHook`](crate::OptimizerHook).
///
/// # Example
/// ```
/// use refinement_ledger::{Credit, HookConfig};
/// let config = HookConfig::default().with_credit(Credit::Batch).with_fold_tolerance(1e-10);
/// assert_eq!(config.credit, Credit::Batch);
/// assert_eq!(HookConfig::default().fold_tolerance, 1e-12);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HookConfig {
    /// Crediting mode. Default: [`Credit::Auto`].
    pub credit: Credit,
    /// A pending gradient share is folded into its account once its weight left
    /// in the momentum buffer, `μ^{t−s}` (times the entry weight), drops below
    /// this; what it would still add goes to the residual. Default: 1e-12.
    pub fold_tolerance: f64,
}

impl Default for HookConfig {
    fn default() -> Self {
        Self {
            credit: Credit::Auto,
            fold_tolerance: 1e-12,
        }
    }
}

impl HookConfig {
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
}

/// The examples of one step: ids and labels, row for row with the batch, and
/// optionally which rows are *ghosts* (forwarded, carrying no loss, credited nothing).
///
/// # Example
/// ```
/// use refinement_ledger::{Batch, ExampleId};
/// let ids = [ExampleId(3), ExampleId(4)];
/// let batch = Batch::new(&ids, &[0, 1]).with_ghosts(&[false, true]);
/// assert_eq!(batch.ids.len(), 2);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    /// One id per batch row.
    pub ids: &'a [ExampleId],
    /// One label per batch row.
    pub labels: &'a [usize],
    /// `true` for ghost rows.
    pub ghosts: Option<&'a [bool]>,
}

impl<'a> Batch<'a> {
    /// A batch without ghosts.
    pub fn new(ids: &'a [ExampleId], labels: &'a [usize]) -> Self {
        Self {
            ids,
            labels,
            ghosts: None,
        }
    }
    /// Marks ghost rows.
    pub fn with_ghosts(mut self, ghosts: &'a [bool]) -> Self {
        self.ghosts = Some(ghosts);
        self
    }
    pub(crate) fn is_ghost(&self, i: usize) -> bool {
        self.ghosts.is_some_and(|g| g[i])
    }
}
