//! PNG plots of an `hsat eval` report ([`EvalReport`]) and of a training run's
//! metrics ([`MetricsLog`]), drawn with `plotters` into an RGB buffer and
//! encoded with `png`. Text uses DejaVu Sans from the `dejavu` crate, registered with
//! plotters' `ab_glyph` backend: no system font is needed on a fresh machine.
//!
//! - [`accuracy_vs_eps`]: per level, accuracy against eps (0 = clean), one line per
//!   model and attack.
//! - [`clean_vs_robust`]: per level, clean and strongest-PGD accuracy of each model
//!   side by side.
//! - [`training_curves`]: a run's `metrics.jsonl` (`hsat plot`): loss per level on
//!   clean and adversarial views, attack gain, lr and eps, step time.
//!
//! They live here rather than beside the report types in `hsat_core::eval::report`
//! because they need `plotters`, a font and `png`: this crate already encodes PNG
//! and is built only by the commands that evaluate, while hsat-core is built into
//! the coordinator too, which draws nothing.

use std::path::{Path, PathBuf};
use std::sync::Once;

use hsat_core::eval::report::{EvalReport, LEVELS, ModelResult, attack_title, find_attack, level};
use hsat_core::eval::repro::{ReproSummary, evaluation_title};

use crate::metrics_log::{MetricsLog, StepRecord, ViewLosses};
use plotters::element::ErrorBar;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Why a plot could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The font embedded in the binary was rejected by the text renderer.
    #[error("the embedded DejaVu Sans font did not load: the build is broken, rebuild hsat")]
    Font,
    /// plotters refused to draw (its errors borrow the canvas, so only the text is kept).
    #[error("drawing the plot failed: {0}")]
    Draw(String),
    /// The PNG file could not be created or written.
    #[error("cannot write {}: {source}; check that the output directory is writable", path.display())]
    Write {
        /// The PNG file.
        path: PathBuf,
        /// What the file system or the encoder said.
        source: png::EncodingError,
    },
}

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";
const PANEL: (u32, u32) = (560, 480);

/// One colour per model (Okabe-Ito, readable for colour-blind readers).
const MODEL_COLOURS: [RGBColor; 6] = [
    RGBColor(213, 94, 0),
    RGBColor(0, 114, 178),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn register_fonts() -> Result<(), PlotError> {
    static ONCE: Once = Once::new();
    let mut outcome = Ok(());
    ONCE.call_once(|| {
        for (style, bytes) in [
            (FontStyle::Normal, dejavu::sans::regular()),
            (FontStyle::Bold, dejavu::sans::bold()),
        ] {
            if register_font(FONT, style, bytes).is_err() {
                outcome = Err(PlotError::Font);
            }
        }
    });
    outcome
}

fn colour(model: usize) -> RGBColor {
    MODEL_COLOURS[model % MODEL_COLOURS.len()]
}

/// Writes an RGB buffer of `size` as a PNG file.
fn write_png(path: &Path, size: (u32, u32), rgb: &[u8]) -> Result<(), PlotError> {
    let failed = |source: png::EncodingError| PlotError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(path).map_err(|e| failed(e.into()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(failed)?;
    writer.write_image_data(rgb).map_err(failed)?;
    writer.finish().map_err(failed)
}

/// Draws `draw` on a white canvas of `size` and saves it as PNG at `path`.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<(), PlotError>,
) -> Result<(), PlotError> {
    register_fonts()?;
    let mut rgb = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    write_png(path, size, &rgb)
}

fn plot_error<E: std::fmt::Debug>(err: E) -> PlotError {
    PlotError::Draw(format!("{err:?}"))
}

/// The series legend, the same on every panel of both plots.
fn draw_legend<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> Result<(), PlotError>
where
    DB: DrawingBackend + 'a,
    CT: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)
}

