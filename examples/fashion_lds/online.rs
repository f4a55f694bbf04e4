//! `-- --online`: the online compact ledger against the exact ledger on the
//! same protocol. Two runs with the same seed train identically, one traced
//! exactly, one online (Kronecker projection, `Opts::online_dims` per layer,
//! 4,096 = 64 × 64 in the protocol; the last layer, 10 × 129, stays whole); each
//! linear lens is scored from both, and from a sketch of the exact ledger
//! with the same projection (online and offline sketches differ only by
//! rounding). Reported per lens: LDS, top-10 overlap with the exact lens,
//! mislabel AUC (10 % flipped, both runs repeated on the noisy labels), and
//! the bytes of each form.

use std::time::Instant;

use ndarray::Array2;
use refinement_ledger::data::Dataset;
use refinement_ledger::metrics::{roc_auc, top_k_overlap};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{LedgerSketch, Projection, RidgeLens, SketchConfig, Targets};
use refinement_ledger::{LayerSel, Ledger, Lens, OptimizerHook, Query, Result, Scorer, SourceId};
use serde_json::{Value, json};

use super::lenses::{choose_c, noisy_labels};
use super::{LR, Opts, Splits, data, ground_truth, lds, lds_of, mlp, train};

fn config(opts: &Opts) -> SketchConfig {
    SketchConfig::with_dims(opts.online_dims).projection(Projection::Kronecker)
}

/// The exact ledger and the online sketch of the same run on `data`, and the
/// (common) trained network.
fn twin(
    opts: &Opts,
    data: &Dataset<f32>,
) -> Result<(
    Ledger<f32>,
    LedgerSketch,
    refinement_ledger::nn::Sequential<f32>,
    f64,
)> {
    let all: Vec<usize> = (0..data.len()).collect();
    let mut net = mlp(0)?;
    let mut hook = OptimizerHook::new(SgdConfig::new(LR).build()?, &net.traceables())?;
    train(&mut net, data, &all, opts.epochs, 0, Some(&mut hook))?;
    let exact = hook.finish()?;
    let mut twin = mlp(0)?;
    let hook = OptimizerHook::new(SgdConfig::new(LR).build()?, &twin.traceables())?;
    let mut hook = hook.online(&config(opts))?;
    let t = Instant::now();
    train(&mut twin, data, &all, opts.epochs, 0, Some(&mut hook))?;
    let online_train_s = t.elapsed().as_secs_f64();
    let online = hook.finish_sketch()?;
    // Deterministic training: the two networks are the same.
    let (a, b) = (net.traceables(), twin.traceables());
    assert!(a.iter().zip(&b).all(|(x, y)| x.weight() == y.weight()));
    Ok((exact, online, net, online_train_s))
}

/// One lens's scores from each form, `[test points, training examples]` in file order.
struct Forms {
    lens: &'static str,
    exact: Array2<f64>,
    online: Array2<f64>,
    offline: Array2<f64>,
}

