//! Size accounting: where every bit of a compressed file goes.

use serde::Serialize;

use crate::format::Layout;
use crate::scaled::TensorKind;

/// Bits of one tensor, per field. `total()` is the tensor's share of the file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FieldBits {
    /// The tensor's entry in the postcard header (version 2: the kind, then
    /// name, shape, exponent, layout, width table, nnz, payload length; or a
    /// scaled tensor's fields).
    pub header: u64,
    /// CSR row pointers (0 for a dense tensor).
    pub row_ptr: u64,
    /// CSR column indices (0 for a dense tensor).
    pub col_idx: u64,
    /// The stored values (fixed-point integers and raw f32), or a scaled
    /// tensor's codes (every element's in the dense layout, the non-zero
    /// ones' in CSR).
    pub values: u64,
    /// Width tags (one per non-zero for CSR, one per element for dense).
    pub tags: u64,
    /// A scaled tensor's f32 scales (0 for a fixed tensor).
    pub scales: u64,
    /// Zero bits that pad the payload to a whole byte.
    pub padding: u64,
}

impl FieldBits {
    /// Sum of all fields.
    pub fn total(&self) -> u64 {
        self.header
            + self.row_ptr
            + self.col_idx
            + self.values
            + self.tags
            + self.scales
            + self.padding
    }
}

/// One tensor's line of the size report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSize {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Number of elements.
    pub parameters: u64,
    /// Stored (non-zero) elements.
    pub nnz: u64,
    /// Fixed point (with its exponent) or scaled codes (with their levels).
    pub kind: TensorKind,
    /// The layout the encoder chose.
    pub layout: Layout,
    /// Bits per field.
    pub bits: FieldBits,
    /// `(width, elements)` ascending by width; zeros and pruned elements
    /// count as width 0; a scaled tensor's non-zero codes count as their code
    /// width (1 binary, 2 ternary, `m` for m-bit).
    pub width_histogram: Vec<(u8, u64)>,
}

impl TensorSize {
    /// Average bits per parameter of this tensor (its share of the file).
    pub fn bits_per_parameter(&self) -> f64 {
        if self.parameters == 0 {
            0.0
        } else {
            self.bits.total() as f64 / self.parameters as f64
        }
    }
}

/// The size report of one compressed file. Every byte of the file is
/// accounted for: `8 · file_bytes = overhead_bits + Σ tensors[i].bits.total()`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SizeReport {
    /// Length of the file in bytes (of the real file when it came from disk).
    pub file_bytes: u64,
    /// Total number of parameters (elements of all tensors).
    pub parameters: u64,
    /// `32 · parameters / (8 · file_bytes)`.
    pub ratio: f64,
    /// Per-tensor breakdown.
    pub tensors: Vec<TensorSize>,
    /// Bits not owned by a tensor: the fixed prefix (magic, version, lengths),
    /// the metadata, the header's framing and the CRC32 trailer.
    pub overhead_bits: u64,
}

/// Compression ratio `32 · parameters / (8 · file_bytes)`: 32-bit floats
/// versus the file. 0 for an empty file.
pub fn compression_ratio(parameters: u64, file_bytes: u64) -> f64 {
    if file_bytes == 0 {
        0.0
    } else {
        32.0 * parameters as f64 / (8.0 * file_bytes as f64)
    }
}
