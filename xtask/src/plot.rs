//! Accuracy-against-compression plots (PNG and SVG) with plotters.
//!
//! One chart per model: every sweep point as a hollow marker coloured by
//! method, the headline point of each method as a filled marker, the Pareto
//! front as a black line, the float baseline as a dashed horizontal line and
//! the thesis ratios as dashed vertical lines. The x axis (compression ratio) is
//! logarithmic because ratios span 4x–100x.
//!
//! Text needs a font: plotters' `ab_glyph` backend draws only registered TTFs,
//! so DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`) is
//! compiled into the binary; the plots look the same on every machine.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::fsutil::write_atomic_with;
use crate::results::{thesis_ratio, Method, Role, RunRecord};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

pub(crate) fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is a valid TTF; a failure here would be a build bug.
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the embedded DejaVu Sans parses");
    });
}

const SIZE: (u32, u32) = (1000, 640);

fn method_color(m: Method) -> RGBColor {
    match m {
        Method::PostTraining => RGBColor(31, 119, 180),
        Method::InTraining => RGBColor(255, 127, 14),
        Method::Combined => RGBColor(44, 160, 44),
        Method::LossAware => RGBColor(148, 103, 189),
        Method::Joint => RGBColor(214, 39, 40),
    }
}

/// File stem of a model's plot.
pub fn plot_stem(model: &str) -> String {
    format!("accuracy_vs_compression_{model}")
}

/// Writes `<dir>/<stem>.png` and `.svg` for every model with points; returns
/// the written paths.
pub fn write_plots(record: &RunRecord, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let mut written = Vec::new();
    for model in record.models() {
        if !record.points.iter().any(|p| p.model == model) {
            continue;
        }
        let stem = plot_stem(&model);
        let png = dir.join(format!("{stem}.png"));
        write_atomic_with(&png, |tmp| {
            let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
            draw(&root, record, &model)?;
            root.present().map_err(|e| anyhow!("writing the PNG: {e}"))
        })?;
        written.push(png);
        let svg = dir.join(format!("{stem}.svg"));
        write_atomic_with(&svg, |tmp| {
            let root = SVGBackend::new(tmp, SIZE).into_drawing_area();
            draw(&root, record, &model)?;
            root.present().map_err(|e| anyhow!("writing the SVG: {e}"))
        })?;
        written.push(svg);
    }
    Ok(written)
}

