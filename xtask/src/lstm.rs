//! `cargo xtask lstm`: the quantized-LSTM measurements of METHOD §11 and
//! §15 — test bits per character of a one-layer character LSTM on War and
//! Peace for every weight quantizer × normalisation, beside the authors'
//! poster; validation BPC per epoch; the gradient-norm traces of float,
//! BinaryConnect and BinaryConnect with layer norm; and the spectral norms
//! of the trained gate matrices.
//!
//! Every run lives in its own folder under `--out/runs/<label>`: an epoch
//! checkpoint while it trains (a killed grid resumes there) and
//! `result.json` when it is done (a finished run is not run again unless its
//! settings changed). `LSTM.md`, `lstm.json` and the plots are written from
//! whatever runs are finished.
//!
//! # Decisions
//!
//! * The budget: the reference recipe (METHOD §11: sequences of 100, batch
//!   64, Adam 0.002, gradient norm clipped at 5, × 0.98 per epoch after
//!   epoch 10) shortened to `--epochs` full passes over the training part
//!   and `--hidden` units, the same for every row; the report states both.
//! * "Batch norm" in the table is batch norm with per-step statistics (the
//!   poster's "separate").
//! * The sample in each result is 200 characters after the prompt "The ",
//!   temperature 0.8, seed 0.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use qgrad_data::TextCorpus;
use qgrad_lstm::{
    gate_spectral_norms, generate, EpochRecord, LstmConfig, LstmError, LstmRun, Normalisation,
    Sampling, SpectralNorm, TrainOptions,
};
use qgrad_scaled::Method;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::plot::{line_chart, Curve};

/// The authors' poster (METHOD §15): test BPC, hidden 512; rows float,
/// BinaryConnect, TerConnect; columns none, weight, layer, batch.
pub const POSTER: [(&str, [f64; 4]); 3] = [
    ("float", [1.72, 1.73, 1.69, 1.72]),
    ("binary-connect", [4.24, 1.74, 1.69, 1.72]),
    ("ter-connect", [6.35, 1.72, 1.67, 1.71]),
];

/// The table's columns.
pub const COLUMNS: [Normalisation; 4] = [
    Normalisation::None,
    Normalisation::Weight,
    Normalisation::Layer,
    Normalisation::BatchPerStep,
];

/// What to run.
#[derive(Debug, Clone)]
pub struct LstmOptions {
    /// The corpus (a text file).
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// The runs: weights (`None`: float) × normalisation.
    pub runs: Vec<(Option<Method>, Normalisation)>,
    /// Hidden units.
    pub hidden: usize,
    /// Epochs (full passes over the training part).
    pub epochs: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// Characters per sequence.
    pub seq_len: usize,
    /// At most this many training batches per epoch (a smoke-test budget).
    pub train_chunks: Option<usize>,
    /// Seed of every run.
    pub seed: u64,
    /// Only rewrite the report from finished runs.
    pub report_only: bool,
    /// Progress bars.
    pub progress: bool,
}

impl LstmOptions {
    /// The poster's grid (float, BinaryConnect, TerConnect × none, weight,
    /// layer, batch) followed by the loss-aware quantizers and their
    /// baselines (LAB, LAT exact, BWN, TWN) without and with layer norm.
    pub fn default_runs() -> Vec<(Option<Method>, Normalisation)> {
        let mut runs = Vec::new();
        for w in [None, Some(Method::BinaryConnect), Some(Method::TerConnect)] {
            for n in COLUMNS {
                runs.push((w, n));
            }
        }
        for w in [Method::Lab, Method::LatExact, Method::Bwn, Method::Twn] {
            for n in [Normalisation::None, Normalisation::Layer] {
                runs.push((Some(w), n));
            }
        }
        runs
    }

    fn config(&self, weights: Option<Method>, norm: Normalisation) -> LstmConfig {
        LstmConfig {
            hidden: self.hidden,
            seq_len: self.seq_len,
            batch: self.batch,
            norm,
            weights,
            epochs: self.epochs,
            seed: self.seed,
            train_chunks: self.train_chunks,
            ..LstmConfig::default()
        }
    }
}

/// One finished run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LstmResult {
    /// `<weights>-<norm>`.
    pub label: String,
    /// The run's settings.
    pub config: LstmConfig,
    /// Per epoch.
    pub records: Vec<EpochRecord>,
    /// Test BPC of the final model (`None`: training diverged).
    pub test_bpc: Option<f64>,
    /// Why training stopped early, if it did.
    pub diverged: Option<String>,
    /// The eight gate matrices' spectral norms (as the forward pass uses
    /// them: quantized, after weight norm).
    pub spectral: Vec<SpectralNorm>,
    /// Global gradient norm of every step.
    pub grad_norms: Vec<f32>,
    /// A sample of the final model.
    pub sample: String,
    /// The processor it ran on.
    pub cpu: String,
}

