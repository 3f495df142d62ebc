//! Fixed-point formats and (de)quantization (METHOD.md §2).

use rayon::prelude::*;

use crate::{FixedError, Result, FLOAT, MAX_EXPONENT, MAX_FIXED_BITS, MIN_EXPONENT, PRUNED};

/// Elements per parallel task of the slice functions (they run on every
/// parameter of a model, 15 M for VGG-16).
const CHUNK: usize = 1 << 16;

/// True for the widths qgrad stores: 0 (pruned), 2..=16 (fixed point), 32 (float).
pub fn is_valid_width(bits: u8) -> bool {
    bits == PRUNED || bits == FLOAT || (crate::MIN_FIXED_BITS..=MAX_FIXED_BITS).contains(&bits)
}

/// `2^k` as an `f64`, exact, built from its bit pattern (for `|k| <= 1022`).
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((1023 + k) as u64) << 52)
}

/// `ceil(log2(max |x|))` over `values`: the shared exponent of a tensor.
///
/// Returns 0 for an empty or all-zero tensor. A tensor whose largest magnitude
/// is below `2^MIN_EXPONENT` gets `MIN_EXPONENT` (see the crate docs). A NaN or
/// infinity is an error naming its index.
pub fn tensor_exponent(values: &[f32]) -> Result<i32> {
    // On the bits of |x|: for non-negative floats the integer order is the
    // numeric order, and every non-finite value is at or above the bits of
    // +inf, so one integer maximum (which vectorises, unlike an early-exit
    // loop or a float maximum) finds both the largest magnitude and whether
    // any value is NaN or infinite.
    // (In parallel chunks for large tensors: a maximum is the same in any
    // grouping.)
    let chunk_max = |c: &[f32]| {
        c.iter()
            .map(|v| v.to_bits() & 0x7fff_ffff)
            .fold(0u32, u32::max)
    };
    let max_abs_bits = if values.len() < 4 * CHUNK {
        chunk_max(values)
    } else {
        values
            .par_chunks(CHUNK)
            .map(chunk_max)
            .reduce(|| 0, u32::max)
    };
    if max_abs_bits >= f32::INFINITY.to_bits() {
        let index = values
            .iter()
            .position(|v| !v.is_finite())
            .expect("a non-finite value is there");
        return Err(FixedError::NonFinite {
            index,
            value: values[index],
        });
    }
    let max_abs = f32::from_bits(max_abs_bits);
    if max_abs == 0.0 {
        return Ok(0);
    }
    // Every f32 is a normal f64, so the f64 exponent field is floor(log2(x));
    // log2 is an integer exactly when the mantissa is zero.
    let bits = f64::from(max_abs).to_bits();
    let floor_log2 = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let is_power_of_two = bits & ((1u64 << 52) - 1) == 0;
    let exponent = floor_log2 + i32::from(!is_power_of_two);
    Ok(exponent.max(MIN_EXPONENT))
}

/// Fewest bits that hold every integer `0..=max_value`: `ceil(log2(max_value + 1))`,
/// 0 for `max_value == 0`.
pub fn bits_needed(max_value: u64) -> u32 {
    64 - max_value.leading_zeros()
}

/// One fixed-point format: `bits`-bit two's-complement integers `q` meaning
/// `q · 2^-(bits - 1 - exponent)`, covering `[-2^exponent, 2^exponent - step]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedFormat {
    /// Integer width, 2..=16.
    pub bits: u8,
    /// Shared range exponent `e`: values lie in `±2^e`.
    pub exponent: i32,
}

impl FixedFormat {
    /// A format of `bits` (2..=16) bits and range `±2^exponent`.
    pub fn new(bits: u8, exponent: i32) -> Result<Self> {
        if !(crate::MIN_FIXED_BITS..=MAX_FIXED_BITS).contains(&bits) {
            return Err(FixedError::InvalidWidth(bits));
        }
        if !(MIN_EXPONENT..=MAX_EXPONENT).contains(&exponent) {
            return Err(FixedError::ExponentOutOfRange { exponent });
        }
        Ok(Self { bits, exponent })
    }

    /// Number of fractional bits `f = bits - 1 - exponent` (negative when the
    /// step is larger than 1).
    pub fn frac_bits(self) -> i32 {
        i32::from(self.bits) - 1 - self.exponent
    }

    /// Quantization step `2^-f`.
    pub fn step(self) -> f64 {
        pow2(-self.frac_bits())
    }

