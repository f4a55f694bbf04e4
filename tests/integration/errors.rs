//! Everything a caller can get wrong returns an error naming what was expected
//! and what was found — never a panic.

use crate::common;

use common::{blobs, mlp, rows};
use ndarray::{Array1, Array2, ArrayD, array};
use rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::nn::{
    Conv2dConfig, Dense, DenseConfig, Layer, MaxPool2d, SoftmaxCrossEntropy,
};
use refinement_ledger::optim::{AdamConfig, LrSchedule, SgdConfig};
use refinement_ledger::{
    Batch, Credit, Error, ExampleId, HookConfig, LayerSel, Lens, OptimizerHook, Query, SourceId,
    Traceable,
};

fn ids(v: &[u64]) -> Vec<ExampleId> {
    v.iter().map(|&i| ExampleId(i)).collect()
}

type Setup = (
    refinement_ledger::nn::Sequential<f64>,
    OptimizerHook<refinement_ledger::optim::Sgd<f64>, f64>,
    ArrayD<f64>,
    Vec<usize>,
);

fn setup() -> Setup {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let net = mlp::<f64>(4, 3, 1);
    let hook = OptimizerHook::new(SgdConfig::new(0.1).build().unwrap(), &net.traceables()).unwrap();
    (net, hook, x, y)
}

fn msg(e: Error) -> String {
    e.to_string()
}

#[test]
fn hook_rejects_bad_batches_with_clear_messages() {
    let (mut net, mut hook, x, y) = setup();
    let xb = rows(&x, &[0, 1]);
    net.train_batch(xb.view(), &y[..2]).unwrap();
    let e = hook
        .step(&mut net.traceables_mut(), &Batch::new(&[], &[]))
        .unwrap_err();
    assert!(matches!(e, Error::Empty { .. }), "{e}");
    let e = hook
        .step(&mut net.traceables_mut(), &Batch::new(&ids(&[0, 1]), &[0]))
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }) && msg(e).contains("2 labels"));
    let e = hook
        .step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[0, 1, 2]), &[0, 1, 2]),
        )
        .unwrap_err();
    let m = msg(e);
    assert!(m.contains("[3, P, 4]") && m.contains("[2, 1, 4]"), "{m}");
    let e = hook
        .step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[5, 5]), &[0, 1]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InconsistentSource { .. }) && msg(e).contains("twice"));
    // A good step, then the same id with another label.
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[0, 1]), &y[..2]),
    )
    .unwrap();
    net.train_batch(xb.view(), &[2, 1]).unwrap();
    let e = hook
        .step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[0, 1]), &[2, 1]),
        )
        .unwrap_err();
    let m = msg(e);
    assert!(
        m.contains("label Some(0)") && m.contains("now found 2"),
        "{m}"
    );
    // Nothing was recorded by the failed steps.
    assert_eq!(hook.n_steps(), 1);
    let ledger = hook.snapshot();
    assert_eq!(ledger.sources().len(), 2);
}

#[test]
fn hook_rejects_a_step_without_backward_and_foreign_layers() {
    let (mut net, mut hook, x, _) = setup();
    net.forward(rows(&x, &[0]).view()).unwrap();
    let e = hook
        .step(&mut net.traceables_mut(), &Batch::new(&ids(&[0]), &[0]))
        .unwrap_err();
    assert!(matches!(e, Error::NoBackwardCache { .. }) && msg(e).contains("fc1"));
    let mut other = mlp::<f64>(5, 3, 2);
    let e = hook
        .step(&mut other.traceables_mut(), &Batch::new(&ids(&[0]), &[0]))
        .unwrap_err();
    let m = msg(e);
    assert!(
        m.contains("fc1 [4 → 8, bias]") && m.contains("fc1 [5 → 8, bias]"),
        "{m}"
    );
    let e = hook
        .step(
            &mut net.traceables_mut()[..1],
            &Batch::new(&ids(&[0]), &[0]),
        )
        .unwrap_err();
    assert!(msg(e).contains("expected 2 traced layers"));
}

