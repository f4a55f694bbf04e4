//! Building a sketch from an exact ledger: every account projected with the
//! seeded operators, factored rows without forming their outer products.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array2, ArrayView2, Axis, s};
use rayon::prelude::*;

use super::{
    Dims, LedgerSketch, ROW_BLOCK, SOURCE_CHUNK, SketchConfig, max_dims, operators, sketch_dense,
};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{LayerView, Ledger};

impl LedgerSketch {
    /// Projects every account of `ledger` (all segments summed) with the seeded operators.
    ///
    /// Costs `(fan_out + aug_in)·k` multiply-adds per factored row and
    /// `fan_out·aug_in·k` per dense account, in parallel over sources.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for zero dimensions or a ratio that is not finite and > 0.
    pub fn build<F: Float>(ledger: &Ledger<F>, config: &SketchConfig) -> Result<Self> {
        ledger.check_file()?;
        let n = ledger.sources().len();
        let exact_bytes = ledger.bytes_per_layer();
        let mut dims = Vec::with_capacity(ledger.layers().len());
        for (meta, &bytes) in ledger.layers().iter().zip(&exact_bytes) {
            let full = meta.shape.fan_out.saturating_mul(meta.shape.aug_in());
            let k = match config.dims {
                Dims::Fixed(0) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch dimensions",
                        reason: "must be at least 1, found 0".into(),
                    });
                }
                Dims::Fixed(k) if k > max_dims(full) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch dimensions",
                        reason: format!(
                            "at most {} for layer {} ({full} entries), found {k}",
                            max_dims(full),
                            meta.id
                        ),
                    });
                }
                Dims::Fixed(k) => k,
                Dims::Ratio(r) if r.is_finite() && r > 0.0 => {
                    // The budget, less the parameter change every sketch keeps.
                    let budget = (bytes as f64 / r - (full * 8) as f64).max(0.0);
                    ((budget / (2.0 * n.max(1) as f64)).floor() as usize).clamp(1, full)
                }
                Dims::Ratio(r) => {
                    return Err(Error::InvalidConfig {
                        what: "sketch ratio",
                        reason: format!("must be finite and > 0, found {r}"),
                    });
                }
            };
            dims.push(k);
        }
        let mut sketch = Vec::with_capacity(dims.len());
        let mut residual = Vec::with_capacity(dims.len());
        let mut change = Vec::with_capacity(dims.len());
        for (l, &k) in dims.iter().enumerate() {
            let meta = &ledger.layers()[l];
            let [lm, rm] = operators(config.seed, l, k, meta.shape.fan_out, meta.shape.aug_in());
            let layer = ledger.whole_layer(l);
            sketch.push(sketch_layer(&layer, n, &lm, &rm));
            residual.push(sketch_dense(ledger.residual(l)?.view(), &lm, &rm));
            change.push(ledger.final_params(l)? - ledger.initial_params(l)?);
        }
        Ok(Self {
            layers: ledger.layers().to_vec(),
            sources: ledger.sources().to_vec(),
            seed: config.seed,
            dims,
            change,
            sketch,
            residual,
            exact_bytes,
        })
    }
}

/// `φ(G_s)` of every source of one layer, `[N, k]` in `bf16`.
fn sketch_layer<F: Float>(
    layer: &LayerView<'_, F>,
    n: usize,
    lm: &Array2<f64>,
    rm: &Array2<f64>,
) -> Vec<bf16> {
    let k = lm.nrows();
    let scale = 1.0 / (k as f64).sqrt();
    let (lf, rf) = (lm.mapv(F::narrow), rm.mapv(F::narrow));
    // Dense accounts are projected in f32: its rounding (1e-7) is far below the
    // sketch's own error, and the GEMM runs twice as fast.
    let (lt32, rt32) = (lm.t().mapv(|v| v as f32), rm.t().mapv(|v| v as f32));
    let rows = layer.rows;
    let mut out = vec![bf16::ZERO; n * k];
    out.par_chunks_mut(SOURCE_CHUNK * k)
        .enumerate()
        .for_each(|(i, dst)| {
            let s0 = i * SOURCE_CHUNK;
            let s1 = s0 + dst.len() / k;
            let mut acc = Array2::<f64>::zeros((s1 - s0, k));
            // Factored rows: (L d) ⊙ (R ã), weighted by the group's coefficient.
            let (r0, r1) = rows.range(s0 as u32, s1 as u32);
            for b0 in (r0..r1).step_by(ROW_BLOCK) {
                let b1 = (b0 + ROW_BLOCK).min(r1);
                let (a, d) = rows.view(b0, b1);
                let ra = a.dot(&rf.t());
                let ld = d.dot(&lf.t());
                for j in 0..b1 - b0 {
                    let w = layer.coef[rows.group[b0 + j] as usize] * scale;
                    if w == 0.0 {
                        continue;
                    }
                    let mut dst = acc.row_mut(rows.source[b0 + j] as usize - s0);
                    for ((o, &x), &y) in dst.iter_mut().zip(ra.row(j)).zip(ld.row(j)) {
                        *o += w * x.widen() * y.widen();
                    }
                }
            }
            // Dense accounts: l_mᵀ G r_m.
            for &dense in &layer.dense {
                let (k0, k1) = (
                    dense.source.partition_point(|&s| (s as usize) < s0),
                    dense.source.partition_point(|&s| (s as usize) < s1),
                );
                let (fo, ai) = (dense.fan_out, dense.aug_in);
                for c0 in (k0..k1).step_by(64) {
                    let c1 = (c0 + 64).min(k1);
                    let stack = ArrayView2::from_shape(
                        ((c1 - c0) * fo, ai),
                        &dense.dense[c0 * fo * ai..c1 * fo * ai],
                    )
                    .expect("invariant: slots hold fan_out × aug_in values")
                    .mapv(|v| v as f32);
                    let t = stack.dot(&rt32); // [slots·fan_out, k]
                    for slot in c0..c1 {
                        let block = t.slice(s![(slot - c0) * fo..(slot - c0 + 1) * fo, ..]);
                        let phi = (&block * &lt32).sum_axis(Axis(0));
                        acc.row_mut(dense.source[slot] as usize - s0)
                            .zip_mut_with(&phi, |o, &v| *o += scale * f64::from(v));
                    }
                }
            }
            let flat: Vec<f32> = acc.iter().map(|&v| v as f32).collect();
            dst.convert_from_f32_slice(&flat);
        });
    out
}
