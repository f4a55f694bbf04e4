//! Shared helpers for the integration tests: small seeded data and networks, and
//! a traced training loop.
#![allow(dead_code)]

use ndarray::{Array2, Array4, ArrayD, Axis, IxDyn};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use refinement_ledger::nn::{
    Conv2dConfig, DenseConfig, Flatten, Init, MaxPool2d, Relu, Sequential, Tanh,
};
use refinement_ledger::{Batch, ExampleId, Float, Optimizer, OptimizerHook, Query};

pub mod hand;

/// Gaussian blobs: `n_per_class` points per class around seeded centres, `[n, dim]`.
pub fn blobs<F: Float>(
    n_per_class: usize,
    n_classes: usize,
    dim: usize,
    seed: u64,
) -> (ArrayD<F>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0, 1.0).unwrap();
    let centres = Array2::from_shape_fn((n_classes, dim), |_| 2.0 * normal.sample(&mut rng));
    let n = n_per_class * n_classes;
    let mut x = Array2::zeros((n, dim));
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % n_classes;
        for j in 0..dim {
            x[[i, j]] = F::narrow(centres[[c, j]] + normal.sample(&mut rng));
        }
        y.push(c);
    }
    (x.into_dyn(), y)
}

/// Small images `[n, 1, 6, 6]`: class `c` brightens one quadrant, plus noise.
pub fn images<F: Float>(
    n_per_class: usize,
    n_classes: usize,
    seed: u64,
) -> (ArrayD<F>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = n_per_class * n_classes;
    let mut x = Array4::zeros((n, 1, 6, 6));
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % n_classes;
        let (r0, c0) = ((c / 2) * 3, (c % 2) * 3);
        for h in 0..6 {
            for w in 0..6 {
                let on = h >= r0 && h < r0 + 3 && w >= c0 && w < c0 + 3;
                x[[i, 0, h, w]] = F::narrow(if on { 1.0 } else { 0.0 } + 0.3 * rng.random::<f64>());
            }
        }
        y.push(c);
    }
    (x.into_dyn(), y)
}

/// MLP `dim → 8 → classes` with ReLU.
pub fn mlp<F: Float>(dim: usize, classes: usize, seed: u64) -> Sequential<F> {
    let mut rng = StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(DenseConfig::new(dim, 8).build("fc1", &mut rng).unwrap())
        .with(Relu::new())
        .with(
            DenseConfig::new(8, classes)
                .with_init(Init::Xavier)
                .build("fc2", &mut rng)
                .unwrap(),
        )
}

/// MLP with tanh and three traced layers.
pub fn mlp3<F: Float>(dim: usize, classes: usize, seed: u64) -> Sequential<F> {
    let mut rng = StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(
            DenseConfig::new(dim, 6)
                .with_init(Init::Xavier)
                .build("fc1", &mut rng)
                .unwrap(),
        )
        .with(Tanh::new())
        .with(
            DenseConfig::new(6, 5)
                .with_init(Init::Xavier)
                .build("fc2", &mut rng)
                .unwrap(),
        )
        .with(Tanh::new())
        .with(
            DenseConfig::new(5, classes)
                .with_init(Init::Xavier)
                .build("fc3", &mut rng)
                .unwrap(),
        )
}

/// CNN on `[n, 1, 6, 6]`: conv(1→3, 3×3, pad 1) → ReLU → maxpool 2 → conv(3→4, 2×2) → ReLU → flatten → dense(16 → classes).
pub fn cnn<F: Float>(classes: usize, seed: u64) -> Sequential<F> {
    let mut rng = StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(
            Conv2dConfig::new(1, 3, 3)
                .with_padding(1)
                .build("conv1", &mut rng)
                .unwrap(),
        )
        .with(Relu::new())
        .with(MaxPool2d::new(2).unwrap())
        .with(Conv2dConfig::new(3, 4, 2).build("conv2", &mut rng).unwrap())
        .with(Relu::new())
        .with(Flatten::new())
        .with(
            DenseConfig::new(16, classes)
                .with_init(Init::Xavier)
                .build("fc", &mut rng)
                .unwrap(),
        )
}

/// Rows `idx` of `x`.
pub fn rows<F: Float>(x: &ArrayD<F>, idx: &[usize]) -> ArrayD<F> {
    x.select(Axis(0), idx)
}

/// How a traced run is laid out.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub batch: usize,
    pub epochs: usize,
    pub segment_per_epoch: bool,
    pub seed: u64,
}

