//! Shared by the digits examples: the two models, a traced (or untraced) training
//! loop over seeded shuffled batches, and small evaluation helpers.
#![allow(dead_code)]

pub mod lds;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::data::{Dataset, ShuffledSampler};
use refinement_ledger::nn::{
    Conv2dConfig, DenseConfig, Flatten, Init, MaxPool2d, Relu, Sequential, softmax,
};
use refinement_ledger::optim::{Sgd, SgdConfig};
use refinement_ledger::{Batch, Ledger, Optimizer, OptimizerHook, Query, Result};

/// Which network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Model {
    /// 64-32-10, ReLU.
    Mlp,
    /// conv(1→8, 3×3, pad 1) → ReLU → maxpool 2 → conv(8→16, 3×3, pad 1) → ReLU → maxpool 2 → dense(64→10).
    Cnn,
}

impl Model {
    pub fn name(self) -> &'static str {
        match self {
            Model::Mlp => "mlp",
            Model::Cnn => "cnn",
        }
    }

    /// A freshly initialised network (same seed, same weights).
    pub fn build(self, seed: u64) -> Result<Sequential<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        Ok(match self {
            Model::Mlp => Sequential::new()
                .with(DenseConfig::new(64, 32).build("fc1", &mut rng)?)
                .with(Relu::new())
                .with(
                    DenseConfig::new(32, 10)
                        .with_init(Init::Xavier)
                        .build("fc2", &mut rng)?,
                ),
            Model::Cnn => Sequential::new()
                .with(
                    Conv2dConfig::new(1, 8, 3)
                        .with_padding(1)
                        .build("conv1", &mut rng)?,
                )
                .with(Relu::new())
                .with(MaxPool2d::new(2)?)
                .with(
                    Conv2dConfig::new(8, 16, 3)
                        .with_padding(1)
                        .build("conv2", &mut rng)?,
                )
                .with(Relu::new())
                .with(MaxPool2d::new(2)?)
                .with(Flatten::new())
                .with(
                    DenseConfig::new(64, 10)
                        .with_init(Init::Xavier)
                        .build("fc", &mut rng)?,
                ),
        })
    }

    /// The data in this model's input shape.
    pub fn shape(self, data: &Dataset<f32>) -> Result<Dataset<f32>> {
        match self {
            Model::Mlp => Ok(data.clone()),
            Model::Cnn => data.reshaped(&[1, 8, 8]),
        }
    }
}

/// The training recipe: mini-batch SGD with momentum, a segment per epoch.
#[derive(Clone, Copy, Debug)]
pub struct Recipe {
    pub epochs: u64,
    pub batch: usize,
    pub lr: f64,
    pub momentum: f64,
    pub seed: u64,
}

impl Recipe {
    pub fn for_model(model: Model, epochs: u64) -> Self {
        match model {
            Model::Mlp => Recipe {
                epochs,
                batch: 32,
                lr: 0.05,
                momentum: 0.9,
                seed: 11,
            },
            Model::Cnn => Recipe {
                epochs,
                batch: 32,
                lr: 0.05,
                momentum: 0.9,
                seed: 11,
            },
        }
    }

    pub fn sgd(&self) -> Result<Sgd<f32>> {
        SgdConfig::new(self.lr).with_momentum(self.momentum).build()
    }
}

/// A progress bar for `steps` steps, hidden when `quiet`.
pub fn progress(steps: u64, label: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} steps  loss {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Trains `net` on `data` (minus rows `removed`) with the recipe; traced when `hook` is given.
pub fn train<O: Optimizer>(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    recipe: &Recipe,
    removed: &[usize],
    mut hook: Option<&mut OptimizerHook<O>>,
    bare: Option<&mut O>,
    bar: &ProgressBar,
) -> Result<()> {
    let sampler = ShuffledSampler::new(data.len(), recipe.batch, recipe.seed)?;
    let mut bare = bare;
    for epoch in 0..recipe.epochs {
        for rows in sampler.epoch_without(epoch, removed) {
            let x = data.batch_x(&rows)?;
            let labels: Vec<usize> = rows.iter().map(|&i| data.labels()[i]).collect();
            let loss = net.train_batch(x.view(), &labels)?;
            match (&mut hook, &mut bare) {
                (Some(h), _) => {
                    let ids: Vec<_> = rows.iter().map(|&i| data.ids()[i]).collect();
                    h.step(&mut net.traceables_mut(), &Batch::new(&ids, &labels))?;
                }
                (None, Some(o)) => {
                    let mut params: Vec<_> = net
                        .traceables_mut()
                        .into_iter()
                        .flat_map(|l| l.params_mut())
                        .collect();
                    o.step(&mut params)?;
                }
                (None, None) => unreachable!("a hook or an optimizer"),
            }
            bar.inc(1);
            bar.set_message(format!("{loss:.4}"));
        }
        if let Some(h) = &mut hook {
            if epoch + 1 < recipe.epochs {
                h.close_segment()?;
            }
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// Trains traced; returns the ledger.
pub fn train_traced(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    recipe: &Recipe,
    quiet: bool,
    label: &str,
) -> Result<Ledger<f32>> {
    let steps = recipe.epochs * data.len().div_ceil(recipe.batch) as u64;
    let bar = progress(steps, label, quiet);
    let mut hook = OptimizerHook::new(recipe.sgd()?, &net.traceables())?;
    train(net, data, recipe, &[], Some(&mut hook), None, &bar)?;
    hook.finish()
}

/// Trains without tracing (for deletion retraining).
pub fn train_bare(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    recipe: &Recipe,
    removed: &[usize],
) -> Result<()> {
    let mut sgd = recipe.sgd()?;
    train::<Sgd<f32>>(
        net,
        data,
        recipe,
        removed,
        None,
        Some(&mut sgd),
        &ProgressBar::hidden(),
    )
}

/// Fraction of `data` classified correctly.
pub fn accuracy(net: &mut Sequential<f32>, data: &Dataset<f32>) -> Result<f64> {
    let pred = net.predict(data.x().view())?;
    Ok(pred
        .iter()
        .zip(data.labels())
        .filter(|(p, y)| p == y)
        .count() as f64
        / data.len() as f64)
}

/// Predicted class probabilities `[n, classes]`.
pub fn probabilities(
    net: &mut Sequential<f32>,
    x: &ndarray::ArrayD<f32>,
) -> Result<ndarray::Array2<f32>> {
    Ok(softmax(net.logits(x.view())?.view()))
}

/// The representation query of rows `x`.
pub fn representation_query(
    net: &mut Sequential<f32>,
    x: &ndarray::ArrayD<f32>,
) -> Result<Query<f32>> {
    net.forward(x.view())?;
    Query::from_layers(&net.traceables())
}

/// The loss-lens query of rows `x` against `targets` (per-example gradients).
pub fn gradient_query(
    net: &mut Sequential<f32>,
    x: &ndarray::ArrayD<f32>,
    targets: &[usize],
) -> Result<Query<f32>> {
    net.loss_gradients(x.view(), targets)?;
    Query::with_gradients(&net.traceables())
}

/// An 8×8 digit as text art, one string per row.
pub fn text_art(pixels: &[f32]) -> Vec<String> {
    const RAMP: &[u8] = b" .:-=+*#%@";
    pixels
        .chunks(8)
        .map(|row| {
            row.iter()
                .map(|&v| {
                    RAMP[((v.clamp(0.0, 1.0) * (RAMP.len() - 1) as f32).round()) as usize] as char
                })
                .flat_map(|c| [c, c])
                .collect()
        })
        .collect()
}
