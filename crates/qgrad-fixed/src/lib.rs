//! `qgrad-fixed`: fixed-point number formats, quantize/dequantize, and
//! two's-complement bit packing (METHOD.md §2 and the bit layer of §6).
//!
//! # Numbers
//! A quantized value is a signed two's-complement integer `q` of `b` bits that
//! means `q · 2^-f`. Every element of one tensor shares one *exponent*
//! `e = ceil(log2(max |x|))` ([`tensor_exponent`]), whatever its own width, so
//! the representable range is `±2^e` for every width and the number of
//! fractional bits is `f = b - 1 - e` ([`FixedFormat::frac_bits`]).
//! Widths are `u8`: [`PRUNED`] (0, the value is exactly 0 and is not stored),
//! 2..=16, and [`FLOAT`] (32, kept as `f32`). One-bit signed fixed point is not
//! offered (METHOD §2).
//!
//! Rounding is to nearest, ties away from zero, saturating at the range ends;
//! it is computed in `f64`, where `x · 2^f` is exact for every `f32` `x`, so
//! the only rounding is the one we ask for. Stochastic (unbiased) rounding is
//! offered for in-training use ([`FixedFormat::quantize_stochastic`]).
//!
//! Design choice: the exponent is limited to
//! [`MIN_EXPONENT`]`..=`[`MAX_EXPONENT`]. Within those limits every grid point of
//! every width 2..=16 is an exactly representable finite `f32`, which is what
//! makes dequantization exact and quantization idempotent (quantizing twice
//! equals quantizing once). [`tensor_exponent`] raises the exponent of a
//! tensor whose largest magnitude is below `2^MIN_EXPONENT` to `MIN_EXPONENT`
//! (harmless: the range still covers every value); a tensor with a value above
//! `2^127` gets exponent 128, which [`FixedFormat::new`] rejects with an error.
//!
//! # Bit order
//! Packed data is a stream of bytes. Each value is written least-significant
//! bit first into the lowest free bit of the current byte, continuing into the
//! next byte (the bit order of DEFLATE, RFC 1951 §3.1.1). So the first value's
//! bit 0 is bit 0 of byte 0, and a 3-bit value followed by a 6-bit value
//! occupies bits 0..3 and 3..9 of the stream. Fields of zero bits take no
//! space. The final byte is padded with zero bits. Signed values are stored in
//! two's complement in their field width and sign-extended on reading.
//! Packing runs a 64-bit accumulator and emits whole words, because it sits
//! on the path that packs every parameter of a model.

mod bits;
mod format;

pub use bits::{pack_signed, pack_unsigned, unpack_signed, unpack_unsigned, BitReader, BitWriter};
pub use format::{
    bits_needed, fake_quantize, is_valid_width, quantize_values, tensor_exponent, FixedFormat,
};

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, FixedError>;

/// Width of a pruned element: its value is exactly 0 and it is not stored.
pub const PRUNED: u8 = 0;
/// Width of an element kept as an `f32` (not quantized).
pub const FLOAT: u8 = 32;
/// Smallest integer width 2..=16 of a fixed-point element.
pub const MIN_FIXED_BITS: u8 = 2;
/// Largest integer width of a fixed-point element.
pub const MAX_FIXED_BITS: u8 = 16;
/// Smallest exponent a [`FixedFormat`] accepts: with it a 16-bit step is
/// `2^-149`, the smallest positive `f32`, so every grid point is an `f32`.
pub const MIN_EXPONENT: i32 = -134;
/// Largest exponent a [`FixedFormat`] accepts: `±2^127` is the widest range
/// whose every grid point (including `-2^e`) is a finite `f32`.
pub const MAX_EXPONENT: i32 = 127;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FixedError {
    /// A bit width that is not 0, 2..=16 or 32 (or not 2..=16 where an
    /// integer format is required).
    #[error("invalid bit width {0}: expected 0 (pruned), 2..=16 (fixed point) or 32 (float)")]
    InvalidWidth(u8),
    /// A NaN or infinite value where a finite one is required.
    #[error("value at index {index} is not finite ({value})")]
    NonFinite { index: usize, value: f32 },
    /// Two slices that must have the same length do not.
    #[error("length mismatch: {values} values but {widths} widths")]
    LengthMismatch { values: usize, widths: usize },
    /// Reading needs more bits than the input holds.
    #[error("truncated bit stream: need {needed_bits} bits but only {available_bits} remain")]
    Truncated {
        needed_bits: u128,
        available_bits: usize,
    },
    /// A float-width (32) element was asked for as an integer.
    #[error(
        "element {index} has width 32 (kept as f32) and has no fixed-point integer; \
         store it as a float"
    )]
    FloatHasNoInteger { index: usize },
    /// An exponent outside [`MIN_EXPONENT`]..=[`MAX_EXPONENT`].
    #[error("exponent {exponent} out of the supported range {MIN_EXPONENT}..={MAX_EXPONENT}")]
    ExponentOutOfRange { exponent: i32 },
    /// A field width larger than the destination integer type.
    #[error("field width {bits} bits exceeds the maximum of {max} bits")]
    FieldTooWide { bits: u32, max: u32 },
}
