//! Checkpoints: a run stopped after any step and resumed from its checkpoint
//! (on a fresh network and optimizer, as in a new process) gives a ledger
//! bit-identical to the run that never stopped; a checkpoint that does not fit
//! the network, the optimizer or its own checksum is an error.

use std::path::Path;

use crate::common;

use common::{cnn, images, rows};
use ndarray::ArrayD;
use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::{AdamConfig, LrSchedule, SgdConfig};
use refinement_ledger::{
    Batch, Error, ExampleId, Ledger, Optimizer, OptimizerHook, ParamMut, Result,
};

const EPOCHS: usize = 3;
const BATCH: usize = 5;

/// Trains `net` from global step `start` on, closing a segment at every
/// epoch's end; with `stop_at`, saves a checkpoint after that step (and after
/// its epoch's segment close) and returns `None`, as a run that crashed after
/// checkpointing. Epoch `e`'s order is shuffled by a generator seeded with `e`,
/// so a resumed run needs no random state.
fn run<O: Optimizer<f32>>(
    net: &mut Sequential<f32>,
    hook: &mut OptimizerHook<O, f32>,
    data: &(ArrayD<f32>, Vec<usize>),
    start: usize,
    stop_at: Option<(usize, &Path)>,
) -> Option<()> {
    let (x, y) = data;
    let mut t = 0;
    for epoch in 0..EPOCHS {
        let mut order: Vec<usize> = (0..y.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(epoch as u64));
        let batches: Vec<&[usize]> = order.chunks(BATCH).collect();
        for (b, chunk) in batches.iter().enumerate() {
            t += 1;
            if t <= start {
                continue;
            }
            let yb: Vec<usize> = chunk.iter().map(|&i| y[i]).collect();
            let ids: Vec<ExampleId> = chunk.iter().map(|&i| ExampleId(i as u64)).collect();
            net.train_batch(rows(x, chunk).view(), &yb).unwrap();
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))
                .unwrap();
            if b + 1 == batches.len() && epoch + 1 < EPOCHS {
                hook.close_segment().unwrap();
            }
            if let Some((_, path)) = stop_at.filter(|s| s.0 == t) {
                hook.save_checkpoint(path).unwrap();
                return None;
            }
        }
    }
    Some(())
}

/// The same tensors (names, dtypes, shapes, bytes) and metadata: the files are
/// bit-identical up to the order of the header's keys (safetensors writes its
/// metadata map in hash order).
fn assert_same_file(got: &[u8], want: &[u8]) {
    use safetensors::SafeTensors;
    let (a, b) = (
        SafeTensors::deserialize(got).unwrap(),
        SafeTensors::deserialize(want).unwrap(),
    );
    let (mut na, mut nb) = (a.names(), b.names());
    na.sort_unstable();
    nb.sort_unstable();
    assert_eq!(na, nb);
    for n in na {
        let (ta, tb) = (a.tensor(n).unwrap(), b.tensor(n).unwrap());
        assert_eq!(
            (ta.dtype(), ta.shape(), ta.data()),
            (tb.dtype(), tb.shape(), tb.data()),
            "tensor {n}"
        );
    }
    let meta = |bytes: &[u8]| SafeTensors::read_metadata(bytes).unwrap().1;
    assert_eq!(meta(got).metadata(), meta(want).metadata());
}

fn sgd() -> refinement_ledger::optim::Sgd<f32> {
    SgdConfig::new(0.05)
        .with_momentum(0.9)
        .with_nesterov(true)
        .with_weight_decay(1e-3)
        .with_schedule(LrSchedule::Exponential { gamma: 0.99 })
        .build()
        .unwrap()
}

/// The uninterrupted run, then one stopped after each of `stops` and resumed
/// on a network of other initial weights: ledgers and final parameters agree bit for bit.
fn assert_resumes_identically<O: Optimizer<f32>>(new_optimizer: impl Fn() -> O, stops: &[usize]) {
    let data = images::<f32>(5, 4, 3); // 20 examples: 4 steps per epoch
    let mut net = cnn::<f32>(4, 1);
    let mut hook = OptimizerHook::new(new_optimizer(), &net.traceables()).unwrap();
    run(&mut net, &mut hook, &data, 0, None).unwrap();
    let whole = hook.finish().unwrap().to_bytes().unwrap();
    let final_params = common::augmented_params(&net);
    let dir = tempfile::tempdir().unwrap();
    for &stop in stops {
        let path = dir.path().join(format!("stop{stop}.ckpt"));
        let mut net = cnn::<f32>(4, 1);
        let mut hook = OptimizerHook::new(new_optimizer(), &net.traceables()).unwrap();
        assert!(run(&mut net, &mut hook, &data, 0, Some((stop, &path))).is_none());
        drop((net, hook)); // the process that crashed
        let mut net = cnn::<f32>(4, 99);
        let mut hook =
            OptimizerHook::resume(new_optimizer(), &mut net.traceables_mut(), &path).unwrap();
        assert_eq!(hook.n_steps(), stop as u64);
        run(&mut net, &mut hook, &data, stop, None).unwrap();
        assert_eq!(common::augmented_params(&net), final_params, "stop {stop}");
        assert_same_file(&hook.finish().unwrap().to_bytes().unwrap(), &whole);
    }
}

