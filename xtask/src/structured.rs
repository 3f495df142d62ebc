//! `cargo xtask structured`: the design-space exploration of the second
//! thesis (METHOD §9, §15). MLPs 784-w^d-10 on MNIST (or, with `--cifar`,
//! the CIFAR-10 CNN at several channel multipliers) trained under block
//! masks with `k_w`-bit weights and `k_a`-bit PACT activations, each design
//! written to a compressed file and run from it; per design the weight
//! memory (the file's bytes), the activation memory and the total
//! (qgrad-design), the Pareto front of (total memory, test error) and the
//! weight-only front, the deep-sparse against shallow-dense comparison at
//! equal memory, and the thesis's targets beside our numbers.
//!
//! Every design lives in `--out/designs/<key>/`: an epoch checkpoint while it
//! trains (a killed sweep resumes there) and `result.json` when it is done
//! (not run again unless its settings changed). `STRUCTURED.md`,
//! `structured.json` and the plots are written from the finished designs.
//!
//! # Decisions
//!
//! * One recipe for every design (the thesis trains each design the same
//!   way): Adam, lr 0.002 with cosine decay, batch 100, no weight decay,
//!   `--epochs` passes (4 at full scale: 2 cores; the report says so).
//! * Blocks of 16 × 16 (edge blocks smaller), the kept blocks drawn from the
//!   seed before training (the sources' static block-wise connections);
//!   every layer is block-sparse, the first and the last included, except
//!   in `-dfl` designs (first and last dense, as `--dense-first-last`).
//! * PACT clips start at `--clip` (2.0) and are learned; the input image is 8-bit
//!   fixed point. `k_a = 32` means float activations in training and the
//!   file's 16-bit fixed point in inference.
//! * Weight memory ratios are against the float network of the same shape:
//!   `32·params / (8·file bytes)`; the file holds the float biases too.
//! * Deep-sparse against shallow-dense: for every design with `c > 1`, the
//!   dense design (`c = 1`, same `k_w` and `k_a`) of smaller depth whose
//!   total memory is nearest, when within a factor 1.25 (MLPs only: the
//!   CNN's depth is fixed).
//! * The CNN designs use the same recipe plus the CNN's augmentation
//!   (random crops of the 4-padded image, horizontal flips), and no
//!   normalisation of the input (the 8-bit input is the raw image). The
//!   CNN has batch norm after every layer but the last; it stays float
//!   and is counted in the file.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use qgrad_data::Dataset;
use qgrad_design::{activation_memory, pareto_front, ActivationMemoryConfig, Point};
use qgrad_models::methods::{BlockSelection, BlockSparsityOptions, StructuredOptions, WeightScale};
use qgrad_models::net::PactConfig;
use qgrad_models::train::OptimizerKind;
use qgrad_models::{Arch, DatasetKind, LrSchedule, TrainConfig};
use qgrad_pipeline::{compress_structured, export_and_evaluate, run_structured, ExportOptions};
use qgrad_pipeline::{MethodRun, Start};
use serde::{Deserialize, Serialize};

use crate::fsutil::{write_atomic, write_atomic_with};
use crate::reproduce::{load_json, save_json};

/// The initial PACT clip (module docs).
pub const DEFAULT_CLIP: f32 = 2.0;

/// Epochs of a CIFAR-10 CNN design in the full reproduction (`cnn16`: about
/// 2 minutes an epoch on 2 cores).
pub const CNN_EPOCHS: usize = 8;

/// The network of a design: an MNIST MLP or the CIFAR-10 CNN at a channel
/// multiplier. (Untagged and flattened so that a design's JSON is
/// `{"width": 256, "depth": 2, ...}` or `{"channels": 16, ...}`: the MLP
/// results of earlier sweeps stay valid cache entries.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Net {
    /// `784-w^d-10` on MNIST.
    Mlp {
        /// Hidden units per layer.
        width: u32,
        /// Hidden layers.
        depth: u32,
    },
    /// `cnn-<channels>` on CIFAR-10 (METHOD §15's CNN, its first block
    /// `channels` wide).
    Cnn {
        /// Channels of the first two convolutions.
        channels: u32,
    },
}

impl Net {
    /// `w256x2` or `cnn16`.
    pub fn key(&self) -> String {
        match *self {
            Net::Mlp { width, depth } => format!("w{width}x{depth}"),
            Net::Cnn { channels } => format!("cnn{channels}"),
        }
    }

    /// The network.
    pub fn arch(&self) -> Result<Arch> {
        match *self {
            Net::Mlp { width, depth } => format!("mlp-{width}x{depth}"),
            Net::Cnn { channels } => format!("cnn-{channels}"),
        }
        .parse()
        .map_err(|e| anyhow!("{e}"))
    }