fn weights_name(w: Option<Method>) -> String {
    w.map_or("float".into(), |m| m.to_string())
}

fn run_one(
    opts: &LstmOptions,
    corpus: &TextCorpus,
    split: &qgrad_data::TextSplit,
    config: &LstmConfig,
    dir: &Path,
) -> Result<LstmResult> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let checkpoint = dir.join("checkpoint.safetensors");
    let mut run = LstmRun::resume_or_new(config, &corpus.vocab, &Device::Cpu, Some(&checkpoint))?;
    if let Some(e) = run.resumed_from {
        eprintln!("{}: resuming after epoch {e}", config.label());
    }
    let options = TrainOptions {
        checkpoint: Some(checkpoint),
        progress: opts.progress,
    };
    let diverged = match run.train(split, &options) {
        Ok(_) => None,
        Err(e @ LstmError::Diverged { .. }) => Some(e.to_string()),
        Err(e) => return Err(e.into()),
    };
    let test_bpc = match diverged {
        None => Some(run.bpc(&split.test)?),
        Some(_) => None,
    };
    let weights = run.eval_weights()?;
    let spectral = gate_spectral_norms(&run.model, &weights)?;
    let sample = match diverged {
        None => {
            let s = Sampling {
                chars: 200,
                temperature: 0.8,
                seed: 0,
            };
            String::from_utf8_lossy(&generate(&mut run, b"The ", &s)?).into_owned()
        }
        Some(_) => String::new(),
    };
    Ok(LstmResult {
        label: config.label(),
        config: config.clone(),
        records: run.records.clone(),
        test_bpc,
        diverged,
        spectral,
        grad_norms: run.grad_norms.clone(),
        sample,
        cpu: crate::cpu_model(),
    })
}

/// Runs the grid (skipping finished runs) and writes the report.
pub fn run(opts: &LstmOptions) -> Result<Vec<LstmResult>> {
    let corpus = TextCorpus::load(&opts.data)?;
    let split = corpus.split(opts.batch, opts.seq_len)?;
    let mut results = Vec::new();
    for &(w, n) in &opts.runs {
        let config = opts.config(w, n);
        config.validate()?;
        let dir = opts.out.join("runs").join(config.label());
        let file = dir.join("result.json");
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(r) = serde_json::from_str::<LstmResult>(&text) {
                if r.config == config {
                    results.push(r);
                    continue;
                }
            }
        }
        if opts.report_only {
            continue;
        }
        eprintln!(
            "{}: {} epochs of {} batches, hidden {} ({})",
            config.label(),
            config.epochs,
            config
                .train_chunks
                .map_or(split.train.len(), |c| c.min(split.train.len())),
            config.hidden,
            crate::cpu_model()
        );
        let result = run_one(opts, &corpus, &split, &config, &dir)?;
        write_atomic(&file, serde_json::to_string_pretty(&result)?.as_bytes())?;
        results.push(result);
        report(opts, &results, split.train.len())?;
    }
    report(opts, &results, split.train.len())?;
    Ok(results)
}

fn find<'a>(results: &'a [LstmResult], w: &str, n: Normalisation) -> Option<&'a LstmResult> {
    results
        .iter()
        .find(|r| weights_name(r.config.weights) == w && r.config.norm == n)
}

fn bpc_cell(r: Option<&LstmResult>) -> String {
    match r {
        None => "–".into(),
        Some(r) => match r.test_bpc {
            Some(b) => format!("{b:.3}"),
            None => "diverged".into(),
        },
    }
}

