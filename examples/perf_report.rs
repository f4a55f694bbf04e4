//! Regenerates the README's Performance table: tracing overhead (training step
//! with `OptimizerHook` ÷ bare optimizer), query time beside the machine's bound,
//! ledger bytes, peak memory; then the online compact scenarios (the
//! 1.06M-parameter CNN traced online, online MLP queries, the growth table).
//! Fashion-MNIST when installed (Debian package `dataset-fashion-mnist`), else
//! seeded synthetic data of the same shape. Writes `target/perf/report.json`.
//!
//! Run: `cargo run --release --example perf_report` (`-- --quick` for a short run).

#[path = "common/fashion.rs"]
mod fashion;
#[path = "common/online_scale.rs"]
mod online_scale;

use std::path::Path;
use std::time::Instant;

use fashion::{accuracy, cnn, data, gemm_s, mlp, peak_rss_bytes, step_times, stream_read_s};
use online_scale::queries;
use refinement_ledger::data::{Dataset, IdxSplit};
use refinement_ledger::metrics::top_k_overlap;
use refinement_ledger::nn::Sequential;
use refinement_ledger::query::{LedgerSketch, Projection, RidgeLens, SketchConfig};
use refinement_ledger::{LayerSel, Ledger, Lens, Query, Result, Scorer, Scores};
use serde_json::json;

/// Mean fraction of the exact top 10 (highest scores) that the approximate top 10 recovers.
fn top10_overlap(exact: &Scores<'_>, approx: &Scores<'_>) -> f64 {
    top_k_overlap(exact.values(), approx.values(), 10).unwrap_or(f64::NAN)
}

/// Trains `net` with the hook for `epochs` over `data` (SGD, momentum 0.9,
/// batch 64), exactly.
fn train_traced(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    epochs: u64,
) -> Result<Ledger<f32>> {
    match online_scale::trace_run(net, data, epochs, None, false)? {
        online_scale::Traced::Exact(ledger) => Ok(ledger),
        online_scale::Traced::Online(_) => unreachable!("traced exactly"),
    }
}

