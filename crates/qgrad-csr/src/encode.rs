//! The encoder: quantize every element with its own width (or take a scaled
//! tensor's codes), keep the non-zeros, choose CSR or dense per tensor, and
//! bit-pack every field.

use std::cell::OnceCell;
use std::io::Write;
use std::path::Path;

use qgrad_fixed::{FixedFormat, FLOAT, MAX_EXPONENT, MIN_EXPONENT, PRUNED};

use crate::error::{CsrError, Result};
use crate::format::{
    choose_layout, csr_widths, dense_tag_bits, flat_rows_fit, matrix_dims, Admissible, FileHeader,
    FileHeaderV1, Layout, LayoutChoice, TensorEntry, TensorHeader, CHECKSUM_BYTES, FORMAT_VERSION,
    MAGIC, MAX_TENSOR_ELEMENTS, PREFIX_BYTES, SPLIT_WEIGHTS_VERSION,
};
use crate::gaps::{best_rice, column_gaps, flat_gaps, write_rice, GapCode, RICE_PARAM_BITS};
use crate::model::CompressedModel;
use crate::report::SizeReport;
use crate::scaled::{encode_scaled, ScaledTensorData};

/// One tensor to encode: float values and a width per element.
///
/// Widths: 0 pruned, 2..=16 fixed point, 32 kept as raw f32. The encoder
/// quantizes each element with its width, all sharing the exponent
/// `qgrad_fixed::tensor_exponent` of the non-pruned values (or `exponent`
/// where given); elements whose integer is 0 (or whose f32 is ±0.0) are zeros
/// and not stored.
#[derive(Clone, Copy, Debug)]
pub struct TensorData<'a> {
    /// Unique name.
    pub name: &'a str,
    /// Shape; the matrix view is rows = `shape[0]`, cols = product of the rest
    /// (rank 0 or 1: one row).
    pub shape: &'a [usize],
    /// Float values, row-major, `product(shape)` of them.
    pub values: &'a [f32],
    /// One width per value.
    pub widths: &'a [u8],
    /// The tensor's exponent, where the caller fixed it: a model quantized
    /// (and frozen) during training keeps the exponent its values were
    /// quantized with, which re-deriving it from the already-quantized values
    /// can change (their maximum may have rounded down to a power of two).
    /// `None`: `tensor_exponent` of the non-pruned values. Values outside the
    /// range a given exponent allows saturate, as quantization does.
    pub exponent: Option<i32>,
}

/// One tensor to encode, of either kind.
#[derive(Clone, Copy, Debug)]
pub enum TensorInput<'a> {
    /// Float values with a fixed-point width per element.
    Fixed(TensorData<'a>),
    /// Integer codes with float scales.
    Scaled(ScaledTensorData<'a>),
}

impl TensorInput<'_> {
    /// The tensor's name.
    pub fn name(&self) -> &str {
        match self {
            TensorInput::Fixed(t) => t.name,
            TensorInput::Scaled(t) => t.name,
        }
    }
}

impl<'a> From<TensorData<'a>> for TensorInput<'a> {
    fn from(t: TensorData<'a>) -> Self {
        TensorInput::Fixed(t)
    }
}

impl<'a> From<ScaledTensorData<'a>> for TensorInput<'a> {
    fn from(t: ScaledTensorData<'a>) -> Self {
        TensorInput::Scaled(t)
    }
}

/// Encoder options.
#[derive(Clone, Debug, Default)]
pub struct EncodeOptions {
    /// Layout policy per tensor.
    pub layout: LayoutChoice,
    /// Free-form key/value metadata stored in the header.
    pub metadata: Vec<(String, String)>,
    /// The newest format version the file may have, for readers deployed
    /// before a layout existed: `Some(4)` keeps layout 4 out, `Some(3)` also
    /// layout 3, `Some(2)` also layout 2, `Some(1)` also scaled tensors.
    /// `None`: [`FORMAT_VERSION`]. A file is written at the lowest version
    /// its tensors need either way.
    pub max_version: Option<u32>,
}

