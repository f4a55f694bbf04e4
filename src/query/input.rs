//! [`Query`]: a batch of inputs as the traced layers saw them, and how it is
//! built from a network and an input.
//!
//! A query holds, per traced layer, the patches the layer received for each
//! input at the final parameters and, for the gradient lenses, the per-example
//! loss gradients `∇_z ℓ`. For the loss lens over a run traced in segments, a
//! query can also carry passes at each segment boundary ([`Pairing`]): segment
//! `k`'s accounts are then read with gradients taken at its own end
//! ([`Pairing::SegmentEnd`], TracIn with one checkpoint per segment) or at the
//! mean of its start and end ([`Pairing::Midpoint`]).

use ndarray::{Array2, Array3, ArrayViewD, AsArray, Dimension};

use super::kernel::LayerInput;
use crate::error::{Error, Result, check_finite, shape_str};
use crate::float::Float;
use crate::ledger::{LayerMeta, Ledger, check_metas, params_checksum, read_params};
use crate::trace::{LayerId, Traceable, TracedModel, TracedShape, write_params};

/// A segment's loss-lens inputs, each with its weight.
type WeightedInputs<F> = Vec<(LayerInput<F>, f64)>;

/// Which parameters the loss lens's gradients are taken at, per segment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pairing {
    /// Every segment read with the gradients at the final parameters. Default.
    #[default]
    Final,
    /// Segment `k` read with the gradients at its own end.
    SegmentEnd,
    /// Segment `k` read with the mean of the gradients at its start and end.
    Midpoint,
}

/// The classes the query's loss gradients are taken at.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// The final network's predicted class of each input (what a user without
    /// labels has).
    Predicted,
    /// Given labels, one per input.
    Labels(&'a [usize]),
}

/// A batch of query inputs as the traced layers saw them: each layer's patches
/// and, for the gradient lenses, its output deltas (per-example loss gradients).
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{Lens, Query, query::{Pairing, Targets}};
/// let x = ndarray::array![[1.0, 0.9], [-1.0, -1.1]];
/// // One call builds the query a lens needs from the network and the input.
/// let q = Query::paired(&mut net, x.view().into_dyn(), Targets::Predicted, &ledger, Pairing::Midpoint)?;
/// assert_eq!(q.len(), 2);
/// assert!(q.has_gradients());
/// let top = ledger.scores(&q, Lens::Loss, refinement_ledger::LayerSel::All)?.top_k(0, 1)?;
/// assert_eq!(top.proponents[0].label, Some(1));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Query<F: Float = f32> {
    /// The pass at the final parameters.
    layers: Vec<QueryLayer<F>>,
    n: usize,
    /// Passes at every segment boundary (initial, end of segment 0, …), with their pairing.
    boundaries: Option<(Pairing, Vec<Vec<QueryLayer<F>>>)>,
    /// Per layer, the backward pass the layer's cache came from (see `Traceable::pass_id`).
    passes: Vec<Option<u64>>,
    /// Checksum of the network's parameters when the query was built.
    params: u32,
}

#[derive(Clone, Debug)]
struct QueryLayer<F> {
    id: LayerId,
    shape: TracedShape,
    patches: Array3<F>,
    deltas: Option<Array3<F>>,
}

