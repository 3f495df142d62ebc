//! `cargo xtask versus`: beyond the second thesis (#14), where the
//! structured designs stand against the element-wise accumulated-gradient
//! methods of the first thesis (METHOD §3–§5) and the joint loss-aware
//! quantization and sparsification of the third (METHOD §13, #17) on the
//! same MNIST MLPs, at equal file size and at equal inference time, all on
//! one plot.
//!
//! The structured side is a finished `cargo xtask structured` sweep (its
//! `structured.json` and every design's `model.qgz`). The accumulated-
//! gradient side is trained here, per MLP shape, with the sweep's own
//! recipe and budget (Adam, cosine, the same epochs, batch and seed), so the
//! families differ only in the method:
//!
//! * post-training (METHOD §3): the float network of the shape, its
//!   accumulated gradients `A` clustered into bit widths, at several cells
//!   from 8 bits everywhere down to 85–95 % pruned;
//! * combined (METHOD §5): in-training splits (METHOD §4) of 60 % of the float
//!   remainder after each of the first epochs but the last, frozen at 2 bits
//!   or pruned, then the float remainder quantized post-training to 8/4 bits;
//! * joint (METHOD §13): exact LAT at κ = 0.1, 0.05, 0.02 and 3-bit LAQ at
//!   κ = 0.05, the budget falling from 1 over the first half of the epochs,
//!   ranked by `D·W²` (the sweep's lr 0.002, not the loss-aware section's
//!   0.005: one recipe for every family).
//!
//! Every file is run with the integer kernels (accuracy and mismatches
//! against candle as everywhere). Inference time is the file's, measured on
//! the path `qgrad eval` takes (`FileModel::evaluate`, one image per batch,
//! `--timing-images` test images, the median of three passes after a warm-up
//! pass that builds the kernels), every file in the same process one after
//! the other, with the processor model in the report. Time nothing while
//! other work runs (`--skip-timing` builds the points only).
//!
//! Each point caches its `result.json` (the float network's checkpoint is
//! kept for more post-training cells); the timings go to `timings.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use qgrad_cluster::ClusterMethod;
use qgrad_data::Dataset;
use qgrad_design::{pareto_front, Point};
use qgrad_models::methods::{
    FractionSchedule, Importance, InTrainingOptions, LossAwareOptions, PostTrainingOptions, Scope,
    SparseBudget,
};
use qgrad_pipeline::{
    compress_combined, compress_loss_aware, compress_post_training, export_and_evaluate,
    run_in_training, run_loss_aware, train_float, ExportOptions, LossAwareRun, MethodRun, Start,
};
use qgrad_scaled::Method as Quantizer;
use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, write_atomic_with};
use crate::reproduce::{load_json, save_json};
use crate::structured::{DesignResult, Net, SweepRecipe};

/// What to run.
#[derive(Debug, Clone)]
pub struct VersusOptions {
    /// MNIST's folder.
    pub data: PathBuf,
    /// The finished structured sweep's folder.
    pub sweep: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// The MLP shapes the accumulated-gradient methods run on.
    pub shapes: Vec<Net>,
    /// Test images per latency pass.
    pub timing_images: usize,
    /// Build and evaluate the points only; keep earlier timings.
    pub skip_timing: bool,
    /// Progress bars.
    pub progress: bool,
}

/// The two families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    /// Block masks with low-bit weights and PACT activations (METHOD §9).
    Structured,
    /// Accumulated-gradient quantization (METHOD §3–§5).
    AccumulatedGradient,
    /// Joint loss-aware quantization and sparsification (METHOD §13).
    Joint,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Structured => "Structured",
            Family::AccumulatedGradient => "Accumulated-gradient",
            Family::Joint => "Joint (loss-aware, sparse)",
        }
    }
}

/// One compressed file of either family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersusPoint {
    /// `w256x2-kw2-ka2-c4` (a structured design) or
    /// `w256x2-post-w8-4-0-q20-30-50` (an accumulated-gradient cell).
    pub key: String,
    /// Its family.
    pub family: Family,
    /// The MLP.
    pub shape: Net,
    /// `structured`, `post-training` or `combined`.
    pub method: String,
    /// Parameters of the network.
    pub params: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// Test accuracy of the file run with the integer kernels.
    pub file_accuracy: f64,
    /// Images on which the file and candle disagree.
    pub mismatches: usize,
    /// The recipe it was trained with (the sweep's: a point is reused only
    /// when the sweep's recipe is unchanged).
    pub recipe: SweepRecipe,
    /// The file (for timing).
    pub file: PathBuf,
}

