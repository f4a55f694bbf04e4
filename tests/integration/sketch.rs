//! The compact sketch: unbiased estimates of the linear lenses that sharpen as
//! `k` grows, balance up to bf16 rounding, the ridge lens from a `Σk × Σk` solve,
//! determinism, and errors.

use crate::common;

use common::{Run, blobs, gradient_query, mlp, query, train, trained_cnn};
use ndarray::Array2;
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{LedgerSketch, Pairing, RidgeLens, SketchConfig, Targets};
use refinement_ledger::{Error, LayerSel, Ledger, Lens, OptimizerHook, Query, Scorer};

/// An MLP trained with momentum, 3 epochs with a segment each, and its ledger.
pub(crate) fn trained_mlp() -> (Ledger<f64>, Sequential<f64>) {
    let (x, y) = blobs::<f64>(30, 3, 10, 4);
    let mut net = mlp::<f64>(10, 3, 5);
    let sgd = SgdConfig::new(0.05).with_momentum(0.9).build().unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    let run = Run {
        batch: 8,
        epochs: 3,
        segment_per_epoch: true,
        seed: 6,
    };
    train(&mut net, &mut hook, &x, &y, run);
    (hook.finish().unwrap(), net)
}

fn rel_err(approx: &Array2<f64>, exact: &Array2<f64>) -> f64 {
    let diff = (approx - exact).mapv(|v| v * v).sum().sqrt();
    diff / exact.mapv(|v| v * v).sum().sqrt()
}

#[test]
fn sketch_estimates_every_linear_lens_and_sharpens_with_k() {
    let (ledger, mut net) = trained_mlp();
    let (test, _) = blobs::<f64>(2, 3, 10, 40);
    let q = query(&mut net, &test);
    let g = gradient_query(&mut net, &test);
    for (lens, query) in [
        (Lens::Dot, &q),
        (Lens::Influence, &q),
        (Lens::Share, &q),
        (Lens::Loss, &g),
    ] {
        for layers in [LayerSel::All, LayerSel::Layer(0), LayerSel::Layer(1)] {
            let exact = ledger.scores(query, lens, layers).unwrap().into_values();
            let err = |k: usize| {
                let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(k)).unwrap();
                rel_err(
                    &sketch.scores(query, lens, layers).unwrap().into_values(),
                    &exact,
                )
            };
            let (coarse, fine) = (err(16), err(8192));
            println!("{lens:?} {layers:?}: relative error k=16 {coarse:.3}, k=8192 {fine:.4}");
            // The error falls as 1/√k: 512× more dimensions, ~22× less error.
            assert!(fine < 0.25, "{lens:?} {layers:?}: k=8192 error {fine}");
            assert!(
                fine < coarse / 8.0,
                "{lens:?} {layers:?}: {fine} vs {coarse}"
            );
        }
    }
}

#[test]
fn sketch_serves_convolutions_and_balances() {
    let (ledger, mut net, test) = trained_cnn::<f32>(true);
    let q = query(&mut net, &test);
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(8192)).unwrap();
    let exact = ledger
        .scores(&q, Lens::Influence, LayerSel::All)
        .unwrap()
        .into_values();
    let err = rel_err(
        &sketch
            .scores(&q, Lens::Influence, LayerSel::All)
            .unwrap()
            .into_values(),
        &exact,
    );
    assert!(err < 0.05, "CNN influence relative error {err}");
    let balance = sketch.balance_error();
    println!("CNN sketch balance error per layer: {balance:?}");
    assert!(balance.iter().all(|&e| e < 1e-2), "{balance:?}");
    // Rankings come from the same result type as the exact ledger's.
    let top = sketch
        .scores(&q, Lens::Influence, LayerSel::All)
        .unwrap()
        .top_k_all(3);
    assert_eq!(top.len(), q.len());
    assert_eq!(top[0].proponents.len(), 3);
    // A lens the sketch cannot serve is an error, never a fallback.
    for lens in [Lens::Cos, Lens::Norm, Lens::Margin] {
        assert!(matches!(
            sketch.scores(&q, lens, LayerSel::All),
            Err(Error::InvalidConfig { .. })
        ));
    }
}

#[test]
fn ratio_mode_meets_its_size() {
    let (ledger, _) = trained_mlp();
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_ratio(4.0)).unwrap();
    for (l, &k) in sketch.dims().iter().enumerate() {
        let (exact, small) = (
            sketch.exact_bytes_per_layer()[l],
            sketch.bytes_per_layer()[l],
        );
        assert!(k > 1, "layer {l}: the budget leaves one dimension");
        assert!(
            4 * small <= exact,
            "layer {l}: {k} dims, {small} bytes vs {exact} exact bytes"
        );
    }
}

