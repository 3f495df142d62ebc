//! `qgrad-runtime`: run a compressed model file (`.qgz`) with integer
//! kernels, without candle.
//!
//! This is the deployment side of qgrad. A program that only runs compressed
//! models links this crate, `qgrad-csr` (the file and its kernels),
//! `qgrad-fixed` (fixed-point numbers) and `qgrad-data` (the image loaders),
//! and never compiles candle. It owns:
//!
//! * [`spec`]: the networks as data ([`Arch`], [`LayerSpec`]): the one
//!   description that the training forward pass, the candle evaluation of the
//!   quantized model and this runtime all interpret;
//! * [`metadata`]: the keys a file carries so that it can run on its own;
//! * [`infer`]: whole-network inference from the file ([`FileModel`]);
//! * [`pact`]: the learned-clip activations of structured sparsity (METHOD §9).
//!
//! ```
//! use qgrad_csr::{encode, CompressedModel, EncodeOptions, TensorData};
//! use qgrad_data::{Dataset, Normalization};
//! use qgrad_runtime::{Arch, ExportMetadata, FileModel};
//!
//! // A LeNet-300-100 whose weights are all zero and whose fc3 bias favours
//! // class 3, written with 8-bit weights.
//! let arch = Arch::Lenet300100;
//! let shapes = arch.parameter_shapes();
//! let values: Vec<Vec<f32>> = shapes
//!     .iter()
//!     .map(|(name, shape)| {
//!         let mut v = vec![0.0f32; shape.iter().product()];
//!         if name == "fc3.bias" {
//!             v[3] = 0.5;
//!         }
//!         v
//!     })
//!     .collect();
//! let widths: Vec<Vec<u8>> = values.iter().map(|v| vec![8; v.len()]).collect();
//! let tensors: Vec<TensorData> = shapes
//!     .iter()
//!     .zip(values.iter().zip(&widths))
//!     .map(|((name, shape), (values, widths))| TensorData {
//!         name,
//!         shape,
//!         values,
//!         widths,
//!         exponent: None,
//!     })
//!     .collect();
//! let meta = ExportMetadata {
//!     arch,
//!     act_bits: 8,
//!     norm: Normalization { mean: vec![0.1307], std: vec![0.3081] },
//!     method: "example".into(),
//!     options: serde_json::json!({}),
//!     seed: None,
//!     extra: vec![],
//! };
//! let options = EncodeOptions { metadata: meta.to_pairs()?, ..Default::default() };
//! let bytes = encode(&tensors, &options)?;
//! let file = CompressedModel::from_bytes(&bytes)?;
//!
//! let images = Dataset {
//!     images: vec![0; 2 * 28 * 28],
//!     labels: vec![3, 4],
//!     shape: [1, 28, 28],
//!     num_classes: 10,
//! };
//! let report = FileModel::new(&file)?.evaluate(&images, 16)?;
//! assert_eq!(report.predictions, vec![3, 3]);
//! assert_eq!(report.accuracy, 0.5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod infer;
pub mod metadata;
pub mod pact;
pub mod spec;

pub use error::{Result, RuntimeError};
pub use infer::{EvalReport, FileModel, DEFAULT_ACT_BITS};
pub use metadata::{read_metadata, ExportMetadata, FileMetadata, HIGH_SUFFIX, HIGH_WEIGHTS};
pub use pact::{pact_codes, pact_step, ACT_CLIP};
pub use spec::{Arch, DatasetKind, LayerSpec, UnknownArch};

/// Batch-norm epsilon (PyTorch's default); the training forward pass uses the
/// same value.
pub const BN_EPS: f32 = 1e-5;

/// Suffix (after `<layer>.`) of a folded batch norm's per-channel multiplier.
pub const BN_SCALE: &str = "bn.scale";
/// Suffix (after `<layer>.`) of a folded batch norm's per-channel offset.
pub const BN_SHIFT: &str = "bn.shift";

/// Batch norm in inference mode folded into one multiply and one add per
/// channel: `y = x · scale + shift` with `scale = γ / sqrt(var + ε)` and
/// `shift = β − mean · scale`, each an f32 operation in this order.
///
/// Inference needs only these two vectors, so a file stores them instead of
/// γ, β and the two running statistics (half the bytes): what lets a binary
/// network with batch norm after every layer reach its 30x (`FORMAT.md`,
/// "Batch norm"). The result differs from `(x − mean) · scale + β` by f32
/// rounding only.
pub fn fold_batch_norm(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + BN_EPS).sqrt())
        .collect();
    let shift = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    (scale, shift)
}