    /// Hidden layers of an MLP (`None` for the CNN, whose depth is fixed).
    fn depth(&self) -> Option<u32> {
        match *self {
            Net::Mlp { depth, .. } => Some(depth),
            Net::Cnn { .. } => None,
        }
    }

    fn dataset(&self) -> DatasetKind {
        match self {
            Net::Mlp { .. } => DatasetKind::Mnist,
            Net::Cnn { .. } => DatasetKind::Cifar10,
        }
    }
}

/// One point of the design space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Design {
    /// The network.
    #[serde(flatten)]
    pub net: Net,
    /// `k_w` (32: float).
    pub weight_bits: u8,
    /// `k_a` (32: float).
    pub act_bits: u8,
    /// Block compression `c` (1: dense).
    pub compression: usize,
    /// The scale of `k_w ≥ 2` (the sweep's default: least squares; the key
    /// ends in `-max` for METHOD §9's `max |W|`).
    pub scale: WeightScale,
    /// The first and the last layer dense (the key ends in `-dfl`); the
    /// sweep's default is every layer block-sparse. Left out of the JSON
    /// when false, so earlier results stay valid cache entries.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dense_first_last: bool,
}

impl Design {
    /// `w256x2-kw2-ka2-c4` (an MLP) or `cnn16-kw2-ka2-c4` (the CNN).
    pub fn key(&self) -> String {
        format!(
            "{}-kw{}-ka{}-c{}{}{}",
            self.net.key(),
            self.weight_bits,
            self.act_bits,
            self.compression,
            if self.scale == WeightScale::Max {
                "-max"
            } else {
                ""
            },
            if self.dense_first_last { "-dfl" } else { "" }
        )
    }

    /// The network.
    pub fn arch(&self) -> Result<Arch> {
        self.net.arch()
    }

    /// The float design of the same shape.
    fn float(&self) -> Design {
        Design {
            weight_bits: 32,
            act_bits: 32,
            compression: 1,
            scale: WeightScale::LeastSquares,
            dense_first_last: false,
            ..*self
        }
    }
}

impl std::str::FromStr for Design {
    type Err = anyhow::Error;
    /// The [`key`](Design::key) form, `w256x2-kw2-ka2-c4` or `cnn16-kw2-ka2-c4`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            anyhow!(
                "design '{s}': expected w<width>x<depth>-kw<bits>-ka<bits>-c<compression> \
                 or cnn<channels>-kw<bits>-ka<bits>-c<compression>"
            )
        };
        let mut parts: Vec<&str> = s.split('-').collect();
        let dense_first_last = parts.last() == Some(&"dfl");
        if dense_first_last {
            parts.pop();
        }
        let scale = match parts.last() {
            Some(&"max") => {
                parts.pop();
                WeightScale::Max
            }
            _ => WeightScale::LeastSquares,
        };
        let [shape, kw, ka, c] = parts.as_slice() else {
            return Err(bad());
        };
        let num = |x: Option<&str>| x.and_then(|v| v.parse::<u64>().ok()).ok_or_else(bad);
        let net = match shape.strip_prefix("cnn") {
            Some(c) => Net::Cnn {
                channels: num(Some(c))? as u32,
            },
            None => {
                let (w, d) = shape
                    .strip_prefix('w')
                    .and_then(|x| x.split_once('x'))
                    .ok_or_else(bad)?;
                Net::Mlp {
                    width: num(Some(w))? as u32,
                    depth: num(Some(d))? as u32,
                }
            }
        };
        let design = Design {
            net,
            weight_bits: num(kw.strip_prefix("kw"))? as u8,
            act_bits: num(ka.strip_prefix("ka"))? as u8,
            compression: num(c.strip_prefix('c'))? as usize,
            scale,
            dense_first_last,
        };
        design.arch()?;
        if dense_first_last && design.compression == 1 {
            return Err(anyhow!("design '{s}': -dfl needs block compression c > 1"));
        }
        StructuredOptions {
            weight_bits: design.weight_bits,
            blocks: Some(BlockSparsityOptions {
                block: (16, 16),
                compression: design.compression,
                selection: BlockSelection::Random { seed: 0 },
                dense_first_last: false,
            }),
            scale,
        }
        .validate()
        .map_err(|e| anyhow!("design '{s}': {e}"))?;
        if ![2, 3, 4, 8, 32].contains(&design.act_bits) {
            return Err(anyhow!("design '{s}': k_a must be 2, 3, 4, 8 or 32"));
        }
        Ok(design)
    }
}

