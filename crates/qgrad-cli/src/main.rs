//! `qgrad`: train a network, quantize it by accumulated gradients
//! (post-training, in-training or combined, METHOD.md §3–5), write the
//! bit-packed compressed file, run that file with integer kernels, and inspect
//! it.
//!
//! Design: the binary is a thin layer over the libraries. Every subcommand
//! parses its options with clap (usage errors exit with 2), runs one pipeline
//! from `commands`, and prints a human-readable summary on stdout, or one JSON
//! document with `--json` (so a script reads stdout and nothing else); progress
//! and stage messages go to stderr. Failures are classified by what went
//! wrong: unreadable or invalid input files and data sets exit with 3, every
//! other runtime failure with 1. Errors print as `error: …` followed by their
//! cause chain; the program never panics on user input.

mod commands;
mod failure;
mod lstm;
mod parallel;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use qgrad_cluster::ClusterMethod;
use qgrad_models::methods::{FractionSchedule, Scope};
use qgrad_models::Arch;
use qgrad_pipeline::AccumStart;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure (training diverged, I/O error while writing, ...)
  2  usage error (unknown option, malformed value, inconsistent options)
  3  bad input: a data set, checkpoint or compressed file that is missing,
     unreadable, corrupt or does not fit the model";

#[derive(Parser, Debug)]
#[command(
    name = "qgrad",
    version,
    about = "Accumulated-gradient quantization and bit-packed CSR compression of neural networks",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a float network and save a checkpoint (parameters, accumulated
    /// gradients, optimizer state) into a directory; rerunning resumes.
    #[command(after_help = EXIT_CODES)]
    Train(TrainArgs),
    /// Data-parallel training (METHOD §12): every rank computes its shard of
    /// each mini-batch, quantizes its gradient to --grad-bits per element
    /// (stochastic rounding, one scale per --bucket elements) and all ranks
    /// average the exchanged gradients. Ranks are MPI processes (`mpirun -np
    /// N qgrad train-parallel --engine mpi ...`, in a build with the `mpi`
    /// feature) or threads of this process (--engine threads:N, the same
    /// bits as mpirun -np N). Adam at lr 0.001 unless --optimizer/--lr say
    /// otherwise.
    #[command(after_help = EXIT_CODES)]
    TrainParallel(ParallelArgs),
    /// Quantize a network with one of the three methods and write the
    /// compressed file; reports ratio and accuracy (float, quantized in candle,
    /// and from the file with integer kernels).
    #[command(subcommand)]
    Quantize(QuantizeCommand),
    /// Run a compressed file on the test set with qgrad-csr's integer kernels
    /// and print its accuracy (a character LSTM: its test bits per
    /// character on --text).
    #[command(after_help = EXIT_CODES)]
    Eval(EvalArgs),
    /// Train a (quantized) character LSTM language model (METHOD §11) with
    /// weight, layer or batch normalisation; checkpoints per epoch and
    /// writes the compressed file.
    #[command(after_help = EXIT_CODES)]
    TrainLstm(lstm::TrainLstmArgs),
    /// Sample text from a character LSTM's compressed file (deterministic
    /// for a seed).
    #[command(after_help = EXIT_CODES)]
    Generate(lstm::GenerateArgs),
    /// Per-tensor table of a compressed file: parameters, non-zeros, layout,
    /// bit-width histogram, bytes, bits per parameter and ratio.
    #[command(after_help = EXIT_CODES)]
    Inspect(InspectArgs),
    /// Write a compressed file again with this version's encoder (same
    /// tensors, bit for bit; each tensor in its smallest layout, Rice-coded
    /// column gaps included): smaller files from an older writer.
    #[command(after_help = EXIT_CODES)]
    Repack(RepackArgs),
    /// The power law of a pruned network (METHOD §14): per weight layer, the
    /// in- and out-degree distributions of its units, their truncated
    /// power-law fit (γ, k_min by Kolmogorov–Smirnov, k_max) and the
    /// likelihood-ratio tests against exponential and log-normal fits.
    #[command(after_help = EXIT_CODES)]
    Analyze(AnalyzeArgs),
    /// Import a PyTorch state dict (safetensors) as a qgrad checkpoint, with
    /// its accumulated gradients from the Python helper or from a short
    /// fine-tuning run.
    #[command(after_help = EXIT_CODES)]
    Import(ImportArgs),
    /// Write a compressed file's (or a checkpoint's) weights, dequantized,
    /// as a PyTorch state dict (safetensors) under PyTorch's names.
    #[command(after_help = EXIT_CODES)]
    Export(ExportArgs),
}