    /// Smallest integer, `-2^(bits-1)`.
    pub fn min_int(self) -> i32 {
        -(1i32 << (self.bits - 1))
    }

    /// Largest integer, `2^(bits-1) - 1`.
    pub fn max_int(self) -> i32 {
        (1i32 << (self.bits - 1)) - 1
    }

    /// The integer nearest to `x / step`, ties away from zero, saturated to
    /// `min_int..=max_int`. Infinities saturate; NaN maps to 0 (the slice
    /// functions reject non-finite input instead).
    #[inline]
    pub fn quantize(self, x: f32) -> i32 {
        let scaled = f64::from(x) * pow2(self.frac_bits());
        round_half_away_saturating(scaled, self.min_int(), self.max_int())
    }

    /// [`quantize`](Self::quantize) of every element of `src` into `dst`
    /// (the shorter length), with the AVX2 units where the CPU has them: the
    /// per-activation path of integer inference, 100 k values per batch of
    /// 128 MNIST images.
    pub fn quantize_into(self, src: &[f32], dst: &mut [i32]) {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { quantize_into_avx2(self, src, dst) };
                return;
            }
        }
        quantize_into_body(self, src, dst);
    }

    /// Unbiased stochastic rounding: `floor(x/step) + 1` with probability equal
    /// to the fractional part of `x/step`, else `floor(x/step)`; saturated like
    /// [`quantize`](Self::quantize). Its expectation is `x / step` for in-range
    /// `x`. Draws exactly one `f64` from `rng` per call, so a seeded generator
    /// gives reproducible results.
    pub fn quantize_stochastic<R: rand::Rng + ?Sized>(self, x: f32, rng: &mut R) -> i32 {
        let scaled = f64::from(x) * pow2(self.frac_bits());
        let floor = scaled.floor();
        let up = rng.random::<f64>() < scaled - floor;
        let rounded = if up { floor + 1.0 } else { floor };
        rounded.clamp(f64::from(self.min_int()), f64::from(self.max_int())) as i32
    }

    /// The value `q · 2^-f`. Exact for every `q` in range (see the crate docs).
    #[inline]
    pub fn dequantize(self, q: i32) -> f32 {
        (f64::from(q) * pow2(-self.frac_bits())) as f32
    }
}

/// [`quantize_into_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn quantize_into_avx2(format: FixedFormat, src: &[f32], dst: &mut [i32]) {
    quantize_into_body(format, src, dst);
}

/// The element loop of [`FixedFormat::quantize_into`], with the scale and
/// the bounds hoisted out of it.
#[inline(always)]
fn quantize_into_body(format: FixedFormat, src: &[f32], dst: &mut [i32]) {
    let scale = pow2(format.frac_bits());
    let (lo, hi) = (format.min_int(), format.max_int());
    let (lo_f, hi_f) = (f64::from(lo) - 1.0, f64::from(hi) + 1.0);
    for (q, &x) in dst.iter_mut().zip(src) {
        // `round_half_away_saturating` in a form without the NaN and range
        // checks of `as`, so that it vectorises: NaN becomes 0 first, and
        // `max`/`min` of a non-NaN value bound it to one step outside
        // `lo..=hi`.
        let scaled = f64::from(x) * scale;
        let y = if scaled.is_nan() { 0.0 } else { scaled };
        let y = y.max(lo_f).min(hi_f);
        // SAFETY: `y` is finite and `|y| + 0.5 <= 2^15 + 1.5`, well inside
        // i32, so truncation toward zero is defined.
        let magnitude = unsafe { (y.abs() + 0.5).to_int_unchecked::<i32>() };
        let rounded = if y < 0.0 { -magnitude } else { magnitude };
        *q = rounded.clamp(lo, hi);
    }
}

/// `scaled` rounded to nearest, ties away from zero, clamped to `lo..=hi`;
/// NaN gives 0.
///
/// Why not `f64::round`: without SSE4.1 it is a libm call, several times
/// slower than this on the 15 M-value path. Truncating `|y| + 0.5` is exact
/// here because `scaled` is an `f32` times a power of two (24 significant
/// bits) clamped below `2^17`: the sum needs at most 53 bits unless
/// `|y| < 2^-29`, where no rounding of the sum can reach 1.
#[inline(always)]
fn round_half_away_saturating(scaled: f64, lo: i32, hi: i32) -> i32 {
    // One step of slack on each side keeps saturation exact; `as` maps NaN
    // to 0 and the clamp keeps infinities finite.
    let y = scaled.clamp(f64::from(lo) - 1.0, f64::from(hi) + 1.0);
    let magnitude = (y.abs() + 0.5) as i32;
    let rounded = if y < 0.0 { -magnitude } else { magnitude };
    rounded.clamp(lo, hi)
}

