//! Unbiased stochastic m-bit gradient quantization per bucket (METHOD §12)
//! and its packed form, the bytes one rank contributes per tensor.
//!
//! A tensor's gradient `g` (`n` elements) is cut into buckets of `d`
//! consecutive elements (the last one shorter when `d` does not divide `n`).
//! Per bucket the scale is `s = max |g_i|`, or with clipping
//! `s = max |clip(g_i, ±c·σ)|`, `σ` the bucket's standard deviation. With
//! `L = 2^(m−1) − 1` each element becomes `ĝ_i = s · q_i / L`, where `q_i`
//! is `x_i = L · g_i / s` rounded down or up at random with
//! `P(up) = x_i − ⌊x_i⌋`, so `E[ĝ_i] = g_i` (the clipped `g_i` when
//! clipping) and `Var[ĝ_i] = (s/L)² p(1−p) ≤ s² / (4L²)`
//! ([`StochasticQuantizer::variance_bound`]).
//!
//! # Packed form (little-endian), for one tensor
//!
//! 1. `⌈n/d⌉` scales, f32 each, in bucket order;
//! 2. `n` codes `u_i = q_i + L ∈ [0, 2L]`, `m` bits each, in element order,
//!    least-significant bit first into the lowest free bit of the current
//!    byte (qgrad-fixed's bit order), the last byte zero-padded.
//!
//! That is `4⌈n/d⌉ + ⌈n·m/8⌉` bytes: `m + 32/d` bits per element plus at
//! most one byte of padding. A non-finite gradient in a bucket is sent as a
//! NaN scale (its codes all `L`, i.e. zero), so that every rank sees it
//! after the exchange and all of them stop with the same error.
//!
//! # Decisions
//!
//! * `m ∈ 2..=8`: the levels are symmetric, `2L + 1` of the `2^m` codes
//!   (at 2 bits: −1, 0, +1; the fourth code is never written).
//! * `σ` is the population standard deviation about the bucket's mean. A
//!   bucket whose `c·σ` is 0 (one element, or all elements equal) is not
//!   clipped: it is then exactly representable (`q = ±L`), and clipping it
//!   to 0 would drop it.
//! * The uniform draw of an element is the top 24 bits of one `u32` of the
//!   caller's generator, in element order: the same generator state gives
//!   the same codes on every machine.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::{CollectiveError, Result};

/// The m-bit stochastic gradient quantizer of METHOD §12.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StochasticQuantizer {
    /// Bits per element `m` (2..=8).
    pub bits: u8,
    /// Bucket length `d` (elements per scale, >= 1).
    pub bucket: usize,
    /// Clip each bucket at `±c·σ` first (`Some(c)`, `c > 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip: Option<f32>,
}

impl StochasticQuantizer {
    /// A checked quantizer.
    pub fn new(bits: u8, bucket: usize, clip: Option<f32>) -> Result<Self> {
        let q = Self { bits, bucket, clip };
        q.validate()?;
        Ok(q)
    }

