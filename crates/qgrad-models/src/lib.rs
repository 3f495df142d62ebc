//! `qgrad-models`: the training side of qgrad on candle: the network that
//! interprets a [`qgrad_runtime::spec`] description, the staged training loop,
//! checkpoints, the compression methods (one module each) and the export to
//! the compressed file.
//!
//! Design rationale: every network is data (`Arch::layers()`, in the
//! candle-free `qgrad-runtime`), and the training forward pass ([`net`]), the
//! quantized evaluation ([`eval`]) and the integer inference from the file
//! (`qgrad_runtime::FileModel`) interpret that one list, so they cannot drift
//! apart. Training state (parameters, optimizer state, accumulated gradients,
//! freeze masks, batch-norm buffers) lives on the training device and is
//! checkpointed as safetensors with a checksum, so a killed run resumes
//! bit-identically: every random choice derives from `(seed, epoch)`, not
//! from state carried between epochs.
//!
//! A training step runs in named stages where a method plugs in
//! ([`train::TrainHook`]): after backward the gradients may be transformed
//! (a quantized all-reduce) and are then observed (the accumulated-gradient
//! bookkeeping of METHOD §1 is such an observer); after the update weights
//! may be projected or masked; after each epoch in-training quantization
//! splits.
//!
//! ```
//! use candle_core::Device;
//! use qgrad_models::data::{Dataset, Normalization};
//! use qgrad_models::{train, Arch, TrainConfig, TrainState};
//!
//! // 64 random 28×28 images, two epochs of LeNet-300-100 with SGD.
//! let data = Dataset {
//!     images: (0..64 * 784).map(|i| (i * 37 % 251) as u8).collect(),
//!     labels: (0..64).map(|i| (i % 10) as u8).collect(),
//!     shape: [1, 28, 28],
//!     num_classes: 10,
//! };
//! let mut config = TrainConfig::default_for(Arch::Lenet300100);
//! config.epochs = 2;
//! config.batch_size = 16;
//! config.progress = false;
//! let mut state = TrainState::new(Arch::Lenet300100, &Device::Cpu, &config)?;
//! let report = train(&mut state, &data, &data, &config, &mut [])?;
//! assert_eq!(report.epochs.len(), 2);
//! // A = Σ |g| over every step: 8 steps of SGD.
//! assert_eq!(state.accum.steps(), 8);
//! # Ok::<(), qgrad_models::ModelsError>(())
//! ```
#![warn(missing_docs)]

pub mod checkpoint;
pub mod error;
pub mod eval;
pub mod export;
pub mod methods;
pub mod net;
pub mod train;

/// The datasets (re-exported from `qgrad-data`).
pub use qgrad_data as data;
/// The optimizers (re-exported from `qgrad-optim`).
pub use qgrad_optim as optim;
/// The network descriptions (re-exported from `qgrad-runtime`).
pub use qgrad_runtime::spec as arch;

pub use error::{ModelsError, Result};
pub use net::{NamedTensor, Network};
pub use qgrad_optim::{LrSchedule, Optimizer, OptimizerConfig};
pub use qgrad_runtime::{Arch, DatasetKind, LayerSpec};
pub use train::{
    train, AccumulateGradients, EpochStats, TrainConfig, TrainHook, TrainReport, TrainState,
};
