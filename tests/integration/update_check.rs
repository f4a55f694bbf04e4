//! Every per-example step checks that the update is what the factors and the
//! rule predict: an optimizer stepping outside the hook gives the ledger the
//! hook would have built, clipping is credited exactly, and lying layers or
//! rules are errors at the step.

use crate::common;

use common::hand::{HandSgd, Lie};
use common::{assert_allclose, blobs, mlp, rows};
use ndarray::ArrayD;
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{Projection, SketchConfig};
use refinement_ledger::{
    Batch, Credit, Error, ExampleId, External, HookConfig, Ledger, OnMismatch, OptimizerHook,
};

/// One step's batch: rows, labels, ids.
type Step = (Vec<usize>, Vec<usize>, Vec<ExampleId>);

/// The inputs and batches of a small seeded run.
fn batches(steps: usize) -> (ArrayD<f64>, Vec<Step>) {
    let (x, y) = blobs::<f64>(6, 3, 4, 7);
    let n = y.len();
    let out = (0..steps)
        .map(|t| {
            let idx: Vec<usize> = (0..6).map(|k| (t * 5 + k * 3) % n).collect();
            let yb = idx.iter().map(|&i| y[i]).collect();
            let ids = idx.iter().map(|&i| ExampleId(i as u64)).collect();
            (idx, yb, ids)
        })
        .collect();
    (x, out)
}

/// Trains with `sgd` outside the hook (gradients scaled by `clip(grads)`),
/// recording each step with `declared`'s rule.
fn external_run(
    sgd: HandSgd,
    declared: impl Fn(&HandSgd) -> refinement_ledger::LinearRule,
    clip: impl Fn(&[ArrayD<f64>]) -> f64,
    config: HookConfig,
) -> (OptimizerHook<External, f64>, Sequential<f64>, Vec<f64>) {
    external_run_in(sgd, declared, clip, config, None)
}

/// As [`external_run`], recording online with `online` when given.
fn external_run_in(
    mut sgd: HandSgd,
    declared: impl Fn(&HandSgd) -> refinement_ledger::LinearRule,
    clip: impl Fn(&[ArrayD<f64>]) -> f64,
    config: HookConfig,
    online: Option<&SketchConfig>,
) -> (OptimizerHook<External, f64>, Sequential<f64>, Vec<f64>) {
    let (x, steps) = batches(8);
    let mut net = mlp::<f64>(4, 3, 11);
    let mut hook = OptimizerHook::external(&net.traceables(), config).unwrap();
    if let Some(online) = online {
        hook = hook.online(online).unwrap();
    }
    let mut scales = Vec::new();
    for (t, (idx, yb, ids)) in steps.iter().enumerate() {
        net.train_batch(rows(&x, idx).view(), yb).unwrap();
        let grads = HandSgd::grads(&mut net);
        let scale = clip(&grads);
        let rule = declared(&sgd);
        sgd.step(&mut net, &grads, scale);
        hook.record_step(&net.traceables(), &Batch::new(ids, yb), Some(rule))
            .unwrap_or_else(|e| panic!("step {t}: {e}"));
        scales.push(scale);
    }
    (hook, net, scales)
}

fn assert_same_ledger(got: &Ledger<f64>, want: &Ledger<f64>) {
    assert_eq!(got.sources(), want.sources());
    for l in 0..want.layers().len() {
        for s in want.sources() {
            let (g, w) = (
                got.account(l, s.id).unwrap(),
                want.account(l, s.id).unwrap(),
            );
            assert_allclose(
                &g.into_dyn(),
                &w.into_dyn(),
                1e-9,
                1e-13,
                &format!("{} layer {l}", s.id),
            );
        }
    }
}

#[test]
fn an_optimizer_stepping_outside_the_hook_gives_the_ledger_the_hook_would_have() {
    for (momentum, nesterov, decay) in [(0.0, false, 0.0), (0.9, false, 1e-3), (0.9, true, 1e-2)] {
        let (x, steps) = batches(8);
        let mut net = mlp::<f64>(4, 3, 11);
        let cfg = SgdConfig::new(0.1)
            .with_momentum(momentum)
            .with_nesterov(nesterov)
            .with_weight_decay(decay);
        let mut hook = OptimizerHook::new(cfg.build().unwrap(), &net.traceables()).unwrap();
        for (idx, yb, ids) in &steps {
            net.train_batch(rows(&x, idx).view(), yb).unwrap();
            hook.step(&mut net.traceables_mut(), &Batch::new(ids, yb))
                .unwrap();
        }
        let want = hook.finish().unwrap();
        let sgd = HandSgd::new(0.1, momentum, 0.0, nesterov, decay);
        let (hook, _, _) = external_run(sgd, HandSgd::rule, |_| 1.0, HookConfig::default());
        let check = hook.last_check().unwrap();
        assert!(
            (check.scale - 1.0).abs() < 1e-9 && check.misfit < 1e-9,
            "{check:?}"
        );
        assert_same_ledger(&hook.finish().unwrap(), &want);
    }
}

