//! Adopting the crate in an existing training loop: a hand-written two-layer
//! ndarray network with its own SGD, made traceable by implementing `Traceable`
//! for its linear layer and `Optimizer` for its update rule. Nothing else changes.
//!
//! Run: `cargo run --release --example custom_loop`

use ndarray::{Array1, Array2, ArrayView1, ArrayView3, ArrayViewD, Axis};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use refinement_ledger::{
    Batch, Error, ExampleId, LayerId, Lens, LinearRule, Optimizer, OptimizerHook, ParamId,
    ParamMut, Query, Result, Traceable, TracedShape,
};

/// The user's own linear layer `z = a Wᵀ + b`, caching what backprop needs.
struct Linear {
    id: LayerId,
    w: Array2<f32>,
    b: Array1<f32>,
    gw: Array2<f32>,
    gb: Array1<f32>,
    input: Option<Array2<f32>>,
    delta: Option<Array2<f32>>,
}

impl Linear {
    fn new(name: &str, inp: usize, out: usize, rng: &mut StdRng) -> Self {
        let normal = Normal::new(0.0, (1.0 / inp as f32).sqrt()).unwrap();
        Self {
            id: LayerId::new(name),
            w: Array2::from_shape_fn((out, inp), |_| normal.sample(rng)),
            b: Array1::zeros(out),
            gw: Array2::zeros((out, inp)),
            gb: Array1::zeros(out),
            input: None,
            delta: None,
        }
    }
    fn forward(&mut self, a: &Array2<f32>) -> Array2<f32> {
        self.input = Some(a.clone());
        a.dot(&self.w.t()) + &self.b
    }
    fn backward(&mut self, delta: Array2<f32>) -> Array2<f32> {
        let a = self.input.as_ref().expect("forward before backward");
        self.gw = delta.t().dot(a);
        self.gb = delta.sum_axis(Axis(0));
        let grad_in = delta.dot(&self.w);
        self.delta = Some(delta);
        grad_in
    }
}

/// The whole adoption: expose parameters, gradients and the per-example factors.
impl Traceable for Linear {
    fn layer_id(&self) -> &LayerId {
        &self.id
    }
    fn traced_shape(&self) -> TracedShape {
        TracedShape {
            fan_in: self.w.ncols(),
            fan_out: self.w.nrows(),
            has_bias: true,
            weight_shape: self.w.shape().to_vec(),
        }
    }
    fn weight(&self) -> ArrayViewD<'_, f32> {
        self.w.view().into_dyn()
    }
    fn bias(&self) -> Option<ArrayView1<'_, f32>> {
        Some(self.b.view())
    }
    fn params_mut(&mut self) -> Vec<ParamMut<'_, f32>> {
        vec![
            ParamMut {
                id: ParamId::of(&self.id, "weight"),
                value: self.w.view_mut().into_dyn(),
                grad: self.gw.view().into_dyn(),
            },
            ParamMut {
                id: ParamId::of(&self.id, "bias"),
                value: self.b.view_mut().into_dyn(),
                grad: self.gb.view().into_dyn(),
            },
        ]
    }
    fn input_patches(&self) -> Result<ArrayView3<'_, f32>> {
        self.input
            .as_ref()
            .map(|a| a.view().insert_axis(Axis(1)))
            .ok_or_else(|| Error::NoForwardCache {
                layer: self.id.to_string(),
                op: "input_patches",
            })
    }
    fn output_deltas(&self) -> Result<ArrayView3<'_, f32>> {
        self.delta
            .as_ref()
            .map(|d| d.view().insert_axis(Axis(1)))
            .ok_or_else(|| Error::NoBackwardCache {
                layer: self.id.to_string(),
                op: "output_deltas",
            })
    }
}

/// The user's own plain SGD. Reporting its linear rule lets the hook credit each example exactly.
struct PlainSgd {
    lr: f32,
}

impl Optimizer for PlainSgd {
    fn step(&mut self, params: &mut [ParamMut<'_, f32>]) -> Result<()> {
        for p in params.iter_mut() {
            p.value.zip_mut_with(&p.grad, |w, &g| *w -= self.lr * g);
        }
        Ok(())
    }
    fn linear_rule(&self) -> Option<LinearRule> {
        Some(LinearRule {
            lr: f64::from(self.lr),
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            first_step: false,
        })
    }
}

/// Three noisy blobs around the corners of a triangle.
fn data(n: usize, rng: &mut StdRng) -> (Array2<f32>, Vec<usize>) {
    const CENTRES: [[f32; 2]; 3] = [[-1.0, -0.6], [1.0, -0.6], [0.0, 1.1]];
    let noise = Normal::new(0.0f32, 0.5).unwrap();
    let mut x = Array2::zeros((n, 2));
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % 3;
        x[[i, 0]] = CENTRES[c][0] + noise.sample(rng);
        x[[i, 1]] = CENTRES[c][1] + noise.sample(rng);
        y.push(c);
    }
    (x, y)
}

