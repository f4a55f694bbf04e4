//! Evidence for which lens answers which question, on the digits (MLP and CNN):
//! (a) class agreement@10, (b) mislabel detection by self-score, (c) deletion
//! faithfulness by retraining without the top-20 proponents, (d) query time,
//! (e) the linear datamodeling score against models retrained on random halves
//! of the training set (the correct-class margin as the target).
//!
//! Run: `cargo run --release --example evaluate` (`-- --quick` for the reduced CI run).
//! Writes `target/evaluation/digits.json`.

#[path = "../common/mod.rs"]
mod common;
mod table;

use std::collections::BTreeMap;
use std::time::Instant;

use common::{
    Model, Recipe, accuracy, gradient_query, lds, probabilities, representation_query, train_bare,
    train_traced,
};
use ndarray::Array2;
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use refinement_ledger::data::Dataset;
use refinement_ledger::metrics::{
    class_agreement, mean_and_standard_error, recall_at_fraction, roc_auc,
};
use refinement_ledger::nn::Sequential;
use refinement_ledger::query::{Pairing, RidgeLens, SegmentRidge, Targets};
use refinement_ledger::{
    Influence, LayerSel, Ledger, Lens, Query, Result, Scorer, Scores, SourceId,
};
use serde_json::{Value, json};
use table::{Row, print_table, to_json};

/// The size of an evaluation run.
#[derive(Clone, Copy)]
pub struct Opts {
    /// Whether this is a reduced run (recorded in the JSON).
    pub quick: bool,
    /// Test points the lenses are evaluated on.
    pub points: usize,
    /// Test points of the deletion test (each retrains once per lens).
    pub deletion_points: usize,
    /// Validation points choosing the ridge's regulariser.
    pub validation_points: usize,
    /// Training epochs.
    pub epochs: u64,
    /// Training examples removed per deletion.
    pub removed: usize,
    /// Random half-size subsets the LDS ground truth is trained on.
    pub lds_subsets: usize,
    /// Models (seeds) per subset.
    pub lds_seeds: usize,
}

impl Opts {
    /// The reduced run of `--quick`.
    pub fn quick() -> Self {
        Opts {
            quick: true,
            points: 20,
            deletion_points: 2,
            validation_points: 2,
            epochs: 3,
            removed: 20,
            lds_subsets: 6,
            lds_seeds: 1,
        }
    }
    /// The full run the README's tables come from.
    pub fn full() -> Self {
        Opts {
            quick: false,
            points: 200,
            deletion_points: 30,
            validation_points: 10,
            epochs: 30,
            removed: 20,
            lds_subsets: 50,
            lds_seeds: 3,
        }
    }
}

/// Every lens's proponent scores `[n_q, n_sources]` for queries `x` with targets `targets`, timed.
fn all_lenses<'a>(
    net: &mut Sequential<f32>,
    ledger: &'a Ledger<f32>,
    x: &ndarray::ArrayD<f32>,
    targets: &[usize],
    ridge: &RidgeLens<'_>,
    segments: &SegmentRidge<'_>,
) -> Result<Vec<(String, Scores<'a>, f64)>> {
    let mut out = Vec::new();
    let q = representation_query(net, x)?;
    let n_l = ledger.layers().len();
    let mut timed = |name: String, f: &mut dyn FnMut() -> Result<Array2<f64>>| -> Result<()> {
        let t = Instant::now();
        let s = f()?;
        let secs = t.elapsed().as_secs_f64();
        out.push((name, Scores::from_values(s, ledger.sources())?, secs));
        Ok(())
    };
    for (lens, tag) in [(Lens::Influence, "influence"), (Lens::Cos, "cos")] {
        for l in 0..n_l {
            timed(format!("{tag}/{}", ledger.layers()[l].id), &mut || {
                Ok(ledger.scores(&q, lens, LayerSel::Layer(l))?.into_values())
            })?;
        }
        timed(format!("{tag}/all"), &mut || {
            Ok(ledger.scores(&q, lens, LayerSel::All)?.into_values())
        })?;
    }
    timed("share/all".into(), &mut || {
        Ok(ledger.scores(&q, Lens::Share, LayerSel::All)?.into_values())
    })?;
    timed("margin".into(), &mut || {
        Ok(ledger
            .scores(&q, Lens::Margin, LayerSel::All)?
            .into_values())
    })?;
    let gq = gradient_query(net, x, targets)?;
    timed("loss/final".into(), &mut || {
        Ok(ledger.scores(&gq, Lens::Loss, LayerSel::All)?.into_values())
    })?;
    for (pairing, name) in [
        (Pairing::SegmentEnd, "loss/epoch"),
        (Pairing::Midpoint, "loss/midpoint"),
    ] {
        timed(name.into(), &mut || {
            let paired = Query::paired(net, x.view(), Targets::Labels(targets), ledger, pairing)?;
            Ok(ledger
                .scores(&paired, Lens::Loss, LayerSel::All)?
                .into_values())
        })?;
    }
    timed("ridge".into(), &mut || Ok(ridge.scores(&gq)?.into_values()))?;
    timed("ridge/segments".into(), &mut || {
        let paired = Query::paired(
            net,
            x.view(),
            Targets::Labels(targets),
            ledger,
            Pairing::SegmentEnd,
        )?;
        Ok(segments.scores(&paired)?.into_values())
    })?;
    let n_src = ledger.sources().len();
    timed("random".into(), &mut || {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        Ok(Array2::from_shape_fn((x.shape()[0], n_src), |_| {
            rng.random::<f64>()
        }))
    })?;
    Ok(out)
}