#[test]
fn sketched_ridge_tracks_the_exact_ridge_lens() {
    let (ledger, mut net) = trained_mlp();
    let (test, _) = blobs::<f64>(2, 3, 10, 41);
    let g = gradient_query(&mut net, &test);
    let exact = RidgeLens::fit(&ledger, 0.1)
        .unwrap()
        .scores(&g)
        .unwrap()
        .into_values();
    let err = |k: usize| {
        let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(k)).unwrap();
        let ridge = sketch.ridge(0.1).unwrap();
        assert_eq!(ridge.c(), 0.1);
        assert!(ridge.lambda() > 0.0);
        rel_err(&ridge.scores(&g).unwrap().into_values(), &exact)
    };
    let (coarse, fine) = (err(16), err(1024));
    println!("ridge relative error k=16 {coarse:.3}, k=1024 {fine:.4}");
    assert!(fine < 0.2, "ridge k=1024 error {fine}");
    assert!(fine < coarse / 2.0, "{fine} vs {coarse}");
}

#[test]
fn sketch_is_deterministic_across_seeds_and_threads() {
    let (ledger, mut net, test) = trained_cnn::<f32>(false);
    let q = query(&mut net, &test);
    let run = |threads: usize, seed: u64| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let sketch =
                LedgerSketch::build(&ledger, &SketchConfig::with_dims(256).seed(seed)).unwrap();
            sketch
                .scores(&q, Lens::Dot, LayerSel::All)
                .unwrap()
                .into_values()
        })
    };
    assert!(run(1, 1) == run(4, 1), "1 vs 4 threads differ");
    assert!(
        run(2, 1) != run(2, 2),
        "different seeds give the same sketch"
    );
}

