//! Structure-aware fuzzing of the ledger, sketch and checkpoint loaders: the
//! input is a list of edits to a valid ledger, sketch or training checkpoint (numbers, flags and arrays of the
//! header's JSON payload; values, bytes, shapes and presence of tensors), and
//! the checksum is recomputed afterwards, so what is tested is the loader's
//! validation past the checksum — not the checksum. A file that loads must
//! answer queries and save to bytes that load again; anything else must be an
//! `Error`, never a panic, an abort or a hang. A checkpoint that resumes must
//! train on, and what it then saves (ledger or checkpoint) must load back.
//! Run on stable: `cargo fuzz run -s none ledger_structured`.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

use refinement_ledger::ndarray::{Array1, Array2, Array3, ArrayD};
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::{Sgd, SgdConfig};
use refinement_ledger::query::LedgerSketch;
use refinement_ledger::rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::{
    Batch, CapturedLayer, ExampleId, Lens, Ledger, OptimizerHook, Query, Scorer, Traceable,
};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

const SEEDS: [&[u8]; 3] = [
    include_bytes!("../corpus/ledger_load/small.safetensors"),
    include_bytes!("../corpus/ledger_load/small.sketch"),
    // Recorded online with a Kronecker projection (format version 2).
    include_bytes!("../corpus/ledger_load/small_kronecker.sketch"),
];

#[derive(Arbitrary, Debug)]
enum Edit {
    /// The `index`-th number of the payload (in a depth-first walk) becomes `value`.
    Integer { index: u16, value: i64 },
    /// The `index`-th number becomes a float (large, tiny, negative).
    Float { index: u16, value: f64 },
    /// The `index`-th boolean is flipped.
    Flip { index: u16 },
    /// The `index`-th array loses its last element.
    Shorten { index: u16 },
    /// The `index`-th array repeats its last element.
    Lengthen { index: u16 },
    /// Eight bytes of a tensor's data are overwritten.
    Bytes { tensor: u8, offset: u32, bytes: [u8; 8] },
    /// One element of a float tensor becomes `value` (NaN, ±inf, 1e308, …).
    Value { tensor: u8, element: u32, value: f64 },
    /// A tensor gets another shape; its data is cut or padded with zeros.
    Shape { tensor: u8, dims: Vec<u16> },
    /// A tensor is removed.
    Drop { tensor: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// 0: ledger, 1: sketch, 2: checkpoint, 3: Kronecker sketch.
    kind: u8,
    edits: Vec<Edit>,
}

/// The checkpoint's network: dense 3→4, ReLU, dense 4→2 (weights from `seed`).
fn network(seed: u64) -> Sequential<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    Sequential::new()
        .with(DenseConfig::new(3, 4).build("fc1", &mut rng).unwrap())
        .with(Relu::new())
        .with(DenseConfig::new(4, 2).build("fc2", &mut rng).unwrap())
}

fn sgd() -> Sgd<f64> {
    SgdConfig::new(0.1).with_momentum(0.9).with_nesterov(true).with_weight_decay(1e-3).build().unwrap()
}

/// One training step on rows `t % 4` and `(t + 1) % 4` of a fixed data set.
fn train(net: &mut Sequential<f64>, hook: &mut OptimizerHook<Sgd<f64>, f64>, t: u64) -> refinement_ledger::Result<()> {
    let x = [[1.0, 0.0, 0.5], [0.0, 1.0, -0.5], [0.3, 0.3, 0.3], [-1.0, 0.2, 0.0]];
    let rows = [(t % 4) as usize, ((t + 1) % 4) as usize];
    let xb = Array2::from_shape_fn((2, 3), |(i, j)| x[rows[i]][j]);
    let y: Vec<usize> = rows.iter().map(|&r| r % 2).collect();
    let ids: Vec<ExampleId> = rows.iter().map(|&r| ExampleId(r as u64)).collect();
    net.train_batch(xb.view().into_dyn(), &y)?;
    hook.step(&mut net.traceables_mut(), &Batch::new(&ids, &y))
}

/// A valid checkpoint: six steps, a segment closed after four.
fn checkpoint_seed() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let mut net = network(0);
        let mut hook = OptimizerHook::new(sgd(), &net.traceables()).unwrap();
        for t in 0..6 {
            train(&mut net, &mut hook, t).unwrap();
            if t == 3 {
                hook.close_segment().unwrap();
            }
        }
        let path = temp("seed.ckpt");
        hook.save_checkpoint(&path).unwrap();
        std::fs::read(&path).unwrap()
    })
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fuzz-{}-{name}", std::process::id()))
}

