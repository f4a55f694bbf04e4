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
//! data when the package is absent; `-- --online` compares the online compact
//! ledger with the exact one instead, writing `fashion_online.json`). Writes `target/evaluation/fashion_lds.json`,
//! `fashion_ground_truth.json` (subsets and averaged margins) and
//! `fashion_scores.safetensors` (one `[500, 5000]` f32 matrix per lens, rows =
//! test points, columns = training examples, both in file order).

#[path = "../common/fashion.rs"]
mod fashion;
#[path = "../common/lds.rs"]
mod lds;
mod lenses;
pub mod online;

use lenses::{Cs, Ridges, Scored, choose_c, mislabel, score_all};

use std::time::Instant;

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use refinement_ledger::data::{Dataset, IdxSplit};
use refinement_ledger::metrics::mean_and_standard_error;
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::{Sgd, SgdConfig};
use refinement_ledger::query::{
    LedgerSketch, Pairing, RidgeLens, SegmentRidge, SketchConfig, Targets,
};
use refinement_ledger::{Batch, Error, Optimizer, OptimizerHook, Query, Result, Scorer};
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
    /// Dimensions per layer of the online ledger (`--online`).
    pub online_dims: usize,
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
            online_dims: 4096,
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
            online_dims: 256,
        }
    }
}

const BATCH: usize = 64;
const LR: f64 = 0.1;
/// Candidates for the ridge lens's `c` (λ = c·trace(K)/N).
const RIDGE_GRID: [f64; 6] = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0];
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

fn accuracy(net: &mut Sequential<f32>, data: &Dataset<f32>) -> Result<f64> {
    let pred = net.predict(data.x().view())?;
    let right = pred
        .iter()
        .zip(data.labels())
        .filter(|(p, y)| p == y)
        .count();
    Ok(right as f64 / data.len() as f64)
}

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
    let subsets = lds::subsets(opts.n_train, opts.n_train / 2, opts.subsets, 2024);
    let seeds = opts.seeds as usize;
    // One run's outputs: test margins, then validation margins (split below).
    let (both, accuracy) = lds::ground_truth(subsets.len(), seeds, |s, r| {
        let seed = 100 + 1000 * s as u64 + r;
        let mut net = mlp(seed)?;
        train(&mut net, train_set, &subsets[s], opts.epochs, seed, None)?;
        let mut out = lds::margins(&mut net, test.x(), test.labels())?;
        out.extend(lds::margins(&mut net, valid.x(), valid.labels())?);
        Ok((out, accuracy(&mut net, test)?))
    })?;
    let split = |v: &Vec<f64>, valid: bool| -> Vec<f64> {
        let (t, va) = v.split_at(test.len());
        if valid { va.to_vec() } else { t.to_vec() }
    };
    Ok(Truth {
        test: both.iter().map(|v| split(v, false)).collect(),
        valid: both.iter().map(|v| split(v, true)).collect(),
        accuracy,
        subsets,
    })
}

fn lds_of(scores: &[Vec<f64>], truth: &Truth, valid: bool) -> (f64, f64) {
    let measured = if valid { &truth.valid } else { &truth.test };
    lds::lds(scores, &truth.subsets, measured)
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
        &mut |c| Ok(base.with_c(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    println!("sketched ridge:");
    let c_sketch = choose_c(
        &mut |c| Ok(sketch.ridge(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    let t = Instant::now();
    let mut segments = SegmentRidge::fit(&ledger, RIDGE_GRID[0])?;
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
        &mut |c| {
            segments.set_c(c)?;
            Ok(segments.scores(&vq_paired)?.into_values())
        },
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
        segments: {
            segments.set_c(c_segments)?;
            segments
        },
    };
    drop(base);
    let refit_seconds = t.elapsed().as_secs_f64();

    let scored = score_all(&mut net, &ledger, &ridges, &test, &train_set)?;
    // The mislabel run fits its own: one set of Gram matrices at a time.
    drop(ridges);
    let aucs = mislabel(&opts, &train_set, cs, &sketch_config)?;

    println!("\n| lens | query target | LDS | mislabel AUC | score s (all test points) |");
    println!("|---|---|---|---|---|");
    let mut lenses = Vec::new();
    for s in &scored {
        let (m, se) = lds_of(&s.scores, &truth, false);
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
    let opts = if quick { Opts::quick() } else { Opts::full() };
    if std::env::args().any(|a| a == "--online") {
        if online::run_online(opts, &dir)?.is_none() {
            std::process::exit(2);
        }
        println!(
            "\nwrote {} in {:.0} s",
            dir.join("fashion_online.json").display(),
            t.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let Some(out) = run(opts, &dir)? else {
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
