//! `qgrad-csr`: the compressed model file, qgrad's deployable artifact
//! (METHOD.md §6), and integer inference straight from it.
//!
//! # What is in a file
//! Each tensor is a matrix (rows = `shape[0]`, cols = the rest; a bias is one
//! row) whose elements were quantized with per-element widths (0 pruned,
//! 2..=16 fixed point sharing one exponent per tensor, 32 raw f32). Only the
//! non-zeros are kept, as bit-packed CSR (row pointers, column indices, a
//! width tag per non-zero where widths mix, values in their own width), or as
//! a dense bit-packed stream (a tag per element) when that is smaller: the
//! encoder computes both sizes exactly and picks per tensor, and the size
//! report says which. Metadata (names, shapes, exponents, width tables,
//! lengths) is a postcard-encoded header; a CRC32 over the whole file closes
//! it. `FORMAT.md` is the byte-level specification.
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
//!   inference never re-unpacks bits. See [`kernel`] for the arithmetic and
//!   the exactness guarantee ("within one output rounding step").
//! - Writing is atomic (temporary file in the same directory, then rename),
//!   so an interrupted write leaves the previous file intact.
//! - No candle dependency: a deployment that only reads models compiles this
//!   crate and qgrad-fixed alone.

mod encode;
mod error;
mod format;
pub mod kernel;
mod model;
mod report;

pub use encode::{encode, write_file, EncodeOptions, TensorData};
pub use error::{CsrError, Result};
pub use format::{Layout, LayoutChoice, FORMAT_VERSION, MAGIC, MAX_TENSOR_ELEMENTS};
pub use kernel::{FixedActivations, SparseKernel};
pub use model::{CompressedModel, CompressedTensor};
pub use report::{compression_ratio, FieldBits, SizeReport, TensorSize};
