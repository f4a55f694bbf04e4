//! The lenses `fashion_lds` scores: every exact lens, the three ridge lenses
//! (exact, sketched, per segment) with `c` chosen on the validation points,
//! and mislabel detection by self-score.

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::Array2;
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use refinement_ledger::data::Dataset;
use refinement_ledger::metrics::roc_auc;
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{
    LedgerSketch, Pairing, RidgeLens, SegmentRidge, SketchConfig, SketchRidge, Targets,
};
use refinement_ledger::{Error, Ledger, Lens, OptimizerHook, Query, Result, Scorer, SourceId};

use super::{LR, Opts, RIDGE_GRID, Truth, lds, lds_of, mlp, train};

/// The grid value of `c` whose validation scores (`fit(c)`) have the best LDS.
pub fn choose_c(
    fit: &mut dyn FnMut(f64) -> Result<Array2<f64>>,
    ledger: &Ledger<f32>,
    train: &Dataset<f32>,
    truth: &Truth,
) -> Result<f64> {
    let mut best = (f64::NEG_INFINITY, RIDGE_GRID[0]);
    for c in RIDGE_GRID {
        let (m, _) = lds_of(
            &lds::by_file_order(&fit(c)?, ledger, train.ids()),
            truth,
            true,
        );
        println!("  c = {c:e}: validation LDS {m:.3}");
        if m > best.0 {
            best = (m, c);
        }
    }
    Ok(best.1)
}

/// The three ridge lenses, each at its `c` chosen on the validation points.
pub struct Ridges<'a> {
    pub exact: RidgeLens<'a, f32>,
    pub sketch: SketchRidge<'a>,
    pub segments: SegmentRidge<'a, f32>,
}

/// `c` per ridge lens.
#[derive(Clone, Copy)]
pub struct Cs {
    pub exact: f64,
    pub sketch: f64,
    pub segments: f64,
}

/// One lens's results.
pub struct Scored {
    pub name: String,
    pub target: &'static str,
    pub scores: Vec<Vec<f64>>,
    pub seconds: f64,
}

/// Every lens's scores for the test points (file order), timed.
pub fn score_all(
    net: &mut Sequential<f32>,
    ledger: &Ledger<f32>,
    ridges: &Ridges<'_>,
    test: &Dataset<f32>,
    train_set: &Dataset<f32>,
) -> Result<Vec<Scored>> {
    let x = test.x();
    let mut out = Vec::new();
    let mut timed =
        |name: &str, target: &'static str, f: &mut dyn FnMut() -> Result<Array2<f64>>| {
            let t = Instant::now();
            let scores = f()?;
            let seconds = t.elapsed().as_secs_f64();
            let scores = lds::by_file_order(&scores, ledger, train_set.ids());
            out.push(Scored {
                name: name.into(),
                target,
                scores,
                seconds,
            });
            Ok::<(), Error>(())
        };
    let labels = Targets::Labels(test.labels());
    for (lens, name) in [
        (Lens::Influence, "influence"),
        (Lens::Share, "share"),
        (Lens::Cos, "cos"),
        (Lens::Margin, "margin"),
    ] {
        timed(name, "representation", &mut || {
            let q = Query::forward(net, x.view())?;
            Ok(ledger.lens(lens).scores(&q)?.into_values())
        })?;
    }
    for (targets, tag) in [
        (labels, "true label"),
        (Targets::Predicted, "predicted label"),
    ] {
        timed("loss/final", tag, &mut || {
            let q = Query::gradients(net, x.view(), targets)?;
            Ok(ledger.lens(Lens::Loss).scores(&q)?.into_values())
        })?;
        for (pairing, name) in [
            (Pairing::SegmentEnd, "loss/epoch"),
            (Pairing::Midpoint, "loss/midpoint"),
        ] {
            timed(name, tag, &mut || {
                let q = Query::paired(net, x.view(), targets, ledger, pairing)?;
                Ok(ledger.lens(Lens::Loss).scores(&q)?.into_values())
            })?;
        }
        timed("ridge", tag, &mut || {
            let q = Query::gradients(net, x.view(), targets)?;
            Ok(ridges.exact.scores(&q)?.into_values())
        })?;
        timed("ridge/sketch", tag, &mut || {
            let q = Query::gradients(net, x.view(), targets)?;
            Ok(ridges.sketch.scores(&q)?.into_values())
        })?;
        timed("ridge/segments", tag, &mut || {
            let q = Query::paired(net, x.view(), targets, ledger, Pairing::SegmentEnd)?;
            Ok(ridges.segments.scores(&q)?.into_values())
        })?;
    }
    let n = ledger.sources().len();
    timed("random", "none", &mut || {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        Ok(Array2::from_shape_fn((x.shape()[0], n), |_| {
            rng.random::<f64>()
        }))
    })?;
    Ok(out)
}

