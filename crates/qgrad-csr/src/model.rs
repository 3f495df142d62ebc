//! The decoder and the in-memory compressed model.
//!
//! Validation order (FORMAT.md §"Reading"): magic, version, declared file
//! length, CRC32, header, then each tensor's declared sizes against its
//! payload length, and only then are buffers sized by the file allocated.

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use qgrad_fixed::{BitReader, FixedFormat, FLOAT, MAX_EXPONENT, MIN_EXPONENT};

use crate::error::{CsrError, Result};
use crate::format::{
    csr_widths, dense_tag_bits, matrix_dims, table_width_ok, FileHeader, FileHeaderV1, Layout,
    TensorEntry, TensorHeader, CHECKSUM_BYTES, FORMAT_VERSION, MAGIC, MAX_TENSOR_ELEMENTS,
    PREFIX_BYTES, SPLIT_WEIGHTS_VERSION,
};
use crate::gaps::{read_flat_gaps, read_rice_columns, GapCode, GAP_CODE_BITS, RICE_PARAM_BITS};
use crate::kernel::SparseKernel;
use crate::report::{compression_ratio, FieldBits, SizeReport, TensorSize};
use crate::scaled::{decode_scaled, ScaledInfo, TensorKind};

/// A decoded compressed model: metadata and tensors in file order.
#[derive(Clone, Debug)]
pub struct CompressedModel {
    /// Key/value metadata from the header.
    pub metadata: Vec<(String, String)>,
    /// The tensors, in file order.
    pub tensors: Vec<CompressedTensor>,
    file_bytes: u64,
}

/// One decoded tensor, kept in CSR form (its non-zero elements) whatever
/// its layout on disk and whatever its kind ([`kind`](Self::kind)): a fixed
/// tensor's entries are fixed-point integers or f32 values, a scaled
/// tensor's entries are its non-zero codes, with the scales beside them.
#[derive(Clone, Debug)]
pub struct CompressedTensor {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// Shared exponent `e` of a fixed tensor: an element of width `b` means
    /// `q · 2^-(b-1-e)`. 0 for a scaled tensor.
    pub exponent: i32,
    /// Layout on disk.
    pub layout: Layout,
    rows: usize,
    cols: usize,
    width_table: Vec<u8>,
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    /// Width of each stored element (2..=16 or 32; a scaled tensor's code
    /// width, [`ScaledInfo::code_bits`]).
    entry_width: Vec<u8>,
    /// Integer of each stored fixed-point element, the f32 bits of a
    /// width-32 one, or a scaled tensor's non-zero code.
    entry_raw: Vec<i32>,
    bits: FieldBits,
    kind: Kind,
    /// The block shape of a tensor stored in layout 3.
    block: Option<(usize, usize)>,
    kernel: OnceLock<SparseKernel>,
}

/// What the entries of a tensor mean.
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Fixed,
    Scaled { info: ScaledInfo, scales: Vec<f32> },
}