/// The grid of a scale: `quick` is the shipped subset's small grid.
pub fn designs(quick: bool) -> Vec<Design> {
    let d = |width, depth, weight_bits, act_bits, compression| Design {
        net: Net::Mlp { width, depth },
        weight_bits,
        act_bits,
        compression,
        scale: WeightScale::LeastSquares,
        dense_first_last: false,
    };
    let max = |x: Design| Design {
        scale: WeightScale::Max,
        ..x
    };
    let mut out = Vec::new();
    if quick {
        for (w, depth) in [(128, 1), (128, 2), (256, 2)] {
            out.push(d(w, depth, 32, 32, 1));
            out.push(d(w, depth, 2, 2, 4));
            out.push(d(w, depth, 2, 2, 1));
        }
        out.push(max(d(256, 2, 2, 2, 4)));
        out.push(d(256, 2, 3, 32, 8));
        out.push(d(256, 2, 1, 2, 4));
        return out;
    }
    // Small networks first, so that a sweep cut short has whole shapes.
    // Every shape: its float network and the thesis's headline design.
    // Dense 2-bit designs of depth 1 to 3: the shallow-dense side of the
    // comparison.
    for depth in 1..=4 {
        for w in [128, 256, 512, 1024] {
            out.push(d(w, depth, 32, 32, 1));
            out.push(d(w, depth, 2, 2, 4));
            if depth < 4 {
                out.push(d(w, depth, 2, 2, 1));
            }
        }
        if depth == 2 {
            // The axes one at a time around the headline.
            for (kw, ka, c) in [
                (32, 32, 4),
                (2, 32, 1),
                (2, 2, 1),
                (2, 2, 2),
                (2, 2, 8),
                (2, 2, 16),
                (1, 2, 4),
                (3, 3, 4),
                (4, 4, 4),
                (8, 8, 4),
                (3, 32, 8),
                (3, 3, 8),
            ] {
                out.push(d(256, 2, kw, ka, c));
            }
            // METHOD §9's scale α = max |W| beside the least-squares one.
            for (kw, ka, c) in [(2, 2, 4), (3, 32, 8), (8, 8, 4)] {
                out.push(max(d(256, 2, kw, ka, c)));
            }
            // The companion paper's point on the wider networks, with every
            // layer sparse and with the first and last dense.
            for w in [512, 1024] {
                out.push(d(w, 2, 3, 32, 8));
                out.push(Design {
                    dense_first_last: true,
                    ..d(w, 2, 3, 32, 8)
                });
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|x| seen.insert(*x));
    out
}

/// The CIFAR-10 grid: the CNN at channel multipliers 8, 16 and 32, each
/// with its float network and the headline design (2-bit weights, 2-bit
/// activations, 4x blocks); at 16 channels the headline's two halves
/// alone (quantization only, structure only), 8x blocks, and the first and
/// last layer dense beside it.
/// Smallest networks first.
pub fn cnn_designs() -> Vec<Design> {
    let d = |channels, weight_bits, act_bits, compression| Design {
        net: Net::Cnn { channels },
        weight_bits,
        act_bits,
        compression,
        scale: WeightScale::LeastSquares,
        dense_first_last: false,
    };
    vec![
        d(8, 32, 32, 1),
        d(8, 2, 2, 4),
        d(16, 32, 32, 1),
        d(16, 2, 2, 4),
        d(16, 2, 2, 1),
        d(16, 32, 32, 4),
        d(16, 2, 2, 8),
        Design {
            dense_first_last: true,
            ..d(16, 2, 2, 4)
        },
        d(32, 32, 32, 1),
        d(32, 2, 2, 4),
    ]
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The data set of the designs: MNIST's folder for MLPs, CIFAR-10's
    /// for the CNN (one data set per sweep).
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// The designs.
    pub designs: Vec<Design>,
    /// Epochs per design.
    pub epochs: usize,
    /// Use at most this many training images (all: `None`).
    pub train_limit: Option<usize>,
    /// The seed of initialisation, masks and batches.
    pub seed: u64,
    /// Only rewrite the report from finished designs.
    pub report_only: bool,
    /// Progress bars.
    pub progress: bool,
    /// The initial PACT clip.
    pub clip: f32,
}

/// The recipe every design shares (module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecipe {
    /// Epochs.
    pub epochs: usize,
    /// Adam's learning rate (cosine decay to 0).
    pub lr: f64,
    /// Batch size.
    pub batch_size: usize,
    /// Block shape.
    pub block: (usize, usize),
    /// Initial PACT clip.
    pub clip: f32,
    /// Bits of the input image.
    pub input_bits: u8,
    /// Training images used.
    pub train_images: usize,
    /// Test images.
    pub test_images: usize,
    /// Seed.
    pub seed: u64,
}

impl SweepRecipe {
    /// The training configuration of the recipe (float, no PACT: a design
    /// adds its activations).
    pub fn train_config(&self, arch: Arch) -> TrainConfig {
        let mut config = TrainConfig::default_for(arch);
        config.epochs = self.epochs;
        config.lr = self.lr;
        config.batch_size = self.batch_size;
        config.weight_decay = 0.0;
        config.optimizer = OptimizerKind::ADAM;
        config.schedule = LrSchedule::Cosine { min_lr: 0.0 };
        config.seed = self.seed;
        config
    }
}

/// One finished design.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesignResult {
    /// The design.
    pub design: Design,
    /// The recipe it ran with.
    pub recipe: SweepRecipe,
    /// Parameters of the network.
    pub params: u64,
    /// Bytes of its compressed file.
    pub file_bytes: u64,
    /// Activation memory, bits (METHOD §9).
    pub activation_bits: u64,
    /// Weight memory bits + activation bits.
    pub total_bits: u64,
    /// Test accuracy of the quantized model in candle.
    pub accuracy: f64,
    /// Test accuracy of the file run with the integer kernels.
    pub file_accuracy: f64,
    /// Images on which the two disagree.
    pub mismatches: usize,
    /// Fraction of weights kept by the masks.
    pub density: f64,
    /// Training seconds.
    pub seconds: f64,
}

