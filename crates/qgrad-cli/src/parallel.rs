//! `qgrad train-parallel`: data-parallel training with quantized gradients
//! (METHOD §12) on MPI ranks or on threads of this process, over the
//! pipeline's `run_data_parallel`.

use std::fmt::Write as _;
use std::time::Duration;

#[cfg(feature = "mpi")]
use qgrad_collective::{Collective, CollectiveError};
use qgrad_collective::{GradientExchange, StochasticQuantizer};
use qgrad_csr::LayoutChoice;
use qgrad_data::Dataset;
use qgrad_models::methods::LossAwareOptions;
use qgrad_models::train::OptimizerKind;
#[cfg(feature = "mpi")]
use qgrad_models::{ModelsError, TrainHook};
use qgrad_pipeline::{
    compress_loss_aware_state, default_device, export_and_evaluate, run_on_threads,
    DataParallelOutcome, DataParallelRun, ExportOptions, ParallelWeights,
};
#[cfg(feature = "mpi")]
use qgrad_pipeline::{run_data_parallel, PipelineError};
use serde_json::json;

use crate::commands::{load_data, pct, print_json, training_config, EpochPrinter};
use crate::failure::{Classify, CliResult, Failure};
use crate::ParallelArgs;

/// Where the ranks are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Threads(usize),
    Mpi,
}

fn parse_engine(s: &str) -> CliResult<Engine> {
    if s == "mpi" {
        return Ok(Engine::Mpi);
    }
    match s.strip_prefix("threads:").map(str::parse::<usize>) {
        Some(Ok(n)) if n >= 1 => Ok(Engine::Threads(n)),
        _ => Err(Failure::usage(format!(
            "unknown --engine '{s}' (expected mpi or threads:N with N >= 1)"
        ))),
    }
}

fn exchange_of(args: &ParallelArgs) -> CliResult<GradientExchange> {
    match args.grad_bits {
        32 if args.clip.is_some() => Err(Failure::usage(
            "--clip applies to quantized gradients (--grad-bits 2..=8), not to f32",
        )),
        32 => Ok(GradientExchange::Float),
        bits => Ok(GradientExchange::Quantized(
            StochasticQuantizer::new(bits, args.bucket, args.clip)
                .usage("invalid gradient quantizer")?,
        )),
    }
}

/// The training error under a pipeline error, if it is one.
#[cfg(feature = "mpi")]
fn models_cause(e: &PipelineError) -> Option<&ModelsError> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(m) = s.downcast_ref::<ModelsError>() {
            return Some(m);
        }
        source = s.source();
    }
    None
}

/// Whether every rank sees this failure at the same step (settings that
/// differ, a diverged run): then each rank reports it and ends normally.
/// Any other failure is this rank's alone, and under MPI it aborts the job
/// so that the others do not wait for it.
#[cfg(feature = "mpi")]
fn seen_by_every_rank(e: &PipelineError) -> bool {
    match models_cause(e) {
        Some(m) => matches!(
            m,
            ModelsError::Diverged(_)
                | ModelsError::Collective(
                    CollectiveError::ConfigMismatch { .. } | CollectiveError::NonFinite { .. }
                )
        ),
        None => matches!(e, PipelineError::Usage(_)),
    }
}

struct Prepared {
    run: DataParallelRun,
    train: Dataset,
    test: Dataset,
}

fn prepare(args: &ParallelArgs) -> CliResult<Prepared> {
    let arch = args.training.model;
    let mut config = training_config(arch, &args.training)?;
    if args.training.optimizer.is_none() {
        // METHOD §12's experiments (and the loss-aware weights) use Adam,
        // at Adam's usual rate unless --lr says otherwise.
        config.optimizer = OptimizerKind::ADAM;
        if args.training.lr.is_none() {
            config.lr = 0.001;
        }
    }
    config.checkpoint_dir = args.checkpoint_dir.clone();
    let weights = match args.weights.as_str() {
        "float" => ParallelWeights::Float,
        name => {
            let quantizer = name
                .parse::<qgrad_scaled::Method>()
                .usage("invalid --weights (float or a quantizer of `quantize loss-aware`)")?;
            ParallelWeights::LossAware(LossAwareOptions {
                seed: config.seed,
                ..LossAwareOptions::new(quantizer)
            })
        }
    };
    if args.out.is_some() && matches!(weights, ParallelWeights::Float) {
        return Err(Failure::usage(
            "--out writes quantized weights: give --weights a quantizer (lab, laq3, twn, ...)",
        ));
    }
    let exchange = exchange_of(args)?;
    let (train, test) = load_data(arch, &args.data)?;
    Ok(Prepared {
        run: DataParallelRun {
            arch,
            config,
            weights,
            exchange,
            device: default_device(),
        },
        train,
        test,
    })
}

