//! The linear datamodeling score (LDS) of every lens on Fashion-MNIST, on the
//! protocol of the training-data-attribution benchmarks (dattri's MLP setting):
//! 5,000 training and 500 test images, an MLP 784-128-128-10 trained with plain
//! SGD (lr 0.1, batch 64, drop-last, 20 epochs, a segment per epoch), the
//! correct-class margin `f(x) = log p_y − log(1 − p_y)` as the target, ground
//! truth from 50 random half-size subsets × 3 seeds, and mislabel detection
//! with 10 % of the labels flipped. Hyperparameters (the ridge lens's `c`) are
//! chosen on 20 held-out test points (t10k 500–519), never on the 500.
//!
//! Run: `cargo run --release --example fashion_lds` (needs the Debian package
//! `dataset-fashion-mnist`; `-- --quick` runs a reduced version, on synthetic
//! data when the package is absent). Writes `target/evaluation/fashion_lds.json`,
//! `fashion_ground_truth.json` (subsets and averaged margins) and
//! `fashion_scores.safetensors` (one `[500, 5000]` f32 matrix per lens, rows =
//! test points, columns = training examples, both in file order).

#[path = "common/fashion.rs"]
mod fashion;

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::{Array2, ArrayD};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use refinement_ledger::data::{Dataset, IdxSplit};
use refinement_ledger::metrics::{linear_datamodeling_score, mean_and_standard_error, roc_auc};
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::{Sgd, SgdConfig};
use refinement_ledger::query::{
    LedgerSketch, Pairing, RidgeLens, SegmentRidge, SketchConfig, SketchRidge, Targets,
};
use refinement_ledger::{
    Batch, Error, Ledger, Lens, Optimizer, OptimizerHook, Query, Result, Scorer, SourceId,
};
use serde_json::{Value, json};

/// The size of a run.
#[derive(Clone, Copy, Debug)]
pub struct Opts {
    pub quick: bool,
    pub n_train: usize,
    pub n_test: usize,
    pub n_valid: usize,
    pub subsets: usize,
    pub seeds: u64,
    pub epochs: u64,
}

impl Opts {
    /// The protocol.
    pub fn full() -> Self {
        Opts {
            quick: false,
            n_train: 5000,
            n_test: 500,
            n_valid: 20,
            subsets: 50,
            seeds: 3,
            epochs: 20,
        }
    }
    /// A reduced run (CI, and where Fashion-MNIST is absent).
    pub fn quick() -> Self {
        Opts {
            quick: true,
            n_train: 256,
            n_test: 24,
            n_valid: 6,
            subsets: 8,
            seeds: 1,
            epochs: 3,
        }
    }
}

const BATCH: usize = 64;
const LR: f64 = 0.1;
/// Candidates for the ridge lens's `c` (λ = c·trace(K)/N).
const RIDGE_GRID: [f64; 5] = [1e-3, 1e-2, 1e-1, 1.0, 10.0];
/// Dimensions per layer of the sketched ridge lens.
const SKETCH_DIMS: usize = 1024;

/// The protocol's network: 784-128-ReLU-128-ReLU-10.
fn mlp(seed: u64) -> Result<Sequential<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Ok(Sequential::new()
        .with(DenseConfig::new(784, 128).build("fc1", &mut rng)?)
        .with(Relu::new())
        .with(DenseConfig::new(128, 128).build("fc2", &mut rng)?)
        .with(Relu::new())
        .with(DenseConfig::new(128, 10).build("fc3", &mut rng)?))
}

