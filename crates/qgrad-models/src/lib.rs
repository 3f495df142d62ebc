//! Models, datasets, the training loop and the three accumulated-gradient
//! quantization methods (METHOD.md §3–5, §7).
pub mod arch;
pub mod data;

pub use arch::{Arch, DatasetKind, LayerSpec};