#[cfg(feature = "mpi")]
fn run_rank(
    prepared: &Prepared,
    group: &mut dyn Collective,
    report: bool,
) -> Result<DataParallelOutcome, PipelineError> {
    let mut printer = EpochPrinter;
    let mut extra: Vec<&mut dyn TrainHook> = Vec::new();
    if report {
        extra.push(&mut printer);
    }
    run_data_parallel(
        prepared.run.clone(),
        (&prepared.train, &prepared.test),
        group,
        &mut extra,
    )
}

pub fn train_parallel(args: ParallelArgs) -> CliResult<()> {
    let engine = parse_engine(&args.engine)?;
    if !(args.peer_timeout.is_finite() && args.peer_timeout > 0.0) {
        return Err(Failure::usage(
            "--peer-timeout must be a positive number of seconds",
        ));
    }
    let timeout = Duration::from_secs_f64(args.peer_timeout);
    match engine {
        Engine::Threads(n) => {
            let prepared = prepare(&args)?;
            announce(&args, &prepared, n);
            let outcome = run_on_threads(
                &prepared.run,
                (&prepared.train, &prepared.test),
                n,
                timeout,
                &mut [&mut EpochPrinter],
            )?;
            finish(&args, &outcome, &prepared.test)
        }
        Engine::Mpi => run_mpi(&args, timeout),
    }
}