#[test]
fn gradient_norm_clipping_is_found_and_credited_exactly() {
    let sgd = HandSgd::new(0.2, 0.9, 0.0, false, 1e-3);
    let clip = |g: &[ArrayD<f64>]| HandSgd::clip_factor(g, 0.05);
    let (hook, _, scales) = external_run(sgd, HandSgd::rule, clip, HookConfig::default());
    assert!(
        scales.iter().all(|&s| s < 0.9),
        "the run clips every step: {scales:?}"
    );
    assert!((hook.last_check().unwrap().scale - scales[7]).abs() < 1e-9 * scales[7]);
    let ledger = hook.finish().unwrap();
    // Without finding the scale the residual would be most of the change.
    assert!(
        ledger.residual_fraction().iter().all(|&r| r < 1e-9),
        "{:?}",
        ledger.residual_fraction()
    );
}

#[test]
fn online_recording_finds_clipping_in_projected_space() {
    // The check runs on the projected update (k = 12 of a 8 × 5 and a 3 × 9
    // layer: random on both sides of the first): the scale is still found.
    let sgd = HandSgd::new(0.2, 0.9, 0.0, false, 1e-3);
    let clip = |g: &[ArrayD<f64>]| HandSgd::clip_factor(g, 0.05);
    let online = SketchConfig::with_dims(12).projection(Projection::Kronecker);
    let (hook, _, scales) = external_run_in(
        sgd,
        HandSgd::rule,
        clip,
        HookConfig::default(),
        Some(&online),
    );
    assert!(scales.iter().all(|&s| s < 0.9), "{scales:?}");
    let found = hook.last_check().unwrap();
    assert!(
        (found.scale - scales[7]).abs() < 1e-6 * scales[7],
        "{found:?}"
    );
    let sketch = hook.finish_sketch().unwrap();
    assert!(sketch.balance_error().iter().all(|&e| e < 1e-2));
}

#[test]
fn an_undeclared_dampening_is_a_uniform_scale_and_is_credited_exactly() {
    // burn's default dampening is 0.1; the rule declares none.
    let sgd = HandSgd::new(0.1, 0.9, 0.1, false, 0.0);
    let declared = |s: &HandSgd| refinement_ledger::LinearRule {
        dampening: 0.0,
        ..s.rule()
    };
    let (hook, _, _) = external_run(sgd, declared, |_| 1.0, HookConfig::default());
    assert!((hook.last_check().unwrap().scale - 0.9).abs() < 1e-9);
    assert!(
        hook.finish()
            .unwrap()
            .residual_fraction()
            .iter()
            .all(|&r| r < 1e-9)
    );
}

