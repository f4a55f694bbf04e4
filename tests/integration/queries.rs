//! Every lens against a direct computation from the dense accounts, on a real
//! (small) traced run; rankings; loss lens per segment.

use crate::common;

use common::{Run, assert_allclose, blobs, gradient_query, mlp, query, train};
use ndarray::{Array1, Array2, Axis, s};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::SgdConfig;
use refinement_ledger::query::{Pairing, Targets};
use refinement_ledger::{LayerSel, Ledger, Lens, OptimizerHook, Query, Scorer, write_params};

/// Trained CNN (conv layers hold dense accounts, the dense layer factored rows).
fn trained_cnn(segments: bool) -> (Ledger<f64>, Sequential<f64>, ndarray::ArrayD<f64>) {
    common::trained_cnn::<f64>(segments)
}

/// Direct contributions: per layer, per source, `c_s = G_s ã` as `[n_q, P·fan_out]`, and `r`.
fn direct(ledger: &Ledger<f64>, net: &Sequential<f64>) -> Vec<(Vec<Array2<f64>>, Array2<f64>)> {
    net.traceables()
        .iter()
        .enumerate()
        .map(|(l, t)| {
            let p = t.input_patches().unwrap();
            let (n, pos, fi) = p.dim();
            let mut a = Array2::ones((n * pos, fi + 1));
            a.slice_mut(s![.., ..fi])
                .assign(&p.to_owned().into_shape_with_order((n * pos, fi)).unwrap());
            let flat = |m: &Array2<f64>| {
                let z = a.dot(&m.t()); // [n·P, fan_out]
                let fo = z.ncols();
                z.into_shape_with_order((n, pos * fo)).unwrap()
            };
            let cs = ledger
                .sources()
                .iter()
                .map(|s| flat(&ledger.account(l, s.id).unwrap()))
                .collect();
            let r = flat(&(ledger.final_params(l).unwrap() - ledger.initial_params(l).unwrap()));
            (cs, r)
        })
        .collect()
}

#[test]
fn representation_lenses_match_direct_computation() {
    for segments in [false, true] {
        let (ledger, mut net, test) = trained_cnn(segments);
        let q = query(&mut net, &test);
        let ex = ledger.explain(&q).unwrap();
        let d = direct(&ledger, &net);
        for (l, (cs, r)) in d.iter().enumerate() {
            let n_src = cs.len();
            let mut dot = Array2::zeros((q.len(), n_src));
            let mut norm = Array2::zeros((q.len(), n_src));
            for (si, c) in cs.iter().enumerate() {
                for qi in 0..q.len() {
                    dot[[qi, si]] = c.row(qi).dot(&r.row(qi));
                    norm[[qi, si]] = c.row(qi).dot(&c.row(qi)).sqrt();
                }
            }
            let rn: Array1<f64> = r
                .rows()
                .into_iter()
                .map(|row| row.dot(&row).sqrt())
                .collect();
            assert_allclose(
                &ex.layers[l].dot.clone().into_dyn(),
                &dot.clone().into_dyn(),
                1e-9,
                1e-14,
                "dot",
            );
            assert_allclose(
                &ex.layers[l].norm.clone().into_dyn(),
                &norm.clone().into_dyn(),
                1e-9,
                1e-14,
                "norm",
            );
            assert_allclose(
                &ex.layers[l].refinement_norm.clone().into_dyn(),
                &rn.clone().into_dyn(),
                1e-12,
                0.0,
                "r",
            );
            let rc = rn.view().insert_axis(Axis(1));
            let expect = [
                (Lens::Dot, dot.clone()),
                (Lens::Norm, norm.clone()),
                (Lens::Influence, &dot / &rc),
                (Lens::Share, &dot / &rc.mapv(|v| v * v)),
                (Lens::Cos, &dot / &(&norm * &rc)),
            ];
            for (lens, want) in expect {
                let got = ex.scores(lens, LayerSel::Layer(l)).unwrap().into_values();
                assert_allclose(
                    &got.clone().into_dyn(),
                    &want.clone().into_dyn(),
                    1e-9,
                    1e-13,
                    &format!("{lens:?} explain"),
                );
                // The fast path gives the same numbers.
                let fast = ledger
                    .scores(&q, lens, LayerSel::Layer(l))
                    .unwrap()
                    .into_values();
                assert_allclose(
                    &fast.into_dyn(),
                    &want.into_dyn(),
                    1e-9,
                    1e-13,
                    &format!("{lens:?} scores"),
                );
            }
        }
        // Across layers: shares average, influence uses the concatenated representation.
        let mean_share = (0..3)
            .map(|l| {
                ex.scores(Lens::Share, LayerSel::Layer(l))
                    .unwrap()
                    .into_values()
            })
            .fold(
                Array2::zeros((q.len(), ledger.sources().len())),
                |acc, s| acc + s / 3.0,
            );
        let all = ledger
            .scores(&q, Lens::Share, LayerSel::All)
            .unwrap()
            .into_values();
        assert_allclose(
            &all.into_dyn(),
            &mean_share.into_dyn(),
            1e-9,
            1e-14,
            "all-layer share",
        );
        let dot_all: Array2<f64> = (0..3)
            .map(|l| ex.layers[l].dot.clone())
            .fold(Array2::zeros((q.len(), ledger.sources().len())), |a, b| {
                a + b
            });
        let r_all = (0..3)
            .map(|l| ex.layers[l].refinement_norm.mapv(|v| v * v))
            .fold(Array1::zeros(q.len()), |a, b| a + b)
            .mapv(f64::sqrt);
        let infl = &dot_all / &r_all.view().insert_axis(Axis(1));
        let got = ledger
            .scores(&q, Lens::Influence, LayerSel::All)
            .unwrap()
            .into_values();
        assert_allclose(
            &got.into_dyn(),
            &infl.into_dyn(),
            1e-9,
            1e-14,
            "all-layer influence",
        );
    }
}

