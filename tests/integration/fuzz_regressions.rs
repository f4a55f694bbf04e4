//! Inputs the fuzz targets found, replayed.

use refinement_ledger::ndarray::Array2;
use refinement_ledger::nn::{DenseConfig, Relu, Sequential};
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::rand::{SeedableRng, rngs::StdRng};
use refinement_ledger::{Batch, ExampleId, OptimizerHook};

/// api_sequence: one Nesterov step with a ghost row on a 4-1-3 network whose
/// hidden unit is dead. The last layer's update is rounding (≈ 4e-18: the
/// batch's gradients cancel), while the credited rows and the ghost's share
/// in the residual are ±0.016: the balance, relative to that vanishing change,
/// reported 0.11 for a ledger that balances to rounding.
#[test]
fn a_snapshot_after_a_nesterov_step_with_a_ghost_row_balances() {
    let mut rng = StdRng::seed_from_u64(0);
    let mut net = Sequential::<f64>::new()
        .with(DenseConfig::new(4, 1).build("fc1", &mut rng).unwrap())
        .with(Relu::new())
        .with(DenseConfig::new(1, 3).build("fc2", &mut rng).unwrap());
    let sgd = SgdConfig::new(0.1)
        .with_momentum(89.0 / 220.0)
        .with_nesterov(true)
        .build::<f64>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    let x = Array2::from_elem((3, 4), 0.5);
    let labels = [2, 0, 1];
    let ids = [ExampleId(5), ExampleId(15), ExampleId(6)];
    net.train_batch(&x, &labels).unwrap();
    let batch = Batch::new(&ids, &labels).with_ghosts(&[true, false, false]);
    hook.step(&mut net.traceables_mut(), &batch).unwrap();
    let ledger = hook.snapshot();
    let balance = ledger.parameter_balance();
    assert!(balance.iter().all(|&e| e <= 1e-9), "{balance:?}");
}