#[test]
fn sketch_errors_say_what_was_wrong() {
    let (ledger, mut net) = trained_mlp();
    let (test, _) = blobs::<f64>(1, 3, 10, 42);
    let q = query(&mut net, &test);
    assert!(matches!(
        LedgerSketch::build(&ledger, &SketchConfig::with_dims(0)),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        LedgerSketch::build(&ledger, &SketchConfig::with_ratio(f64::NAN)),
        Err(Error::InvalidConfig { .. })
    ));
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(32)).unwrap();
    for lens in [Lens::Norm, Lens::Cos, Lens::Margin] {
        let e = sketch.scores(&q, lens, LayerSel::All).unwrap_err();
        assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    }
    assert!(matches!(
        sketch.scores(&q, Lens::Loss, LayerSel::All),
        Err(Error::NoBackwardCache { .. })
    ));
    assert!(matches!(
        sketch.scores(&q, Lens::Dot, LayerSel::Layer(5)),
        Err(Error::IndexOutOfRange { .. })
    ));
    assert!(matches!(
        sketch.ridge(0.0),
        Err(Error::InvalidConfig { .. })
    ));
    // A query of another network.
    let mut other = mlp::<f64>(10, 4, 1);
    other.forward(test.view()).unwrap();
    let bad = Query::from_layers(&other.traceables()).unwrap();
    assert!(sketch.scores(&bad, Lens::Dot, LayerSel::All).is_err());
    // A sketch sums segments: a query paired with segments is refused.
    let (seg_ledger, mut seg_net, seg_test) = trained_cnn::<f64>(true);
    let seg_sketch = LedgerSketch::build(&seg_ledger, &SketchConfig::with_dims(8)).unwrap();
    let paired = Query::paired(
        &mut seg_net,
        seg_test.view(),
        Targets::Predicted,
        &seg_ledger,
        Pairing::Midpoint,
    )
    .unwrap();
    assert!(matches!(
        seg_sketch.scores(&paired, Lens::Loss, LayerSel::All),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn reranking_a_shortlist_recovers_the_exact_top_k() {
    let (ledger, mut net) = trained_mlp();
    let (test, _) = blobs::<f64>(2, 3, 10, 43);
    let q = query(&mut net, &test);
    let g = gradient_query(&mut net, &test);
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(16)).unwrap();
    let n = ledger.sources().len();
    for (lens, query) in [
        (Lens::Dot, &q),
        (Lens::Influence, &q),
        (Lens::Share, &q),
        (Lens::Loss, &g),
    ] {
        let exact = ledger.top_k_influences(query, lens, 5).unwrap();
        // With the whole ledger as shortlist the answer is the exact one, even
        // from a coarse 16-dimensional sketch.
        let approx = sketch.scores(query, lens, LayerSel::All).unwrap();
        let reranked = approx.rerank(&ledger.lens(lens), query, 5, n).unwrap();
        for (e, r) in exact.iter().zip(&reranked) {
            let ids =
                |v: &[refinement_ledger::Influence]| v.iter().map(|i| i.source).collect::<Vec<_>>();
            assert_eq!(ids(&e.combined.proponents), ids(&r.proponents), "{lens:?}");
            assert_eq!(ids(&e.combined.opponents), ids(&r.opponents), "{lens:?}");
            for (a, b) in e.combined.proponents.iter().zip(&r.proponents) {
                assert!(
                    (a.score - b.score).abs() <= 1e-9 * a.score.abs().max(1e-12),
                    "{lens:?}"
                );
            }
        }
        // A short list returns exact scores for the sources it keeps.
        let short = approx.rerank(&ledger.lens(lens), query, 5, 10).unwrap();
        let full = ledger
            .scores(query, lens, LayerSel::All)
            .unwrap()
            .into_values();
        for (qi, r) in short.iter().enumerate() {
            for inf in &r.proponents {
                let col = ledger.source_index(inf.source).unwrap();
                assert!((full[[qi, col]] - inf.score).abs() <= 1e-9 * inf.score.abs().max(1e-12));
            }
        }
    }
    let (other, mut cnn, test) = trained_cnn::<f64>(true);
    assert!(matches!(
        sketch.scores(&q, Lens::Dot, LayerSel::All).unwrap().rerank(
            &other.lens(Lens::Dot),
            &q,
            5,
            10
        ),
        Err(Error::ShapeMismatch { .. })
    ));
    // Convolutions: dense accounts over several segments, many positions.
    let qc = query(&mut cnn, &test);
    let sketch = LedgerSketch::build(&other, &SketchConfig::with_dims(16)).unwrap();
    let exact = other.top_k_influences(&qc, Lens::Influence, 4).unwrap();
    let reranked = sketch
        .scores(&qc, Lens::Influence, LayerSel::All)
        .unwrap()
        .rerank(&other.lens(Lens::Influence), &qc, 4, other.sources().len())
        .unwrap();
    for (e, r) in exact.iter().zip(&reranked) {
        for (a, b) in e.combined.proponents.iter().zip(&r.proponents) {
            assert_eq!(a.source, b.source);
            assert!((a.score - b.score).abs() <= 1e-9 * a.score.abs().max(1e-12));
        }
    }
}

#[test]
fn a_saved_sketch_loads_identical_and_corruption_is_an_error() {
    let (ledger, mut net) = trained_mlp();
    let (test, _) = blobs::<f64>(2, 3, 10, 44);
    let q = query(&mut net, &test);
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_dims(48)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.sketch");
    sketch.save(&path).unwrap();
    let back = LedgerSketch::load(&path).unwrap();
    assert_eq!(back.dims(), sketch.dims());
    assert_eq!(back.sources(), sketch.sources());
    assert_eq!(back.balance_error(), sketch.balance_error());
    for lens in [Lens::Dot, Lens::Influence, Lens::Share] {
        assert_eq!(
            back.scores(&q, lens, LayerSel::All).unwrap().into_values(),
            sketch
                .scores(&q, lens, LayerSel::All)
                .unwrap()
                .into_values()
        );
    }
    let bytes = std::fs::read(&path).unwrap();
    for cut in (0..bytes.len()).step_by(bytes.len() / 97 + 1) {
        assert!(
            LedgerSketch::from_bytes(&bytes[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    for at in (0..bytes.len()).step_by(bytes.len() / 211 + 1) {
        let mut bad = bytes.clone();
        bad[at] ^= 0x10;
        assert!(LedgerSketch::from_bytes(&bad).is_err(), "bit flip at {at}");
    }
    // A ledger file is not a sketch, and a sketch is not a ledger.
    let ledger_path = dir.path().join("run.ledger");
    ledger.save(&ledger_path).unwrap();
    assert!(matches!(
        LedgerSketch::load(&ledger_path),
        Err(Error::CorruptLedger { .. })
    ));
    assert!(matches!(
        Ledger::<f64>::load(&path),
        Err(Error::CorruptLedger { .. })
    ));
    assert!(matches!(
        LedgerSketch::load(&dir.path().join("missing")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn absurd_sketch_sizes_are_errors_not_aborts() {
    let (ledger, _) = trained_mlp();
    for k in [usize::MAX, 1 << 40] {
        assert!(matches!(
            LedgerSketch::build(&ledger, &SketchConfig::with_dims(k)),
            Err(Error::InvalidConfig { .. })
        ));
    }
}
