//! `qgrad train-lstm`, `qgrad generate` and the LSTM branch of `qgrad
//! eval`: quantized character LSTMs (METHOD §11) over qgrad-lstm.

use std::path::{Path, PathBuf};

use candle_core::Device;
use clap::Args;
use qgrad_data::TextCorpus;
use qgrad_lstm::{
    file, generate as sample, LstmConfig, LstmRun, Normalisation, Sampling, TrainOptions,
};
use serde_json::json;

use crate::commands::print_json;
use crate::failure::{Classify, CliResult, Failure};

#[derive(Args, Debug)]
pub struct TrainLstmArgs {
    /// The corpus, a text file [default: the shipped slice
    /// datasets/war-and-peace-mini/input.txt].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Hidden units.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Normalisation: none, weight, layer, batch (per-step statistics) or
    /// batch-shared.
    #[arg(long, default_value = "none")]
    norm: String,
    /// The gate matrices' quantizer: float, binary-connect, ter-connect,
    /// bwn, twn, lab, lat-approx, lat-exact, lat2-approx, lat2-exact,
    /// laq<m>[-log].
    #[arg(long, default_value = "float")]
    weights: String,
    /// One scale per row (output unit) instead of one per gate matrix.
    #[arg(long)]
    per_channel: bool,
    /// Epochs.
    #[arg(long, default_value_t = 200)]
    epochs: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Characters per sequence (truncated backpropagation through time).
    #[arg(long, default_value_t = 100)]
    seq_len: usize,
    /// Adam's learning rate.
    #[arg(long, default_value_t = 0.002)]
    lr: f64,
    /// Clip the global gradient norm to this.
    #[arg(long, default_value_t = 5.0)]
    grad_clip: f64,
    /// At most this many training batches per epoch.
    #[arg(long, value_name = "N")]
    train_batches: Option<usize>,
    /// Seed of the initial weights and of TerConnect's draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint after every epoch here; an existing checkpoint of the same
    /// run is resumed.
    #[arg(long, value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Write the trained model as a compressed file.
    #[arg(short, long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A compressed file holding a character LSTM (`qgrad train-lstm --out`).
    file: PathBuf,
    /// The text the sample continues.
    #[arg(long, default_value = "The ")]
    prompt: String,
    /// Characters to generate.
    #[arg(long, default_value_t = 500)]
    chars: usize,
    /// Seed of the draws (the same seed gives the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Softmax temperature (> 0; lower is more conservative).
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
}

fn default_text() -> CliResult<PathBuf> {
    qgrad_pipeline::data::find_datasets_folder("war-and-peace-mini")
        .map(|d| d.join("input.txt"))
        .ok_or_else(|| {
            Failure::usage(
                "no --text given and the shipped datasets/war-and-peace-mini was not found \
                 from the current directory",
            )
        })
}

