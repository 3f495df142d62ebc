//! `qgrad-csr`: the compressed model file, qgrad's deployable artifact
//! (METHOD.md §6), and integer inference straight from it.
//!
//! # What is in a file
//! Each tensor is a matrix (rows = `shape[0]`, cols = the rest; a bias is one
//! row) of one of two kinds ([`TensorKind`]):
//!
//! - **fixed**: elements quantized with per-element widths (0 pruned, 2..=16
//!   fixed point sharing one exponent per tensor, 32 raw f32). Only the
//!   non-zeros are kept, as bit-packed CSR (row pointers, column indices, a
//!   width tag per non-zero where widths mix, values in their own width), or
//!   as a dense bit-packed stream (a tag per element) when that is smaller.
//! - **scaled** (format version 2, [`ScaledTensorData`]): a signed integer
//!   code per element (binary ±1, ternary, m-bit), a level function
//!   ([`LevelKind`]) and f32 scales per group of consecutive elements (per
//!   tensor or per output channel, optionally two-sided). Dense codes take
//!   their minimal width (1 bit binary, 2 ternary, `m` for m-bit, sign and
//!   magnitude), or CSR keeps the non-zero codes (one bit fewer for ternary)
//!   when zeros dominate, or (version 4) block-sparse rows keep whole
//!   blocks, one column index per block (structured sparsity, METHOD §9);
//!   the scales follow.
//!
//! Either kind's non-zeros may instead be located by Rice-coded column gaps
//! within each row (layout 2, version 3) or by row-major gaps over the whole
//! tensor, Rice or Exp-Golomb coded, with no row pointers at all (layout 4,
//! version 5: what a heavily pruned layer, with whole units and input
//! pixels cut off, stores smallest).
//!
//! The encoder computes the sizes of every layout exactly (CSR, dense, CSR
//! with Rice-coded gaps, blocks at the best block shape, row-major gaps with
//! the best code) and picks per tensor, and the size report says which;
//! [`EncodeOptions::max_version`] keeps a file readable by an older
//! reader. Metadata (names, kinds, shapes,
//! exponents, width tables, lengths) is a postcard-encoded header; a CRC32
//! over the whole file closes it. `FORMAT.md` is the byte-level
//! specification; version-1 files (fixed tensors only) still decode
//! exactly as before.
//!
//! # Design rationale
//! - Every field takes the fewest bits that hold it, because the compression
//!   ratio (`32 · parameters / (8 · file bytes)`, [`compression_ratio`]) is
//!   measured on the real file, every byte counted.
//! - Reading is hostile-input safe: magic, version, declared length and
//!   checksum are checked first; every declared size is checked against the
//!   bits actually present before a buffer is sized from it; every structural
//!   invariant (monotone row pointers, increasing in-range columns, tags in
//!   the table, no stored zeros, zero padding) is verified. Errors name what
//!   is wrong ([`CsrError`]); nothing panics.
//! - The decoded form is CSR regardless of the on-disk layout, and the
//!   integer kernel ([`SparseKernel`]) is derived from it once and cached, so
//!   inference never re-unpacks bits (a block tensor's kernel also keeps its
//!   blocks dense for one-sample products). See [`kernel`] for the arithmetic and
//!   the exactness guarantee ("within one output rounding step"), and, for
//!   scaled tensors (adds and subtracts per scale group and sign, one scale
//!   multiply per output), the exact rounding formula that a training-side
//!   evaluation reproduces bit for bit.
//! - Writing is atomic (temporary file in the same directory, then rename),
//!   so an interrupted write leaves the previous file intact.
//! - No candle dependency: a deployment that only reads models compiles this
//!   crate and qgrad-fixed alone.
//!
//! # Example
//! Encode a 2 × 3 weight with mixed widths, decode it, compare the values,
//! check that the compression ratio comes from the file's byte length, and
//! multiply it with a fixed-point activation row:
//!
//! ```rust
//! use qgrad_csr::{
//!     compression_ratio, encode, CompressedModel, EncodeOptions, FixedActivations, TensorData,
//! };
//!
//! let values = [0.5f32, 0.1, 0.0, -0.25, 0.0, 0.75];
//! // 8-bit, pruned, 8-bit, 4-bit, 8-bit, raw f32. The shared exponent is 0
//! // (max |x| = 0.75), so 8 bits step by 2^-7 and 4 bits by 2^-3: every kept
//! // value here is exact.
//! let widths = [8u8, 0, 8, 4, 8, 32];
//! let tensor = TensorData {
//!     name: "w",
//!     shape: &[2, 3],
//!     values: &values,
//!     widths: &widths,
//!     exponent: None,
//! };
//! let bytes = encode(&[tensor], &EncodeOptions::default())?;
//!
//! let model = CompressedModel::from_bytes(&bytes)?;
//! let w = model.tensor("w").expect("tensor `w` is in the file");
//! assert_eq!(w.nnz(), 3); // the pruned element and the zeros are not stored
//! assert_eq!(w.dequantize(), vec![0.5, 0.0, 0.0, -0.25, 0.0, 0.75]);
//!
//! let report = model.size_report();
//! assert_eq!(report.file_bytes, bytes.len() as u64);
//! assert_eq!(report.ratio, compression_ratio(6, bytes.len() as u64));
//! assert_eq!(report.ratio, 32.0 * 6.0 / (8.0 * bytes.len() as f64));
//!
//! // Integer inference: y = W · x for one sample x = [1, 2, 0.5].
//! let x = FixedActivations::quantize(&[1.0, 2.0, 0.5], 1, 3, 8)?;
//! assert_eq!(w.matmul(&x)?, vec![0.5, 0.125]);
//! # Ok::<(), qgrad_csr::CsrError>(())
//! ```
//!
//! A ternary weight with one scale per output row (as TWN or LAT produce
//! it), next to a fixed-point bias in the same file:
//!
//! ```rust
//! use qgrad_csr::{
//!     encode_tensors, CompressedModel, EncodeOptions, FixedActivations, Layout, LevelKind,
//!     ScaledTensorData, TensorData, TensorInput, TensorKind,
//! };
//!
//! let codes = [1i8, 0, -1, 0, 1, 1];
//! let weight = ScaledTensorData {
//!     name: "fc.weight",
//!     shape: &[2, 3],
//!     codes: &codes,
//!     levels: LevelKind::Linear,
//!     max_code: 1, // ternary
//!     groups: 2,   // one scale per row
//!     two_sided: false,
//!     scales: &[0.5, 0.25],
//! };
//! let bias = TensorData {
//!     name: "fc.bias",
//!     shape: &[2],
//!     values: &[0.5, -1.0],
//!     widths: &[8, 8],
//!     exponent: None,
//! };
//! let inputs = [TensorInput::Scaled(weight), TensorInput::Fixed(bias)];
//! let bytes = encode_tensors(&inputs, &EncodeOptions::default())?;
//!
//! let model = CompressedModel::from_bytes(&bytes)?;
//! let w = model.tensor("fc.weight").expect("in the file");
//! let TensorKind::Scaled(info) = w.kind() else { panic!("a scaled tensor") };
//! assert_eq!((info.levels, info.max_code, info.groups), (LevelKind::Linear, 1, 2));
//! assert_eq!(w.layout, Layout::Dense); // 2 bits per code
//! assert_eq!(w.dequantize(), vec![0.5, 0.0, -0.5, 0.0, 0.25, 0.25]);
//! assert_eq!(w.codes(), Some(codes.to_vec()));
//!
//! // Adds and subtracts, then one multiply by the row's scale.
//! let x = FixedActivations::quantize(&[1.0, 1.5, 0.5], 1, 3, 8)?;
//! assert_eq!(w.matmul(&x)?, vec![0.25, 0.5]);
//! # Ok::<(), qgrad_csr::CsrError>(())
//! ```

#![warn(missing_docs)]

mod block;
mod encode;
mod error;
mod format;
mod gaps;
pub mod kernel;
mod model;
mod report;
mod scaled;

pub use encode::{
    encode, encode_tensors, output_temp_builder, output_temp_file, reencode, reencode_up_to,
    write_bytes_atomically, write_file, write_file_tensors, EncodeOptions, TensorData, TensorInput,
};
pub use error::{CsrError, Result};
pub use format::{
    Layout, LayoutChoice, LevelKind, FORMAT_VERSION, MAGIC, MAX_SCALED_CODE, MAX_TENSOR_ELEMENTS,
    SPLIT_WEIGHTS_VERSION,
};
pub use kernel::{FixedActivations, SparseKernel};
pub use model::{high_part_name, CompressedModel, CompressedTensor, HIGH_SUFFIX, HIGH_WEIGHTS};
pub use report::{compression_ratio, FieldBits, SizeReport, TensorSize};
pub use scaled::{ScaledInfo, ScaledTensorData, TensorKind};
