//! Scaled tensors (format version 2): one small signed integer code per
//! element, a level function and float scales per group of consecutive
//! elements, as the binary / ternary / m-bit quantizers of qgrad-scaled
//! produce them. This module holds the input type, the encoder and the
//! decoder of that kind; FORMAT.md §7 is its byte-level specification.

use serde::Serialize;

use qgrad_fixed::BitReader;

use crate::block::{
    best_plan, grid, side, BlockPlan, BLOCK_COUNT_BITS, BLOCK_DIM_BITS, BLOCK_PREFIX_BITS,
};
use crate::encode::Allowed;
use crate::error::{CsrError, Result};
use crate::format::{
    bits_for, choose_layout, flat_rows_fit, matrix_dims, scaled_dense_code_bits,
    scaled_nonzero_code_bits, Admissible, Layout, LayoutChoice, LevelKind, ScaledHeader,
    TensorEntry, MAX_SCALED_CODE, MAX_TENSOR_ELEMENTS,
};
use crate::gaps::{
    best_rice, column_gaps, flat_gaps, write_rice, GapCode, GAP_CODE_BITS, RICE_PARAM_BITS,
};
use crate::model::{finish_payload, read_csr_index, CompressedTensor, Kind};
use crate::report::FieldBits;

/// One scaled tensor to encode: the value of element `i` is
/// `scale(group(i), sign(codes[i])) · levels.level(codes[i], max_code)`.
///
/// `groups` groups of `elements / groups` consecutive (row-major) elements
/// each have one scale, or two when `two_sided` (`[positive, negative]`: the
/// second is used where the code is negative). `scales` holds
/// `groups · (1 or 2)` finite values `>= 0`, group by group.
#[derive(Clone, Copy, Debug)]
pub struct ScaledTensorData<'a> {
    /// Unique name.
    pub name: &'a str,
    /// Shape; the matrix view is rows = `shape[0]`, cols = product of the
    /// rest (rank 0 or 1: one row).
    pub shape: &'a [usize],
    /// One code per element, row-major, `|code| <= max_code` (binary: ±1,
    /// or 0 for a pruned element, which only layout 3 stores).
    pub codes: &'a [i8],
    /// The level function.
    pub levels: LevelKind,
    /// The largest code magnitude `n`: 1 for binary and ternary,
    /// `2^(m-1) - 1` for m-bit codes; at most 127.
    pub max_code: u8,
    /// Number of scale groups (1 per tensor, `rows` per output channel, or
    /// any divisor of the element count).
    pub groups: usize,
    /// Two scales per group (positive, negative) instead of one.
    pub two_sided: bool,
    /// The scales, `groups · (1 + two_sided)` of them.
    pub scales: &'a [f32],
}

/// What a decoded scaled tensor is: its level function and its groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct ScaledInfo {
    /// The level function.
    pub levels: LevelKind,
    /// The largest code magnitude `n`.
    pub max_code: u8,
    /// Number of scale groups of consecutive elements.
    pub groups: usize,
    /// Two scales per group (positive, negative).
    pub two_sided: bool,
}

impl ScaledInfo {
    /// Bits of one code in the dense layout: 1 (binary), 2 (ternary), `m`
    /// (m-bit), in general `bits(2n)`. This is the width
    /// [`CompressedTensor::widths`] reports for a non-zero code.
    pub fn code_bits(&self) -> u8 {
        scaled_dense_code_bits(self.levels, self.max_code) as u8
    }

    /// Bits of one non-zero code in the CSR layout, `bits(2n - 1)`: one less
    /// than [`code_bits`](Self::code_bits) for ternary codes (the sign
    /// alone), equal for m-bit codes with `m >= 3`.
    pub fn nonzero_code_bits(&self) -> u8 {
        scaled_nonzero_code_bits(self.max_code) as u8
    }

    /// Scales per group: 2 when two-sided, else 1.
    pub fn scales_per_group(&self) -> usize {
        if self.two_sided {
            2
        } else {
            1
        }
    }

