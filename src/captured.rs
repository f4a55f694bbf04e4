//! [`CapturedLayer`]: a traced layer of another framework, copied to the host
//! — its parameters after a step and the factors of the pass it stepped on.
//! The burn and candle adapters build these; a hand-written framework can too.

use ndarray::{Array1, Array3, ArrayD, ArrayView1, ArrayView3, ArrayViewD};

use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::trace::{LayerId, ParamMut, Traceable, TracedShape};

/// One traced layer as another framework left it: the weight (any shape whose
/// row-major reshape is `[fan_out, fan_in]`, e.g. a convolution's `[c_out,
/// c_in, kh, kw]`), the bias, and optionally the layer's input patches
/// `[batch, positions, fan_in]` and output gradients `∂L/∂z` `[batch,
/// positions, fan_out]` of one pass.
///
/// It implements [`Traceable`] for an [`OptimizerHook::external`](crate::OptimizerHook::external)
/// hook and for [`Query::from_layers`](crate::Query::from_layers): the
/// framework's optimizer steps the parameters, so
/// [`params_mut`](Traceable::params_mut) gives none.
///
/// # Example
/// ```
/// use refinement_ledger::{CapturedLayer, ndarray::{Array1, Array2, Array3}};
/// let w = Array2::<f32>::zeros((3, 2)).into_dyn();
/// let layer = CapturedLayer::new("fc", w, Some(Array1::zeros(3)))?
///     .with_factors(Array3::zeros((4, 1, 2)), Some(Array3::zeros((4, 1, 3))), 7)?;
/// assert_eq!(refinement_ledger::Traceable::traced_shape(&layer).aug_in(), 3);
/// assert!(CapturedLayer::new("fc", Array2::<f32>::zeros((3, 2)).into_dyn(), Some(Array1::zeros(2))).is_err());
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct CapturedLayer<F: Float = f32> {
    id: LayerId,
    shape: TracedShape,
    weight: ArrayD<F>,
    bias: Option<Array1<F>>,
    patches: Option<Array3<F>>,
    deltas: Option<Array3<F>>,
    pass: Option<u64>,
}

impl<F: Float> CapturedLayer<F> {
    /// A layer from its parameters; `weight`'s first axis is `fan_out`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for a weight with fewer than two axes or a zero
    /// size, or a bias of another length than `fan_out`.
    pub fn new(id: &str, weight: ArrayD<F>, bias: Option<Array1<F>>) -> Result<Self> {
        const OP: &str = "CapturedLayer::new";
        let dims = weight.shape().to_vec();
        if dims.len() < 2 || dims.contains(&0) || bias.as_ref().is_some_and(|b| b.len() != dims[0])
        {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected:
                    "a weight [fan_out, ...] of two or more non-empty axes, and a bias [fan_out]"
                        .into(),
                got: format!(
                    "weight {}, bias {:?}",
                    shape_str(&dims),
                    bias.as_ref().map(|b| b.len())
                ),
            });
        }
        let shape = TracedShape {
            fan_in: weight.len() / dims[0],
            fan_out: dims[0],
            has_bias: bias.is_some(),
            weight_shape: dims,
        };
        Ok(Self {
            id: LayerId::new(id),
            shape,
            weight: weight.as_standard_layout().into_owned(),
            bias,
            patches: None,
            deltas: None,
            pass: None,
        })
    }

    /// Adds the factors of one pass: the input patches, the output gradients
    /// (`None` after a forward pass only, e.g. for a query) and an id of the
    /// pass, new for every forward (see [`next_pass_id`](crate::next_pass_id)).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the patches are not `[batch, positions,
    /// fan_in]` or the gradients not `[batch, positions, fan_out]`;
    /// [`Error::NonFinite`] for NaN or infinity in either.
    pub fn with_factors(
        mut self,
        patches: Array3<F>,
        deltas: Option<Array3<F>>,
        pass: u64,
    ) -> Result<Self> {
        const OP: &str = "CapturedLayer::with_factors";
        let (n, p, fan_in) = patches.dim();
        let bad_deltas = deltas
            .as_ref()
            .is_some_and(|d| d.dim() != (n, p, self.shape.fan_out));
        if fan_in != self.shape.fan_in || bad_deltas {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!(
                    "{}: patches [batch, positions, {}] and gradients [batch, positions, {}]",
                    self.id, self.shape.fan_in, self.shape.fan_out
                ),
                got: format!(
                    "patches {}, gradients {:?}",
                    shape_str(patches.shape()),
                    deltas.as_ref().map(|d| d.shape().to_vec())
                ),
            });
        }
        check_finite(&patches, OP, &format!("input patches of {}", self.id))?;
        if let Some(d) = &deltas {
            check_finite(d, OP, &format!("output gradients of {}", self.id))?;
        }
        self.patches = Some(patches.as_standard_layout().into_owned());
        self.deltas = deltas.map(|d| d.as_standard_layout().into_owned());
        self.pass = Some(pass);
        Ok(self)
    }
}

impl<F: Float> Traceable<F> for CapturedLayer<F> {
    fn layer_id(&self) -> &LayerId {
        &self.id
    }
    fn traced_shape(&self) -> TracedShape {
        self.shape.clone()
    }
    fn weight(&self) -> ArrayViewD<'_, F> {
        self.weight.view()
    }
    fn bias(&self) -> Option<ArrayView1<'_, F>> {
        self.bias.as_ref().map(|b| b.view())
    }
    fn params_mut(&mut self) -> Vec<ParamMut<'_, F>> {
        Vec::new()
    }
    fn input_patches(&self) -> Result<ArrayView3<'_, F>> {
        self.patches
            .as_ref()
            .map(|a| a.view())
            .ok_or(Error::NoForwardCache {
                layer: self.id.to_string(),
                op: "CapturedLayer::input_patches (capture after a traced forward)",
            })
    }
    fn output_deltas(&self) -> Result<ArrayView3<'_, F>> {
        self.deltas
            .as_ref()
            .map(|d| d.view())
            .ok_or(Error::NoBackwardCache {
                layer: self.id.to_string(),
                op: "CapturedLayer::output_deltas (capture with the gradients of a backward pass)",
            })
    }
    fn pass_id(&self) -> Option<u64> {
        self.pass
    }
}