/// The layouts beyond version 1 an encoder may offer `Auto` for one tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Allowed {
    /// Layout 2 (version 3).
    pub rice: bool,
    /// Layout 3 (version 4).
    pub block: bool,
    /// Layout 4 (version 5).
    pub flat: bool,
}

impl Allowed {
    fn up_to(max_version: u32, newer_fixed_layouts: bool) -> Self {
        Allowed {
            rice: newer_fixed_layouts && max_version >= Layout::CsrRice.min_version(),
            block: max_version >= Layout::Block.min_version(),
            flat: newer_fixed_layouts && max_version >= Layout::FlatGaps.min_version(),
        }
    }
}

/// A tensor after quantization: its stored non-zeros in row-major order.
struct QuantizedTensor {
    rows: u64,
    cols: u64,
    exponent: i32,
    /// Per non-zero: row-major element index, width, raw bits (two's
    /// complement integer or f32 bits).
    flat_of: Vec<u64>,
    widths_of: Vec<u8>,
    raw_of: Vec<u64>,
    /// Number of non-zeros in each row.
    row_counts: Vec<u64>,
    has_zero: bool,
    /// Layout 2's column gaps, their best Rice parameter and its bits, and
    /// layout 4's row-major gaps, their best code and its bits: found once
    /// per tensor, for every candidate's size and for the payload.
    rice: OnceCell<(Vec<u64>, u32, u128)>,
    flat: OnceCell<(Vec<u64>, GapCode, u128)>,
}

impl QuantizedTensor {
    /// The column gaps of the non-zeros (layout 2), the best Rice parameter
    /// and the bits it takes (its 5-bit field included).
    fn rice(&self) -> &(Vec<u64>, u32, u128) {
        self.rice.get_or_init(|| {
            let gaps = column_gaps(self.cols, self.flat_of.iter().copied());
            let (k, bits) = best_rice(&gaps, self.cols);
            (gaps, k, bits)
        })
    }

    /// The row-major gaps of the non-zeros (layout 4), the best code and
    /// the bits it takes (its 6-bit field included).
    fn flat(&self) -> &(Vec<u64>, GapCode, u128) {
        self.flat.get_or_init(|| {
            let gaps = flat_gaps(self.flat_of.iter().copied());
            let (code, bits) = GapCode::best(&gaps, self.rows * self.cols);
            (gaps, code, bits)
        })
    }
}