impl DesignResult {
    /// Test error (of the file) in percent.
    pub fn error_percent(&self) -> f64 {
        100.0 * (1.0 - self.file_accuracy)
    }

    /// `32·params / (8·file bytes)`.
    pub fn weight_ratio(&self) -> f64 {
        32.0 * self.params as f64 / (8.0 * self.file_bytes as f64)
    }
}

/// Runs every design not finished yet, then writes the report.
pub fn run(opts: &SweepOptions) -> Result<Vec<DesignResult>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let mut results = Vec::new();
    if !opts.report_only {
        let kind = sweep_dataset(&opts.designs)?;
        let (mut train_set, test_set) = match kind {
            DatasetKind::Mnist => qgrad_data::mnist::load_mnist(&opts.data)
                .with_context(|| format!("cannot load MNIST from {}", opts.data.display()))?,
            DatasetKind::Cifar10 => qgrad_data::cifar::load_cifar10(&opts.data)
                .with_context(|| format!("cannot load CIFAR-10 from {}", opts.data.display()))?,
        };
        if let Some(n) = opts.train_limit {
            train_set = train_set.take(n);
        }
        let total = opts.designs.len();
        for (i, design) in opts.designs.iter().enumerate() {
            let r = run_design(opts, design, (&train_set, &test_set), (i + 1, total))?;
            results.push(r);
        }
    } else {
        for design in &opts.designs {
            if let Some(r) = load_json::<DesignResult>(&result_path(opts, design)) {
                results.push(r);
            }
        }
    }
    write_report(&results, &opts.out)?;
    Ok(results)
}

/// The one data set of a sweep's designs.
fn sweep_dataset(designs: &[Design]) -> Result<DatasetKind> {
    let mut kinds: Vec<DatasetKind> = designs.iter().map(|d| d.net.dataset()).collect();
    kinds.dedup();
    match kinds.as_slice() {
        [] => Ok(DatasetKind::Mnist),
        [one] => Ok(*one),
        _ => Err(anyhow!(
            "a sweep runs on one data set: MLP (MNIST) and CNN (CIFAR-10) designs go in separate runs"
        )),
    }
}

fn result_path(opts: &SweepOptions, design: &Design) -> PathBuf {
    opts.out
        .join("designs")
        .join(design.key())
        .join("result.json")
}

fn recipe(opts: &SweepOptions, train: &Dataset, test: &Dataset) -> SweepRecipe {
    SweepRecipe {
        epochs: opts.epochs,
        lr: 0.002,
        batch_size: 100,
        block: (16, 16),
        clip: opts.clip,
        input_bits: 8,
        train_images: train.len(),
        test_images: test.len(),
        seed: opts.seed,
    }
}

