//! Criterion benchmarks: a training step of the Fashion-MNIST-shaped MLP
//! (784-256-10, batch 64) bare and through the hook (their ratio is the tracing
//! overhead), and top-10 queries for 1 and 100 inputs against its ledger.
//! `cargo run --release --example perf_report` prints the same ratios as a table.

use criterion::{Criterion, criterion_group, criterion_main};
use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng, rngs::StdRng};
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::{Batch, ExampleId, Lens, Optimizer, OptimizerHook, Query};

fn mlp() -> Sequential<f32> {
    let mut rng = StdRng::seed_from_u64(7);
    Sequential::new()
        .with(DenseConfig::new(784, 256).build("fc1", &mut rng).unwrap())
        .with(Relu::new())
        .with(DenseConfig::new(256, 10).build("fc2", &mut rng).unwrap())
}

fn batch(step: u64) -> (ArrayD<f32>, Vec<usize>, Vec<ExampleId>) {
    let mut rng = StdRng::seed_from_u64(step);
    let x = ArrayD::from_shape_fn(IxDyn(&[64, 784]), |_| rng.random::<f32>());
    let y: Vec<usize> = (0..64).map(|i| (i + step as usize) % 10).collect();
    let ids = (0..64).map(|i| ExampleId(step * 64 + i)).collect();
    (x, y, ids)
}

fn training_step(c: &mut Criterion) {
    let sgd = SgdConfig::new(0.01).with_momentum(0.9);
    let mut group = c.benchmark_group("train_step_mlp");
    let (x, y, ids) = batch(0);
    group.bench_function("bare", |b| {
        let mut net = mlp();
        let mut opt = sgd.build::<f32>().unwrap();
        b.iter(|| {
            net.train_batch(x.view(), &y).unwrap();
            let mut params: Vec<_> = net
                .traceables_mut()
                .into_iter()
                .flat_map(|l| l.params_mut())
                .collect();
            opt.step(&mut params).unwrap();
        })
    });
    group.bench_function("traced", |b| {
        let mut net = mlp();
        let mut hook = OptimizerHook::new(sgd.build::<f32>().unwrap(), &net.traceables()).unwrap();
        b.iter(|| {
            net.train_batch(x.view(), &y).unwrap();
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))
                .unwrap();
        })
    });
    group.finish();
}

fn queries(c: &mut Criterion) {
    let mut net = mlp();
    let mut hook = OptimizerHook::new(
        SgdConfig::new(0.01)
            .with_momentum(0.9)
            .build::<f32>()
            .unwrap(),
        &net.traceables(),
    )
    .unwrap();
    for step in 0..100 {
        let (x, y, ids) = batch(step);
        net.train_batch(x.view(), &y).unwrap();
        hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))
            .unwrap();
    }
    let ledger = hook.finish();
    let mut group = c.benchmark_group("query_top10_6400_sources");
    for n in [1usize, 100] {
        let (x, _, _) = batch(1000);
        let x = x.slice(ndarray::s![..n.min(64), ..]).to_owned().into_dyn();
        net.forward(x.view()).unwrap();
        let q = Query::from_layers(&net.traceables()).unwrap();
        group.bench_function(format!("{}_queries", q.len()), |b| {
            b.iter(|| ledger.top_k_influences(&q, Lens::Influence, 10).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = training_step, queries
}
criterion_main!(benches);
