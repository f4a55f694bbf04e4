//! A candle training loop traced by the adapter gives the ledger of the same
//! run traced with the crate's built-in layers (same initial weights, same
//! data order, same plain SGD): it balances at rounding level and ranks every
//! explained test digit's training examples the same.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, Optimizer, SGD, VarBuilder, VarMap};
use refinement_ledger::data::Dataset;
use refinement_ledger::ndarray::ArrayD;
use refinement_ledger::nn::{Conv2dConfig as NativeConv, DenseConfig, Flatten, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::{
    Batch, HookConfig, LayerSel, Ledger, Lens, OptimizerHook, Query, Scorer, read_params,
    write_params,
};
use refinement_ledger_candle::{
    Traced, TracedConv2d, TracedLinear, collect, forwarded, sgd_rule, snapshot, traceables,
};

const LR: f64 = 0.1;
const BATCH: usize = 20;

fn tensor(x: &ArrayD<f32>) -> Tensor {
    let x = x.as_standard_layout();
    Tensor::from_slice(x.as_slice().unwrap(), x.shape(), &Device::Cpu).unwrap()
}

/// The digits: 200 training and 4 explained test digits, as `[n, 64]` or `[n, 1, 8, 8]`.
fn digits(image: bool) -> (Dataset<f32>, Dataset<f32>) {
    let all = Dataset::<f32>::digits().unwrap();
    let (train, test) = all.stratified_split(0.2, 0).unwrap();
    let train = train.subset(&(0..200).collect::<Vec<_>>()).unwrap();
    let test = test.subset(&[0, 1, 2, 3]).unwrap();
    if image {
        (
            train.reshaped(&[1, 8, 8]).unwrap(),
            test.reshaped(&[1, 8, 8]).unwrap(),
        )
    } else {
        (train, test)
    }
}

/// A candle network: its traced layers and the forward through them.
struct CandleNet {
    layers: Vec<Box<dyn TracedAndModule>>,
    vars: VarMap,
    image: bool,
}

trait TracedAndModule: Traced + Module {}
impl<T: Traced + Module> TracedAndModule for T {}

impl CandleNet {
    fn new(image: bool) -> Self {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let layers: Vec<Box<dyn TracedAndModule>> = if image {
            // Stride 2 instead of max pooling: candle's pooling sends the
            // gradient to every tied maximum (flat background regions tie),
            // the built-in one to the first, so the two runs would differ.
            let cfg = Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            };
            vec![
                Box::new(TracedConv2d::new(
                    "conv",
                    candle_nn::conv2d(1, 4, 3, cfg, vb.pp("conv")).unwrap(),
                )),
                Box::new(TracedLinear::new(
                    "fc",
                    candle_nn::linear(64, 10, vb.pp("fc")).unwrap(),
                )),
            ]
        } else {
            vec![
                Box::new(TracedLinear::new(
                    "fc1",
                    candle_nn::linear(64, 32, vb.pp("fc1")).unwrap(),
                )),
                Box::new(TracedLinear::new(
                    "fc2",
                    candle_nn::linear(32, 10, vb.pp("fc2")).unwrap(),
                )),
            ]
        };
        Self {
            layers,
            vars,
            image,
        }
    }
    fn traced(&self) -> Vec<&dyn Traced> {
        self.layers.iter().map(|l| &**l as &dyn Traced).collect()
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layers[0].forward(x).unwrap().relu().unwrap();
        let h = if self.image {
            h.flatten_from(1).unwrap()
        } else {
            h
        };
        self.layers[1].forward(&h).unwrap()
    }
}

/// The crate's built-in twin of a candle network, at its initial weights.
fn native(net: &CandleNet) -> Sequential<f32> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut seq = if net.image {
        Sequential::new()
            .with(
                NativeConv::new(1, 4, 3)
                    .with_padding(1)
                    .with_stride(2)
                    .build("conv", &mut rng)
                    .unwrap(),
            )
            .with(Relu::new())
            .with(Flatten::new())
            .with(DenseConfig::new(64, 10).build("fc", &mut rng).unwrap())
    } else {
        Sequential::new()
            .with(DenseConfig::new(64, 32).build("fc1", &mut rng).unwrap())
            .with(Relu::new())
            .with(DenseConfig::new(32, 10).build("fc2", &mut rng).unwrap())
    };
    let start = snapshot(&net.traced()).unwrap();
    let params = read_params(&traceables(&start)).unwrap();
    write_params(&mut seq.traceables_mut(), &params).unwrap();
    seq
}