/// Accuracy (%) against eps (units of 1/255, 0 = clean) at each level: a line per
/// model and attack: colour = attack; line style and marker = model (solid and
/// circles for the first model, dashed and triangles for the second).
pub fn accuracy_vs_eps(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let max_eps = report
        .models
        .iter()
        .flat_map(|m| m.attacks.iter().map(|a| a.eps_255))
        .fold(1.0_f64, f64::max);
    let mut attacks: Vec<&str> = Vec::new();
    for a in report.models.iter().flat_map(|m| &m.attacks) {
        if !attacks.contains(&a.attack.as_str()) {
            attacks.push(&a.attack);
        }
    }
    // The worst case over every attack is drawn as one more series: the number a
    // robustness claim should quote.
    if report.models.iter().any(|m| !m.worst_case.is_empty()) {
        attacks.push(WORST_CASE);
    }
    let size = (PANEL.0 * 3, PANEL.1 + 60);
    render(path, size, |root| {
        let (title, body) = root.split_vertically(60);
        title
            .titled(
                "kNN accuracy under white-box attacks (0 = clean)",
                (FONT, 26).into_font().style(FontStyle::Bold),
            )
            .map_err(plot_error)?;
        for (panel, level_name) in body.split_evenly((1, 3)).iter().zip(LEVELS) {
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{level_name} level"), (FONT, 22))
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.3..max_eps + 0.3, 0.0..100.0)
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .x_desc("eps (x/255)")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .y_desc("accuracy (%)")
                .label_style((FONT, 15))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(plot_error)?;
            for (m, model) in report.models.iter().enumerate() {
                let clean = level(&model.clean, level_name).map_or(f64::NAN, |l| l.accuracy);
                for (n, attack) in attacks.iter().enumerate() {
                    let mut points = vec![(0.0, 100.0 * clean)];
                    points.extend(attack_points(model, attack, level_name));
                    points.retain(|p| p.1.is_finite());
                    points.sort_by(|a, b| a.0.total_cmp(&b.0));
                    let style = colour(n).stroke_width(2);
                    let label = format!("{}: {}", model.name, attack_title(attack));
                    // Solid lines for the first model, dashed for the second, dotted after.
                    let drawn = match m {
                        0 => chart.draw_series(LineSeries::new(points.clone(), style)),
                        1 => chart.draw_series(DashedLineSeries::new(points.clone(), 10, 6, style)),
                        _ => chart.draw_series(DashedLineSeries::new(points.clone(), 3, 5, style)),
                    };
                    drawn
                        .map_err(plot_error)?
                        .label(label)
                        .legend(move |(x, y)| {
                            let dash = if m == 0 { 20 } else { 8 };
                            PathElement::new(vec![(x, y), (x + dash, y)], colour(n).stroke_width(2))
                        });
                    let marker =
                        |p: (f64, f64)| -> DynElement<'static, BitMapBackend<'_>, (f64, f64)> {
                            match m % 3 {
                                0 => Circle::new(p, 5, colour(n).filled()).into_dyn(),
                                1 => TriangleMarker::new(p, 7, colour(n).filled()).into_dyn(),
                                _ => Cross::new(p, 5, colour(n).stroke_width(2)).into_dyn(),
                            }
                        };
                    chart
                        .draw_series(points.iter().map(|&p| marker(p)))
                        .map_err(plot_error)?;
                }
            }
            draw_legend(&mut chart)?;
        }
        Ok(())
    })
}

/// `hsat repro`: per level, each method's accuracy (mean over seeds, bars +- one sd)
/// for every evaluation (clean, each attack and the worst case at each eps).
pub fn repro_accuracy(summary: &ReproSummary, path: &Path) -> Result<(), PlotError> {
    repro_panels(
        summary,
        path,
        "Accuracy over seeds (mean +- sd)",
        "accuracy (%)",
        |evaluation, m| {
            let cell = &evaluation.methods[m];
            let (mean, sd) = (100.0 * cell.mean, 100.0 * cell.sd);
            (mean - sd, mean, mean + sd)
        },
        summary.methods.len(),
    )
}

/// `hsat repro`: per level, the method-minus-baseline difference for every
/// evaluation (mean over seeds) with its 95 % bootstrap interval, and the zero line.
pub fn repro_difference(summary: &ReproSummary, path: &Path) -> Result<(), PlotError> {
    let title = format!(
        "{} - {} (mean over seeds, 95 % bootstrap interval over seeds and patients)",
        summary.methods.get(1).map_or("method", String::as_str),
        summary.methods.first().map_or("baseline", String::as_str)
    );
    repro_panels(
        summary,
        path,
        &title,
        "difference (points)",
        |evaluation, _| {
            let d = &evaluation.difference;
            (
                100.0 * d.bootstrap.low,
                100.0 * d.mean,
                100.0 * d.bootstrap.high,
            )
        },
        1,
    )
}

/// `Clean`, `PGD 4`, `Worst 8`: [`evaluation_title`] short enough for seven labels
/// side by side (the axis says the unit).
fn short_title(run: &str) -> String {
    evaluation_title(run)
        .replace("Worst case", "Worst")
        .replace("/255", "")
}

