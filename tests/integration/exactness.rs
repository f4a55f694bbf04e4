//! Exact modes are exact: per-example accounts equal a direct
//! computation from per-example gradients, replayed step by step with the
//! coefficient each gradient share reaches the weights with.

use crate::common;

use common::{assert_allclose, blobs, mlp, rows};
use ndarray::{Array2, ArrayD, Axis, concatenate};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::{LrSchedule, SgdConfig};
use refinement_ledger::{Batch, ExampleId, Ledger, OptimizerHook, SourceId, write_params};

/// Per-example gradient `[∇W | ∇b]` of example row `x` with label `y` at parameters `theta`.
fn example_grad(
    probe: &mut Sequential<f64>,
    theta: &[Array2<f64>],
    x: &ArrayD<f64>,
    y: usize,
) -> Vec<Array2<f64>> {
    write_params(&mut probe.traceables_mut(), theta).unwrap();
    probe.train_batch(x.view(), &[y]).unwrap();
    probe
        .traceables_mut()
        .into_iter()
        .map(|l| {
            let s = l.traced_shape();
            let p = l.params_mut();
            let gw = p[0]
                .grad
                .to_owned()
                .into_shape_with_order((s.fan_out, s.fan_in))
                .unwrap();
            let gb = p[1]
                .grad
                .to_owned()
                .into_shape_with_order((s.fan_out, 1))
                .unwrap();
            concatenate![Axis(1), gw, gb]
        })
        .collect()
}

struct Setting {
    cfg: SgdConfig,
    batch: usize,
    steps: usize,
}

/// Trains with the hook, then replays the run directly and compares every account.
fn check_exact(setting: Setting) -> Ledger<f64> {
    let (x, y) = blobs::<f64>(3, 3, 4, 11);
    let n = y.len();
    let mut net = mlp::<f64>(4, 3, 21);
    let mut probe = mlp::<f64>(4, 3, 0);
    let sgd = setting.cfg.build::<f64>().unwrap();
    let mut hook = OptimizerHook::new(sgd.clone(), &net.traceables()).unwrap();
    let batches: Vec<Vec<usize>> = (0..setting.steps)
        .map(|t| {
            (0..setting.batch)
                .map(|k| (t * setting.batch + k * 2) % n)
                .collect()
        })
        .collect();
    let mut thetas = Vec::new();
    for b in &batches {
        thetas.push(common::augmented_params(&net));
        let yb: Vec<usize> = b.iter().map(|&i| y[i]).collect();
        net.train_batch(rows(&x, b).view(), &yb).unwrap();
        let ids: Vec<ExampleId> = b.iter().map(|&i| ExampleId(i as u64)).collect();
        hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))
            .unwrap();
    }
    let ledger = hook.finish().unwrap();

    // Direct replay: the total weight with which the share of step τ reaches the
    // weights by the end, Σ_t lr_t · w(t, τ) (PyTorch SGD semantics).
    let c = &setting.cfg;
    let (mu, nesterov) = (c.momentum, c.nesterov);
    let coef = |tau: usize| -> f64 {
        let entry = if tau == 0 || mu == 0.0 {
            1.0
        } else {
            1.0 - c.dampening
        };
        (tau..setting.steps)
            .map(|t| {
                let lr = sgd.lr_at(t as u64);
                let buf = entry * mu.powi((t - tau) as i32);
                let w = if mu == 0.0 {
                    if t == tau { 1.0 } else { 0.0 }
                } else if nesterov {
                    (if t == tau { 1.0 } else { 0.0 }) + mu * buf
                } else {
                    buf
                };
                lr * w
            })
            .sum()
    };
    let n_layers = ledger.layers().len();
    let zeros: Vec<Array2<f64>> = (0..n_layers)
        .map(|l| Array2::zeros(ledger.initial_params(l).unwrap().raw_dim()))
        .collect();
    let mut expected = vec![zeros.clone(); n];
    let mut decay = zeros;
    for (tau, b) in batches.iter().enumerate() {
        let k = coef(tau);
        for &i in b {
            let g = example_grad(&mut probe, &thetas[tau], &rows(&x, &[i]), y[i]);
            for l in 0..n_layers {
                expected[i][l].scaled_add(-k / b.len() as f64, &g[l]);
            }
        }
        for l in 0..n_layers {
            decay[l].scaled_add(-k * c.weight_decay, &thetas[tau][l]);
        }
    }
    for (i, exp) in expected.iter().enumerate() {
        for (l, want) in exp.iter().enumerate() {
            let got = ledger
                .account(l, SourceId::Example(ExampleId(i as u64)))
                .unwrap();
            assert_allclose(
                &got.into_dyn(),
                &want.clone().into_dyn(),
                1e-9,
                1e-13,
                &format!("example {i} layer {l}"),
            );
        }
    }
    if c.weight_decay > 0.0 {
        for (l, want) in decay.iter().enumerate() {
            let got = ledger.account(l, SourceId::Decay).unwrap();
            assert_allclose(
                &got.into_dyn(),
                &want.clone().into_dyn(),
                1e-9,
                1e-13,
                &format!("decay layer {l}"),
            );
        }
    }
    ledger
}

#[test]
fn single_instance_sgd_accounts_equal_summed_example_gradients() {
    check_exact(Setting {
        cfg: SgdConfig::new(0.1),
        batch: 1,
        steps: 12,
    });
}

#[test]
fn mini_batch_sgd_accounts_equal_scaled_example_gradients() {
    check_exact(Setting {
        cfg: SgdConfig::new(0.1),
        batch: 3,
        steps: 8,
    });
}

#[test]
fn momentum_accounts_equal_direct_sum_of_shares_times_coefficients() {
    check_exact(Setting {
        cfg: SgdConfig::new(0.05).with_momentum(0.9),
        batch: 3,
        steps: 10,
    });
}

#[test]
fn nesterov_and_weight_decay_accounts_are_exact() {
    let cfg = SgdConfig::new(0.05)
        .with_momentum(0.8)
        .with_nesterov(true)
        .with_weight_decay(0.01);
    check_exact(Setting {
        cfg,
        batch: 2,
        steps: 10,
    });
}

#[test]
fn dampening_and_schedule_accounts_are_exact() {
    let cfg = SgdConfig::new(0.08)
        .with_momentum(0.7)
        .with_dampening(0.25)
        .with_weight_decay(0.003)
        .with_schedule(LrSchedule::Exponential { gamma: 0.9 });
    check_exact(Setting {
        cfg,
        batch: 3,
        steps: 10,
    });
}

#[test]
fn folded_momentum_shares_stay_exact_and_balanced() {
    // μ = 0.3 folds a share after ~23 steps: the run is long enough that most
    // groups are folded before the end.
    let cfg = SgdConfig::new(0.05)
        .with_momentum(0.3)
        .with_weight_decay(0.001);
    let ledger = check_exact(Setting {
        cfg,
        batch: 2,
        steps: 60,
    });
    assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-9));
    assert!(
        ledger.residual_fraction().iter().all(|&r| r < 1e-9),
        "{:?}",
        ledger.residual_fraction()
    );
}
