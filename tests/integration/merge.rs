//! Ledgers of the shards of a data-parallel run merge into the ledger of the
//! combined run.

use crate::common;

use common::{assert_allclose, blobs, mlp, query, rows};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::{Batch, ExampleId, LayerSel, Ledger, Lens, OptimizerHook};

/// Trains two identical replicas on the same global batches, each hook crediting
/// only its shard (the other shard's rows are ghosts); and a third, combined run.
fn sharded_run(
    momentum: f64,
    decay: f64,
    segments: bool,
) -> (Ledger<f64>, Ledger<f64>, Ledger<f64>, Sequential<f64>) {
    let (x, y) = blobs::<f64>(6, 3, 4, 3);
    let cfg = SgdConfig::new(0.05)
        .with_momentum(momentum)
        .with_weight_decay(decay);
    let mut nets: Vec<Sequential<f64>> = (0..3).map(|_| mlp(4, 3, 8)).collect();
    let mut hooks: Vec<_> = nets
        .iter()
        .map(|n| OptimizerHook::new(cfg.build::<f64>().unwrap(), &n.traceables()).unwrap())
        .collect();
    let n = y.len();
    for epoch in 0..3 {
        for b in 0..3 {
            let idx: Vec<usize> = (0..6).map(|k| (b * 6 + k + epoch) % n).collect();
            let yb: Vec<usize> = idx.iter().map(|&i| y[i]).collect();
            let ids: Vec<ExampleId> = idx.iter().map(|&i| ExampleId(i as u64)).collect();
            let shard: Vec<bool> = idx.iter().map(|&i| i % 2 == 0).collect();
            let not: Vec<bool> = shard.iter().map(|s| !s).collect();
            for (r, (net, hook)) in nets.iter_mut().zip(hooks.iter_mut()).enumerate() {
                net.train_batch(rows(&x, &idx).view(), &yb).unwrap();
                let batch = Batch::new(&ids, &yb);
                let batch = match r {
                    0 => batch.with_ghosts(&not),   // shard A credits the even examples
                    1 => batch.with_ghosts(&shard), // shard B the odd ones
                    _ => batch,
                };
                hook.step(&mut net.traceables_mut(), &batch).unwrap();
            }
        }
        if segments && epoch < 2 {
            hooks.iter_mut().for_each(|h| h.close_segment().unwrap());
        }
    }
    let mut ledgers: Vec<Ledger<f64>> = hooks.into_iter().map(|h| h.finish().unwrap()).collect();
    let c = ledgers.pop().unwrap();
    let b = ledgers.pop().unwrap();
    let a = ledgers.pop().unwrap();
    (a, b, c, nets.pop().unwrap())
}

#[test]
fn merged_shards_equal_the_combined_run() {
    for (momentum, decay, segments) in [(0.0, 0.0, false), (0.9, 1e-3, false), (0.9, 1e-3, true)] {
        let (a, b, c, mut net) = sharded_run(momentum, decay, segments);
        let merged = a.merge(&b).unwrap();
        assert_eq!(merged.sources().len(), c.sources().len());
        for l in 0..c.layers().len() {
            for s in c.sources() {
                let want = c.account(l, s.id).unwrap().into_dyn();
                let got = merged.account(l, s.id).unwrap().into_dyn();
                assert_allclose(&got, &want, 1e-9, 1e-14, &format!("{} layer {l}", s.id));
            }
            assert_allclose(
                &merged.residual(l).unwrap().into_dyn(),
                &c.residual(l).unwrap().into_dyn(),
                0.0,
                1e-12,
                "residual",
            );
        }
        assert!(merged.parameter_balance().iter().all(|&e| e < 1e-9));
        let (test, _) = blobs::<f64>(2, 3, 4, 30);
        let q = query(&mut net, &test);
        let (m, w) = (
            merged.scores(&q, Lens::Influence, LayerSel::All).unwrap(),
            c.scores(&q, Lens::Influence, LayerSel::All).unwrap(),
        );
        // Columns follow each ledger's own source order.
        for (j, s) in c.sources().iter().enumerate() {
            let k = merged.source_index(s.id).unwrap();
            for qi in 0..q.len() {
                assert!((m[[qi, k]] - w[[qi, j]]).abs() <= 1e-9 * w[[qi, j]].abs().max(1e-9));
            }
        }
    }
}

