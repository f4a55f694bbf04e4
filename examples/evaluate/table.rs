//! The evaluation's per-lens results: a row per lens, printed as a Markdown
//! table and written as JSON.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::common::Model;

/// Per-lens results.
#[derive(Default, Clone)]
pub struct Row {
    pub agreement: Option<f64>,
    pub auc: Option<f64>,
    pub recall: Option<[f64; 3]>,
    pub margin_drop: Option<(f64, f64)>,
    pub prob_drop: Option<(f64, f64)>,
    pub seconds: Option<f64>,
    pub lds: Option<(f64, f64)>,
}

pub fn print_table(model: Model, rows: &BTreeMap<String, Row>) {
    println!(
        "\n| {} lens | agreement@10 | LDS | mislabel AUC | flipped in top 5/10/20% | deletion margin drop | deletion prob drop | query s (top-10, all points) |",
        model.name()
    );
    println!("|---|---|---|---|---|---|---|---|");
    let f = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.3}"));
    let pm = |v: Option<(f64, f64)>| v.map_or("–".into(), |(m, s)| format!("{m:.3} ± {s:.3}"));
    for (name, r) in rows {
        let recall = r.recall.map_or("–".into(), |r| {
            format!("{:.2} / {:.2} / {:.2}", r[0], r[1], r[2])
        });
        println!(
            "| {name} | {} | {} | {} | {recall} | {} | {} | {} |",
            f(r.agreement),
            pm(r.lds),
            f(r.auc),
            pm(r.margin_drop),
            pm(r.prob_drop),
            r.seconds.map_or("–".into(), |s| format!("{s:.3}"))
        );
    }
}

pub fn to_json(rows: &BTreeMap<String, Row>, meta: Value) -> Value {
    let lenses: serde_json::Map<String, Value> = rows
        .iter()
        .map(|(name, r)| {
            (
                name.clone(),
                json!({
                    "class_agreement_at_10": r.agreement,
                    "mislabel_auc": r.auc,
                    "mislabel_recall_top_5_10_20": r.recall,
                    "deletion_margin_drop": r.margin_drop.map(|v| v.0),
                    "deletion_margin_drop_se": r.margin_drop.map(|v| v.1),
                    "deletion_prob_drop": r.prob_drop.map(|v| v.0),
                    "deletion_prob_drop_se": r.prob_drop.map(|v| v.1),
                    "query_seconds": r.seconds,
                    "lds": r.lds.map(|v| v.0),
                    "lds_se": r.lds.map(|v| v.1),
                }),
            )
        })
        .collect();
    json!({ "lenses": lenses, "meta": meta })
}
