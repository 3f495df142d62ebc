//! One data-parallel gradient exchange (METHOD §12): every rank's gradient
//! (one buffer per parameter tensor, from its shard of the mini-batch) in,
//! the weighted average over the ranks out, the same on every rank.
//!
//! * [`GradientExchange::Float`]: one f32 all-reduce of
//!   `[w·loss, w, w·g…]` (`w` the rank's shard size), then a division by the
//!   summed `w`: the baseline.
//! * [`GradientExchange::Quantized`]: each rank sends
//!   `[loss: f32][w: f32]` and then every tensor's packed form
//!   ([`crate::quantize`]) through an all-gather (a sum over packed codes
//!   would be wrong: carries, and per-rank scales); every rank decodes the
//!   `N` messages in rank order, `Σ_r w_r·ĝ_r`, then divides by `Σ_r w_r`.
//!
//! Weighting by the shard size makes the average equal the gradient of the
//! whole mini-batch's mean loss when shards differ by one sample.

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::collective::Collective;
use crate::error::{CollectiveError, Result};
use crate::quantize::StochasticQuantizer;

/// How gradients cross between ranks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GradientExchange {
    /// Full precision: an f32 all-reduce.
    Float,
    /// Stochastic m-bit codes per bucket through an all-gather.
    Quantized(StochasticQuantizer),
}

impl GradientExchange {
    /// Rejects an invalid quantizer.
    pub fn validate(&self) -> Result<()> {
        match self {
            GradientExchange::Float => Ok(()),
            GradientExchange::Quantized(q) => q.validate(),
        }
    }

    /// Bytes one rank passes to the collective per step for tensors of
    /// these sizes (header included).
    pub fn message_len(&self, sizes: &[usize]) -> usize {
        match self {
            GradientExchange::Float => 4 * (2 + sizes.iter().sum::<usize>()),
            GradientExchange::Quantized(q) => {
                8 + sizes.iter().map(|&n| q.encoded_len(n)).sum::<usize>()
            }
        }
    }

    /// The formula of METHOD §12: `m + 32/d` bits per element (32 for f32).
    pub fn bits_per_element(&self) -> f64 {
        match self {
            GradientExchange::Float => 32.0,
            GradientExchange::Quantized(q) => f64::from(q.bits) + 32.0 / q.bucket as f64,
        }
    }

    /// In words, for logs and reports (`f32`, `3-bit d=512 clip 2.5σ`).
    pub fn describe(&self) -> String {
        match self {
            GradientExchange::Float => "f32".into(),
            GradientExchange::Quantized(q) => match q.clip {
                Some(c) => format!("{}-bit d={} clip {c}σ", q.bits, q.bucket),
                None => format!("{}-bit d={}", q.bits, q.bucket),
            },
        }
    }
}

/// Reusable buffers of [`exchange`] (a step allocates nothing new), and
/// the last call's timings.
#[derive(Debug, Default)]
pub struct ExchangeBuffers {
    send: Vec<u8>,
    recv: Vec<u8>,
    flat: Vec<f32>,
    /// Seconds the last call spent encoding this rank's gradient (packing
    /// the f32 buffer for the baseline).
    pub encode_seconds: f64,
    /// Seconds the last call spent decoding and averaging every rank's
    /// message (the division for the baseline).
    pub decode_seconds: f64,
}

/// Replaces `tensors` (this rank's gradients) by the average over the
/// group's ranks, weighted by each rank's `weight` (its shard size), and
/// returns the weighted mean of the ranks' `loss`. `rng` draws this rank's
/// stochastic rounding. Every rank must call it with tensors of the same
/// sizes.
pub fn exchange(
    group: &mut dyn Collective,
    how: &GradientExchange,
    tensors: &mut [Vec<f32>],
    loss: f32,
    weight: f32,
    rng: &mut dyn RngCore,
    buffers: &mut ExchangeBuffers,
) -> Result<f32> {
    match how {
        GradientExchange::Float => {
            let start = std::time::Instant::now();
            let flat = &mut buffers.flat;
            flat.clear();
            flat.push(weight * loss);
            flat.push(weight);
            for t in tensors.iter() {
                flat.extend(t.iter().map(|g| weight * g));
            }
            buffers.encode_seconds = start.elapsed().as_secs_f64();
            group.all_reduce_sum(flat)?;
            let start = std::time::Instant::now();
            let total = flat[1];
            if !flat.iter().all(|v| v.is_finite()) || total <= 0.0 {
                return Err(CollectiveError::NonFinite { rank: group.rank() });
            }
            let mut at = 2;
            for t in tensors.iter_mut() {
                for (g, s) in t.iter_mut().zip(&flat[at..]) {
                    *g = s / total;
                }
                at += t.len();
            }
            buffers.decode_seconds = start.elapsed().as_secs_f64();
            Ok(flat[0] / total)
        }
        GradientExchange::Quantized(q) => {
            let start = std::time::Instant::now();
            let send = &mut buffers.send;
            send.clear();
            // A non-finite loss goes out as it is; every rank then stops.
            send.extend_from_slice(&loss.to_le_bytes());
            send.extend_from_slice(&weight.to_le_bytes());
            for t in tensors.iter() {
                q.encode(t, rng, send);
            }
            let len = send.len();
            buffers.encode_seconds = start.elapsed().as_secs_f64();
            group.all_gather(send, &mut buffers.recv)?;
            let start = std::time::Instant::now();
            let size = group.size();
            if buffers.recv.len() != len * size {
                return Err(CollectiveError::Truncated {
                    what: "the gathered gradients",
                    expected: len * size,
                    got: buffers.recv.len(),
                });
            }
            for t in tensors.iter_mut() {
                t.fill(0.0);
            }
            let (mut loss_sum, mut total) = (0.0f32, 0.0f32);
            for (r, msg) in buffers.recv.chunks_exact(len).enumerate() {
                let loss_r = f32::from_le_bytes(msg[0..4].try_into().unwrap());
                let w_r = f32::from_le_bytes(msg[4..8].try_into().unwrap());
                if !(loss_r.is_finite() && w_r.is_finite() && w_r >= 0.0) {
                    return Err(CollectiveError::NonFinite { rank: r });
                }
                loss_sum += w_r * loss_r;
                total += w_r;
                let mut at = 8;
                for t in tensors.iter_mut() {
                    let n = q.encoded_len(t.len());
                    q.decode_accumulate(&msg[at..at + n], w_r, r, t)?;
                    at += n;
                }
            }
            if total <= 0.0 {
                return Err(CollectiveError::NonFinite { rank: group.rank() });
            }
            for t in tensors.iter_mut() {
                for g in t.iter_mut() {
                    *g /= total;
                }
            }
            buffers.decode_seconds = start.elapsed().as_secs_f64();
            Ok(loss_sum / total)
        }
    }
}
