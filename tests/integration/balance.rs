//! The ledger balances on real training runs: for every traced
//! layer, optimizer and mode, `Σ_s c_s(x) + c_residual(x) = r(x)` for held-out
//! queries, and `W₀ + Σ G + residual = W_T`.

use crate::common;

use common::{Run, blobs, cnn, images, mlp, mlp3, query, train};
use ndarray::ArrayD;
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::{AdamConfig, LrSchedule, SgdConfig};
use refinement_ledger::{Credit, Float, HookConfig, Ledger, Optimizer, OptimizerHook};

#[derive(Clone, Copy, Debug)]
enum Opt {
    Plain,
    MomentumNesterovDecay,
    ScheduleDampening,
    Adam,
}

fn run_mode<F: Float>(
    mut net: Sequential<F>,
    data: (ArrayD<F>, Vec<usize>),
    test: ArrayD<F>,
    opt: Opt,
    run: Run,
) -> (Ledger<F>, Sequential<F>) {
    let (x, y) = data;
    fn go<F: Float, O: Optimizer<F>>(
        net: &mut Sequential<F>,
        o: O,
        x: &ArrayD<F>,
        y: &[usize],
        run: Run,
    ) -> Ledger<F> {
        let mut hook = OptimizerHook::new(o, &net.traceables()).unwrap();
        train(net, &mut hook, x, y, run);
        hook.finish().unwrap()
    }
    let ledger = match opt {
        Opt::Plain => go(
            &mut net,
            SgdConfig::new(0.05).build::<F>().unwrap(),
            &x,
            &y,
            run,
        ),
        Opt::MomentumNesterovDecay => go(
            &mut net,
            SgdConfig::new(0.02)
                .with_momentum(0.9)
                .with_nesterov(true)
                .with_weight_decay(1e-3)
                .build::<F>()
                .unwrap(),
            &x,
            &y,
            run,
        ),
        Opt::ScheduleDampening => go(
            &mut net,
            SgdConfig::new(0.05)
                .with_momentum(0.8)
                .with_dampening(0.3)
                .with_weight_decay(5e-4)
                .with_schedule(LrSchedule::Step {
                    every: 7,
                    gamma: 0.5,
                })
                .build::<F>()
                .unwrap(),
            &x,
            &y,
            run,
        ),
        Opt::Adam => go(
            &mut net,
            AdamConfig::new(0.01).build::<F>().unwrap(),
            &x,
            &y,
            run,
        ),
    };
    let _ = test;
    (ledger, net)
}

fn check<F: Float>(
    ledger: &Ledger<F>,
    net: &mut Sequential<F>,
    test: &ArrayD<F>,
    tol: f64,
    label: &str,
) -> f64 {
    let q = query(net, test);
    let ex = ledger.explain(&q).unwrap();
    let mut worst = 0.0f64;
    for layer in &ex.layers {
        let e = layer.balance_error.fold(0.0f64, |m, &v| m.max(v));
        assert!(
            e <= tol,
            "{label}: layer {} balance error {e:e} > {tol:e}",
            layer.layer
        );
        assert!(
            layer.refinement_norm.iter().all(|&r| r > 0.0),
            "{label}: refinement is zero"
        );
        worst = worst.max(e);
    }
    let res: Vec<String> = ledger
        .residual_fraction()
        .iter()
        .map(|r| format!("{r:.1e}"))
        .collect();
    println!("{label}: residual fraction {res:?}");
    for (l, r) in ledger.residual_fraction().into_iter().enumerate() {
        assert!(
            r <= tol,
            "{label}: layer {l} residual fraction {r:e}: updates were not credited"
        );
    }
    for (l, e) in ledger.parameter_balance().into_iter().enumerate() {
        assert!(
            e <= tol,
            "{label}: layer {l} parameter balance {e:e} > {tol:e}"
        );
        worst = worst.max(e);
    }
    worst
}

const MODES: [Opt; 4] = [
    Opt::Plain,
    Opt::MomentumNesterovDecay,
    Opt::ScheduleDampening,
    Opt::Adam,
];

