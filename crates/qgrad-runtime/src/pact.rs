//! PACT activations (METHOD §9): after a ReLU, clip to `[0, β]` and round to
//! one of `L = 2^k_a − 1` uniform steps, `β` learned per layer. In the file a
//! layer whose input is quantized this way carries its clip as a one-element
//! f32 tensor `<layer>.act_clip`, and the metadata key `pact_bits` gives
//! `k_a`; layers without a clip (the first: its input is the image) keep the
//! fixed-point rule of `act_bits`.
//!
//! The integer kernels take the codes `q ∈ 0..=L` as they are (fixed point
//! with no fractional bits: `k_a`-bit unsigned activations times `k_w`-bit
//! codes, small integers), and each output is multiplied by the step `β/L`
//! once, in f32, after the kernel's own rounding and before the bias.
//!
//! # Decisions
//!
//! * The code of `x` is `round(min(max(x, 0), β) · (L / β))` with `L / β`
//!   computed once in f32 and the product rounded half away from zero, all
//!   in f32 ([`pact_code`]); the candle twin of the training side calls the
//!   same function, so both see the same integers.
//! * The step is `β / L`, one f32 division ([`pact_step`]).
//! * `β` must be finite and positive (a file with another clip is refused).

use crate::error::{Result, RuntimeError};

/// The suffix of a layer's clip tensor: `<layer>.act_clip`.
pub const ACT_CLIP: &str = "act_clip";

/// The widths PACT activations may have.
pub const PACT_BITS_RANGE: std::ops::RangeInclusive<u8> = 2..=16;

/// `L = 2^bits − 1`, the largest code.
pub fn pact_levels(bits: u8) -> u32 {
    (1u32 << bits) - 1
}

/// Checks a clip and a width.
pub fn check_pact(beta: f32, bits: u8) -> Result<()> {
    if !PACT_BITS_RANGE.contains(&bits) {
        return Err(RuntimeError::Invalid(format!(
            "PACT activations take 2..=16 bits, not {bits}"
        )));
    }
    if !(beta.is_finite() && beta > 0.0) {
        return Err(RuntimeError::Invalid(format!(
            "a PACT clip must be finite and positive, not {beta}"
        )));
    }
    Ok(())
}

/// The code of one activation (module docs), given `inv = L / β`.
#[inline]
pub fn pact_code(x: f32, beta: f32, inv: f32) -> i32 {
    // NaN compares false: max(NaN, 0) is 0 in Rust's f32::max.
    (x.max(0.0).min(beta) * inv).round() as i32
}

/// `L / β` in f32.
pub fn pact_inverse_step(beta: f32, bits: u8) -> f32 {
    pact_levels(bits) as f32 / beta
}

/// `β / L` in f32.
pub fn pact_step(beta: f32, bits: u8) -> f32 {
    beta / pact_levels(bits) as f32
}

/// The codes of `x` (checked clip and width).
pub fn pact_codes(x: &[f32], beta: f32, bits: u8) -> Result<Vec<i32>> {
    check_pact(beta, bits)?;
    let inv = pact_inverse_step(beta, bits);
    Ok(x.iter().map(|&v| pact_code(v, beta, inv)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_clip_and_round_to_the_levels() {
        // β = 1.5, 2 bits: steps of 0.5.
        let codes = pact_codes(&[-1.0, 0.0, 0.24, 0.26, 0.75, 1.2, 1.5, 9.0], 1.5, 2).unwrap();
        assert_eq!(codes, vec![0, 0, 0, 1, 2, 2, 3, 3]);
        assert_eq!(pact_step(1.5, 2), 0.5);
        assert!(pact_codes(&[1.0], 0.0, 2).is_err());
        assert!(pact_codes(&[1.0], f32::NAN, 2).is_err());
        assert!(pact_codes(&[1.0], 1.0, 1).is_err());
        assert!(pact_codes(&[1.0], 1.0, 17).is_err());
        // Every code lies in 0..=L.
        for bits in 2..=8 {
            let x: Vec<f32> = (0..100).map(|i| i as f32 * 0.037 - 1.0).collect();
            let c = pact_codes(&x, 2.0, bits).unwrap();
            assert!(c
                .iter()
                .all(|&q| (0..=pact_levels(bits) as i32).contains(&q)));
        }
    }
}
