//! Data: the bundled digits set, datasets that carry example ids, and seeded samplers.

mod idx;
mod sampler;

pub use idx::IdxSplit;
pub use sampler::{ClassPureBatch, ClassPureSampler, ShuffledSampler};

use std::io::Read;

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::float::Float;
use crate::trace::ExampleId;

/// The UCI digits as shipped with scikit-learn: 1,797 8×8 images, pixels 0–16,
/// label last (CC BY 4.0; see `data/NOTICE`).
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Examples with ids and labels, batch first.
///
/// # Example
/// ```
/// use refinement_ledger::data::Dataset;
/// let digits = Dataset::<f32>::digits()?;
/// assert_eq!((digits.len(), digits.n_classes()), (1797, 10));
/// let (train, test) = digits.stratified_split(0.2, 0)?;
/// assert_eq!(train.len() + test.len(), 1797);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Dataset<F: Float = f32> {
    x: ArrayD<F>,
    labels: Vec<usize>,
    ids: Vec<ExampleId>,
    n_classes: usize,
}

impl<F: Float> Dataset<F> {
    /// A dataset from inputs `[n, ...]`, labels and ids (one per row).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for lengths that differ, [`Error::LabelOutOfRange`],
    /// [`Error::InconsistentSource`] for duplicate ids, [`Error::NonFinite`].
    pub fn new(
        x: ArrayD<F>,
        labels: Vec<usize>,
        ids: Vec<ExampleId>,
        n_classes: usize,
    ) -> Result<Self> {
        const OP: &str = "Dataset::new";
        let n = x.shape().first().copied().unwrap_or(0);
        if labels.len() != n || ids.len() != n {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!("{n} labels and ids (one per row)"),
                got: format!("{} labels, {} ids", labels.len(), ids.len()),
            });
        }
        if let Some(&label) = labels.iter().find(|&&l| l >= n_classes) {
            return Err(Error::LabelOutOfRange {
                op: OP,
                label,
                n_classes,
            });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(id) = ids.iter().find(|id| !seen.insert(**id)) {
            return Err(Error::InconsistentSource {
                op: OP,
                reason: format!("example {id} appears twice"),
            });
        }
        crate::error::check_finite(&x, OP, "inputs")?;
        Ok(Self {
            x,
            labels,
            ids,
            n_classes,
        })
    }

    /// The digits: inputs `[1797, 64]` scaled to `[0, 1]`, ids 0..1797 in file order.
    ///
    /// # Errors
    /// [`Error::CorruptData`] if the bundled file does not parse (it does; the
    /// check guards the build).
    pub fn digits() -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptData {
            what: "bundled digits.csv.gz",
            reason,
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
            .read_to_string(&mut text)
            .map_err(|e| corrupt(e.to_string()))?;
        let mut values = Vec::with_capacity(1797 * 64);
        let mut labels = Vec::with_capacity(1797);
        for (line_no, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let fields: Vec<&str> = line.split(',').collect();
            if fields.len() != 65 {
                return Err(corrupt(format!(
                    "line {}: expected 65 fields, found {}",
                    line_no + 1,
                    fields.len()
                )));
            }
            for f in &fields[..64] {
                let v: f64 = f
                    .trim()
                    .parse()
                    .map_err(|_| corrupt(format!("line {}: bad pixel {f:?}", line_no + 1)))?;
                values.push(F::narrow(v / 16.0));
            }
            let label: usize = fields[64]
                .trim()
                .parse()
                .map_err(|_| corrupt(format!("line {}: bad label", line_no + 1)))?;
            labels.push(label);
        }
        let n = labels.len();
        let x = ArrayD::from_shape_vec(IxDyn(&[n, 64]), values)?;
        Self::new(x, labels, (0..n as u64).map(ExampleId).collect(), 10)
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Inputs `[n, ...]`.
    pub fn x(&self) -> &ArrayD<F> {
        &self.x
    }

    /// Labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Example ids.
    pub fn ids(&self) -> &[ExampleId] {
        &self.ids
    }

    /// The same examples with inputs reshaped to `shape` per example (e.g. `[1, 8, 8]`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `shape` does not hold one example's values.
    pub fn reshaped(&self, shape: &[usize]) -> Result<Self> {
        let mut full = vec![self.len()];
        full.extend_from_slice(shape);
        let per: usize = self.x.shape()[1..].iter().product();
        if shape.iter().product::<usize>() != per {
            return Err(Error::ShapeMismatch {
                op: "Dataset::reshaped",
                expected: format!("a shape of {per} values"),
                got: format!("{shape:?}"),
            });
        }
        let x = self
            .x
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order(IxDyn(&full))?;
        Ok(Self { x, ..self.clone() })
    }

    /// Rows `idx`, in that order.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index past the end.
    pub fn subset(&self, idx: &[usize]) -> Result<Self> {
        if let Some(&i) = idx.iter().find(|&&i| i >= self.len()) {
            return Err(Error::IndexOutOfRange {
                op: "Dataset::subset",
                what: "row",
                index: i,
                len: self.len(),
            });
        }
        Ok(Self {
            x: self.x.select(Axis(0), idx),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            ids: idx.iter().map(|&i| self.ids[i]).collect(),
            n_classes: self.n_classes,
        })
    }

    /// A copy with the labels of rows `idx` replaced by `labels` (to simulate label noise).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`], [`Error::IndexOutOfRange`], [`Error::LabelOutOfRange`].
    pub fn with_labels(&self, idx: &[usize], labels: &[usize]) -> Result<Self> {
        if idx.len() != labels.len() {
            return Err(Error::ShapeMismatch {
                op: "Dataset::with_labels",
                expected: format!("{} labels", idx.len()),
                got: format!("{}", labels.len()),
            });
        }
        let mut out = self.clone();
        for (&i, &l) in idx.iter().zip(labels) {
            if i >= self.len() {
                return Err(Error::IndexOutOfRange {
                    op: "Dataset::with_labels",
                    what: "row",
                    index: i,
                    len: self.len(),
                });
            }
            if l >= self.n_classes {
                return Err(Error::LabelOutOfRange {
                    op: "Dataset::with_labels",
                    label: l,
                    n_classes: self.n_classes,
                });
            }
            out.labels[i] = l;
        }
        Ok(out)
    }

    /// A seeded split keeping each class's proportion: `(train, test)` with
    /// `round(test_fraction · n_c)` examples of each class `c` in the test part.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless `0 < test_fraction < 1`.
    pub fn stratified_split(&self, test_fraction: f64, seed: u64) -> Result<(Self, Self)> {
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::InvalidConfig {
                what: "test_fraction",
                reason: format!("must be in (0, 1), found {test_fraction}"),
            });
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for c in 0..self.n_classes {
            let mut idx: Vec<usize> = (0..self.len()).filter(|&i| self.labels[i] == c).collect();
            idx.shuffle(&mut rng);
            let k = (test_fraction * idx.len() as f64).round() as usize;
            test.extend_from_slice(&idx[..k]);
            train.extend_from_slice(&idx[k..]);
        }
        train.sort_unstable();
        test.sort_unstable();
        Ok((self.subset(&train)?, self.subset(&test)?))
    }

    /// Inputs of rows `idx` as one batch.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index past the end.
    pub fn batch_x(&self, idx: &[usize]) -> Result<ArrayD<F>> {
        self.check_rows(idx, "Dataset::batch_x")?;
        Ok(self.x.select(Axis(0), idx))
    }

    fn check_rows(&self, idx: &[usize], op: &'static str) -> Result<()> {
        match idx.iter().find(|&&i| i >= self.len()) {
            Some(&i) => Err(Error::IndexOutOfRange {
                op,
                what: "row",
                index: i,
                len: self.len(),
            }),
            None => Ok(()),
        }
    }

    /// One example as a flat vector (for thumbnails).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index past the end.
    pub fn flat(&self, i: usize) -> Result<Vec<F>> {
        self.check_rows(&[i], "Dataset::flat")?;
        Ok(self.x.index_axis(Axis(0), i).iter().copied().collect())
    }

    /// The inputs as `[n, features]`.
    pub fn x2(&self) -> Array2<F> {
        let n = self.len();
        let f = self.x.len() / n.max(1);
        self.x
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((n, f))
            .expect("invariant: n rows of f values")
    }
}
