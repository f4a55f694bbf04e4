//! Dense linear algebra the lenses share: a blocked Cholesky factorisation of
//! a symmetric positive definite matrix and the solves with its factor.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, s};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Rows and columns per block of the blocked factorisation and solves.
const BLOCK: usize = 64;

/// Lower Cholesky factor of a symmetric positive definite matrix, blocked:
/// each diagonal block is factored in place, the panel below it solved
/// against it, and the trailing lower triangle updated by matrix products
/// (block rows in parallel) — `n³/3` flops, most of them in GEMMs.
///
/// # Errors
/// [`Error::InvalidConfig`] at the first pivot that is not positive (or NaN).
pub(crate) fn cholesky(a: Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = a.as_standard_layout().into_owned();
    for k0 in (0..n).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(n);
        factor_diagonal_block(&mut l, k0, k1)?;
        // Panel: L21 = A21 L11⁻ᵀ, row by row (forward substitution).
        let l11 = l.slice(s![k0..k1, k0..k1]).to_owned();
        l.slice_mut(s![k1.., k0..k1])
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .for_each(|mut row| {
                for j in 0..k1 - k0 {
                    let dot: f64 = (0..j).map(|m| row[m] * l11[[j, m]]).sum();
                    row[j] = (row[j] - dot) / l11[[j, j]];
                }
            });
        // Trailing lower triangle: A22 −= L21 L21ᵀ.
        let panel = l.slice(s![k1.., k0..k1]).to_owned();
        lower_product(-1.0, panel.view(), 1.0, l.slice_mut(s![k1.., k1..]));
    }
    for i in 0..n {
        l.slice_mut(s![i, i + 1..]).fill(0.0);
    }
    Ok(l)
}

/// `gram += m mᵀ` for `m` `[n, d]`: the lower triangle by
/// [`lower_product`], then mirrored — half the flops of the full product.
pub(crate) fn add_gram(m: &Array2<f64>, gram: &mut Array2<f64>) {
    let n = m.nrows();
    let mut lower = Array2::<f64>::zeros((n, n));
    lower_product(1.0, m.view(), 0.0, lower.view_mut());
    for i in 0..n {
        for j in 0..=i {
            let v = lower[[i, j]];
            gram[[i, j]] += v;
            if i != j {
                gram[[j, i]] += v;
            }
        }
    }
}

/// `c ← alpha · p pᵀ + beta · c` on the block-lower part of `c` (every block
/// row up to and including its diagonal block; what lies above the diagonal
/// inside a diagonal block is written too, and is to be ignored), one matrix
/// product per block row, block rows in parallel.
fn lower_product(alpha: f64, p: ArrayView2<'_, f64>, beta: f64, mut c: ArrayViewMut2<'_, f64>) {
    c.axis_chunks_iter_mut(Axis(0), BLOCK)
        .into_par_iter()
        .enumerate()
        .for_each(|(b, mut rows)| {
            let r0 = b * BLOCK;
            let r1 = r0 + rows.nrows();
            let mut block = rows.slice_mut(s![.., ..r1]);
            general_mat_mul(
                alpha,
                &p.slice(s![r0..r1, ..]),
                &p.slice(s![..r1, ..]).t(),
                beta,
                &mut block,
            );
        });
}

/// Factors the diagonal block `[k0, k1)` of `l` in place (its trailing
/// updates already applied), unblocked.
fn factor_diagonal_block(l: &mut Array2<f64>, k0: usize, k1: usize) -> Result<()> {
    for i in k0..k1 {
        for j in k0..=i {
            let dot: f64 = (k0..j).map(|m| l[[i, m]] * l[[j, m]]).sum();
            let x = l[[i, j]] - dot;
            if i == j {
                if x.is_nan() || x <= 0.0 {
                    return Err(Error::InvalidConfig {
                        what: "ridge system",
                        reason: format!(
                            "K + λI is not positive definite at pivot {i} (found {x:e}); increase c"
                        ),
                    });
                }
                l[[i, i]] = x.sqrt();
            } else {
                l[[i, j]] = x / l[[j, j]];
            }
        }
    }
    Ok(())
}