/// Runs the comparison; `None` when the data is missing.
pub fn run_online(opts: Opts, out_dir: &std::path::Path) -> Result<Option<Value>> {
    let Some(Splits {
        train: train_set,
        test,
        valid,
        source,
    }) = data(&opts)?
    else {
        return Ok(None);
    };
    let truth = ground_truth(&opts, &train_set, &test, &valid)?;
    let (ledger, online, mut net, online_train_s) = twin(&opts, &train_set)?;
    let offline = LedgerSketch::build(&ledger, &config(&opts))?;
    let order = |s: &Array2<f64>| lds::by_file_order(s, &ledger, train_set.ids());
    let to_matrix = |rows: Vec<Vec<f64>>| {
        let (r, c) = (rows.len(), rows.first().map_or(0, Vec::len));
        Array2::from_shape_vec((r, c), rows.concat()).expect("rows of equal length")
    };
    let labels = Targets::Labels(test.labels());
    let rq = Query::forward(&mut net, test.x().view())?;
    let gq = Query::gradients(&mut net, test.x().view(), labels)?;
    let mut forms = Vec::new();
    for (lens, name, q) in [
        (Lens::Influence, "influence", &rq),
        (Lens::Share, "share", &rq),
        (Lens::Loss, "loss/final", &gq),
    ] {
        forms.push(Forms {
            lens: name,
            exact: to_matrix(order(&ledger.scores(q, lens, LayerSel::All)?.into_values())),
            online: to_matrix(order(&online.scores(q, lens, LayerSel::All)?.into_values())),
            offline: to_matrix(order(
                &offline.scores(q, lens, LayerSel::All)?.into_values(),
            )),
        });
    }
    // Ridge: each form's c chosen on the validation points.
    let vq = Query::gradients(&mut net, valid.x().view(), Targets::Labels(valid.labels()))?;
    let base = RidgeLens::fit(&ledger, super::RIDGE_GRID[0])?;
    let c_exact = choose_c(
        &mut |c| Ok(base.with_c(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    let c_online = choose_c(
        &mut |c| Ok(online.ridge(c)?.scores(&vq)?.into_values()),
        &ledger,
        &train_set,
        &truth,
    )?;
    let t = Instant::now();
    let online_ridge = online.ridge(c_online)?;
    let ridge_fit_s = t.elapsed().as_secs_f64();
    forms.push(Forms {
        lens: "ridge",
        exact: to_matrix(order(&base.with_c(c_exact)?.scores(&gq)?.into_values())),
        online: to_matrix(order(&online_ridge.scores(&gq)?.into_values())),
        offline: to_matrix(order(&offline.ridge(c_online)?.scores(&gq)?.into_values())),
    });
    drop((base, online_ridge));
    let aucs = mislabel(&opts, &train_set, c_exact, c_online)?;

    let exact_bytes: usize = ledger.bytes_per_layer().iter().sum();
    let online_bytes: usize = online.bytes_per_layer().iter().sum();
    let estimate: usize = online.exact_bytes_per_layer().iter().sum();
    println!(
        "\nexact ledger {:.1} MB, online {:.1} MB ({:.2}× fewer bytes; dims {:?}); the online run's estimate of the exact size {:.1} MB",
        exact_bytes as f64 / 1e6,
        online_bytes as f64 / 1e6,
        exact_bytes as f64 / online_bytes as f64,
        online.dims(),
        estimate as f64 / 1e6
    );
    println!(
        "\n| lens | LDS exact | LDS online | LDS offline sketch | top-10 overlap online / offline | mislabel AUC exact / online |"
    );
    println!("|---|---|---|---|---|---|");
    let rows_of =
        |m: &Array2<f64>| -> Vec<Vec<f64>> { m.rows().into_iter().map(|r| r.to_vec()).collect() };
    let mut lenses = Vec::new();
    for f in &forms {
        let lds = |m: &Array2<f64>| lds_of(&rows_of(m), &truth, false);
        let (e, o, off) = (lds(&f.exact), lds(&f.online), lds(&f.offline));
        let overlap = |m: &Array2<f64>| top_k_overlap(&f.exact, m, 10).unwrap_or(f64::NAN);
        let auc = aucs.iter().find(|a| a.0 == f.lens).map(|a| (a.1, a.2));
        let auc_text = auc.map_or("–".into(), |(x, y)| format!("{x:.4} / {y:.4}"));
        println!(
            "| {} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:.3} / {:.3} | {auc_text} |",
            f.lens,
            e.0,
            e.1,
            o.0,
            o.1,
            off.0,
            off.1,
            overlap(&f.online),
            overlap(&f.offline)
        );
        lenses.push(json!({
            "lens": f.lens, "lds_exact": e.0, "lds_exact_se": e.1, "lds_online": o.0, "lds_online_se": o.1,
            "lds_offline": off.0, "top10_overlap_online": overlap(&f.online),
            "top10_overlap_offline": overlap(&f.offline),
            "mislabel_auc_exact": auc.map(|a| a.0), "mislabel_auc_online": auc.map(|a| a.1),
        }));
    }
    let out = json!({
        "data": source, "quick": opts.quick, "train": train_set.len(), "test": test.len(),
        "epochs": opts.epochs, "online_dims": online.dims(), "projection": "kronecker",
        "exact_bytes": exact_bytes, "online_bytes": online_bytes,
        "bytes_ratio": exact_bytes as f64 / online_bytes as f64,
        "online_exact_bytes_estimate": estimate,
        "online_train_seconds": online_train_s, "online_ridge_fit_seconds": ridge_fit_s,
        "ridge_c_exact": c_exact, "ridge_c_online": c_online,
        "online_balance_error": online.balance_error(),
        "lenses": lenses,
    });
    super::write_json(&out_dir.join("fashion_online.json"), &out)?;
    Ok(Some(out))
}

/// Mislabel AUC of the loss lens and the ridge lens (at the chosen `c`s),
/// exact and online, on the noisy-label twin runs: `(lens, exact, online)`.
fn mislabel(
    opts: &Opts,
    train_set: &Dataset<f32>,
    c_exact: f64,
    c_online: f64,
) -> Result<Vec<(&'static str, f64, f64)>> {
    let (noisy, is_flipped) = noisy_labels(train_set)?;
    let (ledger, online, mut net, _) = twin(opts, &noisy)?;
    let ids: Vec<SourceId> = noisy.ids().iter().map(|&e| SourceId::Example(e)).collect();
    let gq = Query::gradients(&mut net, noisy.x().view(), Targets::Labels(noisy.labels()))?;
    let auc = |s: ndarray::Array1<f64>| {
        roc_auc(s.as_slice().expect("contiguous"), &is_flipped).unwrap_or(f64::NAN)
    };
    let loss = (
        auc(ledger.lens(Lens::Loss).self_scores(&gq, &ids)?),
        auc(online.lens(Lens::Loss).self_scores(&gq, &ids)?),
    );
    let ridge = (
        auc(RidgeLens::fit(&ledger, c_exact)?.self_scores(&gq, &ids)?),
        auc(online.ridge(c_online)?.self_scores(&gq, &ids)?),
    );
    Ok(vec![
        ("loss/final", loss.0, loss.1),
        ("ridge", ridge.0, ridge.1),
    ])
}
