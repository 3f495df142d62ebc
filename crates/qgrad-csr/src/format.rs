//! On-disk structures and the bit-width rules shared by the encoder and the
//! decoder. `FORMAT.md` is the byte-level specification of what is here.

use serde::{Deserialize, Serialize};

/// The first 8 bytes of every file.
pub const MAGIC: [u8; 8] = *b"QGRADCSR";
/// The newest format version this crate writes and reads. Version 1 files
/// (fixed-point tensors only, no tensor kind in the header), version 2
/// files (scaled tensors), version 3 files (layout 2) and version 4 files
/// (layout 3) still decode exactly as before; a file is written at the
/// lowest version its tensors need (version 3: a tensor in layout 2;
/// version 4: a tensor in layout 3; version 5: a tensor in layout 4;
/// version 6: split weights, [`SPLIT_WEIGHTS_VERSION`]).
pub const FORMAT_VERSION: u32 = 6;
/// The version of a file with split weights (metadata key `high_weights`,
/// FORMAT.md section 3): a reader that does not add a layer's high-width
/// part would compute the wrong network, so older readers must refuse it.
pub const SPLIT_WEIGHTS_VERSION: u32 = 6;
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
    /// Compressed sparse row with Rice-coded column gaps instead of
    /// fixed-width column indices (version 3); the rest as [`Layout::Csr`].
    CsrRice,
    /// Block-sparse rows (version 4, scaled tensors only): the matrix cut
    /// into `br × bc` blocks, one column index per kept block, then every
    /// code of the kept blocks (FORMAT.md §7.7).
    Block,
    /// Row-major gaps over the whole tensor, Rice- or Exp-Golomb-coded,
    /// without row pointers (version 5, both kinds): a sparse tensor's row pointers
    /// cost `bits(nnz)` bits per row, a tenth of a LeNet-5 at 200x; the gap
    /// that crosses a row boundary costs about what a row's first column
    /// does in layout 2, so this layout saves the row pointers whole.
    FlatGaps,
}

impl Layout {
    /// The lowest format version that has this layout.
    pub fn min_version(self) -> u32 {
        match self {
            Layout::Csr | Layout::Dense => 1,
            Layout::CsrRice => 3,
            Layout::Block => 4,
            Layout::FlatGaps => 5,
        }
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::Csr => "csr",
            Layout::Dense => "dense",
            Layout::CsrRice => "csr-rice",
            Layout::Block => "block",
            Layout::FlatGaps => "flat-gaps",
        })
    }
}

/// The encoder's layout policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayoutChoice {
    /// Per tensor, whichever of CSR, dense and CSR with Rice-coded gaps takes
    /// fewer bytes (in that order of preference on a tie).
    #[default]
    Auto,
    /// Always CSR with fixed-width column indices (layout 0).
    Csr,
    /// Always CSR with Rice-coded column gaps (layout 2, version 3).
    CsrRice,
    /// Dense wherever admissible (a tensor with no non-zero element is
    /// always CSR, see FORMAT.md).
    Dense,
    /// Block-sparse (layout 3, version 4) for every scaled tensor with its
    /// smallest block shape; a fixed tensor gets CSR.
    Block,
    /// Row-major Rice- or Exp-Golomb-coded gaps without row pointers
    /// (layout 4, version 5)
    /// wherever admissible (the row count at most the payload's bits), else
    /// layout 2.
    FlatGaps,
}

impl LayoutChoice {
    /// The lowest format version whose layouts this choice can ask for.
    pub fn min_version(self) -> u32 {
        match self {
            LayoutChoice::Auto | LayoutChoice::Csr | LayoutChoice::Dense => 1,
            LayoutChoice::CsrRice => Layout::CsrRice.min_version(),
            LayoutChoice::Block => Layout::Block.min_version(),
            LayoutChoice::FlatGaps => Layout::FlatGaps.min_version(),
        }
    }
}

/// The candidate `choice` asks for, `candidate(layout)` giving a header and
/// the tensor's bytes in the file: under `Auto` the smallest of the
/// [`Admissible`] layouts (CSR, dense, layout 2, layout 3, layout 4),
/// earlier on a tie; where CSR is not admissible (a binary tensor with pruned blocks)
/// only layout 3 can hold the tensor. Both encoders (fixed and scaled)
/// choose through this one rule.
pub(crate) fn choose_layout<H, E>(
    choice: LayoutChoice,
    admissible: Admissible,
    mut candidate: impl FnMut(Layout) -> Result<(H, usize), E>,
) -> Result<(H, usize), E> {
    let a = admissible;
    if !a.csr {
        // Only blocks can hold it (the caller checked `a.block`).
        return candidate(Layout::Block);
    }
    match choice {
        LayoutChoice::Csr => candidate(Layout::Csr),
        LayoutChoice::CsrRice => candidate(Layout::CsrRice),
        LayoutChoice::FlatGaps if a.flat => candidate(Layout::FlatGaps),
        LayoutChoice::FlatGaps => candidate(Layout::CsrRice),
        LayoutChoice::Dense if a.dense => candidate(Layout::Dense),
        LayoutChoice::Block if a.block => candidate(Layout::Block),
        LayoutChoice::Dense | LayoutChoice::Block => candidate(Layout::Csr),
        LayoutChoice::Auto => {
            let mut best = candidate(Layout::Csr)?;
            let others = [
                (a.dense, Layout::Dense),
                (a.rice, Layout::CsrRice),
                (a.block, Layout::Block),
                (a.flat, Layout::FlatGaps),
            ];
            for (wanted, layout) in others {
                if wanted {
                    let c = candidate(layout)?;
                    if c.1 < best.1 {
                        best = c;
                    }
                }
            }
            Ok(best)
        }
    }
}