fn quantize_tensor(t: &TensorData) -> Result<QuantizedTensor> {
    let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
    let (rows, cols) =
        matrix_dims(&shape).ok_or_else(|| CsrError::invalid(t.name, "shape product overflows"))?;
    let elements = rows
        .checked_mul(cols)
        .ok_or_else(|| CsrError::invalid(t.name, "shape product overflows"))?;
    if elements > MAX_TENSOR_ELEMENTS {
        return Err(CsrError::invalid(
            t.name,
            format!("{elements} elements exceed the format's limit of {MAX_TENSOR_ELEMENTS}"),
        ));
    }
    if t.values.len() as u64 != elements || t.widths.len() as u64 != elements {
        return Err(CsrError::invalid(
            t.name,
            format!(
                "shape {:?} has {elements} elements but {} values and {} widths were given",
                t.shape,
                t.values.len(),
                t.widths.len()
            ),
        ));
    }
    if let Some(i) = t
        .widths
        .iter()
        .position(|&w| !qgrad_fixed::is_valid_width(w))
    {
        return Err(CsrError::invalid(
            t.name,
            format!(
                "element {i} has width {}: expected 0, 2..=16 or 32",
                t.widths[i]
            ),
        ));
    }
    let kept: Vec<f32> = t
        .values
        .iter()
        .zip(t.widths)
        .filter(|(_, &w)| w != PRUNED)
        .map(|(&v, _)| v)
        .collect();
    let exponent = match t.exponent {
        Some(e) => {
            if let Some(i) = kept.iter().position(|v| !v.is_finite()) {
                return Err(CsrError::invalid(
                    t.name,
                    format!("value {i} of the kept values is not finite"),
                ));
            }
            e
        }
        None => qgrad_fixed::tensor_exponent(&kept)
            .map_err(|e| CsrError::invalid(t.name, format!("cannot find the exponent: {e}")))?,
    };
    if !(MIN_EXPONENT..=MAX_EXPONENT).contains(&exponent) {
        return Err(CsrError::invalid(
            t.name,
            format!("exponent {exponent} is outside {MIN_EXPONENT}..={MAX_EXPONENT} (a value is too large)"),
        ));
    }
    let formats: Vec<Option<FixedFormat>> = (0..=16u8)
        .map(|b| FixedFormat::new(b, exponent).ok())
        .collect();

    let mut q = QuantizedTensor {
        rows,
        cols,
        exponent,
        flat_of: Vec::new(),
        widths_of: Vec::new(),
        raw_of: Vec::new(),
        row_counts: vec![0; rows as usize],
        has_zero: false,
        rice: OnceCell::new(),
        flat: OnceCell::new(),
    };
    for (i, (&v, &w)) in t.values.iter().zip(t.widths).enumerate() {
        let raw = match w {
            PRUNED => None,
            FLOAT => (v != 0.0).then(|| u64::from(v.to_bits())),
            _ => {
                // Valid widths 2..=16 always have a format (exponent checked above).
                let format = formats[usize::from(w)].ok_or_else(|| {
                    CsrError::invalid(t.name, format!("no fixed-point format for width {w}"))
                })?;
                let int = format.quantize(v);
                (int != 0).then_some(int as i64 as u64)
            }
        };
        match raw {
            Some(raw) => {
                // cols > 0 here: an element exists.
                let i = i as u64;
                q.row_counts[(i / cols) as usize] += 1;
                q.flat_of.push(i);
                q.widths_of.push(w);
                q.raw_of.push(raw);
            }
            None => q.has_zero = true,
        }
    }
    Ok(q)
}

/// Bits the layout would take (payload only).
fn payload_bits(q: &QuantizedTensor, table: &[u8], layout: Layout) -> u128 {
    let nnz = q.widths_of.len() as u128;
    let value_bits: u128 = q.widths_of.iter().map(|&w| u128::from(w)).sum();
    match layout {
        Layout::Csr => {
            let w = csr_widths(q.cols, nnz as u64, table.len());
            (u128::from(q.rows) + 1) * u128::from(w.row_ptr)
                + nnz * u128::from(w.col_idx + w.tag)
                + value_bits
        }
        Layout::CsrRice => {
            let w = csr_widths(q.cols, nnz as u64, table.len());
            (u128::from(q.rows) + 1) * u128::from(w.row_ptr)
                + q.rice().2
                + nnz * u128::from(w.tag)
                + value_bits
        }
        Layout::FlatGaps => {
            let w = csr_widths(q.cols, nnz as u64, table.len());
            q.flat().2 + nnz * u128::from(w.tag) + value_bits
        }
        // The fixed encoder never offers layout 3 (`Admissible::block` is false).
        Layout::Block => unreachable!("layout 3 holds scaled tensors only"),
        Layout::Dense => {
            let elements = u128::from(q.rows) * u128::from(q.cols);
            elements * u128::from(dense_tag_bits(table.len())) + value_bits
        }
    }
}

fn sorted_table(q: &QuantizedTensor, with_zero: bool) -> Vec<u8> {
    let mut seen = [false; 33];
    for &w in &q.widths_of {
        seen[usize::from(w)] = true;
    }
    seen[0] = with_zero;
    (0..=32u8).filter(|&w| seen[usize::from(w)]).collect()
}

