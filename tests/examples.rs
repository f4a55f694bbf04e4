//! The examples run and print what the README says they print.

use std::process::Command;

fn run_example(name: &str) -> String {
    let out = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--example", name])
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