/// A traced layer whose deltas can be replaced by poisoned ones.
struct Poisoned(Dense<f64>, Option<ndarray::Array3<f64>>);

impl Traceable<f64> for Poisoned {
    fn layer_id(&self) -> &refinement_ledger::LayerId {
        self.0.layer_id()
    }
    fn traced_shape(&self) -> refinement_ledger::TracedShape {
        self.0.traced_shape()
    }
    fn weight(&self) -> ndarray::ArrayViewD<'_, f64> {
        Traceable::weight(&self.0)
    }
    fn bias(&self) -> Option<ndarray::ArrayView1<'_, f64>> {
        Traceable::bias(&self.0)
    }
    fn params_mut(&mut self) -> Vec<refinement_ledger::ParamMut<'_, f64>> {
        self.0.params_mut()
    }
    fn input_patches(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        self.0.input_patches()
    }
    fn output_deltas(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        match &self.1 {
            Some(bad) => Ok(bad.view()),
            None => self.0.output_deltas(),
        }
    }
}

#[test]
fn non_finite_values_are_errors() {
    let mut d = Dense::<f64>::from_weights("fc", Array2::ones((2, 3)), Array1::zeros(2)).unwrap();
    let e = d
        .forward(array![[1.0, f64::NAN, 0.0]].into_dyn().view())
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }) && msg(e).contains("input"));
    d.forward(array![[1.0, 2.0, 0.0]].into_dyn().view())
        .unwrap();
    let e = d
        .backward(array![[f64::INFINITY, 0.0]].into_dyn().view())
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }));
    let e = Dense::<f64>::from_weights("fc", array![[f64::NAN]], array![0.0]).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }));
    // NaN factors reaching the hook.
    let mut p = Poisoned(
        Dense::from_weights("fc", Array2::ones((2, 3)), Array1::zeros(2)).unwrap(),
        None,
    );
    let sgd = SgdConfig::new(0.1).build::<f64>().unwrap();
    let mut hook = OptimizerHook::new(sgd, &[&p as &dyn Traceable<f64>]).unwrap();
    p.0.forward(array![[1.0, 2.0, 0.0]].into_dyn().view())
        .unwrap();
    p.0.backward(array![[0.5, 0.0]].into_dyn().view()).unwrap();
    p.1 = Some(ndarray::Array3::from_elem((1, 1, 2), f64::NAN));
    let e = hook
        .step(
            &mut [&mut p as &mut dyn Traceable<f64>],
            &Batch::new(&ids(&[0]), &[0]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }) && msg(e).contains("output deltas of fc"));
    assert_eq!(hook.n_steps(), 0);
    // A NaN gradient reaching the optimizer.
    let mut w = array![1.0f64].into_dyn();
    let g = array![f64::NAN].into_dyn();
    let mut sgd = SgdConfig::new(0.1).build::<f64>().unwrap();
    let e = refinement_ledger::Optimizer::step(
        &mut sgd,
        &mut [refinement_ledger::ParamMut {
            id: refinement_ledger::ParamId("w".into()),
            value: w.view_mut(),
            grad: g.view(),
        }],
    )
    .unwrap_err();
    assert!(msg(e).contains("gradient of w"));
    assert_eq!(w[0], 1.0, "a rejected step leaves the parameter alone");
}

