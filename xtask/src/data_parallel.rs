//! `cargo xtask data-parallel`: the measurements of METHOD §12 —
//! data-parallel training with quantized gradients.
//!
//! * **Grid** (in-process ranks, [`qgrad_collective::ThreadGroup`], which
//!   give the bits of `mpirun -np N`): per network and weight kind (float,
//!   or a loss-aware quantizer), the f32 all-reduce against stochastic
//!   m-bit gradients with and without clipping; test accuracy after the
//!   same epochs, bytes per step measured at the collective, the training
//!   loss of every step (convergence curves).
//! * **Dimension**: a narrow and a wide MLP with one scale per whole tensor
//!   (the bucket is the layer), 2-bit gradients with and without clipping
//!   against f32: the slowdown (mean training loss over the run, relative
//!   to f32) per width.
//! * **Timing** (`--timing QGRAD`, a qgrad built with `--features mpi`):
//!   `mpirun -np 1|2|4` of LeNet-5 with f32 and 2-bit gradients; compute
//!   and exchange time per step and bytes, and from them an α–β projection
//!   to 8–64 machines on a 10 Gbit/s network.
//!
//! Every run is kept in its own JSON file under `--out` and is skipped when
//! it is there (a killed grid continues where it stopped; a run killed
//! mid-way continues from its epoch checkpoint).
//!
//! # Decisions
//!
//! * Adam, lr 0.001, cosine decay, batch 100 (global), two ranks: the same
//!   for every row. Clipping at 2.5σ.
//! * The curves' and the slowdown's training loss is the whole batch's mean
//!   loss as the ranks computed it (before the update), smoothed over 25
//!   steps for the plots.
//! * The error floor is the mean training loss of the last 10% of the steps.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use qgrad_collective::{GradientExchange, StochasticQuantizer};
use qgrad_models::methods::{LossAwareOptions, StepRecord};
use qgrad_models::train::OptimizerKind;
use qgrad_models::{Arch, LrSchedule, TrainConfig};
use qgrad_pipeline::data::load_datasets;
use qgrad_pipeline::{run_on_threads, DataParallelRun, ParallelWeights};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

/// What to run.
#[derive(Debug, Clone)]
pub struct DataParallelOptions {
    /// MNIST folder (the full set for the report).
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Networks of the grid.
    pub models: Vec<Arch>,
    /// Weight kinds: `float` or quantizer names (`lab`, `laq3`).
    pub weights: Vec<String>,
    /// Gradient widths besides f32.
    pub bits: Vec<u8>,
    /// Epochs of every grid run.
    pub epochs: usize,
    /// In-process ranks.
    pub ranks: usize,
    /// Stop each epoch after this many batches (quick runs).
    pub max_batches: Option<usize>,
    /// Train on the first N images only.
    pub train_limit: Option<usize>,
    /// Run the dimension comparison.
    pub dimension: bool,
    /// A qgrad binary built with `--features mpi`: run the timing.
    pub timing: Option<PathBuf>,
    /// Train nothing: report the runs already under `out`.
    pub report_only: bool,
}

/// Bucket length of the grid.
const BUCKET: usize = 512;
/// Clip factor of the grid.
const CLIP: f32 = 2.5;
/// Global mini-batch.
const BATCH: usize = 100;

/// One finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Network.
    pub model: String,
    /// Weight kind.
    pub weights: String,
    /// Gradient exchange in words.
    pub gradients: String,
    /// Bits per element of the format (`m + 32/d`, 32 for f32).
    pub bits_per_element: f64,
    /// Clipped?
    pub clipped: bool,
    /// Ranks.
    pub ranks: usize,
    /// Test accuracy after every epoch.
    pub accuracy: Vec<f64>,
    /// Bytes this rank passed to the collective per step (measured).
    pub bytes_per_step: f64,
    /// Bytes of the f32 all-reduce of the same gradients.
    pub f32_bytes_per_step: usize,
    /// The batch's mean training loss at every step.
    pub losses: Vec<f32>,
    /// Mean compute and exchange seconds per step (rank 0; the machine
    /// ran other work: not a speed figure).
    pub seconds_per_step: (f64, f64),
    /// What else decided the numbers (data, epochs, step limit, ranks): a
    /// kept run is reused only for the same settings.
    #[serde(default)]
    pub settings: String,
}