/// One panel per level with `series` points per evaluation, each drawn as
/// `value(evaluation, series)` = (low, centre, high).
fn repro_panels(
    summary: &ReproSummary,
    path: &Path,
    title: &str,
    y_desc: &str,
    value: impl Fn(&hsat_core::eval::repro::EvaluationSummary, usize) -> (f64, f64, f64),
    series: usize,
) -> Result<(), PlotError> {
    let names: Vec<String> = summary
        .levels
        .first()
        .map(|l| l.evaluations.iter().map(|e| short_title(&e.run)).collect())
        .unwrap_or_default();
    let (mut y_min, mut y_max) = (0.0_f64, 100.0_f64);
    for level in &summary.levels {
        for e in &level.evaluations {
            for s in 0..series {
                let (low, _, high) = value(e, s);
                if low.is_finite() && high.is_finite() {
                    y_min = y_min.min(low);
                    y_max = y_max.max(high);
                }
            }
        }
    }
    if series == 1 {
        // A difference: keep the axis around the data and zero, not 0..100.
        y_max = summary
            .levels
            .iter()
            .flat_map(|l| l.evaluations.iter().map(|e| value(e, 0).2))
            .filter(|v| v.is_finite())
            .fold(5.0, f64::max);
    }
    let size = (PANEL.0 * 3, PANEL.1 + 80);
    render(path, size, |root| {
        let (heading, body) = root.split_vertically(60);
        heading
            .titled(title, (FONT, 22).into_font().style(FontStyle::Bold))
            .map_err(plot_error)?;
        let x_max = names.len() as f64 - 0.5;
        for (panel, level) in body.split_evenly((1, 3)).iter().zip(&summary.levels) {
            let mut chart = ChartBuilder::on(panel)
                .caption(
                    format!("{} level ({} patients)", level.level, level.patients),
                    (FONT, 20),
                )
                .margin(12)
                .x_label_area_size(56)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5..x_max, (y_min - 2.0)..(y_max + 2.0))
                .map_err(plot_error)?;
            let label_names = names.clone();
            chart
                .configure_mesh()
                .x_labels(names.len().max(1))
                .x_label_formatter(&move |x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        label_names.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .disable_x_mesh()
                .x_desc("evaluation (eps in units of 1/255)")
                .y_desc(y_desc)
                .y_label_formatter(&|y| format!("{y:.0}"))
                .label_style((FONT, 14))
                .x_label_style((FONT, 13))
                .axis_desc_style((FONT, 15))
                .draw()
                .map_err(plot_error)?;
            if series == 1 {
                chart
                    .draw_series(LineSeries::new(
                        vec![(-0.5, 0.0), (x_max, 0.0)],
                        BLACK.mix(0.5).stroke_width(1),
                    ))
                    .map_err(plot_error)?;
            }
            for s in 0..series {
                let offset = if series == 1 {
                    0.0
                } else {
                    (s as f64 - (series as f64 - 1.0) / 2.0) * 0.25
                };
                let points: Vec<(f64, (f64, f64, f64))> = level
                    .evaluations
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (i as f64 + offset, value(e, s)))
                    .filter(|(_, (low, mean, high))| {
                        low.is_finite() && mean.is_finite() && high.is_finite()
                    })
                    .collect();
                let style = colour(s).stroke_width(2);
                chart
                    .draw_series(points.iter().map(|&(x, (low, mean, high))| {
                        ErrorBar::new_vertical(x, low, mean, high, style, 10)
                    }))
                    .map_err(plot_error)?;
                let drawn =
                    chart
                        .draw_series(points.iter().map(|&(x, (_, mean, _))| {
                            Circle::new((x, mean), 5, colour(s).filled())
                        }))
                        .map_err(plot_error)?;
                if series > 1 {
                    let label = summary.methods.get(s).cloned().unwrap_or_default();
                    drawn
                        .label(label)
                        .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour(s).filled()));
                }
            }
            if series > 1 {
                draw_legend(&mut chart)?;
            }
        }
        Ok(())
    })
}

/// The series name of the worst case in [`accuracy_vs_eps`].
const WORST_CASE: &str = "worst_case";

