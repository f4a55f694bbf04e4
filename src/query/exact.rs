//! Scoring with the exact ledger: every lens of [`Lens::spec`] from the
//! ledger's accounts, by the kernels' matrix products over all sources at once.

use ndarray::{Array1, Array2, Axis};

use super::Scorer;
use super::explain::{Explanation, LayerExplanation};
use super::input::{Pairing, Query, Targets};
use super::kernel::{LayerInput, chunk_contributions, dots, dots_for, materialize};
use super::lens::{LayerSel, Lens, LensSpec, Parts, Target};
use super::scores::{Influences, Scores};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ledger::{LayerView, Ledger, Segments, SourceMeta};
use crate::trace::{SourceId, TracedModel};

/// A lens over an exact ledger: a [`Scorer`]. Obtained from [`Ledger::lens`].
///
/// # Example
/// ```
/// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
/// use refinement_ledger::{LayerSel, Lens, Scorer, query::Pairing};
/// let x = ndarray::array![[1.0, 0.9]];
/// // From an input to a ranking in one call: the lens builds the query it needs.
/// let top = ledger.lens(Lens::Loss).pairing(Pairing::Midpoint).top_k(&mut net, x.view().into_dyn(), 2)?;
/// assert!(top[0].proponents.iter().all(|p| p.label == Some(1)));
/// let cos = ledger.lens(Lens::Cos).layers(LayerSel::Layer(1)).top_k(&mut net, x.view().into_dyn(), 2)?;
/// assert_eq!(cos[0].proponents.len(), 2);
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ExactLens<'a, F: Float = f32> {
    ledger: &'a Ledger<F>,
    lens: Lens,
    layers: LayerSel,
    pairing: Pairing,
}

impl<'a, F: Float> ExactLens<'a, F> {
    /// Restricts the lens to `layers` (default: [`LayerSel::All`]).
    pub fn layers(mut self, layers: LayerSel) -> Self {
        self.layers = layers;
        self
    }

    /// How the queries this lens builds ([`Scorer::query`]) pair segments with
    /// gradients, for the loss lens (default [`Pairing::Final`]). A query built
    /// by hand brings its own pairing.
    pub fn pairing(mut self, pairing: Pairing) -> Self {
        self.pairing = pairing;
        self
    }
}

impl<'a, F: Float> Scorer<'a, F> for ExactLens<'a, F> {
    fn sources(&self) -> &'a [SourceMeta] {
        self.ledger.sources()
    }

    fn needs_gradients(&self) -> bool {
        self.lens.needs_gradients()
    }

    fn query(
        &self,
        model: &mut dyn TracedModel<F>,
        x: ndarray::ArrayViewD<'_, F>,
    ) -> Result<Query<F>> {
        if self.lens.needs_gradients() {
            Query::paired(model, x, Targets::Predicted, self.ledger, self.pairing)
        } else {
            Query::forward(model, x)
        }
    }

    fn scores(&self, query: &Query<F>) -> Result<Scores<'a>> {
        self.ledger.scores(query, self.lens, self.layers)
    }

    fn scores_of(&self, query: &Query<F>, q: usize, sources: &[usize]) -> Result<Vec<f64>> {
        const OP: &str = "Scorer::scores_of";
        let ledger = self.ledger;
        let spec = self.lens.spec();
        if spec.needs_norm {
            let all = self.scores(query)?;
            return Ok(sources.iter().map(|&s| all[[q, s]]).collect());
        }
        ledger.check_query(query, OP)?;
        let n_src = ledger.sources().len();
        let selected = self.layers.resolve(ledger.layers().len(), self.lens, OP)?;
        let mut parts = Vec::with_capacity(selected.len());
        for &l in &selected {
            let mut dot = Array2::zeros((1, sources.len()));
            let mut t2 = Array1::zeros(1);
            for (view, input, w) in ledger.readings(query, l, &spec, OP)? {
                let one = input.single(q);
                let d = dots_for(&view, sources, n_src, &one);
                dot.row_mut(0).scaled_add(w, &ndarray::ArrayView1::from(&d));
                t2[0] = one.per_query_dot(one.target.view(), one.target.view())[0];
            }
            parts.push(Parts {
                dot,
                norm2: None,
                t2,
            });
        }
        Ok(spec.scores(&parts).row(0).to_vec())
    }

    fn self_scores(&self, query: &Query<F>, sources: &[SourceId]) -> Result<Array1<f64>> {
        const OP: &str = "Ledger::self_scores";
        let ledger = self.ledger;
        ledger.check_query(query, OP)?;
        if sources.len() != query.len() {
            return Err(Error::ShapeMismatch {
                op: OP,
                expected: format!("{} source ids (one per query)", query.len()),
                got: sources.len().to_string(),
            });
        }
        let idx: Vec<usize> = sources
            .iter()
            .map(|&s| ledger.source_index(s))
            .collect::<Result<_>>()?;
        let spec = self.lens.spec();
        let selected = self.layers.resolve(ledger.layers().len(), self.lens, OP)?;
        let n = query.len();
        let mut parts = Vec::with_capacity(selected.len());
        for &l in &selected {
            let (mut dot, mut norm2, mut t2) = (
                Array2::zeros((n, 1)),
                Array2::zeros((n, 1)),
                Array1::zeros(n),
            );
            for (view, input, w) in ledger.readings(query, l, &spec, OP)? {
                for (q, &s) in idx.iter().enumerate() {
                    let one = input.single(q);
                    let c = chunk_contributions(&view, s, s + 1, &one);
                    let c = c.index_axis(Axis(0), 0);
                    dot[[q, 0]] += w * one.per_query_dot(c, one.target.view())[0];
                    norm2[[q, 0]] = one.per_query_dot(c, c)[0];
                    t2[q] = one.per_query_dot(one.target.view(), one.target.view())[0];
                }
            }
            parts.push(Parts {
                dot,
                norm2: Some(norm2),
                t2,
            });
        }
        Ok(spec.scores(&parts).column(0).to_owned())
    }
}

