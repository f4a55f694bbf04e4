//! 2-d convolution by im2col and matrix products.

use ndarray::{
    Array1, Array2, Array3, Array4, ArrayD, ArrayView1, ArrayView3, ArrayViewD, Axis, Ix4, s,
};
use rand::Rng;

use super::{Init, Layer};
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::patches::ConvGeometry;
use crate::trace::{LayerId, ParamId, ParamMut, Traceable, TracedShape};

/// Configuration of a [`Conv2d`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel side.
    pub kernel_size: usize,
    /// Step between kernel positions. Default: 1.
    pub stride: usize,
    /// Zero padding on every side. Default: 0.
    pub padding: usize,
    /// Weight initialisation. Default: [`Init::He`].
    pub init: Init,
}

impl Conv2dConfig {
    /// A `kernel_size × kernel_size` convolution, stride 1, no padding, He-initialised.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel_size,
            stride: 1,
            padding: 0,
            init: Init::He,
        }
    }

    /// Sets the stride.
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }

    /// Sets the zero padding.
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }

    /// Sets the weight initialisation.
    pub fn with_init(mut self, init: Init) -> Self {
        self.init = init;
        self
    }

    /// Builds the layer named `name`, drawing its weights from `rng`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when a size or the stride is zero.
    pub fn build<F: Float>(&self, name: &str, rng: &mut impl Rng) -> Result<Conv2d<F>> {
        let k = self.kernel_size;
        let (fan_in, fan_out) = (
            self.in_channels.saturating_mul(k).saturating_mul(k),
            self.out_channels.saturating_mul(k).saturating_mul(k),
        );
        // `sample` refuses a weight over MAX_LAYER_PARAMS before allocating.
        let w = self.init.sample(
            (self.out_channels, self.in_channels, k, k),
            fan_in,
            fan_out,
            rng,
        )?;
        Conv2d::from_weights(
            name,
            w,
            Array1::zeros(self.out_channels),
            self.stride,
            self.padding,
        )
    }
}

/// 2-d convolution: `z[:, p] = W a_p + b` over im2col patches `a_p`.
///
/// Weight layout `[c_out, c_in, kh, kw]`; patches are ordered `(c_in, kh, kw)`,
/// so the weight's row-major reshape is the `[c_out, c_in·kh·kw]` matrix of the
/// traced linear map. Output positions are ordered row-major over `(h, w)`.
///
/// # Shapes
/// input `[batch, c_in, h, w]` → output `[batch, c_out, h_out, w_out]`,
/// `h_out = (h + 2·padding − kh) / stride + 1`.
#[derive(Clone, Debug)]
pub struct Conv2d<F: Float = f32> {
    id: LayerId,
    weight: Array4<F>,
    bias: Array1<F>,
    grad_weight: Array4<F>,
    grad_bias: Array1<F>,
    stride: usize,
    padding: usize,
    /// Input shape and im2col patches `[batch, positions, fan_in]` of the last forward.
    cache: Option<([usize; 4], Array3<F>)>,
    delta: Option<Array3<F>>,
    /// Id of the backward pass `delta` comes from.
    pass: Option<u64>,
}

impl<F: Float> Conv2d<F> {
    /// A convolution with the given weight `[c_out, c_in, kh, kw]` and bias `[c_out]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a bias of the wrong length,
    /// [`Error::InvalidConfig`] for a zero dimension or stride,
    /// [`Error::NonFinite`] for NaN or infinite values.
    pub fn from_weights(
        name: &str,
        weight: Array4<F>,
        bias: Array1<F>,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        if weight.shape().contains(&0) || stride == 0 {
            return Err(Error::InvalidConfig {
                what: "conv2d geometry",
                reason: format!(
                    "needs positive dimensions and stride, found weight {:?}, stride {stride}",
                    weight.shape()
                ),
            });
        }
        if bias.len() != weight.shape()[0] {
            return Err(Error::ShapeMismatch {
                op: "Conv2d::from_weights (bias)",
                expected: shape_str(&[weight.shape()[0]]),
                got: shape_str(bias.shape()),
            });
        }
        check_finite(&weight, "Conv2d::from_weights", "weight")?;
        check_finite(&bias, "Conv2d::from_weights", "bias")?;
        Ok(Self {
            id: LayerId::new(name),
            grad_weight: Array4::zeros(weight.raw_dim()),
            grad_bias: Array1::zeros(bias.len()),
            weight,
            bias,
            stride,
            padding,
            cache: None,
            delta: None,
            pass: None,
        })
    }