#[derive(Args, Debug)]
struct ImportArgs {
    /// Network: lenet-300-100, lenet-5, alexnet, vgg-16, mlp-<width>x<depth>[-bn] or cnn-<channels>.
    #[arg(long, value_parser = parse_arch)]
    model: Arch,
    /// The state dict, saved with safetensors.torch.save_file.
    #[arg(long, value_name = "FILE")]
    from: PathBuf,
    /// The checkpoint directory to create (must not hold a checkpoint yet).
    #[arg(short, long, value_name = "DIR")]
    out: PathBuf,
    /// Rename: a tensor named OLD or OLD.* becomes NEW / NEW.* (repeatable).
    #[arg(long = "map", value_name = "OLD=NEW", value_parser = parse_map)]
    maps: Vec<qgrad_pipeline::interchange::NameMap>,
    /// Accumulated gradients recorded in PyTorch (`<name>.accgrad` tensors of
    /// python/qgrad_accgrad.py).
    #[arg(long, value_name = "FILE")]
    accgrad: Option<PathBuf>,
    /// Fine-tune the imported network this many epochs to record its
    /// accumulated gradients (0: none) [default: 1 without --accgrad, else 0].
    #[arg(long, value_name = "N")]
    fine_tune_epochs: Option<usize>,
    /// Learning rate of the fine-tuning (SGD with momentum, constant).
    #[arg(long, default_value_t = 0.001)]
    lr: f64,
    /// Mini-batch size of the fine-tuning.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[command(flatten)]
    data: DataArgs,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ExportArgs {
    /// A compressed file (.qgz) or a checkpoint directory.
    input: PathBuf,
    /// Where to write the state dict.
    #[arg(long, value_name = "FILE")]
    safetensors: PathBuf,
    /// Write every weight as compressed sparse rows (crow_indices,
    /// col_indices, values, size: the layout "sparse-csr-v1" of
    /// qgrad_pipeline::interchange) for torch.sparse_csr_tensor; rebuild
    /// them with python/qgrad_sparse.py.
    #[arg(long)]
    sparse: bool,
}

fn parse_map(s: &str) -> Result<qgrad_pipeline::interchange::NameMap, String> {
    s.parse()
}

#[derive(Args, Debug)]
struct AnalyzeArgs {
    /// The compressed model file.
    file: PathBuf,
    /// Print one JSON document (degrees and fits) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RepackArgs {
    /// The compressed model file to read.
    file: PathBuf,
    /// Where to write the re-encoded file (not the input itself).
    #[arg(short, long, value_name = "FILE")]
    out: PathBuf,
    /// Tensor layout: auto (the smallest per tensor), csr, csr-rice, dense,
    /// block (scaled tensors in block-sparse rows, format version 4) or
    /// flat-gaps (row-major gaps, Rice or Exp-Golomb coded, without row
    /// pointers, format version 5).
    #[arg(long, default_value = "auto", value_parser = ["auto", "csr", "csr-rice", "dense", "block", "flat-gaps"])]
    layout: String,
    /// The newest format version the file may have, for readers built
    /// before a layout existed (1..=6; 1 holds fixed-point tensors only, 6
    /// is needed by split weights).
    #[arg(long, value_name = "VERSION")]
    format_version: Option<u32>,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum QuantizeCommand {
    /// Post-training quantization (METHOD §3) of a trained checkpoint.
    #[command(after_help = EXIT_CODES)]
    Post(PostArgs),
    /// In-training quantization (METHOD §4): train while freezing the
    /// low-importance fraction at --low-bits after every epoch.
    #[command(name = "in-training", after_help = EXIT_CODES)]
    InTraining(InTrainingArgs),
    /// Combined (METHOD §5): in-training, then post-training of the float
    /// remainder only.
    #[command(after_help = EXIT_CODES)]
    Combined(CombinedArgs),
    /// Loss-aware weight quantization (METHOD §10): train with binary,
    /// ternary or m-bit weights (LAB, LAT, LAQ, or the BinaryConnect, BWN,
    /// TWN and TerConnect baselines) and write them as scaled codes.
    #[command(name = "loss-aware", after_help = EXIT_CODES)]
    LossAware(LossAwareArgs),
    /// Structured sparsity with low-bit weights and activations (METHOD
    /// §9): train under block masks (the same number of kept blocks in every
    /// block row) with k_w-bit uniform weights and k_a-bit PACT activations,
    /// and write the file (block layout where it is the smallest).
    #[command(after_help = EXIT_CODES)]
    Structured(StructuredArgs),
}

#[derive(Args, Debug)]
pub(crate) struct StructuredArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// Weight bits k_w: 1 (α·sign W), 2, 3, 4, 8 (uniform), or 32 (float).
    #[arg(long, default_value_t = 2)]
    weight_bits: u8,
    /// Activation bits k_a after every ReLU (PACT): 2, 3, 4, 8, or 32 (float
    /// activations in training, --act-bits fixed point in the file).
    #[arg(long, default_value_t = 2)]
    pact_bits: u8,
    /// Block compression c: one block in c kept per block row (1, 2, 4, 8, 16).
    #[arg(long, default_value_t = 4)]
    compression: usize,
    /// Block shape ROWSxCOLS.
    #[arg(long, default_value = "16x16", value_parser = parse_block)]
    block: (usize, usize),
    /// How the kept blocks are chosen: random (from --seed, before
    /// training), norm (block L2 norm) or accumulated-gradient (block A); the
    /// last two read the --init network.
    #[arg(long, default_value = "random", value_parser = ["random", "norm", "accumulated-gradient"])]
    selection: String,
    /// Keep the first and the last layer dense.
    #[arg(long)]
    dense_first_last: bool,
    /// The scale of k_w >= 2: max (α = max |W|, METHOD §9) or least-squares.
    #[arg(long, default_value = "max", value_parser = ["max", "least-squares"])]
    scale: String,
    /// Initial PACT clip β of every layer.
    #[arg(long, default_value_t = 2.0)]
    clip: f32,
    /// Keep the PACT clips fixed instead of learning them.
    #[arg(long)]
    fixed_clip: bool,
    /// Bits of the network input (the first layer's activations) with PACT.
    #[arg(long, default_value_t = 8)]
    input_bits: u8,
    /// Start from this trained checkpoint instead of a fresh network.
    #[arg(long, value_name = "CHECKPOINT")]
    init: Option<PathBuf>,
    /// Checkpoint the run here after every epoch; a checkpoint already there
    /// is resumed.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    output: OutputArgs,
}

fn parse_block(s: &str) -> Result<(usize, usize), String> {
    let bad = || format!("block '{s}': expected ROWSxCOLS, e.g. 16x16");
    let (r, c) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    match (r.parse(), c.parse()) {
        (Ok(r), Ok(c)) if r > 0 && c > 0 => Ok((r, c)),
        _ => Err(bad()),
    }
}

fn parse_layer_kappa(s: &str) -> Result<(String, f64), String> {
    let (layer, kappa) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not LAYER=FRACTION (as fc3=0.3)"))?;
    let kappa: f64 = kappa
        .parse()
        .map_err(|_| format!("'{kappa}' is not a number (in '{s}')"))?;
    if layer.is_empty() {
        return Err(format!("'{s}' names no layer"));
    }
    Ok((layer.to_string(), kappa))
}

#[derive(Args, Debug)]
struct LossAwareArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// The quantizer: lab, lat-a, lat-e, lat2-a, lat2-e, laq<m>[-log]
    /// (m = 2..=8), binary-connect, bwn, twn or ter-connect.
    #[arg(long, value_parser = parse_quantizer)]
    quantizer: qgrad_scaled::Method,
    /// One scale per output channel instead of one per tensor.
    #[arg(long)]
    per_channel: bool,
    /// Do not clip the float weights to [-1, 1] after each update.
    #[arg(long)]
    no_clip: bool,
    /// Joint quantization and sparsification (METHOD §13): at most this
    /// fraction of each weight tensor is non-zero, in (0, 1].
    #[arg(long, value_name = "FRACTION")]
    kappa: Option<f64>,
    /// Epochs over which the non-zero budget falls from 1 to --kappa (cubic
    /// schedule) [default: half the epochs].
    #[arg(long, value_name = "EPOCHS", requires = "kappa")]
    kappa_ramp: Option<f64>,
    /// What decides which weights stay non-zero under --kappa: curvature
    /// (D·W², METHOD §13) or accumulated-gradient (A, METHOD §1).
    #[arg(long, default_value = "curvature", value_parser = ["curvature", "accumulated-gradient"], requires = "kappa")]
    importance: String,
    /// A layer's own budget in place of --kappa, as LAYER=FRACTION (fc3=0.3);
    /// repeat for several layers. It follows the same schedule.
    #[arg(long, value_name = "LAYER=FRACTION", value_parser = parse_layer_kappa, requires = "kappa")]
    kappa_layer: Vec<(String, f64)>,
    /// Fix which weights stay non-zero once the budget reaches its target
    /// (the ranking of that step): the epochs after the ramp train one
    /// sparse network instead of re-ranking every step.
    #[arg(long, requires = "kappa")]
    freeze_mask: bool,
    /// Width of the linear and convolution biases in the file: 32 (f32) or
    /// 2..=16 bits of fixed point, one exponent per bias, rounded when the
    /// model is exported.
    #[arg(long, value_name = "BITS", default_value_t = 32)]
    bias_bits: u8,
    /// Keep this fraction of each weight tensor, the weights of largest
    /// accumulated gradient A (the first thesis's importance), at
    /// --important-bits fixed point; the quantizer takes the rest (split
    /// weights: two tensors per layer in the file)
    #[arg(long, value_name = "FRACTION", conflicts_with = "kappa")]
    important: Option<f64>,
    /// Width of the --important weights, 2..=16 bits
    #[arg(long, value_name = "BITS", default_value_t = 8, requires = "important")]
    important_bits: u8,
    /// Start from this trained checkpoint instead of a fresh network.
    #[arg(long, value_name = "CHECKPOINT")]
    init: Option<PathBuf>,
    /// Checkpoint the run here after every epoch; a checkpoint already there
    /// is resumed.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// Data set directory: MNIST's four IDX files (.gz or not) or CIFAR-10's
    /// binary batches (the folder holding cifar-10-batches-bin/ or the batch
    /// files themselves). Default: the MNIST subset shipped in the repository
    /// (datasets/mnist-mini) or datasets/cifar10, found from the current
    /// directory or the binary's location.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Evaluate on the first N test images only.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Train on the first N training images only.
    #[arg(long, value_name = "N")]
    train_limit: Option<usize>,
}

