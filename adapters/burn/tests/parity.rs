//! A burn training loop with burn's own SGD (momentum with its default
//! dampening 0.1, weight decay), traced by the adapter, gives the ledger of
//! the same run traced with the crate's built-in layers (same initial weights,
//! same data order, same update rule): it balances at rounding level and
//! ranks every explained test digit's training examples the same.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use refinement_ledger::data::Dataset;
use refinement_ledger::ndarray::ArrayD;
use refinement_ledger::nn::{Conv2dConfig as NativeConv, DenseConfig, Flatten, Relu, Sequential};
use refinement_ledger::optim::SgdConfig as NativeSgd;
use refinement_ledger::rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::{
    Batch, HookConfig, LayerSel, Ledger, Lens, OptimizerHook, Query, Scorer, read_params,
    write_params,
};
use refinement_ledger_burn::{Layer, Tape, sgd_rule, snapshot, traceables};

const LR: f64 = 0.05;
const BATCH: usize = 20;

/// An MLP 64-32-10 or a CNN (conv 1→4, 3×3, padding 1, stride 2; linear 64→10).
#[derive(Module, Debug)]
struct Net {
    conv: Option<Conv2d>,
    fc1: Linear,
    fc2: Option<Linear>,
}

impl Net {
    fn new(image: bool, device: &Device) -> Self {
        if image {
            let conv = Conv2dConfig::new([1, 4], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_stride([2, 2])
                .init(device);
            Self {
                conv: Some(conv),
                fc1: LinearConfig::new(64, 10).init(device),
                fc2: None,
            }
        } else {
            Self {
                conv: None,
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
        match (&self.conv, &self.fc2) {
            (Some(c), _) => {
                let h = burn::tensor::activation::relu(tape.conv2d(
                    "conv",
                    c,
                    Tensor::<4>::from_data(data, device),
                ));
                tape.linear("fc", &self.fc1, h.flatten(1, 3))
            }
            (None, Some(f)) => {
                let h = burn::tensor::activation::relu(tape.linear(
                    "fc1",
                    &self.fc1,
                    Tensor::<2>::from_data(data, device),
                ));
                tape.linear("fc2", f, h)
            }
            _ => unreachable!("a net is an MLP or a CNN"),
        }
    }
}

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

fn native(net: &Net, image: bool) -> Sequential<f32> {
    let mut rng = StdRng::seed_from_u64(0);
    let mut seq = if image {
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
    let start = snapshot(&net.layers()).unwrap();
    let params = read_params(&traceables(&start)).unwrap();
    write_params(&mut seq.traceables_mut(), &params).unwrap();
    seq
}

fn run(image: bool) -> (Ledger<f32>, Ledger<f32>, Query<f32>, Query<f32>) {
    let device = Device::default().autodiff();
    let (train, test) = digits(image);
    let mut net = Net::new(image, &device);
    let mut seq = native(&net, image);
    let config = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new()))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-3)));
    let mut optim = config.init();
    let tape = Tape::new();
    let mut hook = OptimizerHook::external(
        &traceables(&snapshot(&net.layers()).unwrap()),
        HookConfig::default(),
    )
    .unwrap();
    let rule = sgd_rule(&config, LR, true).unwrap();
    let native_sgd = NativeSgd::new(LR)
        .with_momentum(rule.momentum)
        .with_dampening(rule.dampening)
        .with_weight_decay(rule.weight_decay);
    let mut twin = OptimizerHook::new(native_sgd.build().unwrap(), &seq.traceables()).unwrap();
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut step = 0;
    for epoch in 0..2 {
        for start in (0..train.len()).step_by(BATCH) {
            let rows: Vec<usize> = (start..start + BATCH)
                .map(|i| (i + 7 * epoch) % train.len())
                .collect();
            let b = train.subset(&rows).unwrap();
            let y = Tensor::<1, Int>::from_data(
                TensorData::new(
                    b.labels().iter().map(|&l| l as i64).collect::<Vec<_>>(),
                    [rows.len()],
                ),
                &device,
            );
            let loss = loss_fn.forward(net.forward(&tape, b.x(), &device), y);
            let grads = loss.backward();
            tape.backward(&grads).unwrap();
            let grads = GradientsParams::from_grads(grads, &net);
            net = optim.step(LR, net, grads);
            let captured = tape.capture(&net.layers()).unwrap();
            let batch = Batch::new(b.ids(), b.labels());
            let rule = sgd_rule(&config, LR, step == 0).unwrap();
            hook.record_step(&traceables(&captured), &batch, Some(rule))
                .unwrap();
            seq.train_batch(b.x().view(), b.labels()).unwrap();
            twin.step(&mut seq.traceables_mut(), &batch).unwrap();
            step += 1;
        }
        hook.close_segment().unwrap();
        twin.close_segment().unwrap();
    }
    let query_tape = Tape::new();
    net.forward(&query_tape, test.x(), &device);
    let query =
        Query::from_layers(&traceables(&query_tape.capture(&net.layers()).unwrap())).unwrap();
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
        let (a, b) = (
            ledger.final_params(l).unwrap(),
            native.final_params(l).unwrap(),
        );
        let diff = (a - b).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            diff < 1e-4,
            "final parameters of layer {l} differ by {diff:e}"
        );
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
fn a_burn_mlp_with_burns_sgd_is_traced_as_the_built_in_one() {
    assert_parity(false);
}

#[test]
fn a_burn_cnn_with_burns_sgd_is_traced_as_the_built_in_one() {
    assert_parity(true);
}