/// Trains `net` on rows `rows` of `data` with the protocol's recipe (plain
/// SGD, shuffled each epoch from `seed`, drop-last); traced through `hook`
/// with a segment per epoch when given.
fn train(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    rows: &[usize],
    epochs: u64,
    seed: u64,
    mut hook: Option<&mut OptimizerHook<Sgd<f32>, f32>>,
) -> Result<()> {
    let mut sgd = SgdConfig::new(LR).build::<f32>()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order = rows.to_vec();
    for epoch in 0..epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks_exact(BATCH) {
            let labels: Vec<usize> = batch.iter().map(|&i| data.labels()[i]).collect();
            net.train_batch(data.batch_x(batch)?.view(), &labels)?;
            match hook.as_deref_mut() {
                Some(h) => {
                    let ids: Vec<_> = batch.iter().map(|&i| data.ids()[i]).collect();
                    h.step(&mut net.traceables_mut(), &Batch::new(&ids, &labels))?;
                }
                None => {
                    let mut params: Vec<_> = net
                        .traceables_mut()
                        .into_iter()
                        .flat_map(|l| l.params_mut())
                        .collect();
                    sgd.step(&mut params)?;
                }
            }
        }
        if let Some(h) = hook.as_deref_mut() {
            if epoch + 1 < epochs {
                h.close_segment()?;
            }
        }
    }
    Ok(())
}

/// The correct-class margin `log p_y − log(1 − p_y) = z_y − logsumexp_{k≠y} z_k` per row.
fn margins(net: &mut Sequential<f32>, x: &ArrayD<f32>, y: &[usize]) -> Result<Vec<f64>> {
    let z = net.logits(x.view())?;
    Ok(z.rows()
        .into_iter()
        .zip(y)
        .map(|(row, &c)| {
            let others: Vec<f64> = (0..row.len())
                .filter(|&k| k != c)
                .map(|k| f64::from(row[k]))
                .collect();
            let m = others.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + others.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            f64::from(row[c]) - lse
        })
        .collect())
}

fn accuracy(net: &mut Sequential<f32>, data: &Dataset<f32>) -> Result<f64> {
    let pred = net.predict(data.x().view())?;
    let right = pred
        .iter()
        .zip(data.labels())
        .filter(|(p, y)| p == y)
        .count();
    Ok(right as f64 / data.len() as f64)
}

/// The data: train, test and validation sets, and their source.
/// The protocol's data sets and where they came from.
struct Splits {
    train: Dataset<f32>,
    test: Dataset<f32>,
    valid: Dataset<f32>,
    source: &'static str,
}

fn data(opts: &Opts) -> Result<Option<Splits>> {
    let dir = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    let loaded = Dataset::<f32>::load_idx(dir, IdxSplit::Train)
        .and_then(|tr| Ok((tr, Dataset::<f32>::load_idx(dir, IdxSplit::Test)?)));
    let (train, t10k, source) = match loaded {
        Ok((tr, te)) => (tr, te, "Fashion-MNIST"),
        Err(e) if !opts.quick => {
            eprintln!(
                "Fashion-MNIST not found in {} ({e}).\nInstall it with `sudo apt-get install \
                 dataset-fashion-mnist`, or run the reduced synthetic version with `-- --quick`.",
                dir.display()
            );
            return Ok(None);
        }
        Err(_) => {
            let n = opts.n_test + opts.n_valid;
            let (tr, _) = fashion::data(opts.n_train, IdxSplit::Train)?;
            let (te, _) = fashion::data(n, IdxSplit::Test)?;
            (tr, te, "synthetic (Fashion-MNIST shape)")
        }
    };
    let first = |d: &Dataset<f32>, a: usize, b: usize| d.subset(&(a..b).collect::<Vec<_>>());
    Ok(Some(Splits {
        train: first(&train, 0, opts.n_train)?,
        test: first(&t10k, 0, opts.n_test)?,
        valid: first(&t10k, opts.n_test, opts.n_test + opts.n_valid)?,
        source,
    }))
}

/// One subset model's margins at the test and validation points, and its test accuracy.
type ModelRun = (Vec<f64>, Vec<f64>, f64);

