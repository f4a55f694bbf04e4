//! A burn MLP and CNN trained on the bundled digits with burn's own loop and
//! SGD (momentum 0.9 with burn's default dampening 0.1, weight decay), traced
//! through a `Tape`; then test digits explained, and the cost of tracing
//! measured against the same training untraced.
//!
//! Run: `cargo run --release -p refinement-ledger-burn --example burn_digits`
//! (`-- --quick` for two epochs).

use std::time::Instant;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use refinement_ledger::data::Dataset;
use refinement_ledger::ndarray::ArrayD;
use refinement_ledger::{Batch, HookConfig, LayerSel, Ledger, Lens, OptimizerHook, Query, Scorer};
use refinement_ledger_burn::{Layer, Result, Tape, sgd_rule, snapshot, traceables};

const BATCH: usize = 32;
const LR: f64 = 0.05;

/// An MLP 64-32-10, or a CNN: conv 1→8 (3×3, padding 1), ReLU, 2×2 max
/// pooling, linear 128→10.
#[derive(Module, Debug)]
struct Net {
    conv: Option<Conv2d>,
    pool: Option<MaxPool2d>,
    fc1: Linear,
    fc2: Option<Linear>,
}

impl Net {
    fn new(image: bool, device: &Device) -> Self {
        if image {
            Self {
                conv: Some(
                    Conv2dConfig::new([1, 8], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                ),
                pool: Some(MaxPool2dConfig::new([2, 2]).init()),
                fc1: LinearConfig::new(128, 10).init(device),
                fc2: None,
            }
        } else {
            Self {
                conv: None,
                pool: None,
                fc1: LinearConfig::new(64, 32).init(device),
                fc2: Some(LinearConfig::new(32, 10).init(device)),
            }
        }
    }

    fn layers(&self) -> Vec<Layer<'_>> {
        match (&self.conv, &self.fc2) {
            (Some(c), _) => vec![Layer::Conv2d("conv", c), Layer::Linear("fc", &self.fc1)],
            (None, Some(f)) => vec![Layer::Linear("fc1", &self.fc1), Layer::Linear("fc2", f)],
            _ => unreachable!("a net is an MLP or a CNN"),
        }
    }

    fn forward(&self, tape: &Tape, x: &ArrayD<f32>, device: &Device) -> Tensor<2> {
        let data = TensorData::new(x.iter().copied().collect::<Vec<_>>(), x.shape().to_vec());
        use burn::tensor::activation::relu;
        match (&self.conv, &self.pool, &self.fc2) {
            (Some(c), Some(p), _) => {
                let h = relu(tape.conv2d("conv", c, Tensor::<4>::from_data(data, device)));
                tape.linear("fc", &self.fc1, p.forward(h).flatten(1, 3))
            }
            (None, _, Some(f)) => {
                let h = relu(tape.linear("fc1", &self.fc1, Tensor::<2>::from_data(data, device)));
                tape.linear("fc2", f, h)
            }
            _ => unreachable!("a net is an MLP or a CNN"),
        }
    }
}

/// What one network's run found.
#[derive(Debug)]
pub struct Outcome {
    /// Test accuracy.
    pub accuracy: f64,
    /// Per traced layer, `‖residual‖ / ‖W_T − W₀‖`.
    pub residual_fraction: Vec<f64>,
    /// Wall time of the traced training over the same training untraced.
    pub overhead: f64,
    /// For each explained test digit, the labels of its five nearest training
    /// examples under cos at the last layer.
    pub neighbours: Vec<Vec<Option<usize>>>,
}

