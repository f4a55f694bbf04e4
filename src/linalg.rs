//! Dense linear algebra the lenses share: a Cholesky factorisation of a
//! symmetric positive definite matrix and the solves with its factor.

use ndarray::{Array1, Array2};

use crate::error::{Error, Result};

/// Lower Cholesky factor of a symmetric positive definite matrix
/// (row-oriented, each entry a dot product of two contiguous row prefixes).
pub(crate) fn cholesky(a: Array2<f64>) -> Result<Array2<f64>> {
    let n = a.nrows();
    let mut l = a.as_standard_layout().into_owned();
    let v = l.as_slice_mut().expect("invariant: standard layout");
    for i in 0..n {
        for j in 0..=i {
            let (ri, rj) = (i * n, j * n);
            let dot: f64 = (0..j).map(|k| v[ri + k] * v[rj + k]).sum();
            let x = v[ri + j] - dot;
            if i == j {
                if x.is_nan() || x <= 0.0 {
                    return Err(Error::InvalidConfig {
                        what: "ridge system",
                        reason: format!(
                            "K + λI is not positive definite at pivot {i} (found {x:e}); increase c"
                        ),
                    });
                }
                v[ri + i] = x.sqrt();
            } else {
                v[ri + j] = x / v[rj + j];
            }
        }
        for j in i + 1..n {
            v[i * n + j] = 0.0;
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ x = b` by forward and back substitution.
pub(crate) fn solve_cholesky(l: &Array2<f64>, mut b: Array1<f64>) -> Array1<f64> {
    let n = l.nrows();
    for i in 0..n {
        let row = l.row(i);
        let s: f64 = (0..i).map(|k| row[k] * b[k]).sum();
        b[i] = (b[i] - s) / row[i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[[k, i]] * b[k]).sum();
        b[i] = (b[i] - s) / l[[i, i]];
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
        let b = ndarray::array![1.0, -2.0, 0.5];
        let x = solve_cholesky(&l, b.clone());
        assert!((&m.dot(&x) - &b).iter().all(|v| v.abs() < 1e-12));
        assert!(cholesky(ndarray::array![[1.0, 2.0], [2.0, 1.0]]).is_err());
    }
}
