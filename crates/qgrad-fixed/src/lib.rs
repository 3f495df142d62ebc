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
//!
//! # Example
//! Quantize a tensor to 5 bits, check every value comes back within half a
//! step, and pack the integers into `ceil(4 · 5 / 8) = 3` bytes:
//!
//! ```rust
//! use qgrad_fixed::{fake_quantize, pack_signed, tensor_exponent, unpack_signed, FixedFormat};
//!
//! let values = [0.3f32, -1.7, 0.05, 2.9];
//! let exponent = tensor_exponent(&values)?; // ceil(log2(2.9)) = 2
//! assert_eq!(exponent, 2);
//!
//! let format = FixedFormat::new(5, exponent)?; // 1 sign, 2 integer, 2 fractional bits
//! assert_eq!(format.step(), 0.25);
//! let q: Vec<i32> = values.iter().map(|&x| format.quantize(x)).collect();
//! for (&x, &qi) in values.iter().zip(&q) {
//!     let back = format.dequantize(qi);
//!     assert!(f64::from((back - x).abs()) <= format.step() / 2.0);
//! }
//!
//! let packed = pack_signed(&q, 5);
//! assert_eq!(packed.len(), 3);
//! assert_eq!(unpack_signed(&packed, 5, q.len())?, q);
//!
//! // Per-element widths: pruned (0), float (32) and 4-bit (step 0.5, max 3.5).
//! let widths = [5u8, 0, 32, 4];
//! let fq = fake_quantize(&values, &widths, exponent)?;
//! assert_eq!(fq, vec![0.25, 0.0, 0.05, 3.0]);
//! # Ok::<(), qgrad_fixed::FixedError>(())
//! ```

#![warn(missing_docs)]

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
    NonFinite {
        /// Position of the offending element in the input slice.
        index: usize,
        /// The offending value (NaN or ±infinity).
        value: f32,
    },
    /// Two slices that must have the same length do not.
    #[error("length mismatch: {values} values but {widths} widths")]
    LengthMismatch {
        /// Length of the value slice.
        values: usize,
        /// Length of the width slice.
        widths: usize,
    },
    /// Reading needs more bits than the input holds.
    #[error("truncated bit stream: need {needed_bits} bits but only {available_bits} remain")]
    Truncated {
        /// Bits the read (or unpack) requires.
        needed_bits: u128,
        /// Bits left in the input.
        available_bits: usize,
    },
    /// A float-width (32) element was asked for as an integer.
    #[error(
        "element {index} has width 32 (kept as f32) and has no fixed-point integer; \
         store it as a float"
    )]
    FloatHasNoInteger {
        /// Position of the width-32 element.
        index: usize,
    },
    /// An exponent outside [`MIN_EXPONENT`]..=[`MAX_EXPONENT`].
    #[error("exponent {exponent} out of the supported range {MIN_EXPONENT}..={MAX_EXPONENT}")]
    ExponentOutOfRange {
        /// The rejected exponent.
        exponent: i32,
    },
    /// A field width larger than the destination integer type.
    #[error("field width {bits} bits exceeds the maximum of {max} bits")]
    FieldTooWide {
        /// The requested field width in bits.
        bits: u32,
        /// The widest field the destination type allows, in bits.
        max: u32,
    },
}