impl CompressedModel {
    /// Decodes a file image, validating it fully (never panics on bad input).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        decode(bytes)
    }

    /// Reads and decodes a file.
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| CsrError::Io {
            path: path.to_owned(),
            source,
        })?;
        decode(&bytes)
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&CompressedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The value of metadata `key` (the first if repeated).
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Length of the decoded file in bytes.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Total number of elements over all tensors, each parameter once: in a
    /// file with split weights (metadata key `high_weights`, FORMAT.md) the
    /// high-width part `<w>_high` of a tensor `<w>` of the same shape holds
    /// the same parameters as `<w>` and is not counted again.
    pub fn num_parameters(&self) -> u64 {
        let split = has_split_weights(&self.metadata);
        self.tensors
            .iter()
            .filter(|t| !(split && self.is_high_part(t)))
            .map(|t| t.num_elements() as u64)
            .sum()
    }

    /// The high-width part stored for weight `weight` (a tensor named
    /// [`high_part_name`]), if the file has one; of any shape (a reader
    /// checks it against the weight's).
    pub fn high_part(&self, weight: &str) -> Option<&CompressedTensor> {
        self.tensor(&high_part_name(weight))
    }

    /// Whether `t` is the high-width part of a split weight (`<w>_high`
    /// beside `<w>` of the same shape).
    fn is_high_part(&self, t: &CompressedTensor) -> bool {
        t.name
            .strip_suffix(HIGH_SUFFIX)
            .and_then(|w| self.tensor(w))
            .is_some_and(|w| w.shape == t.shape)
    }

    /// Bits per tensor and per field; the ratio uses the file's byte length.
    pub fn size_report(&self) -> SizeReport {
        let tensors: Vec<TensorSize> = self
            .tensors
            .iter()
            .map(|t| TensorSize {
                name: t.name.clone(),
                shape: t.shape.clone(),
                parameters: t.num_elements() as u64,
                nnz: t.nnz() as u64,
                kind: t.kind(),
                layout: t.layout,
                bits: t.bits,
                width_histogram: t
                    .width_histogram()
                    .into_iter()
                    .map(|(w, n)| (w, n as u64))
                    .collect(),
            })
            .collect();
        let tensor_bits: u64 = tensors.iter().map(|t| t.bits.total()).sum();
        let parameters = self.num_parameters();
        SizeReport {
            file_bytes: self.file_bytes,
            parameters,
            ratio: compression_ratio(parameters, self.file_bytes),
            overhead_bits: (self.file_bytes * 8).saturating_sub(tensor_bits),
            tensors,
        }
    }
}

/// The metadata key of a file with split weights (FORMAT.md, section 3):
/// the width of their high-width parts.
pub const HIGH_WEIGHTS: &str = "high_weights";
/// What a split weight's high-width part appends to the weight's name
/// (`fc1.weight` → `fc1.weight_high`).
pub const HIGH_SUFFIX: &str = "_high";

/// The name of weight `weight`'s high-width part (`fc1.weight` →
/// `fc1.weight_high`).
pub fn high_part_name(weight: &str) -> String {
    format!("{weight}{HIGH_SUFFIX}")
}

/// Whether file metadata declares split weights (the key
/// [`HIGH_WEIGHTS`]): such a file is version 6 (FORMAT.md section 11).
pub(crate) fn has_split_weights(metadata: &[(String, String)]) -> bool {
    metadata.iter().any(|(k, _)| k == HIGH_WEIGHTS)
}