/// `train_set` with 10 % of its labels flipped (seeded), and which.
pub fn noisy_labels(train_set: &Dataset<f32>) -> Result<(Dataset<f32>, Vec<bool>)> {
    let n = train_set.len();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    let flipped = &idx[..n / 10];
    let new_labels: Vec<usize> = flipped
        .iter()
        .map(|&i| (train_set.labels()[i] + rng.random_range(1..10)) % 10)
        .collect();
    let noisy = train_set.with_labels(flipped, &new_labels)?;
    let mut is_flipped = vec![false; n];
    flipped.iter().for_each(|&i| is_flipped[i] = true);
    Ok((noisy, is_flipped))
}

/// Mislabel detection: 10 % of the labels flipped, retrained traced, every
/// lens's self-score as the ranking; ROC AUC per lens name.
pub fn mislabel(
    opts: &Opts,
    train_set: &Dataset<f32>,
    c: Cs,
    sketch_config: &SketchConfig,
) -> Result<BTreeMap<String, f64>> {
    let n = train_set.len();
    let (noisy, is_flipped) = noisy_labels(train_set)?;
    let mut net = mlp(0)?;
    let mut hook = OptimizerHook::new(SgdConfig::new(LR).build()?, &net.traceables())?;
    let all: Vec<usize> = (0..n).collect();
    train(&mut net, &noisy, &all, opts.epochs, 0, Some(&mut hook))?;
    let ledger = hook.finish()?;
    let ids: Vec<SourceId> = noisy.ids().iter().map(|&e| SourceId::Example(e)).collect();
    let (x, y) = (noisy.x(), Targets::Labels(noisy.labels()));
    let rq = Query::forward(&mut net, x.view())?;
    let gq = Query::gradients(&mut net, x.view(), y)?;
    let mut out = BTreeMap::new();
    let mut auc = |name: &str, s: ndarray::Array1<f64>| {
        out.insert(
            name.to_string(),
            roc_auc(s.as_slice().expect("contiguous"), &is_flipped).unwrap_or(f64::NAN),
        );
    };
    for (lens, name) in [
        (Lens::Influence, "influence"),
        (Lens::Share, "share"),
        (Lens::Cos, "cos"),
        (Lens::Margin, "margin"),
    ] {
        auc(name, ledger.lens(lens).self_scores(&rq, &ids)?);
    }
    auc(
        "loss/final",
        ledger.lens(Lens::Loss).self_scores(&gq, &ids)?,
    );
    for (pairing, name) in [
        (Pairing::SegmentEnd, "loss/epoch"),
        (Pairing::Midpoint, "loss/midpoint"),
    ] {
        let q = Query::paired(&mut net, x.view(), y, &ledger, pairing)?;
        auc(name, ledger.lens(Lens::Loss).self_scores(&q, &ids)?);
    }
    auc(
        "ridge",
        RidgeLens::fit(&ledger, c.exact)?.self_scores(&gq, &ids)?,
    );
    let sketch = LedgerSketch::build(&ledger, sketch_config)?;
    auc(
        "ridge/sketch",
        sketch.ridge(c.sketch)?.self_scores(&gq, &ids)?,
    );
    let q = Query::paired(&mut net, x.view(), y, &ledger, Pairing::SegmentEnd)?;
    let segments = SegmentRidge::fit(&ledger, c.segments)?;
    auc("ridge/segments", segments.self_scores(&q, &ids)?);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    auc("random", (0..n).map(|_| rng.random::<f64>()).collect());
    Ok(out)
}