impl RunResult {
    fn final_accuracy(&self) -> f64 {
        self.accuracy.last().copied().unwrap_or(f64::NAN)
    }

    /// Mean training loss over the last 10% of the steps.
    fn floor(&self) -> f64 {
        let n = self.losses.len();
        let tail = &self.losses[n - (n / 10).max(1)..];
        tail.iter().map(|&l| f64::from(l)).sum::<f64>() / tail.len() as f64
    }

    /// Mean training loss over the whole run.
    fn mean_loss(&self) -> f64 {
        self.losses.iter().map(|&l| f64::from(l)).sum::<f64>() / self.losses.len().max(1) as f64
    }
}

/// The grid's runs of one network and weight kind, in grid order.
fn runs_of<'a>(grid: &'a [RunResult], model: Arch, weights: &str) -> Vec<&'a RunResult> {
    grid.iter()
        .filter(|r| r.model == model.name() && r.weights == weights)
        .collect()
}

/// The gradient settings of the grid: f32, then each width without and
/// with clipping.
fn settings(bits: &[u8], bucket: usize) -> Result<Vec<GradientExchange>> {
    let mut out = vec![GradientExchange::Float];
    for &b in bits {
        for clip in [None, Some(CLIP)] {
            out.push(GradientExchange::Quantized(StochasticQuantizer::new(
                b, bucket, clip,
            )?));
        }
    }
    Ok(out)
}

fn key(model: Arch, weights: &str, how: &GradientExchange) -> String {
    let g = match how {
        GradientExchange::Float => "f32".to_string(),
        GradientExchange::Quantized(q) => format!(
            "{}b-d{}{}",
            q.bits,
            q.bucket,
            if q.clip.is_some() { "-clip" } else { "" }
        ),
    };
    format!("{}_{weights}_{g}", model.name())
}

fn config(opts: &DataParallelOptions, epochs: usize) -> TrainConfig {
    let mut c = TrainConfig::default_for(Arch::Lenet5);
    c.epochs = epochs;
    c.batch_size = BATCH;
    c.lr = 0.001;
    c.optimizer = OptimizerKind::ADAM;
    c.schedule = LrSchedule::Cosine { min_lr: 0.0 };
    c.weight_decay = 0.0;
    c.max_batches_per_epoch = opts.max_batches;
    c.progress = false;
    c
}