#[test]
fn a_wrong_momentum_is_an_error_at_the_step_and_nothing_is_booked() {
    let (x, steps) = batches(3);
    let mut net = mlp::<f64>(4, 3, 11);
    let mut hook = OptimizerHook::external(&net.traceables(), HookConfig::default()).unwrap();
    let mut sgd = HandSgd::new(0.1, 0.9, 0.0, false, 0.0);
    let mut result = Ok(());
    for (idx, yb, ids) in &steps {
        net.train_batch(rows(&x, idx).view(), yb).unwrap();
        let grads = HandSgd::grads(&mut net);
        let rule = refinement_ledger::LinearRule {
            momentum: 0.5,
            ..sgd.rule()
        };
        sgd.step(&mut net, &grads, 1.0);
        result = hook.record_step(&net.traceables(), &Batch::new(ids, yb), Some(rule));
        if result.is_err() {
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(
        matches!(err, Error::UpdateMismatch { step: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("momentum 0.5"), "{err}");
    assert_eq!(hook.n_steps(), 1, "the failed step is not booked");
}

#[test]
fn layers_that_lie_about_their_factors_are_errors_at_the_step() {
    let (x, steps) = batches(3);
    type Twist = fn(
        &ndarray::Array3<f64>,
        &ndarray::Array3<f64>,
        &ndarray::Array3<f64>,
    ) -> (Option<ndarray::Array3<f64>>, Option<ndarray::Array3<f64>>);
    let twists: [(&str, Twist); 3] = [
        ("negated deltas", |_, d, _| (None, Some(d.mapv(|v| -v)))),
        ("one layer's deltas doubled", |_, d, _| {
            (None, Some(d.mapv(|v| 2.0 * v)))
        }),
        ("the previous batch's patches", |_, _, prev| {
            (Some(prev.clone()), None)
        }),
    ];
    // Exact, and online, where the check sees only the projected update.
    let online = SketchConfig::with_dims(12).projection(Projection::Kronecker);
    for ((what, twist), online) in twists
        .into_iter()
        .flat_map(|t| [(t, None), (t, Some(&online))])
    {
        let mut net = mlp::<f64>(4, 3, 11);
        let sgd = SgdConfig::new(0.1)
            .with_momentum(0.9)
            .build::<f64>()
            .unwrap();
        let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
        if let Some(online) = online {
            hook = hook.online(online).unwrap();
        }
        let mut prev = None;
        let mut outcome = Ok(());
        for (idx, yb, ids) in &steps[..2] {
            net.train_batch(rows(&x, idx).view(), yb).unwrap();
            let mut layers = net.traceables_mut();
            let first = layers.remove(0);
            let (a, d) = (
                first.input_patches().unwrap().to_owned(),
                first.output_deltas().unwrap().to_owned(),
            );
            let (patches, deltas) = match &prev {
                Some(p) => twist(&a, &d, p),
                None => (None, None),
            };
            let mut liar = Lie {
                inner: first,
                patches,
                deltas,
            };
            let mut all: Vec<&mut dyn refinement_ledger::Traceable<f64>> = vec![&mut liar];
            all.extend(layers);
            outcome = hook.step(&mut all, &Batch::new(ids, yb));
            prev = Some(a);
        }
        let what = format!("{what} (online: {})", online.is_some());
        let err = outcome.expect_err(&what);
        assert!(
            matches!(err, Error::UpdateMismatch { step: 1, .. }),
            "{what}: {err}"
        );
        assert_eq!(hook.n_steps(), 1, "{what}: nothing booked");
    }
}

#[test]
fn a_mismatch_can_be_booked_to_the_residual_on_request() {
    let sgd = HandSgd::new(0.1, 0.9, 0.0, false, 0.0);
    let declared = |s: &HandSgd| refinement_ledger::LinearRule {
        momentum: 0.5,
        ..s.rule()
    };
    let config = HookConfig::default().with_mismatch(OnMismatch::Residual);
    let (hook, _, _) = external_run(sgd.clone(), declared, |_| 1.0, config.clone());
    assert_eq!(hook.mismatched_steps(), &[1, 2, 3, 4, 5, 6, 7]);
    let err = hook.finish().unwrap_err();
    assert!(matches!(err, Error::Unbalanced { .. }), "{err}");
    let config = config.with_max_residual_fraction(f64::INFINITY);
    let (hook, _, _) = external_run(sgd, declared, |_| 1.0, config);
    let ledger = hook.finish().unwrap();
    assert!(ledger.parameter_balance().iter().all(|&e| e < 1e-12));
}

#[test]
fn external_steps_need_their_rule_and_the_external_optimizer_cannot_step() {
    let (x, steps) = batches(1);
    let (idx, yb, ids) = &steps[0];
    let mut net = mlp::<f64>(4, 3, 11);
    let mut hook = OptimizerHook::external(&net.traceables(), HookConfig::default()).unwrap();
    net.train_batch(rows(&x, idx).view(), yb).unwrap();
    let err = hook
        .step(&mut net.traceables_mut(), &Batch::new(ids, yb))
        .unwrap_err();
    assert!(err.to_string().contains("record_step"), "{err}");
    let err = hook
        .record_step(&net.traceables(), &Batch::new(ids, yb), None)
        .unwrap_err();
    assert!(err.to_string().contains("Credit::Batch"), "{err}");
    // Per batch, the update is credited as it is.
    let config = HookConfig::default().with_credit(Credit::Batch);
    let mut hook = OptimizerHook::external(&net.traceables(), config).unwrap();
    let mut sgd = HandSgd::new(0.1, 0.0, 0.0, false, 0.0);
    for (idx, yb, ids) in &batches(4).1 {
        net.train_batch(rows(&x, idx).view(), yb).unwrap();
        let grads = HandSgd::grads(&mut net);
        sgd.step(&mut net, &grads, 1.0);
        hook.record_step(&net.traceables(), &Batch::new(ids, yb), None)
            .unwrap();
    }
    let ledger = hook.finish().unwrap();
    assert_eq!(ledger.sources().len(), 4);
    assert!(ledger.residual_fraction().iter().all(|&r| r < 1e-12));
}