fn report(opts: &LstmOptions, results: &[LstmResult], train_batches: usize) -> Result<()> {
    std::fs::create_dir_all(opts.out.join("plots"))?;
    write_atomic(
        &opts.out.join("lstm.json"),
        serde_json::to_string_pretty(results)?.as_bytes(),
    )?;
    let mut md = String::new();
    let batches = opts
        .train_chunks
        .map_or(train_batches, |c| c.min(train_batches));
    writeln!(md, "# Quantized character LSTMs (METHOD §11, §15)\n")?;
    writeln!(
        md,
        "One-layer LSTM, hidden {}, on `{}`: {} epoch(s) of {} batches of {} × {} characters \
         (the same for every row), Adam 0.002, gradient norm clipped at 5. Test bits per \
         character of the final model (ours) beside the authors' poster (hidden 512, their \
         full schedule). Processor: {}.\n",
        opts.hidden,
        opts.data.display(),
        opts.epochs,
        batches,
        opts.batch,
        opts.seq_len,
        results
            .first()
            .map_or_else(crate::cpu_model, |r| r.cpu.clone()),
    )?;
    writeln!(
        md,
        "| weights | none | weight norm | layer norm | batch norm | poster: none / weight / layer / batch |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    let mut rows: Vec<String> = Vec::new();
    for r in results {
        let w = weights_name(r.config.weights);
        if !rows.contains(&w) {
            rows.push(w);
        }
    }
    for w in &rows {
        let cells: Vec<String> = COLUMNS
            .iter()
            .map(|&n| bpc_cell(find(results, w, n)))
            .collect();
        let poster = POSTER
            .iter()
            .find(|(p, _)| p == w)
            .map_or("".into(), |(_, v)| {
                v.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            });
        writeln!(md, "| {w} | {} | {poster} |", cells.join(" | "))?;
    }
    writeln!(md, "\n## Runs\n")?;
    writeln!(
        md,
        "| run | test BPC | best valid BPC | train BPC (last epoch) | mean grad norm | clipped | s/epoch | chars/s |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- | --- |")?;
    for r in results {
        let last = r.records.last();
        let best = r
            .records
            .iter()
            .map(|e| e.valid_bpc)
            .fold(f64::INFINITY, f64::min);
        let n = r.records.len().max(1) as f64;
        writeln!(
            md,
            "| {} | {} | {:.3} | {} | {:.2} | {:.0} % | {:.1} | {:.0} |",
            r.label,
            bpc_cell(Some(r)),
            best,
            last.map_or("–".into(), |e| format!("{:.3}", e.train_bpc)),
            r.records.iter().map(|e| e.grad_norm_mean).sum::<f64>() / n,
            100.0 * r.records.iter().map(|e| e.clipped).sum::<f64>() / n,
            r.records.iter().map(|e| e.seconds).sum::<f64>() / n,
            r.records.iter().map(|e| e.chars_per_second).sum::<f64>() / n,
        )?;
    }
    writeln!(
        md,
        "\n## Spectral norms of the recurrent gate matrices (σ_max of W_h per gate; √H = {:.1})\n",
        (opts.hidden as f64).sqrt()
    )?;
    writeln!(md, "| run | input | forget | cell | output |")?;
    writeln!(md, "| --- | --- | --- | --- | --- |")?;
    for r in results {
        let cells: Vec<String> = ["input", "forget", "cell", "output"]
            .iter()
            .map(|g| {
                r.spectral
                    .iter()
                    .find(|s| s.matrix == format!("wh.{g}"))
                    .map_or("–".into(), |s| format!("{:.2}", s.value))
            })
            .collect();
        writeln!(md, "| {} | {} |", r.label, cells.join(" | "))?;
    }
    writeln!(md, "\n## Samples (prompt \"The \", temperature 0.8)\n")?;
    for r in results.iter().filter(|r| !r.sample.is_empty()) {
        writeln!(
            md,
            "- **{}**: `{}`",
            r.label,
            r.sample.replace('\n', " ").replace('`', "'")
        )?;
    }
    writeln!(
        md,
        "\nPlots: `plots/lstm-valid-<weights>.png` (validation BPC per epoch), \
         `plots/lstm-grad-norms.png` (gradient-norm traces)."
    )?;
    write_atomic(&opts.out.join("LSTM.md"), md.as_bytes())?;

    // Validation BPC per epoch, one chart per weight kind.
    for w in &rows {
        let curves: Vec<Curve> = results
            .iter()
            .filter(|r| &weights_name(r.config.weights) == w)
            .map(|r| Curve {
                label: r.config.norm.to_string(),
                points: r
                    .records
                    .iter()
                    .map(|e| ((e.epoch + 1) as f64, e.valid_bpc))
                    .collect(),
            })
            .collect();
        if curves.iter().all(|c| c.points.is_empty()) {
            continue;
        }
        let y_max = curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .fold(0f64, f64::max)
            .min(8.0);
        line_chart(
            &opts.out.join("plots").join(format!("lstm-valid-{w}.png")),
            &format!("{w}: validation BPC per epoch"),
            ("epoch", "validation bits per character"),
            &curves,
            (0.0, y_max * 1.05 + 0.1),
            crate::plot::LegendAt::UpperRight,
        )?;
    }
    // Gradient-norm traces of float, BinaryConnect and BinaryConnect + LN.
    let traces: Vec<Curve> = [
        ("float", Normalisation::None),
        ("binary-connect", Normalisation::None),
        ("binary-connect", Normalisation::Layer),
    ]
    .iter()
    .filter_map(|&(w, n)| find(results, w, n))
    .map(|r| Curve {
        label: r.label.clone(),
        points: r
            .grad_norms
            .iter()
            .enumerate()
            .map(|(i, &g)| (i as f64, f64::from(g)))
            .collect(),
    })
    .collect();
    if !traces.is_empty() {
        let y_max = traces
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .fold(0f64, f64::max);
        line_chart(
            &opts.out.join("plots").join("lstm-grad-norms.png"),
            "global gradient norm per step (before clipping at 5)",
            ("step", "gradient norm"),
            &traces,
            (0.0, y_max * 1.05 + 0.1),
            crate::plot::LegendAt::UpperRight,
        )?;
    }
    Ok(())
}
