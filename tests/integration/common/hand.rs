//! A hand-written training step outside the hook — what a framework's own
//! optimizer does — and a layer that lies about its factors.

use ndarray::{Array3, ArrayD, ArrayView1, ArrayView3, ArrayViewD};
use refinement_ledger::nn::Sequential;
use refinement_ledger::{LayerId, LinearRule, ParamMut, Result, Traceable, TracedShape};

/// SGD in PyTorch's semantics, stepping a network from gradients it is given
/// (its own, clipped, or averaged over ranks).
#[derive(Clone, Debug)]
pub struct HandSgd {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    velocity: Vec<ArrayD<f64>>,
    steps: u64,
}

impl HandSgd {
    pub fn new(lr: f64, momentum: f64, dampening: f64, nesterov: bool, weight_decay: f64) -> Self {
        Self {
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
            velocity: Vec::new(),
            steps: 0,
        }
    }

    /// The rule of the next step, as this optimizer would declare it.
    pub fn rule(&self) -> LinearRule {
        LinearRule {
            lr: self.lr,
            momentum: self.momentum,
            dampening: self.dampening,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            first_step: self.steps == 0,
        }
    }

    /// Copies of the network's gradients, in `params_mut` order.
    pub fn grads(net: &mut Sequential<f64>) -> Vec<ArrayD<f64>> {
        net.traceables_mut()
            .into_iter()
            .flat_map(|l| {
                l.params_mut()
                    .into_iter()
                    .map(|p| p.grad.to_owned())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The factor `min(1, max_norm / ‖g‖)` of clipping `grads` by global norm.
    pub fn clip_factor(grads: &[ArrayD<f64>], max_norm: f64) -> f64 {
        let norm = grads
            .iter()
            .flat_map(|g| g.iter())
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt();
        (max_norm / norm).min(1.0)
    }

    /// One step with `scale · grads`.
    pub fn step(&mut self, net: &mut Sequential<f64>, grads: &[ArrayD<f64>], scale: f64) {
        if self.velocity.is_empty() {
            self.velocity = grads.iter().map(|g| ArrayD::zeros(g.raw_dim())).collect();
        }
        let mut k = 0;
        for layer in net.traceables_mut() {
            for p in layer.params_mut() {
                let mut value = p.value;
                for ((w, g), v) in value
                    .iter_mut()
                    .zip(&grads[k])
                    .zip(self.velocity[k].iter_mut())
                {
                    let g = scale * g + self.weight_decay * *w;
                    *v = if self.steps == 0 {
                        g
                    } else {
                        self.momentum * *v + (1.0 - self.dampening) * g
                    };
                    let d = if self.nesterov {
                        g + self.momentum * *v
                    } else if self.momentum > 0.0 {
                        *v
                    } else {
                        g
                    };
                    *w -= self.lr * d;
                }
                k += 1;
            }
        }
        self.steps += 1;
    }
}

/// A traced layer that hands the hook other factors than its own.
pub struct Lie<'a> {
    pub inner: &'a mut dyn Traceable<f64>,
    pub patches: Option<Array3<f64>>,
    pub deltas: Option<Array3<f64>>,
}

impl Traceable<f64> for Lie<'_> {
    fn layer_id(&self) -> &LayerId {
        self.inner.layer_id()
    }
    fn traced_shape(&self) -> TracedShape {
        self.inner.traced_shape()
    }
    fn weight(&self) -> ArrayViewD<'_, f64> {
        self.inner.weight()
    }
    fn bias(&self) -> Option<ArrayView1<'_, f64>> {
        self.inner.bias()
    }
    fn params_mut(&mut self) -> Vec<ParamMut<'_, f64>> {
        self.inner.params_mut()
    }
    fn input_patches(&self) -> Result<ArrayView3<'_, f64>> {
        match &self.patches {
            Some(p) => Ok(p.view()),
            None => self.inner.input_patches(),
        }
    }
    fn output_deltas(&self) -> Result<ArrayView3<'_, f64>> {
        match &self.deltas {
            Some(d) => Ok(d.view()),
            None => self.inner.output_deltas(),
        }
    }
    fn pass_id(&self) -> Option<u64> {
        self.inner.pass_id()
    }
}