#[test]
fn queries_validate_their_inputs() {
    let (mut net, hook, x, y) = setup();
    let empty = hook.snapshot();
    net.forward(x.view()).unwrap();
    let q = Query::from_layers(&net.traceables()).unwrap();
    let e = empty.explain(&q).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }) && msg(e).contains("no training step"));

    let (mut net, mut hook, _, _) = setup();
    net.train_batch(x.view(), &y).unwrap();
    let all: Vec<ExampleId> = (0..y.len() as u64).map(ExampleId).collect();
    hook.step(&mut net.traceables_mut(), &Batch::new(&all, &y))
        .unwrap();
    let ledger = hook.finish().unwrap();
    net.forward(x.view()).unwrap();
    let q = Query::from_layers(&net.traceables()).unwrap();
    let e = ledger.scores(&q, Lens::Loss, LayerSel::All).unwrap_err();
    assert!(matches!(e, Error::NoBackwardCache { .. }));
    let e = ledger
        .scores(&q, Lens::Cos, LayerSel::Layer(7))
        .unwrap_err();
    assert!(msg(e).contains("index 7 out of range, expected 0..2"));
    let e = ledger
        .account(0, SourceId::Example(ExampleId(999)))
        .unwrap_err();
    assert!(matches!(e, Error::UnknownSource { .. }) && msg(e).contains("#999"));
    let e = ledger
        .self_scores(&q, &[SourceId::Decay], Lens::Share)
        .unwrap_err();
    assert!(msg(e).contains(&format!("{} source ids", y.len())));
    let mut other = mlp::<f64>(4, 2, 3);
    other.forward(x.view()).unwrap();
    let e = ledger
        .explain(&Query::from_layers(&other.traceables()).unwrap())
        .unwrap_err();
    assert!(matches!(e, Error::LayerMismatch { .. }) && msg(e).contains("fc2 [8 → 3, bias]"));
    let fresh = mlp::<f64>(4, 3, 9);
    let e = Query::from_layers(&fresh.traceables()).unwrap_err();
    assert!(matches!(e, Error::NoForwardCache { .. }));
    let e = Query::<f64>::from_layers(&[]).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }));
}

#[test]
fn configurations_are_validated() {
    let cases: Vec<(Error, &str)> = vec![
        (SgdConfig::new(0.0).build::<f32>().unwrap_err(), "found 0"),
        (
            SgdConfig::new(0.1)
                .with_momentum(1.0)
                .build::<f32>()
                .unwrap_err(),
            "found 1",
        ),
        (
            SgdConfig::new(0.1)
                .with_nesterov(true)
                .build::<f32>()
                .unwrap_err(),
            "momentum 0",
        ),
        (
            SgdConfig::new(0.1)
                .with_schedule(LrSchedule::Factors(vec![]))
                .build::<f32>()
                .unwrap_err(),
            "[]",
        ),
        (
            AdamConfig::new(0.1)
                .with_betas(1.0, 0.9)
                .build::<f32>()
                .unwrap_err(),
            "found 1",
        ),
        (MaxPool2d::new(0).unwrap_err(), "found 0"),
        (
            Dense::<f32>::from_weights("fc", Array2::zeros((2, 3)), Array1::zeros(3)).unwrap_err(),
            "[2]",
        ),
        (
            DenseConfig::new(0, 3)
                .build::<f32>("fc", &mut StdRng::seed_from_u64(0))
                .unwrap_err(),
            "fan_in 0",
        ),
    ];
    for (e, needle) in cases {
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    }
    let net = mlp::<f32>(4, 3, 1);
    let e = OptimizerHook::with_config(
        AdamConfig::new(0.1).build::<f32>().unwrap(),
        &net.traceables(),
        HookConfig::default().with_credit(Credit::PerExample),
    )
    .unwrap_err();
    assert!(e.to_string().contains("linear rule"));
    let e =
        OptimizerHook::<_, f32>::new(SgdConfig::new(0.1).build::<f32>().unwrap(), &[]).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }));
}

