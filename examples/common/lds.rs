//! Shared by `fashion_lds` and `evaluate`: the linear datamodeling score's
//! pieces — random half-size subsets, the correct-class margin, and scores
//! rearranged into the training set's file order.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ndarray::{Array2, ArrayD};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use refinement_ledger::metrics::{linear_datamodeling_score, mean_and_standard_error};
use refinement_ledger::nn::Sequential;
use refinement_ledger::{ExampleId, Ledger, Result, SourceId};

/// `count` random subsets of `size` of `0..n` (sorted), seeded.
pub fn subsets(n: usize, size: usize, count: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(&mut rng);
            let mut s = all[..size].to_vec();
            s.sort_unstable();
            s
        })
        .collect()
}

/// The correct-class margin `log p_y − log(1 − p_y) = z_y − logsumexp_{k≠y} z_k` per row.
pub fn margins(net: &mut Sequential<f32>, x: &ArrayD<f32>, y: &[usize]) -> Result<Vec<f64>> {
    let z = net.logits(x.view())?;
    Ok(z.rows()
        .into_iter()
        .zip(y)
        .map(|(row, &c)| {
            let others: Vec<f64> = (0..row.len())
                .filter(|&k| k != c)
                .map(|k| f64::from(row[k]))
                .collect();
            let m = others.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + others.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            f64::from(row[c]) - lse
        })
        .collect())
}

/// Scores `[n_q, sources]` as rows over training examples `ids` in their order
/// (0 for an example the ledger never credited).
pub fn by_file_order<F: refinement_ledger::Float>(
    scores: &Array2<f64>,
    ledger: &Ledger<F>,
    ids: &[ExampleId],
) -> Vec<Vec<f64>> {
    let column: BTreeMap<SourceId, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, &e)| (SourceId::Example(e), i))
        .collect();
    scores
        .rows()
        .into_iter()
        .map(|row| {
            let mut out = vec![0.0; ids.len()];
            for (s, meta) in ledger.sources().iter().enumerate() {
                if let Some(&i) = column.get(&meta.id) {
                    out[i] = row[s];
                }
            }
            out
        })
        .collect()
}

/// Mean ± standard error of the LDS over the points where it is defined.
pub fn lds(scores: &[Vec<f64>], subsets: &[Vec<usize>], measured: &[Vec<f64>]) -> (f64, f64) {
    let per_point = linear_datamodeling_score(scores, subsets, measured);
    let finite: Vec<f64> = per_point.into_iter().filter(|v| v.is_finite()).collect();
    mean_and_standard_error(&finite)
}

/// The ground truth of the LDS: for every subset `s` and seed `r`,
/// `train(s, r)` trains a model on subset `s` and returns its outputs at the
/// evaluated points; the runs (in parallel) are averaged over the seeds.
pub fn ground_truth<T: Send>(
    n_subsets: usize,
    seeds: usize,
    train: impl Fn(usize, u64) -> Result<(Vec<f64>, T)> + Sync,
) -> Result<(Vec<Vec<f64>>, Vec<T>)> {
    use rayon::prelude::*;
    let jobs: Vec<(usize, u64)> = (0..n_subsets)
        .flat_map(|s| (0..seeds as u64).map(move |r| (s, r)))
        .collect();
    let runs: Vec<(Vec<f64>, T)> = jobs
        .par_iter()
        .map(|&(s, r)| train(s, r))
        .collect::<Result<_>>()?;
    let (outputs, extra): (Vec<Vec<f64>>, Vec<T>) = runs.into_iter().unzip();
    Ok((average_over_seeds(&outputs, seeds), extra))
}

/// Per subset, the per-point averages of `runs` (`[subset·seeds + seed][point]`).
pub fn average_over_seeds(runs: &[Vec<f64>], seeds: usize) -> Vec<Vec<f64>> {
    runs.chunks(seeds)
        .map(|group| {
            (0..group[0].len())
                .map(|p| group.iter().map(|r| r[p]).sum::<f64>() / group.len() as f64)
                .collect()
        })
        .collect()
}
