//! On-disk structures and the bit-width rules shared by the encoder and the
//! decoder. `FORMAT.md` is the byte-level specification of what is here.

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every file.
pub const MAGIC: [u8; 8] = *b"QGRADCSR";
/// The format version this crate writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Fixed prefix: magic (8) + version (4) + header length (4) + file length (8).
pub const PREFIX_BYTES: usize = 24;
/// CRC32 trailer.
pub const CHECKSUM_BYTES: usize = 4;
/// Largest tensor (in elements) the format admits: row pointers and column
/// indices are held as `u32` by the kernels.
pub const MAX_TENSOR_ELEMENTS: u64 = u32::MAX as u64;

/// How one tensor's payload is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Layout {
    /// Compressed sparse row: row pointers, column indices, width tags, values.
    Csr,
    /// Every element in row-major order: a width tag per element, then the
    /// values of the non-zero elements.
    Dense,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Csr => "csr",
            Layout::Dense => "dense",
        })
    }
}

/// The encoder's layout policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayoutChoice {
    /// Per tensor, whichever of CSR and dense takes fewer bits (CSR on a tie).
    #[default]
    Auto,
    /// Always CSR.
    Csr,
    /// Dense wherever admissible (a tensor with no non-zero element is
    /// always CSR, see FORMAT.md).
    Dense,
}

/// The postcard-encoded header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileHeader {
    pub metadata: Vec<(String, String)>,
    pub tensors: Vec<TensorHeader>,
}

/// One tensor's entry in the header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TensorHeader {
    pub name: String,
    pub shape: Vec<u64>,
    pub exponent: i32,
    pub layout: Layout,
    /// Distinct widths present, strictly ascending; a tag is an index into it.
    pub width_table: Vec<u8>,
    /// Number of stored (non-zero) elements.
    pub nnz: u64,
    /// Bytes of this tensor's payload (its bit stream, padded to a byte).
    pub payload_bytes: u64,
}

/// `ceil(log2(max + 1))`: bits that hold every integer in `0..=max`.
pub(crate) fn bits_for(max: u64) -> u32 {
    qgrad_fixed::bits_needed(max)
}

/// Matrix view of a shape: rows = `shape[0]`, cols = product of the rest; a
/// tensor of rank 0 or 1 is one row. `None` on overflow.
pub(crate) fn matrix_dims(shape: &[u64]) -> Option<(u64, u64)> {
    if shape.len() <= 1 {
        Some((1, shape.first().copied().unwrap_or(1)))
    } else {
        let cols = shape[1..]
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        Some((shape[0], cols))
    }
}

/// Bits per field of a CSR payload, everything except the values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CsrWidths {
    /// Bits per row pointer. At least 1 even when nnz = 0, so that a declared
    /// row count is bounded by the payload length (see FORMAT.md).
    pub row_ptr: u32,
    pub col_idx: u32,
    pub tag: u32,
}

pub(crate) fn csr_widths(cols: u64, nnz: u64, table_len: usize) -> CsrWidths {
    CsrWidths {
        row_ptr: bits_for(nnz).max(1),
        col_idx: bits_for(cols.saturating_sub(1)),
        tag: bits_for((table_len as u64).saturating_sub(1)),
    }
}

/// Bits per dense tag.
pub(crate) fn dense_tag_bits(table_len: usize) -> u32 {
    bits_for((table_len as u64).saturating_sub(1))
}

/// Whether `w` may appear in a width table of `layout`.
pub(crate) fn table_width_ok(w: u8, layout: Layout) -> bool {
    match w {
        0 => layout == Layout::Dense,
        2..=16 | 32 => true,
        _ => false,
    }
}