/// Trains one run on `opts.ranks` threads (or loads it when done).
fn run_one(
    opts: &DataParallelOptions,
    model: Arch,
    weights: &str,
    how: GradientExchange,
    epochs: usize,
) -> Result<Option<RunResult>> {
    let name = key(model, weights, &how);
    let path = opts.out.join("runs").join(format!("{name}.json"));
    let settings = format!(
        "data {}, {epochs} epoch(s), at most {:?} steps per epoch, first {:?} images, {} ranks, batch {BATCH}, Adam lr 0.001 cosine",
        opts.data.display(),
        opts.max_batches,
        opts.train_limit,
        opts.ranks
    );
    if let Ok(bytes) = std::fs::read(&path) {
        if let Ok(done) = serde_json::from_slice::<RunResult>(&bytes) {
            // --report-only shows whatever is there (the report says how
            // many epochs each table ran).
            if opts.report_only || done.settings == settings {
                return Ok(Some(done));
            }
        }
    }
    if opts.report_only {
        return Ok(None);
    }
    eprintln!(
        "data-parallel: {name} ({} ranks, {epochs} epochs)",
        opts.ranks
    );
    let (train, test) = load_datasets(model, &opts.data, opts.train_limit, None)
        .with_context(|| format!("cannot load MNIST from {}", opts.data.display()))?;
    let mut config = config(opts, epochs);
    let ck = opts.out.join("checkpoints").join(&name);
    config.checkpoint_dir = Some(ck.clone());
    let weights_kind = match weights {
        "float" => ParallelWeights::Float,
        q => ParallelWeights::LossAware(LossAwareOptions {
            seed: config.seed,
            ..LossAwareOptions::new(q.parse().with_context(|| format!("weights '{q}'"))?)
        }),
    };
    let run = DataParallelRun {
        arch: model,
        config,
        weights: weights_kind,
        exchange: how,
        device: Device::Cpu,
    };
    let outcome = run_on_threads(
        &run,
        (&train, &test),
        opts.ranks,
        Duration::from_secs(600),
        &mut [],
    )
    .with_context(|| format!("data-parallel run {name}"))?;
    let accuracy: Vec<f64> = outcome
        .state
        .history
        .iter()
        .map(|e| e.test_accuracy)
        .collect();
    let (steps, f32_bytes) = (outcome.steps, outcome.f32_bytes_per_step);
    let per_step =
        |f: fn(&StepRecord) -> f64| steps.iter().map(f).sum::<f64>() / steps.len().max(1) as f64;
    let result = RunResult {
        model: model.name(),
        weights: weights.to_string(),
        gradients: how.describe(),
        bits_per_element: how.bits_per_element(),
        clipped: matches!(how, GradientExchange::Quantized(q) if q.clip.is_some()),
        ranks: opts.ranks,
        accuracy,
        bytes_per_step: per_step(|s| s.bytes_sent as f64),
        f32_bytes_per_step: f32_bytes,
        losses: steps.iter().map(|s| s.loss).collect(),
        seconds_per_step: (
            per_step(|s| s.compute_seconds),
            per_step(|s| s.exchange_seconds),
        ),
        settings,
    };
    write_atomic(&path, &serde_json::to_vec(&result)?)?;
    let _ = std::fs::remove_dir_all(&ck);
    Ok(Some(result))
}

/// One timing run of `mpirun -np ranks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timing {
    /// Ranks.
    pub ranks: usize,
    /// Gradient exchange in words.
    pub gradients: String,
    /// Compute (forward and backward of the shard) seconds per step.
    pub compute: f64,
    /// Exchange seconds per step.
    pub exchange: f64,
    /// Bytes per rank per step.
    pub bytes: f64,
    /// Of the exchange: encoding, seconds per step.
    #[serde(default)]
    pub encode: f64,
    /// Of the exchange: decoding and averaging all messages, seconds per step.
    #[serde(default)]
    pub decode: f64,
    /// Bytes of the f32 all-reduce of the same gradients.
    pub f32_bytes: f64,
}

fn run_timing(opts: &DataParallelOptions, qgrad: &Path) -> Result<Vec<Timing>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = Vec::new();
    for ranks in [1usize, 2, 4] {
        for bits in ["32", "2"] {
            let threads = (cores / ranks).max(1).to_string();
            let o = Command::new("mpirun")
                .args(["-np", &ranks.to_string()])
                .arg(qgrad)
                .args([
                    "train-parallel",
                    "--engine",
                    "mpi",
                    "--model",
                    "lenet-5",
                    "--data",
                ])
                .arg(&opts.data)
                .args([
                    "--epochs",
                    "1",
                    "--max-batches",
                    "80",
                    "--batch-size",
                    "100",
                    "--test-limit",
                    "1000",
                    "--grad-bits",
                    bits,
                    "--no-progress",
                    "--json",
                ])
                .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
                .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
                .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
                .env("RAYON_NUM_THREADS", &threads)
                .output()
                .context("cannot run mpirun (install openmpi-bin)")?;
            if !o.status.success() {
                bail!(
                    "mpirun -np {ranks} failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            out.push(Timing {
                ranks,
                gradients: v["gradients"].as_str().unwrap_or("").to_string(),
                compute: f("compute_seconds_per_step"),
                exchange: f("exchange_seconds_per_step"),
                bytes: f("bytes_per_step_measured"),
                encode: f("encode_seconds_per_step"),
                decode: f("decode_seconds_per_step"),
                f32_bytes: f("f32_bytes_per_step"),
            });
            eprintln!("timing: {ranks} rank(s), {bits}-bit gradients done");
        }
    }
    Ok(out)
}