/// Trains `net` through `hook` on `(x, y)` with seeded shuffles; returns the per-step
/// (ids) batches taken.
pub fn train<F: Float, O: Optimizer<F>>(
    net: &mut Sequential<F>,
    hook: &mut OptimizerHook<O, F>,
    x: &ArrayD<F>,
    y: &[usize],
    run: Run,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(run.seed);
    let n = y.len();
    let mut steps = Vec::new();
    for epoch in 0..run.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for chunk in order.chunks(run.batch) {
            let xb = rows(x, chunk);
            let yb: Vec<usize> = chunk.iter().map(|&i| y[i]).collect();
            let ids: Vec<ExampleId> = chunk.iter().map(|&i| ExampleId(i as u64)).collect();
            net.train_batch(xb.view(), &yb).unwrap();
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))
                .unwrap();
            steps.push(chunk.to_vec());
        }
        if run.segment_per_epoch && epoch + 1 < run.epochs {
            hook.close_segment().unwrap();
        }
    }
    steps
}

/// The representation query of `x` on the final network.
pub fn query<F: Float>(net: &mut Sequential<F>, x: &ArrayD<F>) -> Query<F> {
    net.forward(x.view()).unwrap();
    Query::from_layers(&net.traceables()).unwrap()
}

/// The loss-lens query of `x` (targets: the network's own predictions).
pub fn gradient_query<F: Float>(net: &mut Sequential<F>, x: &ArrayD<F>) -> Query<F> {
    let pred = net.predict(x.view()).unwrap();
    net.loss_gradients(x.view(), &pred).unwrap();
    Query::with_gradients(&net.traceables()).unwrap()
}

/// Asserts `actual ≈ expected` element-wise: `|a − e| ≤ atol + rtol·|e|`, reporting the worst index.
pub fn assert_allclose(
    actual: &ArrayD<f64>,
    expected: &ArrayD<f64>,
    rtol: f64,
    atol: f64,
    what: &str,
) {
    assert_eq!(actual.shape(), expected.shape(), "{what}: shapes differ");
    let mut worst = (0.0f64, IxDyn(&[]), 0.0, 0.0);
    for ((idx, &a), &e) in actual.indexed_iter().zip(expected.iter()) {
        let excess = (a - e).abs() - (atol + rtol * e.abs());
        if excess > worst.0 {
            worst = (excess, idx, a, e);
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{what}: worst at {:?}: actual {} expected {} (rtol {rtol}, atol {atol})",
        worst.1,
        worst.2,
        worst.3
    );
}

/// `[W | b]` of every traced layer of `net`.
pub fn augmented_params<F: Float>(net: &Sequential<F>) -> Vec<ndarray::Array2<f64>> {
    net.traceables()
        .iter()
        .map(|l| {
            let s = l.traced_shape();
            let w = l
                .weight()
                .mapv(F::widen)
                .into_shape_with_order((s.fan_out, s.fan_in))
                .unwrap();
            let b = l.bias().unwrap().mapv(F::widen).insert_axis(Axis(1));
            ndarray::concatenate![Axis(1), w, b]
        })
        .collect()
}

/// A CNN trained on 20 small images with momentum and decay (3 epochs, batch 4),
/// its ledger (one segment per epoch when `segments`), and 4 test images.
/// Its conv layers hold dense accounts, its dense layer factored rows.
pub fn trained_cnn<F: Float>(
    segments: bool,
) -> (refinement_ledger::Ledger<F>, Sequential<F>, ArrayD<F>) {
    let (x, y) = images::<F>(5, 4, 1);
    let mut net = cnn::<F>(4, 2);
    let sgd = refinement_ledger::optim::SgdConfig::new(0.05)
        .with_momentum(0.9)
        .with_weight_decay(1e-3)
        .build::<F>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    train(
        &mut net,
        &mut hook,
        &x,
        &y,
        Run {
            batch: 4,
            epochs: 3,
            segment_per_epoch: segments,
            seed: 3,
        },
    );
    let (test, _) = images::<F>(1, 4, 9);
    (hook.finish().unwrap(), net, test)
}

/// Re-encodes a saved ledger (or checkpoint) after `edit` changed its header or tensors, with
/// a valid checksum: what a crafted (or buggy) writer produces.
pub fn reencode(
    bytes: &[u8],
    edit: impl FnOnce(
        &mut serde_json::Value,
        &mut std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ),
) -> Vec<u8> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
    let mut info = meta.metadata().clone().unwrap();
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: std::collections::BTreeMap<_, _> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
        .collect();
    let mut header: serde_json::Value = serde_json::from_str(&info["payload"]).unwrap();
    edit(&mut header, &mut tensors);
    let payload = serde_json::to_string(&header).unwrap();
    let mut crc = crc32fast::Hasher::new();
    crc.update(payload.as_bytes());
    for (_, _, data) in tensors.values() {
        crc.update(data);
    }
    info.insert("crc32".into(), format!("{:08x}", crc.finalize()));
    info.insert("payload".into(), payload);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (dt, shape, data))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, Some(info)).unwrap()
}