/// Softmax cross-entropy (mean over the batch): returns the loss and ∂L/∂logits.
fn loss_grad(logits: &Array2<f32>, y: &[usize]) -> (f32, Array2<f32>) {
    let mut grad = logits.clone();
    let mut loss = 0.0;
    let n = y.len() as f32;
    for (mut row, &label) in grad.rows_mut().into_iter().zip(y) {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let s = row.sum();
        row.mapv_inplace(|v| v / s);
        loss -= row[label].ln() / n;
        row[label] -= 1.0;
        row.mapv_inplace(|v| v / n);
    }
    (loss, grad)
}

fn main() -> Result<()> {
    run().map(|_| ())
}

/// What the example found (the integration tests check it).
#[derive(Debug)]
pub struct Outcome {
    /// The class predicted for the query.
    pub predicted: usize,
    /// Rankings printed (lens × layer).
    pub rankings: usize,
    /// Per layer, the balance error of the explanation.
    pub balance_errors: Vec<f64>,
}

/// Trains, traces and explains, printing as it goes.
pub fn run() -> Result<Outcome> {
    let mut rng = StdRng::seed_from_u64(7);
    let (x, y) = data(200, &mut rng);
    let mut l1 = Linear::new("hidden", 2, 16, &mut rng);
    let mut l2 = Linear::new("out", 16, 3, &mut rng);

    // 1. Wrap the optimizer; the hook records the initial parameters.
    let mut hook = OptimizerHook::new(PlainSgd { lr: 0.2 }, &[&l1 as &dyn Traceable, &l2])?;

    for epoch in 0..20 {
        let mut order: Vec<usize> = (0..x.nrows()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut total = 0.0;
        for batch in order.chunks(16) {
            let xb = x.select(Axis(0), batch);
            let yb: Vec<usize> = batch.iter().map(|&i| y[i]).collect();
            // The user's forward and backward passes, unchanged.
            let h = l1.forward(&xb).mapv(f32::tanh);
            let logits = l2.forward(&h);
            let (loss, g) = loss_grad(&logits, &yb);
            let gh = l2.backward(g) * &h.mapv(|v| 1.0 - v * v);
            l1.backward(gh);
            total += loss;
            // 2. Step through the hook instead of the optimizer.
            let ids: Vec<ExampleId> = batch.iter().map(|&i| ExampleId(i as u64)).collect();
            hook.step(
                &mut [&mut l1 as &mut dyn Traceable, &mut l2],
                &Batch::new(&ids, &yb),
            )?;
        }
        if epoch % 5 == 4 {
            println!(
                "epoch {:>2}  mean loss {:.4}",
                epoch + 1,
                total / (x.nrows() as f32 / 16.0).ceil()
            );
        }
    }
    let ledger = hook.finish()?;

    // 3. Explain a prediction: forward the query through the final network, then ask.
    let query_x = ndarray::array![[0.8f32, -0.2]];
    let h = l1.forward(&query_x).mapv(f32::tanh);
    let logits = l2.forward(&h);
    let predicted = (0..3)
        .max_by(|&a, &b| logits[[0, a]].total_cmp(&logits[[0, b]]))
        .unwrap_or(0);
    let query = Query::from_layers(&[&l1 as &dyn Traceable, &l2])?;
    println!(
        "\nquery x = [{:+.2}, {:+.2}] → predicted class {predicted}",
        query_x[[0, 0]],
        query_x[[0, 1]]
    );
    let mut rankings = 0;
    for lens in [Lens::Influence, Lens::Cos] {
        let top = &ledger.top_k_influences(&query, lens, 5)?[0];
        for (layer, ranking) in &top.per_layer {
            rankings += 1;
            println!("\n{lens:?} at layer {layer}: top proponents");
            for inf in &ranking.proponents {
                let id = match inf.source {
                    refinement_ledger::SourceId::Example(e) => e.0 as usize,
                    _ => continue,
                };
                println!(
                    "  {}  label {:?}  x = [{:+.2}, {:+.2}]  score {:+.4}",
                    inf.source,
                    inf.label,
                    x[[id, 0]],
                    x[[id, 1]],
                    inf.score
                );
            }
        }
    }
    let ex = ledger.explain(&query)?;
    for layer in &ex.layers {
        println!(
            "balance error at {}: {:.1e}",
            layer.layer, layer.balance_error[0]
        );
    }
    Ok(Outcome {
        predicted,
        rankings,
        balance_errors: ex.layers.iter().map(|l| l.balance_error[0]).collect(),
    })
}
