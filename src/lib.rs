//! Explain a neural network's representations by tracing its training.
//!
//! While a network trains, an [`OptimizerHook`] keeps an exact [`Ledger`] of
//! which training examples refined each traced layer's weights. Afterwards the
//! ledger answers, for any input, which training examples and which classes
//! built the representation the network computes for it, layer by layer
//! (Pfahler & Morik, "Explaining Deep Learning Representations by Tracing the
//! Training Process", 2021), and the other lenses of [`query`] answer "which
//! examples does this look like" and "which examples lowered this loss".
//!
//! * [`Traceable`]: a layer whose parameters are traced — the built-in
//!   [`nn::Dense`] and [`nn::Conv2d`], or your own.
//! * [`Optimizer`]: [`optim::Sgd`] (momentum, Nesterov, dampening, weight decay,
//!   schedules), [`optim::Adam`] (and AdamW), or your own.
//! * [`OptimizerHook`]: wraps any optimizer and books each step into the ledger:
//!   exactly per example for the SGD family, exactly per batch for any other.
//! * [`Ledger`]: per layer and source, the sum of credited updates; it balances
//!   (`W₀ + Σ G + residual = W_T`, and every query's refinement splits exactly
//!   into per-source contributions).
//! * [`Scorer`]: one query surface — a [`Lens`] over the ledger
//!   ([`Ledger::lens`]), over a compact sketch ([`query::LedgerSketch`]), or the
//!   ridge lens ([`query::RidgeLens`]) — turning a [`Query`] (built from your
//!   network and input: [`Query::forward`], [`Query::gradients`],
//!   [`Query::paired`]) into [`Scores`] that rank, look up and re-rank.
//!   [`Ledger::explain`] and [`Ledger::class_attribution`] give the paper's
//!   full per-layer answer.
//!
//! Which lens answers which question: "which examples caused this
//! prediction?" — [`query::SegmentRidge`] (one ridge system per segment; the
//! highest linear datamodeling score) or [`query::RidgeLens`]; "which does it look like?" — the loss
//! lens read at each segment's midpoint ([`query::Pairing::Midpoint`]), or
//! [`Lens::Cos`] at the last layer without gradients; "which are mislabelled?"
//! — the self-score of [`query::SegmentRidge`] or of the loss lens
//! ([`Ledger::self_scores`]); "which classes
//! built it?" — [`Ledger::class_attribution`].
//!
//! # Where things go
//! * A new layer: implement [`Traceable`] (and [`nn::Layer`] for the built-in
//!   network) in its own file under `nn/`; test its backward pass against
//!   finite differences and the ledger's balance on a real training run.
//! * A new optimizer: implement [`Optimizer`] in `optim/`; report a
//!   [`LinearRule`] only if its step is exactly that rule (then it is credited
//!   per example; otherwise per batch); golden values for two or three steps.
//! * A new lens: a [`Lens`] variant and its description in `query/lens.rs`
//!   (target, whether it needs norms, formula, how layers combine) — every
//!   scorer reads it; test it against a direct computation from the accounts.
//! * The ledger's state changes only through its booking interface
//!   (`ledger/book.rs`); readers use read-only layer views (`ledger/view.rs`).
//!
//! # Example
//! ```
//! use ndarray::Array2;
//! use rand::{SeedableRng, rngs::StdRng};
//! use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
//! use refinement_ledger::optim::SgdConfig;
//! use refinement_ledger::{Batch, ExampleId, Lens, OptimizerHook, Query, Scorer};
//!
//! // Two classes of points: class 0 near (−1, −1), class 1 near (1, 1).
//! let x = Array2::from_shape_fn((8, 2), |(i, j)| if i % 2 == 0 { -1.0 } else { 1.0 } + 0.1 * (i + j) as f32);
//! let y: Vec<usize> = (0..8).map(|i| i % 2).collect();
//! let ids: Vec<ExampleId> = (0..8).map(ExampleId).collect();
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let mut net = Sequential::new()
//!     .with(DenseConfig::new(2, 8).build("fc1", &mut rng)?)
//!     .with(Relu::new())
//!     .with(DenseConfig::new(8, 2).build("fc2", &mut rng)?);
//! let sgd = SgdConfig::new(0.1).with_momentum(0.9).build()?;
//! let mut hook = OptimizerHook::new(sgd, &net.traceables())?;
//! for _epoch in 0..20 {
//!     for b in 0..2 {
//!         let rows = b * 4..(b + 1) * 4;
//!         let xb = x.slice(ndarray::s![rows.clone(), ..]).to_owned().into_dyn();
//!         net.train_batch(xb.view(), &y[rows.clone()])?;
//!         hook.step(&mut net.traceables_mut(), &Batch::new(&ids[rows.clone()], &y[rows]))?;
//!     }
//! }
//! let ledger = hook.finish()?;
//!
//! // Explain the prediction for a new point near class 1: which training
//! // examples does its last-layer representation look like?
//! let x_query = ndarray::array![[0.9f32, 1.2]].into_dyn();
//! let cos = ledger.lens(Lens::Cos).layers(refinement_ledger::LayerSel::Layer(1));
//! let top = &cos.top_k(&mut net, x_query.view(), 3)?[0];
//! assert_eq!(top.proponents[0].label, Some(1));
//! let query = Query::forward(&mut net, x_query.view())?;
//! // The ledger balances: contributions add up to the refinement.
//! let explanation = ledger.explain(&query)?;
//! assert!(explanation.layers.iter().all(|l| l.balance_error[0] < 1e-4));
//! # Ok::<(), refinement_ledger::Error>(())
//! ```
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]

