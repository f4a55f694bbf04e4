//! The random projections `φ` of a layer's accounts, used offline (a sketch
//! built from an exact ledger) and online (each example's update projected as
//! the hook books it).
//!
//! Two projections, both linear and unbiased (`E⟨φ(X), φ(Y)⟩ = ⟨X, Y⟩`):
//!
//! ```text
//! tensor:    φ(G)_m = l_mᵀ G r_m / √k            l_m, r_m seeded Rademacher vectors
//! Kronecker: φ(G)   = S_out G S_inᵀ              S_out: k_out × fan_out, S_in: k_in × aug_in,
//!                                                 Rademacher / √(side), or the identity
//! ```
//!
//! A factored row `d ãᵀ` maps to `(L d) ⊙ (R ã) / √k` (tensor) or to the outer
//! product `(S_out d)(S_in ã)ᵀ` (Kronecker), never forming `d ãᵀ`. Per
//! position the tensor projection costs `k (fan_out + aug_in)` multiply-adds,
//! the Kronecker one `k_out fan_out + k_in aug_in + k_out k_in` — about `√k`
//! times less, which is what makes projecting every example of every step
//! affordable for a convolution's many positions. A side with `k_out ≥ fan_out`
//! (or `k_in ≥ aug_in`) is the identity: exact, not random.

use ndarray::{Array1, Array2, ArrayView2, ArrayView3, Axis, linalg::general_mat_mul, s};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::float::Float;

/// Which random projection a sketch uses (see [`SketchConfig::projection`](super::SketchConfig::projection)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Projection {
    /// `φ(G)_m = l_mᵀ G r_m / √k`: a tensor (Khatri–Rao) sketch, `k (fan_out + aug_in)`
    /// multiply-adds per factored row.
    #[default]
    Tensor,
    /// `φ(G) = S_out G S_inᵀ` with `k = k_out · k_in` (LoGra's Kronecker-factored
    /// projection): about `√k` times cheaper per row, the choice for online recording.
    Kronecker,
}

/// The seeded operators of one layer's projection.
#[derive(Clone, Debug)]
pub(crate) struct Projector {
    kind: Projection,
    fan_out: usize,
    aug_in: usize,
    /// Tensor: `L` (`k × fan_out`, ±1). Kronecker: `S_out` (`k_out × fan_out`), `None` = identity.
    left: Option<Array2<f32>>,
    /// Tensor: `R` (`k × aug_in`, ±1). Kronecker: `S_in` (`k_in × aug_in`), `None` = identity.
    right: Option<Array2<f32>>,
    k_out: usize,
    k_in: usize,
}

/// The most values a layer's projection operators may hold (1 GiB of `f32`).
pub(crate) const MAX_OPERATOR_VALUES: usize = 1 << 28;

/// Values of the operators of a `kind` projection with sides `(k_out, k_in)`
/// (the tensor sketch: `(k, k)`) for a `fan_out × aug_in` layer; `None` on overflow.
pub(crate) fn operator_values(
    kind: Projection,
    (k_out, k_in): (usize, usize),
    fan_out: usize,
    aug_in: usize,
) -> Option<usize> {
    let side = |k: usize, n: usize| match kind {
        Projection::Tensor => k.checked_mul(n),
        Projection::Kronecker if k >= n => Some(0),
        Projection::Kronecker => k.checked_mul(n),
    };
    side(k_out, fan_out)?.checked_add(side(k_in, aug_in)?)
}

/// Kronecker side sizes for about `k` dimensions: balanced, within the layer's shape.
pub(crate) fn kronecker_split(k: usize, fan_out: usize, aug_in: usize) -> (usize, usize) {
    let k = k.max(1);
    let mut k_out = ((k as f64).sqrt().floor() as usize).clamp(1, fan_out);
    let k_in = (k / k_out).clamp(1, aug_in);
    if k_in == aug_in {
        k_out = (k / k_in).clamp(1, fan_out);
    }
    (k_out, k_in)
}

fn rademacher(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |_| {
        if rng.random::<bool>() { scale } else { -scale }
    })
}