#[test]
fn layers_and_loss_reject_bad_shapes_and_labels() {
    let mut conv = Conv2dConfig::new(2, 3, 3)
        .build::<f32>("c", &mut StdRng::seed_from_u64(0))
        .unwrap();
    let e = conv
        .forward(ArrayD::zeros(ndarray::IxDyn(&[1, 3, 5, 5])).view())
        .unwrap_err();
    assert!(e.to_string().contains("[batch>0, 2, h, w]") && e.to_string().contains("[1, 3, 5, 5]"));
    let e = conv
        .forward(ArrayD::zeros(ndarray::IxDyn(&[1, 2, 2, 2])).view())
        .unwrap_err();
    assert!(e.to_string().contains("at least 3×3"), "{e}");
    let e = conv
        .backward(ArrayD::zeros(ndarray::IxDyn(&[1, 3, 3, 3])).view())
        .unwrap_err();
    assert!(matches!(e, Error::NoForwardCache { .. }));
    let e = SoftmaxCrossEntropy::default()
        .loss_and_grad(array![[0.0f32, 1.0]].view(), &[2])
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("label 2 out of range, expected 0..2")
    );
    let mut hook_net = mlp::<f32>(4, 3, 1);
    let mut hook = OptimizerHook::new(
        SgdConfig::new(0.1).build::<f32>().unwrap(),
        &hook_net.traceables(),
    )
    .unwrap();
    let e = hook.close_segment().unwrap_err();
    assert!(matches!(e, Error::Empty { .. }));
    let e = hook_net
        .train_batch(ArrayD::zeros(ndarray::IxDyn(&[0, 4])).view(), &[])
        .unwrap_err();
    assert!(e.to_string().contains("[batch>0, 4]"));
}

/// SGD whose step fails once the shared flag is set.
struct Failing(
    refinement_ledger::optim::Sgd<f64>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

impl refinement_ledger::Optimizer<f64> for Failing {
    fn step(
        &mut self,
        params: &mut [refinement_ledger::ParamMut<'_, f64>],
    ) -> refinement_ledger::Result<()> {
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::InvalidConfig {
                what: "test optimizer",
                reason: "asked to fail".into(),
            });
        }
        self.0.step(params)
    }
    fn linear_rule(&self) -> Option<refinement_ledger::LinearRule> {
        self.0.linear_rule()
    }
}

#[test]
fn a_failed_optimizer_step_books_nothing_even_with_weight_decay() {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let mut net = mlp::<f64>(4, 3, 1);
    let sgd = SgdConfig::new(0.1)
        .with_momentum(0.9)
        .with_weight_decay(0.01)
        .build()
        .unwrap();
    let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hook = OptimizerHook::new(Failing(sgd, fail.clone()), &net.traceables()).unwrap();
    net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[0, 1]), &y[..2]),
    )
    .unwrap();
    let before = hook.snapshot();
    // A failing step with new examples: no new source, no decay credit, no step.
    fail.store(true, std::sync::atomic::Ordering::Relaxed);
    net.train_batch(rows(&x, &[2, 3]).view(), &y[2..4]).unwrap();
    let e = hook
        .step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[2, 3]), &y[2..4]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    assert_eq!(hook.n_steps(), 1);
    let after = hook.snapshot();
    assert_eq!(after.sources(), before.sources());
    for l in 0..after.layers().len() {
        for s in after.sources() {
            assert_eq!(
                after.account(l, s.id).unwrap(),
                before.account(l, s.id).unwrap()
            );
        }
    }
}

