//! Online compact recording on the hook: each example's update projected as
//! it is booked (see the ledger's online mode), read back as a [`LedgerSketch`].

use super::OptimizerHook;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::Ledger;
use crate::optim::Optimizer;
use crate::query::{LedgerSketch, SketchConfig};

impl<O: Optimizer<F>, F: Float> OptimizerHook<O, F> {
    /// Switches the hook, before its first step, to online compact recording:
    /// each example's share of every step is projected with `sketch`'s seeded
    /// projection per traced layer as it is booked, and the exact accounts are
    /// never stored. Memory is `k` numbers per source, layer and segment
    /// (plus the shares still pending in the momentum buffer), whatever the
    /// layers' sizes; [`Projection::Kronecker`](crate::query::Projection::Kronecker)
    /// keeps the cost per step low for convolutions.
    ///
    /// Momentum shares, weight decay, batch crediting, segments and the
    /// residual check carry over (the projection is linear; the balance is
    /// settled in projected space). Read the result with
    /// [`finish_sketch`](Self::finish_sketch) or
    /// [`snapshot_sketch`](Self::snapshot_sketch): it serves the lenses linear
    /// in the account. [`finish`](Self::finish),
    /// [`save_checkpoint`](Self::save_checkpoint) and the queries of a
    /// [`snapshot`](Self::snapshot) are errors, since there are no exact
    /// accounts.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] after the first step, or for dimensions the
    /// sketch refuses.
    ///
    /// # Example
    /// ```
    /// use ndarray::array;
    /// use rand::{SeedableRng, rngs::StdRng};
    /// use refinement_ledger::nn::{DenseConfig, Sequential};
    /// use refinement_ledger::query::{Projection, SketchConfig};
    /// use refinement_ledger::{Batch, ExampleId, LayerSel, Lens, OptimizerHook, Query, optim::SgdConfig};
    /// let mut rng = StdRng::seed_from_u64(0);
    /// let mut net = Sequential::<f64>::new().with(DenseConfig::new(2, 2).build("fc", &mut rng)?);
    /// let sgd = SgdConfig::new(0.1).with_momentum(0.9).build()?;
    /// let sketch = SketchConfig::with_dims(6).projection(Projection::Kronecker);
    /// let mut hook = OptimizerHook::new(sgd, &net.traceables())?.online(&sketch)?;
    /// let x = array![[1.0, 0.0], [0.0, 1.0]].into_dyn();
    /// for _ in 0..5 {
    ///     net.train_batch(x.view(), &[0, 1])?;
    ///     hook.step(&mut net.traceables_mut(), &Batch::new(&[ExampleId(0), ExampleId(1)], &[0, 1]))?;
    /// }
    /// let sketch = hook.finish_sketch()?;
    /// // A 2 × 3 layer in 6 dimensions: both sides are the identity, so the
    /// // "projection" is exact and so are the scores (up to bf16 storage).
    /// assert_eq!(sketch.dims(), &[6]);
    /// net.forward(array![[1.0, 0.2]].into_dyn().view())?;
    /// let query = Query::from_layers(&net.traceables())?;
    /// let scores = sketch.scores(&query, Lens::Dot, LayerSel::All)?;
    /// assert_eq!(scores.dim(), (1, 2));
    /// assert!(sketch.balance_error()[0] < 1e-2);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn online(mut self, sketch: &SketchConfig) -> Result<Self> {
        if self.step > 0 {
            return Err(Error::InvalidConfig {
                what: "online recording",
                reason: format!(
                    "OptimizerHook::online: must be chosen before the first step, found {} steps booked",
                    self.step
                ),
            });
        }
        self.ledger.go_online(sketch)?;
        Ok(self)
    }

    /// Whether the hook records online (projected accounts).
    pub fn is_online(&self) -> bool {
        self.ledger.online().is_some()
    }

    /// Ends online recording and returns its sketch (every segment summed).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a hook that keeps exact accounts (use
    /// [`finish`](Self::finish)); [`Error::Unbalanced`] as for `finish`, in
    /// projected space.
    pub fn finish_sketch(mut self) -> Result<LedgerSketch> {
        self.shares.book_pending(&mut self.ledger);
        self.ledger.finish(&self.current);
        self.check_residual("OptimizerHook::finish_sketch", &self.ledger)?;
        LedgerSketch::from_online(&self.ledger)
    }

    /// The sketch of the online recording so far (training goes on). Copies
    /// the projected accounts.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a hook that keeps exact accounts.
    pub fn snapshot_sketch(&self) -> Result<LedgerSketch> {
        let ledger: Ledger<F> = self.snapshot();
        LedgerSketch::from_online(&ledger)
    }
}