pub fn train_lstm(args: TrainLstmArgs) -> CliResult<()> {
    let norm: Normalisation = args.norm.parse().usage("--norm")?;
    let weights = match args.weights.as_str() {
        "float" => None,
        m => Some(m.parse::<qgrad_scaled::Method>().usage("--weights")?),
    };
    let config = LstmConfig {
        hidden: args.hidden,
        seq_len: args.seq_len,
        batch: args.batch,
        norm,
        weights,
        per_channel: args.per_channel,
        lr: args.lr,
        grad_clip: args.grad_clip,
        epochs: args.epochs,
        seed: args.seed,
        train_chunks: args.train_batches,
        ..LstmConfig::default()
    };
    config.validate().usage("invalid settings")?;
    let text = match &args.text {
        Some(t) => t.clone(),
        None => default_text()?,
    };
    let corpus = TextCorpus::load(&text).input("cannot read the corpus")?;
    let split = corpus
        .split(args.batch, args.seq_len)
        .input(format!("cannot split {}", text.display()))?;
    let mut run = LstmRun::resume_or_new(
        &config,
        &corpus.vocab,
        &Device::Cpu,
        args.checkpoint.as_deref(),
    )
    .input("cannot resume")?;
    if let Some(e) = run.resumed_from {
        eprintln!("resuming after epoch {e}");
    }
    let options = TrainOptions {
        checkpoint: args.checkpoint.clone(),
        progress: !args.json,
    };
    // Progress on stderr as it happens, as `qgrad train` reports it: the
    // data and model are ready, then each epoch once evaluated and saved.
    let batches = config.batches_per_epoch(split.train.len());
    eprintln!(
        "training char-lstm ({}) for {} epochs: {batches} batches of {} x {} characters an epoch (seed {})",
        config.label(),
        config.epochs,
        config.batch,
        config.seq_len,
        config.seed
    );
    run.train_observed(&split, &options, &mut |r| eprintln!("{}", epoch_line(r)))
        .runtime("training failed")?;
    if !args.json {
        for r in &run.records {
            println!("{}", epoch_line(r));
        }
    }
    let test_bpc = run.bpc(&split.test).runtime("evaluation failed")?;
    let mut file_report = None;
    if let Some(out) = &args.out {
        let size =
            file::export(&mut run, out).runtime(format!("cannot write {}", out.display()))?;
        let mut loaded =
            file::load(out, &Device::Cpu).input(format!("cannot read back {}", out.display()))?;
        let file_bpc = loaded
            .run
            .bpc(&split.test)
            .runtime("evaluating the file failed")?;
        file_report = Some((out.clone(), size, file_bpc));
    }
    if args.json {
        return print_json(&json!({
            "config": config,
            "records": run.records,
            "test_bpc": test_bpc,
            "file": file_report.as_ref().map(|(p, s, b)| json!({
                "path": p, "bytes": s.file_bytes, "ratio": s.ratio, "test_bpc": b,
            })),
        }));
    }
    println!("test         {test_bpc:.4} bpc ({})", config.label());
    if let Some((path, size, bpc)) = file_report {
        println!(
            "file         {} ({} bytes, {:.2}x smaller than f32), test {bpc:.4} bpc from the file",
            path.display(),
            size.file_bytes,
            size.ratio
        );
    }
    Ok(())
}

/// One epoch's summary line.
fn epoch_line(r: &qgrad_lstm::EpochRecord) -> String {
    format!(
        "epoch {:>3}  lr {:.5}  train {:.3} bpc  valid {:.3} bpc  grad norm {:.2} (max {:.2}, {:.0} % clipped)  {:.0} chars/s",
        r.epoch + 1,
        r.lr,
        r.train_bpc,
        r.valid_bpc,
        r.grad_norm_mean,
        r.grad_norm_max,
        100.0 * r.clipped,
        r.chars_per_second
    )
}

pub fn generate(args: GenerateArgs) -> CliResult<()> {
    let mut loaded = file::load(&args.file, &Device::Cpu)
        .input(format!("cannot read {}", args.file.display()))?;
    let sampling = Sampling {
        chars: args.chars,
        temperature: args.temperature,
        seed: args.seed,
    };
    let text = sample(&mut loaded.run, args.prompt.as_bytes(), &sampling).usage("cannot sample")?;
    let mut out = args.prompt.into_bytes();
    out.extend(text);
    println!("{}", String::from_utf8_lossy(&out));
    Ok(())
}

/// `qgrad eval` of an LSTM file: test BPC of `text` (split as the model
/// was trained) from the file.
pub fn eval_lstm(
    model: &qgrad_csr::CompressedModel,
    path: &Path,
    text: Option<&Path>,
    json_out: bool,
) -> CliResult<()> {
    let mut loaded =
        file::from_model(model, &Device::Cpu).input(format!("{} cannot be run", path.display()))?;
    let text = match text {
        Some(t) => t.to_path_buf(),
        None => default_text()?,
    };
    let corpus =
        TextCorpus::load_with_vocab(&text, &loaded.run.vocab).input("cannot read the corpus")?;
    let c = &loaded.trained;
    let split = corpus
        .split(c.batch, c.seq_len)
        .input(format!("cannot split {}", text.display()))?;
    let bpc = loaded.run.bpc(&split.test).runtime("evaluation failed")?;
    if json_out {
        return print_json(&json!({
            "file": path,
            "model": "char-lstm",
            "config": loaded.trained,
            "text": text,
            "test_bpc": bpc,
            "file_bytes": loaded.size.file_bytes,
            "ratio": loaded.size.ratio,
        }));
    }
    println!(
        "model        char-lstm, hidden {}, {} weights, {} norm",
        c.hidden, loaded.method, c.norm
    );
    println!(
        "test         {bpc:.4} bpc ({} characters of {}, from the file)",
        split.test.len() * c.batch * c.seq_len,
        text.display()
    );
    println!(
        "ratio        {:.2}x  ({} bytes)",
        loaded.size.ratio, loaded.size.file_bytes
    );
    Ok(())
}
