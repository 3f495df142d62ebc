//! `cargo xtask powerlaw FILE… --out DIR`: the power-law analysis of METHOD
//! §14 over many compressed files, with the random-mask control, as one
//! report (`POWERLAW.md`, `powerlaw.json`) and one plot per file: the
//! complementary CDF of every layer's in- and out-degrees on log-log axes
//! with the three fitted laws (PNG and SVG). `qgrad analyze` is the same
//! analysis of one file, as text or JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use qgrad_csr::CompressedModel;
use qgrad_powerlaw::{fit_tail, layer_degrees, LayerDegrees, TailFit};
use serde::Serialize;

use crate::fsutil::{write_atomic, write_atomic_with};

/// A law's unnormalised log-probability of a degree.
type LogPmf<'a> = Box<dyn Fn(f64) -> f64 + 'a>;

/// The seed of the random-mask control.
const CONTROL_SEED: u64 = 14;

#[derive(Debug, Serialize)]
struct Row {
    file: String,
    tensor: String,
    side: &'static str,
    /// "file" or "random control".
    mask: &'static str,
    fit: Option<TailFit>,
}

/// Runs the analysis of `files` into `out`.
pub fn run(files: &[PathBuf], out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut rows = Vec::new();
    for path in files {
        let model = CompressedModel::read_file(path)
            .with_context(|| format!("reading {}", path.display()))?;
        let layers = layer_degrees(&model);
        // `<model dir>_<file stem>`: a reproduction's files of different
        // models share stems.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let stem = match path.parent().and_then(|p| p.file_name()) {
            Some(dir) if files.len() > 1 => format!("{}_{stem}", dir.to_string_lossy()),
            _ => stem,
        };
        let mut panels = Vec::new();
        for l in &layers {
            let control = l.random_control(CONTROL_SEED);
            for (side, degrees, random) in [
                ("in", &l.in_degree, &control.in_degree),
                ("out", &l.out_degree, &control.out_degree),
            ] {
                let fit = fit_tail(degrees).ok();
                panels.push((format!("{} {side}", l.name), degrees.clone(), fit.clone()));
                rows.push(Row {
                    file: path.display().to_string(),
                    tensor: l.name.clone(),
                    side,
                    mask: "file",
                    fit,
                });
                rows.push(Row {
                    file: path.display().to_string(),
                    tensor: l.name.clone(),
                    side,
                    mask: "random control",
                    fit: fit_tail(random).ok(),
                });
            }
        }
        plot_file(out, &stem, &layers, &panels)?;
    }
    write_atomic(
        &out.join("powerlaw.json"),
        serde_json::to_string_pretty(&rows)?.as_bytes(),
    )?;
    write_atomic(&out.join("POWERLAW.md"), report(&rows).as_bytes())?;
    Ok(())
}

fn report(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Degree distributions of pruned layers (METHOD §14)\n");
    let _ = writeln!(
        s,
        "Per weight layer and side (in: an output unit's non-zero incoming weights; out: an \
         input unit's outgoing ones), the truncated power-law fit on `k_min ..= k_max` \
         (`k_min` by the Kolmogorov–Smirnov distance) and Vuong's likelihood-ratio test \
         against exponential and log-normal fits (the favoured law at p < 0.1, else \
         neither). Each file's rows are followed by a uniformly random mask with the same \
         number of non-zeros per layer (seed {CONTROL_SEED}), the control.\n"
    );
    let _ = writeln!(
        s,
        "| file | tensor | side | mask | units (zero) | k_min..k_max (tail) | γ ± se | KS | vs exponential | vs log-normal |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for r in rows {
        let name = Path::new(&r.file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match &r.fit {
            Some(f) if f.k_min < f.k_max => {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | {} ({}) | {}..{} ({}) | {:.2} ± {:.2} | {:.3} | {} | {} |",
                    r.tensor,
                    r.side,
                    r.mask,
                    f.units,
                    f.zero_degree,
                    f.k_min,
                    f.k_max,
                    f.tail,
                    f.power_law.gamma,
                    f.power_law.std_err,
                    f.ks_distance,
                    f.compare[0].verdict(),
                    f.compare[1].verdict()
                );
            }
            _ => {
                let _ = writeln!(
                    s,
                    "| {name} | {} | {} | {} | | (too few distinct degrees to fit) | | | | |",
                    r.tensor, r.side, r.mask
                );
            }
        }
    }
    s
}

fn plot_file(
    out: &Path,
    stem: &str,
    layers: &[LayerDegrees],
    panels: &[(String, Vec<u32>, Option<TailFit>)],
) -> Result<()> {
    crate::plot::register_font();
    let rows = layers.len().max(1);
    let size = (1000u32, 320 * rows as u32);
    let png = out.join(format!("ccdf_{stem}.png"));
    write_atomic_with(&png, |tmp| {
        let root = BitMapBackend::new(tmp, size).into_drawing_area();
        draw(&root, rows, panels)?;
        root.present().map_err(|e| anyhow!("writing the PNG: {e}"))
    })?;
    let svg = out.join(format!("ccdf_{stem}.svg"));
    write_atomic_with(&svg, |tmp| {
        let root = SVGBackend::new(tmp, size).into_drawing_area();
        draw(&root, rows, panels)?;
        root.present().map_err(|e| anyhow!("writing the SVG: {e}"))
    })
}

