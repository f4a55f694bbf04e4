//! Shared by `perf_report` and the criterion benches: Fashion-MNIST (or seeded
//! synthetic data of its shape), the two models, interleaved step
//! timings, and the machine bounds queries are compared with.
#![allow(dead_code)]

use std::path::Path;
use std::time::Instant;

use ndarray::{Array2, ArrayD, IxDyn};
use rand::{Rng, SeedableRng, rngs::StdRng};
use refinement_ledger::data::{Dataset, IdxSplit, ShuffledSampler};
use refinement_ledger::nn::{Conv2dConfig, DenseConfig, Flatten, MaxPool2d, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::SketchConfig;
use refinement_ledger::{Batch, ExampleId, Optimizer, OptimizerHook, Result};

/// `n` examples of `split`: Fashion-MNIST when installed, else synthetic.
pub fn data(n: usize, split: IdxSplit) -> Result<(Dataset<f32>, &'static str)> {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if let Ok(d) = Dataset::<f32>::load_idx(dir, split) {
        let idx: Vec<usize> = (0..n.min(d.len())).collect();
        return Ok((d.subset(&idx)?, "Fashion-MNIST"));
    }
    let mut rng = StdRng::seed_from_u64(1 + split as u64);
    let labels: Vec<usize> = (0..n).map(|i| i % 10).collect();
    let x = ArrayD::from_shape_fn(IxDyn(&[n, 784]), |ix| {
        let c = labels[ix[0]] as f32;
        ((ix[1] as f32 * 0.37 + c).sin() * 0.5 + 0.5) * 0.7 + 0.3 * rng.random::<f32>()
    });
    Ok((
        Dataset::new(x, labels, (0..n as u64).map(ExampleId).collect(), 10)?,
        "synthetic (Fashion-MNIST shape)",
    ))
}

pub fn mlp(seed: u64) -> Result<Sequential<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(Sequential::new()
        .with(DenseConfig::new(784, 256).build("fc1", &mut rng)?)
        .with(Relu::new())
        .with(DenseConfig::new(256, 10).build("fc2", &mut rng)?))
}

pub fn cnn(seed: u64) -> Result<Sequential<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    Ok(Sequential::new()
        .with(Conv2dConfig::new(1, 16, 3).build("conv1", &mut rng)?)
        .with(Relu::new())
        .with(MaxPool2d::new(2)?)
        .with(Conv2dConfig::new(16, 32, 3).build("conv2", &mut rng)?)
        .with(Relu::new())
        .with(MaxPool2d::new(2)?)
        .with(Flatten::new())
        .with(DenseConfig::new(800, 10).build("fc", &mut rng)?))
}

/// The network the exact ledger cannot hold (1,062,794 parameters):
/// three 3×3 convolutions (1→32, 32→64, 64→64, padding 1) with 2×2 max
/// pooling after the first two, and a dense head 3136→320→10.
pub fn cnn_large(seed: u64) -> Result<Sequential<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let conv =
        |i, o, name, rng: &mut StdRng| Conv2dConfig::new(i, o, 3).with_padding(1).build(name, rng);
    Ok(Sequential::new()
        .with(conv(1, 32, "conv1", &mut rng)?)
        .with(Relu::new())
        .with(MaxPool2d::new(2)?)
        .with(conv(32, 64, "conv2", &mut rng)?)
        .with(Relu::new())
        .with(MaxPool2d::new(2)?)
        .with(conv(64, 64, "conv3", &mut rng)?)
        .with(Relu::new())
        .with(Flatten::new())
        .with(DenseConfig::new(3136, 320).build("fc1", &mut rng)?)
        .with(Relu::new())
        .with(DenseConfig::new(320, 10).build("fc2", &mut rng)?))
}