/// (eps, accuracy %) of `attack` (or [`WORST_CASE`]) on `model` at `level_name`.
fn attack_points(model: &ModelResult, attack: &str, level_name: &str) -> Vec<(f64, f64)> {
    if attack == WORST_CASE {
        return model
            .worst_case
            .iter()
            .filter_map(|w| {
                w.levels
                    .iter()
                    .find(|l| l.level == level_name)
                    .map(|l| (w.eps_255, 100.0 * l.accuracy))
            })
            .collect();
    }
    model
        .attacks
        .iter()
        .filter(|a| a.attack == attack)
        .filter_map(|a| level(&a.levels, level_name).map(|l| (a.eps_255, 100.0 * l.accuracy)))
        .collect()
}

/// Clean accuracy and accuracy under the strongest PGD of the report (largest eps; the
/// first attack when PGD was not run) for each model, at each level.
pub fn clean_vs_robust(report: &EvalReport, path: &Path) -> Result<(), PlotError> {
    let strongest = report
        .models
        .first()
        .and_then(|m| {
            let pgd = m.attacks.iter().filter(|a| a.attack == "pgd");
            pgd.max_by(|a, b| a.eps_255.total_cmp(&b.eps_255))
                .or_else(|| m.attacks.first())
        })
        .map(|a| (a.attack.clone(), a.eps_255));
    let robust_label = strongest
        .as_ref()
        .map_or("(no attack)".to_owned(), |(a, e)| {
            format!("{} {e}/255", attack_title(a))
        });
    let size = (PANEL.0 * 3, PANEL.1 + 60);
    let n_models = report.models.len().max(1);
    render(path, size, |root| {
        let (title, body) = root.split_vertically(60);
        title
            .titled(
                &format!("Clean vs robust kNN accuracy ({robust_label})"),
                (FONT, 26).into_font().style(FontStyle::Bold),
            )
            .map_err(plot_error)?;
        for (panel, level_name) in body.split_evenly((1, 3)).iter().zip(LEVELS) {
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("{level_name} level"), (FONT, 22))
                .margin(12)
                .x_label_area_size(48)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5..n_models as f64 - 0.5, 0.0..110.0)
                .map_err(plot_error)?;
            let names: Vec<String> = report.models.iter().map(|m| m.name.clone()).collect();
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(n_models)
                .x_label_formatter(&|x| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 {
                        names.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                })
                .y_desc("accuracy (%)")
                .label_style((FONT, 15))
                .axis_desc_style((FONT, 16))
                .draw()
                .map_err(plot_error)?;
            for (m, model) in report.models.iter().enumerate() {
                let clean =
                    level(&model.clean, level_name).map_or(f64::NAN, |l| 100.0 * l.accuracy);
                let robust = strongest
                    .as_ref()
                    .and_then(|(a, e)| find_attack(model, a, *e))
                    .and_then(|a| level(&a.levels, level_name))
                    .map_or(f64::NAN, |l| 100.0 * l.accuracy);
                let x = m as f64;
                for (offset, value, filled) in [(-0.2, clean, false), (0.2, robust, true)] {
                    if !value.is_finite() {
                        continue;
                    }
                    let corners = [(x + offset - 0.18, 0.0), (x + offset + 0.18, value)];
                    let style = if filled {
                        colour(m).filled()
                    } else {
                        colour(m).mix(0.35).filled()
                    };
                    chart
                        .draw_series([Rectangle::new(corners, style)])
                        .map_err(plot_error)?;
                    chart
                        .draw_series([Text::new(
                            format!("{value:.1}"),
                            (x + offset - 0.12, value + 6.0),
                            (FONT, 14),
                        )])
                        .map_err(plot_error)?;
                }
            }
            let legend = [("clean", 0.35), (robust_label.as_str(), 1.0)];
            for (label, alpha) in legend {
                chart
                    .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())
                    .map_err(plot_error)?
                    .label(label)
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 16, y + 6)], BLACK.mix(alpha).filled())
                    });
            }
            draw_legend(&mut chart)?;
        }
        Ok(())
    })
}

// ---- training curves of a run's metrics.jsonl (`hsat plot`) ----

/// The files [`training_curves`] writes, in order.
pub const TRAINING_PLOT_FILES: [&str; 4] = [
    "loss_levels.png",
    "attack_gain.png",
    "lr_eps.png",
    "step_time.png",
];

/// One line of a panel: its legend label, points `(step, value)`, colour and style.
struct Curve {
    label: String,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    dashed: bool,
}