fn all_modes<F: Float>(tol: f64, precision: &str) {
    for segments in [false, true] {
        for opt in MODES {
            for batch in [1usize, 5] {
                if batch == 1 && matches!(opt, Opt::Adam) {
                    continue;
                }
                let run = Run {
                    batch,
                    epochs: 3,
                    segment_per_epoch: segments,
                    seed: 7,
                };
                let label = format!("{precision} mlp {opt:?} batch {batch} segments {segments}");
                let (test, _) = blobs::<F>(2, 3, 4, 99);
                let (ledger, mut net) = run_mode(
                    mlp::<F>(4, 3, 1),
                    blobs::<F>(8, 3, 4, 2),
                    test.clone(),
                    opt,
                    run,
                );
                assert_eq!(ledger.n_segments(), if segments { 3 } else { 1 });
                let e = check(&ledger, &mut net, &test, tol, &label);
                println!("{label}: worst balance error {e:.2e}");

                let label = format!("{precision} cnn {opt:?} batch {batch} segments {segments}");
                let (test, _) = images::<F>(2, 4, 98);
                let (ledger, mut net) =
                    run_mode(cnn::<F>(4, 3), images::<F>(5, 4, 3), test.clone(), opt, run);
                let e = check(&ledger, &mut net, &test, tol, &label);
                println!("{label}: worst balance error {e:.2e}");
            }
        }
    }
}

#[test]
fn ledger_balances_in_every_mode_in_f64() {
    all_modes::<f64>(1e-9, "f64");
}

#[test]
fn ledger_balances_in_every_mode_in_f32() {
    all_modes::<f32>(1e-4, "f32");
}

#[test]
fn three_layer_tanh_network_balances_and_class_attribution_sums_to_one() {
    let (x, y) = blobs::<f64>(10, 3, 4, 5);
    let mut net = mlp3::<f64>(4, 3, 2);
    let sgd = SgdConfig::new(0.05)
        .with_momentum(0.9)
        .with_weight_decay(1e-3)
        .build::<f64>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    train(
        &mut net,
        &mut hook,
        &x,
        &y,
        Run {
            batch: 4,
            epochs: 4,
            segment_per_epoch: true,
            seed: 1,
        },
    );
    let ledger = hook.finish().unwrap();
    let (test, _) = blobs::<f64>(3, 3, 4, 77);
    check(&ledger, &mut net, &test, 1e-9, "tanh mlp3");
    let q = query(&mut net, &test);
    let attributions = ledger.class_attribution(&q, None).unwrap();
    assert_eq!(attributions.len(), 4, "three layers and the mean");
    for ca in &attributions {
        for qi in 0..q.len() {
            let total = ca.per_class.row(qi).sum() + ca.unlabeled[qi] + ca.residual[qi];
            assert!(
                (total - 1.0).abs() < 1e-9,
                "{}: shares sum to {total}",
                ca.layer
            );
        }
    }
    // Per-segment attributions add up to the whole.
    for (l, attribution) in attributions.iter().take(3).enumerate() {
        let whole = &attribution.per_class;
        let mut sum = ndarray::Array2::<f64>::zeros(whole.raw_dim());
        for k in 0..ledger.n_segments() {
            sum += &ledger.class_attribution(&q, Some(k)).unwrap()[l].per_class;
        }
        common::assert_allclose(
            &sum.into_dyn(),
            &whole.clone().into_dyn(),
            1e-9,
            1e-12,
            "segments add up",
        );
    }
}