impl<F: Float> Query<F> {
    /// The queries of the traced layers' last forward pass (run the *final*
    /// network on the query inputs first). Prefer [`forward`](Self::forward),
    /// which runs the pass for you.
    ///
    /// # Errors
    /// [`Error::Empty`] for no layers or no queries, [`Error::NoForwardCache`],
    /// [`Error::ShapeMismatch`] when layers disagree on the batch size,
    /// [`Error::NonFinite`].
    ///
    /// # Example
    /// ```
    /// # let (_ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Query;
    /// net.forward(ndarray::array![[1.0, 0.9], [-1.0, -1.0]].view().into_dyn())?;
    /// let q = Query::from_layers(&net.traceables())?;
    /// assert_eq!(q.len(), 2);
    /// assert!(!q.has_gradients());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn from_layers(layers: &[&dyn Traceable<F>]) -> Result<Self> {
        Self::build(layers, false)
    }

    /// As [`from_layers`](Self::from_layers), also keeping each layer's output
    /// deltas from the last backward pass, for the gradient lenses. Take them
    /// from a backward pass of the *summed* loss (e.g.
    /// [`Sequential::loss_gradients`](crate::nn::Sequential::loss_gradients)),
    /// so that they are per-example gradients. Prefer [`gradients`](Self::gradients).
    ///
    /// # Errors
    /// As [`from_layers`](Self::from_layers), and [`Error::NoBackwardCache`].
    ///
    /// # Example
    /// ```
    /// # let (_ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Query;
    /// net.loss_gradients(ndarray::array![[1.0, 0.9]].view().into_dyn(), &[1])?;
    /// let q = Query::with_gradients(&net.traceables())?;
    /// assert!(q.has_gradients());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn with_gradients(layers: &[&dyn Traceable<F>]) -> Result<Self> {
        Self::build(layers, true)
    }

    /// Runs `model` on `x` and keeps what the representation lenses need.
    ///
    /// # Errors
    /// Errors of the model's forward pass; as [`from_layers`](Self::from_layers).
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{Lens, Query};
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// assert!(ledger.explain(&q)?.layers.iter().all(|l| l.balance_error[0] < 1e-9));
    /// // The loss lens needs gradients, and says so.
    /// assert!(ledger.top_k_influences(&q, Lens::Loss, 3).is_err());
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn forward<'x, D: Dimension>(
        model: &mut dyn TracedModel<F>,
        x: impl AsArray<'x, F, D>,
    ) -> Result<Self>
    where
        F: 'x,
    {
        model.run(x.into().into_dyn())?;
        Self::from_layers(&model.traced())
    }

    /// Runs `model` forward and backward on `x` (summed loss at `targets`) and
    /// keeps what every lens needs, the loss gradients included.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the labels are not one per input; errors
    /// of the model's passes; as [`with_gradients`](Self::with_gradients).
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query, query::Targets};
    /// let x = ndarray::array![[1.0, 0.9]];
    /// let at_label = Query::gradients(&mut net, x.view().into_dyn(), Targets::Labels(&[1]))?;
    /// let predicted = Query::gradients(&mut net, x.view().into_dyn(), Targets::Predicted)?;
    /// // The network predicts class 1 here: the two queries agree.
    /// assert_eq!(
    ///     ledger.scores(&at_label, Lens::Loss, LayerSel::All)?,
    ///     ledger.scores(&predicted, Lens::Loss, LayerSel::All)?
    /// );
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn gradients<'x, D: Dimension>(
        model: &mut dyn TracedModel<F>,
        x: impl AsArray<'x, F, D>,
        targets: Targets<'_>,
    ) -> Result<Self>
    where
        F: 'x,
    {
        let x = x.into().into_dyn();
        let targets = resolve_targets(model, x.view(), targets)?;
        model.run_loss_gradients(x, &targets)?;
        Self::with_gradients(&model.traced())
    }

    /// As [`gradients`](Self::gradients), with every segment of `ledger` paired
    /// with gradients at its boundaries (see [`Pairing`]): the model is run at
    /// the ledger's initial and segment-end parameters, then restored to the
    /// parameters it had (its last pass is the final one again). The targets
    /// are fixed once, at the model's parameters.
    ///
    /// # Errors
    /// As [`gradients`](Self::gradients); [`Error::LayerMismatch`] when the
    /// model's traced layers are not the ledger's.
    pub fn paired<'x, D: Dimension>(
        model: &mut dyn TracedModel<F>,
        x: impl AsArray<'x, F, D>,
        targets: Targets<'_>,
        ledger: &Ledger<F>,
        pairing: Pairing,
    ) -> Result<Self>
    where
        F: 'x,
    {
        let x = x.into().into_dyn();
        const OP: &str = "Query::paired";
        ledger.check_layers(&model.traced(), OP)?;
        let targets = resolve_targets(model, x.view(), targets)?;
        if pairing == Pairing::Final {
            model.run_loss_gradients(x, &targets)?;
            return Self::with_gradients(&model.traced());
        }
        let own: Vec<Array2<f64>> = model
            .traced()
            .iter()
            .map(|l| read_params(*l, &l.traced_shape(), OP))
            .collect::<Result<_>>()?;
        let n_l = ledger.layers().len();
        let mut passes = Vec::with_capacity(ledger.n_segments() + 1);
        for b in 0..=ledger.n_segments() {
            let params: Vec<Array2<f64>> = (0..n_l)
                .map(|l| match b {
                    0 => ledger.initial_params(l).cloned(),
                    b => ledger.segment_end_params(b - 1, l).cloned(),
                })
                .collect::<Result<_>>()?;
            write_params(&mut model.traced_mut(), &params)?;
            model.run_loss_gradients(x.view(), &targets)?;
            passes.push(Self::with_gradients(&model.traced())?.layers);
        }
        write_params(&mut model.traced_mut(), &own)?;
        model.run_loss_gradients(x, &targets)?;
        let mut query = Self::with_gradients(&model.traced())?;
        query.boundaries = Some((pairing, passes));
        Ok(query)
    }

    fn build(layers: &[&dyn Traceable<F>], gradients: bool) -> Result<Self> {
        const OP: &str = "Query::from_layers";
        if layers.is_empty() {
            return Err(Error::Empty {
                op: OP,
                what: "list of traced layers",
            });
        }
        let mut out = Vec::with_capacity(layers.len());
        let mut n = None;
        for layer in layers {
            let shape = layer.traced_shape();
            let patches = layer.input_patches()?;
            let expected_n = *n.get_or_insert(patches.shape()[0]);
            if patches.shape()[0] != expected_n || patches.shape()[2] != shape.fan_in {
                return Err(Error::ShapeMismatch {
                    op: OP,
                    expected: format!(
                        "{}: patches [{expected_n}, P, {}]",
                        layer.layer_id(),
                        shape.fan_in
                    ),
                    got: shape_str(patches.shape()),
                });
            }
            check_finite(&patches, OP, &format!("patches of {}", layer.layer_id()))?;
            let deltas = if gradients {
                let d = layer.output_deltas()?;
                let want = [expected_n, patches.shape()[1], shape.fan_out];
                if d.shape() != want {
                    return Err(Error::ShapeMismatch {
                        op: OP,
                        expected: format!("{}: deltas {}", layer.layer_id(), shape_str(&want)),
                        got: shape_str(d.shape()),
                    });
                }
                check_finite(&d, OP, &format!("deltas of {}", layer.layer_id()))?;
                Some(d.to_owned())
            } else {
                None
            };
            out.push(QueryLayer {
                id: layer.layer_id().clone(),
                shape,
                patches: patches.to_owned(),
                deltas,
            });
        }
        let n = n.unwrap_or(0);
        if n == 0 {
            return Err(Error::Empty {
                op: OP,
                what: "query batch",
            });
        }
        Ok(Self {
            layers: out,
            n,
            boundaries: None,
            passes: layers.iter().map(|l| l.pass_id()).collect(),
            params: params_checksum(
                &layers
                    .iter()
                    .map(|l| read_params(*l, &l.traced_shape(), OP))
                    .collect::<Result<Vec<_>>>()?,
            ),
        })
    }

    /// Number of queries.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always false: a query holds at least one input.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Whether the query carries loss gradients (for the gradient lenses).
    pub fn has_gradients(&self) -> bool {
        self.layers.iter().all(|l| l.deltas.is_some())
    }

    /// How the loss lens pairs segments with gradients.
    pub fn pairing(&self) -> Pairing {
        self.boundaries.as_ref().map_or(Pairing::Final, |b| b.0)
    }

    /// Per layer, the backward pass the layers' caches came from.
    pub(crate) fn passes(&self) -> &[Option<u64>] {
        &self.passes
    }

    /// Checksum of the network's parameters when the query was built.
    pub(crate) fn params_checksum(&self) -> u32 {
        self.params
    }

    pub(crate) fn check(&self, metas: &[LayerMeta], op: &'static str) -> Result<()> {
        let got: Vec<(LayerId, TracedShape)> = self
            .layers
            .iter()
            .map(|l| (l.id.clone(), l.shape.clone()))
            .collect();
        check_metas(metas, &got, op)
    }

    /// Layer `l`'s input with no target yet (`[n_q·P, fan_out]` zeros).
    pub(crate) fn bare_input(&self, l: usize) -> LayerInput<F> {
        let ql = &self.layers[l];
        let (n, p, _) = ql.patches.dim();
        LayerInput::new(
            ql.patches.view(),
            ql.shape.has_bias,
            Array2::zeros((n * p, ql.shape.fan_out)),
        )
    }

    /// Layer `l`'s input for the representation lenses: its patches with target
    /// the refinement `r = (W_T − W₀) ã` (`change` is `W_T − W₀`).
    pub(crate) fn representation_input(&self, l: usize, change: &Array2<f64>) -> LayerInput<F> {
        let mut input = self.bare_input(l);
        input.target = input.a64.dot(&change.t());
        input
    }

    /// Layer `l`'s input for the loss lens at the final parameters: its patches
    /// with target `−∇_z ℓ`, so that `⟨c, t⟩ = −⟨G, ∇_W ℓ⟩`.
    pub(crate) fn loss_input(&self, l: usize, op: &'static str) -> Result<LayerInput<F>> {
        loss_input(&self.layers[l], op)
    }

    /// Layer `l`'s factors for the loss lens at the final parameters: patches
    /// and the deltas `∇_z ℓ` (the target is their negation).
    pub(crate) fn loss_factors(
        &self,
        l: usize,
        op: &'static str,
    ) -> Result<(ndarray::ArrayView3<'_, F>, ndarray::ArrayView3<'_, F>)> {
        let ql = &self.layers[l];
        let d = ql.deltas.as_ref().ok_or_else(|| Error::NoBackwardCache {
            layer: ql.id.to_string(),
            op,
        })?;
        Ok((ql.patches.view(), d.view()))
    }

    /// Per segment, the loss-lens inputs of layer `l` and their weights, when
    /// the query is paired with `n_segments` segments; `None` for [`Pairing::Final`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the query was paired with another number of segments.
    pub(crate) fn paired_inputs(
        &self,
        l: usize,
        n_segments: usize,
        op: &'static str,
    ) -> Result<Option<Vec<WeightedInputs<F>>>> {
        let Some((pairing, passes)) = &self.boundaries else {
            return Ok(None);
        };
        if passes.len() != n_segments + 1 {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("a query paired with {n_segments} segments"),
                got: format!("{} segment boundaries", passes.len()),
            });
        }
        (0..n_segments)
            .map(|k| {
                let end = loss_input(&passes[k + 1][l], op)?;
                Ok(match pairing {
                    Pairing::Midpoint => vec![(loss_input(&passes[k][l], op)?, 0.5), (end, 0.5)],
                    Pairing::SegmentEnd | Pairing::Final => vec![(end, 1.0)],
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }
}

fn loss_input<F: Float>(ql: &QueryLayer<F>, op: &'static str) -> Result<LayerInput<F>> {
    let d = ql.deltas.as_ref().ok_or_else(|| Error::NoBackwardCache {
        layer: ql.id.to_string(),
        op,
    })?;
    let (n, p, fo) = d.dim();
    let target = d
        .mapv(|v| -v.widen())
        .into_shape_with_order((n * p, fo))
        .expect("invariant: standard layout");
    Ok(LayerInput::new(
        ql.patches.view(),
        ql.shape.has_bias,
        target,
    ))
}

/// The class of each input the loss gradients are taken at.
fn resolve_targets<F: Float>(
    model: &mut dyn TracedModel<F>,
    x: ArrayViewD<'_, F>,
    targets: Targets<'_>,
) -> Result<Vec<usize>> {
    match targets {
        Targets::Predicted => Ok(argmax_rows(model.run(x)?.view())),
        Targets::Labels(labels) => {
            let n = x.shape().first().copied().unwrap_or(0);
            if labels.len() != n {
                return Err(Error::ShapeMismatch {
                    op: "Query::gradients",
                    expected: format!("{n} labels (one per input)"),
                    got: labels.len().to_string(),
                });
            }
            Ok(labels.to_vec())
        }
    }
}

/// Index of the largest value in each row (first on ties).
pub fn argmax_rows<F: Float>(x: ndarray::ArrayView2<'_, F>) -> Vec<usize> {
    x.rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, F::neg_infinity()), |best, (j, &v)| {
                    if v > best.1 { (j, v) } else { best }
                })
                .0
        })
        .collect()
}