    /// `level(code)` before scaling ([`LevelKind::level`]).
    pub fn level(&self, code: i8) -> f32 {
        self.levels.level(code, self.max_code)
    }

    /// The integer level `L(|k|)` the integer kernel multiplies an activation
    /// with, for a code of magnitude `magnitude >= 1`: 1 (binary), `|k|`
    /// (linear), `2^(|k| - 1)` (log; saturating at `u128::MAX` beyond the
    /// codes a file can hold). `level(k) = sign(k) · L(|k|) /`
    /// [`denominator`](Self::denominator).
    pub fn integer_level(&self, magnitude: u8) -> u128 {
        match self.levels {
            LevelKind::Binary => 1,
            LevelKind::Linear => u128::from(magnitude),
            LevelKind::Log => 1u128
                .checked_shl(u32::from(magnitude.max(1) - 1))
                .unwrap_or(u128::MAX),
        }
    }

    /// The denominator `den` of the levels: 1 (binary), `n` (linear),
    /// `2^(n - 1)` (log).
    pub fn denominator(&self) -> f64 {
        match self.levels {
            LevelKind::Binary => 1.0,
            LevelKind::Linear => f64::from(self.max_code),
            LevelKind::Log => 2f64.powi(i32::from(self.max_code) - 1),
        }
    }
}

/// The kind of a decoded tensor ([`CompressedTensor::kind`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum TensorKind {
    /// Per-element fixed-point widths sharing one exponent (version 1's only kind).
    Fixed {
        /// The shared exponent `e`.
        exponent: i32,
    },
    /// Integer codes with float scales.
    Scaled(ScaledInfo),
}

fn allowed_codes(levels: LevelKind, max_code: u8) -> String {
    match levels {
        LevelKind::Binary => "±1 (binary)".into(),
        _ => format!("-{max_code}..={max_code}"),
    }
}

/// Validates `max_code` against the level kind (shared by the encoder and
/// the decoder's wording).
fn max_code_ok(levels: LevelKind, max_code: u8) -> bool {
    match levels {
        LevelKind::Binary => max_code == 1,
        _ => (1..=MAX_SCALED_CODE).contains(&max_code),
    }
}

/// Payload bits of a scaled tensor in `layout`; `gap_bits` are the bits of
/// the gaps and their code field, layout 2's or layout 4's (a lower bound
/// when decoding).
#[allow(clippy::too_many_arguments)]
fn payload_bits(
    layout: Layout,
    levels: LevelKind,
    max_code: u8,
    rows: u64,
    cols: u64,
    nnz: u64,
    scale_count: u64,
    gap_bits: u128,
) -> u128 {
    let scale_bits = u128::from(scale_count) * 32;
    match layout {
        Layout::Dense => {
            u128::from(rows)
                * u128::from(cols)
                * u128::from(scaled_dense_code_bits(levels, max_code))
                + scale_bits
        }
        Layout::Csr => {
            (u128::from(rows) + 1) * u128::from(bits_for(nnz).max(1))
                + u128::from(nnz)
                    * u128::from(
                        bits_for(cols.saturating_sub(1)) + scaled_nonzero_code_bits(max_code),
                    )
                + scale_bits
        }
        Layout::CsrRice => {
            (u128::from(rows) + 1) * u128::from(bits_for(nnz).max(1))
                + gap_bits
                + u128::from(nnz) * u128::from(scaled_nonzero_code_bits(max_code))
                + scale_bits
        }
        Layout::FlatGaps => {
            gap_bits + u128::from(nnz) * u128::from(scaled_nonzero_code_bits(max_code)) + scale_bits
        }
        // Sized by its block plan (`BlockPlan::bits`), not by these counts.
        Layout::Block => unreachable!("layout 3 is sized by its block plan"),
    }
}

/// Dense code field: binary the sign bit alone; otherwise `|k|` in the low
/// `bits - 1` bits and the sign (1 = negative) in the top bit.
fn dense_code_field(code: i8, levels: LevelKind, bits: u32) -> u64 {
    let neg = u64::from(code < 0);
    match levels {
        LevelKind::Binary => neg,
        _ => u64::from(code.unsigned_abs()) | (neg << (bits - 1)),
    }
}