    /// The weight `[c_out, c_in, kh, kw]`.
    pub fn weight_array(&self) -> &Array4<F> {
        &self.weight
    }

    /// The bias `[c_out]`.
    pub fn bias_array(&self) -> &Array1<F> {
        &self.bias
    }

    /// The weight gradient of the last backward pass.
    pub fn grad_weight(&self) -> &Array4<F> {
        &self.grad_weight
    }

    fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            kernel: [self.weight.shape()[2], self.weight.shape()[3]],
            stride: self.stride,
            padding: self.padding,
            dilation: 1,
        }
    }

    fn w_mat(&self) -> Array2<F> {
        let c_out = self.weight.shape()[0];
        let w = self.weight.as_standard_layout();
        w.into_owned()
            .into_shape_with_order((c_out, self.weight.len() / c_out))
            .expect("invariant: weight reshapes to [c_out, fan_in]")
    }

    /// col2im: adds patch gradients back onto the input grid.
    fn col2im(&self, cols: Array3<F>, shape: [usize; 4], ho: usize, wo: usize) -> Array4<F> {
        let [b, c, h, w] = shape;
        let (kh, kw) = (self.weight.shape()[2], self.weight.shape()[3]);
        let (p, st) = (self.padding, self.stride);
        let cols = cols
            .into_shape_with_order((b, ho, wo, c * kh * kw))
            .expect("invariant: standard layout");
        let mut padded = Array4::zeros((b, c, h + 2 * p, w + 2 * p));
        for ci in 0..c {
            for ki in 0..kh {
                for kj in 0..kw {
                    let col = (ci * kh + ki) * kw + kj;
                    let mut dst = padded.slice_mut(s![
                        ..,
                        ci,
                        ki..ki + st * (ho - 1) + 1;st,
                        kj..kj + st * (wo - 1) + 1;st
                    ]);
                    dst += &cols.slice(s![.., .., .., col]);
                }
            }
        }
        padded.slice(s![.., .., p..p + h, p..p + w]).to_owned()
    }
}

impl<F: Float> Layer<F> for Conv2d<F> {
    fn name(&self) -> &str {
        &self.id.0
    }

    fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let c_in = self.weight.shape()[1];
        let got = shape_str(x.shape());
        let x = x
            .into_dimensionality::<Ix4>()
            .ok()
            .filter(|x| x.shape()[1] == c_in && x.shape()[0] > 0)
            .ok_or_else(|| Error::ShapeMismatch {
                op: "Conv2d::forward",
                expected: format!("[batch>0, {c_in}, h, w]"),
                got,
            })?;
        check_finite(&x, "Conv2d::forward", "input")?;
        let (b, _, h, w) = x.dim();
        let (ho, wo) = self.geometry().output_hw(h, w)?;
        let cols = self.geometry().patches(x)?;
        let c_out = self.weight.shape()[0];
        let flat = cols
            .view()
            .into_shape_with_order((b * ho * wo, cols.shape()[2]))
            .expect("invariant: standard layout");
        let z = flat.dot(&self.w_mat().t()) + &self.bias; // [b·ho·wo, c_out]
        let z = z
            .into_shape_with_order((b, ho, wo, c_out))
            .expect("invariant: standard layout")
            .permuted_axes([0, 3, 1, 2])
            .as_standard_layout()
            .into_owned();
        self.cache = Some(([b, c_in, h, w], cols));
        self.delta = None;
        self.pass = None;
        Ok(z.into_dyn())
    }

    fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
        let (shape, cols) = self.cache.as_ref().ok_or_else(|| Error::NoForwardCache {
            layer: self.id.to_string(),
            op: "backward",
        })?;
        let shape = *shape;
        let (ho, wo) = self.geometry().output_hw(shape[2], shape[3])?;
        let c_out = self.weight.shape()[0];
        let expected = [shape[0], c_out, ho, wo];
        let got = shape_str(grad_out.shape());
        let g = grad_out
            .into_dimensionality::<Ix4>()
            .ok()
            .filter(|g| g.shape() == expected)
            .ok_or_else(|| Error::ShapeMismatch {
                op: "Conv2d::backward",
                expected: shape_str(&expected),
                got,
            })?;
        check_finite(&g, "Conv2d::backward", "output gradient")?;
        let positions = ho * wo;
        // δ as [batch, positions, c_out]
        let delta = g
            .permuted_axes([0, 2, 3, 1])
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((shape[0], positions, c_out))
            .expect("invariant: standard layout");
        let d_flat = delta
            .view()
            .into_shape_with_order((shape[0] * positions, c_out))
            .expect("invariant: standard layout");
        let fan_in = cols.shape()[2];
        let c_flat = cols
            .view()
            .into_shape_with_order((shape[0] * positions, fan_in))
            .expect("invariant: standard layout");
        let gw = d_flat.t().dot(&c_flat);
        self.grad_weight = gw
            .into_shape_with_order(self.weight.raw_dim())
            .expect("invariant: [c_out, fan_in] reshapes to the weight");
        self.grad_bias = d_flat.sum_axis(Axis(0));
        let grad_cols = d_flat
            .dot(&self.w_mat())
            .into_shape_with_order((shape[0], positions, fan_in))
            .expect("invariant: standard layout");
        let grad_in = self.col2im(grad_cols, shape, ho, wo);
        self.delta = Some(delta);
        self.pass = Some(crate::trace::next_pass_id());
        Ok(grad_in.into_dyn())
    }

    fn as_traceable(&self) -> Option<&dyn Traceable<F>> {
        Some(self)
    }

    fn as_traceable_mut(&mut self) -> Option<&mut dyn Traceable<F>> {
        Some(self)
    }
}

impl<F: Float> Traceable<F> for Conv2d<F> {
    fn layer_id(&self) -> &LayerId {
        &self.id
    }

    fn traced_shape(&self) -> TracedShape {
        let c_out = self.weight.shape()[0];
        TracedShape {
            fan_in: self.weight.len() / c_out,
            fan_out: c_out,
            has_bias: true,
            weight_shape: self.weight.shape().to_vec(),
        }
    }

    fn weight(&self) -> ArrayViewD<'_, F> {
        self.weight.view().into_dyn()
    }

    fn bias(&self) -> Option<ArrayView1<'_, F>> {
        Some(self.bias.view())
    }

    fn params_mut(&mut self) -> Vec<ParamMut<'_, F>> {
        vec![
            ParamMut {
                id: ParamId::of(&self.id, "weight"),
                value: self.weight.view_mut().into_dyn(),
                grad: self.grad_weight.view().into_dyn(),
            },
            ParamMut {
                id: ParamId::of(&self.id, "bias"),
                value: self.bias.view_mut().into_dyn(),
                grad: self.grad_bias.view().into_dyn(),
            },
        ]
    }

    fn input_patches(&self) -> Result<ArrayView3<'_, F>> {
        self.cache
            .as_ref()
            .map(|(_, cols)| cols.view())
            .ok_or_else(|| Error::NoForwardCache {
                layer: self.id.to_string(),
                op: "input_patches",
            })
    }

    fn output_deltas(&self) -> Result<ArrayView3<'_, F>> {
        self.delta
            .as_ref()
            .map(|d| d.view())
            .ok_or_else(|| Error::NoBackwardCache {
                layer: self.id.to_string(),
                op: "output_deltas",
            })
    }
    fn pass_id(&self) -> Option<u64> {
        self.pass
    }
}
