//! The patches a 2-d convolution multiplies its weight with (im2col), for
//! tracing a convolution of any framework: a convolution is the linear map
//! `z[:, p] = W a_p + b` over its input patches `a_p`, so its factors are the
//! patches `[batch, positions, c_in·kh·kw]` and `∂L/∂z` rearranged to
//! `[batch, positions, c_out]`.

use ndarray::{Array3, Array4, ArrayView4, s};

use crate::error::{Error, Result};
use crate::float::Float;

/// The geometry of a 2-d convolution (square stride, padding and dilation, as
/// in PyTorch, burn and candle with equal values per axis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Stride (≥ 1).
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Dilation (≥ 1).
    pub dilation: usize,
}

/// Most values a patch tensor may hold (2^31): far beyond any batch a tracer
/// copies to the host, and small enough that an absurd geometry is an error
/// rather than an allocation failure.
pub const MAX_PATCH_VALUES: usize = 1 << 31;

impl ConvGeometry {
    /// The output height and width for an input of `h × w`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero kernel, stride or dilation, or an
    /// overflowing size; [`Error::ShapeMismatch`] when the dilated kernel does
    /// not fit the padded input.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        const OP: &str = "ConvGeometry::output_hw";
        let [kh, kw] = self.kernel;
        if kh == 0 || kw == 0 || self.stride == 0 || self.dilation == 0 {
            return Err(Error::InvalidConfig {
                what: "convolution geometry",
                reason: format!("needs a positive kernel, stride and dilation, found {self:?}"),
            });
        }
        let overflow = || Error::InvalidConfig {
            what: "convolution geometry",
            reason: format!("sizes overflow for an input of {h}×{w} and {self:?}"),
        };
        let pad = self.padding.checked_mul(2).ok_or_else(overflow)?;
        let (hp, wp) = (
            h.checked_add(pad).ok_or_else(overflow)?,
            w.checked_add(pad).ok_or_else(overflow)?,
        );
        let span = |k: usize| {
            (k - 1)
                .checked_mul(self.dilation)
                .and_then(|v| v.checked_add(1))
        };
        let (sh, sw) = (
            span(kh).ok_or_else(overflow)?,
            span(kw).ok_or_else(overflow)?,
        );
        if sh > hp || sw > wp {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "an input of at least {sh}×{sw} after padding {}",
                    self.padding
                ),
                got: format!("{h}×{w}"),
            });
        }
        Ok(((hp - sh) / self.stride + 1, (wp - sw) / self.stride + 1))
    }

    /// The patches of `x` `[batch, c_in, h, w]`: `[batch, h_out·w_out,
    /// c_in·kh·kw]`, columns ordered `(c_in, kh, kw)` — the row-major order of
    /// a weight `[c_out, c_in, kh, kw]`.
    ///
    /// # Errors
    /// As [`output_hw`](Self::output_hw); [`Error::InvalidConfig`] when the
    /// patches would hold more than [`MAX_PATCH_VALUES`] values.
    ///
    /// # Example
    /// ```
    /// use refinement_ledger::{ConvGeometry, ndarray::Array4};
    /// let x = Array4::from_shape_fn((1, 1, 3, 3), |(_, _, i, j)| (3 * i + j) as f32);
    /// let g = ConvGeometry { kernel: [2, 2], stride: 1, padding: 0, dilation: 1 };
    /// let p = g.patches(x.view())?;
    /// assert_eq!(p.shape(), &[1, 4, 4]);
    /// assert_eq!(p.slice(ndarray::s![0, 3, ..]).to_vec(), vec![4.0, 5.0, 7.0, 8.0]);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn patches<F: Float>(&self, x: ArrayView4<'_, F>) -> Result<Array3<F>> {
        let (b, c, h, w) = x.dim();
        let (ho, wo) = self.output_hw(h, w)?;
        let [kh, kw] = self.kernel;
        let count = |dims: &[usize]| {
            dims.iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .filter(|&v| v <= MAX_PATCH_VALUES)
        };
        let (hp, wp) = (h + 2 * self.padding, w + 2 * self.padding); // checked by output_hw
        count(&[b, c, hp, wp])
            .and(count(&[b, ho, wo, c, kh, kw]))
            .ok_or_else(|| Error::InvalidConfig {
                what: "convolution patches",
                reason: format!(
                    "[{b}, {}, {}] is more than {MAX_PATCH_VALUES} values",
                    ho.saturating_mul(wo),
                    c.saturating_mul(kh).saturating_mul(kw)
                ),
            })?;
        let (p, st, dl) = (self.padding, self.stride, self.dilation);
        let mut padded = Array4::zeros((b, c, h + 2 * p, w + 2 * p));
        padded.slice_mut(s![.., .., p..p + h, p..p + w]).assign(&x);
        let mut cols = Array4::zeros((b, ho, wo, c * kh * kw));
        for ci in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let col = (ci * kh + ki) * kw + kj;
                    let (i0, j0) = (ki * dl, kj * dl);
                    let src = padded.slice(s![
                        ..,
                        ci,
                        i0..i0 + st * (ho - 1) + 1;st,
                        j0..j0 + st * (wo - 1) + 1;st
                    ]);
                    cols.slice_mut(s![.., .., .., col]).assign(&src);
                }
            }
        }
        Ok(cols
            .into_shape_with_order((b, ho * wo, c * kh * kw))
            .expect("invariant: standard layout"))
    }
}