fn run_design(
    opts: &SweepOptions,
    design: &Design,
    (train_set, test_set): (&Dataset, &Dataset),
    (index, total): (usize, usize),
) -> Result<DesignResult> {
    let r = recipe(opts, train_set, test_set);
    let path = result_path(opts, design);
    if let Some(done) = load_json::<DesignResult>(&path) {
        if done.recipe == r && done.design == *design {
            return Ok(done);
        }
    }
    let dir = path.parent().expect("a design folder").to_path_buf();
    let arch = design.arch()?;
    eprintln!("[structured {index}/{total}] {}", design.key());
    let t0 = Instant::now();
    let mut config = r.train_config(arch);
    config.progress = opts.progress;
    config.checkpoint_dir = Some(dir.join("run"));
    config.pact = (design.act_bits < 32).then_some(PactConfig {
        bits: design.act_bits,
        clip: r.clip,
        learned: true,
        input_bits: r.input_bits,
    });
    let options = StructuredOptions {
        weight_bits: design.weight_bits,
        blocks: (design.compression > 1).then_some(BlockSparsityOptions {
            block: r.block,
            compression: design.compression,
            selection: BlockSelection::Random { seed: r.seed },
            dense_first_last: design.dense_first_last,
        }),
        scale: design.scale,
    };
    let device = qgrad_pipeline::default_device();
    let run = MethodRun {
        arch,
        config,
        options,
        start: Start::Scratch,
        device: device.clone(),
    };
    let outcome = run_structured(run, (train_set, test_set), &mut [])?;
    let seconds = t0.elapsed().as_secs_f64();
    let kept: usize = outcome.hook.masks().iter().map(|m| m.kept()).sum();
    let masked_total: usize = outcome.hook.masks().iter().map(|m| m.keep.len()).sum();
    let weights: usize = arch
        .parameter_shapes()
        .iter()
        .filter(|(n, _)| n.ends_with(".weight"))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let density = (kept + weights - masked_total) as f64 / weights as f64;
    let model = compress_structured(&outcome, serde_json::to_value(design)?)?;
    let file = dir.join("model.qgz");
    let export = ExportOptions {
        act_bits: qgrad_runtime::DEFAULT_ACT_BITS,
        layout: qgrad_csr::LayoutChoice::Auto,
        device,
        run_file: true,
    };
    let out = export_and_evaluate(&model, &file, test_set, &export)?;
    let file_report = out
        .file
        .as_ref()
        .ok_or_else(|| anyhow!("the file was not run"))?;
    let file_bytes = std::fs::metadata(&file)?.len();
    let act = activation_memory(
        arch,
        &ActivationMemoryConfig {
            act_bits: design.act_bits,
            input_bits: if design.act_bits < 32 {
                r.input_bits
            } else {
                32
            },
        },
    )?;
    let result = DesignResult {
        design: *design,
        recipe: r,
        params: arch.num_parameters() as u64,
        file_bytes,
        activation_bits: act.bits,
        total_bits: qgrad_design::total_memory_bits(file_bytes, &act),
        accuracy: out.candle.accuracy,
        file_accuracy: file_report.accuracy,
        mismatches: out.mismatches().unwrap_or(0),
        density,
        seconds,
    };
    eprintln!(
        "[structured {index}/{total}] {}: {:.2} % from the file ({} mismatches), {} bytes ({:.1}x), {:.0} s",
        design.key(),
        100.0 * result.file_accuracy,
        result.mismatches,
        file_bytes,
        result.weight_ratio(),
        seconds
    );
    save_json(&path, &result)?;
    // The epoch checkpoints are only for resuming.
    let _ = std::fs::remove_dir_all(dir.join("run"));
    Ok(result)
}

fn kib(bits: u64) -> f64 {
    bits as f64 / 8.0 / 1024.0
}

/// The float result of the same shape, if finished.
fn float_of<'a>(results: &'a [DesignResult], d: &Design) -> Option<&'a DesignResult> {
    results.iter().find(|r| r.design == d.float())
}