/// SGD that, when asked, leaves an infinite weight behind.
struct Exploding(
    refinement_ledger::optim::Sgd<f64>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

impl refinement_ledger::Optimizer<f64> for Exploding {
    fn step(
        &mut self,
        params: &mut [refinement_ledger::ParamMut<'_, f64>],
    ) -> refinement_ledger::Result<()> {
        self.0.step(params)?;
        if self.1.load(std::sync::atomic::Ordering::Relaxed) {
            params[0].value[[0, 0]] = f64::INFINITY;
        }
        Ok(())
    }
    fn linear_rule(&self) -> Option<refinement_ledger::LinearRule> {
        self.0.linear_rule()
    }
}

#[test]
fn a_step_that_leaves_non_finite_parameters_spoils_none_of_the_good_steps() {
    for decay in [0.0, 0.01] {
        let (x, y) = blobs::<f64>(2, 3, 4, 1);
        let mut net = mlp::<f64>(4, 3, 1);
        let sgd = SgdConfig::new(0.1)
            .with_momentum(0.9)
            .with_weight_decay(decay)
            .build()
            .unwrap();
        let fail = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hook = OptimizerHook::new(Exploding(sgd, fail.clone()), &net.traceables()).unwrap();
        net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
        hook.step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[0, 1]), &y[..2]),
        )
        .unwrap();
        let good = hook.snapshot();
        fail.store(true, std::sync::atomic::Ordering::Relaxed);
        net.train_batch(rows(&x, &[2, 3]).view(), &y[2..4]).unwrap();
        let e = hook
            .step(
                &mut net.traceables_mut(),
                &Batch::new(&ids(&[2, 3]), &y[2..4]),
            )
            .unwrap_err();
        assert!(matches!(e, Error::NonFinite { .. }), "decay {decay}: {e}");
        // The ledger is the one of the good step: finite, balanced, savable.
        let ledger = hook.finish().unwrap();
        for l in 0..ledger.layers().len() {
            assert_eq!(
                ledger.final_params(l).unwrap(),
                good.final_params(l).unwrap(),
                "decay {decay}"
            );
        }
        assert_eq!(ledger.sources(), good.sources());
        assert!(ledger.parameter_balance().iter().all(|&b| b < 1e-12));
        let back =
            refinement_ledger::Ledger::<f64>::from_bytes(&ledger.to_bytes().unwrap()).unwrap();
        assert_eq!(back.steps_per_segment(), vec![1]);
    }
}

/// A layer that reports the traced shape of one Dense but hands out the
/// weight (and bias) of a bigger one.
struct Grown(Dense<f64>, Dense<f64>);

impl Traceable<f64> for Grown {
    fn layer_id(&self) -> &refinement_ledger::LayerId {
        self.0.layer_id()
    }
    fn traced_shape(&self) -> refinement_ledger::TracedShape {
        self.0.traced_shape()
    }
    fn weight(&self) -> ndarray::ArrayViewD<'_, f64> {
        Traceable::weight(&self.1)
    }
    fn bias(&self) -> Option<ndarray::ArrayView1<'_, f64>> {
        Traceable::bias(&self.1)
    }
    fn params_mut(&mut self) -> Vec<refinement_ledger::ParamMut<'_, f64>> {
        self.1.params_mut()
    }
    fn input_patches(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        self.0.input_patches()
    }
    fn output_deltas(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        self.0.output_deltas()
    }
}

#[test]
fn a_weight_that_changed_size_behind_its_traced_shape_is_an_error_in_every_mode() {
    for credit in [
        refinement_ledger::Credit::Batch,
        refinement_ledger::Credit::PerExample,
    ] {
        let small = Dense::from_weights("fc", Array2::ones((2, 3)), Array1::zeros(2)).unwrap();
        let big = Dense::from_weights("fc", Array2::ones((2, 4)), Array1::zeros(2)).unwrap();
        let mut layer = Grown(small, big);
        let sgd = SgdConfig::new(0.1).build::<f64>().unwrap();
        let config = refinement_ledger::HookConfig::default().with_credit(credit);
        let mut hook =
            OptimizerHook::with_config(sgd, &[&layer.0 as &dyn Traceable<f64>], config).unwrap();
        layer
            .0
            .forward(array![[1.0, 2.0, 0.0]].into_dyn().view())
            .unwrap();
        layer
            .0
            .backward(array![[0.5, -0.5]].into_dyn().view())
            .unwrap();
        layer
            .1
            .forward(array![[1.0, 2.0, 0.0, 1.0]].into_dyn().view())
            .unwrap();
        layer
            .1
            .backward(array![[0.5, -0.5]].into_dyn().view())
            .unwrap();
        let e = hook
            .step(
                &mut [&mut layer as &mut dyn Traceable<f64>],
                &Batch::new(&ids(&[0]), &[0]),
            )
            .unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }), "{credit:?}: {e}");
        assert!(msg(e).contains("as traced"));
        assert_eq!(hook.n_steps(), 0);
    }
}

/// SGD that reports a rule of its own choosing.
struct Reporting(
    refinement_ledger::optim::Sgd<f64>,
    refinement_ledger::LinearRule,
);