/// Whether a tensor of `rows` rows may be in layout 4 with a payload of
/// `payload_bits` bits: it has no row pointers, so the reader's `rows + 1`
/// in-memory pointers must be bounded by the payload's length as every
/// other layout's are (`rows + 1 <= 8 · payload_bytes`, FORMAT.md §5). The
/// decoders check the same bound.
pub(crate) fn flat_rows_fit(rows: u64, payload_bits: u128) -> bool {
    u128::from(rows) < 8 * payload_bits.div_ceil(8)
}

/// Which layouts can hold a tensor (and the file's version admits).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Admissible {
    /// Layouts 0 and 2 (false only for a binary tensor with zero codes).
    pub csr: bool,
    /// Layout 1.
    pub dense: bool,
    /// Layout 2.
    pub rice: bool,
    /// Layout 3.
    pub block: bool,
    /// Layout 4 (the file's version admits it, and the row count is at
    /// most the payload's bits: FORMAT.md §5).
    pub flat: bool,
}

/// The level function of a scaled tensor: what an integer code `k`
/// (`|k| <= n`, `n` the tensor's `max_code`) means before scaling.
/// Identical to `qgrad_scaled::Method::level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LevelKind {
    /// Codes are ±1, never 0 (`max_code` = 1): `level(k) = k`.
    Binary,
    /// `level(k) = k / n` (ternary is `n = 1`; m-bit `n = 2^(m-1) - 1`).
    Linear,
    /// `level(k) = sign(k) · 2^(|k| - n)`, `level(0) = 0`.
    Log,
}

impl LevelKind {
    /// `level(code)` for codes of largest magnitude `max_code`, as an f32:
    /// `k` (binary), `k as f32 / n as f32` (linear, the correctly rounded
    /// quotient) or the exact power of two (log). Bit for bit what
    /// `qgrad_scaled::Method::level` returns.
    pub fn level(self, code: i8, max_code: u8) -> f32 {
        let k = i32::from(code);
        let n = i32::from(max_code);
        match self {
            LevelKind::Binary => k as f32,
            LevelKind::Linear => k as f32 / n as f32,
            LevelKind::Log if k == 0 => 0.0,
            // 2^(|k| - n) >= 2^-126 for n <= 127: a normal f32, exact.
            LevelKind::Log => k.signum() as f32 * 2f64.powi(k.abs() - n) as f32,
        }
    }
}

impl std::fmt::Display for LevelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LevelKind::Binary => "binary",
            LevelKind::Linear => "linear",
            LevelKind::Log => "log",
        })
    }
}

/// Largest `max_code` of a scaled tensor (codes are `i8`).
pub const MAX_SCALED_CODE: u8 = 127;

/// The postcard-encoded header of a version-1 file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileHeaderV1 {
    pub metadata: Vec<(String, String)>,
    pub tensors: Vec<TensorHeader>,
}

/// The postcard-encoded header of a version-2 file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct FileHeader {
    pub metadata: Vec<(String, String)>,
    pub tensors: Vec<TensorEntry>,
}

/// One tensor's entry in a version-2 header: its kind, then its fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum TensorEntry {
    /// Per-element fixed-point widths (the only kind of version 1).
    Fixed(TensorHeader),
    /// Integer codes with float scales.
    Scaled(ScaledHeader),
}

impl TensorEntry {
    /// The tensor's payload layout.
    pub fn layout(&self) -> Layout {
        match self {
            TensorEntry::Fixed(t) => t.layout,
            TensorEntry::Scaled(t) => t.layout,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TensorEntry::Fixed(t) => &t.name,
            TensorEntry::Scaled(t) => &t.name,
        }
    }

    pub fn payload_bytes(&self) -> u64 {
        match self {
            TensorEntry::Fixed(t) => t.payload_bytes,
            TensorEntry::Scaled(t) => t.payload_bytes,
        }
    }
}

/// The header entry of a scaled tensor (FORMAT.md §"Scaled tensors").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ScaledHeader {
    pub name: String,
    pub shape: Vec<u64>,
    pub layout: Layout,
    pub levels: LevelKind,
    pub max_code: u8,
    pub two_sided: bool,
    pub groups: u64,
    /// Non-zero codes.
    pub nnz: u64,
    pub payload_bytes: u64,
}

/// One fixed-point tensor's entry in the header.
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

/// Bits of one code in the dense layout of a scaled tensor: 1 for binary
/// (the sign), else `bits(2n)` (sign and magnitude; 2 for ternary, `m` for
/// m-bit codes).
pub(crate) fn scaled_dense_code_bits(levels: LevelKind, max_code: u8) -> u32 {
    match levels {
        LevelKind::Binary => 1,
        _ => bits_for(2 * u64::from(max_code)),
    }
}

/// Bits of one non-zero code in the CSR layout of a scaled tensor:
/// `bits(2n - 1)` (sign and magnitude - 1; 1 for binary and ternary).
pub(crate) fn scaled_nonzero_code_bits(max_code: u8) -> u32 {
    bits_for((2 * u64::from(max_code)).saturating_sub(1))
}