fn tag_of(table: &[u8], w: u8) -> u64 {
    // The table was built from these very widths, so the search succeeds.
    table.binary_search(&w).unwrap_or(0) as u64
}

fn write_payload(q: &QuantizedTensor, table: &[u8], layout: Layout) -> Vec<u8> {
    let bits = payload_bits(q, table, layout);
    let mut writer = qgrad_fixed::BitWriter::with_capacity_bits(bits as usize);
    match layout {
        Layout::Csr | Layout::CsrRice | Layout::FlatGaps => {
            let nnz = q.widths_of.len() as u64;
            let w = csr_widths(q.cols, nnz, table.len());
            match layout {
                Layout::CsrRice => writer.write_bits(u64::from(q.rice().1), RICE_PARAM_BITS),
                Layout::FlatGaps => q.flat().1.write_field(&mut writer),
                _ => {}
            }
            if layout != Layout::FlatGaps {
                let mut ptr = 0u64;
                writer.write_bits(0, w.row_ptr);
                for &count in &q.row_counts {
                    ptr += count;
                    writer.write_bits(ptr, w.row_ptr);
                }
            }
            if layout == Layout::CsrRice {
                let (gaps, k, _) = q.rice();
                write_rice(&mut writer, gaps, *k);
            } else if layout == Layout::FlatGaps {
                let (gaps, code, _) = q.flat();
                code.write(&mut writer, gaps);
            } else {
                for &i in &q.flat_of {
                    writer.write_bits(i % q.cols, w.col_idx);
                }
            }
            for &width in &q.widths_of {
                writer.write_bits(tag_of(table, width), w.tag);
            }
            for (&width, &raw) in q.widths_of.iter().zip(&q.raw_of) {
                writer.write_bits(raw, u32::from(width));
            }
        }
        Layout::Block => unreachable!("layout 3 holds scaled tensors only"),
        Layout::Dense => {
            let tag_bits = dense_tag_bits(table.len());
            let zero_tag = tag_of(table, 0);
            let mut k = 0usize;
            for i in 0..q.rows * q.cols {
                if q.flat_of.get(k) == Some(&i) {
                    let width = q.widths_of[k];
                    writer.write_bits(tag_of(table, width), tag_bits);
                    writer.write_bits(q.raw_of[k], u32::from(width));
                    k += 1;
                } else {
                    writer.write_bits(zero_tag, tag_bits);
                }
            }
        }
    }
    writer.finish()
}

/// Encodes fixed-point tensors into the bytes of a compressed model file
/// (FORMAT.md): [`encode_tensors`] with every tensor
/// [`TensorInput::Fixed`].
pub fn encode(tensors: &[TensorData], options: &EncodeOptions) -> Result<Vec<u8>> {
    let inputs: Vec<TensorInput> = tensors.iter().map(|&t| TensorInput::Fixed(t)).collect();
    encode_tensors(&inputs, options)
}

