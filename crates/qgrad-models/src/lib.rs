//! Models, datasets, the training loop and the three accumulated-gradient
//! quantization methods (METHOD.md §3–5, §7).
//!
//! Design rationale: every network is data (`arch::Arch::layers()`), and the
//! training forward pass (`net`), the quantized evaluation and the integer
//! inference interpret that one list, so they cannot drift apart. Training
//! state (parameters, momentum, accumulated gradients, freeze masks, batch-norm
//! buffers) lives on the training device and is checkpointed as safetensors, so
//! a killed run resumes bit-identically: every random choice derives from
//! `(seed, epoch)`, not from state carried between epochs.
pub mod arch;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod export;
pub mod int_infer;
pub mod net;
pub mod optim;
pub mod quantize;
pub mod train;

pub use arch::{Arch, DatasetKind, LayerSpec};
pub use error::{ModelsError, Result};
pub use net::{NamedTensor, Network};
pub use optim::{LrSchedule, Sgd};
pub use train::{train, EpochHook, EpochStats, TrainConfig, TrainReport, TrainState};
