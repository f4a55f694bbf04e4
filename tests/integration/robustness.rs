//! Long runs stay balanced; the same seed gives a bit-identical ledger; query
//! recording and query results do not depend on the number of threads.

use crate::common;

use common::{Run, blobs, cnn, gradient_query, images, mlp, query, train};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::{Batch, ExampleId, Float, LayerSel, Ledger, Lens, OptimizerHook};

fn long_run<F: Float>(steps: usize) -> Ledger<F> {
    let (x, y) = blobs::<F>(4, 3, 4, 1);
    let mut net: Sequential<F> = mlp(4, 3, 2);
    let sgd = SgdConfig::new(0.01)
        .with_momentum(0.9)
        .with_weight_decay(1e-3)
        .build::<F>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    let n = y.len();
    for t in 0..steps {
        let rows = [t % n, (t * 7 + 3) % n];
        let rows = if rows[0] == rows[1] {
            vec![rows[0]]
        } else {
            rows.to_vec()
        };
        let yb: Vec<usize> = rows.iter().map(|&i| y[i]).collect();
        let ids: Vec<ExampleId> = rows.iter().map(|&i| ExampleId(i as u64)).collect();
        net.train_batch(common::rows(&x, &rows).view(), &yb)
            .unwrap();
        hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))
            .unwrap();
    }
    hook.finish().unwrap()
}

#[test]
fn ten_thousand_momentum_steps_with_decay_stay_balanced() {
    let ledger = long_run::<f64>(10_000);
    for (l, e) in ledger.parameter_balance().iter().enumerate() {
        assert!(*e <= 1e-5, "f64 layer {l}: balance {e:e}");
    }
    let ledger = long_run::<f32>(10_000);
    for (l, e) in ledger.parameter_balance().iter().enumerate() {
        assert!(*e <= 1e-5, "f32 layer {l}: balance {e:e}");
    }
    // Every example's rows were folded into a few dense accounts or kept factored,
    // never more than the run's examples' worth of sources.
    assert_eq!(
        ledger.sources().len(),
        13,
        "12 examples and the decay source"
    );
}

fn traced_cnn(seed: u64) -> (Ledger<f32>, Sequential<f32>) {
    let (x, y) = images::<f32>(4, 4, seed);
    let mut net = cnn::<f32>(4, seed);
    let sgd = SgdConfig::new(0.05)
        .with_momentum(0.9)
        .build::<f32>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    train(
        &mut net,
        &mut hook,
        &x,
        &y,
        Run {
            batch: 4,
            epochs: 2,
            segment_per_epoch: true,
            seed,
        },
    );
    (hook.finish().unwrap(), net)
}

#[test]
fn the_same_seed_gives_a_bit_identical_ledger() {
    let (a, _) = traced_cnn(5);
    let (b, _) = traced_cnn(5);
    let (c, _) = traced_cnn(6);
    let same = |x: &Ledger<f32>, y: &Ledger<f32>| {
        let (bx, by) = (x.to_bytes().unwrap(), y.to_bytes().unwrap());
        // The files hold the same tensors and header (their order in the header may differ).
        bx.len() == by.len() && {
            let (lx, ly) = (
                Ledger::<f32>::from_bytes(&bx).unwrap(),
                Ledger::<f32>::from_bytes(&by).unwrap(),
            );
            (0..lx.layers().len()).all(|l| {
                lx.sources().iter().all(|s| {
                    ly.account(l, s.id)
                        .is_ok_and(|g| g == lx.account(l, s.id).unwrap())
                }) && lx.residual(l).unwrap() == ly.residual(l).unwrap()
                    && lx.final_params(l).unwrap() == ly.final_params(l).unwrap()
            }) && lx.sources() == ly.sources()
        }
    };
    assert!(same(&a, &b), "same seed, different ledgers");
    assert!(!same(&a, &c), "different seeds, same ledger");
}

#[test]
fn queries_are_identical_for_one_and_many_threads() {
    let (ledger, mut net) = traced_cnn(7);
    let (test, _) = images::<f32>(2, 4, 70);
    let q = query(&mut net, &test);
    let g = gradient_query(&mut net, &test);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut out = Vec::new();
            for lens in [Lens::Cos, Lens::Influence, Lens::Norm, Lens::Margin] {
                out.push(
                    ledger
                        .scores(&q, lens, LayerSel::All)
                        .unwrap()
                        .into_values(),
                );
            }
            out.push(
                ledger
                    .scores(&g, Lens::Loss, LayerSel::All)
                    .unwrap()
                    .into_values(),
            );
            out.push(
                ledger.explain(&q).unwrap().layers[0]
                    .balance_error
                    .clone()
                    .insert_axis(ndarray::Axis(0)),
            );
            out
        })
    };
    let one = run(1);
    let many = run(4);
    assert!(one == many, "results differ between 1 and 4 threads");
}

#[test]
fn recording_is_identical_for_one_and_many_threads() {
    // Enough rows (3,000 per layer) that settling the residual sums several
    // parallel blocks.
    let (x, y) = blobs::<f32>(250, 4, 6, 12);
    let record = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut net: Sequential<f32> = mlp(6, 4, 3);
            let sgd = SgdConfig::new(0.02)
                .with_momentum(0.9)
                .build::<f32>()
                .unwrap();
            let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
            let run = Run {
                batch: 16,
                epochs: 3,
                segment_per_epoch: true,
                seed: 4,
            };
            train(&mut net, &mut hook, &x, &y, run);
            hook.finish().unwrap()
        })
    };
    let (one, many) = (record(1), record(4));
    assert_eq!(one.sources(), many.sources());
    for l in 0..one.layers().len() {
        assert_eq!(
            one.residual(l).unwrap(),
            many.residual(l).unwrap(),
            "layer {l}"
        );
        for s in one.sources() {
            assert_eq!(
                one.account(l, s.id).unwrap(),
                many.account(l, s.id).unwrap()
            );
        }
    }
}
