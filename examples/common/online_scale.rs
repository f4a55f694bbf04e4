//! `perf_report`'s online compact scenarios: the one-million-parameter CNN
//! traced online on Fashion-MNIST (the exact ledger's size computed, never
//! allocated), online MLP queries, and how memory and query time grow with
//! examples, segments and layer size for the exact ledger, the offline sketch
//! and the online ledger.

use std::time::Instant;

use super::fashion::{
    self, cnn_large, gemm_s, online_step_times, peak_rss_bytes, reset_peak_rss, stream_read_s,
};
use refinement_ledger::data::{Dataset, ShuffledSampler};
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{LedgerSketch, Projection, SketchConfig};
use refinement_ledger::{Batch, ExampleId, LayerSel, Lens, OptimizerHook, Query, Result};
use serde_json::{Value, json};

/// Online dimensions per layer of the MLPs (Kronecker 32 × 32, or the
/// layer's own size when smaller).
pub const MLP_DIMS: usize = 1024;
/// Online dimensions per layer of the 1.06M-parameter CNN (22 × 23): with five
/// layers, what 100 queries over 60,000 sources can score in under 0.65 s on
/// two cores (at 1,024 the dot products alone take about 0.5 s).
pub const CNN_LARGE_DIMS: usize = 512;

pub fn online_config(dims: usize) -> SketchConfig {
    SketchConfig::with_dims(dims).projection(Projection::Kronecker)
}

/// A traced run: `epochs` over `data` (SGD, momentum 0.9, batch 64), online
/// with `online` or exact, a segment per epoch when `segments`.
pub enum Traced {
    Exact(refinement_ledger::Ledger<f32>),
    Online(LedgerSketch),
}

pub fn trace_run(
    net: &mut Sequential<f32>,
    data: &Dataset<f32>,
    epochs: u64,
    online: Option<&SketchConfig>,
    segments: bool,
) -> Result<Traced> {
    let sgd = SgdConfig::new(0.01).with_momentum(0.9).build::<f32>()?;
    let mut hook = OptimizerHook::new(sgd, &net.traceables())?;
    if let Some(online) = online {
        hook = hook.online(online)?;
    }
    let sampler = ShuffledSampler::new(data.len(), 64, 11)?;
    for e in 0..epochs {
        for rows in sampler.epoch(e) {
            let x = data.batch_x(&rows)?;
            let y: Vec<usize> = rows.iter().map(|&i| data.labels()[i]).collect();
            let ids: Vec<ExampleId> = rows.iter().map(|&i| data.ids()[i]).collect();
            net.train_batch(x.view(), &y)?;
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))?;
        }
        if segments && e + 1 < epochs {
            hook.close_segment()?;
        }
    }
    Ok(match online {
        Some(_) => Traced::Online(hook.finish_sketch()?),
        None => Traced::Exact(hook.finish()?),
    })
}

/// Seconds of 100 top-10 queries (`lens` scores of every source, then each
/// query's top 10), the median of `reps`.
fn time_top10(traced: &Traced, q: &Query<f32>, lens: Lens, reps: usize) -> Result<f64> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let scores = match traced {
            Traced::Exact(l) => l.scores(q, lens, LayerSel::All)?,
            Traced::Online(s) => s.scores(q, lens, LayerSel::All)?,
        };
        std::hint::black_box(scores.top_k_all(10));
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(fashion::median(times))
}

fn bytes(traced: &Traced) -> usize {
    match traced {
        Traced::Exact(l) => l.bytes_per_layer().iter().sum(),
        Traced::Online(s) => s.bytes_per_layer().iter().sum(),
    }
}

/// Representation and loss-gradient queries of `data` on `net`.
pub fn queries(net: &mut Sequential<f32>, data: &Dataset<f32>) -> Result<(Query<f32>, Query<f32>)> {
    net.forward(data.x().view())?;
    let q = Query::from_layers(&net.traceables())?;
    let pred = net.predict(data.x().view())?;
    net.loss_gradients(data.x().view(), &pred)?;
    Ok((q, Query::with_gradients(&net.traceables())?))
}