impl Curve {
    /// The finite values `value(record)` over the run, by step.
    fn of(
        log: &MetricsLog,
        label: &str,
        colour: RGBColor,
        dashed: bool,
        value: impl Fn(&StepRecord) -> Option<f64>,
    ) -> Self {
        Self {
            label: label.to_owned(),
            points: log
                .steps
                .iter()
                .filter_map(|r| {
                    value(r)
                        .filter(|v| v.is_finite())
                        .map(|v| (r.step as f64, v))
                })
                .collect(),
            colour,
            dashed,
        }
    }
}

/// `lo..hi` padded so that a flat or single-point series still has a visible range.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = hi - lo;
    let pad = if span > 0.0 {
        span * 0.06
    } else {
        (lo.abs() * 0.1).max(1e-3)
    };
    lo - pad..hi + pad
}

/// A panel of `curves` against the step; says so when none has a point.
fn curves_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    curves: &[Curve],
) -> Result<(), PlotError> {
    let all = || curves.iter().flat_map(|c| c.points.iter());
    let Some(first) = all().next() else {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            format!("{caption}: not recorded in this run"),
            (w as i32 / 6, h as i32 / 2),
            (FONT, 18),
        ))
        .map_err(plot_error)?;
        return Ok(());
    };
    let (mut x0, mut x1, mut y0, mut y1) = (first.0, first.0, first.1, first.1);
    for &(x, y) in all() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(padded(x0, x1), padded(y0, y1))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if y.abs() >= 1e-2 || *y == 0.0 {
                // 3 decimals without trailing zeros: 2.5, 0.125, 10.
                let text = format!("{y:.3}");
                text.trim_end_matches('0').trim_end_matches('.').to_owned()
            } else {
                format!("{y:.1e}")
            }
        })
        .y_desc(y_desc)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 16))
        .draw()
        .map_err(plot_error)?;
    for curve in curves.iter().filter(|c| !c.points.is_empty()) {
        let style = curve.colour.stroke_width(2);
        let drawn = if curve.dashed {
            chart.draw_series(DashedLineSeries::new(curve.points.clone(), 10, 6, style))
        } else {
            chart.draw_series(LineSeries::new(curve.points.clone(), style))
        };
        let (colour, dashed) = (curve.colour, curve.dashed);
        drawn
            .map_err(plot_error)?
            .label(curve.label.clone())
            .legend(move |(x, y)| {
                let length = if dashed { 8 } else { 20 };
                PathElement::new(vec![(x, y), (x + length, y)], colour.stroke_width(2))
            });
        // A lone point draws no line: mark it.
        if curve.points.len() == 1 {
            chart
                .draw_series([Circle::new(curve.points[0], 4, curve.colour.filled())])
                .map_err(plot_error)?;
        }
    }
    draw_legend(&mut chart)
}

/// A figure of `panels` (rows x columns) under a bold `title`.
fn curves_figure(
    path: &Path,
    title: &str,
    grid: (usize, usize),
    panels: Vec<(String, &str, Vec<Curve>)>,
) -> Result<(), PlotError> {
    let size = (PANEL.0 * grid.1 as u32, PANEL.1 * grid.0 as u32 + 60);
    render(path, size, |root| {
        let (head, body) = root.split_vertically(60);
        head.titled(title, (FONT, 26).into_font().style(FontStyle::Bold))
            .map_err(plot_error)?;
        for (area, (caption, y_desc, curves)) in body.split_evenly(grid).iter().zip(&panels) {
            curves_panel(area, caption, y_desc, curves)?;
        }
        Ok(())
    })
}

