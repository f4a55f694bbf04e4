//! Building a sketch from an exact ledger: every account projected with the
//! seeded operators, factored rows without forming their outer products.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use ndarray::Array2;
use rayon::prelude::*;

use super::{LedgerSketch, Projector, ROW_BLOCK, SOURCE_CHUNK, SketchConfig};
use crate::error::Result;
use crate::float::Float;
use crate::ledger::{LayerView, Ledger};

impl LedgerSketch {
    /// Projects every account of `ledger` (all segments summed) with the seeded operators.
    ///
    /// Costs `(fan_out + aug_in)·k` multiply-adds per factored row and
    /// `fan_out·aug_in·k` per dense account, in parallel over sources.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for zero dimensions or a ratio that is not finite and > 0.
    pub fn build<F: Float>(ledger: &Ledger<F>, config: &SketchConfig) -> Result<Self> {
        ledger.check_file()?;
        let n = ledger.sources().len();
        let exact_bytes = ledger.bytes_per_layer();
        let projectors = config.projectors(ledger.layers(), &exact_bytes, n)?;
        let mut sketch = Vec::with_capacity(projectors.len());
        let mut residual = Vec::with_capacity(projectors.len());
        let mut change = Vec::with_capacity(projectors.len());
        for (l, proj) in projectors.iter().enumerate() {
            let layer = ledger.whole_layer(l);
            sketch.push(sketch_layer(&layer, n, proj));
            residual.push(proj.project_dense(ledger.residual(l)?.view()));
            change.push(ledger.final_params(l)? - ledger.initial_params(l)?);
        }
        Ok(Self {
            layers: ledger.layers().to_vec(),
            sources: ledger.sources().to_vec(),
            seed: config.seed,
            projection: config.projection,
            dims: projectors.iter().map(Projector::dims).collect(),
            projectors,
            change,
            sketch,
            residual,
            exact_bytes,
        })
    }
}

/// `φ(G_s)` of every source of one layer, `[N, k]` in `bf16`.
fn sketch_layer<F: Float>(layer: &LayerView<'_, F>, n: usize, proj: &Projector) -> Vec<bf16> {
    let k = proj.dims();
    let rows = layer.rows;
    let mut out = vec![bf16::ZERO; n * k];
    out.par_chunks_mut(SOURCE_CHUNK * k)
        .enumerate()
        .for_each(|(i, dst)| {
            let s0 = i * SOURCE_CHUNK;
            let s1 = s0 + dst.len() / k;
            let mut acc = Array2::<f64>::zeros((s1 - s0, k));
            // Factored rows, projected without their outer products, weighted
            // by the group's coefficient.
            let (r0, r1) = rows.range(s0 as u32, s1 as u32);
            for b0 in (r0..r1).step_by(ROW_BLOCK) {
                let b1 = (b0 + ROW_BLOCK).min(r1);
                let (a, d) = rows.view(b0, b1);
                let phi = proj.project_rows(
                    a.mapv(|v| v.widen() as f32).view(),
                    d.mapv(|v| v.widen() as f32).view(),
                    1,
                );
                for j in 0..b1 - b0 {
                    let w = layer.coef[rows.group[b0 + j] as usize];
                    if w == 0.0 {
                        continue;
                    }
                    let mut dst = acc.row_mut(rows.source[b0 + j] as usize - s0);
                    dst.zip_mut_with(&phi.row(j), |o, &v| *o += w * f64::from(v));
                }
            }
            for &dense in &layer.dense {
                let (k0, k1) = (
                    dense.source.partition_point(|&s| (s as usize) < s0),
                    dense.source.partition_point(|&s| (s as usize) < s1),
                );
                for slot in k0..k1 {
                    let phi = proj.project_dense(dense.slot(slot));
                    let mut dst = acc.row_mut(dense.source[slot] as usize - s0);
                    dst += &phi;
                }
            }
            let flat: Vec<f32> = acc.iter().map(|&v| v as f32).collect();
            dst.convert_from_f32_slice(&flat);
        });
    out
}

impl LedgerSketch {
    /// The sketch of an online ledger (accounts kept projected): every
    /// segment's projected accounts summed, rounded to `bf16`.
    pub(crate) fn from_online<F: Float>(ledger: &Ledger<F>) -> Result<Self> {
        let online = ledger.online().ok_or_else(|| crate::error::Error::InvalidConfig {
            what: "online ledger",
            reason: "LedgerSketch::from_online: the ledger keeps exact accounts; use LedgerSketch::build".into(),
        })?;
        let n = ledger.sources().len();
        let mut sketch = Vec::with_capacity(online.projectors.len());
        let mut residual = Vec::with_capacity(online.projectors.len());
        let mut change = Vec::with_capacity(online.projectors.len());
        for (l, proj) in online.projectors.iter().enumerate() {
            let k = proj.dims();
            let layer = ledger.whole_layer(l);
            let mut acc = vec![0f32; n * k];
            for dense in &layer.dense {
                for (slot, &s) in dense.source.iter().enumerate() {
                    let dst = &mut acc[s as usize * k..(s as usize + 1) * k];
                    for (o, &v) in dst.iter_mut().zip(dense.slot(slot).iter()) {
                        *o += v as f32;
                    }
                }
            }
            let mut out = vec![bf16::ZERO; n * k];
            out.convert_from_f32_slice(&acc);
            sketch.push(out);
            residual.push(layer.residual().row(0).to_owned());
            change.push(ledger.final_params(l)? - ledger.initial_params(l)?);
        }
        Ok(Self {
            layers: ledger.layers().to_vec(),
            sources: ledger.sources().to_vec(),
            seed: online.seed,
            projection: online.projection,
            dims: online.projectors.iter().map(Projector::dims).collect(),
            projectors: online.projectors.clone(),
            change,
            sketch,
            residual,
            exact_bytes: ledger.exact_bytes_estimate(),
        })
    }
}