/// Runs what `opts` asks for and writes `DATA_PARALLEL.md`, `results.json`
/// and the plots into `opts.out`.
pub fn run(opts: &DataParallelOptions) -> Result<()> {
    std::fs::create_dir_all(opts.out.join("runs"))?;
    let timing_path = opts.out.join("timing.json");
    if let Some(qgrad) = &opts.timing {
        // First, while nothing else of ours runs.
        let t = run_timing(opts, qgrad)?;
        write_atomic(&timing_path, &serde_json::to_vec_pretty(&t)?)?;
    }
    let mut grid = Vec::new();
    for &model in &opts.models {
        for weights in &opts.weights {
            for how in settings(&opts.bits, BUCKET)? {
                grid.extend(run_one(opts, model, weights, how, opts.epochs)?);
            }
        }
    }
    let mut dimension = Vec::new();
    if opts.dimension {
        for width in [64u32, 1024] {
            let model = Arch::Mlp {
                width,
                depth: 2,
                batch_norm: false,
            };
            for how in [
                GradientExchange::Float,
                GradientExchange::Quantized(StochasticQuantizer::new(2, 1 << 30, None)?),
                GradientExchange::Quantized(StochasticQuantizer::new(2, 1 << 30, Some(CLIP))?),
            ] {
                dimension.extend(run_one(opts, model, "float", how, 1)?);
            }
        }
    }
    let timing: Vec<Timing> = std::fs::read(&timing_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    write_atomic(
        &opts.out.join("results.json"),
        &serde_json::to_vec(&serde_json::json!({
            "grid": grid,
            "dimension": dimension,
            "timing": timing,
        }))?,
    )?;
    let mut plots = Vec::new();
    for &model in &opts.models {
        for weights in &opts.weights {
            let runs = runs_of(&grid, model, weights);
            let file = opts
                .out
                .join(format!("convergence_{}_{weights}.png", model.name()));
            plot_curves(
                &runs,
                &file,
                &format!("{} ({weights} weights)", model.name()),
            )?;
            plots.push(file);
        }
    }
    if !dimension.is_empty() {
        let file = opts.out.join("dimension.png");
        let runs: Vec<&RunResult> = dimension.iter().collect();
        plot_curves(
            &runs,
            &file,
            "narrow vs wide MLP, 2-bit, one scale per layer",
        )?;
        plots.push(file);
    }
    let report = report(opts, &grid, &dimension, &timing, &plots);
    write_atomic(&opts.out.join("DATA_PARALLEL.md"), report.as_bytes())?;
    Ok(())
}

fn smooth(losses: &[f32], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut sum = 0.0f64;
    for (i, &l) in losses.iter().enumerate() {
        sum += f64::from(l);
        if i >= window {
            sum -= f64::from(losses[i - window]);
        }
        let n = (i + 1).min(window) as f64;
        out.push((i as f64, sum / n));
    }
    out
}

fn plot_curves(runs: &[&RunResult], file: &Path, title: &str) -> Result<()> {
    let curves: Vec<crate::plot::Curve> = runs
        .iter()
        .map(|r| {
            let label = if r.model.starts_with("mlp") {
                format!(
                    "{} {}",
                    r.model,
                    r.gradients.replace("d=1073741824", "d=layer")
                )
            } else {
                r.gradients.clone()
            };
            crate::plot::Curve {
                label,
                points: smooth(&r.losses, 25),
            }
        })
        .collect();
    let y_max = curves
        .iter()
        .flat_map(|c| c.points.iter().skip(c.points.len() / 20).map(|p| p.1))
        .fold(0.0f64, f64::max)
        .clamp(0.05, 3.0);
    crate::plot::line_chart(
        file,
        title,
        ("step", "training loss (25-step mean)"),
        &curves,
        (0.0, y_max * 1.05),
        crate::plot::LegendAt::UpperRight,
    )
}

/// The measured inputs of the α–β model (module docs of the report).
struct Model {
    /// One rank's compute per step (the whole batch), seconds.
    compute: f64,
    /// f32 bytes of the gradients.
    f32_bytes: f64,
    /// Quantized bytes per rank.
    q_bytes: f64,
    /// Encoding one rank's gradient, seconds.
    encode: f64,
    /// Decoding one message, seconds.
    decode: f64,
}

impl Model {
    /// From the timings: compute at one rank; encode and the per-message
    /// decode measured inside the exchange at two ranks (the decode of two
    /// messages, halved).
    fn from(t: &[Timing]) -> Option<Self> {
        let f1 = t.iter().find(|x| x.ranks == 1 && x.gradients == "f32")?;
        let q2 = t.iter().find(|x| x.ranks == 2 && x.gradients != "f32")?;
        Some(Self {
            compute: f1.compute,
            f32_bytes: f1.f32_bytes,
            q_bytes: q2.bytes,
            encode: q2.encode,
            decode: q2.decode / 2.0,
        })
    }

    /// One step on `n` machines with f32 (ring all-reduce) or quantized
    /// (ring all-gather plus codec) gradients.
    fn step(&self, quantized: bool, n: f64, alpha: f64, beta: f64) -> f64 {
        let compute = self.compute / n;
        if quantized {
            compute
                + self.encode
                + n * self.decode
                + (n - 1.0) * alpha
                + (n - 1.0) * self.q_bytes * beta
        } else {
            compute + 2.0 * (n - 1.0) * alpha + 2.0 * (n - 1.0) / n * self.f32_bytes * beta
        }
    }

    /// The bandwidth (bytes/s) below which quantized gradients win at `n`
    /// machines; `None` where they never do (the all-gather sends more).
    fn break_even(&self, n: f64, alpha: f64) -> Option<f64> {
        let saved_bytes = 2.0 * (n - 1.0) / n * self.f32_bytes - (n - 1.0) * self.q_bytes;
        let extra = self.encode + n * self.decode - (n - 1.0) * alpha;
        if saved_bytes <= 0.0 {
            return None;
        }
        // Quantized wins iff saved_bytes·β > extra, i.e. bandwidth < saved/extra.
        Some(if extra <= 0.0 {
            f64::INFINITY
        } else {
            saved_bytes / extra
        })
    }
}

fn report(
    opts: &DataParallelOptions,
    grid: &[RunResult],
    dimension: &[RunResult],
    timing: &[Timing],
    plots: &[PathBuf],
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Data-parallel training with quantized gradients (METHOD §12)\n"
    );
    let _ = writeln!(
        s,
        "Written by `cargo xtask data-parallel`. {} in-process ranks (bit-identical to `mpirun -np {}`), \
         global batch {BATCH}, Adam lr 0.001 with cosine decay, bucket d = {BUCKET}, clipping at {CLIP}σ. \
         Data: {}{}.\n",
        opts.ranks,
        opts.ranks,
        opts.data.display(),
        opts.max_batches
            .map(|m| format!(", at most {m} steps per epoch"))
            .unwrap_or_default(),
    );
    for &model in &opts.models {
        for weights in &opts.weights {
            let runs = runs_of(grid, model, weights);
            let Some(base) = runs.iter().find(|r| r.gradients == "f32") else {
                continue;
            };
            let _ = writeln!(
                s,
                "## {} with {weights} weights ({} epoch(s), {} steps)\n",
                model.name(),
                base.accuracy.len(),
                base.losses.len()
            );
            let _ = writeln!(
                s,
                "| gradients | bits/element | bytes/step/rank (measured) | fewer than f32 | test accuracy | vs f32 | loss floor |"
            );
            let _ = writeln!(s, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            for r in &runs {
                let _ = writeln!(
                    s,
                    "| {} | {:.4} | {:.0} | {:.1}x | {:.2} % | {:+.2} pt | {:.4} |",
                    r.gradients,
                    r.bits_per_element,
                    r.bytes_per_step,
                    r.f32_bytes_per_step as f64 / r.bytes_per_step.max(1.0),
                    100.0 * r.final_accuracy(),
                    100.0 * (r.final_accuracy() - base.final_accuracy()),
                    r.floor()
                );
            }
            let _ = writeln!(s);
        }
    }
    // Claims.
    let _ = writeln!(s, "## Claims checked\n");
    for r in grid
        .iter()
        .filter(|r| r.gradients.starts_with("2-bit d=512") && !r.clipped)
    {
        let ratio = r.f32_bytes_per_step as f64 / r.bytes_per_step.max(1.0);
        let _ = writeln!(
            s,
            "- 2-bit, d = 512, {} {}: {ratio:.1}x fewer bytes than the f32 all-reduce (target >= 15x): {}.",
            r.model,
            r.weights,
            if ratio >= 15.0 { "met" } else { "not met" }
        );
    }
    for r in grid
        .iter()
        .filter(|r| r.gradients.starts_with("3-bit") && r.clipped)
    {
        if let Some(base) = grid
            .iter()
            .find(|b| b.model == r.model && b.weights == r.weights && b.gradients == "f32")
        {
            let d = 100.0 * (r.final_accuracy() - base.final_accuracy());
            let _ = writeln!(
                s,
                "- 3-bit with clipping, {} {}: {d:+.2} pt against f32 gradients (target within 1 pt): {}.",
                r.model,
                r.weights,
                if d >= -1.0 { "met" } else { "not met" }
            );
        }
    }
    for &model in &opts.models {
        let floors: Vec<String> = opts
            .weights
            .iter()
            .filter_map(|w| {
                grid.iter()
                    .find(|r| r.model == model.name() && &r.weights == w && r.gradients == "f32")
                    .map(|r| format!("{w} {:.4}", r.floor()))
            })
            .collect();
        let _ = writeln!(
            s,
            "- Error floor by weight grid, {} (f32 gradients, mean loss of the last 10% of steps): {}.",
            model.name(),
            floors.join(", ")
        );
    }
    if !dimension.is_empty() {
        let _ = writeln!(
            s,
            "\n## Dimension: narrow against wide layers\n\nOne epoch, float weights, 2-bit gradients with one scale per whole tensor (d = the layer's size), with and without clipping. \
             Two measures of the slowdown against the f32 run of the same network: the mean training loss over the run divided by f32's, and the steps the run needs to reach \
             the loss f32 had at half its steps (25-step means) divided by f32's.\n"
        );
        let _ = writeln!(
            s,
            "| network | gradients | mean loss | slowdown (loss) | steps to f32's mid-run loss | slowdown (steps) | test accuracy |"
        );
        let _ = writeln!(s, "| --- | --- | ---: | ---: | ---: | ---: | ---: |");
        for r in dimension {
            let Some(base) = dimension
                .iter()
                .find(|b| b.model == r.model && b.gradients == "f32")
            else {
                continue;
            };
            let reference = smooth(&base.losses, 25);
            let target = reference[reference.len() / 2].1;
            let steps_to = |run: &RunResult| {
                smooth(&run.losses, 25)
                    .iter()
                    .position(|&(_, l)| l <= target)
            };
            let (mine, theirs) = (steps_to(r), steps_to(base));
            let _ = writeln!(
                s,
                "| {} | {} | {:.4} | {:.2}x | {} | {} | {:.2} % |",
                r.model,
                r.gradients.replace("d=1073741824", "d=layer"),
                r.mean_loss(),
                r.mean_loss() / base.mean_loss(),
                mine.map_or("not reached".into(), |k| k.to_string()),
                match (mine, theirs) {
                    (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
                    _ => "-".into(),
                },
                100.0 * r.final_accuracy()
            );
        }
    }
    if !timing.is_empty() {
        let cpu = crate::cpu_model();
        let _ = writeln!(
            s,
            "\n## Time per step (`mpirun`, LeNet-5, batch 100, 80 steps)\n\nProcessor: {cpu}, {} cores; with 4 ranks the cores are oversubscribed (2 ranks per core). Each rank's rayon pool gets cores/ranks threads.\n",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        let _ = writeln!(
            s,
            "| ranks | gradients | compute ms | exchange ms | of which encode | of which decode | step ms | bytes/rank/step |"
        );
        let _ = writeln!(
            s,
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for t in timing {
            let _ = writeln!(
                s,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
                t.ranks,
                t.gradients,
                t.compute * 1e3,
                t.exchange * 1e3,
                t.encode * 1e3,
                t.decode * 1e3,
                (t.compute + t.exchange) * 1e3,
                t.bytes
            );
        }
        if let Some(m) = Model::from(timing) {
            let alpha = 25e-6;
            let _ = writeln!(
                s,
                "\n### Projection to N machines\n\nAn α–β model with one rank per machine, α = 25 µs per message and β = 1/bandwidth. \
                 Compute: the 1-rank step's compute ({:.1} ms) divided by N (the global batch is split). \
                 f32: a ring all-reduce, 2(N−1)α + 2(N−1)/N·S·β, S = {:.0} bytes. \
                 Quantized: a ring all-gather, (N−1)α + (N−1)·b·β with b = {:.0} bytes per rank, plus one encode ({:.2} ms) and N decodes ({:.2} ms each), \
                 as measured inside the 2-rank exchange. \
                 Assumptions: no overlap of communication and compute, a full-bisection network, every machine like this one.\n",
                m.compute * 1e3,
                m.f32_bytes,
                m.q_bytes,
                m.encode * 1e3,
                m.decode * 1e3
            );
            let _ = writeln!(
                s,
                "| N | f32 step, 10 Gbit/s | 2-bit step, 10 Gbit/s | f32 step, 1 Gbit/s | 2-bit step, 1 Gbit/s | 2-bit wins below |"
            );
            let _ = writeln!(s, "| ---: | ---: | ---: | ---: | ---: | ---: |");
            for n in [2.0, 4.0, 8.0, 16.0, 32.0, 64.0] {
                let ms = |q: bool, gbit: f64| m.step(q, n, alpha, 8.0 / (gbit * 1e9)) * 1e3;
                let wins = match m.break_even(n, alpha) {
                    None => "never (the all-gather sends more)".to_string(),
                    Some(b) if b.is_infinite() => "any bandwidth".to_string(),
                    Some(b) => format!("{:.2} Gbit/s", b * 8.0 / 1e9),
                };
                let _ = writeln!(
                    s,
                    "| {n} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {wins} |",
                    ms(false, 10.0),
                    ms(true, 10.0),
                    ms(false, 1.0),
                    ms(true, 1.0)
                );
            }
        }
    }
    if !plots.is_empty() {
        let _ = writeln!(s, "\n## Plots\n");
        for p in plots {
            if let Some(name) = p.file_name() {
                let _ = writeln!(s, "![{0}]({0})", name.to_string_lossy());
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_grid_writes_its_report_reuses_its_runs_and_checks_the_byte_target() {
        let out = tempfile::tempdir().unwrap();
        let opts = DataParallelOptions {
            data: crate::repo_root().join("datasets/mnist-mini"),
            out: out.path().to_path_buf(),
            models: vec![Arch::Lenet300100],
            weights: vec!["float".into()],
            bits: vec![2],
            epochs: 1,
            ranks: 2,
            max_batches: Some(3),
            train_limit: Some(600),
            dimension: false,
            timing: None,
            report_only: false,
        };
        run(&opts).unwrap();
        let report = std::fs::read_to_string(out.path().join("DATA_PARALLEL.md")).unwrap();
        assert!(report.contains("| f32 | 32.0000 |"), "{report}");
        assert!(
            report.contains("| 2-bit d=512 clip 2.5σ | 2.0625 |"),
            "{report}"
        );
        assert!(report.contains("(target >= 15x): met"), "{report}");
        assert!(out
            .path()
            .join("convergence_lenet-300-100_float.png")
            .is_file());
        let kept = out.path().join("runs/lenet-300-100_float_f32.json");
        let first: RunResult = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        assert_eq!(first.losses.len(), 3);
        // A rerun with the same settings reuses the kept runs; other
        // settings train again.
        let before = std::fs::metadata(&kept).unwrap().modified().unwrap();
        run(&opts).unwrap();
        assert_eq!(
            std::fs::metadata(&kept).unwrap().modified().unwrap(),
            before
        );
        let longer = DataParallelOptions {
            max_batches: Some(4),
            bits: vec![],
            ..opts
        };
        run(&longer).unwrap();
        let second: RunResult = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
        assert_eq!(second.losses.len(), 4);
    }
}
