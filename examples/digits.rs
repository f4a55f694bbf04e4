//! The main job on real data: trace the training of an MLP and a small CNN on the
//! bundled digits, then explain test digits in the terminal and in an HTML report.
//!
//! Run: `cargo run --release --example digits` (add `-- --quick` for a short run).

mod common;

use std::path::PathBuf;

use common::{
    Model, Recipe, accuracy, gradient_query, representation_query, text_art, train_traced,
};
use refinement_ledger::Scorer;
use refinement_ledger::data::{ClassPureSampler, Dataset};
use refinement_ledger::nn::Sequential;
use refinement_ledger::optim::AdamConfig;
use refinement_ledger::query::RidgeLens;
use refinement_ledger::report::{HtmlReport, Thumb, bar_chart, png_data_uri, ridge_plot};
use refinement_ledger::{
    Batch, Credit, HookConfig, Influence, LayerSel, Ledger, Lens, OptimizerHook, Result, SourceId,
};

/// The ridge lens's `c` per model, chosen on held-out validation points by
/// `examples/evaluate.rs` (MLP 1.0, CNN 0.3).
fn ridge_c(model: Model) -> f64 {
    match model {
        Model::Mlp => 1.0,
        Model::Cnn => 0.3,
    }
}
/// Test digits explained (indices into the test split).
const EXPLAINED: [usize; 4] = [0, 37, 101, 222];

fn example_index(train: &Dataset<f32>, source: SourceId) -> Option<usize> {
    match source {
        SourceId::Example(e) => train.ids().iter().position(|&id| id == e),
        _ => None,
    }
}

/// A score with three significant digits, readable at any scale.
fn fmt_score(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:+.2e}")
    } else {
        format!("{v:+.3}")
    }
}

fn describe(inf: &Influence) -> String {
    match inf.label {
        Some(l) => format!("{} ({l})", inf.source),
        None => inf.source.to_string(),
    }
}

/// Prints `items` (id, label, score, pixels) as thumbnails side by side.
fn print_row(title: &str, items: &[(String, Option<Vec<f32>>)]) {
    println!("    {title}");
    for (caption, _) in items {
        print!("    {caption:<18}");
    }
    println!();
    for r in 0..8 {
        for (_, px) in items {
            let art = px
                .as_ref()
                .map(|p| text_art(p)[r].clone())
                .unwrap_or_else(|| " ".repeat(16));
            print!("    {art:<18}");
        }
        println!();
    }
}

fn thumbs(train: &Dataset<f32>, infs: &[Influence]) -> Result<Vec<Thumb>> {
    infs.iter()
        .filter_map(|inf| example_index(train, inf.source).map(|i| (i, inf)))
        .map(|(i, inf)| {
            Ok(Thumb {
                uri: png_data_uri(&train.flat(i)?, 8, 8, 5)?,
                caption: format!("{} {}", describe(inf), fmt_score(inf.score)),
            })
        })
        .collect()
}

