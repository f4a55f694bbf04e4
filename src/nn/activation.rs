//! Element-wise activations: ReLU, tanh, sigmoid.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::Layer;
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;

/// Caches what an activation's backward pass needs and checks the gradient's shape.
fn cached<'a, F: Float>(
    cache: &'a Option<ArrayD<F>>,
    grad_out: &ArrayViewD<'_, F>,
    name: &'static str,
) -> Result<&'a ArrayD<F>> {
    let c = cache.as_ref().ok_or_else(|| Error::NoForwardCache {
        layer: name.to_string(),
        op: "backward",
    })?;
    if c.shape() != grad_out.shape() {
        return Err(Error::ShapeMismatch {
            op: name,
            expected: shape_str(c.shape()),
            got: shape_str(grad_out.shape()),
        });
    }
    check_finite(grad_out, name, "output gradient")?;
    Ok(c)
}

macro_rules! activation {
    ($(#[$doc:meta])* $name:ident, $label:literal, |$x:ident| $f:expr, |$y:ident| $df:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default)]
        pub struct $name<F: Float = f32> {
            /// The output of the last forward pass.
            out: Option<ArrayD<F>>,
        }

        impl<F: Float> $name<F> {
            /// A new activation layer.
            pub fn new() -> Self {
                Self { out: None }
            }
        }

        impl<F: Float> Layer<F> for $name<F> {
            fn name(&self) -> &str {
                $label
            }

            fn forward(&mut self, x: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
                check_finite(&x, $label, "input")?;
                let out = x.mapv(|$x: F| $f);
                self.out = Some(out.clone());
                Ok(out)
            }

            fn backward(&mut self, grad_out: ArrayViewD<'_, F>) -> Result<ArrayD<F>> {
                let out = cached(&self.out, &grad_out, $label)?;
                Ok(Zip::from(&grad_out).and(out).map_collect(|&g, &$y| g * $df))
            }
        }
    };
}

activation!(
    /// Rectified linear unit `max(0, x)`; its derivative at 0 is taken as 0.
    Relu,
    "relu",
    |x| if x > F::zero() { x } else { F::zero() },
    |y| if y > F::zero() { F::one() } else { F::zero() }
);

activation!(
    /// Hyperbolic tangent.
    Tanh,
    "tanh",
    |x| x.tanh(),
    |y| F::one() - y * y
);

activation!(
    /// Logistic sigmoid `1 / (1 + e^−x)`.
    Sigmoid,
    "sigmoid",
    |x| F::one() / (F::one() + (-x).exp()),
    |y| y * (F::one() - y)
);