/// One way a layer is read: a view over some segments, an input, its weight.
type Reading<'a, F> = (LayerView<'a, F>, LayerInput<F>, f64);

impl<F: Float> Ledger<F> {
    /// The lens `lens` over this ledger, all layers: a [`Scorer`].
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query, Scorer};
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let by_lens = ledger.lens(Lens::Share).layers(LayerSel::Layer(0)).scores(&q)?;
    /// assert_eq!(by_lens, ledger.scores(&q, Lens::Share, LayerSel::Layer(0))?);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn lens(&self, lens: Lens) -> ExactLens<'_, F> {
        ExactLens {
            ledger: self,
            lens,
            layers: LayerSel::All,
            pairing: Pairing::Final,
        }
    }

    /// Scores `[n_queries, n_sources]` under `lens` for the chosen layers:
    /// the scores of `self.lens(lens).layers(layers)`. The loss lens reads each
    /// segment with the gradients the query pairs it with ([`Query::paired`]).
    ///
    /// # Errors
    /// [`Error::LayerMismatch`] for a query of other layers, [`Error::Empty`]
    /// for a ledger without steps, [`Error::IndexOutOfRange`] for a bad layer,
    /// [`Error::NoBackwardCache`] for a gradient lens on a query without
    /// gradients, [`Error::InvalidConfig`] for the margin lens without a logits layer.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{LayerSel, Lens, Query};
    /// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let share = ledger.scores(&query, Lens::Share, LayerSel::Layer(0))?;
    /// let attribution = ledger.class_attribution(&query, None)?;
    /// // Shares add up (with the residual) to 1, and per class to the class attribution.
    /// let total: f64 = share.row(0).sum() + attribution[0].residual[0];
    /// assert!((total - 1.0).abs() < 1e-9);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn scores(&self, query: &Query<F>, lens: Lens, layers: LayerSel) -> Result<Scores<'_>> {
        const OP: &str = "Ledger::scores";
        self.check_query(query, OP)?;
        let spec = lens.spec();
        let selected = layers.resolve(self.layers().len(), lens, OP)?;
        let parts = selected
            .iter()
            .map(|&l| self.parts(query, l, &spec, OP))
            .collect::<Result<Vec<_>>>()?;
        Ok(Scores::new(spec.scores(&parts), self.sources()))
    }

    /// Self-scores: for each query `q` (a training example run through the final
    /// network), the score under `lens` of source `sources[q]`, over all layers.
    /// The loss lens's self-score ranks mislabelled examples best; the paper's
    /// `Share` self-influence ranks them in reverse.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `sources` and the query differ in length,
    /// [`Error::UnknownSource`], and as [`scores`](Self::scores).
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{ExampleId, Lens, Query, SourceId, query::Targets};
    /// let x = ndarray::array![[-1.0, -0.8], [0.9, 1.1]]; // training examples 0 and 1
    /// let q = Query::gradients(&mut net, x.view().into_dyn(), Targets::Labels(&[0, 1]))?;
    /// let ids = [SourceId::Example(ExampleId(0)), SourceId::Example(ExampleId(1))];
    /// let own = ledger.self_scores(&q, &ids, Lens::Loss)?;
    /// let all = ledger.scores(&q, Lens::Loss, refinement_ledger::LayerSel::All)?;
    /// assert!((own[1] - all.value(1, ids[1])?).abs() < 1e-9);
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn self_scores(
        &self,
        query: &Query<F>,
        sources: &[SourceId],
        lens: Lens,
    ) -> Result<Array1<f64>> {
        self.lens(lens).self_scores(query, sources)
    }

    /// The top `k` proponents and opponents of every query under `lens`, per
    /// layer and across all layers.
    ///
    /// # Errors
    /// As [`scores`](Self::scores).
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::{Lens, Query};
    /// let query = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let top = &ledger.top_k_influences(&query, Lens::Cos, 2)?[0];
    /// assert_eq!(top.per_layer.len(), 2);
    /// assert_eq!(top.per_layer[1].1.proponents[0].label, Some(1));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn top_k_influences(
        &self,
        query: &Query<F>,
        lens: Lens,
        k: usize,
    ) -> Result<Vec<Influences>> {
        const OP: &str = "Ledger::top_k_influences";
        self.check_query(query, OP)?;
        let spec = lens.spec();
        let selected = LayerSel::All.resolve(self.layers().len(), lens, OP)?;
        // Each layer's parts once; the combination is derived from them.
        let parts = selected
            .iter()
            .map(|&l| self.parts(query, l, &spec, OP))
            .collect::<Result<Vec<_>>>()?;
        let per_layer: Vec<Scores<'_>> = parts
            .iter()
            .map(|p| Scores::new(spec.scores(std::slice::from_ref(p)), self.sources()))
            .collect();
        let combined = Scores::new(spec.scores(&parts), self.sources());
        (0..query.len())
            .map(|q| {
                Ok(Influences {
                    query: q,
                    per_layer: selected
                        .iter()
                        .zip(&per_layer)
                        .map(|(&l, s)| Ok((self.layers()[l].id.clone(), s.top_k(q, k)?)))
                        .collect::<Result<_>>()?,
                    combined: combined.top_k(q, k)?,
                })
            })
            .collect()
    }

    /// All representation scores of every source for every query, per layer,
    /// with the ledger's balance per query (see [`Explanation`]).
    ///
    /// # Errors
    /// [`Error::LayerMismatch`] when the query's layers are not the ledger's;
    /// [`Error::Empty`] for a ledger without steps.
    ///
    /// # Example
    /// ```
    /// # let (ledger, mut net) = refinement_ledger::doc_fixture()?;
    /// use refinement_ledger::Query;
    /// let q = Query::forward(&mut net, ndarray::array![[1.0, 0.9]].view().into_dyn())?;
    /// let ex = ledger.explain(&q)?;
    /// assert_eq!(ex.layers.len(), 2);
    /// // Contributions add up to the refinement, with the residual.
    /// let layer = &ex.layers[1];
    /// let total = layer.dot.row(0).sum() + layer.residual_dot[0];
    /// assert!((total - layer.refinement_norm[0].powi(2)).abs() < 1e-9 * layer.refinement_norm[0].powi(2));
    /// # Ok::<(), refinement_ledger::Error>(())
    /// ```
    pub fn explain(&self, query: &Query<F>) -> Result<Explanation<'_>> {
        self.check_query(query, "Ledger::explain")?;
        let n_src = self.sources().len();
        let layers = (0..self.layers().len())
            .map(|l| {
                let input = self.representation_input(query, l);
                let r = &input.target;
                let view = self.whole_layer(l);
                let m = materialize(&view, n_src, &input);
                let c_res = input.apply(view.residual().view());
                let diff = &m.total + &c_res - r;
                let err = input
                    .per_query_dot(diff.view(), diff.view())
                    .mapv(f64::sqrt);
                let r_norm = input.per_query_dot(r.view(), r.view()).mapv(f64::sqrt);
                LayerExplanation {
                    layer: self.layers()[l].id.clone(),
                    dot: m.dot.t().as_standard_layout().into_owned(),
                    norm: m.norm2.t().mapv(f64::sqrt),
                    residual_dot: input.per_query_dot(c_res.view(), r.view()),
                    balance_error: ndarray::Zip::from(&err)
                        .and(&r_norm)
                        .map_collect(|&e, &n| if n == 0.0 { e } else { e / n }),
                    refinement_norm: r_norm,
                }
            })
            .collect();
        Ok(Explanation {
            layers,
            sources: self.sources(),
        })
    }

    pub(crate) fn check_query(&self, query: &Query<F>, op: &'static str) -> Result<()> {
        query.check(self.layers(), op)?;
        self.check_file()?;
        if self.is_last_step_pass(query.passes()) {
            return Err(Error::StaleQuery { op });
        }
        if query.params_checksum() != self.final_checksum() {
            return Err(Error::LayerMismatch {
                op,
                expected: format!(
                    "the traced network at the ledger's final parameters (checksum {:08x})",
                    self.final_checksum()
                ),
                got: format!(
                    "a network with other parameters (checksum {:08x}): run the query through the network the ledger traced, as it ended training",
                    query.params_checksum()
                ),
            });
        }
        if !self.has_steps() {
            return Err(Error::Empty {
                op,
                what: "ledger (no training step recorded)",
            });
        }
        Ok(())
    }

    /// Layer `l`'s input with the refinement `r = (W_T − W₀) ⊛ a` as its target.
    pub(crate) fn representation_input(&self, query: &Query<F>, l: usize) -> LayerInput<F> {
        let change = self.final_params(l).expect("invariant: layer in range")
            - self.initial_params(l).expect("invariant: layer in range");
        query.representation_input(l, &change)
    }

    /// The views and inputs (with weights) that layer `l` is read with under
    /// `spec`: the whole run with one input, or, for a loss lens on a paired
    /// query, each segment with its own.
    pub(crate) fn readings(
        &self,
        query: &Query<F>,
        l: usize,
        spec: &LensSpec,
        op: &'static str,
    ) -> Result<Vec<Reading<'_, F>>> {
        let whole = |input| Ok(vec![(self.whole_layer(l), input, 1.0)]);
        match spec.target {
            Target::Refinement => whole(self.representation_input(query, l)),
            Target::Margin => whole(self.margin_input(query, l)?),
            Target::LossGradient => match query.paired_inputs(l, self.n_segments(), op)? {
                None => whole(query.loss_input(l, op)?),
                Some(per_segment) => {
                    let mut out = Vec::new();
                    for (k, inputs) in per_segment.into_iter().enumerate() {
                        for (input, w) in inputs {
                            out.push((self.layer_view(l, Segments::One(k))?, input, w));
                        }
                    }
                    Ok(out)
                }
            },
        }
    }

    /// Layer `l`'s parts for every query and source under `spec`.
    fn parts(
        &self,
        query: &Query<F>,
        l: usize,
        spec: &LensSpec,
        op: &'static str,
    ) -> Result<Parts> {
        let (n_src, n_q) = (self.sources().len(), query.len());
        let mut dot: Option<Array2<f64>> = None; // [n_src, n_q]
        let mut norm2 = None;
        let mut t2 = Array1::zeros(n_q);
        for (view, input, w) in self.readings(query, l, spec, op)? {
            let d = if spec.needs_norm {
                let m = materialize(&view, n_src, &input);
                norm2 = Some(m.norm2.t().as_standard_layout().into_owned());
                m.dot
            } else {
                dots(&view, &input, n_src, n_q)
            };
            match &mut dot {
                None if w == 1.0 => dot = Some(d),
                None => dot = Some(d * w),
                Some(acc) => acc.scaled_add(w, &d),
            }
            t2 = input.per_query_dot(input.target.view(), input.target.view());
        }
        let dot = dot.expect("invariant: a layer is read at least once");
        Ok(Parts {
            dot: dot.t().as_standard_layout().into_owned(),
            norm2,
            t2,
        })
    }

    /// Layer `l`'s (the last layer's) input with target `e_ŷ − e_runner-up`
    /// from the final logits.
    fn margin_input(&self, query: &Query<F>, l: usize) -> Result<LayerInput<F>> {
        let mut input = query.bare_input(l);
        let fan_out = input.target.ncols();
        if input.positions != 1 || fan_out < 2 {
            return Err(Error::InvalidConfig {
                what: "margin lens",
                reason: format!(
                    "needs a last traced layer that outputs logits (one position, at least 2 classes), found {} with {} positions and {fan_out} outputs",
                    self.layers()[l].id,
                    input.positions
                ),
            });
        }
        let logits = input.apply(self.final_params(l)?.view());
        let mut target = Array2::zeros(logits.raw_dim());
        for (q, row) in logits.rows().into_iter().enumerate() {
            let mut order: Vec<usize> = (0..fan_out).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            target[[q, order[0]]] = 1.0;
            target[[q, order[1]]] = -1.0;
        }
        input.target = target;
        Ok(input)
    }
}