#[cfg(feature = "mpi")]
fn run_mpi(args: &ParallelArgs, timeout: Duration) -> CliResult<()> {
    let mut world = qgrad_collective::MpiWorld::init(timeout).runtime("cannot start MPI")?;
    let (rank, size) = (world.rank(), world.size());
    let tag = |f: Failure| Failure::new(f.code, f.error.context(format!("rank {rank} of {size}")));
    let prepared = match prepare(args) {
        Ok(p) => p,
        Err(f) => {
            let f = tag(f);
            f.print();
            // Bad options or data on this rank only: end the job now.
            world.abort(i32::from(f.code));
        }
    };
    if rank == 0 {
        announce(args, &prepared, size);
    }
    match run_rank(&prepared, &mut world, rank == 0) {
        Ok(outcome) if rank == 0 => finish(args, &outcome, &prepared.test),
        Ok(_) => Ok(()),
        Err(e) => {
            let every = seen_by_every_rank(&e);
            let mut f = tag(e.into());
            f.print();
            if size > 1 {
                if !every {
                    world.abort(i32::from(f.code));
                }
                // Every rank has the error: wait until all have printed it,
                // since mpirun ends the job as soon as one rank exits.
                let _ = world.all_gather(&[0], &mut Vec::new());
            }
            f.reported = true;
            Err(f)
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_: &ParallelArgs, _: Duration) -> CliResult<()> {
    Err(Failure::usage(
        "this qgrad was built without MPI: build it with `cargo build --release -p qgrad-cli --features mpi` \
         (needs an MPI library such as Debian's libopenmpi-dev, and libclang-dev), \
         or simulate the ranks with --engine threads:N",
    ))
}

fn announce(args: &ParallelArgs, prepared: &Prepared, ranks: usize) {
    let run = &prepared.run;
    if let Some(dir) = &run.config.checkpoint_dir {
        if dir
            .join(qgrad_models::checkpoint::CHECKPOINT_FILE)
            .is_file()
        {
            eprintln!("resuming the checkpoint in {}", dir.display());
        }
    }
    eprintln!(
        "training {} for {} epochs with {} weights on {ranks} rank(s), {} gradients, global batch {} (seed {})",
        run.arch,
        run.config.epochs,
        args.weights,
        run.exchange.describe(),
        run.config.batch_size,
        run.config.seed
    );
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

fn finish(args: &ParallelArgs, o: &DataParallelOutcome, test: &Dataset) -> CliResult<()> {
    if let Some(r) = o.resumed {
        match r.from_ranks {
            Some(k) if k != o.ranks => eprintln!(
                "resumed after epoch {} from a checkpoint written by {k} rank(s), continued on {}",
                r.after_epoch, o.ranks
            ),
            Some(k) => eprintln!(
                "resumed after epoch {} ({k} rank(s), as before)",
                r.after_epoch
            ),
            None => eprintln!(
                "resumed after epoch {} from a checkpoint of a single-process run",
                r.after_epoch
            ),
        }
    }
    if let Some(path) = &args.steps_csv {
        let mut csv = String::from(
            "epoch,step,loss,compute_seconds,exchange_seconds,encode_seconds,decode_seconds,bytes_sent\n",
        );
        for s in &o.steps {
            let _ = writeln!(
                csv,
                "{},{},{},{:.6},{:.6},{:.6},{:.6},{}",
                s.epoch,
                s.step,
                s.loss,
                s.compute_seconds,
                s.exchange_seconds,
                s.encode_seconds,
                s.decode_seconds,
                s.bytes_sent
            );
        }
        qgrad_csr::write_bytes_atomically(path, csv.as_bytes())
            .runtime(format!("cannot write {}", path.display()))?;
    }
    let file = match (&args.out, &o.loss_aware) {
        (Some(path), Some(hook)) => {
            let options = json!({
                "weights": args.weights,
                "gradients": o.exchange,
                "ranks": o.ranks,
                "epochs": o.config.epochs,
                "lr": o.config.lr,
                "batch_size": o.config.batch_size,
            });
            let model = compress_loss_aware_state(hook, &o.state, &o.config, options)?;
            eprintln!(
                "writing {}, evaluating it in candle and with integer kernels ...",
                path.display()
            );
            let exported = export_and_evaluate(
                &model,
                path,
                test,
                &ExportOptions {
                    act_bits: args.act_bits,
                    layout: LayoutChoice::Auto,
                    device: default_device(),
                    run_file: true,
                },
            )?;
            Some((path.clone(), exported))
        }
        _ => None,
    };
    let measured: Vec<u64> = o.steps.iter().map(|s| s.bytes_sent).collect();
    let sent_per_step = mean(measured.iter().map(|&b| b as f64));
    let compute = mean(o.steps.iter().map(|s| s.compute_seconds));
    let exchange_time = mean(o.steps.iter().map(|s| s.exchange_seconds));
    let encode_time = mean(o.steps.iter().map(|s| s.encode_seconds));
    let decode_time = mean(o.steps.iter().map(|s| s.decode_seconds));
    let accuracy = o.state.history.last().map(|e| e.test_accuracy);
    let exchange = o.exchange.describe();
    if args.json {
        return print_json(&json!({
            "model": o.state.network.arch.name(),
            "weights": args.weights,
            "gradients": exchange,
            "bits_per_element": o.exchange.bits_per_element(),
            "engine": o.engine,
            "ranks": o.ranks,
            "resumed": o.resumed,
            "epochs": o.state.history,
            "test_accuracy": accuracy,
            "steps": o.steps.len(),
            "bytes_per_step_measured": sent_per_step,
            "bytes_per_step_format": o.bytes_per_step,
            "f32_bytes_per_step": o.f32_bytes_per_step,
            "compute_seconds_per_step": compute,
            "exchange_seconds_per_step": exchange_time,
            "encode_seconds_per_step": encode_time,
            "decode_seconds_per_step": decode_time,
            "weights_sha256": o.digest,
            "file": file.as_ref().map(|(path, e)| json!({
                "path": path,
                "bytes": e.size.file_bytes,
                "ratio": e.size.ratio,
                "candle_accuracy": e.candle.accuracy,
                "file_accuracy": e.file.as_ref().map(|f| f.accuracy),
            })),
        }));
    }
    println!("model             {}", o.state.network.arch);
    println!("weights           {}", args.weights);
    println!(
        "gradients         {exchange} ({:.4} bits per element)",
        o.exchange.bits_per_element()
    );
    println!("engine            {}", o.engine);
    if let Some(a) = accuracy {
        println!("test accuracy     {}", pct(a));
    }
    if o.ranks > 1 || o.bytes_per_step != o.f32_bytes_per_step {
        println!(
            "sent per step     {sent_per_step:.0} bytes per rank, measured at the collective (f32 all-reduce of the same gradients: {} bytes, {:.1}x more)",
            o.f32_bytes_per_step,
            o.f32_bytes_per_step as f64 / sent_per_step.max(1.0)
        );
    }
    println!(
        "time per step     {:.2} ms compute + {:.2} ms exchange, of which {:.2} ms encoding and {:.2} ms decoding (rank 0, {} steps)",
        compute * 1e3,
        exchange_time * 1e3,
        encode_time * 1e3,
        decode_time * 1e3,
        o.steps.len()
    );
    println!("weights sha256    {}", o.digest);
    if let Some((path, e)) = &file {
        println!(
            "file              {} ({} bytes, {:.2}x smaller than f32)",
            path.display(),
            e.size.file_bytes,
            e.size.ratio
        );
        println!("quantized (candle) {}", pct(e.candle.accuracy));
        if let Some(f) = &e.file {
            println!("from the file     {}", pct(f.accuracy));
        }
    }
    Ok(())
}