impl CompressedTensor {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        name: String,
        shape: Vec<usize>,
        exponent: i32,
        layout: Layout,
        rows: usize,
        cols: usize,
        width_table: Vec<u8>,
        row_ptr: Vec<u32>,
        col_idx: Vec<u32>,
        entry_width: Vec<u8>,
        entry_raw: Vec<i32>,
        bits: FieldBits,
        kind: Kind,
    ) -> Self {
        Self {
            name,
            shape,
            exponent,
            layout,
            rows,
            cols,
            width_table,
            row_ptr,
            col_idx,
            entry_width,
            entry_raw,
            bits,
            kind,
            block: None,
            kernel: OnceLock::new(),
        }
    }

    /// The same tensor, stored in layout 3 with blocks of `block` (rows,
    /// columns).
    pub(crate) fn with_block(mut self, block: (usize, usize)) -> Self {
        self.block = Some(block);
        self
    }

    /// The block shape (rows, columns) of a tensor stored in layout 3.
    pub fn block_shape(&self) -> Option<(usize, usize)> {
        self.block
    }

    /// What kind of tensor this is: fixed point (with its exponent) or
    /// scaled codes (with their level function and groups).
    pub fn kind(&self) -> TensorKind {
        match &self.kind {
            Kind::Fixed => TensorKind::Fixed {
                exponent: self.exponent,
            },
            Kind::Scaled { info, .. } => TensorKind::Scaled(*info),
        }
    }

    /// The parameters of a scaled tensor (`None` for a fixed one).
    pub fn scaled_info(&self) -> Option<ScaledInfo> {
        match &self.kind {
            Kind::Fixed => None,
            Kind::Scaled { info, .. } => Some(*info),
        }
    }

    /// A scaled tensor's scales, group by group (`[positive, negative]` per
    /// group when two-sided); empty for a fixed tensor.
    pub fn scales(&self) -> &[f32] {
        match &self.kind {
            Kind::Fixed => &[],
            Kind::Scaled { scales, .. } => scales,
        }
    }

    /// A scaled tensor's code of every element, row-major (`None` for a
    /// fixed tensor). Allocates `rows · cols` bytes (see
    /// [`dequantize`](Self::dequantize)).
    pub fn codes(&self) -> Option<Vec<i8>> {
        let Kind::Scaled { .. } = self.kind else {
            return None;
        };
        let mut out = vec![0i8; self.num_elements()];
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                // Validated on decode: |code| <= 127.
                out[r * self.cols + self.col_idx[k] as usize] = self.entry_raw[k] as i8;
            }
        }
        Some(out)
    }

    /// Rows of the matrix view (`shape[0]`; 1 for rank 0 and 1).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix view (product of `shape[1..]`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of elements.
    pub fn num_elements(&self) -> usize {
        self.rows * self.cols
    }

    /// Number of stored (non-zero) elements.
    pub fn nnz(&self) -> usize {
        self.entry_width.len()
    }

    /// The width table of the file (ascending; a dense tensor's may contain
    /// 0). Empty for a scaled tensor.
    pub fn width_table(&self) -> &[u8] {
        &self.width_table
    }

    /// Bits of this tensor, per field.
    pub fn field_bits(&self) -> FieldBits {
        self.bits
    }

    /// CSR row pointers (`rows + 1`).
    pub fn row_ptr(&self) -> &[u32] {
        &self.row_ptr
    }

    /// CSR column indices (`nnz`).
    pub fn col_idx(&self) -> &[u32] {
        &self.col_idx
    }

    /// Width of each stored element (`nnz`; a scaled tensor's code width).
    pub fn entry_widths(&self) -> &[u8] {
        &self.entry_width
    }

    /// Value of the `k`-th stored element, element `index` (row-major).
    fn entry_value(&self, k: usize, index: usize) -> f32 {
        if let Kind::Scaled { info, scales } = &self.kind {
            let code = self.entry_raw[k] as i8;
            let group = index / (self.num_elements() / info.groups);
            let side = usize::from(info.two_sided && code < 0);
            return scales[group * info.scales_per_group() + side] * info.level(code);
        }
        let w = self.entry_width[k];
        let raw = self.entry_raw[k];
        if w == FLOAT {
            f32::from_bits(raw as u32)
        } else {
            // The width and exponent were validated on decode.
            FixedFormat {
                bits: w,
                exponent: self.exponent,
            }
            .dequantize(raw)
        }
    }

    /// The integer of the `k`-th stored element (`None` for an f32 one; a
    /// scaled tensor's code).
    pub(crate) fn entry_int(&self, k: usize) -> Option<i32> {
        (self.entry_width[k] != FLOAT).then(|| self.entry_raw[k])
    }

    /// Dense row-major values. A fixed tensor: equal to
    /// `qgrad_fixed::fake_quantize` of the encoder's input, element for
    /// element. A scaled tensor: `scale · level(code)` as one f32 multiply of
    /// the stored f32 scale and the f32 level ([`LevelKind::level`]), bit for
    /// bit the `values` of `qgrad_scaled::quantize`; a zero code is +0.0.
    /// Allocates `rows · cols` values: a valid file may declare a large
    /// all-zero tensor in a few bytes, so check
    /// [`num_elements`](Self::num_elements) first for untrusted files.
    ///
    /// [`LevelKind::level`]: crate::LevelKind::level
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.num_elements()];
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                let index = r * self.cols + self.col_idx[k] as usize;
                out[index] = self.entry_value(k, index);
            }
        }
        out
    }

    /// Width of every element, row-major; zeros and pruned elements report 0.
    /// For a scaled tensor a non-zero code reports the code width of the
    /// dense layout, [`ScaledInfo::code_bits`] (1 binary, 2 ternary, `m` for
    /// m-bit codes), whatever the layout on disk.
    pub fn widths(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.num_elements()];
        for r in 0..self.rows {
            for k in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                out[r * self.cols + self.col_idx[k] as usize] = self.entry_width[k];
            }
        }
        out
    }

    /// `(width, elements)` ascending by width, only widths that occur; zeros
    /// and pruned elements count as width 0 (the widths of
    /// [`widths`](Self::widths), counted; they add up to the element count).
    pub fn width_histogram(&self) -> Vec<(u8, usize)> {
        let mut counts = [0usize; 33];
        for &w in &self.entry_width {
            counts[usize::from(w)] += 1;
        }
        counts[0] = self.num_elements() - self.nnz();
        (0..=32u8)
            .filter(|&w| counts[usize::from(w)] > 0)
            .map(|w| (w, counts[usize::from(w)]))
            .collect()
    }

    /// The kernel-ready form, built on first use and kept.
    pub fn kernel(&self) -> &SparseKernel {
        self.kernel.get_or_init(|| SparseKernel::from_tensor(self))
    }

    /// Raw 32 bits of the `k`-th stored element (the f32 bits of a width-32 one).
    pub(crate) fn raw_bits(&self, k: usize) -> u32 {
        self.entry_raw[k] as u32
    }

    pub(crate) fn csr_parts(&self) -> (&[u32], &[u32]) {
        (&self.row_ptr, &self.col_idx)
    }
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