#[derive(Args, Debug, Clone)]
struct TrainingArgs {
    /// Network: lenet-300-100, lenet-5, alexnet, vgg-16, an MNIST MLP
    /// mlp-<width>x<depth>[-bn] or the CIFAR-10 CNN cnn-<channels>.
    #[arg(long, default_value = "lenet-300-100", value_parser = parse_arch)]
    model: Arch,
    /// Seed of initialisation, shuffling, augmentation and dropout.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Epochs (default: the model's recipe, 20 for the LeNets).
    #[arg(long)]
    epochs: Option<usize>,
    /// Base learning rate (default: the model's recipe).
    #[arg(long)]
    lr: Option<f64>,
    /// L2 weight decay (default: the model's recipe, 5e-4).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Mini-batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Stop each epoch after N batches (quick runs).
    #[arg(long, value_name = "N")]
    max_batches: Option<usize>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Optimizer: sgd (momentum 0.9) or adam (β 0.9/0.999, bias-corrected)
    /// [default: adam for `quantize loss-aware`, else sgd].
    #[arg(long, value_parser = ["sgd", "adam"])]
    optimizer: Option<String>,
    /// Learning-rate schedule over the epochs: cosine (to 0), constant,
    /// step:EVERY:GAMMA (×GAMMA every EVERY epochs) or
    /// multistep:E1,E2,...:GAMMA (×GAMMA at each listed epoch)
    /// [default: the model's recipe, cosine].
    #[arg(long, value_name = "SCHEDULE", value_parser = parse_schedule)]
    lr_schedule: Option<qgrad_optim::LrSchedule>,
}

