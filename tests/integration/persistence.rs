//! Saving then loading a ledger gives identical query results; a truncated or
//! corrupted file is an error, never a wrong answer.

use crate::common;

use common::{cnn, gradient_query, query};
use refinement_ledger::{Error, LayerSel, Ledger, Lens};

fn trained() -> (
    Ledger<f32>,
    refinement_ledger::nn::Sequential<f32>,
    ndarray::ArrayD<f32>,
) {
    common::trained_cnn::<f32>(true)
}

#[test]
fn save_then_load_gives_identical_queries() {
    let (ledger, mut net, test) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.safetensors");
    ledger.save(&path).unwrap();
    let loaded = Ledger::<f32>::load(&path).unwrap();
    // Factors and dense accounts are served from the mapped file, not copied.
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        loaded.mapped_bytes() > file_len / 2,
        "{} of {file_len} bytes mapped",
        loaded.mapped_bytes()
    );
    assert_eq!(ledger.mapped_bytes(), 0);
    assert_eq!(loaded.sources(), ledger.sources());
    assert_eq!(loaded.layers(), ledger.layers());
    assert_eq!(loaded.steps_per_segment(), ledger.steps_per_segment());
    assert_eq!(loaded.bytes_per_layer(), ledger.bytes_per_layer());
    let q = query(&mut net, &test);
    for lens in [
        Lens::Dot,
        Lens::Norm,
        Lens::Cos,
        Lens::Influence,
        Lens::Share,
        Lens::Margin,
    ] {
        let a = ledger.scores(&q, lens, LayerSel::All).unwrap();
        let b = loaded.scores(&q, lens, LayerSel::All).unwrap();
        assert_eq!(a, b, "{lens:?}");
    }
    let g = gradient_query(&mut net, &test);
    assert_eq!(
        ledger.scores(&g, Lens::Loss, LayerSel::All).unwrap(),
        loaded.scores(&g, Lens::Loss, LayerSel::All).unwrap()
    );
    assert_eq!(ledger.parameter_balance(), loaded.parameter_balance());
    // The loaded ledger saves and loads again to the same answers.
    let again = Ledger::<f32>::from_bytes(&loaded.to_bytes().unwrap()).unwrap();
    let g2 = gradient_query(&mut net, &test);
    assert!(
        again.scores(&g2, Lens::Loss, LayerSel::All).unwrap()
            == ledger.scores(&g2, Lens::Loss, LayerSel::All).unwrap()
    );
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn loading_with_the_other_float_type_or_a_foreign_file_is_an_error() {
    let (ledger, _, _) = trained();
    let bytes = ledger.to_bytes().unwrap();
    let e = Ledger::<f64>::from_bytes(&bytes).unwrap_err();
    assert!(
        e.to_string().contains("float type F32, expected F64"),
        "{e}"
    );
    let e = Ledger::<f32>::from_bytes(b"not a ledger at all").unwrap_err();
    assert!(matches!(e, Error::CorruptLedger { .. }));
    let e =
        Ledger::<f32>::load(std::path::Path::new("/nonexistent/ledger.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("/nonexistent"));
}

#[test]
fn every_truncation_and_single_bit_flip_is_an_error() {
    let (ledger, _, _) = trained();
    let bytes = ledger.to_bytes().unwrap();
    let n = bytes.len();
    // Truncations at many offsets, including every byte of the header region.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize + 8;
    let mut offsets: Vec<usize> = (0..header_len.min(n)).collect();
    offsets.extend((header_len..n).step_by((n / 500).max(1)));
    offsets.push(n - 1);
    for cut in offsets {
        assert!(
            Ledger::<f32>::from_bytes(&bytes[..cut]).is_err(),
            "truncated at {cut} of {n} loaded"
        );
    }
    // Single bit flips across header and data.
    let mut flips: Vec<usize> = (0..header_len).step_by(3).collect();
    flips.extend((header_len..n).step_by((n / 2000).max(1)));
    for pos in flips {
        for bit in [0u8, 3, 7] {
            let mut b = bytes.clone();
            b[pos] ^= 1 << bit;
            assert!(
                Ledger::<f32>::from_bytes(&b).is_err(),
                "bit {bit} of byte {pos} flipped and the file loaded"
            );
        }
    }
}

#[test]
fn python_reads_a_saved_ledger_with_safetensors_and_numpy() {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        println!("SKIPPED: python3 with the safetensors and numpy packages is not available");
        return;
    }
    let (ledger, _, _) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.safetensors");
    ledger.save(&path).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/inspect_ledger.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("format refinement-ledger version 1, float type F32"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "3 layers, {} sources, 3 segments",
            ledger.sources().len()
        )),
        "{text}"
    );
    // Python sees the same numbers: the initial parameters' sum, to the last digit.
    let sum: f64 = ledger.initial_params(0).unwrap().sum();
    let line = text
        .lines()
        .find(|l| l.starts_with("layer.0.initial "))
        .expect("tensor listed");
    let py: f64 = line.rsplit("sum=").next().unwrap().parse().unwrap();
    assert!(
        (py - sum).abs() <= 1e-12 * sum.abs().max(1.0),
        "{line}: rust {sum}"
    );
    assert!(text.contains("layer.2.rows.a float32"), "{text}");
}