impl VersusPoint {
    fn error_percent(&self) -> f64 {
        100.0 * (1.0 - self.file_accuracy)
    }

    fn ratio(&self) -> f64 {
        32.0 * self.params as f64 / (8.0 * self.file_bytes as f64)
    }
}

/// Latency per file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// The processor model they were measured on.
    pub processor: String,
    /// Test images per pass.
    pub images: usize,
    /// Microseconds per image (batch 1) by point key.
    pub micros: BTreeMap<String, f64>,
}

/// An accumulated-gradient cell.
#[derive(Debug, Clone)]
enum Cell {
    Post {
        widths: Vec<u8>,
        fractions: Vec<f64>,
    },
    Combined {
        splits: Vec<f64>,
        low_bits: u8,
        widths: Vec<u8>,
    },
    Joint {
        quantizer: Quantizer,
        kappa: f64,
    },
}

impl Cell {
    fn key(&self) -> String {
        let list = |v: &[u8]| v.iter().map(u8::to_string).collect::<Vec<_>>().join("-");
        let pct = |v: &[f64]| {
            v.iter()
                .map(|f| format!("{:.0}", 100.0 * f))
                .collect::<Vec<_>>()
                .join("-")
        };
        match self {
            Cell::Post { widths, fractions } => {
                format!("post-w{}-q{}", list(widths), pct(fractions))
            }
            Cell::Combined {
                splits,
                low_bits,
                widths,
            } => format!(
                "combined-p{}x{}-b{low_bits}-w{}",
                pct(&splits[..1]),
                splits.len(),
                list(widths)
            ),
            Cell::Joint { quantizer, kappa } => {
                format!("joint-{quantizer}-k{}", pct(&[*kappa]))
            }
        }
    }

    fn family(&self) -> Family {
        match self {
            Cell::Joint { .. } => Family::Joint,
            _ => Family::AccumulatedGradient,
        }
    }

    fn method(&self) -> &'static str {
        match self {
            Cell::Post { .. } => "post-training",
            Cell::Combined { .. } => "combined",
            Cell::Joint { .. } => "joint",
        }
    }

    fn post_options(widths: &[u8], fractions: Option<&[f64]>) -> PostTrainingOptions {
        PostTrainingOptions {
            widths: widths.to_vec(),
            method: match fractions {
                Some(f) if widths.len() > 1 => ClusterMethod::Quantiles {
                    fractions: f.to_vec(),
                },
                _ => ClusterMethod::KMeans,
            },
            scope: Scope::Global,
        }
    }
}

/// The accumulated-gradient cells run on every shape (module docs).
fn cells() -> Vec<Cell> {
    let post = |widths: &[u8], fractions: &[f64]| Cell::Post {
        widths: widths.to_vec(),
        fractions: fractions.to_vec(),
    };
    let combined = |low_bits| Cell::Combined {
        splits: vec![0.6; 3],
        low_bits,
        widths: vec![8, 4],
    };
    let joint = |quantizer, kappa| Cell::Joint { quantizer, kappa };
    let lat = Quantizer::LatExact;
    vec![
        joint(lat, 0.1),
        joint(lat, 0.05),
        joint(lat, 0.02),
        joint(
            Quantizer::Laq {
                bits: 3,
                log: false,
            },
            0.05,
        ),
        post(&[8], &[1.0]),
        post(&[8, 4, 0], &[0.2, 0.3, 0.5]),
        post(&[8, 4, 0], &[0.1, 0.2, 0.7]),
        post(&[4, 2, 0], &[0.1, 0.2, 0.7]),
        post(&[4, 2, 0], &[0.05, 0.1, 0.85]),
        post(&[4, 0], &[0.05, 0.95]),
        combined(2),
        combined(0),
    ]
}

