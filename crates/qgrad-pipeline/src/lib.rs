//! `qgrad-pipeline`: the one pipeline behind the `qgrad` CLI and
//! `cargo xtask reproduce`. The binaries parse arguments, call these steps
//! and print; the steps themselves are written once, here:
//!
//! 1. [`data`]: find and load the data set;
//! 2. [`trained`]: train a float baseline (resumable) or load one;
//! 3. a method: [`compress_post_training`], or an in-training run
//!    ([`in_training::run_in_training`]) and then [`compress_in_training`] or
//!    [`compress_combined`], or a loss-aware run ([`run_loss_aware`]), or a
//!    structured run (block masks, `k_w`-bit weights, PACT activations:
//!    [`run_structured`], [`compress_structured`]);
//! 4. [`export_and_evaluate`]: write the file, evaluate the quantized model in
//!    candle, run the file with the integer kernels.
//!
//! # The accumulated gradients of a fine-tuned baseline (decided)
//!
//! METHOD §1 defines `A` as the sum of `|∂L/∂θ|` over every optimizer step
//! of the training process. When in-training quantization fine-tunes a
//! trained baseline, the baseline's steps are part of that process, so the
//! default is [`AccumStart::Carry`]: the run starts with the baseline's `A`
//! and adds its own steps. [`AccumStart::Zero`] (rank only by the
//! fine-tuning's gradients) is the option. The CLI (`--accum-start`) and the
//! reproduction use the same default, so their numbers are one experiment.
//!
//! ```
//! use qgrad_data::Dataset;
//! use qgrad_models::methods::PostTrainingOptions;
//! use qgrad_models::{Arch, TrainConfig};
//! use qgrad_pipeline::{compress_post_training, export_and_evaluate, train_float, ExportOptions};
//!
//! // A float LeNet-300-100 trained one epoch on 64 synthetic images.
//! let data = Dataset {
//!     images: (0..64 * 784).map(|i| (i * 31 % 253) as u8).collect(),
//!     labels: (0..64).map(|i| (i % 10) as u8).collect(),
//!     shape: [1, 28, 28],
//!     num_classes: 10,
//! };
//! let arch = Arch::Lenet300100;
//! let mut config = TrainConfig::default_for(arch);
//! (config.epochs, config.batch_size, config.progress) = (1, 16, false);
//! let device = qgrad_pipeline::default_device();
//! let trained = train_float(arch, &config, &device, (&data, &data), &mut [], |_| {})?;
//!
//! // Post-training quantization to 8, 4 and 0 bits, written and run.
//! let host = trained.to_host(trained.normalization(&data))?;
//! let opts = PostTrainingOptions { widths: vec![8, 4, 0], ..Default::default() };
//! let model = compress_post_training(&host, &opts, serde_json::json!({}), Some(1))?;
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("lenet.qgz");
//! let export = ExportOptions {
//!     act_bits: 16,
//!     layout: qgrad_csr::LayoutChoice::Auto,
//!     device,
//!     run_file: true,
//! };
//! let out = export_and_evaluate(&model, &path, &data, &export)?;
//! assert_eq!(out.size.file_bytes, std::fs::metadata(&path)?.len());
//! assert!(out.size.ratio > 5.0);
//! assert_eq!(out.mismatches(), Some(0)); // the file computes what candle computes
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod compress;
pub mod data;
pub mod data_parallel;
pub mod error;
pub mod in_training;
pub mod interchange;
pub mod loss_aware;
pub mod structured;
pub mod trained;

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

pub use compress::{
    compress_combined, compress_in_training, compress_loss_aware, compress_loss_aware_state,
    compress_post_training, export_and_evaluate, run_file, Compressed, ExportOptions, Exported,
};
pub use data_parallel::{
    run_data_parallel, run_on_threads, DataParallelOutcome, DataParallelRun, ParallelWeights,
    Resumed,
};
pub use error::{FailureKind, PipelineError, Result};
pub use in_training::{run_in_training, InTrainingOutcome, InTrainingRun, MethodRun, Start};
pub use loss_aware::{run_loss_aware, LossAwareOutcome, LossAwareRun};
pub use structured::{compress_structured, run_structured, StructuredOutcome, StructuredRun};
pub use trained::{load_trained, train_float, HostModel, Trained};

/// Images per evaluation batch (candle and integer kernels alike).
pub const EVAL_BATCH: usize = 500;

/// How an in-training run from a trained baseline starts its accumulated
/// gradients (crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccumStart {
    /// Carry the baseline's `A` on (METHOD §1's sum over the whole training
    /// process; the default).
    #[default]
    Carry,
    /// Start at zero: rank by the fine-tuning's gradients only.
    Zero,
}

impl FromStr for AccumStart {
    type Err = PipelineError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "carry" => Ok(AccumStart::Carry),
            "zero" => Ok(AccumStart::Zero),
            _ => Err(PipelineError::usage(format!(
                "unknown accumulated-gradient start '{s}' (expected carry or zero)"
            ))),
        }
    }
}

impl fmt::Display for AccumStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccumStart::Carry => "carry",
            AccumStart::Zero => "zero",
        })
    }
}

/// The training device: the first CUDA device when built with the `cuda`
/// feature and one is there, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}