#[test]
fn merging_ledgers_of_different_runs_is_an_error() {
    let (a, _, _, _) = sharded_run(0.9, 0.0, false);
    let (b, _, _, _) = sharded_run(0.5, 0.0, false);
    let e = a.merge(&b).unwrap_err();
    assert!(
        e.to_string().contains("coefficients differ")
            || e.to_string().contains("different parameters"),
        "{e}"
    );
    let e = a.merge(&a).unwrap_err();
    assert!(e.to_string().contains("in both shards"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 16, ..Default::default() })]

    /// Any momentum, decay, Nesterov and segmenting: merged shards equal the combined run.
    #[test]
    fn merging_shards_equals_the_combined_run_for_random_settings(
        momentum in 0.0f64..0.95,
        decay in 0.0f64..0.01,
        segments in proptest::prelude::any::<bool>(),
    ) {
        let (a, b, c, _) = sharded_run(momentum, decay, segments);
        let merged = a.merge(&b).unwrap();
        for l in 0..c.layers().len() {
            for s in c.sources() {
                let (want, got) = (c.account(l, s.id).unwrap(), merged.account(l, s.id).unwrap());
                let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
                let err = (&got - &want).iter().fold(0.0f64, |m, v| m.max(v.abs())) / scale;
                proptest::prop_assert!(err <= 1e-9, "{} layer {l}: relative error {err:e}", s.id);
            }
        }
        for e in merged.parameter_balance() {
            proptest::prop_assert!(e <= 1e-9);
        }
    }
}

/// Data-parallel training as frameworks do it: each rank runs only its shard
/// of the global batch, the ranks average their gradients, and each rank's
/// optimizer steps on the average; each hook records its shard.
#[test]
fn shards_that_see_only_their_rows_merge_into_the_single_process_ledger() {
    use common::hand::HandSgd;
    use refinement_ledger::HookConfig;
    let (x, y) = blobs::<f64>(6, 3, 4, 3);
    let n = y.len();
    let global: Vec<Vec<usize>> = (0..9)
        .map(|t| (0..6).map(|k| (t * 6 + k + t / 3) % n).collect())
        .collect();
    // The single process.
    let mut net = mlp::<f64>(4, 3, 8);
    let cfg = SgdConfig::new(0.05)
        .with_momentum(0.9)
        .with_weight_decay(1e-3);
    let mut single = OptimizerHook::new(cfg.build().unwrap(), &net.traceables()).unwrap();
    // Two ranks.
    let mut nets = [mlp::<f64>(4, 3, 8), mlp::<f64>(4, 3, 8)];
    let mut sgds = [
        HandSgd::new(0.05, 0.9, 0.0, false, 1e-3),
        HandSgd::new(0.05, 0.9, 0.0, false, 1e-3),
    ];
    let mut ranks: Vec<_> = nets
        .iter()
        .map(|n| OptimizerHook::external(&n.traceables(), HookConfig::default()).unwrap())
        .collect();
    for (t, idx) in global.iter().enumerate() {
        let ids = |idx: &[usize]| idx.iter().map(|&i| ExampleId(i as u64)).collect::<Vec<_>>();
        let labels = |idx: &[usize]| idx.iter().map(|&i| y[i]).collect::<Vec<_>>();
        net.train_batch(rows(&x, idx).view(), &labels(idx)).unwrap();
        single
            .step(
                &mut net.traceables_mut(),
                &Batch::new(&ids(idx), &labels(idx)),
            )
            .unwrap();
        let shards = [&idx[..3], &idx[3..]];
        let mut grads = Vec::new();
        for (net, shard) in nets.iter_mut().zip(shards) {
            net.train_batch(rows(&x, shard).view(), &labels(shard))
                .unwrap();
            grads.push(HandSgd::grads(net));
        }
        // The all-reduce: the mean of the ranks' gradients.
        let mean: Vec<_> = grads[0]
            .iter()
            .zip(&grads[1])
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        for r in 0..2 {
            let rule = sgds[r].rule();
            sgds[r].step(&mut nets[r], &mean, 1.0);
            let (shard_ids, shard_labels) = (ids(shards[r]), labels(shards[r]));
            let batch = Batch::new(&shard_ids, &shard_labels).shard_of(6);
            ranks[r]
                .record_step(&nets[r].traceables(), &batch, Some(rule))
                .unwrap();
        }
        if t % 3 == 2 && t < 8 {
            single.close_segment().unwrap();
            ranks.iter_mut().for_each(|h| h.close_segment().unwrap());
        }
    }
    let want = single.finish().unwrap();
    let mut shards: Vec<Ledger<f64>> = ranks.into_iter().map(|h| h.finish().unwrap()).collect();
    let b = shards.pop().unwrap();
    let a = shards.pop().unwrap();
    assert!(
        a.residual_fraction()[0] > 0.1,
        "a shard alone does not balance"
    );
    let merged = a.merge(&b).unwrap();
    merged.check_residual(1e-9).unwrap();
    assert_eq!(merged.sources().len(), want.sources().len());
    for l in 0..want.layers().len() {
        for s in want.sources() {
            let (g, w) = (
                merged.account(l, s.id).unwrap(),
                want.account(l, s.id).unwrap(),
            );
            assert_allclose(
                &g.into_dyn(),
                &w.into_dyn(),
                1e-9,
                1e-13,
                &format!("{} layer {l}", s.id),
            );
        }
    }
}