/// Builds the missing points, times every file unless told not to, and
/// writes `VERSUS.md`, `versus.json` and the plot.
pub fn run(opts: &VersusOptions) -> Result<Vec<VersusPoint>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let sweep_json = opts.sweep.join("structured.json");
    let designs: Vec<DesignResult> = load_json(&sweep_json).ok_or_else(|| {
        anyhow!(
            "no finished structured sweep at {} (run `cargo xtask structured` first)",
            sweep_json.display()
        )
    })?;
    let designs: Vec<DesignResult> = designs
        .into_iter()
        .filter(|d| matches!(d.design.net, Net::Mlp { .. }))
        .collect();
    let recipe = designs
        .first()
        .map(|d| d.recipe.clone())
        .ok_or_else(|| anyhow!("the structured sweep has no MLP design"))?;
    let mut points: Vec<VersusPoint> = designs
        .iter()
        .map(|d| VersusPoint {
            key: d.design.key(),
            family: Family::Structured,
            shape: d.design.net,
            method: "structured".into(),
            params: d.params,
            file_bytes: d.file_bytes,
            file_accuracy: d.file_accuracy,
            mismatches: d.mismatches,
            recipe: d.recipe.clone(),
            file: opts
                .sweep
                .join("designs")
                .join(d.design.key())
                .join("model.qgz"),
        })
        .collect();
    let (mut train_set, test_set) = qgrad_data::mnist::load_mnist(&opts.data)
        .with_context(|| format!("cannot load MNIST from {}", opts.data.display()))?;
    if recipe.train_images < train_set.len() {
        train_set = train_set.take(recipe.train_images);
    }
    for &shape in &opts.shapes {
        points.extend(accumulated_points(
            opts,
            shape,
            &recipe,
            (&train_set, &test_set),
        )?);
    }
    let timings_path = opts.out.join("timings.json");
    let mut timings: Timings = load_json(&timings_path).unwrap_or_default();
    if !opts.skip_timing {
        timings = time_files(&points, &test_set.take(opts.timing_images))?;
        save_json(&timings_path, &timings)?;
    }
    write_report(&points, &timings, &opts.out)?;
    Ok(points)
}

fn accumulated_points(
    opts: &VersusOptions,
    shape: Net,
    recipe: &SweepRecipe,
    (train_set, test_set): (&Dataset, &Dataset),
) -> Result<Vec<VersusPoint>> {
    let arch = shape.arch()?;
    if !matches!(shape, Net::Mlp { .. }) {
        return Err(anyhow!(
            "{}: the comparison runs on MNIST MLPs",
            shape.key()
        ));
    }
    let device = qgrad_pipeline::default_device();
    let export = ExportOptions {
        act_bits: qgrad_runtime::DEFAULT_ACT_BITS,
        layout: qgrad_csr::LayoutChoice::Auto,
        device: device.clone(),
        run_file: true,
    };
    let mut base = recipe.train_config(arch);
    base.progress = opts.progress;
    let mut host = None;
    let mut out = Vec::new();
    for cell in cells() {
        let key = format!("{}-{}", shape.key(), cell.key());
        let dir = opts.out.join("points").join(&key);
        let result_path = dir.join("result.json");
        if let Some(done) = load_json::<VersusPoint>(&result_path) {
            if done.recipe == *recipe {
                out.push(done);
                continue;
            }
        }
        eprintln!("[versus] {key}");
        let options = serde_json::json!({ "versus": key });
        let model = match &cell {
            Cell::Post { widths, fractions } => {
                if host.is_none() {
                    let mut c = base.clone();
                    c.checkpoint_dir = Some(
                        opts.out
                            .join("points")
                            .join(format!("{}-float", shape.key())),
                    );
                    let trained =
                        train_float(arch, &c, &device, (train_set, test_set), &mut [], |_| {})?;
                    let norm = trained.normalization(train_set);
                    host = Some(trained.to_host(norm)?);
                }
                let host = host.as_ref().expect("trained above");
                compress_post_training(
                    host,
                    &Cell::post_options(widths, Some(fractions)),
                    options,
                    Some(recipe.seed),
                )?
            }
            Cell::Combined {
                splits,
                low_bits,
                widths,
            } => {
                let mut c = base.clone();
                c.checkpoint_dir = Some(dir.join("run"));
                let run = MethodRun {
                    arch,
                    config: c,
                    options: InTrainingOptions {
                        fraction: FractionSchedule::PerSplit(splits.clone()),
                        low_bits: *low_bits,
                        start_epoch: 0,
                        split_every: 1,
                        scope: Scope::Global,
                    },
                    start: Start::Scratch,
                    device: device.clone(),
                };
                let outcome = run_in_training(run, (train_set, test_set), &mut [])?;
                compress_combined(&outcome, &Cell::post_options(widths, None), options)?
            }
            Cell::Joint { quantizer, kappa } => {
                let mut c = base.clone();
                c.checkpoint_dir = Some(dir.join("run"));
                let mut la = LossAwareOptions::new(*quantizer);
                la.seed = recipe.seed;
                la.sparsity = Some(SparseBudget::uniform(
                    *kappa,
                    recipe.epochs as f64 / 2.0,
                    Importance::Curvature,
                ));
                let run = LossAwareRun {
                    arch,
                    config: c,
                    options: la,
                    start: Start::Scratch,
                    device: device.clone(),
                };
                let outcome = run_loss_aware(run, (train_set, test_set), &mut [])?;
                compress_loss_aware(&outcome, options)?
            }
        };
        let file = dir.join("model.qgz");
        let exported = export_and_evaluate(&model, &file, test_set, &export)?;
        let report = exported
            .file
            .as_ref()
            .ok_or_else(|| anyhow!("the file was not run"))?;
        let point = VersusPoint {
            key: key.clone(),
            family: cell.family(),
            shape,
            method: cell.method().into(),
            params: arch.num_parameters() as u64,
            file_bytes: std::fs::metadata(&file)?.len(),
            file_accuracy: report.accuracy,
            mismatches: exported.mismatches().unwrap_or(0),
            recipe: recipe.clone(),
            file,
        };
        eprintln!(
            "[versus] {key}: {:.2} % from the file ({} mismatches), {} bytes ({:.1}x)",
            100.0 * point.file_accuracy,
            point.mismatches,
            point.file_bytes,
            point.ratio()
        );
        save_json(&result_path, &point)?;
        let _ = std::fs::remove_dir_all(dir.join("run"));
        out.push(point);
    }
    Ok(out)
}