/// The ground truth: per subset, the margins of test and validation points
/// averaged over the seeds' models, and the models' test accuracy.
struct Truth {
    subsets: Vec<Vec<usize>>,
    test: Vec<Vec<f64>>,
    valid: Vec<Vec<f64>>,
    accuracy: Vec<f64>,
}

fn ground_truth(
    opts: &Opts,
    train_set: &Dataset<f32>,
    test: &Dataset<f32>,
    valid: &Dataset<f32>,
) -> Result<Truth> {
    let mut rng = ChaCha8Rng::seed_from_u64(2024);
    let subsets: Vec<Vec<usize>> = (0..opts.subsets)
        .map(|_| {
            let mut all: Vec<usize> = (0..opts.n_train).collect();
            all.shuffle(&mut rng);
            let mut s = all[..opts.n_train / 2].to_vec();
            s.sort_unstable();
            s
        })
        .collect();
    let jobs: Vec<(usize, u64)> = (0..subsets.len())
        .flat_map(|s| (0..opts.seeds).map(move |r| (s, r)))
        .collect();
    let results: Vec<ModelRun> = jobs
        .par_iter()
        .map(|&(s, r)| {
            let seed = 100 + 1000 * s as u64 + r;
            let mut net = mlp(seed)?;
            train(&mut net, train_set, &subsets[s], opts.epochs, seed, None)?;
            Ok((
                margins(&mut net, test.x(), test.labels())?,
                margins(&mut net, valid.x(), valid.labels())?,
                accuracy(&mut net, test)?,
            ))
        })
        .collect::<Result<_>>()?;
    let average = |pick: &dyn Fn(&ModelRun) -> &Vec<f64>| -> Vec<Vec<f64>> {
        (0..subsets.len())
            .map(|s| {
                let runs: Vec<&Vec<f64>> = results
                    [s * opts.seeds as usize..(s + 1) * opts.seeds as usize]
                    .iter()
                    .map(pick)
                    .collect();
                (0..runs[0].len())
                    .map(|p| runs.iter().map(|r| r[p]).sum::<f64>() / runs.len() as f64)
                    .collect()
            })
            .collect()
    };
    Ok(Truth {
        test: average(&|r| &r.0),
        valid: average(&|r| &r.1),
        accuracy: results.iter().map(|r| r.2).collect(),
        subsets,
    })
}

/// Scores `[n_q, sources]` as rows over the training set in file order.
fn by_file_order(
    scores: &Array2<f64>,
    ledger: &Ledger<f32>,
    train: &Dataset<f32>,
) -> Vec<Vec<f64>> {
    let column: BTreeMap<SourceId, usize> = train
        .ids()
        .iter()
        .enumerate()
        .map(|(i, &e)| (SourceId::Example(e), i))
        .collect();
    scores
        .rows()
        .into_iter()
        .map(|row| {
            let mut out = vec![0.0; train.len()];
            for (s, meta) in ledger.sources().iter().enumerate() {
                if let Some(&i) = column.get(&meta.id) {
                    out[i] = row[s];
                }
            }
            out
        })
        .collect()
}

fn lds(scores: &[Vec<f64>], truth: &Truth, valid: bool) -> (f64, f64) {
    let measured = if valid { &truth.valid } else { &truth.test };
    let per_point = linear_datamodeling_score(scores, &truth.subsets, measured);
    let finite: Vec<f64> = per_point.into_iter().filter(|v| v.is_finite()).collect();
    mean_and_standard_error(&finite)
}

/// The grid value of `c` whose validation scores (`fit(c)`) have the best LDS.
fn choose_c(
    fit: &dyn Fn(f64) -> Result<Array2<f64>>,
    ledger: &Ledger<f32>,
    train: &Dataset<f32>,
    truth: &Truth,
) -> Result<f64> {
    let mut best = (f64::NEG_INFINITY, RIDGE_GRID[0]);
    for c in RIDGE_GRID {
        let (m, _) = lds(&by_file_order(&fit(c)?, ledger, train), truth, true);
        println!("  c = {c:e}: validation LDS {m:.3}");
        if m > best.0 {
            best = (m, c);
        }
    }
    Ok(best.1)
}