/// Encodes tensors of both kinds into the bytes of a compressed model file
/// (FORMAT.md, version [`FORMAT_VERSION`]), in the given order. Every input
/// is validated first (names unique; a scaled tensor's codes within
/// `±max_code`, and 0 in a binary tensor only where layout 3 can hold it
/// as pruned blocks; groups dividing the element count,
/// `groups · (1 or 2)` finite scales `>= 0`): a bad one is an error naming
/// the tensor, never a panic.
pub fn encode_tensors(tensors: &[TensorInput], options: &EncodeOptions) -> Result<Vec<u8>> {
    let max_version = options.max_version.unwrap_or(FORMAT_VERSION);
    if !(1..=FORMAT_VERSION).contains(&max_version) {
        return Err(CsrError::InvalidOption(format!(
            "format version {max_version} does not exist: this writer writes versions 1 to {FORMAT_VERSION}"
        )));
    }
    let needed = options.layout.min_version();
    if needed > max_version {
        return Err(CsrError::VersionTooLow {
            max_version,
            what: format!("the layout choice {:?}", options.layout),
            needed,
        });
    }
    // Split weights: older readers must refuse the file (FORMAT.md §3).
    if crate::model::has_split_weights(&options.metadata) && max_version < SPLIT_WEIGHTS_VERSION {
        return Err(CsrError::VersionTooLow {
            max_version,
            what: format!("split weights (metadata `{}`)", crate::model::HIGH_WEIGHTS),
            needed: SPLIT_WEIGHTS_VERSION,
        });
    }
    if let (true, Some(t)) = (
        max_version < 2,
        tensors.iter().find(|t| matches!(t, TensorInput::Scaled(_))),
    ) {
        return Err(CsrError::VersionTooLow {
            max_version,
            what: format!("the scaled tensor `{}`", t.name()),
            needed: 2,
        });
    }
    let newest = encode_all(tensors, options, Allowed::up_to(max_version, true))?;
    let all_fixed = tensors.iter().all(|t| matches!(t, TensorInput::Fixed(_)));
    if options.layout == LayoutChoice::Auto && all_fixed && newest[8..12] != 1u32.to_le_bytes() {
        // Versions 3 and 5 spend a kind byte on every tensor entry that
        // version 1 does not: keep the older version when layouts 2 and 4
        // save less than that (the smaller file wins, the older on a tie).
        // With a scaled tensor the alternative is version 2, whose header is
        // the same size, so there is nothing to compare.
        let without = encode_all(tensors, options, Allowed::up_to(max_version, false))?;
        if without.len() <= newest.len() {
            return Ok(without);
        }
    }
    Ok(newest)
}