/// `P(K >= k)` of the fitted law on its range, scaled by the tail's share of
/// the fitted units (Clauset et al.'s convention), at every `k` of the range.
fn model_ccdf(fit: &TailFit, log_pmf: impl Fn(f64) -> f64, fitted_units: usize) -> Vec<(f64, f64)> {
    let ks: Vec<u32> = (fit.k_min..=fit.k_max).collect();
    let raw: Vec<f64> = ks.iter().map(|&k| log_pmf(k as f64)).collect();
    let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = raw.iter().map(|r| (r - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let share = fit.tail as f64 / fitted_units.max(1) as f64;
    let mut left = 1.0;
    let mut out = Vec::with_capacity(ks.len());
    for (k, w) in ks.iter().zip(&weights) {
        out.push((*k as f64, (left * share).max(1e-12)));
        left -= w / total;
    }
    out
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    rows: usize,
    panels: &[(String, Vec<u32>, Option<TailFit>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing a CCDF: {e}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((rows, 2));
    for (area, (title, degrees, fit)) in areas.iter().zip(panels) {
        let mut ks: Vec<u32> = degrees.iter().copied().filter(|&d| d >= 1).collect();
        if ks.len() < 2 {
            continue;
        }
        ks.sort_unstable();
        let n = ks.len() as f64;
        // P(K >= k) at each distinct degree (its first index in sorted order).
        let empirical: Vec<(f64, f64)> = ks
            .iter()
            .enumerate()
            .filter(|&(i, &k)| i == 0 || ks[i - 1] != k)
            .map(|(i, &k)| (k as f64, (ks.len() - i) as f64 / n))
            .collect();
        let x_hi = *ks.last().unwrap_or(&1) as f64 * 1.3;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(
                (0.8f64..x_hi.max(2.0)).log_scale(),
                (0.5 / n..1.2f64).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("degree k")
            .y_desc("P(K ≥ k)")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.3}"))
            .x_labels(6)
            .y_labels(5)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                empirical
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 2, BLACK.filled())),
            )
            .map_err(err)?
            .label("units")
            .legend(|(x, y)| Circle::new((x, y), 3, BLACK.filled()));
        if let Some(f) = fit.as_ref().filter(|f| f.k_min < f.k_max) {
            let laws: [(&str, RGBColor, LogPmf); 3] = [
                (
                    "power law",
                    RGBColor(214, 39, 40),
                    Box::new(move |k: f64| -f.power_law.gamma * k.ln()),
                ),
                (
                    "exponential",
                    RGBColor(31, 119, 180),
                    Box::new(move |k: f64| -f.exponential.lambda * k),
                ),
                (
                    "log-normal",
                    RGBColor(44, 160, 44),
                    Box::new(move |k: f64| {
                        -k.ln()
                            - (k.ln() - f.log_normal.mu).powi(2)
                                / (2.0 * f.log_normal.sigma.powi(2))
                    }),
                ),
            ];
            for (name, color, lp) in laws {
                chart
                    .draw_series(LineSeries::new(
                        model_ccdf(f, lp, ks.len()),
                        color.stroke_width(2),
                    ))
                    .map_err(err)?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_report_json_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        // A 40 x 60 layer whose rows keep 1, 2, 3, ... non-zeros.
        let (rows, cols) = (40usize, 60usize);
        let mut values = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..(r + 1).min(cols) {
                values[r * cols + c] = 0.5;
            }
        }
        let widths: Vec<u8> = values
            .iter()
            .map(|&v| if v == 0.0 { 0 } else { 4 })
            .collect();
        let t = qgrad_csr::TensorData {
            name: "fc1.weight",
            shape: &[rows, cols],
            values: &values,
            widths: &widths,
            exponent: Some(0),
        };
        let file = dir.path().join("m.qgz");
        qgrad_csr::write_file(&file, &[t], &Default::default()).unwrap();
        let out = dir.path().join("out");
        run(std::slice::from_ref(&file), &out).unwrap();
        for name in ["POWERLAW.md", "powerlaw.json", "ccdf_m.png", "ccdf_m.svg"] {
            assert!(out.join(name).exists(), "{name}");
        }
        let rows: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("powerlaw.json")).unwrap()).unwrap();
        // in and out, each with its random control.
        assert_eq!(rows.as_array().unwrap().len(), 4);
        assert_eq!(rows[0]["fit"]["k_max"], 40);
        assert!(run(&[dir.path().join("missing.qgz")], &out).is_err());
    }
}