/// The three ridge lenses, each at its `c` chosen on the validation points.
struct Ridges<'a> {
    exact: RidgeLens<'a, f32>,
    sketch: SketchRidge<'a>,
    segments: SegmentRidge<'a, f32>,
}

/// `c` per ridge lens.
#[derive(Clone, Copy)]
struct Cs {
    exact: f64,
    sketch: f64,
    segments: f64,
}

/// One lens's results.
struct Scored {
    name: String,
    target: &'static str,
    scores: Vec<Vec<f64>>,
    seconds: f64,
}

/// Every lens's scores for the test points (file order), timed.
fn score_all(
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
            let scores = by_file_order(&scores, ledger, train_set);
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

/// Mislabel detection: 10 % of the labels flipped, retrained traced, every
/// lens's self-score as the ranking; ROC AUC per lens name.
fn mislabel(
    opts: &Opts,
    train_set: &Dataset<f32>,
    c: Cs,
    sketch_config: &SketchConfig,
) -> Result<BTreeMap<String, f64>> {
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

/// Runs the protocol; `None` when the data is missing (the message is printed).
pub fn run(opts: Opts, out_dir: &std::path::Path) -> Result<Option<Value>> {
    let Some(Splits {
        train: train_set,
        test,
        valid,
        source,
    }) = data(&opts)?
    else {
        return Ok(None);
    };
    println!(
        "data: {source}, {} train / {} test / {} validation",
        train_set.len(),
        test.len(),
        valid.len()
    );
    let t = Instant::now();
    let truth = ground_truth(&opts, &train_set, &test, &valid)?;
    let truth_seconds = t.elapsed().as_secs_f64();
    let (subset_acc, _) = mean_and_standard_error(&truth.accuracy);
    println!(
        "ground truth: {} models in {truth_seconds:.0} s, mean test accuracy {subset_acc:.3}",
        truth.accuracy.len()
    );

    let t = Instant::now();
    let mut net = mlp(0)?;
    let mut hook = OptimizerHook::new(SgdConfig::new(LR).build()?, &net.traceables())?;
    let all: Vec<usize> = (0..train_set.len()).collect();
    train(&mut net, &train_set, &all, opts.epochs, 0, Some(&mut hook))?;
    let ledger = hook.finish()?;
    let acc = accuracy(&mut net, &test)?;
    println!(
        "traced model: test accuracy {acc:.3} ({:.0} s)",
        t.elapsed().as_secs_f64()
    );

    // Ridge c for the exact and the sketched ridge lens, on the validation points.
    let sketch_config = SketchConfig::with_dims(SKETCH_DIMS);
    let sketch = LedgerSketch::build(&ledger, &sketch_config)?;
    let vq = Query::gradients(&mut net, valid.x().view(), Targets::Labels(valid.labels()))?;
    let t = Instant::now();
    let base = RidgeLens::fit(&ledger, RIDGE_GRID[0])?;
    let fit_seconds = t.elapsed().as_secs_f64();
    println!("exact ridge: K fitted in {fit_seconds:.1} s");
    let c_exact = choose_c(
        &|c| Ok(base.with_c(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    println!("sketched ridge:");
    let c_sketch = choose_c(
        &|c| Ok(sketch.ridge(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    let t = Instant::now();
    let base_segments = SegmentRidge::fit(&ledger, RIDGE_GRID[0])?;
    let segments_fit_seconds = t.elapsed().as_secs_f64();
    println!(
        "ridge per segment: {} systems fitted in {segments_fit_seconds:.1} s",
        ledger.n_segments()
    );
    let vq_paired = Query::paired(
        &mut net,
        valid.x().view(),
        Targets::Labels(valid.labels()),
        &ledger,
        Pairing::SegmentEnd,
    )?;
    let c_segments = choose_c(
        &|c| Ok(base_segments.with_c(c)?.scores(&vq_paired)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    let cs = Cs {
        exact: c_exact,
        sketch: c_sketch,
        segments: c_segments,
    };
    let t = Instant::now();
    let ridges = Ridges {
        exact: base.with_c(c_exact)?,
        sketch: sketch.ridge(c_sketch)?,
        segments: base_segments.with_c(c_segments)?,
    };
    drop((base, base_segments));
    let refit_seconds = t.elapsed().as_secs_f64();

    let scored = score_all(&mut net, &ledger, &ridges, &test, &train_set)?;
    let aucs = mislabel(&opts, &train_set, cs, &sketch_config)?;

    println!("\n| lens | query target | LDS | mislabel AUC | score s (all test points) |");
    println!("|---|---|---|---|---|");
    let mut lenses = Vec::new();
    for s in &scored {
        let (m, se) = lds(&s.scores, &truth, false);
        let auc = (s.target != "predicted label")
            .then(|| aucs.get(&s.name).copied())
            .flatten();
        let auc_text = auc.map_or("–".into(), |a| format!("{a:.4}"));
        println!(
            "| {} | {} | {m:.3} ± {se:.3} | {auc_text} | {:.2} |",
            s.name, s.target, s.seconds
        );
        lenses.push(
            json!({ "lens": s.name, "target": s.target, "lds_mean": m, "lds_se": se,
            "mislabel_auc": auc, "score_seconds": s.seconds }),
        );
    }
    save_scores(out_dir, &scored)?;
    write_json(
        &out_dir.join("fashion_ground_truth.json"),
        &json!({ "subsets": truth.subsets, "test_margins": truth.test,
                 "note": "test_margins[s][p]: f = log p_y − log(1 − p_y) of test point p, averaged over the models trained on subsets[s]" }),
    )?;
    Ok(Some(json!({
        "data": source, "quick": opts.quick, "train": train_set.len(), "test": test.len(),
        "subsets": opts.subsets, "seeds_per_subset": opts.seeds, "epochs": opts.epochs,
        "test_accuracy_full": acc, "test_accuracy_subset_mean": subset_acc,
        "ridge_c": c_exact, "sketch_ridge_c": c_sketch, "segment_ridge_c": c_segments,
        "sketch_dims": SKETCH_DIMS, "ridge_fit_seconds": fit_seconds,
        "segment_ridge_fit_seconds": segments_fit_seconds, "refit_at_chosen_c_seconds": refit_seconds,
        "ground_truth_seconds": truth_seconds,
        "lenses": lenses,
    })))
}

/// Every lens's score matrix, `[n_test, n_train]` f32, one tensor per lens and target.
fn save_scores(dir: &std::path::Path, scored: &[Scored]) -> Result<()> {
    let tensors: Vec<(String, Vec<u8>, Vec<usize>)> = scored
        .iter()
        .map(|s| {
            let bytes: Vec<u8> = s
                .scores
                .iter()
                .flatten()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect();
            (
                format!("{} ({})", s.name, s.target),
                bytes,
                vec![s.scores.len(), s.scores.first().map_or(0, Vec::len)],
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, b, shape)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                    .expect("bytes match the shape");
            (n.clone(), view)
        })
        .collect();
    let path = dir.join("fashion_scores.safetensors");
    safetensors::serialize_to_file(views, None, &path).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })
}

fn write_json(path: &std::path::Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("json values serialise");
    std::fs::write(path, text).map_err(|e| Error::Io {
        path: path.display().to_string(),
        source: e,
    })
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("evaluation");
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let t = Instant::now();
    let Some(out) = run(if quick { Opts::quick() } else { Opts::full() }, &dir)? else {
        std::process::exit(2);
    };
    let path = dir.join("fashion_lds.json");
    write_json(&path, &out)?;
    println!(
        "\nwrote {} in {:.0} s",
        path.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