/// The scenario: both models traced for `epochs` over `train`, then 100
/// queries, exact and from the 4×-smaller sketch; the ridge lens at full N from
/// the sketch. Returns the JSON record and the table rows.
fn scenario(train: &Dataset<f32>, test: &Dataset<f32>, epochs: u64) -> Result<serde_json::Value> {
    type Build = fn(u64) -> Result<Sequential<f32>>;
    let models: [(&str, Build, bool); 2] = [("mlp", mlp, false), ("cnn", cnn, true)];
    let mut out = serde_json::Map::new();
    let q_idx: Vec<usize> = (0..100.min(test.len())).collect();
    for (name, build, image) in models {
        let (tr, te) = if image {
            (train.reshaped(&[1, 28, 28])?, test.reshaped(&[1, 28, 28])?)
        } else {
            (train.clone(), test.clone())
        };
        let mut net = build(7)?;
        let t = Instant::now();
        let ledger = train_traced(&mut net, &tr, epochs)?;
        let train_s = t.elapsed().as_secs_f64();
        let acc = accuracy(&mut net, &te)?;
        let (q, g) = queries(&mut net, &te.subset(&q_idx)?)?;
        let t = Instant::now();
        let top = ledger.top_k_influences(&q, Lens::Influence, 10)?;
        let exact_top_s = t.elapsed().as_secs_f64();
        let exact_inf = ledger
            .scores(&q, Lens::Influence, LayerSel::All)?
            .into_values();
        let t = Instant::now();
        let exact_loss = ledger.scores(&g, Lens::Loss, LayerSel::All)?.into_values();
        let exact_loss_s = t.elapsed().as_secs_f64();
        // Compact mode as a ledger too large for memory would use it: saved,
        // memory-mapped, sketched; the shortlist re-scored from the map.
        let path = Path::new("target/perf").join(format!("{name}.ledger"));
        let t = Instant::now();
        ledger.save(&path)?;
        let save_s = t.elapsed().as_secs_f64();
        let exact_bytes: usize = ledger.bytes_per_layer().iter().sum();
        let ledger_bytes = ledger.bytes_per_layer();
        let residual_fraction = ledger.residual_fraction();
        drop(ledger);
        let ledger = Ledger::<f32>::load(&path)?;
        let exact_inf = Scores::from_values(exact_inf, ledger.sources())?;
        let exact_loss = Scores::from_values(exact_loss, ledger.sources())?;
        let t = Instant::now();
        let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_ratio(4.0))?;
        let sketch_build_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let reranked = sketch.scores(&q, Lens::Influence, LayerSel::All)?.rerank(
            &ledger.lens(Lens::Influence),
            &q,
            10,
            100,
        )?;
        let rerank_s = t.elapsed().as_secs_f64();
        let rerank_overlap = reranked
            .iter()
            .zip(&top)
            .map(|(r, e)| {
                r.proponents
                    .iter()
                    .filter(|i| e.combined.proponents.iter().any(|j| j.source == i.source))
                    .count()
            })
            .sum::<usize>() as f64
            / (10 * reranked.len()) as f64;
        let t = Instant::now();
        let approx_inf = sketch.scores(&q, Lens::Influence, LayerSel::All)?;
        let sketch_query_s = t.elapsed().as_secs_f64();
        let approx_loss = sketch.scores(&g, Lens::Loss, LayerSel::All)?;
        let sketch_bytes: usize = sketch.bytes_per_layer().iter().sum();
        let mut rec = json!({
            "train_s": train_s, "test_accuracy": acc, "sources": ledger.sources().len(),
            "ledger_bytes_per_layer": ledger_bytes, "save_s": save_s,
            "residual_fraction": residual_fraction,
            "exact_top10_100_queries_s": exact_top_s, "exact_loss_100_queries_s": exact_loss_s,
            "first_query_top3": top[0].combined.proponents.iter().take(3).map(|i| i.source.to_string()).collect::<Vec<_>>(),
            "sketch": {
                "dims": sketch.dims(), "bytes_per_layer": sketch.bytes_per_layer(),
                "ratio": exact_bytes as f64 / sketch_bytes as f64,
                "build_s": sketch_build_s, "influence_100_queries_s": sketch_query_s,
                "balance_error": sketch.balance_error(),
                "top10_overlap_influence": top10_overlap(&exact_inf, &approx_inf),
                "top10_overlap_loss": top10_overlap(&exact_loss, &approx_loss),
                "reranked_shortlist": 100, "reranked_100_queries_s": rerank_s,
                "top10_overlap_influence_reranked": rerank_overlap,
            },
        });
        if name == "mlp" {
            // The projection, chosen at equal bytes (1,024 dims per layer):
            // agreement with the exact top 10 (the step costs are in the
            // online scenario).
            let mut choice = serde_json::Map::new();
            for (label, projection) in [
                ("tensor", Projection::Tensor),
                ("kronecker", Projection::Kronecker),
            ] {
                let config = SketchConfig::with_dims(1024).projection(projection);
                let s = LedgerSketch::build(&ledger, &config)?;
                choice.insert(label.into(), json!({
                    "dims": s.dims(),
                    "top10_overlap_influence": top10_overlap(&exact_inf, &s.scores(&q, Lens::Influence, LayerSel::All)?),
                    "top10_overlap_loss": top10_overlap(&exact_loss, &s.scores(&g, Lens::Loss, LayerSel::All)?),
                }));
            }
            rec["projection_at_1024_dims"] = choice.into();
        }
        drop(ledger);
        std::fs::remove_file(&path).map_err(|e| refinement_ledger::Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if name == "mlp" {
            let t = Instant::now();
            let ridge = sketch.ridge(1.0)?;
            let fit_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let alpha = ridge.scores(&g)?;
            rec["sketch_ridge"] = json!({
                "fit_s": fit_s, "100_queries_s": t.elapsed().as_secs_f64(),
                "sources": alpha.ncols(),
            });
        }
        println!(
            "scenario {name}: {}",
            serde_json::to_string(&rec).expect("json")
        );
        out.insert(name.into(), rec);
    }
    out.insert("peak_rss_bytes".into(), json!(peak_rss_bytes()));
    print_scenario_table(&out, epochs, train.len());
    Ok(out.into())
}

