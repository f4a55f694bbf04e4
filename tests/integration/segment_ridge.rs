//! The ridge lens per segment: with one segment it is the ridge lens; with
//! several it is the sum of the ridge lenses of each segment's own ledger,
//! each queried with gradients at that segment's end.

use crate::common;

use common::{assert_allclose, cnn, gradient_query, images, rows};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{Pairing, RidgeLens, SegmentRidge, Targets};
use refinement_ledger::{Batch, ExampleId, Ledger, OptimizerHook, Query, Scorer, SourceId};

/// Plain SGD (no momentum: nothing crosses a segment boundary) on a CNN whose
/// convolutions keep dense accounts and whose dense layer keeps rows; one
/// ledger with a segment per epoch, and one ledger per epoch traced alone.
fn runs() -> (Ledger<f64>, Vec<Ledger<f64>>, Sequential<f64>) {
    let (x, y) = images::<f64>(4, 4, 1);
    let order =
        |e: usize| -> Vec<usize> { (0..y.len()).map(|i| (i * 5 + e * 3) % y.len()).collect() };
    let sgd = || SgdConfig::new(0.05).build::<f64>().unwrap();
    let epoch = |net: &mut Sequential<f64>, hook: &mut OptimizerHook<_, f64>, e: usize| {
        for chunk in order(e).chunks(4) {
            let yb: Vec<usize> = chunk.iter().map(|&i| y[i]).collect();
            let ids: Vec<ExampleId> = chunk.iter().map(|&i| ExampleId(i as u64)).collect();
            net.train_batch(rows(&x, chunk).view(), &yb).unwrap();
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))
                .unwrap();
        }
    };
    let mut net = cnn::<f64>(4, 2);
    let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    for e in 0..3 {
        epoch(&mut net, &mut hook, e);
        if e < 2 {
            hook.close_segment().unwrap();
        }
    }
    let whole = hook.finish().unwrap();
    let mut net = cnn::<f64>(4, 2);
    let mut alone = Vec::new();
    for e in 0..3 {
        let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
        epoch(&mut net, &mut hook, e);
        alone.push(hook.finish().unwrap());
    }
    (whole, alone, net)
}

#[test]
fn with_one_segment_it_is_the_ridge_lens() {
    let (ledger, mut net, test) = common::trained_cnn::<f64>(false);
    assert_eq!(ledger.n_segments(), 1);
    let q = gradient_query(&mut net, &test);
    for c in [1e-2, 1.0] {
        let want = RidgeLens::fit(&ledger, c)
            .unwrap()
            .scores(&q)
            .unwrap()
            .into_values();
        let segment = SegmentRidge::fit(&ledger, c).unwrap();
        let got = segment.scores(&q).unwrap().into_values();
        assert_allclose(
            &got.into_dyn(),
            &want.into_dyn(),
            1e-8,
            1e-10,
            "one segment",
        );
    }
    assert!(SegmentRidge::fit(&ledger, 0.0).is_err());
}

#[test]
fn with_several_it_sums_each_segments_ridge_lens_at_its_end() {
    let (whole, alone, mut net) = runs();
    assert_eq!(whole.n_segments(), 3);
    let (test, _) = images::<f64>(1, 4, 9);
    let targets = net.predict(test.view()).unwrap();
    let c = 0.1;
    let paired = Query::paired(
        &mut net,
        test.view(),
        Targets::Labels(&targets),
        &whole,
        Pairing::SegmentEnd,
    )
    .unwrap();
    let got = SegmentRidge::fit(&whole, c)
        .unwrap()
        .scores(&paired)
        .unwrap()
        .into_values();
    // Direct: each epoch's ledger (its sources in its own order), queried at its end.
    let mut want = ndarray::Array2::<f64>::zeros(got.raw_dim());
    let mut replay = cnn::<f64>(4, 2);
    for ledger in &alone {
        let end: Vec<_> = (0..ledger.layers().len())
            .map(|l| ledger.final_params(l).unwrap().clone())
            .collect();
        refinement_ledger::write_params(&mut replay.traceables_mut(), &end).unwrap();
        let q = Query::gradients(&mut replay, test.view(), Targets::Labels(&targets)).unwrap();
        let scores = RidgeLens::fit(ledger, c).unwrap().scores(&q).unwrap();
        for (s, meta) in whole.sources().iter().enumerate() {
            for qi in 0..test.shape()[0] {
                want[[qi, s]] += scores.value(qi, meta.id).unwrap();
            }
        }
    }
    assert!(
        whole
            .sources()
            .iter()
            .all(|m| matches!(m.id, SourceId::Example(_)))
    );
    assert_allclose(
        &got.into_dyn(),
        &want.into_dyn(),
        1e-7,
        1e-10,
        "sum over segments",
    );
}