    /// Rejects widths outside 2..=8, a zero bucket and a clip that is not a
    /// positive finite number.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CollectiveError::InvalidQuantizer(m));
        if !(2..=8).contains(&self.bits) {
            return bad(format!(
                "gradient width {} is not allowed (2..=8 bits)",
                self.bits
            ));
        }
        if self.bucket == 0 {
            return bad("the bucket length must be >= 1".into());
        }
        if let Some(c) = self.clip {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("the clip factor must be positive, got {c}"));
            }
        }
        Ok(())
    }

    /// `L = 2^(m−1) − 1`, the largest level.
    pub fn max_level(&self) -> u32 {
        (1u32 << (self.bits - 1)) - 1
    }

    /// Buckets of a tensor of `n` elements.
    pub fn buckets(&self, n: usize) -> usize {
        n.div_ceil(self.bucket)
    }

    /// Bytes of the packed form of `n` elements.
    pub fn encoded_len(&self, n: usize) -> usize {
        4 * self.buckets(n) + (n * self.bits as usize).div_ceil(8)
    }

    /// `s² / (4L²)`: the largest variance of one element of a bucket of
    /// scale `s` (reached when `x_i` lies half-way between two levels).
    pub fn variance_bound(&self, scale: f32) -> f64 {
        let l = f64::from(self.max_level());
        f64::from(scale).powi(2) / (4.0 * l * l)
    }

    /// The clip bound of a bucket (`None`: not clipped) and its scale `s`.
    /// A non-finite element gives a NaN scale.
    pub fn bucket_scale(&self, bucket: &[f32]) -> (Option<f32>, f32) {
        // (f32::max drops NaN, so non-finite elements are looked for apart.)
        if bucket.iter().any(|g| !g.is_finite()) {
            return (None, f32::NAN);
        }
        let max_abs = bucket.iter().fold(0.0f32, |m, &g| m.max(g.abs()));
        let Some(c) = self.clip else {
            return (None, max_abs);
        };
        let n = bucket.len() as f64;
        let mean = bucket.iter().map(|&g| f64::from(g)).sum::<f64>() / n;
        let var = bucket
            .iter()
            .map(|&g| (f64::from(g) - mean).powi(2))
            .sum::<f64>()
            / n;
        let bound = (f64::from(c) * var.sqrt()) as f32;
        if bound > 0.0 && bound < max_abs {
            (Some(bound), bound)
        } else {
            (None, max_abs)
        }
    }

    /// Appends the packed form of `g` (module docs) to `out`, drawing one
    /// `u32` of `rng` per element (4 little-endian bytes of `fill_bytes`,
    /// one call per bucket).
    pub fn encode(&self, g: &[f32], rng: &mut dyn RngCore, out: &mut Vec<u8>) {
        let l = self.max_level();
        let lf = l as f32;
        let scales: Vec<(Option<f32>, f32)> = g
            .chunks(self.bucket)
            .map(|c| self.bucket_scale(c))
            .collect();
        out.reserve(self.encoded_len(g.len()));
        for &(_, s) in &scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let codes_at = out.len();
        let code_len = (g.len() * self.bits as usize).div_ceil(8);
        // One spare byte lets every code write its two bytes unconditionally.
        out.resize(codes_at + code_len + 1, 0);
        let mut codes = CodeWriter::new(&mut out[codes_at..], self.bits);
        let mut uniforms = vec![0u8; 4 * self.bucket.min(g.len())];
        for (chunk, &(bound, s)) in g.chunks(self.bucket).zip(&scales) {
            let draws = &mut uniforms[..4 * chunk.len()];
            rng.fill_bytes(draws);
            if !(s.is_finite() && s > 0.0) {
                // All zero (or not finite: the NaN scale carries it).
                for _ in chunk {
                    codes.push(l);
                }
                continue;
            }
            let (lo_clip, hi_clip) = bound.map_or((f32::NEG_INFINITY, f32::INFINITY), |b| (-b, b));
            for (&gi, u) in chunk.iter().zip(draws.chunks_exact(4)) {
                // g/s is in [−1, 1] exactly (|g| <= s), so x is in [−L, L]
                // and t = x + L in [0, 2L]: truncation is the floor there
                // (without SSE4.1 `floor` is a library call), and the code
                // is ⌊t⌋ or ⌊t⌋ + 1, without a branch.
                let t = (gi.clamp(lo_clip, hi_clip) / s) * lf + lf;
                let lo = t as u32;
                let u = (u32::from_le_bytes([u[0], u[1], u[2], u[3]]) >> 8) as f32
                    * (1.0 / 16_777_216.0);
                let up = u32::from(u < t - lo as f32);
                codes.push((lo + up).min(2 * l));
            }
        }
        out.truncate(codes_at + code_len);
    }

    /// Adds `weight · ĝ` of the packed form `bytes` (of `out.len()`
    /// elements, sent by `rank`) to `out`. Errors on a buffer of the wrong
    /// length, a code above `2L` or a non-finite scale.
    pub fn decode_accumulate(
        &self,
        bytes: &[u8],
        weight: f32,
        rank: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let n = out.len();
        let expected = self.encoded_len(n);
        if bytes.len() != expected {
            return Err(CollectiveError::Truncated {
                what: "a packed gradient",
                expected,
                got: bytes.len(),
            });
        }
        let l = self.max_level();
        let lf = l as f32;
        let nb = self.buckets(n);
        let (scale_bytes, code_bytes) = bytes.split_at(4 * nb);
        let bits = usize::from(self.bits);
        let mask = (1u32 << bits) - 1;
        let mut bit = 0usize;
        for (b, chunk) in out.chunks_mut(self.bucket).enumerate() {
            let s = f32::from_le_bytes(scale_bytes[4 * b..4 * b + 4].try_into().unwrap());
            if !s.is_finite() {
                return Err(CollectiveError::NonFinite { rank });
            }
            let step = weight * s / lf;
            for o in chunk {
                // m <= 8: a code lies within two bytes; the length check
                // above guarantees the first, the second may be past the end.
                let at = bit >> 3;
                let window = u32::from(code_bytes[at])
                    | u32::from(code_bytes.get(at + 1).copied().unwrap_or(0)) << 8;
                let u = (window >> (bit & 7)) & mask;
                bit += bits;
                if u > 2 * l {
                    return Err(CollectiveError::BadCode {
                        rank,
                        code: u,
                        max: 2 * l,
                    });
                }
                *o += step * (u as f32 - lf);
            }
        }
        Ok(())
    }

    /// `ĝ` itself: encode then decode (for tests and analysis).
    pub fn quantize(&self, g: &[f32], rng: &mut dyn RngCore) -> Result<Vec<f32>> {
        let mut bytes = Vec::new();
        self.encode(g, rng, &mut bytes);
        let mut out = vec![0.0; g.len()];
        self.decode_accumulate(&bytes, 1.0, 0, &mut out)?;
        Ok(out)
    }
}