/// The scenario as a Markdown table (the README's).
fn print_scenario_table(rec: &serde_json::Map<String, serde_json::Value>, epochs: u64, n: usize) {
    let f = |m: &str, path: &[&str]| -> f64 {
        let mut v = &rec[m];
        for p in path {
            v = &v[*p];
        }
        v.as_f64().unwrap_or(f64::NAN)
    };
    let mb = |m: &str, key: &str, sub: Option<&str>| -> f64 {
        let v = sub.map_or(&rec[m][key], |s| &rec[m][s][key]);
        v.as_array().map_or(0.0, |a| {
            a.iter().filter_map(|x| x.as_f64()).sum::<f64>() / 1e6
        })
    };
    let max = |m: &str, key: &str| -> f64 {
        rec[m]["sketch"][key].as_array().map_or(f64::NAN, |a| {
            a.iter().filter_map(|x| x.as_f64()).fold(0.0, f64::max)
        })
    };
    println!(
        "\n| scenario: {epochs} epochs × {n} examples, then 100 queries | MLP 784-256-10 | CNN |"
    );
    println!("|---|---|---|");
    let row = |name: &str, m: &dyn Fn(&str) -> String| {
        println!("| {name} | {} | {} |", m("mlp"), m("cnn"));
    };
    row("training with tracing", &|m| {
        format!("{:.0} s", f(m, &["train_s"]))
    });
    row("test accuracy", &|m| {
        format!("{:.3}", f(m, &["test_accuracy"]))
    });
    row("exact ledger", &|m| {
        format!("{:.0} MB", mb(m, "ledger_bytes_per_layer", None))
    });
    row("100 queries, exact top-10 (influence)", &|m| {
        format!("{:.2} s", f(m, &["exact_top10_100_queries_s"]))
    });
    row("100 queries, exact loss lens", &|m| {
        format!("{:.2} s", f(m, &["exact_loss_100_queries_s"]))
    });
    row("sketch: size (ratio to exact)", &|m| {
        format!(
            "{:.0} MB ({:.2}× smaller)",
            mb(m, "bytes_per_layer", Some("sketch")),
            f(m, &["sketch", "ratio"])
        )
    });
    row("sketch: build from the mapped ledger", &|m| {
        format!("{:.1} s", f(m, &["sketch", "build_s"]))
    });
    row("sketch: top-10 overlap, influence / loss", &|m| {
        format!(
            "{:.3} / {:.3}",
            f(m, &["sketch", "top10_overlap_influence"]),
            f(m, &["sketch", "top10_overlap_loss"])
        )
    });
    row(
        "sketch + exact re-rank of 100: top-10 overlap (time)",
        &|m| {
            format!(
                "{:.3} ({:.2} s)",
                f(m, &["sketch", "top10_overlap_influence_reranked"]),
                f(m, &["sketch", "reranked_100_queries_s"])
            )
        },
    );
    row("sketch: balance error (max over layers)", &|m| {
        format!("{:.1e}", max(m, "balance_error"))
    });
    println!(
        "| sketched ridge lens at full N: fit / 100 queries | {:.1} s / {:.2} s | — |",
        f("mlp", &["sketch_ridge", "fit_s"]),
        f("mlp", &["sketch_ridge", "100_queries_s"])
    );
    println!(
        "| peak resident memory, whole run so far | {:.0} MB | |\n",
        rec["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6
    );
}

/// Top-10 agreement of the sketched ridge lens with the exact one on a subsample
/// small enough for the exact `N × N` system.
fn ridge_agreement(
    train: &Dataset<f32>,
    test: &Dataset<f32>,
    n: usize,
) -> Result<serde_json::Value> {
    let idx: Vec<usize> = (0..n.min(train.len())).collect();
    let sub = train.subset(&idx)?;
    let mut net = mlp(7)?;
    let ledger = train_traced(&mut net, &sub, 3)?;
    let (_, g) = queries(
        &mut net,
        &test.subset(&(0..100.min(test.len())).collect::<Vec<_>>())?,
    )?;
    let t = Instant::now();
    let exact_lens = RidgeLens::fit(&ledger, 1.0)?;
    let exact = exact_lens.scores(&g)?;
    let exact_s = t.elapsed().as_secs_f64();
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_ratio(4.0))?;
    let t = Instant::now();
    let approx_lens = sketch.ridge(1.0)?;
    let approx = approx_lens.scores(&g)?;
    let sketch_s = t.elapsed().as_secs_f64();
    let rec = json!({
        "sources": n, "dims": sketch.dims(), "exact_s": exact_s, "sketch_s": sketch_s,
        "top10_overlap": top10_overlap(&exact, &approx),
    });
    println!(
        "ridge, sketch vs exact: {}",
        serde_json::to_string(&rec).expect("json")
    );
    Ok(rec)
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 2_000 } else { 60_000 };
    let (train, source) = data(n, IdxSplit::Train)?;
    let steps = if quick { 40 } else { 400 };
    println!(
        "data: {source}, {} examples; batch 64; {} threads",
        train.len(),
        rayon::current_num_threads()
    );
    let (mlp_t, mlp_ledger, mlp_net) = step_times(&mlp, &train, steps)?;
    let images = train.reshaped(&[1, 28, 28])?;
    let cnn_steps = steps / 4;
    let (cnn_t, _, _) = step_times(&cnn, &images, cnn_steps)?;
    for (name, t, n) in [
        ("MLP 784-256-10", &mlp_t, steps),
        ("CNN", &cnn_t, cnn_steps),
    ] {
        let (median, mean) = t.overhead();
        println!(
            "{name}, {n} interleaved steps: median bare {:.2} ms, traced {:.2} ms, overhead {median:.2}x; mean bare {:.2} ms, traced {:.2} ms, overhead {mean:.2}x",
            t.bare_median * 1e3,
            t.traced_median * 1e3,
            t.bare_mean * 1e3,
            t.traced_mean * 1e3,
        );
    }
    let bytes = mlp_ledger.bytes_per_layer();
    let n_src = mlp_ledger.sources().len();
    println!(
        "MLP ledger after {steps} steps: {} sources, bytes per example per layer: {:?}",
        n_src,
        bytes.iter().map(|b| b / n_src.max(1)).collect::<Vec<_>>()
    );

    // Queries against the MLP ledger, through the network it traced.
    let mut net = mlp_net;
    let q1 = train.subset(&[0])?;
    net.forward(q1.x().view())?;
    let single = Query::from_layers(&net.traceables())?;
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        mlp_ledger.top_k_influences(&single, Lens::Influence, 10)?;
    }
    let single_s = t.elapsed().as_secs_f64() / reps as f64;
    let total_bytes: usize = bytes.iter().sum();
    let stream_s = stream_read_s(total_bytes, reps);
    println!(
        "single query (top-10, influence, all layers): {:.2} ms; streaming read of the ledger's {} MB: {:.2} ms; ratio {:.1}x",
        single_s * 1e3,
        total_bytes / 1_000_000,
        stream_s * 1e3,
        single_s / stream_s
    );
    let idx: Vec<usize> = (0..100.min(train.len())).collect();
    let q100 = train.subset(&idx)?;
    net.forward(q100.x().view())?;
    let batch = Query::from_layers(&net.traceables())?;
    let mut times = Vec::new();
    let mut n_sources = 0;
    for _ in 0..3 {
        let t = Instant::now();
        n_sources = mlp_ledger
            .scores(&batch, Lens::Influence, LayerSel::All)?
            .ncols();
        times.push(t.elapsed().as_secs_f64());
    }
    let batch_s = fashion::median(times);
    // The same FLOP count: within one epoch every source has one factored row per
    // layer, and a query multiplies each row's patch and delta with its own
    // (two products of widths aug_in and fan_out).
    let width: usize = mlp_ledger
        .layers()
        .iter()
        .map(|m| m.shape.aug_in() + m.shape.fan_out)
        .sum();
    let gemm = gemm_s(n_sources, width, 100, 3);
    println!(
        "100 queries (influence, all layers): {:.1} ms; a GEMM of the same FLOP count ({n_sources} × {width} × 100): {:.1} ms; ratio {:.1}x",
        batch_s * 1e3,
        gemm * 1e3,
        batch_s / gemm
    );
    let (test, _) = data(if quick { 200 } else { 10_000 }, IdxSplit::Test)?;
    let epochs = if quick { 1 } else { 3 };
    println!(
        "scenario: both models traced for {epochs} epochs over {} examples, then 100 queries",
        train.len()
    );
    std::fs::create_dir_all("target/perf").map_err(|e| refinement_ledger::Error::Io {
        path: "target/perf".into(),
        source: e,
    })?;
    let scenario = scenario(&train, &test, epochs)?;
    let ridge = ridge_agreement(&train, &test, if quick { 300 } else { 1500 })?;
    let peak = peak_rss_bytes();
    println!("online compact ledger: MLP, then the 1.06M-parameter CNN, {epochs} epochs");
    let mlp_online = online_scale::mlp_online(&train, &test, epochs)?;
    let cnn_large =
        online_scale::cnn_large_scenario(&train, &test, epochs, if quick { 4 } else { 40 })?;
    let growth = online_scale::growth(&train, &test, quick)?;
    online_scale::print_growth(&growth);
    println!(
        "peak resident memory (before the online scenarios): {} MB",
        peak.map_or("unknown".into(), |b| (b / 1_000_000).to_string())
    );
    let report = json!({
        "peak_rss_bytes": peak,
        "data": source, "examples": train.len(), "timed_steps": steps,
        "tracing_overhead_mlp": mlp_t.overhead().0, "tracing_overhead_cnn": cnn_t.overhead().0,
        "tracing_overhead_mean": {"mlp": mlp_t.overhead().1, "cnn": cnn_t.overhead().1},
        "step_ms_median": {"mlp_bare": mlp_t.bare_median * 1e3, "mlp_traced": mlp_t.traced_median * 1e3,
            "cnn_bare": cnn_t.bare_median * 1e3, "cnn_traced": cnn_t.traced_median * 1e3},
        "query_single_vs_bound": single_s / stream_s, "query_batch_vs_bound": batch_s / gemm,
        "ledger_bytes_per_layer": bytes,
        "scenario": scenario, "ridge_sketch_vs_exact": ridge,
        "online_overhead_cnn_large": cnn_large["step_overhead_mean"],
        "online_query_100_s_mlp": mlp_online["query_100_top10_loss_s"],
        "online_query_100_s_cnn_large": cnn_large["query_100_top10_loss_s"],
        "online_bytes_cnn_large": cnn_large["online_bytes"],
        "exact_bytes_cnn_large": cnn_large["exact_bytes"],
        "online_mlp": mlp_online, "online_cnn_large": cnn_large, "growth": growth,
    });
    let dir = Path::new("target/perf");
    std::fs::create_dir_all(dir).map_err(|e| refinement_ledger::Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .map_err(|e| refinement_ledger::Error::Io {
        path: "target/perf/report.json".into(),
        source: e,
    })?;
    println!("wrote target/perf/report.json");
    Ok(())
}