/// Batch-1 latency of every file (module docs).
fn time_files(points: &[VersusPoint], images: &Dataset) -> Result<Timings> {
    let mut micros = BTreeMap::new();
    for p in points {
        let model = qgrad_csr::CompressedModel::read_file(&p.file)
            .with_context(|| format!("cannot read {}", p.file.display()))?;
        let runner = qgrad_runtime::FileModel::new(&model)
            .with_context(|| format!("{} cannot be run", p.file.display()))?;
        runner.evaluate(images, 1)?;
        let mut passes = Vec::new();
        for _ in 0..3 {
            let t0 = Instant::now();
            runner.evaluate(images, 1)?;
            passes.push(t0.elapsed().as_secs_f64() * 1e6 / images.len().max(1) as f64);
        }
        passes.sort_by(f64::total_cmp);
        micros.insert(p.key.clone(), passes[1]);
    }
    Ok(Timings {
        processor: crate::cpu_model(),
        images: images.len(),
        micros,
    })
}

/// The point of `family` with the lowest error among those whose `x` is at
/// most `limit`.
fn best_within(
    points: &[VersusPoint],
    family: Family,
    x: impl Fn(&VersusPoint) -> Option<f64>,
    limit: f64,
) -> Option<&VersusPoint> {
    points
        .iter()
        .filter(|p| p.family == family && x(p).is_some_and(|v| v <= limit))
        .min_by(|a, b| a.error_percent().total_cmp(&b.error_percent()))
}

/// Every family, in the report's order.
const FAMILIES: [Family; 3] = [
    Family::Structured,
    Family::AccumulatedGradient,
    Family::Joint,
];

/// A point's position on a plot's x axis (none: not measured).
type XAxis<'a> = &'a dyn Fn(&VersusPoint) -> Option<f64>;