/// Writes `STRUCTURED.md`, `structured.json` and the plots.
pub fn write_report(results: &[DesignResult], out: &Path) -> Result<()> {
    save_json(&out.join("structured.json"), &results)?;
    let mut md = String::new();
    writeln!(
        md,
        "# Structured sparsity with low-bit weights and activations (METHOD §9)\n"
    )?;
    if results.is_empty() {
        writeln!(md, "No design has finished yet.")?;
        write_atomic(&out.join("STRUCTURED.md"), md.as_bytes())?;
        return Ok(());
    }
    let r0 = &results[0].recipe;
    let networks = match results[0].design.net.dataset() {
        DatasetKind::Mnist => "MLPs 784-w^d-10 on MNIST",
        DatasetKind::Cifar10 => {
            "The CIFAR-10 CNN 2×cC3-MP2-2×2cC3-MP2-2×4cC3-MP2-8c-8c-10 with batch norm \
             (`cnn<c>`: channel multiplier c; random crops of the 4-padded image and horizontal flips) on CIFAR-10"
        }
    };
    writeln!(
        md,
        "{networks} ({} training, {} test images), every design trained the same way: \
         Adam lr {} with cosine decay, batch {}, {} epochs, seed {}; block masks of {}×{} drawn from the \
         seed before training, every layer block-sparse (first and last included) unless the key ends in \
         `-dfl` (first and last dense); weights symmetric \
         uniform at `k_w` bits (1 bit: α·sign(W), α = mean |W|), activations PACT at `k_a` bits with learned \
         clips starting at {}, the input image at {} bits. Accuracy is the file's, run with the integer \
         kernels (it equals the candle evaluation of the same quantized model image for image: the \
         mismatch column). Weight memory is the file's bytes (float biases and PACT clips included); \
         activation memory is METHOD §9's (input plus the widest pair of consecutive layer outputs at \
         `k_a` bits, batch 1); total = weights + activations.\n",
        r0.train_images,
        r0.test_images,
        r0.lr, r0.batch_size, r0.epochs, r0.seed, r0.block.0,
        r0.block.1, r0.clip, r0.input_bits
    )?;
    // Targets.
    writeln!(md, "## Targets\n")?;
    writeln!(
        md,
        "| target | design | accuracy | float of the shape | weight memory vs float | met |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- |")?;
    let mut target_rows = 0;
    for r in results {
        let d = r.design;
        let float = float_of(results, &d);
        let fa = float.map(|f| f.file_accuracy);
        let cnn = matches!(d.net, Net::Cnn { .. });
        let (name, met) = match (d.weight_bits, d.act_bits, d.compression) {
            (2, 2, 4) if cnn => (
                "CIFAR-10 CNN, 2-bit w, 2-bit a, 4x: within 2 pt",
                fa.map(|fa| fa - r.file_accuracy <= 0.02),
            ),
            (2, 2, 4) => (
                "2-bit w, 2-bit a, 4x: ≥ 45x smaller, within 1 pt",
                fa.map(|fa| r.weight_ratio() >= 45.0 && fa - r.file_accuracy <= 0.01),
            ),
            (3, _, 8) if !cnn => ("3-bit w, 8x: ≥ 98.4 %", Some(r.file_accuracy >= 0.984)),
            _ => continue,
        };
        target_rows += 1;
        writeln!(
            md,
            "| {name} | {} | {:.2} % | {} | {:.1}x | {} |",
            d.key(),
            100.0 * r.file_accuracy,
            fa.map_or("–".into(), |a| format!("{:.2} %", 100.0 * a)),
            r.weight_ratio(),
            match met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "(no float run)",
            }
        )?;
    }
    if target_rows == 0 {
        writeln!(md, "| (no target design finished) | | | | | |")?;
    }
    // The front.
    let points: Vec<Point> = results
        .iter()
        .map(|r| Point::new(r.total_bits as f64, r.error_percent()))
        .collect();
    let front = pareto_front(&points)?;
    let weight_points: Vec<Point> = results
        .iter()
        .map(|r| Point::new(8.0 * r.file_bytes as f64, r.error_percent()))
        .collect();
    let weight_front = pareto_front(&weight_points)?;
    writeln!(
        md,
        "\n## Pareto front by total memory: {} optimal designs of {} (the thesis found 11)\n",
        front.len(),
        results.len()
    )?;
    writeln!(
        md,
        "| design | total KiB | weights KiB | activations KiB | error % |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- |")?;
    for &i in &front {
        let r = &results[i];
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} |",
            r.design.key(),
            kib(r.total_bits),
            r.file_bytes as f64 / 1024.0,
            kib(r.activation_bits),
            r.error_percent()
        )?;
    }
    writeln!(
        md,
        "\n## Pareto front by weight memory alone: {} optimal designs\n",
        weight_front.len()
    )?;
    writeln!(
        md,
        "| design | weights KiB | error % | also on the total front |"
    )?;
    writeln!(md, "| --- | --- | --- | --- |")?;
    for &i in &weight_front {
        let r = &results[i];
        writeln!(
            md,
            "| {} | {:.1} | {:.2} | {} |",
            r.design.key(),
            r.file_bytes as f64 / 1024.0,
            r.error_percent(),
            if front.contains(&i) { "yes" } else { "no" }
        )?;
    }
    // Deep-sparse against shallow-dense.
    writeln!(
        md,
        "\n## Deep-sparse against shallow-dense at equal total memory\n"
    )?;
    writeln!(
        md,
        "| deep-sparse | total KiB | error % | shallow-dense | total KiB | error % | better |"
    )?;
    writeln!(md, "| --- | --- | --- | --- | --- | --- | --- |")?;
    let mut pairs = 0;
    for r in results.iter().filter(|r| r.design.compression > 1) {
        let d = r.design;
        let best = results
            .iter()
            .filter(|s| {
                let e = s.design;
                let shallower = match (e.net.depth(), d.net.depth()) {
                    (Some(a), Some(b)) => a < b,
                    _ => false,
                };
                e.compression == 1
                    && shallower
                    && e.weight_bits == d.weight_bits
                    && e.act_bits == d.act_bits
            })
            .map(|s| (s, (s.total_bits as f64 / r.total_bits as f64).ln().abs()))
            .filter(|(_, gap)| *gap <= 1.25f64.ln())
            .min_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((s, _)) = best {
            pairs += 1;
            writeln!(
                md,
                "| {} | {:.1} | {:.2} | {} | {:.1} | {:.2} | {} |",
                d.key(),
                kib(r.total_bits),
                r.error_percent(),
                s.design.key(),
                kib(s.total_bits),
                s.error_percent(),
                if r.error_percent() < s.error_percent() {
                    "deep-sparse"
                } else if r.error_percent() > s.error_percent() {
                    "shallow-dense"
                } else {
                    "tie"
                }
            )?;
        }
    }
    if pairs == 0 {
        writeln!(
            md,
            "| (no pair within a factor 1.25 of memory) | | | | | | |"
        )?;
    }
    // Every design.
    writeln!(md, "\n## Every design\n")?;
    writeln!(
        md,
        "| design | params | density | file bytes | vs float | act. KiB | total KiB | accuracy (file) | float of the shape | Δ pt | mismatches | train s |"
    )?;
    writeln!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    let mut sorted: Vec<&DesignResult> = results.iter().collect();
    sorted.sort_by_key(|r| {
        (
            r.design.net,
            std::cmp::Reverse(r.design.weight_bits),
            r.design.compression,
        )
    });
    for r in sorted {
        let fa = float_of(results, &r.design).map(|f| f.file_accuracy);
        writeln!(
            md,
            "| {} | {} | {:.3} | {} | {:.1}x | {:.2} | {:.1} | {:.2} % | {} | {} | {} | {:.0} |",
            r.design.key(),
            r.params,
            r.density,
            r.file_bytes,
            r.weight_ratio(),
            kib(r.activation_bits),
            kib(r.total_bits),
            100.0 * r.file_accuracy,
            fa.map_or("–".into(), |a| format!("{:.2} %", 100.0 * a)),
            fa.map_or("–".into(), |a| format!(
                "{:+.2}",
                100.0 * (r.file_accuracy - a)
            )),
            r.mismatches,
            r.seconds
        )?;
    }
    writeln!(
        md,
        "\n![Pareto front by total memory](plots/structured-total.png)\n\n![Pareto front by weight memory](plots/structured-weights.png)"
    )?;
    write_atomic(&out.join("STRUCTURED.md"), md.as_bytes())?;
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots)?;
    front_plot(
        &plots.join("structured-total.png"),
        "Designs by total memory (weights + activations)",
        "total memory, KiB (log)",
        &points,
        &front,
    )?;
    front_plot(
        &plots.join("structured-weights.png"),
        "Designs by weight memory (file bytes)",
        "weight memory, KiB (log)",
        &weight_points,
        &weight_front,
    )?;
    Ok(())
}