#[test]
fn model_parameters_round_trip_and_reject_other_networks() {
    let (_, net, test) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    net.save_params(&path).unwrap();
    let mut fresh = cnn::<f32>(4, 77);
    fresh.load_params(&path).unwrap();
    let mut net = net;
    assert!(fresh.logits(test.view()).unwrap() == net.logits(test.view()).unwrap());
    let mut other = common::mlp::<f32>(36, 4, 1);
    let before = other.traceables()[0].weight().to_owned();
    let e = other.load_params(&path).unwrap_err();
    assert!(
        matches!(e, Error::LayerMismatch { .. }) && e.to_string().contains("conv1"),
        "{e}"
    );
    assert_eq!(
        other.traceables()[0].weight(),
        before.view(),
        "a failed load changes nothing"
    );
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        fresh.load_params(&path).unwrap_err(),
        Error::CorruptLedger { .. }
    ));
}

/// Which of two ledgers (an f64 and an f32 one) the file at `path` holds.
fn which(path: &std::path::Path, a: &Ledger<f64>, b: &Ledger<f32>) -> Option<char> {
    if let Ok(l) = Ledger::<f64>::load(path) {
        return (l.sources() == a.sources() && l.parameter_balance() == a.parameter_balance())
            .then_some('a');
    }
    let l = Ledger::<f32>::load(path).ok()?;
    (l.sources() == b.sources() && l.parameter_balance() == b.parameter_balance()).then_some('b')
}

#[test]
fn concurrent_saves_to_one_path_leave_one_whole_file_and_no_temporaries() {
    let (a, _) = refinement_ledger::doc_fixture().unwrap();
    let (b, _, _) = trained();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ledger");
    for trial in 0..20 {
        std::thread::scope(|s| {
            let ta = s.spawn(|| a.save(&path));
            let tb = s.spawn(|| b.save(&path));
            ta.join().unwrap().unwrap();
            tb.join().unwrap().unwrap();
        });
        assert!(
            which(&path, &a, &b).is_some(),
            "trial {trial}: the file is neither save"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["run.ledger".to_string()], "trial {trial}");
    }
}

#[test]
fn saving_follows_a_symlink_and_refuses_what_is_not_a_regular_file() {
    let (ledger, _) = refinement_ledger::doc_fixture().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.ledger");
    let link = dir.path().join("link.ledger");
    std::os::unix::fs::symlink("real.ledger", &link).unwrap();
    ledger.save(&link).unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        Ledger::<f64>::load(&real).unwrap().sources(),
        ledger.sources()
    );
    // A folder, a pipe: clear errors, nothing replaced, no temporary left.
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    assert!(matches!(ledger.save(&folder), Err(Error::Io { .. })));
    assert!(folder.is_dir());
    let fifo = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        assert!(matches!(ledger.save(&fifo), Err(Error::Io { .. })));
        // Loading from a pipe is an error too, not a wait for a writer.
        assert!(matches!(Ledger::<f64>::load(&fifo), Err(Error::Io { .. })));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn a_file_that_could_not_be_loaded_back_is_never_written() {
    let (_, mut net) = refinement_ledger::doc_fixture().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    net.save_params(&path).unwrap();
    let good = std::fs::read(&path).unwrap();
    net.traceables_mut()[0].params_mut()[0].value[[0, 0]] = f64::NAN;
    assert!(matches!(
        net.save_params(&path),
        Err(Error::NonFinite { .. })
    ));
    assert_eq!(
        std::fs::read(&path).unwrap(),
        good,
        "the saved file is kept"
    );
}