fn explain_model(
    model: Model,
    net: &mut Sequential<f32>,
    ledger: &Ledger<f32>,
    train: &Dataset<f32>,
    test: &Dataset<f32>,
    report: &mut HtmlReport,
) -> Result<()> {
    let picked = test.subset(&EXPLAINED)?;
    let pred = net.predict(picked.x().view())?;
    let query = representation_query(net, picked.x())?;
    let explanation = ledger.explain(&query)?;
    let tops = ledger.top_k_influences(&query, Lens::Influence, 5)?;
    let attribution = ledger.class_attribution(&query, None)?;
    let gq = gradient_query(net, picked.x(), &pred)?;
    let ridge_lens = RidgeLens::fit(ledger, ridge_c(model))?;
    let ridge = ridge_lens.scores(&gq)?;
    let cos_last = ledger.scores(
        &query,
        Lens::Cos,
        LayerSel::Layer(ledger.layers().len() - 1),
    )?;
    let n_layers = ledger.layers().len();

    report.heading(&format!(
        "{} — {n_layers} traced layers",
        model.name().to_uppercase()
    ));
    for (qi, &ti) in EXPLAINED.iter().enumerate() {
        let label = picked.labels()[qi];
        println!(
            "\n[{}] test digit #{ti}: label {label}, predicted {}",
            model.name(),
            pred[qi]
        );
        print_row(
            "query",
            &[(format!("label {label}"), Some(picked.flat(qi)?))],
        );
        for (l, (layer, ranking)) in tops[qi].per_layer.iter().enumerate() {
            for (kind, list) in [
                ("proponents", &ranking.proponents),
                ("opponents", &ranking.opponents),
            ] {
                let items: Vec<(String, Option<Vec<f32>>)> = list
                    .iter()
                    .map(|inf| {
                        (
                            format!("{} {}", describe(inf), fmt_score(inf.score)),
                            example_index(train, inf.source).and_then(|i| train.flat(i).ok()),
                        )
                    })
                    .collect();
                print_row(&format!("layer {layer}: top-5 {kind} (influence)"), &items);
            }
            let shares: Vec<String> = attribution[l]
                .per_class
                .row(qi)
                .iter()
                .enumerate()
                .map(|(c, s)| format!("{c}:{s:+.2}"))
                .collect();
            println!(
                "    class attribution at {layer}: {}  (unlabeled {:+.3}, residual {:+.1e}); balance error {:.1e}",
                shares.join(" "),
                attribution[l].unlabeled[qi],
                attribution[l].residual[qi],
                explanation.layers[l].balance_error[qi]
            );
        }

        report.subheading(&format!(
            "Test digit #{ti}: label {label}, predicted {}",
            pred[qi]
        ));
        report.image_grid(
            "Query",
            &[Thumb {
                uri: png_data_uri(&picked.flat(qi)?, 8, 8, 8)?,
                caption: format!("label {label}"),
            }],
        );
        report.image_grid(
            "Representation lens (the paper's influence, all layers): top proponents",
            &thumbs(train, &tops[qi].combined.proponents)?,
        );
        report.image_grid(
            "Looks like: cos at the last layer, top proponents",
            &thumbs(train, &cos_last.top_k(qi, 8)?.proponents)?,
        );
        report.image_grid(
            "Caused by: ridge lens, top proponents",
            &thumbs(train, &ridge.top_k(qi, 8)?.proponents)?,
        );
        report.begin_row();
        for (l, meta) in ledger.layers().iter().enumerate() {
            let values: Vec<f64> = attribution[l].per_class.row(qi).to_vec();
            report.svg(&bar_chart(
                &format!("class attribution at {}", meta.id),
                &values,
                Some(pred[qi]),
            )?);
        }
        report.end_row();
        report.begin_row();
        for (l, meta) in ledger.layers().iter().enumerate() {
            let dist = explanation.class_distributions(qi, l, 10, 0.05)?;
            report.svg(&ridge_plot(
                &format!("{} (predicted {})", meta.id, pred[qi]),
                &dist,
                Some(pred[qi]),
            )?);
        }
        report.end_row();
    }
    Ok(())
}

