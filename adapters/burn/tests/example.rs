//! The example runs (one epoch per network): it trains with burn's SGD,
//! balances, and explains the test digits.

#[path = "../examples/burn_digits.rs"]
#[allow(dead_code)]
mod burn_digits;

#[test]
fn the_example_traces_an_mlp_and_a_cnn_and_balances() {
    for image in [false, true] {
        let out = burn_digits::run_one(image, 1).unwrap();
        assert!(out.accuracy > 0.3, "{out:?}");
        assert!(out.residual_fraction.iter().all(|&r| r < 1e-5), "{out:?}");
        assert_eq!(out.neighbours.len(), 4);
        assert!(out.neighbours.iter().all(|n| n.len() == 5));
    }
}
