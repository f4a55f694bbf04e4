//! Criterion benchmarks of issue 4's measures, each beside its reference in the
//! same run:
//! * `train_step/{mlp,cnn}/{bare,traced}` — a training step of batch 64 with
//!   and without `OptimizerHook` (their ratio is the tracing overhead, also
//!   printed from interleaved medians);
//! * `query/top10_{1,100}` against the MLP's ledger, beside `query/bound_stream`
//!   (a streaming read of the ledger's bytes) and `query/bound_gemm` (a matrix
//!   product of the same FLOP count as the 100 queries);
//! * ledger bytes per example per layer, exact and compact (printed);
//! * `online/train_step/cnn_large/{bare,online}` — a step of the
//!   1.06M-parameter CNN, bare and recorded online (Kronecker, 512 dims per
//!   layer), and `online/query/mlp_top10_100` — 100 loss-lens top-10 queries
//!   against an online sketch, beside `online/query/bound_gemm`.
//!
//! Fashion-MNIST when installed (Debian `dataset-fashion-mnist`), else seeded
//! synthetic data of its shape. `cargo run --release --example perf_report`
//! prints the same ratios as the README's table.

#[path = "../examples/common/fashion.rs"]
mod fashion;

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use fashion::{cnn, cnn_large, data, gemm_s, mlp, online_step_times, step_times, stream_read_s};
use ndarray::Array2;
use refinement_ledger::data::{Dataset, IdxSplit};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{LedgerSketch, Projection, SketchConfig};
use refinement_ledger::{Batch, LayerSel, Lens, Optimizer, OptimizerHook, Query, Result};

type Build = fn(u64) -> Result<Sequential<f32>>;

/// `iters` steps of batch 64 from a fresh network (traced or not; online
/// with `online`); only the steps are timed.
fn run_steps(
    build: Build,
    data: &Dataset<f32>,
    iters: u64,
    traced: bool,
    online: Option<&SketchConfig>,
) -> Duration {
    let sgd = SgdConfig::new(0.01).with_momentum(0.9);
    let mut net = build(7).unwrap();
    let mut bare = sgd.build::<f32>().unwrap();
    let mut hook = OptimizerHook::new(sgd.build::<f32>().unwrap(), &net.traceables()).unwrap();
    if let Some(online) = online {
        hook = hook.online(online).unwrap();
    }
    let n_batches = (data.len() / 64) as u64;
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let rows: Vec<usize> = ((i % n_batches) as usize * 64..).take(64).collect();
        let x = data.batch_x(&rows).unwrap();
        let y: Vec<usize> = rows.iter().map(|&r| data.labels()[r]).collect();
        let ids: Vec<_> = rows.iter().map(|&r| data.ids()[r]).collect();
        let t = Instant::now();
        net.train_batch(x.view(), &y).unwrap();
        if traced {
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))
                .unwrap();
        } else {
            let mut params: Vec<_> = net
                .traceables_mut()
                .into_iter()
                .flat_map(|l| l.params_mut())
                .collect();
            bare.step(&mut params).unwrap();
        }
        total += t.elapsed();
    }
    total
}

fn training_step(c: &mut Criterion) {
    let (train, source) = data(6_400, IdxSplit::Train).unwrap();
    println!("data: {source}");
    let images = train.reshaped(&[1, 28, 28]).unwrap();
    let models: [(&str, Build, &Dataset<f32>); 2] = [("mlp", mlp, &train), ("cnn", cnn, &images)];
    let mut group = c.benchmark_group("train_step");
    group.sample_size(10);
    for (name, build, data) in models {
        for traced in [false, true] {
            let label = if traced { "traced" } else { "bare" };
            group.bench_function(format!("{name}/{label}"), |b| {
                b.iter_custom(|iters| run_steps(build, data, iters, traced, None))
            });
        }
    }
    group.finish();
    for (name, build, data) in models {
        let (times, _, _) = step_times(&build, data, 60).unwrap();
        let (median, mean) = times.overhead();
        println!(
            "tracing overhead {name} (60 interleaved steps, this run): {median:.2}x of the median, {mean:.2}x of the mean"
        );
    }
}