/// The paper's protocol: class-pure batches with ghosts, Adam, batch-level ledger.
fn class_pure_adam(
    train: &Dataset<f32>,
    test: &Dataset<f32>,
    epochs: u64,
    report: &mut HtmlReport,
) -> Result<()> {
    let mut net = Model::Mlp.build(1)?;
    let adam = AdamConfig::new(0.01).build::<f32>()?;
    let cfg = HookConfig::default().with_credit(Credit::Batch);
    let mut hook = OptimizerHook::with_config(adam, &net.traceables(), cfg)?;
    let sampler = ClassPureSampler::new(train.labels(), 16, 2, 5)?;
    for epoch in 0..epochs {
        for b in sampler.epoch(epoch) {
            let rows = b.rows();
            let labels: Vec<usize> = rows.iter().map(|&i| train.labels()[i]).collect();
            let ghosts = b.ghost_mask();
            let mask: Vec<bool> = ghosts.iter().map(|g| !g).collect();
            net.train_batch_masked(train.batch_x(&rows)?.view(), &labels, Some(&mask))?;
            let ids: Vec<_> = rows.iter().map(|&i| train.ids()[i]).collect();
            hook.step(
                &mut net.traceables_mut(),
                &Batch::new(&ids, &labels).with_ghosts(&ghosts),
            )?;
        }
    }
    let ledger = hook.finish()?;
    println!(
        "\nclass-pure batches + Adam (batch-level ledger, {} batch sources)",
        ledger.sources().len()
    );
    println!(
        "mlp (class-pure, Adam) test accuracy: {:.4}",
        accuracy(&mut net, test)?
    );
    let picked = test.subset(&EXPLAINED)?;
    let pred = net.predict(picked.x().view())?;
    let query = representation_query(&mut net, picked.x())?;
    let attribution = ledger.class_attribution(&query, None)?;
    report.heading("Class-pure batches with Adam (batch-level ledger, exact per class)");
    for (qi, &ti) in EXPLAINED.iter().enumerate() {
        println!(
            "  test digit #{ti} (label {}, predicted {}):",
            picked.labels()[qi],
            pred[qi]
        );
        report.begin_row();
        for (l, ca) in attribution.iter().enumerate().take(ledger.layers().len()) {
            let shares: Vec<String> = ca
                .per_class
                .row(qi)
                .iter()
                .enumerate()
                .map(|(c, s)| format!("{c}:{s:+.2}"))
                .collect();
            println!("    {}: {}", ca.layer, shares.join(" "));
            let values: Vec<f64> = attribution[l].per_class.row(qi).to_vec();
            report.svg(&bar_chart(
                &format!("#{ti} at {}", ca.layer),
                &values,
                Some(pred[qi]),
            )?);
        }
        report.end_row();
    }
    Ok(())
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("traced-digits");
    run(std::env::args().any(|a| a == "--quick"), &dir).map(|_| ())
}

/// What the example produced (the integration tests check it).
#[derive(Debug)]
pub struct Outcome {
    /// Test accuracy of the MLP, then the CNN.
    pub accuracy: [f64; 2],
    /// The HTML report.
    pub report: PathBuf,
}

/// Trains, traces and explains both networks and writes the report into
/// `dir` (`quick`: 3 epochs instead of 30).
pub fn run(quick: bool, dir: &std::path::Path) -> Result<Outcome> {
    let epochs = if quick { 3 } else { 30 };
    let digits = Dataset::<f32>::digits()?;
    let (train, test) = digits.stratified_split(0.2, 0)?;
    println!(
        "digits: {} training, {} test examples; {epochs} epochs",
        train.len(),
        test.len()
    );
    let mut report = HtmlReport::new("refinement-ledger — traced training on the digits");
    report.paragraph(
        "Each explained test digit shows the training examples that built its representation \
         (the paper's influence), those it looks like (cos at the last layer), those that caused \
         the prediction (ridge lens), which classes built each layer's representation, and the \
         paper's ridge plots: per layer and class, the distribution of cos(contribution, refinement) \
         weighted by the contribution's norm, the predicted class in red.",
    );
    let mut accuracies = [0.0; 2];
    for (m, model) in [Model::Mlp, Model::Cnn].into_iter().enumerate() {
        let (tr, te) = (model.shape(&train)?, model.shape(&test)?);
        let mut net = model.build(1)?;
        let recipe = Recipe::for_model(model, epochs);
        let ledger = train_traced(&mut net, &tr, &recipe, false, model.name())?;
        accuracies[m] = accuracy(&mut net, &te)?;
        println!("{} test accuracy: {:.4}", model.name(), accuracies[m]);
        let bytes: Vec<String> = ledger
            .layers()
            .iter()
            .zip(ledger.bytes_per_layer())
            .map(|(m, b)| format!("{} {:.1} MB", m.id, b as f64 / 1e6))
            .collect();
        println!(
            "{} ledger: {} sources, {} segments, {}",
            model.name(),
            ledger.sources().len(),
            ledger.n_segments(),
            bytes.join(", ")
        );
        explain_model(model, &mut net, &ledger, &tr, &te, &mut report)?;
    }
    class_pure_adam(&train, &test, if quick { 2 } else { 15 }, &mut report)?;
    let path = dir.join("report.html");
    report.write(&path)?;
    println!("\nreport: {}", path.display());
    Ok(Outcome {
        accuracy: accuracies,
        report: path,
    })
}