/// [`encode_tensors`], with `Auto` choosing among the `allowed` layouts.
fn encode_all(
    tensors: &[TensorInput],
    options: &EncodeOptions,
    allowed: Allowed,
) -> Result<Vec<u8>> {
    let mut names = std::collections::HashSet::new();
    let mut headers = Vec::with_capacity(tensors.len());
    let mut payloads = Vec::with_capacity(tensors.len());
    for input in tensors {
        if !names.insert(input.name()) {
            return Err(CsrError::invalid(input.name(), "the name appears twice"));
        }
        let t = match input {
            TensorInput::Fixed(t) => t,
            TensorInput::Scaled(t) => {
                let (header, payload) = encode_scaled(t, options.layout, allowed)?;
                headers.push(header);
                payloads.push(payload);
                continue;
            }
        };
        let q = quantize_tensor(t)?;
        let nnz = q.widths_of.len() as u64;
        let candidate = |layout: Layout| -> Result<(TensorHeader, usize)> {
            let table = sorted_table(&q, layout == Layout::Dense && q.has_zero);
            let payload_bytes = payload_bits(&q, &table, layout).div_ceil(8) as u64;
            let header = TensorHeader {
                name: t.name.to_owned(),
                shape: t.shape.iter().map(|&d| d as u64).collect(),
                exponent: q.exponent,
                layout,
                width_table: table,
                nnz,
                payload_bytes,
            };
            let header_len = postcard::to_allocvec(&TensorEntry::Fixed(header.clone()))
                .map_err(|e| CsrError::Serialize(e.to_string()))?
                .len();
            Ok((header, header_len + payload_bytes as usize))
        };
        // A dense tensor must spend at least one bit per element (FORMAT.md),
        // so a tensor without non-zeros is always CSR.
        let dense_ok = nnz > 0;
        let flat_bits = payload_bits(&q, &sorted_table(&q, false), Layout::FlatGaps);
        let admissible = Admissible {
            csr: true,
            dense: dense_ok,
            rice: allowed.rice,
            // Layout 3 holds scaled tensors only (FORMAT.md §7.7).
            block: false,
            flat: allowed.flat && flat_rows_fit(q.rows, flat_bits),
        };
        let (header, _) = choose_layout(options.layout, admissible, candidate)?;
        let payload = write_payload(&q, &header.width_table, header.layout);
        debug_assert_eq!(payload.len() as u64, header.payload_bytes);
        headers.push(TensorEntry::Fixed(header));
        payloads.push(payload);
    }
    // A file is written at the lowest version its tensors need, so that it
    // is byte for byte what earlier writers wrote and what older readers
    // read (FORMAT.md, "Versions"): version 1 for fixed-point tensors only,
    // 2 with scaled tensors, 3 with a tensor in layout 2, 4 with one in
    // layout 3, 5 with one in layout 4, 6 with split weights.
    let split = crate::model::has_split_weights(&options.metadata);
    let needed = headers
        .iter()
        .map(|h| h.layout().min_version())
        .max()
        .unwrap_or(1)
        .max(if split { SPLIT_WEIGHTS_VERSION } else { 1 });
    let fixed: Option<Vec<TensorHeader>> = headers
        .iter()
        .map(|h| match h {
            TensorEntry::Fixed(t) if needed == 1 => Some(t.clone()),
            _ => None,
        })
        .collect();
    let newest = needed.max(2);
    debug_assert!(newest <= FORMAT_VERSION);
    let (version, header_bytes) = match fixed {
        Some(tensors) => (
            1u32,
            postcard::to_allocvec(&FileHeaderV1 {
                metadata: options.metadata.clone(),
                tensors,
            }),
        ),
        None => (
            newest,
            postcard::to_allocvec(&FileHeader {
                metadata: options.metadata.clone(),
                tensors: headers,
            }),
        ),
    };
    let header_bytes = header_bytes.map_err(|e| CsrError::Serialize(e.to_string()))?;
    let header_len = u32::try_from(header_bytes.len())
        .map_err(|_| CsrError::Serialize("the header exceeds 4 GiB".into()))?;
    let payload_len: usize = payloads.iter().map(Vec::len).sum();
    let file_len = PREFIX_BYTES + header_bytes.len() + payload_len + CHECKSUM_BYTES;

    let mut out = Vec::with_capacity(file_len);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&header_len.to_le_bytes());
    out.extend_from_slice(&(file_len as u64).to_le_bytes());
    out.extend_from_slice(&header_bytes);
    for p in &payloads {
        out.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len(), file_len);
    Ok(out)
}

/// Encodes `model` again with the current writer and `layout`: the same
/// tensors (names, shapes, widths and exponents, or codes and scales) and
/// metadata, each tensor in the layout `layout` picks. A file from an older
/// writer gets the layouts this one has (layout 2, version 3); every decoded
/// value of the result equals the input's bit for bit, which is checked.
pub fn reencode(model: &CompressedModel, layout: LayoutChoice) -> Result<Vec<u8>> {
    reencode_up_to(model, layout, None)
}

