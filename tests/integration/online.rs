//! Online compact recording: the projected accounts booked step by step equal
//! the projection of the exact accounts (the projection is linear), exactly so
//! when the projection is the identity; the balance holds in projected space;
//! what needs exact accounts is an error.

use crate::common;

use common::{Run, blobs, cnn, gradient_query, images, mlp, query, train};
use ndarray::{Array2, ArrayD};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::{AdamConfig, SgdConfig};
use refinement_ledger::query::{LedgerSketch, Projection, SketchConfig};
use refinement_ledger::{Error, LayerSel, Lens, OptimizerHook, Query};

/// Trains two identical networks the same way, one hook exact and one online
/// with `sketch`; returns the exact ledger's sketch with the same projection,
/// the online sketch, and the network.
fn twin_runs(
    make: impl Fn() -> Sequential<f64>,
    data: (ArrayD<f64>, Vec<usize>),
    sketch: &SketchConfig,
    decay: f64,
) -> (
    LedgerSketch,
    LedgerSketch,
    refinement_ledger::Ledger<f64>,
    Sequential<f64>,
) {
    let (x, y) = data;
    let sgd = || {
        SgdConfig::new(0.05)
            .with_momentum(0.9)
            .with_nesterov(true)
            .with_weight_decay(decay)
            .build::<f64>()
            .unwrap()
    };
    let run = Run {
        batch: 4,
        epochs: 3,
        segment_per_epoch: true,
        seed: 11,
    };
    let mut net = make();
    let mut exact_hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    train(&mut net, &mut exact_hook, &x, &y, run);
    let exact = exact_hook.finish().unwrap();
    let mut twin = make();
    let mut online_hook = OptimizerHook::new(sgd(), &twin.traceables())
        .unwrap()
        .online(sketch)
        .unwrap();
    assert!(online_hook.is_online());
    train(&mut twin, &mut online_hook, &x, &y, run);
    let online = online_hook.finish_sketch().unwrap();
    let offline = LedgerSketch::build(&exact, sketch).unwrap();
    (offline, online, exact, net)
}

/// `max |a − b| / max |b|`.
fn max_rel(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    (a - b).iter().fold(0f64, |m, v| m.max(v.abs())) / scale
}

fn lenses(net: &mut Sequential<f64>, test: &ArrayD<f64>) -> Vec<(Lens, Query<f64>)> {
    vec![
        (Lens::Dot, query(net, test)),
        (Lens::Influence, query(net, test)),
        (Lens::Loss, gradient_query(net, test)),
    ]
}

#[test]
fn identity_projection_reproduces_the_exact_ledger() {
    // k ≥ fan_out · aug_in for every layer: both Kronecker sides are the
    // identity, so online accounts are the exact ones (stored in bf16).
    let sketch = SketchConfig::with_dims(1 << 12).projection(Projection::Kronecker);
    let (offline, online, exact, mut net) = twin_runs(
        || mlp::<f64>(6, 3, 4),
        blobs::<f64>(12, 3, 6, 2),
        &sketch,
        1e-3,
    );
    let (test, _) = blobs::<f64>(2, 3, 6, 31);
    for (lens, q) in lenses(&mut net, &test) {
        let want = exact.scores(&q, lens, LayerSel::All).unwrap().into_values();
        let got = online
            .scores(&q, lens, LayerSel::All)
            .unwrap()
            .into_values();
        let err = max_rel(&got, &want);
        // bf16 keeps 8 bits: 2⁻⁸ relative per account.
        assert!(err < 1e-2, "{lens:?}: online vs exact {err}");
        let off = offline
            .scores(&q, lens, LayerSel::All)
            .unwrap()
            .into_values();
        assert!(max_rel(&got, &off) < 1e-2, "{lens:?}: online vs offline");
    }
    for (l, e) in online.balance_error().iter().enumerate() {
        assert!(*e < 1e-2, "layer {l}: balance error {e}");
    }
}

#[test]
fn online_projection_equals_the_projection_of_the_exact_accounts() {
    // A random projection (k far below the layers' sizes): online booking and
    // projecting the finished exact ledger are the same linear map, so the
    // two sketches agree up to f32/bf16 rounding — for a CNN's convolutions
    // (many positions per example) and its dense head, with decay and momentum.
    for projection in [Projection::Kronecker, Projection::Tensor] {
        let sketch = SketchConfig::with_dims(24).projection(projection).seed(7);
        let (offline, online, exact, mut net) =
            twin_runs(|| cnn::<f64>(4, 2), images::<f64>(5, 4, 1), &sketch, 1e-3);
        assert_eq!(online.dims(), offline.dims());
        assert_eq!(online.projection(), projection);
        let (test, _) = images::<f64>(1, 4, 9);
        for (lens, q) in lenses(&mut net, &test) {
            let off = offline
                .scores(&q, lens, LayerSel::All)
                .unwrap()
                .into_values();
            let got = online
                .scores(&q, lens, LayerSel::All)
                .unwrap()
                .into_values();
            let err = max_rel(&got, &off);
            assert!(
                err < 2e-2,
                "{projection:?} {lens:?}: online vs offline {err}"
            );
            // And the estimate is one of the exact scores, not noise: correlated.
            let want = exact.scores(&q, lens, LayerSel::All).unwrap().into_values();
            assert_eq!(want.dim(), got.dim());
        }
        for (l, e) in online.balance_error().iter().enumerate() {
            assert!(*e < 1e-2, "{projection:?} layer {l}: balance error {e}");
        }
        // The online sketch is far smaller than the exact ledger it stands for.
        let (small, big): (usize, usize) = (
            online.bytes_per_layer().iter().sum(),
            online.exact_bytes_per_layer().iter().sum(),
        );
        assert!(small * 2 < big, "{small} vs {big} bytes");
    }
}