/// Resumes from an edited checkpoint; if that works, trains on, and whatever
/// saves must load back.
fn exercise_checkpoint(bytes: &[u8]) {
    let path = temp("edited.ckpt");
    std::fs::write(&path, bytes).unwrap();
    let mut net = network(1);
    let Ok(mut hook) = OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &path) else {
        return;
    };
    for t in 0..3 {
        if train(&mut net, &mut hook, t).is_err() {
            break;
        }
    }
    let _ = hook.close_segment();
    if let Ok(bytes) = hook.snapshot().to_bytes() {
        Ledger::<f64>::from_bytes(&bytes).expect("a ledger the crate saved must load back");
    }
    let again = temp("again.ckpt");
    if hook.save_checkpoint(&again).is_ok() {
        let mut net = network(2);
        OptimizerHook::resume(sgd(), &mut net.traceables_mut(), &again)
            .expect("a checkpoint the crate saved must resume");
    }
    if let Ok(ledger) = hook.finish() {
        exercise(&ledger);
    }
}

/// A tensor of the file being edited.
struct Owned {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn size_of(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F64 | Dtype::U64 | Dtype::I64 => 8,
        Dtype::F32 | Dtype::U32 | Dtype::I32 => 4,
        Dtype::F16 | Dtype::BF16 | Dtype::U16 | Dtype::I16 => 2,
        _ => 1,
    }
}

/// Visits the payload's values depth-first; `f` sees each with a counter per kind.
fn walk(v: &mut Value, f: &mut dyn FnMut(&mut Value)) {
    f(v);
    match v {
        Value::Array(a) => a.iter_mut().for_each(|x| walk(x, f)),
        Value::Object(o) => o.values_mut().for_each(|x| walk(x, f)),
        _ => {}
    }
}

fn edit_payload(payload: &mut Value, index: u16, kind: &dyn Fn(&Value) -> bool, act: &dyn Fn(&mut Value)) {
    let mut seen = 0u16;
    walk(payload, &mut |v| {
        if kind(v) {
            if seen == index {
                act(v);
            }
            seen = seen.wrapping_add(1);
        }
    });
}

fn apply(edit: &Edit, payload: &mut Value, tensors: &mut Vec<Owned>) {
    let pick = |t: u8, n: usize| (n > 0).then(|| t as usize % n);
    match edit {
        Edit::Integer { index, value } => {
            edit_payload(payload, *index, &|v| v.is_number(), &|v| *v = Value::from(*value))
        }
        Edit::Float { index, value } => edit_payload(payload, *index, &|v| v.is_number(), &|v| {
            if let Some(n) = serde_json::Number::from_f64(*value) {
                *v = Value::Number(n);
            }
        }),
        Edit::Flip { index } => edit_payload(payload, *index, &|v| v.is_boolean(), &|v| {
            *v = Value::Bool(!v.as_bool().unwrap_or(false))
        }),
        Edit::Shorten { index } => edit_payload(payload, *index, &|v| v.is_array(), &|v| {
            if let Value::Array(a) = v {
                a.pop();
            }
        }),
        Edit::Lengthen { index } => edit_payload(payload, *index, &|v| v.is_array(), &|v| {
            if let Value::Array(a) = v {
                if let Some(last) = a.last().cloned() {
                    a.push(last);
                }
            }
        }),
        Edit::Bytes { tensor, offset, bytes } => {
            if let Some(i) = pick(*tensor, tensors.len()) {
                let data = &mut tensors[i].data;
                if !data.is_empty() {
                    let at = *offset as usize % data.len();
                    for (k, b) in bytes.iter().enumerate() {
                        if let Some(d) = data.get_mut(at + k) {
                            *d = *b;
                        }
                    }
                }
            }
        }
        Edit::Value { tensor, element, value } => {
            if let Some(i) = pick(*tensor, tensors.len()) {
                let t = &mut tensors[i];
                let n = t.data.len() / size_of(t.dtype).max(1);
                if n > 0 {
                    let e = *element as usize % n;
                    match t.dtype {
                        Dtype::F64 => t.data[e * 8..e * 8 + 8].copy_from_slice(&value.to_le_bytes()),
                        Dtype::F32 => {
                            t.data[e * 4..e * 4 + 4].copy_from_slice(&(*value as f32).to_le_bytes())
                        }
                        Dtype::U32 => t.data[e * 4..e * 4 + 4]
                            .copy_from_slice(&(*value as i64 as u32).to_le_bytes()),
                        _ => {}
                    }
                }
            }
        }
        Edit::Shape { tensor, dims } => {
            if let Some(i) = pick(*tensor, tensors.len()) {
                let t = &mut tensors[i];
                let shape: Vec<usize> = dims.iter().take(4).map(|&d| d as usize % 64).collect();
                let bytes = shape.iter().product::<usize>() * size_of(t.dtype);
                t.data.resize(bytes, 0);
                t.shape = shape;
            }
        }
        Edit::Drop { tensor } => {
            if let Some(i) = pick(*tensor, tensors.len()) {
                tensors.remove(i);
            }
        }
    }
}