/// The visible accuracy range (percent): everything from a little below the
/// worst point that is within 25 points of the float baseline up to a little
/// above the best. Points further down would squash the interesting region;
/// the caption counts them.
fn y_range(accs: &[f64], float: Option<f64>) -> (f64, f64) {
    let top_ref = accs
        .iter()
        .copied()
        .chain(float)
        .fold(f64::NEG_INFINITY, f64::max);
    let floor = top_ref - 25.0;
    let lo = accs
        .iter()
        .copied()
        .filter(|a| *a >= floor)
        .chain(float)
        .fold(f64::INFINITY, f64::min);
    let span = (top_ref - lo).max(0.5);
    (
        (lo - 0.08 * span).max(0.0),
        (top_ref + 0.08 * span).min(100.0),
    )
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    record: &RunRecord,
    model: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot of {model}: {e}");
    root.fill(&WHITE).map_err(err)?;
    let points: Vec<_> = record.points.iter().filter(|p| p.model == model).collect();
    let float = record.baseline(model).map(|b| b.float_accuracy * 100.0);
    let accs: Vec<f64> = points.iter().map(|p| p.accuracy * 100.0).collect();
    let (y_lo, y_hi) = y_range(&accs, float);
    let hidden = accs.iter().filter(|a| **a < y_lo).count();
    let mut ratios: Vec<f64> = points.iter().map(|p| p.ratio).collect();
    ratios.extend(Method::ALL.iter().filter_map(|m| thesis_ratio(model, *m)));
    let x_lo = ratios
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(1.0)
        / 1.25;
    let x_hi = ratios
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(x_lo * 2.0)
        * 1.25;

    let mut caption = format!("{model}: test accuracy against compression ratio");
    if hidden > 0 {
        let noun = if hidden == 1 { "point" } else { "points" };
        caption.push_str(&format!(" ({hidden} {noun} below the axis not shown)"));
    }
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), y_lo..y_hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("compression ratio (32-bit parameters / file bytes), log scale")
        .y_desc("test accuracy (%)")
        .x_label_formatter(&|x| format!("{x:.0}x"))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;

    if let Some(f) = float {
        chart
            .draw_series(DashedLineSeries::new(
                [(x_lo, f), (x_hi, f)],
                8,
                6,
                RGBColor(110, 110, 110).stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("float baseline {f:.2} %"))
            .legend(|(x, y)| {
                PathElement::new(
                    [(x, y), (x + 20, y)],
                    RGBColor(110, 110, 110).stroke_width(2),
                )
            });
    }
    for m in Method::EVERY {
        let color = method_color(m);
        if let Some(r) = thesis_ratio(model, m) {
            chart
                .draw_series(DashedLineSeries::new(
                    [(r, y_lo), (r, y_hi)],
                    4,
                    5,
                    color.mix(0.7).stroke_width(1),
                ))
                .map_err(err)?
                .label(format!("thesis {} {r}x", m.name()))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.mix(0.7).stroke_width(1))
                });
        }
        let sweep: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.method == m && p.role == Role::Sweep)
            .map(|p| (p.ratio, p.accuracy * 100.0))
            .filter(|(_, a)| *a >= y_lo)
            .collect();
        if !sweep.is_empty() {
            chart
                .draw_series(
                    sweep
                        .iter()
                        .map(|&(x, y)| Circle::new((x, y), 4, color.stroke_width(1))),
                )
                .map_err(err)?
                .label(format!("{} sweep", m.name()))
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.stroke_width(1)));
        }
        let main: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.method == m && p.role == Role::Main)
            .map(|p| (p.ratio, (p.accuracy * 100.0).max(y_lo)))
            .collect();
        if !main.is_empty() {
            chart
                .draw_series(
                    main.iter()
                        .map(|&(x, y)| Circle::new((x, y), 7, color.filled())),
                )
                .map_err(err)?
                .label(format!("{} (headline)", m.name()))
                .legend(move |(x, y)| Circle::new((x + 10, y), 6, color.filled()));
        }
    }
    let mut front: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.pareto)
        .map(|p| (p.ratio, p.accuracy * 100.0))
        .collect();
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !front.is_empty() {
        chart
            .draw_series(LineSeries::new(
                front.iter().copied(),
                BLACK.stroke_width(2),
            ))
            .map_err(err)?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        chart
            .draw_series(
                front
                    .iter()
                    .map(|&(x, y)| Cross::new((x, y), 4, BLACK.stroke_width(2))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// One named curve of a [`line_chart`].
pub(crate) struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Where a [`line_chart`]'s legend goes: over the curves' empty corner.
pub(crate) use plotters::chart::SeriesLabelPosition as LegendAt;

/// A PNG line chart of `curves` (one colour each, a dot on every point of a
/// curve of at most 60, the legend at `legend`) with the y axis cut to `y_range`, written atomically
/// to `file`.
pub(crate) fn line_chart(
    file: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    curves: &[Curve],
    (y_min, y_max): (f64, f64),
    legend: LegendAt,
) -> Result<()> {
    register_font();
    let x_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1f64, f64::max);
    let x_min = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(x_max, f64::min)
        .min(x_max - 1.0);
    // A margin, so that the first and last points' dots are not cut.
    let pad = 0.03 * (x_max - x_min);
    let (x_min, x_max) = (x_min - pad, x_max + pad);
    write_atomic_with(file, |tmp| {
        let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
        let root = BitMapBackend::new(tmp, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_min..x_max, y_min..y_max)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(&e))?;
        for (i, curve) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    curve
                        .points
                        .iter()
                        .map(|&(x, y)| (x, y.clamp(y_min, y_max))),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?
                .label(curve.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            // A dot on every measured point, so that a line of few points
            // does not read as a continuum (traces of many steps are lines).
            if curve.points.len() > 60 {
                continue;
            }
            chart
                .draw_series(
                    curve
                        .points
                        .iter()
                        .filter(|p| (y_min..=y_max).contains(&p.1))
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(|e| err(&e))?;
        }
        draw_legend_at(&mut chart, 14, legend)?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    })
}

/// A Pareto front: the line (labelled in the legend) and a filled dot on
/// every member.
pub(crate) fn draw_front<'a, DB: DrawingBackend + 'a, C>(
    chart: &mut ChartContext<'a, DB, C>,
    line: &[(f64, f64)],
    color: RGBColor,
    label: &str,
) -> Result<()>
where
    C: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    chart
        .draw_series(LineSeries::new(line.to_vec(), color.stroke_width(2)))
        .map_err(|e| err(&e))?
        .label(label)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(line.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(|e| err(&e))?;
    Ok(())
}

/// The legend box every chart of this crate uses, upper right.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a, C>(
    chart: &mut ChartContext<'a, DB, C>,
    font_size: u32,
) -> Result<()>
where
    C: plotters::coord::CoordTranslate,
{
    draw_legend_at(chart, font_size, SeriesLabelPosition::UpperRight)
}

/// [`draw_legend`] at `position`.
pub(crate) fn draw_legend_at<'a, DB: DrawingBackend + 'a, C>(
    chart: &mut ChartContext<'a, DB, C>,
    font_size: u32,
    position: SeriesLabelPosition,
) -> Result<()>
where
    C: plotters::coord::CoordTranslate,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", font_size))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))
}

/// A chart whose both axes are logarithmic.
pub(crate) type LogErrorChart<'a, DB> =
    ChartContext<'a, DB, Cartesian2d<LogCoord<f64>, LogCoord<f64>>>;

/// A test-error chart with both axes logarithmic (the design-space plots):
/// the ranges padded around `xs` and `errors`, the error axis clamped to
/// [0.05, 100] %. Returns the chart and its lowest error, below which
/// points are drawn at the axis.
pub(crate) fn log_error_chart<'a, DB: DrawingBackend + 'a>(
    area: &'a DrawingArea<DB, Shift>,
    (title, x_desc): (&str, &str),
    xs: &[f64],
    errors: &[f64],
    font_size: u32,
) -> Result<(LogErrorChart<'a, DB>, f64)> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let (x_min, x_max) = if xs.is_empty() {
        (1.0, 10.0)
    } else {
        (
            xs.iter().copied().fold(f64::INFINITY, f64::min) / 1.3,
            xs.iter().copied().fold(0f64, f64::max) * 1.3,
        )
    };
    let y_max = errors
        .iter()
        .copied()
        .fold(0f64, f64::max)
        .clamp(1.0, 100.0)
        * 1.3;
    let y_min = errors
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(0.05)
        / 1.3;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", font_size + 8))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("test error, % (from the file; log)")
        .x_labels(8)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", font_size))
        .draw()
        .map_err(|e| err(&e))?;
    Ok((chart, y_min))
}
