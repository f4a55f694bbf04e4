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
/// its epoch's segment close) and returns `false`, as a run that crashed after
/// checkpointing. Epoch `e`'s order is shuffled by a generator seeded with `e`,
/// so a resumed run needs no random state.
fn run<O: Optimizer<f32>>(
    net: &mut Sequential<f32>,
    hook: &mut OptimizerHook<O, f32>,
    data: &(ArrayD<f32>, Vec<usize>),
    start: usize,
    stop_at: Option<(usize, &Path)>,
) -> Result<bool> {
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
            net.train_batch(rows(x, chunk).view(), &yb)?;
            hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &yb))?;
            if b + 1 == batches.len() && epoch + 1 < EPOCHS {
                hook.close_segment()?;
            }
            if let Some((_, path)) = stop_at.filter(|s| s.0 == t) {
                hook.save_checkpoint(path)?;
                return Ok(false);
            }
        }
    }
    Ok(true)
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
    assert!(run(&mut net, &mut hook, &data, 0, None).unwrap());
    let whole = hook.finish().unwrap().to_bytes().unwrap();
    let final_params = common::augmented_params(&net);
    let dir = tempfile::tempdir().unwrap();
    for &stop in stops {
        let path = dir.path().join(format!("stop{stop}.ckpt"));
        let mut net = cnn::<f32>(4, 1);
        let mut hook = OptimizerHook::new(new_optimizer(), &net.traceables()).unwrap();
        assert!(!run(&mut net, &mut hook, &data, 0, Some((stop, &path))).unwrap());
        drop((net, hook)); // the process that crashed
        let mut net = cnn::<f32>(4, 99);
        let mut hook =
            OptimizerHook::resume(new_optimizer(), &mut net.traceables_mut(), &path).unwrap();
        assert_eq!(hook.n_steps(), stop as u64);
        assert!(run(&mut net, &mut hook, &data, stop, None).unwrap());
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
    run(&mut net, &mut hook, &data, 0, Some((3, &path))).unwrap();

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
    run(&mut net, &mut hook, &data, 0, None).unwrap();
    let fresh = dir.path().join("opaque.ckpt");
    let e = hook.save_checkpoint(&fresh).unwrap_err();
    assert!(e.to_string().contains("export_state"), "{e}");
    assert!(!fresh.exists());
}

/// A checkpoint edited with a valid checksum (a crafted or buggy writer):
/// inconsistent counters and groups are errors at resume; a huge but finite
/// value anywhere either is refused at resume or, once trained on, makes
/// saving an error — never a file that cannot be loaded back, never a panic.
#[test]
fn crafted_checkpoints_are_errors_or_train_on_to_files_that_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ckpt");
    let data = images::<f32>(5, 4, 3);
    let mut net = cnn::<f32>(4, 1);
    let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
    run(&mut net, &mut hook, &data, 0, Some((6, &path))).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let resume = |crafted: Vec<u8>| {
        let file = dir.path().join("crafted.ckpt");
        std::fs::write(&file, crafted).unwrap();
        let mut net = cnn::<f32>(4, 2);
        let hook = OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &file);
        (hook, net)
    };
    assert!(resume(common::reencode(&bytes, |_, _| {})).0.is_ok());
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let corrupt: Vec<(&str, Edit)> = vec![
        ("step count", Box::new(|h| h["step"] = 5.into())),
        (
            "pending groups out of order",
            Box::new(|h| h["pending"][1][0] = h["pending"][0][0].clone()),
        ),
        (
            "pending group beyond those opened",
            Box::new(|h| h["pending"][0][0] = 1_000.into()),
        ),
        (
            "pending term's source",
            Box::new(|h| h["pending"][0][1][0][1] = 1_000_000.into()),
        ),
        (
            "a pending term listed twice",
            Box::new(|h| {
                let terms = h["pending"][0][1].as_array_mut().unwrap();
                terms.push(terms[0].clone());
            }),
        ),
    ];
    for (what, edit) in corrupt {
        let (got, _) = resume(common::reencode(&bytes, |h, _| edit(h)));
        assert!(
            matches!(got, Err(Error::CorruptLedger { .. })),
            "{what}: {:?}",
            got.map(|_| "resumed")
        );
    }
    let names: Vec<String> = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect();
    let mut refused_at_save = 0;
    for name in names {
        let crafted = common::reencode(&bytes, |_, t| {
            let (dtype, _, data) = t.get_mut(&name).unwrap();
            match dtype {
                safetensors::Dtype::F64 if data.len() >= 8 => {
                    data[..8].copy_from_slice(&1.1e243f64.to_le_bytes())
                }
                safetensors::Dtype::F32 if data.len() >= 4 => {
                    data[..4].copy_from_slice(&3e38f32.to_le_bytes())
                }
                _ => {}
            }
        });
        let (Ok(mut hook), mut net) = resume(crafted) else {
            continue;
        };
        let _ = run(&mut net, &mut hook, &data, 6, None);
        match hook.snapshot().to_bytes() {
            Ok(saved) => {
                Ledger::<f32>::from_bytes(&saved).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::CorruptLedger { .. } | Error::NonFinite { .. }),
                    "{name}: {e}"
                );
                refused_at_save += 1;
            }
        }
    }
    assert!(refused_at_save > 0, "no edit reached the save-time check");
}

