//! Fuzzes sequences of API calls on small networks: arbitrary layer sizes,
//! optimizer settings, batches (ids, labels — out of range and repeated
//! included — and input values, NaN and infinity included), segment closes,
//! snapshots, queries, saves and loads, merges, checkpoints and resumes. Every call must return `Ok` or
//! an `Error`, never panic, abort or hang; a snapshot that exists must save to
//! bytes that load back; a finished ledger must balance.
//! Run on stable: `cargo fuzz run -s none api_sequence`.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use refinement_ledger::ndarray::Array2;
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::{Batch, ExampleId, HookConfig, Lens, Ledger, OptimizerHook, Query, Scorer};

#[derive(Arbitrary, Debug)]
enum Op {
    /// A training step on rows `(id, label)` with input values cycled from `x`.
    Step { rows: Vec<(u8, u8)>, x: Vec<f32>, ghost: Option<u8> },
    /// Closes the current segment.
    Close,
    /// A snapshot, saved and loaded, queried with the first values of `x`.
    Snapshot { x: Vec<f32> },
    /// A snapshot merged with itself (must be refused).
    Merge,
    /// A checkpoint saved and resumed on a fresh network (must succeed and
    /// give the same ledger so far); training goes on with the resumed hook.
    Checkpoint,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dim: u8,
    hidden: u8,
    classes: u8,
    momentum: u8,
    nesterov: bool,
    decay: bool,
    ops: Vec<Op>,
}

fn values(x: &[f32], n: usize) -> Vec<f64> {
    (0..n).map(|i| x.get(i % x.len().max(1)).map_or(0.5, |&v| f64::from(v))).collect()
}

fn query_and_roundtrip(ledger: &Ledger<f64>, net: &mut Sequential<f64>, dim: usize, x: &[f32]) {
    let bytes = ledger.to_bytes().expect("a snapshot must save");
    let back = Ledger::<f64>::from_bytes(&bytes).expect("a saved snapshot must load back");
    assert_eq!(back.sources(), ledger.sources());
    let input = Array2::from_shape_vec((1, dim), values(x, dim)).expect("shape");
    if let Ok(q) = Query::forward(net, &input) {
        let _ = ledger.explain(&q);
        let _ = ledger.class_attribution(&q, None);
        for lens in [Lens::Influence, Lens::Cos] {
            if let Ok(s) = ledger.lens(lens).scores(&q) {
                let _ = s.top_k(0, 3);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let dim = 1 + usize::from(input.dim % 5);
    let hidden = 1 + usize::from(input.hidden % 6);
    let classes = 1 + usize::from(input.classes % 4);
    let network = |seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        Sequential::<f64>::new()
            .with(DenseConfig::new(dim, hidden).build("fc1", &mut rng).expect("sizes"))
            .with(Relu::new())
            .with(DenseConfig::new(hidden, classes).build("fc2", &mut rng).expect("sizes"))
    };
    let mut net = network(0);
    let momentum = f64::from(input.momentum % 200) / 220.0;
    let sgd = || {
        SgdConfig::new(0.1)
            .with_momentum(momentum)
            .with_nesterov(input.nesterov && momentum > 0.0)
            .with_weight_decay(if input.decay { 1e-3 } else { 0.0 })
            .build::<f64>()
            .expect("valid settings")
    };
    let mut hook = OptimizerHook::with_config(sgd(), &net.traceables(), HookConfig::default())
        .expect("a hook");
    let checkpoint = std::env::temp_dir().join(format!("fuzz-api-{}.ckpt", std::process::id()));
    for op in input.ops.iter().take(24) {
        match op {
            Op::Step { rows, x, ghost } => {
                let rows = &rows[..rows.len().min(8)];
                let n = rows.len();
                let Ok(xb) = Array2::from_shape_vec((n, dim), values(x, n * dim)) else {
                    continue;
                };
                // Labels up to `classes` (one past the last class: an error).
                let labels: Vec<usize> = rows.iter().map(|r| usize::from(r.1) % (classes + 1)).collect();
                let ids: Vec<ExampleId> = rows.iter().map(|r| ExampleId(u64::from(r.0 % 16))).collect();
                let ghosts: Vec<bool> = (0..n).map(|i| ghost.is_some_and(|g| usize::from(g) % 4 == i)).collect();
                if net.train_batch(&xb, &labels).is_ok() {
                    let batch = Batch::new(&ids, &labels).with_ghosts(&ghosts);
                    let _ = hook.step(&mut net.traceables_mut(), &batch);
                }
            }
            Op::Close => {
                let _ = hook.close_segment();
            }
            Op::Snapshot { x } => {
                let ledger = hook.snapshot();
                query_and_roundtrip(&ledger, &mut net, dim, x);
            }
            Op::Merge => {
                let ledger = hook.snapshot();
                assert!(ledger.merge(&ledger).is_err(), "a ledger merged with itself");
            }
            Op::Checkpoint => {
                if hook.save_checkpoint(&checkpoint).is_err() {
                    continue; // e.g. a ledger that no longer balances in f64
                }
                let mut fresh = network(1);
                let resumed = OptimizerHook::resume(sgd(), &mut fresh.traceables_mut(), &checkpoint)
                    .expect("a checkpoint the crate saved must resume");
                let (a, b) = (hook.snapshot(), resumed.snapshot());
                assert_eq!(a.sources(), b.sources());
                for l in 0..a.layers().len() {
                    assert_eq!(a.residual(l).ok(), b.residual(l).ok(), "layer {l}");
                    assert_eq!(a.final_params(l).ok(), b.final_params(l).ok(), "layer {l}");
                }
                (hook, net) = (resumed, fresh);
            }
        }
    }
    let ledger = hook.snapshot();
    let balance = ledger.parameter_balance();
    // Rounding of `W₀ + Σ G + residual − W_T` is ε·‖W‖, and the balance is
    // relative to at least 1e-12·‖W‖: anything over 1e-3 is not rounding.
    assert!(balance.iter().all(|&e| e <= 1e-3), "the ledger does not balance: {balance:?}");
    let _ = hook.finish();
});