mod captured;
#[cfg(feature = "data")]
pub mod data;
mod error;
mod float;
mod hook;
pub mod ledger;
mod linalg;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "nn")]
pub mod nn;
pub mod optim;
mod patches;
pub mod query;
#[cfg(feature = "report")]
pub mod report;
mod storage;
mod trace;

/// The `ndarray` this crate's arrays come from, re-exported so your arrays are
/// the same type whatever version your own manifest names.
pub use ndarray;
/// The `rand` this crate's initialisers take, re-exported for the same reason
/// (`rand::rngs::StdRng` and `SeedableRng` work with every `build`).
pub use rand;

pub use captured::CapturedLayer;
pub use error::{Error, Result};
pub use float::Float;
pub use hook::{
    Batch, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, Credit, External, HookConfig, OnMismatch,
    OptimizerHook, StepCheck,
};
pub use ledger::Ledger;
pub use optim::{LinearRule, Optimizer, OptimizerState};
pub use patches::{ConvGeometry, MAX_PATCH_VALUES};
pub use query::{
    ClassAttribution, Explanation, Influence, Influences, LayerSel, Lens, Query, Ranking, Scorer,
    Scores,
};
pub use trace::{
    ExampleId, LayerId, MAX_CLASSES, ParamId, ParamMut, SourceId, Traceable, TracedModel,
    TracedShape, next_pass_id, read_params, write_params,
};

/// A small trained network and its ledger, for the documentation's examples:
/// an MLP 2-4-2 (`fc1`, ReLU, `fc2`) in `f64`, trained by plain SGD on four
/// points (examples 0 and 2 of class 0 near (−1, −1), 1 and 3 of class 1 near
/// (1, 1)), 20 epochs of two batches, a segment per 10 epochs.
#[doc(hidden)]
#[cfg(feature = "nn")]
pub fn doc_fixture() -> Result<(Ledger<f64>, nn::Sequential<f64>)> {
    use rand::SeedableRng;
    let x = ndarray::array![[-1.0, -0.8], [0.9, 1.1], [-1.2, -1.0], [1.0, 0.7]];
    let labels = [0, 1, 0, 1];
    let ids: Vec<ExampleId> = (0..4).map(ExampleId).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut net = nn::Sequential::new()
        .with(nn::DenseConfig::new(2, 4).build("fc1", &mut rng)?)
        .with(nn::Relu::new())
        .with(nn::DenseConfig::new(4, 2).build("fc2", &mut rng)?);
    let mut hook = OptimizerHook::new(optim::SgdConfig::new(0.2).build()?, &net.traceables())?;
    for epoch in 0..20 {
        for rows in [0..2, 2..4] {
            let xb = x.slice(ndarray::s![rows.clone(), ..]).to_owned().into_dyn();
            net.train_batch(xb.view(), &labels[rows.clone()])?;
            hook.step(
                &mut net.traceables_mut(),
                &Batch::new(&ids[rows.clone()], &labels[rows]),
            )?;
        }
        if epoch == 9 {
            hook.close_segment()?;
        }
    }
    Ok((hook.finish()?, net))
}

/// The README's code blocks, compiled and run as doctests.
#[cfg(all(doctest, feature = "nn", feature = "data"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
