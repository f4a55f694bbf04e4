//! Max pooling and flattening.

use ndarray::{Array4, ArrayD, ArrayViewD, Ix4, IxDyn};

use super::Layer;
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;

/// 2-d max pooling over `kernel_size × kernel_size` windows with stride `kernel_size`.
///
/// Rows and columns that do not fill a window are dropped (floor). Ties go to the
/// first maximum in row-major order.
///
/// # Shapes
/// `[batch, c, h, w]` → `[batch, c, h / k, w / k]`.
#[derive(Clone, Debug)]
pub struct MaxPool2d {
    kernel_size: usize,
    /// Input shape and flat input index of each output's maximum.
    cache: Option<([usize; 4], Vec<usize>)>,
}

impl MaxPool2d {
    /// Pooling over `kernel_size × kernel_size` windows.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `kernel_size` is zero.
    pub fn new(kernel_size: usize) -> Result<Self> {
        if kernel_size == 0 {
            return Err(Error::InvalidConfig {
                what: "max pool kernel_size",
                reason: "must be positive, found 0".into(),
            });
        }
        Ok(Self {
            kernel_size,
            cache: None,
        })
    }
}

impl<F: Float> Layer<F> for MaxPool2d {
    fn name(&self) -> &str {
        "maxpool2d"
    }

    fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let k = self.kernel_size;
        let got = shape_str(x.shape());
        let x = x
            .into_dimensionality::<Ix4>()
            .ok()
            .filter(|x| x.shape()[2] >= k && x.shape()[3] >= k)
            .ok_or_else(|| Error::ShapeMismatch {
                op: "MaxPool2d::forward",
                expected: format!("[batch, c, h>={k}, w>={k}]"),
                got,
            })?;
        check_finite(&x, "MaxPool2d::forward", "input")?;
        let (b, c, h, w) = x.dim();
        let (ho, wo) = (h / k, w / k);
        let mut out = Array4::zeros((b, c, ho, wo));
        let mut arg = Vec::with_capacity(b * c * ho * wo);
        for ((bi, ci, i, j), o) in out.indexed_iter_mut() {
            let mut best = (x[[bi, ci, i * k, j * k]], i * k, j * k);
            for di in 0..k {
                for dj in 0..k {
                    let v = x[[bi, ci, i * k + di, j * k + dj]];
                    if v > best.0 {
                        best = (v, i * k + di, j * k + dj);
                    }
                }
            }
            *o = best.0;
            arg.push(((bi * c + ci) * h + best.1) * w + best.2);
        }
        self.cache = Some(([b, c, h, w], arg));
        Ok(out.into_dyn())
    }

    fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let (shape, arg) = self.cache.as_ref().ok_or_else(|| Error::NoForwardCache {
            layer: "maxpool2d".into(),
            op: "backward",
        })?;
        let k = self.kernel_size;
        let expected = [shape[0], shape[1], shape[2] / k, shape[3] / k];
        if grad_out.shape() != expected {
            return Err(Error::ShapeMismatch {
                op: "MaxPool2d::backward",
                expected: shape_str(&expected),
                got: shape_str(grad_out.shape()),
            });
        }
        check_finite(&grad_out, "MaxPool2d::backward", "output gradient")?;
        let mut grad_in = vec![F::zero(); shape.iter().product()];
        for (&g, &idx) in grad_out.iter().zip(arg) {
            grad_in[idx] += g;
        }
        Ok(ArrayD::from_shape_vec(IxDyn(shape), grad_in)?)
    }
}

/// Flattens `[batch, ...]` to `[batch, features]`.
#[derive(Clone, Debug, Default)]
pub struct Flatten {
    shape: Option<Vec<usize>>,
}

impl Flatten {
    /// A new flatten layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<F: Float> Layer<F> for Flatten {
    fn name(&self) -> &str {
        "flatten"
    }

    fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        if x.ndim() < 2 {
            return Err(Error::ShapeMismatch {
                op: "Flatten::forward",
                expected: "[batch, ...] with at least 2 axes".into(),
                got: shape_str(x.shape()),
            });
        }
        let b = x.shape()[0];
        let features = x.len() / b.max(1);
        self.shape = Some(x.shape().to_vec());
        Ok(x.as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&[b, features]))?)
    }

    fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let shape = self.shape.as_ref().ok_or_else(|| Error::NoForwardCache {
            layer: "flatten".into(),
            op: "backward",
        })?;
        if grad_out.len() != shape.iter().product::<usize>() {
            return Err(Error::ShapeMismatch {
                op: "Flatten::backward",
                expected: format!("{} elements", shape.iter().product::<usize>()),
                got: shape_str(grad_out.shape()),
            });
        }
        Ok(grad_out
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(shape))?)
    }
}