fn parse_schedule(s: &str) -> Result<qgrad_optim::LrSchedule, String> {
    use qgrad_optim::LrSchedule;
    let parts: Vec<&str> = s.split(':').collect();
    let gamma = |g: &str| -> Result<f64, String> {
        match g.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(format!("the factor '{g}' must be a positive number")),
        }
    };
    match parts.as_slice() {
        ["cosine"] => Ok(LrSchedule::Cosine { min_lr: 0.0 }),
        ["constant"] => Ok(LrSchedule::Constant),
        ["step", every, g] => {
            let every: usize = every.parse().ok().filter(|&e| e > 0).ok_or_else(|| {
                format!("the step '{every}' must be a whole number of epochs > 0")
            })?;
            Ok(LrSchedule::Step {
                every,
                gamma: gamma(g)?,
            })
        }
        ["multistep", milestones, g] => {
            let milestones = milestones
                .split(',')
                .map(|m| {
                    m.parse::<usize>()
                        .map_err(|_| format!("'{m}' is not an epoch"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(LrSchedule::MultiStep {
                milestones,
                gamma: gamma(g)?,
            })
        }
        ["decay-after", start, g] => {
            let start: usize = start
                .parse()
                .map_err(|_| format!("the start '{start}' must be a whole number of epochs"))?;
            Ok(LrSchedule::DecayAfter {
                start,
                gamma: gamma(g)?,
            })
        }
        _ => Err(format!(
            "unknown schedule '{s}' (expected cosine, constant, step:EVERY:GAMMA, \
             multistep:E1,E2:GAMMA or decay-after:START:GAMMA)"
        )),
    }
}

#[derive(Args, Debug, Clone)]
struct PostOptionArgs {
    /// Bit widths b_1 > b_2 > ... (0 = prune, 2..=16, 32 = keep f32).
    // (Spelled `std::vec::Vec` so that clap parses one comma-separated value
    // rather than repeated occurrences.)
    #[arg(long, default_value = "16,8,4,2,0", value_parser = parse_widths)]
    widths: std::vec::Vec<u8>,
    /// Clustering of the accumulated gradients: kmeans, log-kmeans or
    /// quantiles:f1,f2,... (one share per width, summing to 1).
    #[arg(long = "cluster", default_value = "kmeans", value_parser = parse_cluster)]
    cluster: ClusterMethod,
    /// Cluster all layers together (global) or each layer separately (per-layer).
    #[arg(long, default_value = "global", value_parser = parse_scope)]
    scope: Scope,
}

#[derive(Args, Debug, Clone)]
struct InTrainingOptionArgs {
    /// Split fraction p (0.5 < p < 1) quantized at every split, or a list
    /// "p1,p2,..." (one per split; no splits after the list).
    #[arg(long, default_value = "0.7", value_parser = parse_fraction)]
    fraction: FractionSchedule,
    /// Bit width of the frozen group (0 = prune, 2..=16).
    #[arg(long, default_value_t = 4)]
    low_bits: u8,
    /// First epoch (0-based) after which a split happens.
    #[arg(long, default_value_t = 0)]
    start_epoch: usize,
    /// Epochs between two splits (1 = after every epoch, as METHOD §4; more
    /// lets the float remainder recover before the next split).
    #[arg(long, default_value_t = 1)]
    split_every: usize,
    /// Rank A for a split over all layers together (global) or each layer
    /// separately (per-layer: every layer freezes its own fraction).
    #[arg(long, default_value = "global", value_parser = parse_scope)]
    split_scope: Scope,
    /// Start from this trained checkpoint (file or directory) instead of a
    /// fresh network.
    #[arg(long, value_name = "CHECKPOINT")]
    init: Option<PathBuf>,
    /// With --init: carry the baseline's accumulated gradients on (METHOD §1
    /// sums over the whole training process) or start them at zero.
    #[arg(long, default_value = "carry", value_parser = parse_accum_start)]
    accum_start: AccumStart,
    /// Checkpoint the run here after every epoch (network, momentum,
    /// accumulated gradients, freeze masks and the split state); a checkpoint
    /// already there is resumed, so a killed run continues where it stopped.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct OutputArgs {
    /// Where to write the compressed file.
    #[arg(long, short, value_name = "FILE")]
    out: PathBuf,
    /// Activation width of integer inference (2..=16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(2..=16))]
    act_bits: u8,
    /// Tensor layout: auto (the smallest per tensor), csr (fixed-width
    /// column indices), csr-rice (Rice-coded column gaps, format version 3),
    /// dense, block (scaled tensors in block-sparse rows, format version 4;
    /// others CSR) or flat-gaps (row-major gaps, Rice or Exp-Golomb coded,
    /// without row pointers, format version 5).
    #[arg(long, default_value = "auto", value_parser = ["auto", "csr", "csr-rice", "dense", "block", "flat-gaps"])]
    layout: String,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ParallelArgs {
    #[command(flatten)]
    training: TrainingArgs,
    /// The weights every rank trains: float, or a quantizer of `quantize
    /// loss-aware` (lab, laq3, twn, ...).
    #[arg(long, default_value = "float")]
    weights: String,
    /// Bits per gradient element on the wire: 32 (an f32 all-reduce) or
    /// 2..=8 (stochastic rounding).
    #[arg(long, default_value_t = 32)]
    grad_bits: u8,
    /// Elements per gradient scale (bucket length d).
    #[arg(long, default_value_t = 512)]
    bucket: usize,
    /// Clip every bucket at ±C·σ before quantizing.
    #[arg(long, value_name = "C")]
    clip: Option<f32>,
    /// The ranks: mpi (the processes of mpirun) or threads:N (N ranks in
    /// this process).
    #[arg(long, default_value = "threads:1")]
    engine: String,
    /// Seconds a rank waits for the others in one exchange before the job
    /// ends with an error (a rank died or hung).
    #[arg(long, default_value_t = 120.0)]
    peer_timeout: f64,
    /// Shared checkpoint folder: rank 0 writes it after every epoch, every
    /// rank resumes from it (on any number of ranks).
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Write every step's training loss, timings and bytes sent as CSV.
    #[arg(long, value_name = "FILE")]
    steps_csv: Option<PathBuf>,
    /// With quantized --weights: write the compressed file here (rank 0),
    /// evaluated in candle and run with the integer kernels.
    #[arg(long, short, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Activation width of the file's integer inference (2..=16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(2..=16))]
    act_bits: u8,
    #[command(flatten)]
    data: DataArgs,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Checkpoint directory (created; an existing checkpoint there is resumed).
    #[arg(long, short, value_name = "DIR")]
    out: PathBuf,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PostArgs {
    /// Trained checkpoint: a checkpoint.safetensors file or its directory.
    #[arg(long, value_name = "CHECKPOINT")]
    checkpoint: PathBuf,
    #[command(flatten)]
    post: PostOptionArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args, Debug)]
struct InTrainingArgs {
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    in_training: InTrainingOptionArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args, Debug)]
struct CombinedArgs {
    #[command(flatten)]
    training: TrainingArgs,
    #[command(flatten)]
    in_training: InTrainingOptionArgs,
    #[command(flatten)]
    post: PostOptionArgs,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// The compressed model file.
    file: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Images per batch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
    /// A character LSTM's corpus: the test part of this text file, split as
    /// the model was trained [default: datasets/war-and-peace-mini].
    #[arg(long, value_name = "FILE")]
    text: Option<PathBuf>,
    /// Also evaluate the file's dequantized weights in candle (f64 layers,
    /// same activation quantization) and count the images on which the two
    /// disagree.
    #[arg(long)]
    compare_candle: bool,
    /// Print one JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The compressed model file.
    file: PathBuf,
    /// Print one JSON document on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_arch(s: &str) -> Result<Arch, String> {
    s.parse()
        .map_err(|e: qgrad_models::arch::UnknownArch| e.to_string())
}

fn parse_widths(s: &str) -> Result<Vec<u8>, String> {
    s.split(',')
        .map(|w| {
            w.trim()
                .parse::<u8>()
                .map_err(|e| format!("'{w}' is not a bit width: {e}"))
        })
        .collect()
}

fn parse_cluster(s: &str) -> Result<ClusterMethod, String> {
    s.parse()
        .map_err(|e: qgrad_cluster::ClusterError| e.to_string())
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    s.parse()
        .map_err(|e: qgrad_models::ModelsError| e.to_string())
}

fn parse_quantizer(s: &str) -> Result<qgrad_scaled::Method, String> {
    s.parse()
        .map_err(|e: qgrad_scaled::ScaledError| e.to_string())
}

fn parse_accum_start(s: &str) -> Result<AccumStart, String> {
    s.parse()
        .map_err(|e: qgrad_pipeline::PipelineError| e.to_string())
}

fn parse_fraction(s: &str) -> Result<FractionSchedule, String> {
    s.parse()
        .map_err(|e: qgrad_models::ModelsError| e.to_string())
}

/// Lets a closed output pipe (`qgrad inspect big.qgz | head`) end the process
/// quietly, as it ends `cat` or `grep`, instead of making `println!` panic:
/// Rust starts programs with SIGPIPE ignored, so a write to a closed pipe
/// returns an error that `println!` turns into a panic.
fn die_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called first in main, before any thread starts; SIG_DFL is a
    // valid disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    die_quietly_on_closed_pipe();
    // Keep freed buffers mapped and candle's spinning pool off rayon's cores
    // (measurements in qgrad_ops::prepare_cpu_training_process); before any
    // thread starts, since it sets an environment variable.
    qgrad_ops::prepare_cpu_training_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => commands::train(args),
        Command::TrainParallel(args) => parallel::train_parallel(args),
        Command::Quantize(QuantizeCommand::Post(args)) => commands::post(args),
        Command::Quantize(QuantizeCommand::InTraining(args)) => commands::in_training(args),
        Command::Quantize(QuantizeCommand::Combined(args)) => commands::combined(args),
        Command::Quantize(QuantizeCommand::LossAware(args)) => commands::loss_aware(args),
        Command::Quantize(QuantizeCommand::Structured(args)) => commands::structured(args),
        Command::Eval(args) => commands::eval(args),
        Command::TrainLstm(args) => lstm::train_lstm(args),
        Command::Generate(args) => lstm::generate(args),
        Command::Inspect(args) => commands::inspect(args),
        Command::Repack(args) => commands::repack(args),
        Command::Analyze(args) => commands::analyze(args),
        Command::Import(args) => commands::import(args),
        Command::Export(args) => commands::export(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            failure.print();
            ExitCode::from(failure.code)
        }
    }
}