/// Writes `m`-bit codes (m <= 8) LSB-first into a zeroed buffer: the bit
/// order of qgrad-fixed's `BitWriter`, written directly because a code of at
/// most 8 bits always lies within two bytes, which makes packing a plain
/// shift and OR (the exchange packs every gradient element of every step).
struct CodeWriter<'a> {
    bytes: &'a mut [u8],
    bits: usize,
    at: usize,
}

impl<'a> CodeWriter<'a> {
    fn new(bytes: &'a mut [u8], bits: u8) -> Self {
        Self {
            bytes,
            bits: usize::from(bits),
            at: 0,
        }
    }

    /// The buffer holds one byte past the last code's.
    #[inline]
    fn push(&mut self, code: u32) {
        let byte = self.at >> 3;
        let shifted = code << (self.at & 7);
        self.bytes[byte] |= shifted as u8;
        self.bytes[byte + 1] |= (shifted >> 8) as u8;
        self.at += self.bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct packing is qgrad-fixed's bit order, bit for bit.
    #[test]
    fn codes_are_packed_as_qgrad_fixed_packs_them() {
        for bits in 2u8..=8 {
            let codes: Vec<u32> = (0..101u32).map(|i| (i * 37 + 11) % (1 << bits)).collect();
            let len = (codes.len() * bits as usize).div_ceil(8);
            let mut bytes = vec![0u8; len + 1];
            let mut w = CodeWriter::new(&mut bytes, bits);
            for &c in &codes {
                w.push(c);
            }
            assert_eq!(bytes[len], 0, "nothing past the last code");
            bytes.truncate(len);
            assert_eq!(
                bytes,
                qgrad_fixed::pack_unsigned(&codes, u32::from(bits)),
                "{bits} bits"
            );
        }
    }
}