impl Projector {
    /// Layer `l`'s projector: `k` dimensions (tensor) or the Kronecker sides
    /// `(k_out, k_in)` (with `k_out · k_in` dimensions).
    pub(crate) fn new(
        kind: Projection,
        seed: u64,
        l: usize,
        (k_out, k_in): (usize, usize),
        fan_out: usize,
        aug_in: usize,
    ) -> Self {
        let mut rng =
            ChaCha8Rng::seed_from_u64(seed ^ (l as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let (left, right) = match kind {
            // The order of draws is the original sketch's: files saved before stay valid.
            Projection::Tensor => (
                Some(rademacher(&mut rng, k_out, fan_out, 1.0)),
                Some(rademacher(&mut rng, k_out, aug_in, 1.0)),
            ),
            Projection::Kronecker => {
                let side = |rng: &mut ChaCha8Rng, k: usize, n: usize| {
                    (k < n).then(|| rademacher(rng, k, n, 1.0 / (k as f32).sqrt()))
                };
                let left = side(&mut rng, k_out, fan_out);
                (left, side(&mut rng, k_in, aug_in))
            }
        };
        Self {
            kind,
            fan_out,
            aug_in,
            left,
            right,
            k_out,
            k_in: if kind == Projection::Tensor {
                k_out
            } else {
                k_in
            },
        }
    }

    /// Dimensions of `φ`.
    pub(crate) fn dims(&self) -> usize {
        match self.kind {
            Projection::Tensor => self.k_out,
            Projection::Kronecker => self.k_out * self.k_in,
        }
    }

    /// `Kronecker`'s `k_out` (the tensor projection's `k`).
    pub(crate) fn k_out(&self) -> usize {
        self.k_out
    }

    /// `op · xᵀ` as `[rows, k]` for rows `x` of `n` columns; with `x` one
    /// column short of `n`, the missing column is the bias's 1.
    fn side(op: &Option<Array2<f32>>, x: ArrayView2<'_, f32>, n: usize) -> Array2<f32> {
        let c = x.ncols();
        match op {
            Some(op) => {
                let mut out = x.dot(&op.slice(s![.., ..c]).t());
                if c < n {
                    out += &op.column(n - 1);
                }
                out
            }
            None if c < n => {
                let mut out = Array2::ones((x.nrows(), n));
                out.slice_mut(s![.., ..c]).assign(&x);
                out
            }
            None => x.to_owned(),
        }
    }

    /// `φ(Σ_p d_p ã_pᵀ)` of each group of `positions` consecutive rows of
    /// patches `a` (`aug_in` columns, or `fan_in` with the bias implied) and
    /// deltas `d` (`fan_out` columns): `[rows / positions, dims]`.
    pub(crate) fn project_rows(
        &self,
        a: ArrayView2<'_, f32>,
        d: ArrayView2<'_, f32>,
        positions: usize,
    ) -> Array2<f32> {
        let (ra, ld) = rayon::join(
            || Self::side(&self.right, a, self.aug_in),
            || Self::side(&self.left, d, self.fan_out),
        );
        let n = a.nrows() / positions.max(1);
        let k = self.dims();
        let mut out = Array2::<f32>::zeros((n, k));
        match self.kind {
            Projection::Tensor => {
                let scale = 1.0 / (k as f32).sqrt();
                out.axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(g, mut o)| {
                        for p in g * positions..(g + 1) * positions {
                            o.zip_mut_with(&(&ra.row(p) * &ld.row(p)), |o, &v| *o += v * scale);
                        }
                    });
            }
            Projection::Kronecker => {
                let (k_out, k_in) = (self.k_out, self.k_in);
                out.axis_iter_mut(Axis(0))
                    .into_par_iter()
                    .enumerate()
                    .for_each(|(g, o)| {
                        let rows = g * positions..(g + 1) * positions;
                        let mut o = o
                            .into_shape_with_order((k_out, k_in))
                            .expect("invariant: a row holds k_out × k_in values");
                        let (l, r) = (ld.slice(s![rows.clone(), ..]), ra.slice(s![rows, ..]));
                        general_mat_mul(1.0, &l.t(), &r, 0.0, &mut o);
                    });
            }
        }
        out
    }

    /// `φ(Σ_p d_{ip} ã_{ip}ᵀ)` of each example `i` of patches `[n, P, fan_in]`
    /// and deltas `[n, P, fan_out]` (any `F`, any layout): `[n, dims]`.
    pub(crate) fn project_factors<F: Float>(
        &self,
        a: ArrayView3<'_, F>,
        d: ArrayView3<'_, F>,
    ) -> Array2<f32> {
        let (n, positions, fan_in) = a.dim();
        let (a2, d2) = (
            flat_f32(a, n * positions, fan_in),
            flat_f32(d, n * positions, d.dim().2),
        );
        self.project_rows(a2.view(), d2.view(), positions)
    }

    /// `φ(M)` of a dense `[fan_out, aug_in]` matrix.
    pub(crate) fn project_dense(&self, m: ArrayView2<'_, f64>) -> Array1<f64> {
        let m = m.mapv(|v| v as f32);
        let widen = |x: Array2<f32>| x.mapv(f64::from);
        match self.kind {
            Projection::Tensor => {
                let (lm, rm) = (
                    self.left.as_ref().expect("invariant: tensor operators"),
                    self.right.as_ref().expect("invariant: tensor operators"),
                );
                let t = widen(m.dot(&rm.t())); // [fan_out, k]
                (&t * &widen(lm.t().to_owned())).sum_axis(Axis(0)) / (self.k_out as f64).sqrt()
            }
            Projection::Kronecker => {
                let t = match &self.right {
                    Some(r) => m.dot(&r.t()),
                    None => m,
                };
                let t = match &self.left {
                    Some(l) => l.dot(&t),
                    None => t,
                };
                Array1::from_iter(t.iter().map(|&v| f64::from(v)))
            }
        }
    }
}

/// `x` as `[rows, cols]` in `f32`: a view of `f32` data already in standard
/// layout is copied once, anything else converted in one pass.
fn flat_f32<F: Float>(x: ArrayView3<'_, F>, rows: usize, cols: usize) -> Array2<f32> {
    let v: Vec<f32> = match x.as_slice() {
        Some(s) if std::mem::size_of::<F>() == 4 => bytemuck::cast_slice::<F, f32>(s).to_vec(),
        Some(s) => s.iter().map(|v| v.widen() as f32).collect(),
        None => x.iter().map(|v| v.widen() as f32).collect(),
    };
    Array2::from_shape_vec((rows, cols), v).expect("invariant: rows × cols values")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Factored rows (bias implied or explicit) and the dense matrix they sum
    /// to project alike, for both projections and identity sides.
    #[test]
    fn rows_and_their_dense_sum_project_alike() {
        let (fan_out, fan_in, positions) = (5, 7, 3);
        let aug_in = fan_in + 1;
        let a = Array2::from_shape_fn((2 * positions, fan_in), |(i, j)| {
            ((i * 7 + j * 3) % 11) as f32 / 5.0 - 1.0
        });
        let d = Array2::from_shape_fn((2 * positions, fan_out), |(i, j)| {
            ((i * 5 + j * 2) % 7) as f32 / 3.0 - 1.0
        });
        for (kind, split) in [
            (Projection::Tensor, (9, 9)),
            (Projection::Kronecker, (3, 4)),
            (Projection::Kronecker, (5, 4)),
            (Projection::Kronecker, (5, 8)),
        ] {
            let p = Projector::new(kind, 3, 1, split, fan_out, aug_in);
            let phi = p.project_rows(a.view(), d.view(), positions);
            assert_eq!(phi.dim(), (2, p.dims()));
            let mut a_aug = Array2::<f32>::ones((a.nrows(), aug_in));
            a_aug.slice_mut(s![.., ..fan_in]).assign(&a);
            let explicit = p.project_rows(a_aug.view(), d.view(), positions);
            for g in 0..2 {
                let rows = g * positions..(g + 1) * positions;
                let m = d
                    .slice(s![rows.clone(), ..])
                    .t()
                    .dot(&a_aug.slice(s![rows, ..]))
                    .mapv(f64::from);
                let dense = p.project_dense(m.view());
                for (j, &v) in dense.iter().enumerate() {
                    let tol = 1e-4 * (1.0 + v.abs());
                    assert!(
                        (f64::from(phi[[g, j]]) - v).abs() < tol,
                        "{kind:?} {split:?}"
                    );
                    assert!((f64::from(explicit[[g, j]]) - v).abs() < tol);
                }
            }
        }
        assert_eq!(kronecker_split(1024, 10, 129), (10, 102));
        assert_eq!(kronecker_split(1024, 32, 10), (32, 10));
        assert_eq!(kronecker_split(1000, 256, 785), (31, 32));
    }
}
