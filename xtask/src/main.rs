//! `cargo xtask`: see the library docs (`xtask/src/lib.rs`).

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
    /// Side-by-side training benchmark against PyTorch.
    BenchTrain(bench_train::BenchTrainArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Mnist,
    Cifar10,
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
    /// DIR/cifar-10-binary.tar.gz.
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Download(args) => run_download(args),
        Command::BenchTrain(args) => bench_train::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