/// Peak resident memory of this process (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets the peak resident memory to the current one (Linux: `5` to
/// `/proc/self/clear_refs`), so a scenario reports its own peak; whether it could.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Test accuracy of `net` on `data`, in batches of 1,000.
pub fn accuracy(net: &mut Sequential<f32>, data: &Dataset<f32>) -> Result<f64> {
    let mut hits = 0;
    for start in (0..data.len()).step_by(1000) {
        let idx: Vec<usize> = (start..(start + 1000).min(data.len())).collect();
        let pred = net.predict(data.batch_x(&idx)?.view())?;
        hits += idx
            .iter()
            .zip(pred)
            .filter(|&(&i, p)| data.labels()[i] == p)
            .count();
    }
    Ok(hits as f64 / data.len() as f64)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds per training step, bare and traced, from interleaved steps.
pub struct StepTimes {
    pub bare_median: f64,
    pub traced_median: f64,
    pub bare_mean: f64,
    pub traced_mean: f64,
}

impl StepTimes {
    /// Traced ÷ bare, of the medians and of the means (the mean counts rare slow steps).
    pub fn overhead(&self) -> (f64, f64) {
        (
            self.traced_median / self.bare_median,
            self.traced_mean / self.bare_mean,
        )
    }
}

/// Times `steps` steps of batch 64, bare and traced, interleaved so both see
/// the same machine state; returns the times, the traced run's ledger and its
/// (trained) network, the one the ledger's queries must run through.
pub fn step_times(
    build: &dyn Fn(u64) -> Result<Sequential<f32>>,
    data: &Dataset<f32>,
    steps: usize,
) -> Result<(StepTimes, refinement_ledger::Ledger<f32>, Sequential<f32>)> {
    let (times, hook, net) = interleaved(build, data, steps, None)?;
    Ok((times, hook.finish()?, net))
}

/// As [`step_times`], the traced network recorded online with `sketch`.
pub fn online_step_times(
    build: &dyn Fn(u64) -> Result<Sequential<f32>>,
    data: &Dataset<f32>,
    steps: usize,
    sketch: &SketchConfig,
) -> Result<StepTimes> {
    Ok(interleaved(build, data, steps, Some(sketch))?.0)
}

type Hook = OptimizerHook<refinement_ledger::optim::Sgd<f32>, f32>;

/// The interleaved bare and traced steps (online with `sketch` when given).
fn interleaved(
    build: &dyn Fn(u64) -> Result<Sequential<f32>>,
    data: &Dataset<f32>,
    steps: usize,
    sketch: Option<&SketchConfig>,
) -> Result<(StepTimes, Hook, Sequential<f32>)> {
    let sgd = SgdConfig::new(0.01).with_momentum(0.9);
    let sampler = ShuffledSampler::new(data.len(), 64, 3)?;
    let batches: Vec<Vec<usize>> = (0..).flat_map(|e| sampler.epoch(e)).take(steps).collect();
    let mut bare_net = build(7)?;
    let mut bare = sgd.build::<f32>()?;
    let mut traced_net = build(7)?;
    let mut hook = OptimizerHook::new(sgd.build::<f32>()?, &traced_net.traceables())?;
    if let Some(sketch) = sketch {
        hook = hook.online(sketch)?;
    }
    let (mut tb, mut tt) = (Vec::new(), Vec::new());
    for rows in &batches {
        let x = data.batch_x(rows)?;
        let y: Vec<usize> = rows.iter().map(|&i| data.labels()[i]).collect();
        let ids: Vec<ExampleId> = rows.iter().map(|&i| data.ids()[i]).collect();
        // Interleaved so both see the same machine state.
        let t = Instant::now();
        bare_net.train_batch(x.view(), &y)?;
        let mut params: Vec<_> = bare_net
            .traceables_mut()
            .into_iter()
            .flat_map(|l| l.params_mut())
            .collect();
        bare.step(&mut params)?;
        tb.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        traced_net.train_batch(x.view(), &y)?;
        hook.step(&mut traced_net.traceables_mut(), &Batch::new(&ids, &y))?;
        tt.push(t.elapsed().as_secs_f64());
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let times = StepTimes {
        bare_mean: mean(&tb),
        traced_mean: mean(&tt),
        bare_median: median(tb),
        traced_median: median(tt),
    };
    Ok((times, hook, traced_net))
}

/// Median seconds of `reps` streaming reads (sums) over `bytes` bytes.
pub fn stream_read_s(bytes: usize, reps: usize) -> f64 {
    let buf = vec![1.0f64; bytes / 8];
    let mut times = Vec::with_capacity(reps);
    let mut check = 0.0;
    for _ in 0..reps {
        let t = Instant::now();
        check += buf.iter().sum::<f64>();
        times.push(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(check);
    median(times)
}

/// Median seconds of an f32 GEMM `[m, k] × [k, n]`.
pub fn gemm_s(m: usize, k: usize, n: usize, reps: usize) -> f64 {
    let a = Array2::<f32>::ones((m.max(1), k));
    let b = Array2::<f32>::ones((k, n));
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(a.dot(&b));
        times.push(t.elapsed().as_secs_f64());
    }
    median(times)
}