#[test]
fn a_resumed_run_gives_the_ledger_of_the_run_that_never_stopped() {
    // Mid-epoch (momentum shares and dense conv terms pending), at an epoch's
    // end (segment just closed), after the first step.
    assert_resumes_identically(sgd, &[1, 6, 8]);
}

#[test]
fn a_resumed_adam_run_is_identical_too() {
    let adam = || AdamConfig::new(0.01).build::<f32>().unwrap();
    assert_resumes_identically(adam, &[3, 4]);
}

/// An optimizer that says nothing about its state.
struct Opaque;
impl Optimizer<f32> for Opaque {
    fn step(&mut self, params: &mut [ParamMut<'_, f32>]) -> Result<()> {
        for p in params {
            p.value.zip_mut_with(&p.grad, |w, g| *w -= 0.1 * g);
        }
        Ok(())
    }
}

#[test]
fn checkpoints_that_do_not_fit_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let data = images::<f32>(5, 4, 3);
    let mut net = cnn::<f32>(4, 1);
    let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    run(&mut net, &mut hook, &data, 0, Some((3, &path)));

    // Another network (other layers), another optimizer kind, the other float type.
    let mut other = common::mlp::<f32>(36, 4, 0);
    let e = OptimizerHook::resume(sgd(), &mut other.traceables_mut(), &path).unwrap_err();
    assert!(matches!(e, Error::LayerMismatch { .. }), "{e}");
    let mut net = cnn::<f32>(4, 2);
    let adam = AdamConfig::new(0.01).build::<f32>().unwrap();
    let e = OptimizerHook::resume(adam, &mut net.traceables_mut(), &path).unwrap_err();
    assert!(matches!(e, Error::InvalidConfig { .. }), "{e}");
    let mut net64 = cnn::<f64>(4, 2);
    let sgd64 = SgdConfig::new(0.05).build::<f64>().unwrap();
    let e = OptimizerHook::resume(sgd64, &mut net64.traceables_mut(), &path).unwrap_err();
    assert!(matches!(e, Error::CorruptLedger { .. }), "{e}");
    // A failed resume left the network as it was.
    assert_eq!(
        common::augmented_params(&net),
        common::augmented_params(&cnn::<f32>(4, 2))
    );

    // A ledger is not a checkpoint and a checkpoint is not a ledger.
    assert!(Ledger::<f32>::load(&path).is_err());
    let ledger_path = dir.path().join("run.ledger");
    hook.snapshot().save(&ledger_path).unwrap();
    assert!(OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &ledger_path).is_err());

    // Every truncation and a flipped bit in each eighth of the file are errors.
    let bytes = std::fs::read(&path).unwrap();
    let bad = dir.path().join("bad.ckpt");
    let step = (bytes.len() / 97).max(1);
    for cut in (0..bytes.len()).step_by(step) {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        assert!(OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &bad).is_err());
    }
    for k in 0..8 {
        let mut flipped = bytes.clone();
        flipped[k * bytes.len() / 8 + 3] ^= 0x10;
        std::fs::write(&bad, &flipped).unwrap();
        assert!(
            OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &bad).is_err(),
            "bit flip in eighth {k} accepted"
        );
    }

    // An optimizer that cannot export its state cannot be checkpointed (a
    // resumed run would silently restart it); nothing is written.
    let mut net = cnn::<f32>(4, 1);
    let mut hook = OptimizerHook::new(Opaque, &net.traceables()).unwrap();
    run(&mut net, &mut hook, &data, 0, None);
    let fresh = dir.path().join("opaque.ckpt");
    let e = hook.save_checkpoint(&fresh).unwrap_err();
    assert!(e.to_string().contains("export_state"), "{e}");
    assert!(!fresh.exists());
}