/// Solves `L Lᵀ X = B` for every column of `b` (`[n, m]`): the columns split
/// among the cores, each part by [`solve_columns`].
pub(crate) fn solve_cholesky_many(l: &Array2<f64>, mut b: Array2<f64>) -> Array2<f64> {
    let threads = rayon::current_num_threads();
    if threads < 2 || b.ncols() < 2 * BLOCK {
        return solve_columns(l, b);
    }
    let chunk = b.ncols().div_ceil(threads);
    b.axis_chunks_iter_mut(Axis(1), chunk)
        .into_par_iter()
        .for_each(|mut cols| {
            let solved = solve_columns(l, cols.to_owned());
            cols.assign(&solved);
        });
    b
}

/// Solves `L Lᵀ X = B` blocked: forward then back substitution, the
/// off-diagonal parts as matrix products.
fn solve_columns(l: &Array2<f64>, mut b: Array2<f64>) -> Array2<f64> {
    let n = l.nrows();
    // Forward: L Y = B.
    for k0 in (0..n).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(n);
        if k0 > 0 {
            let (done, mut rest) = b.view_mut().split_at(Axis(0), k0);
            let mut block = rest.slice_mut(s![..k1 - k0, ..]);
            general_mat_mul(-1.0, &l.slice(s![k0..k1, ..k0]), &done, 1.0, &mut block);
        }
        for i in k0..k1 {
            for m in k0..i {
                let f = l[[i, m]];
                let (src, mut dst) = b.multi_slice_mut((s![m, ..], s![i, ..]));
                dst.scaled_add(-f, &src);
            }
            let d = l[[i, i]];
            b.row_mut(i).mapv_inplace(|v| v / d);
        }
    }
    // Back: Lᵀ X = Y.
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    for &k0 in starts.iter().rev() {
        let k1 = (k0 + BLOCK).min(n);
        if k1 < n {
            let (mut head, done) = b.view_mut().split_at(Axis(0), k1);
            let mut block = head.slice_mut(s![k0.., ..]);
            general_mat_mul(-1.0, &l.slice(s![k1.., k0..k1]).t(), &done, 1.0, &mut block);
        }
        for i in (k0..k1).rev() {
            for m in i + 1..k1 {
                let f = l[[m, i]];
                let (src, mut dst) = b.multi_slice_mut((s![m, ..], s![i, ..]));
                dst.scaled_add(-f, &src);
            }
            let d = l[[i, i]];
            b.row_mut(i).mapv_inplace(|v| v / d);
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solve_inverts_a_spd_system() {
        let m = ndarray::array![[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
        let l = cholesky(m.clone()).unwrap();
        let back = l.dot(&l.t());
        assert!((&back - &m).iter().all(|v| v.abs() < 1e-12));
        let b = ndarray::array![[1.0], [-2.0], [0.5]];
        let x = solve_cholesky_many(&l, b.clone());
        assert!((&m.dot(&x) - &b).iter().all(|v| v.abs() < 1e-12));
        assert!(cholesky(ndarray::array![[1.0, 2.0], [2.0, 1.0]]).is_err());
    }

    #[test]
    fn blocked_factor_and_solves_match_the_system_past_several_blocks() {
        // n = 3.5 blocks: a ragged last block; B = M Mᵀ + n I is well conditioned.
        let n = BLOCK * 3 + BLOCK / 2;
        let m = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 13) % 11) as f64 / 11.0 - 0.5);
        let mut a = m.dot(&m.t());
        for i in 0..n {
            a[[i, i]] += n as f64;
        }
        let l = cholesky(a.clone()).unwrap();
        assert!(l.iter().all(|v| v.is_finite()));
        let err = (&l.dot(&l.t()) - &a)
            .iter()
            .fold(0.0f64, |e, v| e.max(v.abs()));
        assert!(err < 1e-9 * n as f64, "L Lᵀ differs from A by {err:e}");
        for i in 0..n {
            assert!(l.slice(s![i, i + 1..]).iter().all(|&v| v == 0.0));
        }
        // More columns than one block per core: the parallel split is exercised.
        let b = Array2::from_shape_fn((n, 4 * BLOCK + 5), |(i, j)| ((i + 3 * j) % 7) as f64 - 3.0);
        let x = solve_cholesky_many(&l, b.clone());
        let res = (&a.dot(&x) - &b).iter().fold(0.0f64, |e, v| e.max(v.abs()));
        assert!(res < 1e-9, "residual {res:e}");
        // Each column is solved on its own: the same as one at a time.
        let one = solve_cholesky_many(&l, b.slice(s![.., 2..3]).to_owned());
        assert!(
            (&one.column(0) - &x.column(2))
                .iter()
                .all(|v| v.abs() < 1e-12)
        );
    }
}