/// Trains both for two epochs in the same order; returns the two ledgers and
/// the two networks' queries of the test digits.
fn run(image: bool) -> (Ledger<f32>, Ledger<f32>, Query<f32>, Query<f32>) {
    let (train, test) = digits(image);
    let net = CandleNet::new(image);
    let mut seq = native(&net);
    let mut sgd = SGD::new(net.vars.all_vars(), LR).unwrap();
    let traced = net.traced();
    let mut hook = OptimizerHook::external(
        &traceables(&snapshot(&traced).unwrap()),
        HookConfig::default(),
    )
    .unwrap();
    let mut twin =
        OptimizerHook::new(SgdConfig::new(LR).build().unwrap(), &seq.traceables()).unwrap();
    for epoch in 0..2 {
        for start in (0..train.len()).step_by(BATCH) {
            let rows: Vec<usize> = (start..start + BATCH)
                .map(|i| (i + 7 * epoch) % train.len())
                .collect();
            let b = train.subset(&rows).unwrap();
            let y = Tensor::from_iter(b.labels().iter().map(|&l| l as u32), &Device::Cpu).unwrap();
            let loss = candle_nn::loss::cross_entropy(&net.forward(&tensor(b.x())), &y).unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(&grads).unwrap();
            let captured = collect(&traced, &grads).unwrap();
            let batch = Batch::new(b.ids(), b.labels());
            hook.record_step(&traceables(&captured), &batch, Some(sgd_rule(&sgd)))
                .unwrap();
            seq.train_batch(b.x().view(), b.labels()).unwrap();
            twin.step(&mut seq.traceables_mut(), &batch).unwrap();
        }
        hook.close_segment().unwrap();
        twin.close_segment().unwrap();
    }
    net.forward(&tensor(test.x()));
    let query = Query::from_layers(&traceables(&forwarded(&traced).unwrap())).unwrap();
    let native_query = Query::forward(&mut seq, test.x().view()).unwrap();
    (
        hook.finish().unwrap(),
        twin.finish().unwrap(),
        query,
        native_query,
    )
}

fn assert_parity(image: bool) {
    let (ledger, native, query, native_query) = run(image);
    let fractions = ledger.residual_fraction();
    assert!(
        fractions.iter().all(|&r| r < 1e-5),
        "residual fractions {fractions:?}"
    );
    assert_eq!(ledger.sources(), native.sources());
    for l in 0..ledger.layers().len() {
        for (name, a, b) in [
            (
                "initial",
                ledger.initial_params(l).unwrap(),
                native.initial_params(l).unwrap(),
            ),
            (
                "final",
                ledger.final_params(l).unwrap(),
                native.final_params(l).unwrap(),
            ),
        ] {
            let diff = (a - b).iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                diff < 1e-4,
                "{name} parameters of layer {l} differ by {diff:e}"
            );
        }
    }
    for lens in [Lens::Cos, Lens::Influence] {
        for l in 0..ledger.layers().len() {
            let a = ledger
                .lens(lens)
                .layers(LayerSel::Layer(l))
                .scores(&query)
                .unwrap();
            let b = native
                .lens(lens)
                .layers(LayerSel::Layer(l))
                .scores(&native_query)
                .unwrap();
            let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = (&*a - &*b).iter().fold(0.0f64, |m, v| m.max(v.abs()));
            assert!(
                diff <= 2e-3 * scale,
                "{lens:?} layer {l}: max difference {diff:e} of {scale:e}"
            );
            for q in 0..query.len() {
                let ids = |s: &refinement_ledger::Scores<'_>| {
                    s.top_k(q, 5)
                        .unwrap()
                        .proponents
                        .iter()
                        .map(|i| i.source)
                        .collect::<Vec<_>>()
                };
                assert_eq!(ids(&a), ids(&b), "{lens:?} layer {l} query {q}");
            }
        }
    }
}

#[test]
fn a_candle_mlp_is_traced_as_the_built_in_one() {
    assert_parity(false);
}

#[test]
fn a_candle_cnn_is_traced_as_the_built_in_one() {
    assert_parity(true);
}