/// [`reencode`] into a file of at most version `max_version` (see
/// [`EncodeOptions::max_version`]): how a file is rewritten for a reader
/// deployed before the newer layouts existed.
pub fn reencode_up_to(
    model: &CompressedModel,
    layout: LayoutChoice,
    max_version: Option<u32>,
) -> Result<Vec<u8>> {
    struct Owned {
        values: Vec<f32>,
        widths: Vec<u8>,
        codes: Vec<i8>,
    }
    let owned: Vec<Owned> = model
        .tensors
        .iter()
        .map(|t| Owned {
            values: t.dequantize(),
            widths: if t.scaled_info().is_some() {
                Vec::new()
            } else {
                t.widths()
            },
            codes: t.codes().unwrap_or_default(),
        })
        .collect();
    let inputs: Vec<TensorInput> = model
        .tensors
        .iter()
        .zip(&owned)
        .map(|(t, o)| match t.scaled_info() {
            Some(info) => TensorInput::Scaled(ScaledTensorData {
                name: &t.name,
                shape: &t.shape,
                codes: &o.codes,
                levels: info.levels,
                max_code: info.max_code,
                groups: info.groups,
                two_sided: info.two_sided,
                scales: t.scales(),
            }),
            None => TensorInput::Fixed(TensorData {
                name: &t.name,
                shape: &t.shape,
                values: &o.values,
                widths: &o.widths,
                exponent: Some(t.exponent),
            }),
        })
        .collect();
    let options = EncodeOptions {
        layout,
        metadata: model.metadata.clone(),
        max_version,
    };
    let bytes = encode_tensors(&inputs, &options)?;
    let again = CompressedModel::from_bytes(&bytes)?;
    for (a, (b, o)) in again.tensors.iter().zip(model.tensors.iter().zip(&owned)) {
        let same = a.name == b.name
            && a.shape == b.shape
            && a.scales() == b.scales()
            && a.dequantize()
                .iter()
                .zip(&o.values)
                .all(|(x, y)| x.to_bits() == y.to_bits());
        if !same {
            return Err(CsrError::invalid(
                &b.name,
                "re-encoding changed the tensor (a writer bug: please report it)",
            ));
        }
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, synced, then renamed over `path`. On failure the previous file
/// at `path`, if any, is untouched and no temporary file remains.
pub fn write_bytes_atomically(path: impl AsRef<Path>, bytes: &[u8]) -> Result<()> {
    let path = path.as_ref();
    let io_err = |source: std::io::Error| CsrError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = output_temp_file(dir).map_err(io_err)?;
    tmp.write_all(bytes).map_err(io_err)?;
    tmp.as_file().sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(|e| io_err(e.error))?;
    Ok(())
}

/// A temporary file in `dir` that becomes an output by a rename, created
/// with the permissions `File::create` gives (`0o666` less the umask), not
/// the `0o600` of a private temporary file: the result is the user's file,
/// readable as any other they write.
pub fn output_temp_file(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    output_temp_builder().tempfile_in(dir)
}

/// The `tempfile::Builder` behind [`output_temp_file`], for a caller that
/// also sets a prefix or suffix (a plot whose backend picks the format by
/// extension).
pub fn output_temp_builder<'a, 'b>() -> tempfile::Builder<'a, 'b> {
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder
}

/// Encodes fixed-point tensors and writes the file atomically: see
/// [`write_file_tensors`].
pub fn write_file(
    path: impl AsRef<Path>,
    tensors: &[TensorData],
    options: &EncodeOptions,
) -> Result<SizeReport> {
    let inputs: Vec<TensorInput> = tensors.iter().map(|&t| TensorInput::Fixed(t)).collect();
    write_file_tensors(path, &inputs, options)
}

/// Encodes tensors of both kinds ([`encode_tensors`]) and writes the file
/// atomically (a temporary file in the same directory, synced, then renamed
/// over `path`), and returns the size report of the file as it lies on disk.
/// On any failure the previous file at `path`, if any, is left untouched and
/// no temporary file remains.
pub fn write_file_tensors(
    path: impl AsRef<Path>,
    tensors: &[TensorInput],
    options: &EncodeOptions,
) -> Result<SizeReport> {
    let path = path.as_ref();
    let bytes = encode_tensors(tensors, options)?;
    let io_err = |source: std::io::Error| CsrError::Io {
        path: path.to_owned(),
        source,
    };
    write_bytes_atomically(path, &bytes)?;
    let on_disk = std::fs::metadata(path).map_err(io_err)?.len();
    let mut report = CompressedModel::from_bytes(&bytes)?.size_report();
    if on_disk != report.file_bytes {
        return Err(CsrError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(format!(
                "wrote {} bytes but the file has {on_disk}",
                report.file_bytes
            )),
        });
    }
    report.file_bytes = on_disk;
    Ok(report)
}