/// An optimizer outside the hook (a framework's): the hook's checkpoint holds
/// the ledger and the parameters, the framework's checkpoint its optimizer
/// (here a clone); resumed, the ledger is identical to the uninterrupted one.
#[test]
fn an_external_optimizer_run_resumes_identically() {
    use common::hand::HandSgd;
    use refinement_ledger::{External, HookConfig};
    let (x, y) = common::blobs::<f64>(4, 3, 4, 5);
    let step = |t: usize| -> (Vec<usize>, Vec<usize>, Vec<ExampleId>) {
        let idx: Vec<usize> = (0..4).map(|k| (t * 5 + k * 3) % y.len()).collect();
        let yb = idx.iter().map(|&i| y[i]).collect();
        let ids = idx.iter().map(|&i| ExampleId(i as u64)).collect();
        (idx, yb, ids)
    };
    let train = |net: &mut Sequential<f64>,
                 hook: &mut OptimizerHook<External, f64>,
                 sgd: &mut HandSgd,
                 steps: std::ops::Range<usize>| {
        for t in steps {
            let (idx, yb, ids) = step(t);
            net.train_batch(rows(&x, &idx).view(), &yb).unwrap();
            let grads = HandSgd::grads(net);
            let rule = sgd.rule();
            sgd.step(net, &grads, 1.0);
            hook.record_step(&net.traceables(), &Batch::new(&ids, &yb), Some(rule))
                .unwrap();
        }
    };
    let new_sgd = || HandSgd::new(0.1, 0.9, 0.0, true, 1e-3);
    let mut net = common::mlp::<f64>(4, 3, 1);
    let mut hook = OptimizerHook::external(&net.traceables(), HookConfig::default()).unwrap();
    let mut sgd = new_sgd();
    train(&mut net, &mut hook, &mut sgd, 0..8);
    let whole = hook.finish().unwrap().to_bytes().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("external.ckpt");
    let mut net = common::mlp::<f64>(4, 3, 1);
    let mut hook = OptimizerHook::external(&net.traceables(), HookConfig::default()).unwrap();
    let mut sgd = new_sgd();
    train(&mut net, &mut hook, &mut sgd, 0..3);
    hook.save_checkpoint(&path).unwrap();
    let mut saved_sgd = sgd.clone(); // the framework's own checkpoint
    let mut net = common::mlp::<f64>(4, 3, 9);
    let mut hook = OptimizerHook::resume(External, &mut net.traceables_mut(), &path).unwrap();
    assert!(hook.is_per_example());
    train(&mut net, &mut hook, &mut saved_sgd, 3..8);
    assert_same_file(&hook.finish().unwrap().to_bytes().unwrap(), &whole);
}