/// The code of a dense code field of `d` bits (the inverse of
/// [`dense_code_field`]); `None` for a magnitude above `n` or a "-0".
fn dense_code(field: u64, levels: LevelKind, n: u8, d: u32) -> Option<i32> {
    if levels == LevelKind::Binary {
        return Some(1 - 2 * field as i32);
    }
    let magnitude = field & ((1 << (d - 1)) - 1);
    let neg = field >> (d - 1) == 1;
    if magnitude > u64::from(n) || (neg && magnitude == 0) {
        return None;
    }
    Some(if neg {
        -(magnitude as i32)
    } else {
        magnitude as i32
    })
}

/// CSR code field of a non-zero code: `|k| - 1` in the low `bits - 1` bits,
/// the sign (1 = negative) in the top bit.
fn nonzero_code_field(code: i8, bits: u32) -> u64 {
    let neg = u64::from(code < 0);
    u64::from(code.unsigned_abs() - 1) | (neg << (bits - 1))
}

/// Validates a scaled input and encodes it: the header entry and the payload.
pub(crate) fn encode_scaled(
    t: &ScaledTensorData,
    choice: LayoutChoice,
    allowed: Allowed,
) -> Result<(TensorEntry, Vec<u8>)> {
    let name = t.name;
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    let (rows, cols) =
        matrix_dims(&shape).ok_or_else(|| CsrError::invalid(name, "shape product overflows"))?;
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| CsrError::invalid(name, "shape product overflows"))?;
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(CsrError::invalid(
            name,
            format!("{elements} elements exceed the format's limit of {MAX_TENSOR_ELEMENTS}"),
        ));
    }
    if t.codes.len() as u64 != elements {
        return Err(CsrError::invalid(
            name,
            format!(
                "shape {:?} has {elements} elements but {} codes were given",
                t.shape,
                t.codes.len()
            ),
        ));
    }
    if !max_code_ok(t.levels, t.max_code) {
        return Err(CsrError::InvalidMaxCode {
            tensor: name.to_owned(),
            levels: t.levels,
            max_code: t.max_code,
        });
    }
    let n = t.max_code;
    let binary = t.levels == LevelKind::Binary;
    let out_of_range = |i: usize| CsrError::CodeOutOfRange {
        tensor: name.to_owned(),
        index: i,
        code: t.codes[i],
        allowed: allowed_codes(t.levels, n),
    };
    if let Some(i) = t.codes.iter().position(|&c| c.unsigned_abs() > n) {
        return Err(out_of_range(i));
    }
    // Binary codes are ±1; zero codes are admitted only as whole pruned
    // blocks, which only layout 3 can hold.
    let binary_zero = binary
        .then(|| t.codes.iter().position(|&c| c == 0))
        .flatten();
    let groups_ok = t.groups >= 1
        && if elements == 0 {
            t.groups == 1
        } else {
            elements % t.groups as u64 == 0
        };
    if !groups_ok {
        return Err(CsrError::InvalidGroups {
            tensor: name.to_owned(),
            groups: t.groups,
            elements,
        });
    }
    let per_group = 1 + usize::from(t.two_sided);
    let expected = t.groups * per_group; // groups <= elements < 2^32: no overflow
    if t.scales.len() != expected {
        return Err(CsrError::ScaleCount {
            tensor: name.to_owned(),
            found: t.scales.len(),
            expected,
            groups: t.groups,
            per_group,
        });
    }
    if let Some(i) = t.scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
        return Err(CsrError::InvalidScale {
            tensor: name.to_owned(),
            index: i,
            value: t.scales[i],
        });
    }
    let nnz = t.codes.iter().filter(|&&c| c != 0).count() as u64;
    let nonzero: Vec<u64> = t
        .codes
        .iter()
        .enumerate()
        .filter(|(_, &c)| c != 0)
        .map(|(i, _)| i as u64)
        .collect();
    let gaps = column_gaps(cols.max(1), nonzero.iter().copied());
    let (rice_k, rice_bits) = best_rice(&gaps, cols);
    let flat = flat_gaps(nonzero.iter().copied());
    let (flat_code, flat_bits) = GapCode::best(&flat, elements);
    let dense_code_bits = scaled_dense_code_bits(t.levels, n);
    // Blocks only where some element is zero (with none, dense is smaller).
    let block_plan = if allowed.block && nnz < elements {
        best_plan(
            t.codes,
            (rows as usize, cols as usize),
            dense_code_bits,
            binary,
            u128::from(expected as u64) * 32,
        )
    } else {
        None
    };
    if let (Some(i), None) = (binary_zero, &block_plan) {
        return Err(out_of_range(i));
    }
    let candidate = |layout: Layout| -> Result<(ScaledHeader, usize)> {
        let bits = match (layout, &block_plan) {
            (Layout::Block, Some(p)) => {
                p.bits(grid(cols, p.block.1 as u64), dense_code_bits)
                    + u128::from(expected as u64) * 32
            }
            _ => payload_bits(
                layout,
                t.levels,
                n,
                rows,
                cols,
                nnz,
                expected as u64,
                if layout == Layout::FlatGaps {
                    flat_bits
                } else {
                    rice_bits
                },
            ),
        };
        let header = ScaledHeader {
            name: name.to_owned(),
            shape: shape.clone(),
            layout,
            levels: t.levels,
            max_code: n,
            two_sided: t.two_sided,
            groups: t.groups as u64,
            nnz,
            payload_bytes: bits.div_ceil(8) as u64,
        };
        let header_len = postcard::to_allocvec(&TensorEntry::Scaled(header.clone()))
            .map_err(|e| CsrError::Serialize(e.to_string()))?
            .len();
        let total = header_len + header.payload_bytes as usize;
        Ok((header, total))
    };
    // Any number of non-zeros may be dense for a scaled tensor; a binary one
    // with zeros only in blocks.
    // Layout 4 only where the payload bounds the row count (FORMAT.md §7.4).
    let flat_payload = payload_bits(
        Layout::FlatGaps,
        t.levels,
        n,
        rows,
        cols,
        nnz,
        expected as u64,
        flat_bits,
    );
    let admissible = Admissible {
        csr: binary_zero.is_none(),
        dense: binary_zero.is_none(),
        rice: allowed.rice,
        block: block_plan.is_some(),
        flat: allowed.flat && binary_zero.is_none() && flat_rows_fit(rows, flat_payload),
    };
    let (header, _) = choose_layout(choice, admissible, candidate)?;
    let mut w = qgrad_fixed::BitWriter::with_capacity_bits(8 * header.payload_bytes as usize);
    match header.layout {
        Layout::Dense => {
            let d = scaled_dense_code_bits(t.levels, n);
            for &c in t.codes {
                w.write_bits(dense_code_field(c, t.levels, d), d);
            }
        }
        Layout::Csr | Layout::CsrRice | Layout::FlatGaps => {
            let ptr_bits = bits_for(nnz).max(1);
            let col_bits = bits_for(cols.saturating_sub(1));
            let code_bits = scaled_nonzero_code_bits(n);
            let cols = cols as usize;
            match header.layout {
                Layout::CsrRice => w.write_bits(u64::from(rice_k), RICE_PARAM_BITS),
                Layout::FlatGaps => flat_code.write_field(&mut w),
                _ => {}
            }
            if header.layout != Layout::FlatGaps {
                w.write_bits(0, ptr_bits);
                let mut ptr = 0u64;
                for r in 0..rows as usize {
                    let row = &t.codes[r * cols..(r + 1) * cols];
                    ptr += row.iter().filter(|&&c| c != 0).count() as u64;
                    w.write_bits(ptr, ptr_bits);
                }
            }
            if header.layout == Layout::CsrRice {
                write_rice(&mut w, &gaps, rice_k);
            } else if header.layout == Layout::FlatGaps {
                flat_code.write(&mut w, &flat);
            } else {
                for (i, &c) in t.codes.iter().enumerate() {
                    if c != 0 {
                        w.write_bits((i % cols) as u64, col_bits);
                    }
                }
            }
            for &c in t.codes.iter().filter(|&&c| c != 0) {
                w.write_bits(nonzero_code_field(c, code_bits), code_bits);
            }
        }
        Layout::Block => {
            let p = block_plan
                .as_ref()
                .expect("layout 3 is chosen only with a block plan");
            write_blocks(&mut w, t, p, (rows, cols), dense_code_bits);
        }
    }
    for &s in t.scales {
        // -0.0 is stored as +0.0: the format keeps the sign bit of a scale clear.
        w.write_bits(u64::from((s + 0.0).to_bits()), 32);
    }
    let payload = w.finish();
    debug_assert_eq!(payload.len() as u64, header.payload_bytes);
    Ok((TensorEntry::Scaled(header), payload))
}

