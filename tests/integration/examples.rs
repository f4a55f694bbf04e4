//! The examples, compiled into this binary and run on reduced settings: they
//! train, explain, balance and write what the README says they write.

// digits and evaluate each bring the examples' `common` module, as they do
// when built as examples.
#![allow(clippy::duplicate_mod)]

#[path = "../../examples/custom_loop.rs"]
#[allow(dead_code)]
mod custom_loop;
#[path = "../../examples/digits.rs"]
#[allow(dead_code)]
mod digits;
#[path = "../../examples/evaluate/main.rs"]
#[allow(dead_code)]
mod evaluate;
#[path = "../../examples/fashion_lds/main.rs"]
#[allow(dead_code)]
mod fashion_lds;

#[test]
fn fashion_lds_example_scores_every_lens_and_writes_its_files() {
    // Fashion-MNIST when installed, else synthetic data of its shape; the
    // smallest run at which every lens, metric and file is produced.
    let dir = tempfile::tempdir().unwrap();
    let opts = fashion_lds::Opts {
        n_train: 128,
        n_test: 8,
        n_valid: 4,
        subsets: 8,
        epochs: 2,
        ..fashion_lds::Opts::quick()
    };
    let json = fashion_lds::run(opts, dir.path()).unwrap().unwrap();
    for key in [
        "test_accuracy_full",
        "test_accuracy_subset_mean",
        "ridge_c",
        "segment_ridge_c",
    ] {
        assert!(json[key].is_number(), "{key} = {}", json[key]);
    }
    let lenses = json["lenses"].as_array().unwrap();
    let names: Vec<&str> = lenses.iter().map(|l| l["lens"].as_str().unwrap()).collect();
    for name in [
        "influence",
        "share",
        "cos",
        "margin",
        "loss/final",
        "loss/epoch",
        "loss/midpoint",
        "ridge",
        "ridge/sketch",
        "ridge/segments",
        "random",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    for l in lenses {
        assert!(l["score_seconds"].is_number(), "{l}");
        let labelled = l["target"] != "predicted label";
        assert_eq!(l["mislabel_auc"].is_number(), labelled, "{l}");
        let auc = l["mislabel_auc"].as_f64().unwrap_or(0.5);
        assert!((0.0..=1.0).contains(&auc), "{l}");
        let lds = l["lds_mean"].as_f64();
        assert!(lds.is_none_or(|v| (-1.0..=1.0).contains(&v)), "{l}");
    }
    let bytes = std::fs::read(dir.path().join("fashion_scores.safetensors")).unwrap();
    let scores = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(scores.len(), lenses.len());
    for (_, t) in scores.tensors() {
        assert_eq!(t.shape(), &[8, 128]);
    }
    let truth: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("fashion_ground_truth.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(truth["subsets"].as_array().unwrap().len(), 8);
    assert_eq!(truth["test_margins"][0].as_array().unwrap().len(), 8);
}

#[test]
fn fashion_lds_online_comparison_scores_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let opts = fashion_lds::Opts {
        n_train: 128,
        n_test: 8,
        n_valid: 4,
        subsets: 8,
        epochs: 2,
        online_dims: 64,
        ..fashion_lds::Opts::quick()
    };
    let json = fashion_lds::online::run_online(opts, dir.path())
        .unwrap()
        .unwrap();
    // The online run's count of what the exact ledger holds is the exact
    // ledger's size (both uncompacted rows of a short run).
    let (exact, estimate) = (
        json["exact_bytes"].as_f64().unwrap(),
        json["online_exact_bytes_estimate"].as_f64().unwrap(),
    );
    assert!(
        (estimate - exact).abs() <= 0.05 * exact,
        "{estimate} vs {exact}"
    );
    assert!(json["bytes_ratio"].as_f64().unwrap() > 1.0);
    let lenses = json["lenses"].as_array().unwrap();
    let names: Vec<&str> = lenses.iter().map(|l| l["lens"].as_str().unwrap()).collect();
    assert_eq!(names, ["influence", "share", "loss/final", "ridge"]);
    for l in lenses {
        let overlap = l["top10_overlap_online"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&overlap), "{l}");
        // Online and offline sketches are the same projection of the same
        // accounts (up to rounding, which may swap a near tie).
        let offline = l["top10_overlap_offline"].as_f64().unwrap();
        assert!((overlap - offline).abs() <= 0.1, "{l}");
    }
    for e in json["online_balance_error"].as_array().unwrap() {
        assert!(e.as_f64().unwrap() < 1e-2, "{e}");
    }
    assert!(dir.path().join("fashion_online.json").exists());
}

#[test]
fn custom_loop_example_explains_a_prediction_and_balances() {
    let out = custom_loop::run().unwrap();
    assert!(out.predicted < 3, "{out:?}");
    assert_eq!(out.rankings, 4, "two lenses at two layers: {out:?}");
    assert_eq!(out.balance_errors.len(), 2, "{out:?}");
    assert!(out.balance_errors.iter().all(|&e| e < 1e-4), "{out:?}");
}

#[test]
fn digits_example_trains_explains_and_writes_a_well_formed_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = digits::run(true, dir.path()).unwrap();
    let [mlp, cnn] = out.accuracy;
    assert!(mlp > 0.8 && cnn > 0.5, "3 epochs: mlp {mlp}, cnn {cnn}");
    let html = std::fs::read_to_string(&out.report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert_eq!(html.matches("<div").count(), html.matches("</div>").count());
    // One ridge plot per traced layer for each of the 4 explained digits.
    for layer in ["fc1", "fc2", "conv1", "conv2", "fc"] {
        let title = format!("{layer} (predicted ");
        let ridge_titles = html
            .lines()
            .filter(|l| l.trim_start().starts_with(&title))
            .count();
        assert_eq!(ridge_titles, 4, "ridge plots of {layer}");
    }
    assert!(html.contains("data:image/png;base64,"));
}

#[test]
fn evaluation_example_writes_every_lens_and_metric() {
    // One test point per deletion test and ridge validation: every lens and
    // metric is computed, at the smallest size that does.
    let opts = evaluate::Opts {
        deletion_points: 1,
        validation_points: 1,
        ..evaluate::Opts::quick()
    };
    let json = evaluate::run(opts).unwrap();
    for section in [&json, &json["cnn"]] {
        let lenses = section["lenses"].as_object().unwrap();
        for name in [
            "influence/all",
            "cos/all",
            "loss/final",
            "loss/epoch",
            "loss/midpoint",
            "margin",
            "ridge",
            "ridge/segments",
            "random",
        ] {
            let l = &lenses[name];
            for key in [
                "class_agreement_at_10",
                "mislabel_auc",
                "deletion_margin_drop",
                "deletion_prob_drop",
                "query_seconds",
                "lds",
            ] {
                assert!(l[key].is_number(), "{name}.{key} = {}", l[key]);
            }
        }
        let random_auc = lenses["random"]["mislabel_auc"].as_f64().unwrap();
        assert!((0.3..0.7).contains(&random_auc), "random AUC {random_auc}");
    }
}