#[test]
fn kronecker_estimates_sharpen_with_k_and_the_sketch_round_trips() {
    let (exact, mut net) = crate::sketch::trained_mlp();
    let (test, _) = blobs::<f64>(2, 3, 10, 40);
    let q = gradient_query(&mut net, &test);
    let want = exact
        .scores(&q, Lens::Loss, LayerSel::All)
        .unwrap()
        .into_values();
    let err = |k: usize, seed: u64| {
        let config = SketchConfig::with_dims(k)
            .projection(Projection::Kronecker)
            .seed(seed);
        let s = LedgerSketch::build(&exact, &config).unwrap();
        let got = s
            .scores(&q, Lens::Loss, LayerSel::All)
            .unwrap()
            .into_values();
        (&got - &want).mapv(|v| v * v).sum().sqrt() / want.mapv(|v| v * v).sum().sqrt()
    };
    // Averaged over seeds, the error falls with k (layers of 8 × 11 and
    // 3 × 9 entries; measured: 5.0 at k = 4, 1.3 at k = 36 — a loss lens's
    // scores are small against the accounts' norms), and vanishes at k = 88,
    // where both sides of both layers are the identity.
    let mean = |k| (0..8).map(|s| err(k, s)).sum::<f64>() / 8.0;
    let (coarse, fine, full) = (mean(4), mean(36), mean(88));
    assert!(fine < coarse * 0.5, "k=36 error {fine} vs k=4 {coarse}");
    assert!(full < 1e-2, "k=88 (identity) error {full}");
    // Save and load keep the projection.
    let config = SketchConfig::with_dims(20).projection(Projection::Kronecker);
    let s = LedgerSketch::build(&exact, &config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.sketch");
    s.save(&path).unwrap();
    let back = LedgerSketch::load(&path).unwrap();
    assert_eq!(back.projection(), Projection::Kronecker);
    assert_eq!(back.dims(), s.dims());
    assert_eq!(
        back.scores(&q, Lens::Loss, LayerSel::All).unwrap(),
        s.scores(&q, Lens::Loss, LayerSel::All).unwrap()
    );
}

#[test]
fn online_recording_refuses_what_needs_exact_accounts() {
    let (x, y) = blobs::<f64>(8, 2, 4, 1);
    let mut net = mlp::<f64>(4, 2, 1);
    let sketch = SketchConfig::with_dims(8).projection(Projection::Kronecker);
    let sgd = || SgdConfig::new(0.05).build::<f64>().unwrap();
    let run = Run {
        batch: 4,
        epochs: 1,
        segment_per_epoch: false,
        seed: 1,
    };
    // Chosen after a step: refused.
    let mut late = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    train(&mut net, &mut late, &x, &y, run);
    assert!(matches!(
        late.online(&sketch),
        Err(Error::InvalidConfig { .. })
    ));
    // An exact hook has no online sketch.
    let mut exact = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    train(&mut net, &mut exact, &x, &y, run);
    assert!(exact.snapshot_sketch().is_err());
    assert!(exact.finish_sketch().is_err());
    let mut hook = OptimizerHook::new(sgd(), &net.traceables())
        .unwrap()
        .online(&sketch)
        .unwrap();
    train(&mut net, &mut hook, &x, &y, run);
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        hook.save_checkpoint(&dir.path().join("c")),
        Err(Error::InvalidConfig { .. })
    ));
    let snap = hook.snapshot();
    let q = query(&mut net, &x);
    assert!(matches!(
        snap.scores(&q, Lens::Dot, LayerSel::All),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(snap.save(&dir.path().join("l")).is_err());
    assert!(!dir.path().join("l").exists());
    let sketch = hook.snapshot_sketch().unwrap();
    assert!(sketch.scores(&q, Lens::Cos, LayerSel::All).is_err());
    let err = hook.finish().unwrap_err();
    assert!(err.to_string().contains("finish_sketch"), "{err}");
}

#[test]
fn batch_crediting_records_online_and_balances() {
    // Adam: each step's exact update, projected, credited to its batch.
    let (x, y) = blobs::<f64>(12, 3, 6, 2);
    let mut net = mlp::<f64>(6, 3, 4);
    let adam = AdamConfig::new(0.01).build::<f64>().unwrap();
    let sketch = SketchConfig::with_dims(16).projection(Projection::Kronecker);
    let mut hook = OptimizerHook::new(adam, &net.traceables())
        .unwrap()
        .online(&sketch)
        .unwrap();
    let run = Run {
        batch: 6,
        epochs: 2,
        segment_per_epoch: true,
        seed: 2,
    };
    let steps = train(&mut net, &mut hook, &x, &y, run);
    let online = hook.finish_sketch().unwrap();
    assert_eq!(online.sources().len(), steps.len());
    for (l, e) in online.balance_error().iter().enumerate() {
        assert!(*e < 1e-2, "layer {l}: balance error {e}");
    }
}