fn queries(c: &mut Criterion) {
    let (train, _) = data(6_400, IdxSplit::Train).unwrap();
    let (_, ledger, net) = step_times(&mlp, &train, 100).unwrap();
    let n = ledger.sources().len();
    let sketch = LedgerSketch::build(&ledger, &SketchConfig::with_ratio(4.0)).unwrap();
    let per_example = |b: &[usize]| b.iter().map(|v| v / n.max(1)).collect::<Vec<_>>();
    println!(
        "ledger bytes per example per layer ({n} sources): exact {:?}, compact {:?}",
        per_example(&ledger.bytes_per_layer()),
        per_example(&sketch.bytes_per_layer())
    );
    let mut net = net;
    let mut group = c.benchmark_group("query");
    group.sample_size(10);
    let mut make = |k: usize| {
        let idx: Vec<usize> = (0..k).collect();
        net.forward(train.subset(&idx).unwrap().x().view()).unwrap();
        Query::from_layers(&net.traceables()).unwrap()
    };
    let (q1, q100) = (make(1), make(100));
    for (name, q) in [("top10_1", &q1), ("top10_100", &q100)] {
        group.bench_function(name, |b| {
            b.iter(|| ledger.top_k_influences(q, Lens::Influence, 10).unwrap())
        });
    }
    let bytes: usize = ledger.bytes_per_layer().iter().sum();
    // The same FLOP count as 100 queries: one factored row per source and layer
    // (100 steps of distinct examples), a patch and a delta product each.
    let width: usize = ledger
        .layers()
        .iter()
        .map(|m| m.shape.aug_in() + m.shape.fan_out)
        .sum();
    let buf = vec![1.0f64; bytes / 8];
    group.bench_function("bound_stream", |b| {
        b.iter(|| std::hint::black_box(buf.iter().sum::<f64>()))
    });
    let (a, w) = (
        Array2::<f32>::ones((n, width)),
        Array2::<f32>::ones((width, 100)),
    );
    group.bench_function("bound_gemm", |b| b.iter(|| a.dot(&w)));
    group.finish();
    let single = fashion::median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                ledger.top_k_influences(&q1, Lens::Influence, 10).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let batch = fashion::median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                ledger.top_k_influences(&q100, Lens::Influence, 10).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    println!(
        "query ÷ bound (medians, this run): 1 query {:.2}x a streaming read, 100 queries {:.2}x a GEMM of their FLOP count",
        single / stream_read_s(bytes, 5),
        batch / gemm_s(n, width, 100, 3)
    );
}

/// The online compact ledger: a step of the 1.06M-parameter CNN bare and
/// traced online, and 100 loss-lens top-10 queries against an online sketch
/// beside a GEMM of their FLOP count.
fn online(c: &mut Criterion) {
    let (train, _) = data(6_400, IdxSplit::Train).unwrap();
    let images = train.reshaped(&[1, 28, 28]).unwrap();
    let config = SketchConfig::with_dims(512).projection(Projection::Kronecker);
    let mut group = c.benchmark_group("online");
    group.sample_size(10);
    for (label, traced) in [("bare", false), ("online", true)] {
        group.bench_function(format!("train_step/cnn_large/{label}"), |b| {
            b.iter_custom(|iters| run_steps(cnn_large, &images, iters, traced, Some(&config)))
        });
    }
    let times = online_step_times(&cnn_large, &images, 20, &config).unwrap();
    let (median, mean) = times.overhead();
    println!(
        "online tracing overhead, CNN 1.06M (20 interleaved steps, this run): {median:.2}x of the median, {mean:.2}x of the mean"
    );
    let mut net = mlp(7).unwrap();
    let sgd = SgdConfig::new(0.01)
        .with_momentum(0.9)
        .build::<f32>()
        .unwrap();
    let config = SketchConfig::with_dims(1024).projection(Projection::Kronecker);
    let mut hook = OptimizerHook::new(sgd, &net.traceables())
        .unwrap()
        .online(&config)
        .unwrap();
    for start in (0..train.len()).step_by(64) {
        let rows: Vec<usize> = (start..(start + 64).min(train.len())).collect();
        let y: Vec<usize> = rows.iter().map(|&r| train.labels()[r]).collect();
        let ids: Vec<_> = rows.iter().map(|&r| train.ids()[r]).collect();
        net.train_batch(train.batch_x(&rows).unwrap().view(), &y)
            .unwrap();
        hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))
            .unwrap();
    }
    let sketch = hook.finish_sketch().unwrap();
    let q100 = train.subset(&(0..100).collect::<Vec<_>>()).unwrap();
    let pred = net.predict(q100.x().view()).unwrap();
    net.loss_gradients(q100.x().view(), &pred).unwrap();
    let g = Query::with_gradients(&net.traceables()).unwrap();
    group.bench_function("query/mlp_top10_100", |b| {
        b.iter(|| {
            sketch
                .scores(&g, Lens::Loss, LayerSel::All)
                .unwrap()
                .top_k_all(10)
        })
    });
    let width: usize = sketch.dims().iter().sum();
    let (a, w) = (
        Array2::<f32>::ones((sketch.sources().len(), width)),
        Array2::<f32>::ones((width, 100)),
    );
    group.bench_function("query/bound_gemm", |b| b.iter(|| a.dot(&w)));
    group.finish();
}

criterion_group!(benches, training_step, queries, online);
criterion_main!(benches);