#[test]
fn loss_lens_is_minus_account_dot_query_gradient() {
    let (ledger, mut net, test) = trained_cnn(false);
    let q = gradient_query(&mut net, &test);
    let got = ledger
        .scores(&q, Lens::Loss, LayerSel::All)
        .unwrap()
        .into_values();
    // ∇_W ℓ(x_q) per query, direct: δᵀ ã summed over positions.
    let mut want = Array2::<f64>::zeros((q.len(), ledger.sources().len()));
    for (l, grads) in query_grads(&net).iter().enumerate() {
        for (qi, grad) in grads.iter().enumerate() {
            for (si, src) in ledger.sources().iter().enumerate() {
                want[[qi, si]] -= (&ledger.account(l, src.id).unwrap() * grad).sum();
            }
        }
    }
    assert_allclose(&got.into_dyn(), &want.into_dyn(), 1e-9, 1e-14, "loss lens");
}

#[test]
fn paired_queries_read_each_segment_with_gradients_at_its_boundaries() {
    let (ledger, mut net, test) = trained_cnn(true);
    let n_layers = ledger.layers().len();
    let targets = net.predict(test.view()).unwrap();
    let boundary = |b: usize| -> Vec<Array2<f64>> {
        (0..n_layers)
            .map(|l| match b {
                0 => ledger.initial_params(l).unwrap().clone(),
                b => ledger.segment_end_params(b - 1, l).unwrap().clone(),
            })
            .collect()
    };
    // Direct: −⟨θ_k − θ_{k−1}, ∇ℓ(x; θ)⟩ per segment, with the gradient at
    // either boundary of the segment.
    let mut grads_at = Vec::new();
    let final_params = boundary(ledger.n_segments());
    for b in 0..=ledger.n_segments() {
        write_params(&mut net.traceables_mut(), &boundary(b)).unwrap();
        net.loss_gradients(test.view(), &targets).unwrap();
        grads_at.push(query_grads(&net));
    }
    write_params(&mut net.traceables_mut(), &final_params).unwrap();
    let n_q = test.shape()[0];
    let (mut at_end, mut midpoint) = (Array1::<f64>::zeros(n_q), Array1::<f64>::zeros(n_q));
    for k in 0..ledger.n_segments() {
        for (l, (p0, p1)) in boundary(k).iter().zip(&boundary(k + 1)).enumerate() {
            let step = p1 - p0;
            for qi in 0..n_q {
                let (start, end) = (&grads_at[k][l][qi], &grads_at[k + 1][l][qi]);
                at_end[qi] -= (&step * end).sum();
                midpoint[qi] -= 0.5 * (&step * start).sum() + 0.5 * (&step * end).sum();
            }
        }
    }
    for (pairing, direct) in [(Pairing::SegmentEnd, at_end), (Pairing::Midpoint, midpoint)] {
        let q = Query::paired(
            &mut net,
            test.view(),
            Targets::Labels(&targets),
            &ledger,
            pairing,
        )
        .unwrap();
        assert_eq!(q.pairing(), pairing);
        let got = ledger
            .scores(&q, Lens::Loss, LayerSel::All)
            .unwrap()
            .into_values();
        // Summed over sources (plus the negligible residual) it is the direct sum.
        assert_allclose(
            &got.sum_axis(Axis(1)).into_dyn(),
            &direct.into_dyn(),
            1e-8,
            1e-12,
            &format!("{pairing:?} total"),
        );
        // Per source, the one-call scorer with the same pairing agrees.
        let one_call = ledger.lens(Lens::Loss).pairing(pairing);
        let again = one_call.query(&mut net, test.view()).unwrap();
        assert_eq!(
            ledger
                .scores(&again, Lens::Loss, LayerSel::All)
                .unwrap()
                .into_values(),
            got
        );
    }
    // The model is left at its own parameters: a final-pairing query equals the
    // plain loss lens.
    let plain = gradient_query(&mut net, &test);
    let fin = Query::paired(
        &mut net,
        test.view(),
        Targets::Predicted,
        &ledger,
        Pairing::Final,
    )
    .unwrap();
    assert_eq!(
        ledger
            .scores(&plain, Lens::Loss, LayerSel::All)
            .unwrap()
            .into_values(),
        ledger
            .scores(&fin, Lens::Loss, LayerSel::All)
            .unwrap()
            .into_values()
    );
}

