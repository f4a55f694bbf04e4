//! The examples run and print what the README says they print.

use std::process::Command;

fn run_example(name: &str) -> String {
    run_example_args(name, &[])
}

fn run_example_args(name: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", name, "--"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn custom_loop_example_explains_a_prediction_and_balances() {
    let out = run_example("custom_loop");
    assert!(out.contains("predicted class"), "{out}");
    assert_eq!(out.matches("top proponents").count(), 4, "{out}");
    let errors: Vec<f64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("balance error at "))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(errors.len(), 2, "{out}");
    assert!(errors.iter().all(|&e| e < 1e-4), "{errors:?}");
}

fn parse_after(out: &str, prefix: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in:\n{out}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn digits_example_trains_explains_and_writes_a_well_formed_report() {
    let out = run_example_args("digits", &["--quick"]);
    let mlp = parse_after(&out, "mlp test accuracy: ");
    let cnn = parse_after(&out, "cnn test accuracy: ");
    assert!(mlp > 0.8 && cnn > 0.5, "3 epochs: mlp {mlp}, cnn {cnn}");
    assert!(
        out.contains("top-5 proponents (influence)") && out.contains("class attribution at fc1")
    );
    let report_line = out
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .expect("report path printed");
    let html =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(report_line))
            .unwrap();
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
    let out = run_example_args("evaluate", &["--quick"]);
    assert!(
        out.contains("| mlp lens |") && out.contains("| cnn lens |"),
        "{out}"
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/evaluation/digits.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
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
            "random",
        ] {
            let l = &lenses[name];
            for key in [
                "class_agreement_at_10",
                "mislabel_auc",
                "deletion_margin_drop",
                "deletion_prob_drop",
                "query_seconds",
            ] {
                assert!(l[key].is_number(), "{name}.{key} = {}", l[key]);
            }
        }
        let random_auc = lenses["random"]["mislabel_auc"].as_f64().unwrap();
        assert!((0.3..0.7).contains(&random_auc), "random AUC {random_auc}");
    }
}