/// The top `k` proponents of query `q` (ties broken by source id).
fn top(scores: &Scores<'_>, q: usize, k: usize) -> Result<Vec<Influence>> {
    Ok(scores.top_k(q, k)?.proponents)
}

/// Logit margin `z[ŷ] − max_{c≠ŷ} z[c]` and probability of `ŷ` for one input.
fn margin_and_prob(
    net: &mut Sequential<f32>,
    x: &ndarray::ArrayD<f32>,
    class: usize,
) -> Result<(f64, f64)> {
    let logits = net.logits(x.view())?;
    let row = logits.row(0);
    let other = row
        .iter()
        .enumerate()
        .filter(|&(c, _)| c != class)
        .fold(f32::NEG_INFINITY, |m, (_, &v)| m.max(v));
    let p = probabilities(net, x)?[[0, class]];
    Ok((f64::from(row[class] - other), f64::from(p)))
}

/// Retrains without `removed` training rows and returns the drop in margin and probability at `x`.
fn deletion_drop(
    model: Model,
    train: &Dataset<f32>,
    recipe: &Recipe,
    x: &ndarray::ArrayD<f32>,
    class: usize,
    base: (f64, f64),
    removed: &[usize],
) -> Result<(f64, f64)> {
    let mut net = model.build(1)?;
    train_bare(&mut net, train, recipe, removed)?;
    let (m, p) = margin_and_prob(&mut net, x, class)?;
    Ok((base.0 - m, base.1 - p))
}

/// The training rows of the example sources among `sources`.
fn rows_of(train: &Dataset<f32>, sources: &[Influence]) -> Vec<usize> {
    sources
        .iter()
        .filter_map(|inf| match inf.source {
            SourceId::Example(e) => train.ids().iter().position(|&id| id == e),
            _ => None,
        })
        .collect()
}

/// Candidate `c` for the ridge lens (λ = c·trace(K)/N), chosen on validation points.
const RIDGE_GRID: [f64; 6] = [1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0];

const DELETION_LENSES: [&str; 8] = [
    "influence/all",
    "cos/all",
    "margin",
    "loss/final",
    "loss/epoch",
    "loss/midpoint",
    "ridge",
    "ridge/segments",
];