/// The scenario: the 1.06M-parameter CNN traced online for `epochs`
/// over `train`; then 100 top-10 queries; step overhead from `steps`
/// interleaved steps; peak memory of this scenario alone.
pub fn cnn_large_scenario(
    train: &Dataset<f32>,
    test: &Dataset<f32>,
    epochs: u64,
    steps: usize,
) -> Result<Value> {
    let (tr, te) = (train.reshaped(&[1, 28, 28])?, test.reshaped(&[1, 28, 28])?);
    let config = online_config(CNN_LARGE_DIMS);
    let times = online_step_times(&cnn_large, &tr, steps, &config)?;
    let (median, mean) = times.overhead();
    println!(
        "CNN 1.06M, {steps} interleaved steps, online: median bare {:.1} ms, traced {:.1} ms ({median:.2}x); mean {:.1} / {:.1} ms ({mean:.2}x)",
        times.bare_median * 1e3,
        times.traced_median * 1e3,
        times.bare_mean * 1e3,
        times.traced_mean * 1e3
    );
    // The projection's cost per step, at the same dimensions: the tensor sketch.
    let tensor = SketchConfig::with_dims(CNN_LARGE_DIMS).projection(Projection::Tensor);
    let tensor_times = online_step_times(&cnn_large, &tr, (steps / 4).max(2), &tensor)?;
    println!(
        "CNN 1.06M, online with the tensor sketch instead: mean {:.1} / {:.1} ms ({:.2}x)",
        tensor_times.bare_mean * 1e3,
        tensor_times.traced_mean * 1e3,
        tensor_times.overhead().1
    );
    let peak_reset = reset_peak_rss();
    let mut net = cnn_large(7)?;
    let t = Instant::now();
    let traced = trace_run(&mut net, &tr, epochs, Some(&config), false)?;
    let train_s = t.elapsed().as_secs_f64();
    let acc = fashion::accuracy(&mut net, &te)?;
    let (q, g) = queries(
        &mut net,
        &te.subset(&(0..100.min(te.len())).collect::<Vec<_>>())?,
    )?;
    let loss_s = time_top10(&traced, &g, Lens::Loss, 3)?;
    let inf_s = time_top10(&traced, &q, Lens::Influence, 3)?;
    let Traced::Online(sketch) = &traced else {
        unreachable!("trained online")
    };
    let online_bytes = bytes(&traced);
    let exact_bytes: usize = sketch.exact_bytes_per_layer().iter().sum();
    let width: usize = sketch.dims().iter().sum();
    let n = sketch.sources().len();
    let gemm = gemm_s(n, width, 100, 3);
    let stream = stream_read_s(online_bytes, 3);
    let rec = json!({
        "params": params(&net), "layers": sketch.layers().iter().map(|m| m.id.to_string()).collect::<Vec<_>>(),
        "dims": sketch.dims(), "epochs": epochs, "sources": n,
        "step_overhead_median": median, "step_overhead_mean": mean,
        "tensor_sketch_step_overhead_mean": tensor_times.overhead().1,
        "step_ms": {"bare_median": times.bare_median * 1e3, "traced_median": times.traced_median * 1e3,
            "bare_mean": times.bare_mean * 1e3, "traced_mean": times.traced_mean * 1e3},
        "train_s": train_s, "test_accuracy": acc,
        "online_bytes": online_bytes, "exact_bytes": exact_bytes,
        "online_bytes_per_layer": sketch.bytes_per_layer(),
        "exact_bytes_per_layer": sketch.exact_bytes_per_layer(),
        "balance_error": sketch.balance_error(),
        "query_100_top10_loss_s": loss_s, "query_100_top10_influence_s": inf_s,
        "bound_gemm_s": gemm, "bound_stream_s": stream,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_is_this_scenario": peak_reset,
    });
    println!("cnn_large: {}", serde_json::to_string(&rec).expect("json"));
    Ok(rec)
}

fn params(net: &Sequential<f32>) -> usize {
    net.traceables()
        .iter()
        .map(|l| l.traced_shape().fan_out * l.traced_shape().aug_in())
        .sum()
}

/// The MLP 784-256-10 traced online for `epochs`: 100 top-10 queries.
pub fn mlp_online(train: &Dataset<f32>, test: &Dataset<f32>, epochs: u64) -> Result<Value> {
    let mut net = fashion::mlp(7)?;
    let t = Instant::now();
    let traced = trace_run(
        &mut net,
        train,
        epochs,
        Some(&online_config(MLP_DIMS)),
        false,
    )?;
    let train_s = t.elapsed().as_secs_f64();
    let (q, g) = queries(
        &mut net,
        &test.subset(&(0..100.min(test.len())).collect::<Vec<_>>())?,
    )?;
    let loss_s = time_top10(&traced, &g, Lens::Loss, 3)?;
    let inf_s = time_top10(&traced, &q, Lens::Influence, 3)?;
    let Traced::Online(sketch) = &traced else {
        unreachable!("trained online")
    };
    let width: usize = sketch.dims().iter().sum();
    let rec = json!({
        "dims": sketch.dims(), "train_s": train_s, "sources": sketch.sources().len(),
        "online_bytes": bytes(&traced), "exact_bytes": sketch.exact_bytes_per_layer().iter().sum::<usize>(),
        "query_100_top10_loss_s": loss_s, "query_100_top10_influence_s": inf_s,
        "bound_gemm_s": gemm_s(sketch.sources().len(), width, 100, 3),
    });
    println!("mlp online: {}", serde_json::to_string(&rec).expect("json"));
    Ok(rec)
}