/// The file with its edits and a checksum that matches them.
fn rebuild(seed: &[u8], input: &Input) -> Option<Vec<u8>> {
    let (_, meta) = SafeTensors::read_metadata(seed).ok()?;
    let mut info = meta.metadata().clone()?;
    let st = SafeTensors::deserialize(seed).ok()?;
    let mut tensors: Vec<Owned> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| Owned {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let mut payload: Value = serde_json::from_str(info.get("payload")?).ok()?;
    for edit in input.edits.iter().take(16) {
        apply(edit, &mut payload, &mut tensors);
    }
    let payload = payload.to_string();
    let mut crc = crc32fast::Hasher::new();
    crc.update(payload.as_bytes());
    for t in &tensors {
        crc.update(&t.data);
    }
    info.insert("crc32".into(), format!("{:08x}", crc.finalize()));
    info.insert("payload".into(), payload);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .filter_map(|t| Some((t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).ok()?)))
        .collect();
    safetensors::serialize(views, Some(info)).ok()
}

/// Queries a loaded ledger with a query of ones at every layer.
fn exercise<F: refinement_ledger::Float>(ledger: &Ledger<F>) {
    let _ = ledger.parameter_balance();
    let _ = ledger.residual_fraction();
    let bytes = ledger.to_bytes().expect("a ledger that loaded must save");
    Ledger::<F>::from_bytes(&bytes).expect("a ledger the crate saved must load back");
    let layers: Option<Vec<CapturedLayer<F>>> = ledger
        .layers()
        .iter()
        .map(|m| {
            let s = &m.shape;
            if s.fan_in.saturating_mul(s.fan_out) > 1 << 16 {
                return None;
            }
            let w = ArrayD::<F>::zeros(vec![s.fan_out, s.fan_in]);
            let b = s.has_bias.then(|| Array1::<F>::zeros(s.fan_out));
            CapturedLayer::new(&m.id.to_string(), w, b)
                .ok()?
                .with_factors(Array3::ones((1, 1, s.fan_in)), Some(Array3::ones((1, 1, s.fan_out))), 1)
                .ok()
        })
        .collect();
    if let Some(layers) = layers {
        let layers: Vec<&dyn Traceable<F>> = layers.iter().map(|l| l as &dyn Traceable<F>).collect();
        if let Ok(q) = Query::with_gradients(&layers) {
            let _ = ledger.explain(&q);
            let _ = ledger.class_attribution(&q, None);
            for lens in [Lens::Influence, Lens::Cos, Lens::Loss] {
                if let Ok(scores) = ledger.lens(lens).scores(&q) {
                    let _ = scores.top_k(0, 3);
                }
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let seed = match input.kind % 4 {
        2 => checkpoint_seed(),
        3 => SEEDS[2],
        k => SEEDS[usize::from(k)],
    };
    let Some(bytes) = rebuild(seed, &input) else {
        return;
    };
    if input.kind % 4 == 2 {
        exercise_checkpoint(&bytes);
        return;
    }
    if let Ok(ledger) = Ledger::<f32>::from_bytes(&bytes) {
        exercise(&ledger);
    }
    if let Ok(ledger) = Ledger::<f64>::from_bytes(&bytes) {
        exercise(&ledger);
    }
    if let Ok(sketch) = LedgerSketch::from_bytes(&bytes) {
        let _ = sketch.balance_error();
        let _ = sketch.bytes_per_layer();
        let _ = sketch.ridge(0.1);
        let path = std::env::temp_dir().join(format!("fuzz-{}.sketch", std::process::id()));
        sketch.save(&path).expect("a sketch that loaded must save");
        LedgerSketch::load(&path).expect("a sketch the crate saved must load back");
    }
});