fn decode(bytes: &[u8]) -> Result<CompressedModel> {
    let len = bytes.len() as u64;
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(CsrError::BadMagic {
            found: bytes[..magic_len].to_vec(),
            expected: MAGIC,
        });
    }
    let minimum = (PREFIX_BYTES + CHECKSUM_BYTES) as u64;
    if len < minimum {
        return Err(CsrError::Truncated {
            what: "the fixed prefix and checksum",
            needed: minimum,
            available: len,
        });
    }
    let version = read_u32(bytes, 8);
    if version == 0 {
        return Err(CsrError::InvalidVersion { found: version });
    }
    if version > FORMAT_VERSION {
        return Err(CsrError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let header_len = u64::from(read_u32(bytes, 12));
    let declared_len = read_u64(bytes, 16);
    if declared_len > len {
        return Err(CsrError::Truncated {
            what: "the file length declared in its prefix",
            needed: declared_len,
            available: len,
        });
    }
    if declared_len < len {
        return Err(CsrError::TrailingBytes {
            declared: declared_len,
            extra: len - declared_len,
        });
    }
    let body_end = bytes.len() - CHECKSUM_BYTES;
    let stored = read_u32(bytes, body_end);
    let computed = crc32fast::hash(&bytes[..body_end]);
    if stored != computed {
        return Err(CsrError::ChecksumMismatch { stored, computed });
    }
    let header_end = PREFIX_BYTES as u64 + header_len;
    if header_end > body_end as u64 {
        return Err(CsrError::CorruptHeader(format!(
            "declared header length {header_len} runs past the end of the file ({len} bytes)"
        )));
    }
    let header_end = header_end as usize;
    let header_bytes = &bytes[PREFIX_BYTES..header_end];
    let postcard_err = |e: postcard::Error| CsrError::CorruptHeader(format!("postcard: {e}"));
    // Version 1 has fixed tensors only and no kind in a tensor's entry.
    let (header, rest): (FileHeader, &[u8]) = if version == 1 {
        let (v1, rest): (FileHeaderV1, &[u8]) =
            postcard::take_from_bytes(header_bytes).map_err(postcard_err)?;
        let header = FileHeader {
            metadata: v1.metadata,
            tensors: v1.tensors.into_iter().map(TensorEntry::Fixed).collect(),
        };
        (header, rest)
    } else {
        postcard::take_from_bytes(header_bytes).map_err(postcard_err)?
    };
    if !rest.is_empty() {
        return Err(CsrError::CorruptHeader(format!(
            "{} bytes left over after the header",
            rest.len()
        )));
    }
    if version < SPLIT_WEIGHTS_VERSION && has_split_weights(&header.metadata) {
        return Err(CsrError::CorruptHeader(format!(
            "the metadata `{HIGH_WEIGHTS}` (split weights) needs version \
             {SPLIT_WEIGHTS_VERSION}, in a version-{version} file"
        )));
    }
    if let Some(entry) = header
        .tensors
        .iter()
        .find(|e| e.layout().min_version() > version)
    {
        let layout = entry.layout();
        return Err(CsrError::CorruptHeader(format!(
            "tensor `{}` uses layout {} ({layout}), which needs version {}, in a version-{version} file",
            entry.name(),
            layout as u8,
            layout.min_version()
        )));
    }
    if let Some(entry) = header
        .tensors
        .iter()
        .find(|e| matches!(e, TensorEntry::Fixed(_)) && e.layout() == Layout::Block)
    {
        return Err(CsrError::CorruptHeader(format!(
            "fixed tensor `{}` uses layout 3 (block), which holds scaled tensors only",
            entry.name()
        )));
    }

    let payload_area = &bytes[header_end..body_end];
    let mut offset = 0usize;
    let mut names = HashSet::new();
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for entry in &header.tensors {
        let name = entry.name();
        if !names.insert(name) {
            return Err(CsrError::CorruptHeader(format!(
                "tensor name `{name}` appears twice"
            )));
        }
        let available = (payload_area.len() - offset) as u64;
        let payload_bytes = entry.payload_bytes();
        if payload_bytes > available {
            return Err(CsrError::DeclaredSizeTooLarge {
                tensor: name.to_owned(),
                what: "payload length",
                needed_bits: u128::from(payload_bytes) * 8,
                available_bits: u128::from(available) * 8,
            });
        }
        let payload = &payload_area[offset..offset + payload_bytes as usize];
        offset += payload_bytes as usize;
        // The tensor's share of the header: its entry as the file stores it
        // (version 2: with the kind's variant index in front).
        let entry_len = match entry {
            TensorEntry::Fixed(th) if version == 1 => postcard::to_allocvec(th),
            _ => postcard::to_allocvec(entry),
        }
        .map_err(|e| CsrError::Serialize(e.to_string()))?
        .len() as u64;
        let header_bits = entry_len * 8;
        tensors.push(match entry {
            TensorEntry::Fixed(th) => decode_tensor(th, payload, header_bits)?,
            TensorEntry::Scaled(th) => decode_scaled(th, payload, header_bits)?,
        });
    }
    if offset != payload_area.len() {
        return Err(CsrError::CorruptHeader(format!(
            "the tensors claim {offset} payload bytes but the file holds {}",
            payload_area.len()
        )));
    }
    Ok(CompressedModel {
        metadata: header.metadata,
        tensors,
        file_bytes: len,
    })
}

fn decode_tensor(th: &TensorHeader, payload: &[u8], header_bits: u64) -> Result<CompressedTensor> {
    let name = th.name.as_str();
    if th.layout == Layout::Block {
        // The header check refuses this first; kept so no input reaches the
        // `unreachable!` arms below.
        return Err(CsrError::corrupt(
            name,
            "layout 3 (block) holds scaled tensors only",
        ));
    }
    let (rows, cols) =
        matrix_dims(&th.shape).ok_or_else(|| CsrError::corrupt(name, "shape product overflows"))?;
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| CsrError::corrupt(name, "shape product overflows"))?;
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(CsrError::corrupt(
            name,
            format!("{elements} elements exceed the format's limit of {MAX_TENSOR_ELEMENTS}"),
        ));
    }
    if !(MIN_EXPONENT..=MAX_EXPONENT).contains(&th.exponent) {
        return Err(CsrError::corrupt(
            name,
            format!(
                "exponent {} is outside {MIN_EXPONENT}..={MAX_EXPONENT}",
                th.exponent
            ),
        ));
    }
    let table = &th.width_table;
    if let Some(&w) = table.iter().find(|&&w| !table_width_ok(w, th.layout)) {
        return Err(CsrError::corrupt(
            name,
            format!(
                "width table has width {w}, not allowed in {} layout",
                th.layout
            ),
        ));
    }
    if table.windows(2).any(|p| p[0] >= p[1]) {
        return Err(CsrError::corrupt(
            name,
            format!("width table {table:?} is not strictly ascending"),
        ));
    }
    let nnz = th.nnz;
    if nnz > elements {
        return Err(CsrError::corrupt(
            name,
            format!("{nnz} non-zeros declared in a tensor of {elements} elements"),
        ));
    }
    let min_nonzero_width = table.iter().copied().filter(|&w| w != 0).min();
    if nnz > 0 && min_nonzero_width.is_none() {
        return Err(CsrError::corrupt(
            name,
            format!("{nnz} non-zeros declared but the width table has no non-zero width"),
        ));
    }
    let min_nz = u128::from(min_nonzero_width.unwrap_or(0));
    let available_bits = payload.len() as u128 * 8;
    // A lower bound on the payload the declarations imply; checked before
    // anything sized by them is allocated.
    let needed_bits = match th.layout {
        Layout::Csr | Layout::CsrRice | Layout::FlatGaps => {
            if (nnz == 0) != table.is_empty() {
                return Err(CsrError::corrupt(
                    name,
                    format!(
                        "a CSR tensor with {nnz} non-zeros must {}have a width table, found {table:?}",
                        if nnz == 0 { "not " } else { "" }
                    ),
                ));
            }
            let w = csr_widths(cols, nnz, table.len());
            // Layouts 2 and 4: the 5-bit Rice parameter, then at least 1
            // bit per gap; layout 4 has no row pointers, but its row count
            // is bounded by the payload's bits all the same (FORMAT.md §5).
            let rice = matches!(th.layout, Layout::CsrRice | Layout::FlatGaps);
            let column_bits = if rice { 1 } else { w.col_idx };
            let param_bits = match th.layout {
                Layout::CsrRice => u128::from(RICE_PARAM_BITS),
                Layout::FlatGaps => u128::from(GAP_CODE_BITS),
                _ => 0,
            };
            let ptr_bits = match th.layout {
                Layout::FlatGaps => 0,
                _ => (u128::from(rows) + 1) * u128::from(w.row_ptr),
            };
            let bits = param_bits
                + ptr_bits
                + u128::from(nnz) * (u128::from(column_bits + w.tag) + min_nz);
            match th.layout {
                Layout::FlatGaps => bits.max(u128::from(rows) + 1),
                _ => bits,
            }
        }
        // Rejected with the header (scaled tensors only).
        Layout::Block => unreachable!("refused at the top of decode_tensor"),
        Layout::Dense => {
            if min_nonzero_width.is_none() || nnz == 0 {
                return Err(CsrError::corrupt(
                    name,
                    "a dense tensor must have non-zeros and a non-zero width in its table",
                ));
            }
            let tag_bits = u128::from(dense_tag_bits(table.len()));
            let min_all = u128::from(table[0]);
            u128::from(nnz) * (tag_bits + min_nz)
                + u128::from(elements - nnz) * (tag_bits + min_all)
        }
    };
    if needed_bits > available_bits {
        return Err(CsrError::DeclaredSizeTooLarge {
            tensor: th.name.clone(),
            what: "shape and non-zero count",
            needed_bits,
            available_bits,
        });
    }
    // Beyond this point rows + 1 <= available bits, nnz <= available bits
    // and (dense) elements <= available bits, so allocations are bounded by
    // the file's length. Every quantity also fits u32 (MAX_TENSOR_ELEMENTS).
    let (rows, cols, nnz_usize) = (rows as usize, cols as usize, nnz as usize);
    let shape: Vec<usize> = th.shape.iter().map(|&d| d as usize).collect();
    let mut reader = BitReader::new(payload);
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    let mut row_ptr = Vec::with_capacity(rows + 1);
    let mut col_idx = Vec::with_capacity(nnz_usize);
    let mut entry_width = Vec::with_capacity(nnz_usize);
    let mut entry_raw = Vec::with_capacity(nnz_usize);
    let mut bits = FieldBits {
        header: header_bits,
        ..FieldBits::default()
    };
    let read_value = |reader: &mut BitReader, w: u8| -> Result<i32> {
        if w == FLOAT {
            let raw = reader.read_bits(32).map_err(trunc)? as u32;
            let v = f32::from_bits(raw);
            if !v.is_finite() || v == 0.0 {
                return Err(CsrError::corrupt(
                    name,
                    format!("stored f32 value {v} is not a finite non-zero"),
                ));
            }
            Ok(raw as i32)
        } else {
            let q = reader.read_signed(u32::from(w)).map_err(trunc)? as i32;
            if q == 0 {
                return Err(CsrError::corrupt(name, "a stored value is 0"));
            }
            Ok(q)
        }
    };
    match th.layout {
        Layout::Csr | Layout::CsrRice | Layout::FlatGaps => {
            let w = csr_widths(cols as u64, nnz, table.len());
            (bits.row_ptr, bits.col_idx) = read_csr_index(
                &mut reader,
                name,
                (rows, cols, nnz),
                th.layout,
                w.row_ptr,
                w.col_idx,
                &mut row_ptr,
                &mut col_idx,
            )?;
            for _ in 0..nnz {
                let tag = reader.read_bits(w.tag).map_err(trunc)?;
                let width = *table.get(tag as usize).ok_or_else(|| {
                    CsrError::corrupt(
                        name,
                        format!("tag {tag} is beyond the width table {table:?}"),
                    )
                })?;
                entry_width.push(width);
            }
            for &width in &entry_width {
                entry_raw.push(read_value(&mut reader, width)?);
            }
            bits.tags = nnz * u64::from(w.tag);
        }
        Layout::Block => unreachable!("refused at the top of decode_tensor"),
        Layout::Dense => {
            let tag_bits = dense_tag_bits(table.len());
            row_ptr.push(0);
            for _ in 0..rows {
                for c in 0..cols {
                    let tag = reader.read_bits(tag_bits).map_err(trunc)?;
                    let width = *table.get(tag as usize).ok_or_else(|| {
                        CsrError::corrupt(
                            name,
                            format!("tag {tag} is beyond the width table {table:?}"),
                        )
                    })?;
                    if width != 0 {
                        if entry_width.len() as u64 == nnz {
                            return Err(CsrError::corrupt(
                                name,
                                format!("more non-zeros than the declared {nnz}"),
                            ));
                        }
                        entry_raw.push(read_value(&mut reader, width)?);
                        entry_width.push(width);
                        col_idx.push(c as u32);
                    }
                }
                row_ptr.push(entry_width.len() as u32);
            }
            if entry_width.len() as u64 != nnz {
                return Err(CsrError::corrupt(
                    name,
                    format!("{} non-zeros found but {nnz} declared", entry_width.len()),
                ));
            }
            bits.tags = elements * u64::from(tag_bits);
        }
    }
    bits.values = entry_width.iter().map(|&w| u64::from(w)).sum();
    bits.padding = finish_payload(&mut reader, name)?;
    Ok(CompressedTensor {
        name: th.name.clone(),
        shape,
        exponent: th.exponent,
        layout: th.layout,
        rows,
        cols,
        width_table: table.clone(),
        row_ptr,
        col_idx,
        entry_width,
        entry_raw,
        bits,
        kind: Kind::Fixed,
        block: None,
        kernel: OnceLock::new(),
    })
}