/// Writes `VERSUS.md`, `versus.json` and `plots/versus.png`.
pub fn write_report(points: &[VersusPoint], timings: &Timings, out: &Path) -> Result<()> {
    save_json(&out.join("versus.json"), &points)?;
    let time = |p: &VersusPoint| timings.micros.get(&p.key).copied();
    let kib = |p: &VersusPoint| p.file_bytes as f64 / 1024.0;
    let mut md = String::new();
    writeln!(
        md,
        "# Structured designs against accumulated-gradient and joint quantization\n\n\
         The structured sweep's MLP designs (METHOD §9) beside the first thesis's element-wise \
         methods (METHOD §3–§5) and joint loss-aware quantization and sparsification \
         (METHOD §13) on the same shapes, trained with the same recipe and budget \
         ({} epochs). Accuracy and time are the file's, run with the integer kernels; time is \
         µs per image at batch 1 on {} ({} test images per pass, median of 3). \
         Structured files run 2–8-bit PACT activations; the others run the runtime's 16-bit \
         fixed-point activations.\n",
        points.first().map_or(0, |p| p.recipe.epochs),
        if timings.processor.is_empty() {
            "(not timed)"
        } else {
            &timings.processor
        },
        timings.images
    )?;
    writeln!(md, "## Head to head\n")?;
    writeln!(
        md,
        "For every accumulated-gradient and joint file: the most accurate structured design no \
         larger, and the most accurate one no slower.\n"
    )?;
    writeln!(
        md,
        "| file | KiB | µs | error % | best structured ≤ its size | error % | best structured ≤ its time | error % |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |")?;
    let fmt_t = |v: Option<f64>| v.map_or("–".into(), |t| format!("{t:.0}"));
    for p in points.iter().filter(|p| p.family != Family::Structured) {
        let by_size = best_within(points, Family::Structured, |q| Some(kib(q)), kib(p));
        let by_time = time(p).and_then(|t| best_within(points, Family::Structured, time, t));
        let cell = |q: Option<&VersusPoint>| {
            q.map_or(("(none)".to_string(), "–".to_string()), |q| {
                (q.key.clone(), format!("{:.2}", q.error_percent()))
            })
        };
        let (s_key, s_err) = cell(by_size);
        let (t_key, t_err) = cell(by_time);
        writeln!(
            md,
            "| {} | {:.1} | {} | {:.2} | {s_key} | {s_err} | {t_key} | {t_err} |",
            p.key,
            kib(p),
            fmt_t(time(p)),
            p.error_percent()
        )?;
    }
    let mut fronts = Vec::new();
    let by_size = |p: &VersusPoint| Some(kib(p));
    let axes: [(&str, XAxis); 2] = [("file size", &by_size), ("inference time", &time)];
    for (axis, x) in axes {
        for family in FAMILIES {
            let members: Vec<&VersusPoint> = points
                .iter()
                .filter(|p| p.family == family && x(p).is_some())
                .collect();
            let pts: Vec<Point> = members
                .iter()
                .map(|p| Point::new(x(p).expect("filtered"), p.error_percent()))
                .collect();
            let front: Vec<&VersusPoint> = if pts.is_empty() {
                Vec::new()
            } else {
                pareto_front(&pts)?
                    .into_iter()
                    .map(|i| members[i])
                    .collect()
            };
            fronts.push((axis, family, front));
        }
    }
    for (axis, family, front) in &fronts {
        writeln!(
            md,
            "\n## {} front by {axis}: {} files\n",
            family.name(),
            front.len()
        )?;
        writeln!(md, "| file | KiB | vs float | µs | error % |")?;
        writeln!(md, "| --- | --- | --- | --- | --- |")?;
        for p in front {
            writeln!(
                md,
                "| {} | {:.1} | {:.1}x | {} | {:.2} |",
                p.key,
                kib(p),
                p.ratio(),
                fmt_t(time(p)),
                p.error_percent()
            )?;
        }
    }
    writeln!(md, "\n## Every accumulated-gradient and joint file\n")?;
    writeln!(
        md,
        "| file | method | KiB | vs float | µs | accuracy (file) | mismatches |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |")?;
    for p in points.iter().filter(|p| p.family != Family::Structured) {
        writeln!(
            md,
            "| {} | {} | {:.1} | {:.1}x | {} | {:.2} % | {} |",
            p.key,
            p.method,
            kib(p),
            p.ratio(),
            fmt_t(time(p)),
            100.0 * p.file_accuracy,
            p.mismatches
        )?;
    }
    writeln!(md, "\n![size and time](plots/versus.png)")?;
    write_atomic(&out.join("VERSUS.md"), md.as_bytes())?;
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots)?;
    write_atomic_with(&plots.join("versus.png"), |tmp| {
        let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
        let root = BitMapBackend::new(tmp, (1400, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (left, right) = root.split_horizontally(700);
        panel(
            &left,
            "Error against file size",
            "file size, KiB (log)",
            points,
            &|p| Some(kib(p)),
        )?;
        panel(
            &right,
            "Error against inference time (batch 1)",
            "µs per image from the file (log)",
            points,
            &time,
        )?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    })
}

/// One panel: both families as points, each family's front as a line.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    x_desc: &str,
    points: &[VersusPoint],
    x: XAxis,
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
    let xs: Vec<f64> = points.iter().filter_map(x).collect();
    let errors: Vec<f64> = points.iter().map(VersusPoint::error_percent).collect();
    let (mut chart, y_min) = crate::plot::log_error_chart(area, (title, x_desc), &xs, &errors, 13)?;
    for (family, color, label) in [
        (Family::Structured, BLUE, "structured (block masks, PACT)"),
        (
            Family::AccumulatedGradient,
            RGBColor(220, 110, 0),
            "accumulated gradient (post-training, combined)",
        ),
        (
            Family::Joint,
            RGBColor(0, 150, 60),
            "joint loss-aware (LAT, LAQ under a budget)",
        ),
    ] {
        let members: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.family == family)
            .filter_map(|p| x(p).map(|v| (v, p.error_percent().max(y_min))))
            .collect();
        if members.is_empty() {
            continue;
        }
        let pts: Vec<Point> = members.iter().map(|&(a, b)| Point::new(a, b)).collect();
        let front: Vec<(f64, f64)> = pareto_front(&pts)?
            .into_iter()
            .map(|i| members[i])
            .collect();
        chart
            .draw_series(
                members
                    .iter()
                    .map(|&(a, b)| Circle::new((a, b), 3, color.mix(0.35).filled())),
            )
            .map_err(|e| err(&e))?;
        crate::plot::draw_front(&mut chart, &front, color, label)?;
    }
    crate::plot::draw_legend(&mut chart, 13)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(key: &str, family: Family, bytes: u64, accuracy: f64) -> VersusPoint {
        VersusPoint {
            key: key.into(),
            family,
            shape: Net::Mlp {
                width: 256,
                depth: 2,
            },
            method: "x".into(),
            params: 269_322,
            file_bytes: bytes,
            file_accuracy: accuracy,
            mismatches: 0,
            recipe: SweepRecipe {
                epochs: 4,
                lr: 0.002,
                batch_size: 100,
                block: (16, 16),
                clip: 2.0,
                input_bits: 8,
                train_images: 60_000,
                test_images: 10_000,
                seed: 1,
            },
            file: PathBuf::from("unused.qgz"),
        }
    }

    #[test]
    fn cell_keys_are_distinct_and_name_their_settings() {
        let keys: Vec<String> = cells().iter().map(Cell::key).collect();
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert!(
            keys.contains(&"post-w8-4-0-q20-30-50".to_string()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"combined-p60x3-b2-w8-4".to_string()),
            "{keys:?}"
        );
        for c in cells() {
            if let Cell::Post { widths, fractions } = &c {
                Cell::post_options(widths, Some(fractions))
                    .validate()
                    .unwrap();
            }
        }
    }

    #[test]
    fn the_head_to_head_picks_the_best_structured_design_within_size_and_time() {
        let points = vec![
            point("s-small", Family::Structured, 10 * 1024, 0.95),
            point("s-mid", Family::Structured, 20 * 1024, 0.97),
            point("s-big", Family::Structured, 60 * 1024, 0.99),
            point("a-mid", Family::AccumulatedGradient, 30 * 1024, 0.96),
            point("j-small", Family::Joint, 12 * 1024, 0.955),
        ];
        let timings = Timings {
            processor: "test cpu".into(),
            images: 10,
            micros: [
                ("s-small", 5.0),
                ("s-mid", 50.0),
                ("s-big", 8.0),
                ("a-mid", 10.0),
                ("j-small", 6.0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        };
        let dir = tempfile::tempdir().unwrap();
        write_report(&points, &timings, dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("VERSUS.md")).unwrap();
        // No larger than 30 KiB: s-mid (3 %) beats s-small; no slower than
        // 10 µs: s-big (1 %), although it is twice the size.
        assert!(
            md.contains("| a-mid | 30.0 | 10 | 4.00 | s-mid | 3.00 | s-big | 1.00 |"),
            "{md}"
        );
        // A joint file: s-small is the only structured design within both.
        assert!(
            md.contains("| j-small | 12.0 | 6 | 4.50 | s-small | 5.00 | s-small | 5.00 |"),
            "{md}"
        );
        assert!(
            md.contains("## Joint (loss-aware, sparse) front by file size: 1 files"),
            "{md}"
        );
        assert!(md.contains("test cpu"), "{md}");
        assert!(dir.path().join("plots/versus.png").is_file());
    }
}
