//! Backward passes agree with central finite differences, in f64
//! with h = 1e-5 and relative error < 1e-6; and the im2col convolution agrees
//! with a naive one.

use crate::common;

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use ndarray_rand::RandomExt;
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::Uniform;
use refinement_ledger::nn::{
    Conv2d, Conv2dConfig, Dense, DenseConfig, Flatten, Layer, MaxPool2d, Relu, Sequential, Sigmoid,
    SoftmaxCrossEntropy, Tanh,
};
use refinement_ledger::{Traceable, nn::Reduction};

const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / (a.abs() + b.abs()).max(1e-8)
}

fn random(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    ArrayD::random_using(IxDyn(shape), Uniform::new(-1.0, 1.0).unwrap(), &mut rng)
}

/// Values bounded away from zero (no ReLU kinks) and pairwise distinct (no pool ties).
fn away_from_kinks(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut x = random(shape, seed);
    for (i, v) in x.iter_mut().enumerate() {
        *v = v.signum() * (0.1 + v.abs()) + 1e-4 * i as f64;
    }
    x
}

/// Checks ∂⟨layer(x), v⟩/∂x and, for traced layers, ∂/∂θ against central differences.
fn check_layer(layer: &mut dyn Layer<f64>, x: ArrayD<f64>, name: &str) {
    let out = layer.forward(x.view()).unwrap();
    let v = random(out.shape(), 42);
    let f =
        |layer: &mut dyn Layer<f64>, x: &ArrayD<f64>| (layer.forward(x.view()).unwrap() * &v).sum();
    layer.forward(x.view()).unwrap();
    let grad_in = layer.backward(v.view()).unwrap();
    let param_grads: Vec<ArrayD<f64>> = layer
        .as_traceable_mut()
        .map(|t| {
            t.params_mut()
                .into_iter()
                .map(|p| p.grad.to_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut x2 = x.clone();
    for i in 0..x.len() {
        let orig = x2.as_slice().unwrap()[i];
        x2.as_slice_mut().unwrap()[i] = orig + H;
        let up = f(layer, &x2);
        x2.as_slice_mut().unwrap()[i] = orig - H;
        let down = f(layer, &x2);
        x2.as_slice_mut().unwrap()[i] = orig;
        let num = (up - down) / (2.0 * H);
        let ana = grad_in.as_slice().unwrap()[i];
        assert!(
            rel_err(num, ana) < TOL,
            "{name}: input grad {i}: numeric {num} analytic {ana}"
        );
    }
    for (p, analytic) in param_grads.iter().enumerate() {
        for i in 0..analytic.len() {
            let nudge = |layer: &mut dyn Layer<f64>, delta: f64| {
                let t = layer.as_traceable_mut().unwrap();
                let mut params = t.params_mut();
                let v = params[p].value.iter_mut().nth(i).unwrap();
                *v += delta;
            };
            nudge(layer, H);
            let up = f(layer, &x);
            nudge(layer, -2.0 * H);
            let down = f(layer, &x);
            nudge(layer, H);
            let num = (up - down) / (2.0 * H);
            let ana = analytic.iter().nth(i).copied().unwrap();
            assert!(
                rel_err(num, ana) < TOL,
                "{name}: param {p} grad {i}: numeric {num} analytic {ana}"
            );
        }
    }
}

#[test]
fn dense_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(1);
    let mut d: Dense<f64> = DenseConfig::new(5, 4).build("fc", &mut rng).unwrap();
    check_layer(&mut d, random(&[3, 5], 2), "dense");
}

#[test]
fn conv2d_backward_matches_finite_differences_with_stride_and_padding() {
    let mut rng = StdRng::seed_from_u64(3);
    for (stride, padding) in [(1, 0), (2, 1), (1, 2)] {
        let mut c: Conv2d<f64> = Conv2dConfig::new(2, 3, 3)
            .with_stride(stride)
            .with_padding(padding)
            .build("conv", &mut rng)
            .unwrap();
        check_layer(
            &mut c,
            random(&[2, 2, 5, 6], 4),
            &format!("conv stride {stride} padding {padding}"),
        );
    }
}

#[test]
fn activations_pool_and_flatten_match_finite_differences() {
    let x = away_from_kinks(&[2, 2, 4, 4], 5);
    check_layer(&mut Relu::new(), x.clone(), "relu");
    check_layer(&mut Tanh::new(), x.clone(), "tanh");
    check_layer(&mut Sigmoid::new(), x.clone(), "sigmoid");
    check_layer(&mut MaxPool2d::new(2).unwrap(), x.clone(), "maxpool");
    check_layer(&mut Flatten::new(), x, "flatten");
}

#[test]
fn softmax_cross_entropy_matches_finite_differences() {
    let logits = random(&[4, 5], 6)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let labels = [0, 3, 4, 1];
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let loss = SoftmaxCrossEntropy::new(reduction);
        let out = loss.loss_and_grad(logits.view(), &labels).unwrap();
        let mut l2 = logits.clone();
        for i in 0..4 {
            for j in 0..5 {
                l2[[i, j]] += H;
                let up = loss.loss_and_grad(l2.view(), &labels).unwrap().loss;
                l2[[i, j]] -= 2.0 * H;
                let down = loss.loss_and_grad(l2.view(), &labels).unwrap().loss;
                l2[[i, j]] += H;
                let num = (up - down) / (2.0 * H);
                assert!(
                    rel_err(num, out.grad[[i, j]]) < TOL,
                    "{reduction:?} [{i},{j}]"
                );
            }
        }
    }
}

#[test]
fn softmax_cross_entropy_is_finite_at_extreme_logits() {
    let logits = ndarray::array![[1e4f32, -1e4, 0.0], [-1e4, -1e4, -1e4]];
    let out = SoftmaxCrossEntropy::default()
        .loss_and_grad(logits.view(), &[1, 2])
        .unwrap();
    assert!(out.loss.is_finite() && out.grad.iter().all(|g| g.is_finite()));
    assert!(
        (out.per_example[0] - 2e4).abs() < 1.0,
        "{}",
        out.per_example[0]
    );
}

#[test]
fn whole_network_gradients_match_finite_differences() {
    let mut net = common::cnn::<f64>(3, 9);
    let x = random(&[2, 1, 6, 6], 10);
    let labels = [0, 2];
    net.train_batch(x.view(), &labels).unwrap();
    let grads: Vec<Vec<ArrayD<f64>>> = net
        .traceables_mut()
        .into_iter()
        .map(|t| {
            t.params_mut()
                .into_iter()
                .map(|p| p.grad.to_owned())
                .collect()
        })
        .collect();
    let loss = |net: &mut Sequential<f64>| {
        let logits = net.logits(x.view()).unwrap();
        SoftmaxCrossEntropy::default()
            .loss_and_grad(logits.view(), &labels)
            .unwrap()
            .loss
    };
    for (l, layer_grads) in grads.iter().enumerate() {
        for (p, g) in layer_grads.iter().enumerate() {
            for i in (0..g.len()).step_by(3) {
                let nudge = |net: &mut Sequential<f64>, d: f64| {
                    let mut ts = net.traceables_mut();
                    let mut params = ts[l].params_mut();
                    *params[p].value.iter_mut().nth(i).unwrap() += d;
                };
                nudge(&mut net, H);
                let up = loss(&mut net);
                nudge(&mut net, -2.0 * H);
                let down = loss(&mut net);
                nudge(&mut net, H);
                let num = (up - down) / (2.0 * H);
                let ana = g.iter().nth(i).copied().unwrap();
                assert!(
                    rel_err(num, ana) < TOL,
                    "layer {l} param {p} [{i}]: numeric {num} analytic {ana}"
                );
            }
        }
    }
}

/// Direct 4-loop convolution, the reference for im2col.
fn naive_conv(
    x: &Array4<f64>,
    w: &Array4<f64>,
    b: &Array1<f64>,
    stride: usize,
    pad: usize,
) -> Array4<f64> {
    let (n, c, h, wd) = x.dim();
    let (co, _, kh, kw) = w.dim();
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (wd + 2 * pad - kw) / stride + 1;
    let mut out = Array4::zeros((n, co, ho, wo));
    for ni in 0..n {
        for o in 0..co {
            for i in 0..ho {
                for j in 0..wo {
                    let mut s = b[o];
                    for ci in 0..c {
                        for ki in 0..kh {
                            for kj in 0..kw {
                                let (y, xx) = (
                                    (i * stride + ki) as isize - pad as isize,
                                    (j * stride + kj) as isize - pad as isize,
                                );
                                if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < wd {
                                    s += w[[o, ci, ki, kj]] * x[[ni, ci, y as usize, xx as usize]];
                                }
                            }
                        }
                    }
                    out[[ni, o, i, j]] = s;
                }
            }
        }
    }
    out
}

#[test]
fn im2col_conv_matches_naive_convolution() {
    for (stride, pad) in [(1, 0), (2, 1), (3, 2)] {
        let w = random(&[4, 3, 3, 2], 11).into_dimensionality().unwrap();
        let b: Array1<f64> = random(&[4], 12).into_dimensionality().unwrap();
        let x: Array4<f64> = random(&[2, 3, 7, 8], 13).into_dimensionality().unwrap();
        let mut conv = Conv2d::from_weights("c", w.clone(), b.clone(), stride, pad).unwrap();
        let got = conv.forward(x.view().into_dyn()).unwrap();
        let want = naive_conv(&x, &w, &b, stride, pad);
        common::assert_allclose(&got, &want.into_dyn(), 1e-12, 1e-12, "conv");
        // The traced map: z[:, p] = W_mat · patch_p + b, patch order (c_in, kh, kw).
        let patches = conv.input_patches().unwrap().to_owned();
        let w_mat = w.clone().into_shape_with_order((4, 18)).unwrap();
        let z0: Array2<f64> = patches.index_axis(ndarray::Axis(0), 0).dot(&w_mat.t()) + &b;
        let want0 = got
            .index_axis(ndarray::Axis(0), 0)
            .to_owned()
            .into_shape_with_order((4, z0.nrows()))
            .unwrap();
        common::assert_allclose(
            &z0.t().to_owned().into_dyn(),
            &want0.into_dyn(),
            1e-12,
            1e-12,
            "patches",
        );
    }
}
