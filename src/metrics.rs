//! Metrics for evaluating explanations: ROC AUC, class agreement, recall in the
//! top fraction, mean ± standard error, top-k overlap, Spearman rank correlation and the
//! linear datamodeling score.
//!
//! **Linear datamodeling score (LDS**, Park et al. 2023, "TRAK"): an
//! attribution `τ(x)` (one score per training example) predicts the output
//! `f(x)` of a model trained on a subset `S` of the training set as
//! `Σ_{i∈S} τ(x)_i`. Train models on random subsets `S_1 … S_m`, measure
//! `f_{S_j}(x)`, and take the Spearman correlation over `j` between predicted
//! and measured; the LDS is its mean over test points. It is the field's
//! yardstick for "which training examples caused this prediction".

/// ROC AUC of `scores` (higher = more likely positive) against `positive` labels:
/// the probability that a random positive outranks a random negative, ties
/// counting one half. `None` when either class is empty or a score is NaN.
///
/// # Example
/// ```
/// use refinement_ledger::metrics::roc_auc;
/// assert_eq!(roc_auc(&[0.9, 0.8, 0.3, 0.1], &[true, false, true, false]), Some(0.75));
/// ```
pub fn roc_auc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    if scores.len() != positive.len() || scores.iter().any(|s| s.is_nan()) {
        return None;
    }
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    // Mann–Whitney U with mid-ranks for ties.
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i + 1;
        while j < idx.len() && scores[idx[j]] == scores[idx[i]] {
            j += 1;
        }
        let mid = (i + j + 1) as f64 / 2.0; // ranks i+1..=j
        rank_sum += idx[i..j].iter().filter(|&&k| positive[k]).count() as f64 * mid;
        i = j;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// Fraction of the positives found among the top `fraction` of `scores` (high first).
///
/// # Example
/// ```
/// use refinement_ledger::metrics::recall_at_fraction;
/// let r = recall_at_fraction(&[0.9, 0.8, 0.3, 0.1], &[true, false, true, false], 0.5);
/// assert_eq!(r, Some(0.5));
/// ```
pub fn recall_at_fraction(scores: &[f64], positive: &[bool], fraction: f64) -> Option<f64> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    if scores.len() != positive.len() || n_pos == 0 || !(0.0..=1.0).contains(&fraction) {
        return None;
    }
    let k = (fraction * scores.len() as f64).round() as usize;
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    Some(idx[..k].iter().filter(|&&i| positive[i]).count() as f64 / n_pos as f64)
}

/// Fraction of `labels` equal to `class` (agreement of top-k proponents with a prediction).
///
/// # Example
/// ```
/// use refinement_ledger::metrics::class_agreement;
/// assert_eq!(class_agreement(&[Some(3), Some(3), None, Some(1)], 3), 0.5);
/// ```
pub fn class_agreement(labels: &[Option<usize>], class: usize) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    labels.iter().filter(|&&l| l == Some(class)).count() as f64 / labels.len() as f64
}

/// Mean and standard error of the mean (sample standard deviation / √n; 0 for n < 2).
///
/// # Example
/// ```
/// use refinement_ledger::metrics::mean_and_standard_error;
/// let (m, se) = mean_and_standard_error(&[1.0, 2.0, 3.0, 4.0]);
/// assert_eq!(m, 2.5);
/// assert!((se - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
/// ```
pub fn mean_and_standard_error(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// Spearman rank correlation of `a` and `b` (average ranks for ties). `None`
/// when the lengths differ, there are fewer than two values, a value is NaN, or
/// either side is constant.
///
/// # Example
/// ```
/// use refinement_ledger::metrics::spearman;
/// assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 90.0]), Some(1.0));
/// assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
/// assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
/// ```
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 || a.iter().chain(b).any(|v| v.is_nan()) {
        return None;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let mean = (n + 1.0) / 2.0;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in ra.iter().zip(&rb) {
        sab += (x - mean) * (y - mean);
        saa += (x - mean) * (x - mean);
        sbb += (y - mean) * (y - mean);
    }
    (saa > 0.0 && sbb > 0.0).then(|| sab / (saa * sbb).sqrt())
}

/// Ranks from 1, ties sharing their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = rank;
        }
        i = j + 1;
    }
    out
}

