//! A candle MLP and CNN trained on the bundled digits with candle's own loop
//! and SGD, traced by the adapter; then test digits explained, and the cost of
//! tracing measured against the same training untraced.
//!
//! Run: `cargo run --release -p refinement-ledger-candle --example candle_digits`
//! (`-- --quick` for two epochs).

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Optimizer, SGD, VarBuilder, VarMap};
use refinement_ledger::data::Dataset;
use refinement_ledger::ndarray::ArrayD;
use refinement_ledger::{Batch, HookConfig, LayerSel, Lens, OptimizerHook, Query, Scorer};
use refinement_ledger_candle::{
    Result, Traced, TracedConv2d, TracedLinear, collect, forwarded, sgd_rule, snapshot, traceables,
};

const BATCH: usize = 32;
const LR: f64 = 0.1;

/// A network of traced candle layers with ReLU between them (`image`: a
/// convolution, max pooling, and a linear layer).
struct Net {
    layers: Vec<Box<dyn TracedModule>>,
    vars: VarMap,
    image: bool,
}

trait TracedModule: Traced + Module {}
impl<T: Traced + Module> TracedModule for T {}

impl Net {
    fn new(image: bool) -> Result<Self> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let layers: Vec<Box<dyn TracedModule>> = if image {
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            vec![
                Box::new(TracedConv2d::new(
                    "conv",
                    candle_nn::conv2d(1, 8, 3, cfg, vb.pp("conv"))?,
                )),
                Box::new(TracedLinear::new(
                    "fc",
                    candle_nn::linear(128, 10, vb.pp("fc"))?,
                )),
            ]
        } else {
            vec![
                Box::new(TracedLinear::new(
                    "fc1",
                    candle_nn::linear(64, 32, vb.pp("fc1"))?,
                )),
                Box::new(TracedLinear::new(
                    "fc2",
                    candle_nn::linear(32, 10, vb.pp("fc2"))?,
                )),
            ]
        };
        Ok(Self {
            layers,
            vars,
            image,
        })
    }

    fn traced(&self) -> Vec<&dyn Traced> {
        self.layers.iter().map(|l| &**l as &dyn Traced).collect()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layers[0].forward(x)?.relu()?;
        let h = if self.image {
            h.max_pool2d(2)?.flatten_from(1)?
        } else {
            h
        };
        Ok(self.layers[1].forward(&h)?)
    }
}

fn tensor(x: &ArrayD<f32>) -> Result<Tensor> {
    let x = x.as_standard_layout();
    let values = x.as_slice().expect("standard layout");
    Ok(Tensor::from_slice(values, x.shape(), &Device::Cpu)?)
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

/// Trains `net` for `epochs` (traced or not); returns the wall time and the ledger.
fn train(
    net: &Net,
    train: &Dataset<f32>,
    epochs: usize,
    traced: bool,
) -> Result<(f64, Option<refinement_ledger::Ledger<f32>>)> {
    let mut sgd = SGD::new(net.vars.all_vars(), LR)?;
    let layers = net.traced();
    let mut hook = if traced {
        Some(OptimizerHook::external(
            &traceables(&snapshot(&layers)?),
            HookConfig::default(),
        )?)
    } else {
        None
    };
    let start = Instant::now();
    for epoch in 0..epochs {
        for first in (0..train.len()).step_by(BATCH) {
            let rows: Vec<usize> = (first..(first + BATCH).min(train.len()))
                .map(|i| (i * 7 + epoch * 13) % train.len())
                .collect();
            let b = train.subset(&rows)?;
            let y = Tensor::from_iter(b.labels().iter().map(|&l| l as u32), &Device::Cpu)?;
            let loss = candle_nn::loss::cross_entropy(&net.forward(&tensor(b.x())?)?, &y)?;
            let grads = loss.backward()?;
            sgd.step(&grads)?;
            if let Some(hook) = hook.as_mut() {
                let captured = collect(&layers, &grads)?;
                let batch = Batch::new(b.ids(), b.labels());
                hook.record_step(&traceables(&captured), &batch, Some(sgd_rule(&sgd)))?;
            }
        }
        if let Some(hook) = hook.as_mut() {
            hook.close_segment()?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok((seconds, hook.map(|h| h.finish()).transpose()?))
}

/// Trains and explains one network.
pub fn run_one(image: bool, epochs: usize) -> Result<Outcome> {
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
    // The same initialisation twice: candle's initialisers draw from a
    // thread-local generator, so the untraced twin copies the traced net's weights.
    let net = Net::new(image)?;
    let mut plain = Net::new(image)?;
    let start: Vec<(String, Tensor)> = net
        .vars
        .data()
        .lock()
        .expect("var map")
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
        .collect::<candle_core::Result<_>>()?;
    for (name, value) in start {
        plain.vars.set_one(name, value)?;
    }
    let (untraced, _) = train(&plain, &train_set, epochs, false)?;
    let (traced, ledger) = train(&net, &train_set, epochs, true)?;
    let ledger = ledger.expect("traced run has a ledger");
    let logits = net.forward(&tensor(test_set.x())?)?;
    let predicted: Vec<u32> = logits.argmax(1)?.to_vec1()?;
    let correct = predicted
        .iter()
        .zip(test_set.labels())
        .filter(|(p, l)| **p as usize == **l)
        .count();
    // Explain four test digits: which training digits does each look like?
    let picked = test_set.subset(&[0, 1, 2, 3])?;
    net.forward(&tensor(picked.x())?)?;
    let query = Query::from_layers(&traceables(&forwarded(&net.traced())?))?;
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
    let attribution = ledger.class_attribution(&query, None)?;
    print!("{}", attribution[last]);
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
        println!("== candle {name}, {epochs} epochs, candle's SGD (lr {LR}) ==");
        let out = run_one(image, epochs)?;
        println!(
            "{name}: test accuracy {:.4}, residual fraction {:?}, tracing overhead {:.2}x",
            out.accuracy, out.residual_fraction, out.overhead
        );
    }
    Ok(())
}