/// Layout 3's payload up to the scales (FORMAT.md §7.7).
fn write_blocks(
    w: &mut qgrad_fixed::BitWriter,
    t: &ScaledTensorData,
    p: &BlockPlan,
    (rows, cols): (u64, u64),
    d: u32,
) {
    let (br, bc) = (p.block.0 as u64, p.block.1 as u64);
    let nb = p.block_cols.len() as u64;
    w.write_bits(br - 1, BLOCK_DIM_BITS);
    w.write_bits(bc - 1, BLOCK_DIM_BITS);
    w.write_bits(nb, BLOCK_COUNT_BITS);
    let ptr_bits = bits_for(nb).max(1);
    for &ptr in &p.block_ptr {
        w.write_bits(ptr, ptr_bits);
    }
    let col_bits = bits_for(grid(cols, bc).saturating_sub(1));
    for &j in &p.block_cols {
        w.write_bits(j, col_bits);
    }
    for (i, pair) in p.block_ptr.windows(2).enumerate() {
        let i = i as u64;
        let r0 = i * br;
        for &j in &p.block_cols[pair[0] as usize..pair[1] as usize] {
            let c0 = j * bc;
            for r in r0..r0 + side(rows, br, i) {
                for c in c0..c0 + side(cols, bc, j) {
                    let code = t.codes[(r * cols + c) as usize];
                    w.write_bits(dense_code_field(code, t.levels, d), d);
                }
            }
        }
    }
}