fn evaluate(model: Model, opts: Opts) -> Result<(BTreeMap<String, Row>, Value)> {
    let digits = Dataset::<f32>::digits()?;
    let (train, test) = digits.stratified_split(0.2, 0)?;
    let (train, test) = (model.shape(&train)?, model.shape(&test)?);
    let recipe = Recipe::for_model(model, opts.epochs);
    let mut net = model.build(1)?;
    let ledger = train_traced(&mut net, &train, &recipe, opts.quick, model.name())?;
    let acc = accuracy(&mut net, &test)?;
    println!(
        "\n== {} (test accuracy {acc:.4}, {} epochs) ==",
        model.name(),
        opts.epochs
    );

    // Evaluated points and held-out validation points (for the ridge lens's c), disjoint.
    let mut order: Vec<usize> = (0..test.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(3));
    let eval = test.subset(&order[..opts.points])?;
    let valid = test.subset(&order[opts.points..opts.points + opts.validation_points])?;
    let pred = net.predict(eval.x().view())?;

    // Choose c on the validation points by the deletion margin drop.
    let t_fit = Instant::now();
    let base_ridge = RidgeLens::fit(&ledger, 1e-3)?;
    let fit_seconds = t_fit.elapsed().as_secs_f64();
    let vpred = net.predict(valid.x().view())?;
    let vq = gradient_query(&mut net, valid.x(), &vpred)?;
    let mut best = (f64::NEG_INFINITY, 1e-3);
    for c in RIDGE_GRID {
        let ridge = base_ridge.with_c(c)?;
        let alpha = ridge.scores(&vq)?;
        let drops: Vec<f64> = (0..valid.len())
            .into_par_iter()
            .map(|i| -> Result<f64> {
                let xi = valid.batch_x(&[i])?;
                let mut full = model.build(1)?;
                train_bare(&mut full, &train, &recipe, &[])?;
                let base = margin_and_prob(&mut full, &xi, vpred[i])?;
                let removed = rows_of(&train, &top(&alpha, i, opts.removed)?);
                Ok(deletion_drop(model, &train, &recipe, &xi, vpred[i], base, &removed)?.0)
            })
            .collect::<Result<_>>()?;
        let (mean, _) = mean_and_standard_error(&drops);
        println!("  ridge c = {c:e}: validation margin drop {mean:.3}");
        if mean > best.0 {
            best = (mean, c);
        }
    }
    let ridge = base_ridge.with_c(best.1)?;
    println!(
        "  chosen c = {:e} (K factored once in {fit_seconds:.2} s for {} sources)",
        best.1,
        ledger.sources().len()
    );

    // (a) agreement and (d) time.
    // The ridge lens per segment, at the ridge lens's c.
    let segments = SegmentRidge::fit(&ledger, best.1)?;
    let lenses = all_lenses(&mut net, &ledger, eval.x(), &pred, &ridge, &segments)?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (name, scores, secs) in &lenses {
        let t = Instant::now();
        let agreement: Vec<f64> = (0..eval.len())
            .map(|q| {
                let labels: Vec<Option<usize>> =
                    top(scores, q, 10)?.iter().map(|inf| inf.label).collect();
                Ok(class_agreement(&labels, pred[q]))
            })
            .collect::<Result<_>>()?;
        let rank_secs = t.elapsed().as_secs_f64();
        let row = rows.entry(name.clone()).or_default();
        row.agreement = Some(mean_and_standard_error(&agreement).0);
        row.seconds = Some(secs + rank_secs);
    }

    // (e) LDS: models trained on random halves, the margin at the true label.
    let subsets = lds::subsets(train.len(), train.len() / 2, opts.lds_subsets, 2024);
    let (truth, _) = lds::ground_truth(subsets.len(), opts.lds_seeds, |s, r| {
        let seed = 100 + 1000 * s as u64 + r;
        let mut keep = vec![false; train.len()];
        subsets[s].iter().for_each(|&i| keep[i] = true);
        let removed: Vec<usize> = (0..train.len()).filter(|&i| !keep[i]).collect();
        let mut net = model.build(seed)?;
        train_bare(&mut net, &train, &Recipe { seed, ..recipe }, &removed)?;
        Ok((lds::margins(&mut net, eval.x(), eval.labels())?, ()))
    })?;
    for (name, scores, _) in &lenses {
        let by_file = lds::by_file_order(scores, &ledger, train.ids());
        rows.entry(name.clone()).or_default().lds = Some(lds::lds(&by_file, &subsets, &truth));
    }

    // (b) mislabel detection: flip 10% of training labels, retrain traced, rank by self-score.
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let mut idx: Vec<usize> = (0..train.len()).collect();
    idx.shuffle(&mut rng);
    let flipped: Vec<usize> = idx[..train.len() / 10].to_vec();
    let new_labels: Vec<usize> = flipped
        .iter()
        .map(|&i| (train.labels()[i] + rng.random_range(1..10)) % 10)
        .collect();
    let noisy = train.with_labels(&flipped, &new_labels)?;
    let mut noisy_net = model.build(1)?;
    let noisy_ledger = train_traced(&mut noisy_net, &noisy, &recipe, true, "noisy")?;
    let is_flipped: Vec<bool> = {
        let mut v = vec![false; train.len()];
        flipped.iter().for_each(|&i| v[i] = true);
        v
    };
    let ids: Vec<SourceId> = noisy.ids().iter().map(|&e| SourceId::Example(e)).collect();
    let rq = representation_query(&mut noisy_net, noisy.x())?;
    let gq = gradient_query(&mut noisy_net, noisy.x(), noisy.labels())?;
    let mut self_scores: Vec<(String, Vec<f64>)> = Vec::new();
    for (lens, name) in [
        (Lens::Influence, "influence/all"),
        (Lens::Share, "share/all"),
        (Lens::Cos, "cos/all"),
    ] {
        self_scores.push((
            name.into(),
            noisy_ledger.self_scores(&rq, &ids, lens)?.to_vec(),
        ));
    }
    self_scores.push((
        "margin".into(),
        noisy_ledger.self_scores(&rq, &ids, Lens::Margin)?.to_vec(),
    ));
    self_scores.push((
        "loss/final".into(),
        noisy_ledger.self_scores(&gq, &ids, Lens::Loss)?.to_vec(),
    ));
    for (pairing, name) in [
        (Pairing::SegmentEnd, "loss/epoch"),
        (Pairing::Midpoint, "loss/midpoint"),
    ] {
        let paired = Query::paired(
            &mut noisy_net,
            noisy.x().view(),
            Targets::Labels(noisy.labels()),
            &noisy_ledger,
            pairing,
        )?;
        self_scores.push((
            name.into(),
            noisy_ledger
                .self_scores(&paired, &ids, Lens::Loss)?
                .to_vec(),
        ));
    }
    let noisy_ridge = RidgeLens::fit(&noisy_ledger, best.1)?;
    self_scores.push(("ridge".into(), noisy_ridge.self_scores(&gq, &ids)?.to_vec()));
    let paired = Query::paired(
        &mut noisy_net,
        noisy.x().view(),
        Targets::Labels(noisy.labels()),
        &noisy_ledger,
        Pairing::SegmentEnd,
    )?;
    let noisy_segments = SegmentRidge::fit(&noisy_ledger, best.1)?;
    self_scores.push((
        "ridge/segments".into(),
        noisy_segments.self_scores(&paired, &ids)?.to_vec(),
    ));
    self_scores.push((
        "random".into(),
        (0..train.len()).map(|_| rng.random::<f64>()).collect(),
    ));
    for (name, s) in &self_scores {
        let row = rows.entry(name.clone()).or_default();
        row.auc = roc_auc(s, &is_flipped);
        row.recall = Some(
            [0.05, 0.1, 0.2].map(|f| recall_at_fraction(s, &is_flipped, f).unwrap_or(f64::NAN)),
        );
    }

    // (c) deletion faithfulness.
    let score_of = |name: &str| lenses.iter().find(|(n, _, _)| n == name).map(|(_, s, _)| s);
    let points: Vec<usize> = (0..opts.deletion_points).collect();
    let bases: Vec<(f64, f64)> = points
        .par_iter()
        .map(|&q| {
            let mut full = model.build(1)?;
            train_bare(&mut full, &train, &recipe, &[])?;
            margin_and_prob(&mut full, &eval.batch_x(&[q])?, pred[q])
        })
        .collect::<Result<_>>()?;
    let mut jobs: Vec<(String, usize, Vec<usize>)> = Vec::new();
    for name in DELETION_LENSES {
        let s = score_of(name).expect("lens computed");
        for &q in &points {
            jobs.push((name.into(), q, rows_of(&train, &top(s, q, opts.removed)?)));
        }
    }
    let mut rrng = ChaCha8Rng::seed_from_u64(23);
    for &q in &points {
        for _ in 0..3 {
            let mut all: Vec<usize> = (0..train.len()).collect();
            all.shuffle(&mut rrng);
            jobs.push(("random".into(), q, all[..opts.removed].to_vec()));
        }
    }
    let t = Instant::now();
    let drops: Vec<(f64, f64)> = jobs
        .par_iter()
        .map(|(_, q, removed)| {
            deletion_drop(
                model,
                &train,
                &recipe,
                &eval.batch_x(&[*q])?,
                pred[*q],
                bases[*q],
                removed,
            )
        })
        .collect::<Result<_>>()?;
    println!(
        "  {} deletion retrains in {:.1} s",
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
    let mut by_lens: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for ((name, _, _), (m, p)) in jobs.iter().zip(drops) {
        let e = by_lens.entry(name.clone()).or_default();
        e.0.push(m);
        e.1.push(p);
    }
    for (name, (m, p)) in by_lens {
        let row = rows.entry(name).or_default();
        row.margin_drop = Some(mean_and_standard_error(&m));
        row.prob_drop = Some(mean_and_standard_error(&p));
    }
    let meta = json!({ "test_accuracy": acc, "epochs": opts.epochs, "points": opts.points,
        "deletion_points": opts.deletion_points, "removed": opts.removed, "ridge_c": best.1,
        "ridge_fit_seconds": fit_seconds, "sources": ledger.sources().len() });
    Ok((rows, meta))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let out = run(if quick { Opts::quick() } else { Opts::full() })?;
    let dir = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("evaluation");
    std::fs::create_dir_all(&dir).map_err(|e| refinement_ledger::Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let path = dir.join("digits.json");
    let text = serde_json::to_string_pretty(&out).expect("json values serialise");
    std::fs::write(&path, text).map_err(|e| refinement_ledger::Error::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Evaluates every lens on both networks, prints the tables and returns the
/// results as JSON.
pub fn run(opts: Opts) -> Result<Value> {
    let (mlp_rows, mlp_meta) = evaluate(Model::Mlp, opts)?;
    print_table(Model::Mlp, &mlp_rows);
    let (cnn_rows, cnn_meta) = evaluate(Model::Cnn, opts)?;
    print_table(Model::Cnn, &cnn_rows);
    let mut out = to_json(&mlp_rows, mlp_meta);
    out["cnn"] = to_json(&cnn_rows, cnn_meta);
    out["quick"] = json!(opts.quick);
    Ok(out)
}