/// Reads and validates CSR row pointers and column indices: `0 = ptr[0] <=
/// ... <= ptr[rows] = nnz`, columns strictly increasing within a row and
/// `< cols`; in layout 2 the Rice parameter first and the columns as
/// Rice-coded gaps; in layout 4 the parameter and the row-major gaps, from
/// which the row pointers follow. The caller has checked the declared sizes
/// against the payload. Returns the bits of the row pointers and of the
/// column indices (with the parameter).
#[allow(clippy::too_many_arguments)]
pub(crate) fn read_csr_index(
    reader: &mut BitReader,
    name: &str,
    (rows, cols, nnz): (usize, usize, u64),
    layout: Layout,
    ptr_bits: u32,
    col_bits: u32,
    row_ptr: &mut Vec<u32>,
    col_idx: &mut Vec<u32>,
) -> Result<(u64, u64)> {
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    if layout == Layout::FlatGaps {
        let code = GapCode::read_field(reader).map_err(trunc)?;
        let gap_bits = read_flat_gaps(reader, name, (rows, cols, nnz), code, row_ptr, col_idx)?;
        return Ok((0, u64::from(GAP_CODE_BITS) + gap_bits));
    }
    let rice_k = match layout {
        Layout::CsrRice => Some(reader.read_bits(RICE_PARAM_BITS).map_err(trunc)? as u32),
        _ => None,
    };
    let ptr_total = (rows as u64 + 1) * u64::from(ptr_bits);
    let mut prev = 0u64;
    for r in 0..=rows {
        let p = reader.read_bits(ptr_bits).map_err(trunc)?;
        if (r == 0 && p != 0) || p < prev || p > nnz {
            return Err(CsrError::corrupt(
                name,
                format!(
                    "row pointer {r} = {p} breaks 0 = ptr[0] <= ... <= ptr[rows] = nnz ({nnz})"
                ),
            ));
        }
        prev = p;
        row_ptr.push(p as u32);
    }
    if prev != nnz {
        return Err(CsrError::corrupt(
            name,
            format!("last row pointer {prev} differs from nnz {nnz}"),
        ));
    }
    if let Some(k) = rice_k {
        let gap_bits = read_rice_columns(reader, name, cols, row_ptr, k, col_idx)?;
        return Ok((ptr_total, u64::from(RICE_PARAM_BITS) + gap_bits));
    }
    for r in 0..rows {
        let mut last: Option<u64> = None;
        for _ in row_ptr[r]..row_ptr[r + 1] {
            let c = reader.read_bits(col_bits).map_err(trunc)?;
            if c >= cols as u64 || last.is_some_and(|l| c <= l) {
                return Err(CsrError::corrupt(
                    name,
                    format!("column index {c} in row {r} is out of range ({cols} columns) or not increasing"),
                ));
            }
            last = Some(c);
            col_idx.push(c as u32);
        }
    }
    Ok((ptr_total, nnz * u64::from(col_bits)))
}

/// Checks the end of a payload's bit stream: fewer than 8 padding bits, all
/// zero. Returns the padding bits.
pub(crate) fn finish_payload(reader: &mut BitReader, name: &str) -> Result<u64> {
    let padding = reader.bits_remaining();
    if padding >= 8 {
        return Err(CsrError::corrupt(
            name,
            format!(
                "{} payload bytes beyond the end of its bit stream",
                padding / 8
            ),
        ));
    }
    let bits = reader
        .read_bits(padding as u32)
        .map_err(|e| CsrError::corrupt(name, format!("payload: {e}")))?;
    if bits != 0 {
        return Err(CsrError::corrupt(name, "the padding bits are not zero"));
    }
    Ok(padding as u64)
}
