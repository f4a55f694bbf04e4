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

/// ledger_structured: a sketch header claiming a layer of 3.5e18 inputs and as
/// many dimensions. The projection operators were built from the header before
/// the tensors were read, and asked for an array of 4 × 3.5e18 values (a panic
/// in ndarray). Now the tensors bound the sizes first, and operators past
/// 2²⁸ values are refused.
#[test]
fn a_sketch_header_with_absurd_dimensions_is_an_error() {
    use refinement_ledger::query::{LedgerSketch, Projection, SketchConfig};
    let (ledger, _) = crate::sketch::trained_mlp();
    for projection in [Projection::Tensor, Projection::Kronecker] {
        let config = SketchConfig::with_dims(8).projection(projection);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sketch");
        LedgerSketch::build(&ledger, &config)
            .unwrap()
            .save(&path)
            .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for (fan_in, dims) in [
            (
                3_530_822_107_925_577_729usize,
                3_530_822_107_925_577_729usize,
            ),
            (1 << 20, 1 << 16),
        ] {
            let crafted = crate::common::reencode(&bytes, |payload, _| {
                payload["layers"][0]["shape"]["fan_in"] = fan_in.into();
                payload["dims"][0] = dims.into();
                if projection == Projection::Kronecker {
                    payload["k_out"][0] = 1.into();
                }
            });
            assert!(
                LedgerSketch::from_bytes(&crafted).is_err(),
                "{projection:?} {fan_in} {dims}"
            );
        }
    }
}