/// The curves of a run's `metrics.jsonl` as PNG files in `out` (created if needed),
/// named [`TRAINING_PLOT_FILES`]: the loss per level on clean and adversarial views,
/// the attack's gain, the learning rate and eps, and the step time with its parts.
pub fn training_curves(log: &MetricsLog, out: &Path) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(out).map_err(|source| PlotError::Write {
        path: out.to_path_buf(),
        source: source.into(),
    })?;
    let paths: Vec<PathBuf> = TRAINING_PLOT_FILES.iter().map(|f| out.join(f)).collect();
    let (clean, adversarial) = (colour(1), colour(0));
    let level = |name: &'static str| -> (String, &str, Vec<Curve>) {
        let pick = |v: Option<ViewLosses>| {
            v.and_then(|v| match name {
                "patient" => v.patient,
                "slide" => v.slide,
                "patch" => v.patch,
                _ => v.total,
            })
        };
        (
            name.to_owned(),
            "loss",
            vec![
                Curve::of(log, "clean", clean, false, |r| {
                    pick(r.loss.and_then(|l| l.clean))
                }),
                Curve::of(log, "adversarial", adversarial, true, |r| {
                    pick(r.loss.and_then(|l| l.adversarial))
                }),
            ],
        )
    };
    curves_figure(
        &paths[0],
        "Loss per level: clean vs adversarial views",
        (2, 2),
        vec![
            level("patient"),
            level("slide"),
            level("patch"),
            level("total"),
        ],
    )?;
    curves_figure(
        &paths[1],
        "Attack gain: PGD's loss increase from its random start to its last iterate",
        (1, 1),
        vec![(
            "attack gain".to_owned(),
            "loss increase",
            vec![Curve::of(log, "attack gain", adversarial, false, |r| {
                r.attack_gain
            })],
        )],
    )?;
    curves_figure(
        &paths[2],
        "Schedules in effect",
        (1, 2),
        vec![
            (
                "learning rate".to_owned(),
                "lr",
                vec![Curve::of(log, "lr", colour(2), false, |r| r.lr)],
            ),
            (
                "attack eps".to_owned(),
                "eps (x/255)",
                vec![Curve::of(log, "eps", colour(3), false, |r| {
                    r.eps.map(|e| e * 255.0)
                })],
            ),
        ],
    )?;
    curves_figure(
        &paths[3],
        "Step time and its parts",
        (1, 2),
        vec![
            (
                "seconds per step".to_owned(),
                "seconds",
                vec![
                    Curve::of(log, "step", BLACK, false, |r| r.step_seconds),
                    Curve::of(log, "attack", adversarial, false, |r| r.attack_seconds),
                    Curve::of(log, "data wait", colour(2), true, |r| r.data_wait_seconds),
                    Curve::of(log, "all-reduce", clean, true, |r| r.allreduce_seconds),
                ],
            ),
            (
                "throughput".to_owned(),
                "patches / s",
                vec![Curve::of(log, "patches/s", colour(4), false, |r| {
                    r.patches_per_second
                })],
            ),
        ],
    )?;
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of 30 steps with every field, and one whose attack was off (nulls).
    fn log(attacked: bool) -> MetricsLog {
        let mut text = String::new();
        for step in 1..=30u64 {
            let s = step as f64;
            let adversarial = if attacked {
                format!(
                    r#"{{"patient":{},"slide":{},"patch":{},"total":{}}}"#,
                    3.0 - s / 20.0,
                    2.5 - s / 25.0,
                    2.0 - s / 30.0,
                    7.5 - s / 9.0
                )
            } else {
                "null".to_owned()
            };
            text.push_str(&format!(
                r#"{{"step":{step},"epoch":{},"loss":{{"clean":{{"patient":{},"slide":{},"patch":{},"total":{}}},"adversarial":{adversarial}}},"attack_gain":{},"lr":{},"eps":{},"step_seconds":{},"data_wait_seconds":0.05,"attack_seconds":{},"allreduce_seconds":0.02,"patches_per_second":{}}}"#,
                step / 10,
                2.8 - s / 22.0,
                2.2 - s / 28.0,
                1.8 - s / 35.0,
                6.8 - s / 10.0,
                if attacked { format!("{}", 0.3 + s / 100.0) } else { "null".into() },
                1e-3 * (1.0 - s / 40.0),
                if attacked { format!("{}", (s / 30.0) * 8.0 / 255.0) } else { "null".into() },
                1.2 + (s / 3.0).sin() * 0.1,
                if attacked { "0.8" } else { "null" },
                40.0 + s,
            ));
            text.push('\n');
        }
        MetricsLog::parse(PathBuf::from("metrics.jsonl"), &text).unwrap()
    }

    #[test]
    fn training_curves_are_written_as_pngs() {
        for attacked in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let paths = training_curves(&log(attacked), dir.path()).unwrap();
            assert_eq!(paths.len(), TRAINING_PLOT_FILES.len());
            for path in paths {
                let bytes = std::fs::read(&path).unwrap();
                assert!(
                    bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
                    "{} is not a drawn PNG ({} bytes)",
                    path.display(),
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn a_single_step_still_plots() {
        let log = MetricsLog::parse(
            PathBuf::from("m"),
            r#"{"step":0,"lr":0.001,"step_seconds":2.0}"#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        training_curves(&log, dir.path()).unwrap();
    }
}
