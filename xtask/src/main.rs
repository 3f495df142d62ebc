//! `cargo xtask`: see the library docs (`xtask/src/lib.rs`).

mod bench_e2e;
mod bench_train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use xtask::download::{self, DownloadOptions, Source, MIRROR_ENV};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "qgrad project automation", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fetch MNIST and/or CIFAR-10 into datasets/, verified against the published checksums.
    Download(DownloadArgs),
    /// Train the float baselines, run post-training, in-training and combined
    /// quantization and the trade-off sweep; write REPORT.md, results.json,
    /// results.csv and plots.
    Reproduce(ReproduceArgs),
    /// The accuracy–compression sweep (bit-width lists, clustering methods,
    /// split fractions) with its Pareto front; same outputs as reproduce.
    Sweep(ReproduceArgs),
    /// Re-render REPORT.md and the plots from an existing results.json.
    Report {
        /// The output folder of a reproduce or sweep run.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Side-by-side training benchmark against PyTorch.
    BenchTrain(bench_train::BenchTrainArgs),
    /// Continual learning by growing a pruned MLP (METHOD §14): split MNIST
    /// into five tasks, random growth against internal preferential
    /// attachment; CONTINUAL.md and continual.json.
    Continual {
        /// MNIST folder [default: datasets/mnist-mini].
        #[arg(long, value_name = "DIR")]
        data: Option<PathBuf>,
        /// The output folder.
        #[arg(long, value_name = "DIR", default_value = "runs/continual")]
        out: PathBuf,
        /// Seeds, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// New connections per round.
        #[arg(long, default_value_t = 4000)]
        grow: usize,
        /// Rounds per task at most.
        #[arg(long, default_value_t = 8)]
        max_rounds: usize,
        /// A task's target accuracy (over its two classes).
        #[arg(long, default_value_t = 0.97)]
        target: f64,
        /// Training images per task (default: all of them).
        #[arg(long)]
        train_per_task: Option<usize>,
    },
    /// Data-parallel training with quantized gradients (METHOD §12): the
    /// accuracy and bytes of f32 against m-bit gradients (with and without
    /// clipping, float and loss-aware weights), convergence curves, narrow
    /// against wide layers, and with --timing the time per step under
    /// mpirun at 1, 2 and 4 ranks with a projection to 8–64 machines;
    /// DATA_PARALLEL.md, results.json and plots.
    DataParallel(DataParallelArgs),
    /// Quantized character LSTMs with normalisation (METHOD §11): test BPC
    /// for every weight quantizer × normalisation on War and Peace beside
    /// the authors' poster, validation curves, gradient-norm traces and
    /// spectral norms; LSTM.md, lstm.json and plots.
    Lstm(LstmArgs),
    /// The structured-sparsity design sweep (METHOD §9): MLPs (or, with
    /// --cifar, the CIFAR-10 CNN) under block masks with k_w-bit weights
    /// and k_a-bit PACT activations, each run from its file; Pareto fronts by total and by weight memory; STRUCTURED.md,
    /// structured.json and plots.
    Structured(StructuredArgs),
    /// Beyond the second thesis: a finished structured sweep's MLP designs
    /// against the accumulated-gradient methods (post-training, combined)
    /// on the same shapes, recipe and budget, at equal file size and at
    /// equal inference time; VERSUS.md, versus.json, timings.json and one
    /// two-panel plot.
    Versus(VersusArgs),
    /// The power law of pruned networks (METHOD §14) over compressed files,
    /// with a random-mask control: POWERLAW.md, powerlaw.json and one
    /// log-log CCDF plot per file.
    Powerlaw {
        /// Compressed model files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The output folder.
        #[arg(long, value_name = "DIR", default_value = "runs/powerlaw")]
        out: PathBuf,
    },
    /// The accuracy-against-file-size curve of compressed files, one line
    /// per series, each point measured from its file (size on disk, accuracy
    /// by the integer kernels on the whole test set): CURVE.md, curve.json,
    /// curve.png.
    Curve {
        /// Series as LABEL=FILE,FILE,... (repeat for several lines).
        #[arg(required = true, value_name = "LABEL=FILES")]
        series: Vec<xtask::curve::Series>,
        /// The data set folder of the files' networks (MNIST or CIFAR-10).
        #[arg(long, value_name = "DIR")]
        data: PathBuf,
        /// The plot's title.
        #[arg(long, default_value = "Accuracy against file size")]
        title: String,
        /// The output folder.
        #[arg(long, value_name = "DIR", default_value = "runs/curve")]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct StructuredArgs {
    /// MNIST folder [default: datasets/mnist when present, else the shipped
    /// subset datasets/mnist-mini]; with --cifar, CIFAR-10's.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The output folder.
    #[arg(long, value_name = "DIR", default_value = "runs/structured")]
    out: PathBuf,
    /// The small grid of `reproduce --quick` instead of the full one.
    #[arg(long)]
    quick: bool,
    /// The CIFAR-10 CNN grid (cnn<c>-… designs) instead of the MNIST MLPs;
    /// --data is then CIFAR-10's folder [default: datasets/cifar10].
    #[arg(long, conflicts_with = "quick")]
    cifar: bool,
    /// Only these designs (w<width>x<depth>-kw<bits>-ka<bits>-c<compression>
    /// or cnn<channels>-kw<bits>-ka<bits>-c<compression>, comma-separated)
    /// instead of the grid.
    #[arg(long, value_delimiter = ',')]
    designs: Vec<String>,
    /// Epochs per design.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// At most this many training images.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Seed of initialisation, masks and batches.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only rewrite the report from the finished designs.
    #[arg(long)]
    report_only: bool,
    /// The initial PACT clip of every layer.
    #[arg(long, default_value_t = xtask::structured::DEFAULT_CLIP)]
    clip: f32,
}

#[derive(clap::Args, Debug)]
struct VersusArgs {
    /// MNIST folder [default: datasets/mnist when present, else the shipped
    /// subset datasets/mnist-mini].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The finished `cargo xtask structured` sweep.
    #[arg(long, value_name = "DIR", default_value = "runs/structured")]
    sweep: PathBuf,
    /// The output folder.
    #[arg(long, value_name = "DIR", default_value = "runs/versus")]
    out: PathBuf,
    /// MLP shapes of the accumulated-gradient methods (w<width>x<depth>,
    /// comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "w256x2,w512x2")]
    shapes: Vec<String>,
    /// Test images per latency pass.
    #[arg(long, default_value_t = 1000)]
    timing_images: usize,
    /// Build and evaluate the points only (keep the earlier timings): for
    /// when other work is running.
    #[arg(long)]
    skip_timing: bool,
}

fn mnist_default(root: &std::path::Path) -> PathBuf {
    let full = root.join("datasets/mnist");
    if full.join("train-images-idx3-ubyte.gz").is_file()
        || full.join("train-images-idx3-ubyte").is_file()
    {
        full
    } else {
        root.join("datasets/mnist-mini")
    }
}

fn run_versus(a: VersusArgs) -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let data = a.data.unwrap_or_else(|| mnist_default(&root));
    let shapes = a
        .shapes
        .iter()
        .map(|s| {
            let (w, d) = s
                .trim()
                .strip_prefix('w')
                .and_then(|x| x.split_once('x'))
                .and_then(|(w, d)| Some((w.parse().ok()?, d.parse().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("shape '{s}': expected w<width>x<depth>"))?;
            let net = xtask::structured::Net::Mlp { width: w, depth: d };
            net.arch()?;
            Ok(net)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.timing_images == 0 {
        anyhow::bail!("--timing-images must be at least 1");
    }
    let opts = xtask::versus::VersusOptions {
        data,
        sweep: a.sweep,
        out: a.out.clone(),
        shapes,
        timing_images: a.timing_images,
        skip_timing: a.skip_timing,
        progress: true,
    };
    xtask::versus::run(&opts)?;
    println!("wrote {}", a.out.join("VERSUS.md").display());
    Ok(())
}

fn run_structured(a: StructuredArgs) -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let data = a.data.unwrap_or_else(|| {
        if a.cifar {
            root.join("datasets/cifar10")
        } else {
            mnist_default(&root)
        }
    });
    let designs = if a.designs.is_empty() && a.cifar {
        xtask::structured::cnn_designs()
    } else if a.designs.is_empty() {
        xtask::structured::designs(a.quick)
    } else {
        a.designs
            .iter()
            .map(|s| s.trim().parse())
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let opts = xtask::structured::SweepOptions {
        data,
        out: a.out.clone(),
        designs,
        epochs: a.epochs,
        train_limit: a.train_limit,
        seed: a.seed,
        report_only: a.report_only,
        progress: true,
        clip: a.clip,
    };
    xtask::structured::run(&opts)?;
    println!("wrote {}", a.out.join("STRUCTURED.md").display());
    Ok(())
}

#[derive(clap::Args, Debug)]
struct LstmArgs {
    /// The corpus [default: datasets/war-and-peace/input.txt when present,
    /// else the shipped slice datasets/war-and-peace-mini/input.txt].
    #[arg(long, value_name = "FILE")]
    data: Option<PathBuf>,
    /// The output folder.
    #[arg(long, value_name = "DIR", default_value = "runs/lstm")]
    out: PathBuf,
    /// Runs as WEIGHTS:NORM, comma-separated (weights: float or a quantizer;
    /// norm: none, weight, layer, batch, batch-shared) [default: float,
    /// binary-connect, ter-connect × none, weight, layer, batch, then lab,
    /// lat-exact, bwn, twn × none, layer].
    #[arg(long, value_delimiter = ',')]
    runs: Vec<String>,
    /// Hidden units.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Epochs per run.
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Sequences per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Characters per sequence.
    #[arg(long, default_value_t = 100)]
    seq_len: usize,
    /// At most this many training batches per epoch.
    #[arg(long)]
    train_batches: Option<usize>,
    /// Seed of every run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only rewrite the report from the finished runs.
    #[arg(long)]
    report_only: bool,
}

fn parse_lstm_run(
    spec: &str,
) -> anyhow::Result<(Option<qgrad_scaled::Method>, qgrad_lstm::Normalisation)> {
    let (w, n) = spec
        .split_once(':')
        .ok_or_else(|| anyhow::anyhow!("--runs: '{spec}' is not WEIGHTS:NORM"))?;
    let weights = match w {
        "float" => None,
        m => Some(
            m.parse::<qgrad_scaled::Method>()
                .map_err(|e| anyhow::anyhow!("--runs: {e}"))?,
        ),
    };
    Ok((weights, n.parse()?))
}

fn run_lstm(a: LstmArgs) -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let data = a.data.unwrap_or_else(|| {
        let full = root.join("datasets/war-and-peace/input.txt");
        if full.is_file() {
            full
        } else {
            root.join("datasets/war-and-peace-mini/input.txt")
        }
    });
    let runs = if a.runs.is_empty() {
        xtask::lstm::LstmOptions::default_runs()
    } else {
        a.runs
            .iter()
            .map(|s| parse_lstm_run(s.trim()))
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let opts = xtask::lstm::LstmOptions {
        data,
        out: a.out.clone(),
        runs,
        hidden: a.hidden,
        epochs: a.epochs,
        batch: a.batch,
        seq_len: a.seq_len,
        train_chunks: a.train_batches,
        seed: a.seed,
        report_only: a.report_only,
        progress: true,
    };
    xtask::lstm::run(&opts)?;
    println!("wrote {}", a.out.join("LSTM.md").display());
    Ok(())
}

#[derive(clap::Args, Debug)]
struct DataParallelArgs {
    /// MNIST folder [default: datasets/mnist, else datasets/mnist-mini].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The output folder.
    #[arg(long, value_name = "DIR", default_value = "runs/data-parallel")]
    out: PathBuf,
    /// Networks of the grid, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "lenet-5")]
    models: Vec<String>,
    /// Weights: float and/or quantizer names, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "float,lab")]
    weights: Vec<String>,
    /// Gradient widths besides f32, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "8,4,3,2")]
    bits: Vec<u8>,
    /// Epochs per run.
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    /// In-process ranks.
    #[arg(long, default_value_t = 2)]
    ranks: usize,
    /// Stop each epoch after N steps.
    #[arg(long, value_name = "N")]
    max_batches: Option<usize>,
    /// Train on the first N images only.
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
    /// Skip the narrow-against-wide comparison.
    #[arg(long)]
    no_dimension: bool,
    /// Time steps under mpirun with this qgrad binary (built with
    /// `cargo build --release -p qgrad-cli --features mpi`).
    #[arg(long, value_name = "QGRAD")]
    timing: Option<PathBuf>,
    /// Only the timing (with --timing); the report keeps what is there.
    #[arg(long, requires = "timing")]
    timing_only: bool,
    /// Train nothing: write the report of the runs already in --out.
    #[arg(long)]
    report_only: bool,
}

#[derive(clap::Args, Debug)]
struct ReproduceArgs {
    /// The shipped MNIST subset (datasets/mnist-mini), few epochs: about 2 minutes on 2 cores.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// A few hundred images and one epoch: checks the whole pipeline in seconds.
    #[arg(long)]
    smoke: bool,
    /// Models, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "lenet-300-100,lenet-5")]
    models: Vec<String>,
    /// Methods, comma-separated: post-training, in-training, combined,
    /// loss-aware, joint.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "post-training,in-training,combined,loss-aware,joint"
    )]
    methods: Vec<String>,
    /// Training device.
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Float training epochs [default: per model and scale].
    #[arg(long)]
    epochs: Option<usize>,
    /// Epochs of each in-training run [default: per scale]; with --epochs this
    /// shortens a CIFAR-10 run on CPU.
    #[arg(long)]
    in_training_epochs: Option<usize>,
    /// Output folder [default: runs/reproduce, runs/quick, runs/smoke or runs/sweep].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// MNIST folder [default: datasets/mnist, or datasets/mnist-mini with --quick/--smoke].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// CIFAR-10 folder, for alexnet and vgg-16 [default: datasets/cifar10].
    #[arg(long, value_name = "DIR")]
    cifar_data: Option<PathBuf>,
    /// Redo work whose results exist already.
    #[arg(long)]
    force: bool,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip the trade-off sweep (headline points only).
    #[arg(long)]
    no_sweep: bool,
    /// Activation width of the quantized evaluation and integer inference.
    #[arg(long, default_value_t = 16)]
    act_bits: u8,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
    /// In-training runs fine-tune the baseline with its accumulated
    /// gradients carried on (carry, METHOD §1) or started at zero (zero).
    #[arg(long, default_value = "carry", value_parser = ["carry", "zero"])]
    accum_start: String,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceArg {
    Cpu,
    Cuda,
}

fn run_reproduce(args: ReproduceArgs, sweep_command: bool) -> Result<()> {
    use xtask::reproduce::{ReproduceOptions, Scale};
    use xtask::results::Method;
    let scale = if args.smoke {
        Scale::Smoke
    } else if args.quick {
        Scale::Quick
    } else {
        Scale::Full
    };
    let models = args
        .models
        .iter()
        .map(|m| {
            m.parse::<qgrad_models::Arch>()
                .map_err(|e| anyhow::anyhow!("{e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let methods = args
        .methods
        .iter()
        .map(|m| Method::parse(m))
        .collect::<Result<Vec<_>>>()?;
    let device = match args.device {
        DeviceArg::Cpu => candle_core::Device::Cpu,
        DeviceArg::Cuda => candle_core::Device::new_cuda(0).map_err(|e| {
            anyhow::anyhow!("no CUDA device ({e}); build with --features cuda or use --device cpu")
        })?,
    };
    let root = xtask::repo_root();
    let default_out = match (sweep_command, scale) {
        (true, _) => "runs/sweep",
        (false, Scale::Full) => "runs/reproduce",
        (false, Scale::Quick) => "runs/quick",
        (false, Scale::Smoke) => "runs/smoke",
    };
    let data = args.data.unwrap_or_else(|| match scale {
        Scale::Full => xtask::default_data_dir().join("mnist"),
        _ => xtask::default_data_dir().join("mnist-mini"),
    });
    let opts = ReproduceOptions {
        scale,
        models,
        methods,
        device,
        device_name: format!("{:?}", args.device).to_lowercase(),
        epochs: args.epochs,
        in_training_epochs: args.in_training_epochs,
        out: args.out.unwrap_or_else(|| root.join(default_out)),
        data,
        cifar_data: args
            .cifar_data
            .unwrap_or_else(|| xtask::default_data_dir().join("cifar10")),
        force: args.force,
        seed: args.seed,
        sweep: !args.no_sweep,
        act_bits: args.act_bits,
        progress: !args.quiet,
        accum_start: args.accum_start.parse()?,
        command: format!(
            "cargo xtask {}",
            std::env::args().skip(1).collect::<Vec<_>>().join(" ")
        ),
    };
    let record = xtask::reproduce::run(&opts)?;
    println!(
        "wrote {} ({} points, {:.1}s)",
        opts.out.join("REPORT.md").display(),
        record.points.len(),
        record.elapsed_seconds
    );
    Ok(())
}

fn run_report(out: PathBuf) -> Result<()> {
    let record = xtask::results::RunRecord::read(&out.join("results.json"))?;
    xtask::plot::write_plots(&record, &out.join("plots"))?;
    xtask::report::write_report(&record, &out.join("REPORT.md"), "plots")?;
    println!("wrote {}", out.join("REPORT.md").display());
    Ok(())
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Mnist,
    Cifar10,
    WarAndPeace,
    All,
}

#[derive(clap::Args, Debug)]
struct DownloadArgs {
    /// Which dataset.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Take the files from this folder instead of the network (also: environment
    /// variable QGRAD_MIRROR). Layouts: DIR/mnist/*.gz or DIR/*.gz;
    /// DIR/cifar10/cifar-10-batches-bin/*.bin, DIR/cifar-10-batches-bin/*.bin or
    /// DIR/cifar-10-binary.tar.gz; DIR/war-and-peace/input.txt or DIR/input.txt.
    #[arg(long, value_name = "DIR")]
    mirror: Option<PathBuf>,
    /// Where the datasets go [default: datasets/ in the repository].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Replace existing files whose checksum does not match (otherwise an error).
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn run_download(args: DownloadArgs) -> Result<()> {
    let mirror = args.mirror.or_else(|| {
        std::env::var_os(MIRROR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    let source = match mirror {
        Some(dir) => {
            if !dir.is_dir() {
                anyhow::bail!("the mirror folder {} does not exist", dir.display());
            }
            Source::Mirror(dir)
        }
        None => Source::Network,
    };
    let options = DownloadOptions {
        data_dir: args.data.unwrap_or_else(xtask::default_data_dir),
        source,
        progress: !args.quiet,
        force: args.force,
    };
    let specs = match args.which {
        Which::Mnist => vec![download::mnist_spec()],
        Which::Cifar10 => vec![download::cifar10_spec()],
        Which::WarAndPeace => vec![download::war_and_peace_spec()],
        Which::All => download::all_specs(),
    };
    for spec in &specs {
        let done = download::download(spec, &options)?;
        for (path, outcome) in done {
            let what = match outcome {
                download::Outcome::AlreadyPresent => "present, checksum ok",
                download::Outcome::CopiedFromMirror => "copied from the mirror, checksum ok",
                download::Outcome::Downloaded => "downloaded, checksum ok",
                download::Outcome::Extracted => "extracted, checksum ok",
            };
            println!("{}: {what}", path.display());
        }
    }
    Ok(())
}

fn run_data_parallel(a: DataParallelArgs) -> anyhow::Result<()> {
    let root = xtask::repo_root();
    let data = a.data.unwrap_or_else(|| mnist_default(&root));
    let models = a
        .models
        .iter()
        .filter(|_| !a.timing_only)
        .map(|m| {
            m.parse::<qgrad_models::Arch>()
                .map_err(|e| anyhow::anyhow!("--models: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = xtask::data_parallel::DataParallelOptions {
        data,
        out: a.out.clone(),
        models,
        weights: a.weights,
        bits: a.bits,
        epochs: a.epochs,
        ranks: a.ranks,
        max_batches: a.max_batches,
        train_limit: a.train_limit,
        dimension: !a.no_dimension && !a.timing_only,
        timing: a.timing,
        report_only: a.report_only,
    };
    xtask::data_parallel::run(&opts)?;
    println!("wrote {}", a.out.join("DATA_PARALLEL.md").display());
    Ok(())
}

fn main() -> ExitCode {
    // Keep freed buffers mapped and candle's spinning pool off rayon's cores
    // (measurements in qgrad_ops::prepare_cpu_training_process); before any
    // thread starts, since it sets an environment variable.
    qgrad_ops::prepare_cpu_training_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Download(args) => run_download(args),
        Command::Reproduce(args) => run_reproduce(args, false),
        Command::Sweep(args) => run_reproduce(args, true),
        Command::Report { out } => run_report(out),
        Command::BenchTrain(args) => bench_train::run(args),
        Command::Lstm(a) => run_lstm(a),
        Command::Structured(a) => run_structured(a),
        Command::Versus(a) => run_versus(a),
        Command::Continual {
            data,
            out,
            seeds,
            grow,
            max_rounds,
            target,
            train_per_task,
        } => xtask::continual::run(&xtask::continual::ContinualOptions {
            data: data.unwrap_or_else(|| xtask::continual::default_data(&xtask::repo_root())),
            out: out.clone(),
            seeds,
            grow,
            max_rounds,
            target,
            train_per_task,
        })
        .map(|()| println!("wrote {}", out.join("CONTINUAL.md").display())),
        Command::DataParallel(a) => run_data_parallel(a),
        Command::Powerlaw { files, out } => xtask::powerlaw::run(&files, &out).map(|()| {
            println!("wrote {}", out.join("POWERLAW.md").display());
        }),
        Command::Curve {
            series,
            data,
            title,
            out,
        } => xtask::curve::run(&series, &data, &out, &title).map(|()| {
            println!("wrote {}", out.join("CURVE.md").display());
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
