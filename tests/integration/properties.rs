//! Property tests over random small networks, optimizers, batch sizes and data:
//! the ledger balances, and save → load gives identical query results.

use crate::common;

use ndarray::{Array2, ArrayD, IxDyn};
use proptest::prelude::*;
use rand::{Rng, SeedableRng, rngs::StdRng};
use refinement_ledger::nn::{Conv2dConfig, DenseConfig, Flatten, Relu, Sequential, Tanh};
use refinement_ledger::optim::{AdamConfig, SgdConfig};
use refinement_ledger::{
    Batch, ExampleId, LayerSel, Ledger, Lens, Optimizer, OptimizerHook, Query,
};

#[derive(Clone, Debug)]
struct Case {
    conv: bool,
    hidden: usize,
    batch: usize,
    steps: usize,
    optimizer: u8,
    momentum: f64,
    nesterov: bool,
    decay: f64,
    segments: bool,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        any::<bool>(),
        2usize..6,
        1usize..5,
        3usize..12,
        0u8..3,
        0.0f64..0.95,
        any::<bool>(),
        0.0f64..0.01,
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(
            |(conv, hidden, batch, steps, optimizer, momentum, nesterov, decay, segments, seed)| {
                Case {
                    conv,
                    hidden,
                    batch,
                    steps,
                    optimizer,
                    momentum,
                    nesterov,
                    decay,
                    segments,
                    seed,
                }
            },
        )
}

fn net(c: &Case, rng: &mut StdRng) -> Sequential<f64> {
    if c.conv {
        Sequential::new()
            .with(
                Conv2dConfig::new(1, c.hidden, 2)
                    .build("conv", rng)
                    .unwrap(),
            )
            .with(Relu::new())
            .with(Flatten::new())
            .with(DenseConfig::new(c.hidden * 9, 3).build("fc", rng).unwrap())
    } else {
        Sequential::new()
            .with(DenseConfig::new(5, c.hidden).build("fc1", rng).unwrap())
            .with(Tanh::new())
            .with(DenseConfig::new(c.hidden, 3).build("fc2", rng).unwrap())
    }
}

fn run<O: Optimizer<f64>>(
    c: &Case,
    o: O,
    rng: &mut StdRng,
) -> (Ledger<f64>, Sequential<f64>, ArrayD<f64>) {
    let shape: Vec<usize> = if c.conv { vec![1, 4, 4] } else { vec![5] };
    let n = 10;
    let mut full = vec![n];
    full.extend(&shape);
    let x = ArrayD::from_shape_fn(IxDyn(&full), |_| rng.random_range(-1.0..1.0));
    let y: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let mut model = net(c, rng);
    let mut hook = OptimizerHook::new(o, &model.traceables()).unwrap();
    for t in 0..c.steps {
        let idx: Vec<usize> = (0..c.batch).map(|k| (t * c.batch + k) % n).collect();
        let mut idx = idx;
        idx.dedup();
        let yb: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
        let ids: Vec<ExampleId> = idx.iter().map(|&i| ExampleId(i as u64)).collect();
        model
            .train_batch(common::rows(&x, &idx).view(), &yb)
            .unwrap();
        hook.step(&mut model.traceables_mut(), &Batch::new(&ids, &yb))
            .unwrap();
        if c.segments && t % 4 == 3 && t + 1 < c.steps {
            hook.close_segment().unwrap();
        }
    }
    (hook.finish().unwrap(), model, x)
}

fn traced(c: &Case) -> (Ledger<f64>, Sequential<f64>, ArrayD<f64>) {
    let mut rng = StdRng::seed_from_u64(c.seed);
    let nesterov = c.nesterov && c.momentum > 0.0;
    match c.optimizer {
        0 => run(c, SgdConfig::new(0.1).build::<f64>().unwrap(), &mut rng),
        1 => run(
            c,
            SgdConfig::new(0.05)
                .with_momentum(c.momentum)
                .with_nesterov(nesterov)
                .with_weight_decay(c.decay)
                .build::<f64>()
                .unwrap(),
            &mut rng,
        ),
        _ => run(c, AdamConfig::new(0.01).build::<f64>().unwrap(), &mut rng),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn random_runs_balance(c in cases()) {
        let (ledger, mut model, x) = traced(&c);
        for e in ledger.parameter_balance() {
            prop_assert!(e <= 1e-9, "parameter balance {e:e}");
        }
        for r in ledger.residual_fraction() {
            prop_assert!(r <= 1e-9, "residual fraction {r:e}");
        }
        model.forward(x.view()).unwrap();
        let q = Query::from_layers(&model.traceables()).unwrap();
        for layer in ledger.explain(&q).unwrap().layers {
            let worst = layer.balance_error.fold(0.0f64, |m, &v| m.max(v));
            prop_assert!(worst <= 1e-9, "{}: balance error {worst:e}", layer.layer);
        }
    }

    #[test]
    fn save_then_load_gives_identical_scores(c in cases()) {
        let (ledger, mut model, x) = traced(&c);
        let loaded = Ledger::<f64>::from_bytes(&ledger.to_bytes().unwrap()).unwrap();
        model.forward(x.view()).unwrap();
        let q = Query::from_layers(&model.traceables()).unwrap();
        for lens in [Lens::Cos, Lens::Share] {
            let a: Array2<f64> = ledger.scores(&q, lens, LayerSel::All).unwrap().into_values();
            let b = loaded.scores(&q, lens, LayerSel::All).unwrap().into_values();
            prop_assert!(a == b, "{lens:?} differs after a round trip");
        }
    }
}