/// Per layer and query, `∇_{[W|b]} ℓ(x_q)` from the traced layers' last backward pass.
fn query_grads(net: &Sequential<f64>) -> Vec<Vec<Array2<f64>>> {
    net.traceables()
        .iter()
        .map(|t| {
            let p = t.input_patches().unwrap();
            let dl = t.output_deltas().unwrap();
            let (n, pos, fi) = p.dim();
            (0..n)
                .map(|qi| {
                    let mut a = Array2::ones((pos, fi + 1));
                    a.slice_mut(s![.., ..fi]).assign(&p.index_axis(Axis(0), qi));
                    dl.index_axis(Axis(0), qi).t().dot(&a)
                })
                .collect()
        })
        .collect()
}

#[test]
fn self_scores_match_the_diagonal_of_full_scores() {
    let (x, y) = blobs::<f64>(6, 3, 4, 4);
    let mut net = mlp::<f64>(4, 3, 5);
    let sgd = SgdConfig::new(0.1)
        .with_momentum(0.5)
        .build::<f64>()
        .unwrap();
    let mut hook = OptimizerHook::new(sgd, &net.traceables()).unwrap();
    train(
        &mut net,
        &mut hook,
        &x,
        &y,
        Run {
            batch: 3,
            epochs: 4,
            segment_per_epoch: true,
            seed: 2,
        },
    );
    let ledger = hook.finish().unwrap();
    let ids: Vec<_> = (0..y.len())
        .map(|i| refinement_ledger::SourceId::Example(refinement_ledger::ExampleId(i as u64)))
        .collect();
    let col: Vec<usize> = ids
        .iter()
        .map(|&s| ledger.source_index(s).unwrap())
        .collect();
    let q = gradient_query(&mut net, &x);
    for lens in [
        Lens::Dot,
        Lens::Norm,
        Lens::Cos,
        Lens::Influence,
        Lens::Share,
        Lens::Loss,
    ] {
        let full = ledger
            .scores(&q, lens, LayerSel::All)
            .unwrap()
            .into_values();
        let diag: Array1<f64> = (0..y.len()).map(|i| full[[i, col[i]]]).collect();
        let got = ledger.self_scores(&q, &ids, lens).unwrap();
        assert_allclose(
            &got.into_dyn(),
            &diag.into_dyn(),
            1e-9,
            1e-14,
            &format!("{lens:?} self-score"),
        );
    }
}

#[test]
fn top_k_is_sorted_deterministic_and_matches_scores() {
    let (ledger, mut net, test) = trained_cnn(false);
    let q = query(&mut net, &test);
    let a = ledger.top_k_influences(&q, Lens::Influence, 5).unwrap();
    let b = ledger.top_k_influences(&q, Lens::Influence, 5).unwrap();
    assert_eq!(a, b);
    let all = ledger
        .scores(&q, Lens::Influence, LayerSel::All)
        .unwrap()
        .into_values();
    for inf in &a {
        let row = all.row(inf.query);
        let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let min = row.fold(f64::INFINITY, |m, &v| m.min(v));
        assert_eq!(inf.combined.proponents.len(), 5);
        assert_eq!(inf.combined.proponents[0].score, max);
        assert_eq!(inf.combined.opponents[0].score, min);
        assert!(
            inf.combined
                .proponents
                .windows(2)
                .all(|w| w[0].score >= w[1].score)
        );
        assert!(
            inf.combined
                .opponents
                .windows(2)
                .all(|w| w[0].score <= w[1].score)
        );
        assert_eq!(inf.per_layer.len(), 3);
    }
    // Asking for more than there are sources returns them all.
    let many = ledger.top_k_influences(&q, Lens::Cos, 10_000).unwrap();
    assert_eq!(many[0].combined.proponents.len(), ledger.sources().len());
}