/// Decodes and validates one scaled tensor (FORMAT.md §7).
pub(crate) fn decode_scaled(
    th: &ScaledHeader,
    payload: &[u8],
    header_bits: u64,
) -> Result<CompressedTensor> {
    let name = th.name.as_str();
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
    if !max_code_ok(th.levels, th.max_code) {
        return Err(CsrError::corrupt(
            name,
            format!(
                "max_code {} is not allowed for {} levels (binary: 1; linear and log: 1..=127)",
                th.max_code, th.levels
            ),
        ));
    }
    let groups = th.groups;
    let groups_ok = groups >= 1
        && if elements == 0 {
            groups == 1
        } else {
            groups <= elements && elements % groups == 0
        };
    if !groups_ok {
        return Err(CsrError::corrupt(
            name,
            format!("{groups} groups do not split {elements} elements into equal groups"),
        ));
    }
    let nnz = th.nnz;
    if nnz > elements {
        return Err(CsrError::corrupt(
            name,
            format!("{nnz} non-zeros declared in a tensor of {elements} elements"),
        ));
    }
    // Layout 3 checks its binary codes against the kept blocks instead.
    if th.levels == LevelKind::Binary && nnz != elements && th.layout != Layout::Block {
        return Err(CsrError::corrupt(
            name,
            format!(
                "a binary tensor has no zero codes, but {nnz} non-zeros of {elements} are declared"
            ),
        ));
    }
    let n = th.max_code;
    let per_group = 1 + u64::from(th.two_sided);
    let scale_count = groups * per_group; // <= 2^33
                                          // Layout 2: the 5-bit Rice parameter and at least 1 bit per gap.
    let rice_lower_bound = u128::from(RICE_PARAM_BITS) + u128::from(nnz);
    let needed_bits = match th.layout {
        // Layout 3: its prefix, a code per non-zero, the scales, and one
        // bit per row (FORMAT.md §7.7); the block grid is checked once read.
        Layout::Block => (u128::from(BLOCK_PREFIX_BITS)
            + u128::from(nnz) * u128::from(scaled_dense_code_bits(th.levels, n))
            + u128::from(scale_count) * 32)
            .max(u128::from(rows) + 1),
        // Layout 4: no row pointers, but its rows are bounded by the
        // payload's bits all the same (FORMAT.md §7.4).
        Layout::FlatGaps => payload_bits(
            Layout::FlatGaps,
            th.levels,
            n,
            rows,
            cols,
            nnz,
            scale_count,
            u128::from(GAP_CODE_BITS) + u128::from(nnz),
        )
        .max(u128::from(rows) + 1),
        layout => payload_bits(
            layout,
            th.levels,
            n,
            rows,
            cols,
            nnz,
            scale_count,
            rice_lower_bound,
        ),
    };
    let available_bits = payload.len() as u128 * 8;
    if needed_bits > available_bits {
        return Err(CsrError::DeclaredSizeTooLarge {
            tensor: th.name.clone(),
            what: "shape, non-zero count and scales",
            needed_bits,
            available_bits,
        });
    }
    // From here every count (rows + 1, nnz, elements for dense, scales) is
    // at most the payload's bit count, so allocations are bounded by the file.
    let (rows_us, cols_us) = (rows as usize, cols as usize);
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    let mut reader = BitReader::new(payload);
    let mut row_ptr = Vec::with_capacity(rows_us + 1);
    let mut col_idx = Vec::with_capacity(nnz as usize);
    let mut codes: Vec<i32> = Vec::with_capacity(nnz as usize);
    let mut bits = FieldBits {
        header: header_bits,
        ..FieldBits::default()
    };
    let out_of_range = |field: u64| {
        CsrError::corrupt(
            name,
            format!(
                "code field {field:#b} is not a code in {}",
                allowed_codes(th.levels, n)
            ),
        )
    };
    let mut block = None;
    match th.layout {
        Layout::Dense => {
            let d = scaled_dense_code_bits(th.levels, n);
            row_ptr.push(0u32);
            for _ in 0..rows_us {
                for c in 0..cols_us {
                    let field = reader.read_bits(d).map_err(trunc)?;
                    let code =
                        dense_code(field, th.levels, n, d).ok_or_else(|| out_of_range(field))?;
                    if code != 0 {
                        if codes.len() as u64 == nnz {
                            return Err(CsrError::corrupt(
                                name,
                                format!("more non-zero codes than the declared {nnz}"),
                            ));
                        }
                        codes.push(code);
                        col_idx.push(c as u32);
                    }
                }
                row_ptr.push(codes.len() as u32);
            }
            if codes.len() as u64 != nnz {
                return Err(CsrError::corrupt(
                    name,
                    format!("{} non-zero codes found but {nnz} declared", codes.len()),
                ));
            }
            bits.values = elements * u64::from(d);
        }
        Layout::Csr | Layout::CsrRice | Layout::FlatGaps => {
            let ptr_bits = bits_for(nnz).max(1);
            let col_bits = bits_for(cols.saturating_sub(1));
            (bits.row_ptr, bits.col_idx) = read_csr_index(
                &mut reader,
                name,
                (rows_us, cols_us, nnz),
                th.layout,
                ptr_bits,
                col_bits,
                &mut row_ptr,
                &mut col_idx,
            )?;
            let c = scaled_nonzero_code_bits(n);
            for _ in 0..nnz {
                let field = reader.read_bits(c).map_err(trunc)?;
                let magnitude = (field & ((1 << (c - 1)) - 1)) + 1;
                if magnitude > u64::from(n) {
                    return Err(out_of_range(field));
                }
                let code = if field >> (c - 1) == 1 {
                    -(magnitude as i32)
                } else {
                    magnitude as i32
                };
                codes.push(code);
            }
            bits.values = nnz * u64::from(c);
        }
        Layout::Block => {
            let d = scaled_dense_code_bits(th.levels, n);
            let fields = read_blocks(
                &mut reader,
                th,
                (rows, cols),
                scale_count,
                available_bits,
                &mut row_ptr,
                &mut col_idx,
                &mut codes,
            )?;
            bits.row_ptr = fields.0;
            bits.col_idx = fields.1;
            bits.values = fields.2 * u64::from(d);
            block = Some(fields.3);
        }
    }
    let mut scales = Vec::with_capacity(scale_count as usize);
    for i in 0..scale_count {
        let raw = reader.read_bits(32).map_err(trunc)? as u32;
        let s = f32::from_bits(raw);
        if !s.is_finite() || s.is_sign_negative() {
            return Err(CsrError::corrupt(
                name,
                format!("scale {i} is {s} (bits {raw:#010x}): expected a finite value >= +0"),
            ));
        }
        scales.push(s);
    }
    bits.scales = scale_count * 32;
    bits.padding = finish_payload(&mut reader, name)?;
    let info = ScaledInfo {
        levels: th.levels,
        max_code: n,
        groups: groups as usize,
        two_sided: th.two_sided,
    };
    let tensor = CompressedTensor::from_parts(
        th.name.clone(),
        th.shape.iter().map(|&d| d as usize).collect(),
        0,
        th.layout,
        rows_us,
        cols_us,
        Vec::new(),
        row_ptr,
        col_idx,
        vec![info.code_bits(); codes.len()],
        codes,
        bits,
        Kind::Scaled { info, scales },
    );
    Ok(match block {
        Some(b) => tensor.with_block(b),
        None => tensor,
    })
}