#[test]
fn class_pure_batches_with_adam_give_class_level_sources() {
    let (x, y) = blobs::<f64>(12, 3, 4, 8);
    let mut net = mlp::<f64>(4, 3, 4);
    let adam = AdamConfig::new(0.01).build::<f64>().unwrap();
    let cfg = HookConfig::default().with_credit(Credit::Batch);
    let mut hook = OptimizerHook::with_config(adam, &net.traceables(), cfg).unwrap();
    // Class-pure batches of 4 with one ghost from another class.
    for epoch in 0..3 {
        for c in 0..3 {
            let members: Vec<usize> = (0..y.len())
                .filter(|&i| y[i] == c)
                .skip(epoch * 4)
                .take(4)
                .collect();
            let ghost = (0..y.len()).find(|&i| y[i] != c).unwrap();
            let mut idx = members.clone();
            idx.push(ghost);
            let xb = common::rows(&x, &idx);
            let yb: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
            let mask: Vec<bool> = (0..idx.len()).map(|k| k < members.len()).collect();
            let ghosts: Vec<bool> = mask.iter().map(|m| !m).collect();
            net.train_batch_masked(xb.view(), &yb, Some(&mask)).unwrap();
            let ids: Vec<_> = idx
                .iter()
                .map(|&i| refinement_ledger::ExampleId(i as u64))
                .collect();
            hook.step(
                &mut net.traceables_mut(),
                &refinement_ledger::Batch::new(&ids, &yb).with_ghosts(&ghosts),
            )
            .unwrap();
        }
    }
    let ledger = hook.finish().unwrap();
    assert_eq!(ledger.sources().len(), 9);
    assert!(
        ledger
            .sources()
            .iter()
            .all(|s| s.label.is_some() && s.members.len() == 4)
    );
    let (test, _) = blobs::<f64>(2, 3, 4, 50);
    check(&ledger, &mut net, &test, 1e-9, "class-pure adam");
    let ca = ledger
        .class_attribution(&query(&mut net, &test), None)
        .unwrap();
    for qi in 0..test.shape()[0] {
        assert!(ca[0].unlabeled[qi].abs() < 1e-12 && ca[0].residual[qi].abs() < 1e-9);
    }
}

#[test]
fn changes_made_outside_the_hook_go_to_the_residual_and_the_ledger_still_balances() {
    let (x, y) = blobs::<f64>(4, 3, 4, 2);
    let run = |config: refinement_ledger::HookConfig| {
        let mut net = mlp::<f64>(4, 3, 3);
        let sgd = SgdConfig::new(0.05)
            .with_momentum(0.9)
            .build::<f64>()
            .unwrap();
        let mut hook = OptimizerHook::with_config(sgd, &net.traceables(), config).unwrap();
        let ids: Vec<_> = (0..y.len() as u64)
            .map(refinement_ledger::ExampleId)
            .collect();
        for t in 0..6 {
            if t == 3 {
                // Someone nudges the weights between steps.
                let mut params = common::augmented_params(&net);
                params[0] += 0.01;
                refinement_ledger::write_params(&mut net.traceables_mut(), &params).unwrap();
            }
            net.train_batch(x.view(), &y).unwrap();
            hook.step(
                &mut net.traceables_mut(),
                &refinement_ledger::Batch::new(&ids, &y),
            )
            .unwrap();
        }
        hook.finish()
    };
    // By default a residual that large is an error that says what it is.
    let err = run(refinement_ledger::HookConfig::default()).unwrap_err();
    assert!(
        matches!(err, refinement_ledger::Error::Unbalanced { ref layer, .. } if layer == "fc1"),
        "{err}"
    );
    let hook_config =
        refinement_ledger::HookConfig::default().with_max_residual_fraction(f64::INFINITY);
    let ledger = run(hook_config).unwrap();
    assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-12));
    let res = ledger.residual(0).unwrap();
    assert!(
        (res.mean().unwrap() - 0.01).abs() < 1e-12,
        "the nudge is the residual: {}",
        res.mean().unwrap()
    );
    assert!(ledger.residual(1).unwrap().iter().all(|v| v.abs() < 1e-12));
}

#[test]
fn closing_a_segment_at_every_epoch_end_leaves_no_empty_trailing_segment() {
    let (x, y) = common::blobs::<f64>(2, 3, 6, 3);
    let mut net = common::mlp::<f64>(6, 3, 3);
    let sgd = SgdConfig::new(0.1).with_momentum(0.9).build().unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    let ids: Vec<refinement_ledger::ExampleId> = (0..y.len() as u64)
        .map(refinement_ledger::ExampleId)
        .collect();
    for _epoch in 0..3 {
        net.train_batch(x.view(), &y).unwrap();
        hook.step(
            &mut net.traceables_mut(),
            &refinement_ledger::Batch::new(&ids, &y),
        )
        .unwrap();
        hook.close_segment().unwrap();
    }
    let ledger = hook.finish().unwrap();
    assert_eq!(ledger.steps_per_segment(), vec![1, 1, 1]);
    assert!(ledger.parameter_balance().iter().all(|&b| b < 1e-12));
    // Momentum shares still pending at the end are booked in the last segment.
    assert!(
        ledger.residual_fraction().iter().all(|&r| r < 1e-9),
        "{:?}",
        ledger.residual_fraction()
    );
}