#[test]
fn margin_lens_is_the_winning_margin_of_each_contribution() {
    let (ledger, mut net, test) = trained_cnn(false);
    let q = query(&mut net, &test);
    let logits = net.logits(test.view()).unwrap();
    let got = ledger
        .scores(&q, Lens::Margin, LayerSel::All)
        .unwrap()
        .into_values();
    let (cs, _) = &direct(&ledger, &net)[2];
    for qi in 0..q.len() {
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by(|&a, &b| logits[[qi, b]].total_cmp(&logits[[qi, a]]));
        for (si, c) in cs.iter().enumerate() {
            let want = c[[qi, order[0]]] - c[[qi, order[1]]];
            assert!(
                (got[[qi, si]] - want).abs() <= 1e-9 * want.abs().max(1e-6),
                "{} vs {want}",
                got[[qi, si]]
            );
        }
    }
    let ids: Vec<_> = ledger
        .sources()
        .iter()
        .take(q.len())
        .map(|s| s.id)
        .collect();
    let own = ledger.self_scores(&q, &ids, Lens::Margin).unwrap();
    for qi in 0..q.len() {
        assert!((own[qi] - got[[qi, qi]]).abs() < 1e-12);
    }
}

#[test]
fn ridge_lens_solves_the_regularised_gram_system() {
    let (ledger, mut net, test) = trained_cnn(false);
    let q = gradient_query(&mut net, &test);
    let c = 1e-2;
    let ridge = refinement_ledger::query::RidgeLens::fit(&ledger, c).unwrap();
    let got = ridge.scores(&q).unwrap().into_values();
    // Direct: L from the dense accounts, K = L Lᵀ, λ = c·tr(K)/N, solve by Gaussian elimination.
    let n = ledger.sources().len();
    let rows: Vec<Vec<f64>> = ledger
        .sources()
        .iter()
        .map(|s| {
            (0..3)
                .flat_map(|l| ledger.account(l, s.id).unwrap().into_iter())
                .collect()
        })
        .collect();
    let mut k = Array2::<f64>::zeros((n, n));
    for i in 0..n {
        for j in 0..n {
            k[[i, j]] = rows[i].iter().zip(&rows[j]).map(|(a, b)| a * b).sum();
        }
    }
    let lambda = c * k.diag().sum() / n as f64;
    assert!((ridge.lambda() - lambda).abs() <= 1e-12 * lambda);
    let lg = ledger
        .scores(&q, Lens::Loss, LayerSel::All)
        .unwrap()
        .into_values();
    for qi in 0..q.len() {
        // Solve (K + λI) x = lg[qi] with partial pivoting.
        let mut m = k.clone();
        for i in 0..n {
            m[[i, i]] += lambda;
        }
        let mut b = lg.row(qi).to_owned();
        for col in 0..n {
            let p = (col..n)
                .max_by(|&a, &bb| m[[a, col]].abs().total_cmp(&m[[bb, col]].abs()))
                .unwrap();
            for j in 0..n {
                m.swap([col, j], [p, j]);
            }
            b.swap(col, p);
            for r in col + 1..n {
                let f = m[[r, col]] / m[[col, col]];
                for j in col..n {
                    m[[r, j]] -= f * m[[col, j]];
                }
                b[r] -= f * b[col];
            }
        }
        let mut x = Array1::<f64>::zeros(n);
        for r in (0..n).rev() {
            let s: f64 = (r + 1..n).map(|j| m[[r, j]] * x[j]).sum();
            x[r] = (b[r] - s) / m[[r, r]];
        }
        assert_allclose(
            &got.row(qi).to_owned().into_dyn(),
            &x.into_dyn(),
            1e-7,
            1e-10,
            "ridge alpha",
        );
    }
    assert!(refinement_ledger::query::RidgeLens::fit(&ledger, 0.0).is_err());
}

#[test]
fn top_k_for_loss_and_margin_lenses_matches_their_scores() {
    let (ledger, mut net, test) = trained_cnn(true);
    let g = gradient_query(&mut net, &test);
    let loss = ledger.top_k_influences(&g, Lens::Loss, 3).unwrap();
    let all = ledger
        .scores(&g, Lens::Loss, LayerSel::All)
        .unwrap()
        .into_values();
    for inf in &loss {
        assert_eq!(inf.per_layer.len(), 3);
        let max = all.row(inf.query).fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        assert!((inf.combined.proponents[0].score - max).abs() <= 1e-12 * max.abs().max(1.0));
    }
    let q = query(&mut net, &test);
    let margin = ledger.top_k_influences(&q, Lens::Margin, 3).unwrap();
    assert!(
        margin
            .iter()
            .all(|m| m.per_layer.len() == 1 && m.per_layer[0].0.0 == "fc")
    );
}