/// One point of the growth table: bytes and 100-query seconds (influence,
/// top 10) of the exact ledger, the offline sketch (with the online
/// ledger's dimensions, Kronecker) and the online ledger.
fn growth_point(
    data: &Dataset<f32>,
    queries_of: &Dataset<f32>,
    hidden: usize,
    epochs: u64,
) -> Result<Value> {
    let build = |seed| -> Result<Sequential<f32>> {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        Ok(Sequential::new()
            .with(DenseConfig::new(784, hidden).build("fc1", &mut rng)?)
            .with(Relu::new())
            .with(DenseConfig::new(hidden, 10).build("fc2", &mut rng)?))
    };
    let mut out = serde_json::Map::new();
    let mut net = build(7)?;
    let exact = trace_run(&mut net, data, epochs, None, true)?;
    let (q, _) = queries(&mut net, queries_of)?;
    let Traced::Exact(ledger) = &exact else {
        unreachable!("trained exact")
    };
    let offline = Traced::Online(LedgerSketch::build(ledger, &online_config(MLP_DIMS))?);
    for (name, t) in [("exact", &exact), ("sketch", &offline)] {
        out.insert(
            name.into(),
            json!({"bytes": bytes(t), "query_100_s": time_top10(t, &q, Lens::Influence, 3)?}),
        );
    }
    drop((exact, offline));
    let mut net = build(7)?;
    let online = trace_run(&mut net, data, epochs, Some(&online_config(MLP_DIMS)), true)?;
    let (q, _) = queries(&mut net, queries_of)?;
    out.insert(
        "online".into(),
        json!({"bytes": bytes(&online), "query_100_s": time_top10(&online, &q, Lens::Influence, 3)?}),
    );
    Ok(out.into())
}

/// The growth table: three sizes along each axis (examples; epochs, one
/// segment each; hidden width), the others at the middle size.
pub fn growth(train: &Dataset<f32>, test: &Dataset<f32>, quick: bool) -> Result<Value> {
    let q = test.subset(&(0..100.min(test.len())).collect::<Vec<_>>())?;
    let base = if quick { 500 } else { 10_000 };
    let sizes = [base / 2, base, base * 2];
    let mut rows = Vec::new();
    let mut point = |axis: &str,
                     value: usize,
                     n: usize,
                     hidden: usize,
                     epochs: u64|
     -> Result<()> {
        let data = train.subset(&(0..n.min(train.len())).collect::<Vec<_>>())?;
        let rec = growth_point(&data, &q, hidden, epochs)?;
        println!(
            "growth {axis} = {value}: {}",
            serde_json::to_string(&rec).expect("json")
        );
        rows.push(json!({"axis": axis, "value": value, "examples": n, "hidden": hidden, "epochs": epochs, "modes": rec}));
        Ok(())
    };
    for n in sizes {
        point("examples", n, n, 256, 2)?;
    }
    for epochs in [1, 2, 4] {
        point(
            "epochs (a segment each)",
            epochs as usize,
            base,
            256,
            epochs,
        )?;
    }
    for hidden in [64, 256, 1024] {
        point("hidden width", hidden, base, hidden, 2)?;
    }
    Ok(Value::Array(rows))
}

/// The growth table as Markdown (MB and 100-query seconds per mode).
pub fn print_growth(rows: &Value) {
    println!(
        "\n| axis | value | exact: MB / 100 q | offline sketch: MB / 100 q | online: MB / 100 q |"
    );
    println!("|---|---|---|---|---|");
    for r in rows.as_array().into_iter().flatten() {
        let cell = |m: &str| {
            let v = &r["modes"][m];
            format!(
                "{:.1} / {:.3} s",
                v["bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
                v["query_100_s"].as_f64().unwrap_or(f64::NAN)
            )
        };
        println!(
            "| {} | {} | {} | {} | {} |",
            r["axis"].as_str().unwrap_or(""),
            r["value"],
            cell("exact"),
            cell("sketch"),
            cell("online")
        );
    }
}