/// Checks lengths and widths shared by [`quantize_values`] and [`fake_quantize`].
fn check_inputs(values: &[f32], widths: &[u8], exponent: i32) -> Result<()> {
    if values.len() != widths.len() {
        return Err(FixedError::LengthMismatch {
            values: values.len(),
            widths: widths.len(),
        });
    }
    if !(MIN_EXPONENT..=MAX_EXPONENT).contains(&exponent) {
        return Err(FixedError::ExponentOutOfRange { exponent });
    }
    if let Some(index) = first_index_where(widths, |w| !is_valid_width(w)) {
        return Err(FixedError::InvalidWidth(widths[index]));
    }
    if let Some(index) = first_index_where(values, |v| !v.is_finite()) {
        return Err(FixedError::NonFinite {
            index,
            value: values[index],
        });
    }
    Ok(())
}

/// Index of the first element that is `bad`. Chunks that fold without an
/// early exit vectorise (a per-element `find_first` spent more in rayon's
/// bookkeeping than the quantization itself); the position is looked up
/// only when there is one.
fn first_index_where<T: Copy + Sync>(xs: &[T], bad: impl Fn(T) -> bool + Sync) -> Option<usize> {
    let any_bad = xs
        .par_chunks(CHUNK)
        .any(|c| c.iter().fold(false, |found, &x| found | bad(x)));
    if any_bad {
        xs.iter().position(|&x| bad(x))
    } else {
        None
    }
}

/// Per-width formats for one exponent, indexed by width (0..=16).
fn format_table(exponent: i32) -> [Option<FixedFormat>; 17] {
    let mut table = [None; 17];
    for bits in crate::MIN_FIXED_BITS..=MAX_FIXED_BITS {
        table[usize::from(bits)] = Some(FixedFormat { bits, exponent });
    }
    table
}

/// Integers for per-element widths sharing one exponent. Width 0 gives 0;
/// width 32 is an error (a float has no fixed-point integer); so are a length
/// mismatch, an invalid width, an exponent out of range and a NaN/infinity.
pub fn quantize_values(values: &[f32], widths: &[u8], exponent: i32) -> Result<Vec<i32>> {
    check_inputs(values, widths, exponent)?;
    if let Some(index) = widths.iter().position(|&w| w == FLOAT) {
        return Err(FixedError::FloatHasNoInteger { index });
    }
    // Per width: the scale and the integer range of `FixedFormat::quantize`,
    // hoisted out of the element loop (`pow2` per element cost more than the
    // rounding). Width 0 takes scale 0 and range 0..=0: the finite `x` (checked)
    // then rounds to 0, the pruned integer, without a branch.
    let table = format_table(exponent);
    let params: [(f64, i32, i32); 17] = std::array::from_fn(|w| match table[w] {
        Some(format) => (pow2(format.frac_bits()), format.min_int(), format.max_int()),
        None => (0.0, 0, 0),
    });
    let mut out = vec![0i32; values.len()];
    out.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK).zip(widths.par_chunks(CHUNK)))
        .for_each(|(out, (values, widths))| {
            for ((o, &x), &w) in out.iter_mut().zip(values).zip(widths) {
                let (scale, lo, hi) = params[usize::from(w)];
                *o = round_half_away_saturating(f64::from(x) * scale, lo, hi);
            }
        });
    Ok(out)
}

/// Quantize, then dequantize: what the model computes with after
/// quantization. Width 0 gives 0.0; width 32 keeps the value unchanged.
/// Errors on a length mismatch, an invalid width, an exponent out of range and
/// a NaN/infinity.
pub fn fake_quantize(values: &[f32], widths: &[u8], exponent: i32) -> Result<Vec<f32>> {
    check_inputs(values, widths, exponent)?;
    let table = format_table(exponent);
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(CHUNK)
        .zip(values.par_chunks(CHUNK).zip(widths.par_chunks(CHUNK)))
        .for_each(|(out, (values, widths))| {
            for ((o, &x), &w) in out.iter_mut().zip(values).zip(widths) {
                *o = match w {
                    FLOAT => x,
                    _ => match table[usize::from(w)] {
                        Some(format) => format.dequantize(format.quantize(x)),
                        None => 0.0,
                    },
                };
            }
        });
    Ok(out)
}
