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

use qgrad_fixed::{BitReader, BitWriter};
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
    /// `u32` of `rng` per element.
    pub fn encode(&self, g: &[f32], rng: &mut dyn RngCore, out: &mut Vec<u8>) {
        let l = self.max_level();
        let lf = l as f32;
        let mut scales = Vec::with_capacity(self.buckets(g.len()));
        for chunk in g.chunks(self.bucket) {
            scales.push(self.bucket_scale(chunk));
        }
        out.reserve(self.encoded_len(g.len()));
        for &(_, s) in &scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        let bits = u32::from(self.bits);
        let mut writer = BitWriter::with_capacity_bits(g.len() * self.bits as usize);
        for (chunk, &(bound, s)) in g.chunks(self.bucket).zip(&scales) {
            if !(s.is_finite() && s > 0.0) {
                // All zero (or not finite: the NaN scale carries it).
                for _ in chunk {
                    rng.next_u32();
                    writer.write_bits(u64::from(l), bits);
                }
                continue;
            }
            for &gi in chunk {
                let gi = match bound {
                    Some(b) => gi.clamp(-b, b),
                    None => gi,
                };
                // g/s is in [−1, 1] exactly (|g| <= s), so x is in [−L, L].
                let x = (gi / s) * lf;
                let lo = x.floor();
                let p = x - lo;
                let u = (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0);
                let q = if u < p { lo + 1.0 } else { lo };
                let q = (q as i64).clamp(-(l as i64), l as i64);
                writer.write_bits((q + l as i64) as u64, bits);
            }
        }
        out.extend_from_slice(&writer.finish());
    }

    /// Adds `weight · ĝ` of the packed form `bytes` (of `out.len()`
    /// elements, sent by `rank`) to `out`. Errors on a short buffer, a code
    /// above `2L` or a non-finite scale.
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
        let mut reader = BitReader::new(code_bytes);
        let bits = u32::from(self.bits);
        for (b, chunk) in out.chunks_mut(self.bucket).enumerate() {
            let s = f32::from_le_bytes(scale_bytes[4 * b..4 * b + 4].try_into().unwrap());
            if !s.is_finite() {
                return Err(CollectiveError::NonFinite { rank });
            }
            let step = weight * s / lf;
            for o in chunk {
                let u = reader
                    .read_bits(bits)
                    .map_err(|_| CollectiveError::Truncated {
                        what: "the codes of a packed gradient",
                        expected,
                        got: bytes.len(),
                    })? as u32;
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