#[test]
fn a_saved_file_gets_ordinary_permissions_or_keeps_those_it_replaces() {
    use std::os::unix::fs::PermissionsExt;
    let (ledger, _) = refinement_ledger::doc_fixture().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let plain = dir.path().join("plain");
    std::fs::File::create(&plain).unwrap();
    let path = dir.path().join("run.ledger");
    ledger.save(&path).unwrap();
    assert_eq!(
        mode(&path),
        mode(&plain),
        "a new file gets the default permissions"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    ledger.save(&path).unwrap();
    assert_eq!(mode(&path), 0o640, "a replaced file keeps its permissions");
}

#[test]
fn crafted_files_with_valid_checksums_are_errors_not_panics_or_other_ledgers() {
    // A CNN whose dense layer keeps factored rows weighted by step-group
    // coefficients, over several segments.
    let (ledger, _, _) = trained();
    let bytes = ledger.to_bytes().unwrap();
    // Unchanged, the re-encoding loads: the edits below are what fails.
    assert!(Ledger::<f32>::from_bytes(&common::reencode(&bytes, |_, _| {})).is_ok());
    type Edit = Box<
        dyn Fn(
            &mut serde_json::Value,
            &mut std::collections::BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
        ),
    >;
    let set_f64 = |name: &'static str, at: usize, v: f64| -> Edit {
        Box::new(move |_, t| {
            t.get_mut(name).unwrap().2[at * 8..at * 8 + 8].copy_from_slice(&v.to_le_bytes())
        })
    };
    let cases: Vec<(&str, Edit)> = vec![
        (
            "fan_in u64::MAX",
            Box::new(|h, _| h["layers"][0]["shape"]["fan_in"] = u64::MAX.into()),
        ),
        (
            "fan_out × fan_in overflows",
            Box::new(|h, _| {
                h["layers"][0]["shape"]["fan_out"] = (1u64 << 40).into();
                h["layers"][0]["shape"]["fan_in"] = (1u64 << 40).into();
            }),
        ),
        (
            "n_groups 4e9",
            Box::new(|h, _| h["n_groups"] = 4_000_000_000u64.into()),
        ),
        (
            "label usize::MAX",
            Box::new(|h, _| h["sources"][0]["label"] = u64::MAX.into()),
        ),
        (
            "an edited residual",
            set_f64("segment.0.layer.0.residual", 0, 1.0),
        ),
        (
            "a coefficient of 1e308",
            set_f64("segment.0.coef", 0, 1e308),
        ),
        (
            "an edited end of segment",
            set_f64("segment.1.layer.1.end", 3, 7.0),
        ),
    ];
    for (what, edit) in cases {
        let crafted = common::reencode(&bytes, |h, t| edit(h, t));
        match Ledger::<f32>::from_bytes(&crafted) {
            Err(Error::CorruptLedger { .. }) => {}
            other => panic!(
                "{what}: expected CorruptLedger, got {:?}",
                other.map(|_| "a ledger")
            ),
        }
    }
}

#[test]
fn a_loaded_ledger_whose_file_shrank_or_changed_is_an_error_not_a_crash() {
    let (ledger, mut net) = refinement_ledger::doc_fixture().unwrap();
    let q =
        refinement_ledger::Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.ledger");
    ledger.save(&path).unwrap();
    let shrunk = Ledger::<f64>::load(&path).unwrap();
    let changed = Ledger::<f64>::load(&path).unwrap();
    assert!(shrunk.scores(&q, Lens::Cos, LayerSel::All).is_ok());
    // Truncate the file under the map: reading it now would be a SIGBUS.
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    for result in [
        shrunk.scores(&q, Lens::Cos, LayerSel::All).map(|_| ()),
        shrunk.explain(&q).map(|_| ()),
        shrunk.account(0, shrunk.sources()[0].id).map(|_| ()),
        shrunk.to_bytes().map(|_| ()),
    ] {
        assert!(matches!(result, Err(Error::Io { .. })), "{result:?}");
    }
    assert!(shrunk.parameter_balance().iter().all(|b| b.is_nan()));
    // Rewritten in place (same size, new contents): also refused.
    drop(changed);
    ledger.save(&path).unwrap();
    let mapped = Ledger::<f64>::load(&path).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        mapped.scores(&q, Lens::Cos, LayerSel::All),
        Err(Error::Io { .. })
    ));
}