impl refinement_ledger::Optimizer<f64> for Reporting {
    fn step(
        &mut self,
        params: &mut [refinement_ledger::ParamMut<'_, f64>],
    ) -> refinement_ledger::Result<()> {
        self.0.step(params)
    }
    fn linear_rule(&self) -> Option<refinement_ledger::LinearRule> {
        Some(self.1)
    }
}

#[test]
fn labels_past_the_class_limit_and_rules_out_of_range_are_errors() {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let mut net = mlp::<f64>(4, 3, 1);
    let sgd = || SgdConfig::new(0.1).build::<f64>().unwrap();
    let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
    for label in [refinement_ledger::MAX_CLASSES, usize::MAX] {
        let e = hook
            .step(
                &mut net.traceables_mut(),
                &Batch::new(&ids(&[0, 1]), &[0, label]),
            )
            .unwrap_err();
        assert!(matches!(e, Error::LabelOutOfRange { .. }), "{e}");
    }
    assert!(matches!(
        refinement_ledger::data::ClassPureSampler::new(&[0, 1_000_000_000_000], 2, 1, 0),
        Err(Error::LabelOutOfRange { .. })
    ));
    let good = refinement_ledger::Optimizer::linear_rule(&sgd()).unwrap();
    for bad in [
        refinement_ledger::LinearRule {
            lr: f64::NAN,
            ..good
        },
        refinement_ledger::LinearRule {
            weight_decay: f64::INFINITY,
            ..good
        },
        refinement_ledger::LinearRule {
            momentum: 1.0,
            ..good
        },
    ] {
        let mut hook = OptimizerHook::new(Reporting(sgd(), bad), &net.traceables()).unwrap();
        let e = hook
            .step(
                &mut net.traceables_mut(),
                &Batch::new(&ids(&[0, 1]), &y[..2]),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
        assert_eq!(hook.finish().unwrap().steps_per_segment(), vec![0]);
    }
}

/// A layer that reports an empty output.
struct Empty(Dense<f64>);

impl Traceable<f64> for Empty {
    fn layer_id(&self) -> &refinement_ledger::LayerId {
        self.0.layer_id()
    }
    fn traced_shape(&self) -> refinement_ledger::TracedShape {
        refinement_ledger::TracedShape {
            fan_out: 0,
            weight_shape: vec![0, 3],
            ..self.0.traced_shape()
        }
    }
    fn weight(&self) -> ndarray::ArrayViewD<'_, f64> {
        Traceable::weight(&self.0)
    }
    fn bias(&self) -> Option<ndarray::ArrayView1<'_, f64>> {
        Traceable::bias(&self.0)
    }
    fn params_mut(&mut self) -> Vec<refinement_ledger::ParamMut<'_, f64>> {
        self.0.params_mut()
    }
    fn input_patches(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        self.0.input_patches()
    }
    fn output_deltas(&self) -> refinement_ledger::Result<ndarray::ArrayView3<'_, f64>> {
        self.0.output_deltas()
    }
}

#[test]
fn a_layer_with_an_empty_traced_shape_is_refused_when_tracing_starts() {
    let d = Dense::from_weights("fc", Array2::ones((2, 3)), Array1::zeros(2)).unwrap();
    let sgd = SgdConfig::new(0.1).build::<f64>().unwrap();
    let e = OptimizerHook::new(sgd, &[&Empty(d) as &dyn Traceable<f64>]).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
}

#[test]
fn a_second_step_on_one_backward_pass_is_an_error() {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let mut net = mlp::<f64>(4, 3, 1);
    let sgd = SgdConfig::new(0.1).with_momentum(0.9).build().unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[0, 1]), &y[..2]),
    )
    .unwrap();
    let before = hook.snapshot();
    // The next batch is named, but no backward pass ran for it.
    let e = hook
        .step(
            &mut net.traceables_mut(),
            &Batch::new(&ids(&[2, 3]), &y[2..4]),
        )
        .unwrap_err();
    assert!(matches!(e, Error::StalePass { .. }), "{e}");
    assert!(msg(e).contains("run forward and backward"));
    assert_eq!(hook.snapshot().sources(), before.sources());
    // With its backward pass the step goes through.
    net.train_batch(rows(&x, &[2, 3]).view(), &y[2..4]).unwrap();
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[2, 3]), &y[2..4]),
    )
    .unwrap();
    assert_eq!(hook.n_steps(), 2);
}