/// Dominated designs as points, the front as a line, memory on a log axis.
fn front_plot(
    file: &Path,
    title: &str,
    x_desc: &str,
    points: &[Point],
    front: &[usize],
) -> Result<()> {
    let kib = |p: &Point| p.memory / 8.0 / 1024.0;
    let xs: Vec<f64> = points.iter().map(kib).collect();
    let errors: Vec<f64> = points.iter().map(|p| p.error).collect();
    write_atomic_with(file, |tmp| {
        let err = |e: &dyn std::fmt::Display| anyhow!("plot: {e}");
        let root = BitMapBackend::new(tmp, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let (mut chart, y_min) =
            crate::plot::log_error_chart(&root, (title, x_desc), &xs, &errors, 14)?;
        let dominated: Vec<(f64, f64)> = points
            .iter()
            .enumerate()
            .filter(|(i, _)| !front.contains(i))
            .map(|(_, p)| (kib(p), p.error.max(y_min)))
            .collect();
        chart
            .draw_series(
                dominated
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, RGBColor(150, 150, 150).filled())),
            )
            .map_err(|e| err(&e))?
            .label("dominated designs")
            .legend(|(x, y)| Circle::new((x + 10, y), 3, RGBColor(150, 150, 150).filled()));
        let line: Vec<(f64, f64)> = front
            .iter()
            .map(|&i| (kib(&points[i]), points[i].error.max(y_min)))
            .collect();
        crate::plot::draw_front(&mut chart, &line, BLUE, "Pareto front")?;
        crate::plot::draw_legend(&mut chart, 14)?;
        root.present().map_err(|e| err(&e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_keys_round_trip_and_bad_ones_are_refused() {
        for quick in [true, false] {
            for d in designs(quick) {
                assert_eq!(d.key().parse::<Design>().unwrap(), d);
            }
        }
        for d in cnn_designs() {
            assert_eq!(d.key().parse::<Design>().unwrap(), d);
            assert_eq!(d.arch().unwrap().dataset(), DatasetKind::Cifar10);
        }
        assert!(cnn_designs().contains(&"cnn16-kw2-ka2-c4".parse().unwrap()));
        for bad in [
            "cnn-16-kw2-ka2-c4",
            "cnn16x2-kw2-ka2-c4",
            "w256x2-kw2-ka2",
            "w256-kw2-ka2-c4",
            "w256x2-kw5-ka2-c4",
            "w256x2-kw2-ka5-c4",
            "w256x2-kw2-ka2-c3",
            "w0x2-kw2-ka2-c4",
            "w256x2-kw2-ka2-c4-min",
            "w256x2-kw2-ka2-c1-dfl",
            "w256x2-kw2-ka2-c4-dfl-max",
        ] {
            assert!(bad.parse::<Design>().is_err(), "{bad}");
        }
        let full = designs(false);
        let unique: std::collections::HashSet<_> = full.iter().collect();
        assert_eq!(unique.len(), full.len());
        // Every shape has its float network, so every design has a baseline.
        for d in &full {
            assert!(full.contains(&d.float()), "{}", d.key());
        }
    }

    #[test]
    fn design_json_keeps_the_mlp_fields_and_adds_the_cnn() {
        // The form of every result.json written before the CNN existed.
        let old = r#"{"width":256,"depth":2,"weight_bits":2,"act_bits":2,"compression":4,"scale":"least-squares"}"#;
        let d: Design = serde_json::from_str(old).unwrap();
        assert_eq!(d, "w256x2-kw2-ka2-c4".parse().unwrap());
        assert_eq!(serde_json::to_string(&d).unwrap(), old);
        let dfl: Design = "w512x2-kw3-ka32-c8-max-dfl".parse().unwrap();
        assert!(dfl.dense_first_last && dfl.scale == WeightScale::Max);
        assert!(serde_json::to_string(&dfl)
            .unwrap()
            .ends_with(r#""dense_first_last":true}"#));
        let cnn: Design = "cnn16-kw2-ka2-c4-max".parse().unwrap();
        let json = serde_json::to_string(&cnn).unwrap();
        assert!(json.starts_with(r#"{"channels":16,"#), "{json}");
        assert_eq!(serde_json::from_str::<Design>(&json).unwrap(), cnn);
        // One data set per sweep.
        let mixed = [d, cnn];
        assert!(sweep_dataset(&mixed).is_err());
        assert_eq!(sweep_dataset(&mixed[1..]).unwrap(), DatasetKind::Cifar10);
    }

    #[test]
    fn the_cnn_report_checks_the_two_point_target_and_pairs_no_depths() {
        let results = vec![
            result("cnn16-kw32-ka32-c1", 900_000, 800_000, 0.80),
            result("cnn16-kw2-ka2-c4", 17_000, 60_000, 0.785),
            result("cnn8-kw32-ka32-c1", 230_000, 400_000, 0.70),
            result("cnn8-kw2-ka2-c4", 8_000, 30_000, 0.60),
        ];
        let dir = tempfile::tempdir().unwrap();
        write_report(&results, dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("STRUCTURED.md")).unwrap();
        assert!(md.contains("on CIFAR-10"), "{md}");
        assert!(
            md.contains("| CIFAR-10 CNN, 2-bit w, 2-bit a, 4x: within 2 pt | cnn16-kw2-ka2-c4 | 78.50 % | 80.00 % |"),
            "{md}"
        );
        assert!(
            md.contains("| cnn8-kw2-ka2-c4 | 60.00 % | 70.00 % |"),
            "{md}"
        );
        assert!(md.contains("| no |"), "{md}");
        assert!(
            md.contains("(no pair within a factor 1.25 of memory)"),
            "{md}"
        );
    }

    fn result(key: &str, file_bytes: u64, activation_bits: u64, accuracy: f64) -> DesignResult {
        let design: Design = key.parse().unwrap();
        DesignResult {
            design,
            recipe: SweepRecipe {
                epochs: 1,
                lr: 0.002,
                batch_size: 100,
                block: (16, 16),
                clip: 2.0,
                input_bits: 8,
                train_images: 10,
                test_images: 10,
                seed: 1,
            },
            params: design.arch().unwrap().num_parameters() as u64,
            file_bytes,
            activation_bits,
            total_bits: 8 * file_bytes + activation_bits,
            accuracy,
            file_accuracy: accuracy,
            mismatches: 0,
            density: 1.0,
            seconds: 1.0,
        }
    }

    #[test]
    fn the_report_lists_the_fronts_targets_and_pairs() {
        let results = vec![
            result("w256x2-kw32-ka32-c1", 1_000_000, 32_000, 0.98),
            // 82x, 0.5 pt below float: meets the headline target.
            result("w256x2-kw2-ka2-c4", 13_000, 7_000, 0.975),
            // Dominated by the design above (more memory, more error).
            result("w256x2-kw2-ka2-c2", 20_000, 7_000, 0.97),
            // The shallow-dense partner of a deep-sparse design.
            result("w256x1-kw2-ka2-c1", 14_000, 7_000, 0.96),
        ];
        let dir = tempfile::tempdir().unwrap();
        write_report(&results, dir.path()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("STRUCTURED.md")).unwrap();
        // The headline design dominates the other two low-bit ones.
        assert!(md.contains("2 optimal designs of 4"), "{md}");
        assert!(
            md.contains("| w256x2-kw2-ka2-c4 | 97.50 % | 98.00 % | 82.9x | yes |"),
            "{md}"
        );
        assert!(
            md.contains("| w256x2-kw2-ka2-c4 | 13.5 | 2.50 | w256x1-kw2-ka2-c1 | 14.5 | 4.00 | deep-sparse |"),
            "{md}"
        );
        assert!(dir.path().join("plots/structured-total.png").is_file());
        assert!(dir.path().join("plots/structured-weights.png").is_file());
    }
}