/// Reads layout 3 up to the scales (FORMAT.md §7.7) into the element CSR of
/// the non-zero codes; returns the bits of (prefix and block row pointers,
/// block columns), the number of kept elements and the block shape.
#[allow(clippy::too_many_arguments)]
fn read_blocks(
    reader: &mut BitReader,
    th: &ScaledHeader,
    (rows, cols): (u64, u64),
    scale_count: u64,
    available_bits: u128,
    row_ptr: &mut Vec<u32>,
    col_idx: &mut Vec<u32>,
    codes: &mut Vec<i32>,
) -> Result<(u64, u64, u64, (usize, usize))> {
    let name = th.name.as_str();
    let n = th.max_code;
    let d = scaled_dense_code_bits(th.levels, n);
    let trunc = |e: qgrad_fixed::FixedError| CsrError::corrupt(name, format!("payload: {e}"));
    let br = reader.read_bits(BLOCK_DIM_BITS).map_err(trunc)? + 1;
    let bc = reader.read_bits(BLOCK_DIM_BITS).map_err(trunc)? + 1;
    let nb = reader.read_bits(BLOCK_COUNT_BITS).map_err(trunc)?;
    let (gr, gc) = (grid(rows, br), grid(cols, bc));
    if nb > gr * gc {
        return Err(CsrError::corrupt(
            name,
            format!("{nb} kept blocks declared in a grid of {gr} × {gc} blocks of {br} × {bc}"),
        ));
    }
    let ptr_bits = bits_for(nb).max(1);
    let col_bits = bits_for(gc.saturating_sub(1));
    let index_bits = u128::from(BLOCK_PREFIX_BITS)
        + (u128::from(gr) + 1) * u128::from(ptr_bits)
        + u128::from(nb) * u128::from(col_bits);
    // Every kept block has at least one element, and each costs d bits.
    let lower =
        index_bits + u128::from(nb.max(th.nnz)) * u128::from(d) + u128::from(scale_count) * 32;
    if lower > available_bits {
        return Err(CsrError::DeclaredSizeTooLarge {
            tensor: name.to_owned(),
            what: "block grid, kept blocks and scales",
            needed_bits: lower,
            available_bits,
        });
    }
    let mut block_ptr = Vec::with_capacity(gr as usize + 1);
    let mut prev = 0u64;
    for i in 0..=gr {
        let p = reader.read_bits(ptr_bits).map_err(trunc)?;
        if (i == 0 && p != 0) || p < prev || p > nb || p - prev > gc || (i == gr && p != nb) {
            return Err(CsrError::corrupt(
                name,
                format!(
                    "block row pointer {i} = {p} breaks 0 = ptr[0] <= ... <= ptr[{gr}] = \
                     kept blocks ({nb}), at most {gc} per block row"
                ),
            ));
        }
        block_ptr.push(p);
        prev = p;
    }
    let mut block_cols = Vec::with_capacity(nb as usize);
    let mut kept_elements = 0u64;
    for (i, pair) in block_ptr.windows(2).enumerate() {
        let h = side(rows, br, i as u64);
        let mut last: Option<u64> = None;
        for _ in pair[0]..pair[1] {
            let j = reader.read_bits(col_bits).map_err(trunc)?;
            if j >= gc || last.is_some_and(|l| j <= l) {
                return Err(CsrError::corrupt(
                    name,
                    format!(
                        "block column {j} in block row {i}: columns must increase and be < {gc}"
                    ),
                ));
            }
            last = Some(j);
            kept_elements += h * side(cols, bc, j);
            block_cols.push(j);
        }
    }
    let needed =
        index_bits + u128::from(kept_elements) * u128::from(d) + u128::from(scale_count) * 32;
    if needed > available_bits {
        return Err(CsrError::DeclaredSizeTooLarge {
            tensor: name.to_owned(),
            what: "codes of the kept blocks and scales",
            needed_bits: needed,
            available_bits,
        });
    }
    if th.levels == LevelKind::Binary && kept_elements != th.nnz {
        return Err(CsrError::corrupt(
            name,
            format!(
                "a binary tensor's kept blocks hold {kept_elements} codes, all ±1, \
                 but {} non-zeros are declared",
                th.nnz
            ),
        ));
    }
    // The codes, block by block (kept_elements <= the payload's bits).
    let mut block_codes: Vec<i32> = Vec::with_capacity(kept_elements as usize);
    for _ in 0..kept_elements {
        let field = reader.read_bits(d).map_err(trunc)?;
        let code = dense_code(field, th.levels, n, d).ok_or_else(|| {
            CsrError::corrupt(
                name,
                format!(
                    "code field {field:#b} is not a code in {}",
                    allowed_codes(th.levels, n)
                ),
            )
        })?;
        block_codes.push(code);
    }
    // Element rows: the kept blocks of the row's block row, left to right.
    row_ptr.push(0);
    let mut start = 0u64; // the first code of the block row's first block
    for (i, pair) in block_ptr.windows(2).enumerate() {
        let i = i as u64;
        let h = side(rows, br, i);
        let blocks = &block_cols[pair[0] as usize..pair[1] as usize];
        for dr in 0..h {
            let mut offset = start;
            for &j in blocks {
                let w = side(cols, bc, j);
                for dc in 0..w {
                    let code = block_codes[(offset + dr * w + dc) as usize];
                    if code != 0 {
                        if codes.len() as u64 == th.nnz {
                            return Err(CsrError::corrupt(
                                name,
                                format!("more non-zero codes than the declared {}", th.nnz),
                            ));
                        }
                        codes.push(code);
                        col_idx.push((j * bc + dc) as u32);
                    }
                }
                offset += h * w;
            }
            row_ptr.push(codes.len() as u32);
        }
        start += blocks.iter().map(|&j| h * side(cols, bc, j)).sum::<u64>();
    }
    if codes.len() as u64 != th.nnz {
        return Err(CsrError::corrupt(
            name,
            format!(
                "{} non-zero codes found but {} declared",
                codes.len(),
                th.nnz
            ),
        ));
    }
    Ok((
        u64::from(BLOCK_PREFIX_BITS) + (gr + 1) * u64::from(ptr_bits),
        nb * u64::from(col_bits),
        kept_elements,
        (br as usize, bc as usize),
    ))
}