#[test]
fn a_query_built_from_the_last_training_pass_is_an_error() {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let mut net = mlp::<f64>(4, 3, 1);
    let sgd = SgdConfig::new(0.1).build().unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[0, 1]), &y[..2]),
    )
    .unwrap();
    let ledger = hook.finish().unwrap();
    // Forgot to run the network on the query: the caches are the training batch's.
    let stale = refinement_ledger::Query::with_gradients(&net.traceables()).unwrap();
    let e = ledger
        .scores(
            &stale,
            refinement_ledger::Lens::Loss,
            refinement_ledger::LayerSel::All,
        )
        .unwrap_err();
    assert!(matches!(e, Error::StaleQuery { .. }), "{e}");
    assert!(msg(e).contains("Query::forward"));
    // Built from the query inputs, it is answered.
    let q = refinement_ledger::Query::forward(&mut net, rows(&x, &[2]).view()).unwrap();
    assert!(ledger.explain(&q).is_ok());
}

#[test]
fn a_query_from_another_network_with_the_same_layers_is_an_error() {
    let (x, y) = blobs::<f64>(2, 3, 4, 1);
    let mut net = mlp::<f64>(4, 3, 1);
    let sgd = SgdConfig::new(0.1).build().unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    net.train_batch(rows(&x, &[0, 1]).view(), &y[..2]).unwrap();
    hook.step(
        &mut net.traceables_mut(),
        &Batch::new(&ids(&[0, 1]), &y[..2]),
    )
    .unwrap();
    let ledger = hook.finish().unwrap();
    // Same layer ids and shapes, other weights (another seed).
    let mut other = mlp::<f64>(4, 3, 2);
    let q = refinement_ledger::Query::forward(&mut other, rows(&x, &[2]).view()).unwrap();
    let e = ledger.explain(&q).unwrap_err();
    assert!(matches!(e, Error::LayerMismatch { .. }), "{e}");
    assert!(msg(e).contains("final parameters"));
    let q = refinement_ledger::Query::forward(&mut net, rows(&x, &[2]).view()).unwrap();
    assert!(ledger.explain(&q).is_ok());
}

#[test]
fn absurd_sizes_are_errors_not_aborts() {
    use refinement_ledger::ConvGeometry;
    use refinement_ledger::nn::{Conv2dConfig, MAX_LAYER_PARAMS};
    let mut rng = StdRng::seed_from_u64(0);
    let e = DenseConfig::new(1_000_000, 1_000_000)
        .build::<f32>("fc", &mut rng)
        .unwrap_err();
    assert!(e.to_string().contains(&MAX_LAYER_PARAMS.to_string()), "{e}");
    let e = Conv2dConfig::new(1 << 20, 1 << 20, 3)
        .build::<f32>("conv", &mut rng)
        .unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
    let e = Conv2dConfig::new(3, 3, usize::MAX)
        .build::<f32>("conv", &mut rng)
        .unwrap_err();
    assert!(
        matches!(e, refinement_ledger::Error::InvalidConfig { .. }),
        "{e}"
    );
    let g = ConvGeometry {
        kernel: [3, 3],
        stride: 1,
        padding: usize::MAX / 2,
        dilation: 1,
    };
    assert!(g.output_hw(8, 8).is_err());
    let g = ConvGeometry {
        kernel: [usize::MAX, 3],
        stride: 1,
        padding: 0,
        dilation: 2,
    };
    assert!(g.output_hw(8, 8).is_err());
    let zero = ConvGeometry {
        kernel: [3, 3],
        stride: 0,
        padding: 0,
        dilation: 1,
    };
    assert!(zero.output_hw(8, 8).is_err());
}