/// The linear datamodeling score of attributions `scores` (`[n_points][n_train]`)
/// against models trained on `subsets` (training indices) whose measured outputs
/// are `measured` (`[n_subsets][n_points]`): per point, the Spearman
/// correlation over subsets of `Σ_{i∈S} scores[point][i]` with the measured
/// output; returns every point's value (NaN where undefined, e.g. a constant
/// score row). Average them with [`mean_and_standard_error`] over the finite ones.
///
/// # Example
/// ```
/// use refinement_ledger::metrics::linear_datamodeling_score;
/// // One test point, three training examples: example 0 raises the output by 2, example 1 by 1.
/// let subsets = vec![vec![0, 1], vec![1, 2], vec![0, 2], vec![2]];
/// let measured: Vec<Vec<f64>> = subsets.iter()
///     .map(|s: &Vec<usize>| vec![s.iter().map(|&i| [2.0, 1.0, 0.0][i]).sum()])
///     .collect();
/// let good = linear_datamodeling_score(&[vec![2.0, 1.0, 0.0]], &subsets, &measured);
/// assert_eq!(good, vec![1.0]);
/// let reversed = linear_datamodeling_score(&[vec![0.0, 1.0, 2.0]], &subsets, &measured);
/// assert!(reversed[0] < 0.0);
/// ```
pub fn linear_datamodeling_score(
    scores: &[Vec<f64>],
    subsets: &[Vec<usize>],
    measured: &[Vec<f64>],
) -> Vec<f64> {
    (0..scores.len())
        .map(|p| {
            let predicted: Option<Vec<f64>> = subsets
                .iter()
                .map(|s| s.iter().map(|&i| scores[p].get(i).copied()).sum())
                .collect();
            let truth: Option<Vec<f64>> = measured.iter().map(|m| m.get(p).copied()).collect();
            match (predicted, truth) {
                (Some(a), Some(b)) => spearman(&a, &b).unwrap_or(f64::NAN),
                _ => f64::NAN,
            }
        })
        .collect()
}

/// Mean fraction of each row's top `k` (highest scores) of `exact` that the
/// same row's top `k` of `approx` recovers: how well an approximate score
/// matrix (a sketch, an online ledger) keeps the exact ranking's head. `None`
/// for matrices of different shapes, `k = 0`, no rows, or a NaN score.
///
/// # Example
/// ```
/// use ndarray::array;
/// use refinement_ledger::metrics::top_k_overlap;
/// let exact = array![[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]];
/// let approx = array![[4.0, 1.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]];
/// // Row 0 keeps one of its top 2 ({0, 1} vs {0, 2}), row 1 both.
/// assert_eq!(top_k_overlap(&exact, &approx, 2), Some(0.75));
/// ```
pub fn top_k_overlap(
    exact: &ndarray::Array2<f64>,
    approx: &ndarray::Array2<f64>,
    k: usize,
) -> Option<f64> {
    if exact.dim() != approx.dim() || k == 0 || exact.nrows() == 0 {
        return None;
    }
    if exact.iter().chain(approx.iter()).any(|v| v.is_nan()) {
        return None;
    }
    let k = k.min(exact.ncols());
    let top = |row: ndarray::ArrayView1<'_, f64>| {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
        idx.truncate(k);
        idx
    };
    let hits: usize = exact
        .rows()
        .into_iter()
        .zip(approx.rows())
        .map(|(e, a)| {
            let (e, a) = (top(e), top(a));
            e.iter().filter(|i| a.contains(i)).count()
        })
        .sum();
    Some(hits as f64 / (k * exact.nrows()) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_inverted_and_tied_rankings() {
        assert_eq!(
            roc_auc(&[4.0, 3.0, 2.0, 1.0], &[true, true, false, false]),
            Some(1.0)
        );
        assert_eq!(
            roc_auc(&[1.0, 2.0, 3.0, 4.0], &[true, true, false, false]),
            Some(0.0)
        );
        assert_eq!(
            roc_auc(&[1.0, 1.0, 1.0, 1.0], &[true, false, true, false]),
            Some(0.5)
        );
        // One tie between a positive and a negative: (1 + 1 + 0.5 + 1) / 4.
        assert_eq!(
            roc_auc(&[3.0, 2.0, 2.0, 1.0], &[true, true, false, false]),
            Some(0.875)
        );
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, true]), None);
        assert_eq!(roc_auc(&[f64::NAN, 2.0], &[true, false]), None);
    }

    #[test]
    fn recall_counts_positives_in_the_top_fraction() {
        let s = [0.1, 0.9, 0.8, 0.2, 0.7];
        let p = [true, true, false, false, true];
        assert_eq!(recall_at_fraction(&s, &p, 0.2), Some(1.0 / 3.0));
        assert_eq!(recall_at_fraction(&s, &p, 0.6), Some(2.0 / 3.0));
        assert_eq!(recall_at_fraction(&s, &p, 1.0), Some(1.0));
    }

    #[test]
    fn standard_error_of_constant_and_single_values() {
        assert_eq!(mean_and_standard_error(&[2.0, 2.0, 2.0]), (2.0, 0.0));
        assert_eq!(mean_and_standard_error(&[5.0]), (5.0, 0.0));
        assert!(mean_and_standard_error(&[]).0.is_nan());
    }

    #[test]
    fn spearman_averages_tied_ranks() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        // Ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): r = 4.5 / sqrt(4.5 · 5).
        let r = spearman(&[1.0, 2.0, 2.0, 5.0], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!((r - (4.5f64 / (4.5f64 * 5.0).sqrt())).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0, f64::NAN], &[1.0, 2.0]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
    }
}
