//! Self-contained HTML reports: SVG plots drawn with plotters, PNG thumbnails
//! embedded as data URIs. Behind the `report` feature (on by default).

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::query::ClassDistributions;

fn plot_err(what: &'static str) -> impl Fn(String) -> Error {
    move |reason| Error::Report { what, reason }
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The paper's ridge plot: one row per class, the `norm`-weighted density of
/// `cos` over that class's sources, the highlighted class (the prediction) in colour.
///
/// # Errors
/// [`Error::Report`] if plotting fails; [`Error::Empty`] without classes.
pub fn ridge_plot(
    title: &str,
    dist: &ClassDistributions,
    highlight: Option<usize>,
) -> Result<String> {
    let n = dist.density.len();
    if n == 0 {
        return Err(Error::Empty {
            op: "ridge_plot",
            what: "class distributions",
        });
    }
    let peak = dist
        .density
        .iter()
        .flatten()
        .fold(0.0f64, |m, &v| m.max(v))
        .max(1e-12);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (420, 40 + 34 * n as u32)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_err("ridge plot")(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(48)
            .build_cartesian_2d(-1.0f64..1.0, 0.0f64..n as f64 + 0.9)
            .map_err(|e| plot_err("ridge plot")(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .x_desc("cos(contribution, refinement), weighted by norm")
            .y_labels(n + 1)
            .y_label_formatter(&|y| {
                let c = y.round() as usize;
                if (y - y.round()).abs() < 1e-6 && c < n {
                    format!("class {}", n - 1 - c)
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(|e| plot_err("ridge plot")(e.to_string()))?;
        for (c, dens) in dist.density.iter().enumerate() {
            let base = (n - 1 - c) as f64;
            let hot = highlight == Some(c);
            let colour = if hot {
                RGBColor(214, 69, 65)
            } else {
                RGBColor(90, 110, 140)
            };
            let pts: Vec<(f64, f64)> = dist
                .grid
                .iter()
                .zip(dens)
                .map(|(&x, &d)| (x, base + 1.6 * d / peak))
                .collect();
            chart
                .draw_series(
                    AreaSeries::new(pts, base, colour.mix(if hot { 0.55 } else { 0.3 }))
                        .border_style(colour.stroke_width(if hot { 2 } else { 1 })),
                )
                .map_err(|e| plot_err("ridge plot")(e.to_string()))?;
        }
        root.present()
            .map_err(|e| plot_err("ridge plot")(e.to_string()))?;
    }
    Ok(svg)
}

/// A bar chart of one value per class (class attribution), the highlighted class in colour.
///
/// # Errors
/// [`Error::Report`] if plotting fails; [`Error::Empty`] without values.
pub fn bar_chart(title: &str, values: &[f64], highlight: Option<usize>) -> Result<String> {
    if values.is_empty() {
        return Err(Error::Empty {
            op: "bar_chart",
            what: "values",
        });
    }
    let lo = values.iter().fold(0.0f64, |m, &v| m.min(v));
    let hi = values.iter().fold(0.0f64, |m, &v| m.max(v)).max(lo + 1e-9);
    let pad = 0.08 * (hi - lo);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (360, 220)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| plot_err("bar chart")(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(26)
            .y_label_area_size(44)
            .build_cartesian_2d(-0.5f64..values.len() as f64 - 0.5, (lo - pad)..(hi + pad))
            .map_err(|e| plot_err("bar chart")(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(values.len())
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .y_desc("share")
            .draw()
            .map_err(|e| plot_err("bar chart")(e.to_string()))?;
        chart
            .draw_series(values.iter().enumerate().map(|(c, &v)| {
                let colour = if highlight == Some(c) {
                    RGBColor(214, 69, 65)
                } else {
                    RGBColor(90, 110, 140)
                };
                Rectangle::new(
                    [(c as f64 - 0.38, 0.0), (c as f64 + 0.38, v)],
                    colour.filled(),
                )
            }))
            .map_err(|e| plot_err("bar chart")(e.to_string()))?;
        root.present()
            .map_err(|e| plot_err("bar chart")(e.to_string()))?;
    }
    Ok(svg)
}

/// A grayscale image as a PNG data URI, each pixel drawn as a `scale × scale` block.
/// `pixels` are row-major in `[0, 1]` (clamped).
///
/// # Errors
/// [`Error::ShapeMismatch`] when `pixels.len() != width · height`; [`Error::Report`] on encoding failure.
pub fn png_data_uri(pixels: &[f32], width: usize, height: usize, scale: usize) -> Result<String> {
    if pixels.len() != width * height || width == 0 || scale == 0 {
        return Err(Error::ShapeMismatch {
            op: "png_data_uri",
            expected: format!("{width}·{height} pixels and scale > 0"),
            got: format!("{} pixels, scale {scale}", pixels.len()),
        });
    }
    let (w, h) = (width * scale, height * scale);
    let mut data = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let v = pixels[(y / scale) * width + x / scale].clamp(0.0, 1.0);
            data[y * w + x] = 255 - (v * 255.0).round() as u8; // ink dark on white
        }
    }
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| plot_err("png")(e.to_string()))?;
        writer
            .write_image_data(&data)
            .map_err(|e| plot_err("png")(e.to_string()))?;
    }
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// One captioned image in a grid.
#[derive(Clone, Debug)]
pub struct Thumb {
    /// A data URI (see [`png_data_uri`]).
    pub uri: String,
    /// The caption (escaped when written).
    pub caption: String,
}

/// A self-contained HTML page built section by section.
///
/// # Example
/// ```
/// use refinement_ledger::report::{HtmlReport, bar_chart};
/// let mut page = HtmlReport::new("demo");
/// page.heading("Class attribution");
/// page.svg(&bar_chart("fc1", &[0.1, 0.7, 0.2], Some(1))?);
/// assert!(page.to_html().contains("<svg"));
/// # Ok::<(), refinement_ledger::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct HtmlReport {
    title: String,
    body: String,
}

impl HtmlReport {
    /// An empty page titled `title`.
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_string(),
            body: String::new(),
        }
    }

    /// A section heading.
    pub fn heading(&mut self, text: &str) {
        let _ = writeln!(self.body, "<h2>{}</h2>", escape(text));
    }

    /// A sub-heading.
    pub fn subheading(&mut self, text: &str) {
        let _ = writeln!(self.body, "<h3>{}</h3>", escape(text));
    }

    /// A paragraph of text.
    pub fn paragraph(&mut self, text: &str) {
        let _ = writeln!(self.body, "<p>{}</p>", escape(text));
    }

    /// An inline SVG (from [`ridge_plot`] or [`bar_chart`]).
    pub fn svg(&mut self, svg: &str) {
        let start = svg.find("<svg").unwrap_or(0);
        let _ = writeln!(self.body, "<div class=\"plot\">{}</div>", &svg[start..]);
    }

    /// Starts a row of plots shown side by side; end it with [`end_row`](Self::end_row).
    pub fn begin_row(&mut self) {
        self.body.push_str("<div class=\"row\">\n");
    }

    /// Ends a row started with [`begin_row`](Self::begin_row).
    pub fn end_row(&mut self) {
        self.body.push_str("</div>\n");
    }

    /// A captioned grid of images.
    pub fn image_grid(&mut self, caption: &str, thumbs: &[Thumb]) {
        let _ = writeln!(
            self.body,
            "<figure><figcaption>{}</figcaption><div class=\"grid\">",
            escape(caption)
        );
        for t in thumbs {
            let _ = writeln!(
                self.body,
                "<div class=\"thumb\"><img src=\"{}\" alt=\"{}\"><span>{}</span></div>",
                t.uri,
                escape(&t.caption),
                escape(&t.caption)
            );
        }
        self.body.push_str("</div></figure>\n");
    }

    /// The page as HTML.
    pub fn to_html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{t}</title>\n<style>\n\
             body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 1400px; }}\n\
             h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }}\n\
             .row {{ display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }}\n\
             .grid {{ display: flex; flex-wrap: wrap; gap: 6px; }}\n\
             .thumb {{ display: flex; flex-direction: column; align-items: center; font-size: 11px; }}\n\
             .thumb img {{ image-rendering: pixelated; border: 1px solid #ddd; }}\n\
             figure {{ margin: .6em 0; }} figcaption {{ font-weight: bold; margin-bottom: .3em; }}\n\
             </style>\n</head>\n<body>\n<h1>{t}</h1>\n{b}</body>\n</html>\n",
            t = escape(&self.title),
            b = self.body
        )
    }

    /// Writes the page to `path`, creating its folder.
    ///
    /// # Errors
    /// [`Error::Io`] when the folder or file cannot be written.
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::Io {
                path: dir.display().to_string(),
                source: e,
            })?;
        }
        std::fs::write(path, self.to_html()).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
    }
}