/// Trains `net` for `epochs`, traced or not; returns it, the wall time and the ledger.
fn train(
    mut net: Net,
    data: &Dataset<f32>,
    epochs: usize,
    traced: bool,
    device: &Device,
) -> Result<(Net, f64, Option<Ledger<f32>>)> {
    let config = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-4)));
    let mut optim = config.init();
    let loss_fn = CrossEntropyLossConfig::new().init(device);
    let tape = Tape::new();
    let mut hook = if traced {
        let start = snapshot(&net.layers())?;
        Some(OptimizerHook::external(
            &traceables(&start),
            HookConfig::default(),
        )?)
    } else {
        None
    };
    let started = Instant::now();
    let mut step = 0;
    for epoch in 0..epochs {
        for first in (0..data.len()).step_by(BATCH) {
            let rows: Vec<usize> = (first..(first + BATCH).min(data.len()))
                .map(|i| (i * 7 + epoch * 13) % data.len())
                .collect();
            let b = data.subset(&rows)?;
            let labels: Vec<i64> = b.labels().iter().map(|&l| l as i64).collect();
            let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [rows.len()]), device);
            let loss = loss_fn.forward(net.forward(&tape, b.x(), device), y);
            let grads = loss.backward();
            if traced {
                tape.backward(&grads)?;
            }
            let grads = GradientsParams::from_grads(grads, &net);
            net = optim.step(LR, net, grads);
            if let Some(hook) = hook.as_mut() {
                let captured = tape.capture(&net.layers())?;
                let rule = sgd_rule(&config, LR, step == 0)?;
                hook.record_step(
                    &traceables(&captured),
                    &Batch::new(b.ids(), b.labels()),
                    Some(rule),
                )?;
            }
            step += 1;
        }
        if let Some(hook) = hook.as_mut() {
            hook.close_segment()?;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((net, seconds, hook.map(|h| h.finish()).transpose()?))
}

/// Trains and explains one network.
pub fn run_one(image: bool, epochs: usize) -> Result<Outcome> {
    let device = Device::default().autodiff();
    let digits = Dataset::<f32>::digits()?;
    let (train_set, test_set) = digits.stratified_split(0.2, 0)?;
    let (train_set, test_set) = if image {
        (
            train_set.reshaped(&[1, 8, 8])?,
            test_set.reshaped(&[1, 8, 8])?,
        )
    } else {
        (train_set, test_set)
    };
    let net = Net::new(image, &device);
    let (_, untraced, _) = train(net.clone(), &train_set, epochs, false, &device)?;
    let (net, traced, ledger) = train(net, &train_set, epochs, true, &device)?;
    let ledger = ledger.expect("the traced run has a ledger");
    let tape = Tape::new();
    let predicted = net.forward(&tape, test_set.x(), &device).argmax(1);
    let predicted: Vec<i64> = predicted
        .to_data()
        .convert::<i64>()
        .try_to_vec()
        .map_err(|e| refinement_ledger_burn::Error::Burn(format!("{e:?}")))?;
    let correct = predicted
        .iter()
        .zip(test_set.labels())
        .filter(|(p, l)| **p as usize == **l)
        .count();
    // Explain four test digits: which training digits does each look like?
    let picked = test_set.subset(&[0, 1, 2, 3])?;
    net.forward(&tape, picked.x(), &device);
    let query = Query::from_layers(&traceables(&tape.capture(&net.layers())?))?;
    let last = ledger.layers().len() - 1;
    let scores = ledger
        .lens(Lens::Cos)
        .layers(LayerSel::Layer(last))
        .scores(&query)?;
    let mut neighbours = Vec::new();
    for q in 0..query.len() {
        let top = scores.top_k(q, 5)?;
        println!(
            "  test digit {q} (label {}): looks like (cos at {}):\n{}",
            picked.labels()[q],
            ledger.layers()[last].id,
            top
        );
        neighbours.push(top.proponents.iter().map(|p| p.label).collect());
    }
    print!("{}", ledger.class_attribution(&query, None)?[last]);
    Ok(Outcome {
        accuracy: correct as f64 / test_set.len() as f64,
        residual_fraction: ledger.residual_fraction(),
        overhead: traced / untraced,
        neighbours,
    })
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let epochs = if quick { 2 } else { 10 };
    for (name, image) in [("mlp", false), ("cnn", true)] {
        println!(
            "== burn {name}, {epochs} epochs, burn's SGD (lr {LR}, momentum 0.9, dampening 0.1) =="
        );
        let out = run_one(image, epochs)?;
        println!(
            "{name}: test accuracy {:.4}, residual fraction {:?}, tracing overhead {:.2}x",
            out.accuracy, out.residual_fraction, out.overhead
        );
    }
    Ok(())
}
