//! The two ops of quantization-aware training that run every step over
//! every quantized weight and activation: the straight-through weight
//! ([`crate::straight_through`]) and PACT's activation quantizer
//! ([`crate::pact`]).
//!
//! Composed from candle ops they were about a dozen full passes, each
//! allocating its result, over tensors as large as the layer's weights or
//! activations (`ŵ + (w − w̄)` for the weight; `relu`, `sub`, `relu`, `sub`,
//! `div`, `affine`, `round`, `affine`, `mul`, `add`, `sub` for PACT, and as
//! many again backward). Here each is one pass forward and one backward,
//! with **the same values as the composition** (not just within rounding):
//! the forward repeats its f32 operations in its order, and the backward
//! gives each element the composition's gradient, which is exact (a sum of
//! `±g` and zeros), and reduces the clip's gradient with candle's own sum
//! over the dimensions its broadcast summed (the one inexact step, so its
//! order is candle's). Zeros may differ in sign; no sum or product sees that.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::custom::f32_values;
use crate::OpsError;

/// `values` in the forward pass, the identity backward (to the weight).
pub(crate) struct StraightThroughOp {
    /// Taken by the (single) forward call.
    pub values: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for StraightThroughOp {
    fn name(&self) -> &'static str {
        "qgrad-straight-through"
    }

    fn cpu_fwd(&self, _: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = self
            .values
            .lock()
            .map_err(|_| OpsError::Internal("straight-through values lock poisoned".into()))?
            .take()
            .ok_or_else(|| OpsError::Internal("straight-through op applied twice".into()))?;
        if values.len() != l.shape().elem_count() {
            return Err(OpsError::Shape(format!(
                "{} straight-through values for a weight of shape {:?}",
                values.len(),
                l.dims()
            ))
            .into());
        }
        Ok((CpuStorage::F32(values), l.shape().clone()))
    }

    fn bwd(&self, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(w.track_op().then(|| grad.clone()))
    }
}

/// PACT's quantized activation; args `(x, clip)` with `clip: [1]` (> 0).
pub(crate) struct PactOp {
    pub bits: u8,
}

impl PactOp {
    fn levels(&self) -> f32 {
        ((1u32 << self.bits) - 1) as f32
    }
}

/// The clip's one value.
fn clip_value(s: &CpuStorage, l: &Layout) -> Result<f32> {
    match f32_values("PACT clip", s, l)? {
        [b] => Ok(*b),
        v => Err(OpsError::Shape(format!("the PACT clip has {} values, not 1", v.len())).into()),
    }
}

/// `v.round()` (half away from zero) for a PACT step index, which is ≥ 0
/// and at most 2^16 − 1: an exact truncation and the half test, where the
/// libm call (baseline x86-64 has no rounding instruction) cost more than
/// the rest of the pass. Other values (NaN) go to `round`.
#[inline(always)]
fn round_step(v: f32) -> f32 {
    if (0.0..8_388_608.0).contains(&v) {
        // Below 2^23 the truncation and `v − t` are exact.
        let t = (v as i32) as f32;
        if v - t >= 0.5 {
            t + 1.0
        } else {
            t
        }
    } else {
        v.round()
    }
}

/// The composition's `y = relu(x) − relu(x − β)`, value for value.
#[inline(always)]
fn clipped(x: f32, beta: f32) -> f32 {
    x.max(0.0) - (x - beta).max(0.0)
}

impl CustomOp2 for PactOp {
    fn name(&self) -> &'static str {
        "qgrad-pact"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_values("PACT input", xs, xl)?;
        let beta = clip_value(bs, bl)?;
        let levels = self.levels();
        // candle's affine multiplies by the f64 factor rounded to f32, then
        // adds its `+ 0.0`; the same here, in the same order.
        let inverse = (1.0 / f64::from(levels)) as f32;
        let q = x
            .iter()
            .map(|&v| {
                let y = clipped(v, beta);
                let r = round_step((y / beta) * levels + 0.0);
                // `q + (y − ȳ)` of the composition: `+ 0.0`.
                (r * inverse + 0.0) * beta + 0.0
            })
            .collect();
        Ok((CpuStorage::F32(q), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        beta: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() && !beta.track_op() {
            return Ok((None, None));
        }
        let n = x.elem_count();
        let both = grad.contiguous()?.apply_op3_no_bwd(
            &x.contiguous()?,
            &beta.contiguous()?,
            &PactGrad,
        )?;
        let dx = if x.track_op() {
            Some(both.narrow(0, 0, n)?.reshape(x.shape())?)
        } else {
            None
        };
        let dbeta = if beta.track_op() {
            // candle's broadcast backward sums over the dimensions where the
            // input is not 1, in one reduction: the same call, the same order.
            let contributions = both.narrow(0, n, n)?.reshape(x.shape())?;
            let dims: Vec<usize> = (0..x.rank()).filter(|&d| x.dims()[d] != 1).collect();
            let summed = if dims.is_empty() {
                contributions
            } else {
                contributions.sum_keepdim(dims.as_slice())?
            };
            Some(summed.reshape(beta.shape())?)
        } else {
            None
        };
        Ok((dx, dbeta))
    }
}

/// Args `(dy, x, clip)`: `[dx, c]` concatenated (`2·n` values), `c` the
/// clip's per-element gradient before its sum. The composition's gradients:
/// `dx = dy·[x ≥ 0] − dy·[x − β ≥ 0]` (candle's ReLU passes the gradient at
/// 0), which is `dy` where `0 ≤ x < β` and 0 elsewhere, and `c = dy·[x − β ≥
/// 0]`.
struct PactGrad;

impl CustomOp3 for PactGrad {
    fn name(&self) -> &'static str {
        "qgrad-pact-grad"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_values("PACT output gradient", gs, gl)?;
        let x = f32_values("PACT input", xs, xl)?;
        let beta = clip_value(bs, bl)?;
        if g.len() != x.len() {
            return Err(OpsError::Shape(format!(
                "PACT gradient of {} values for an input of {}",
                g.len(),
                x.len()
            ))
            .into());
        }
        let mut out = Vec::with_capacity(2 * x.len());
        out.extend(g.iter().zip(x).map(
            |(&g, &v)| {
                if v >= 0.0 && v - beta < 0.0 {
                    g
                } else {
                    0.0
                }
            },
        ));
        out.extend(
            g.iter()
                .zip(x)
                .map(|(&g, &v)| if v - beta >= 0.0 { g } else { 0.0 }),
        );
        Ok((CpuStorage::F32(out), Shape::from_dims(&[2 * x.len()])))
    }
}

#[cfg(test)]
mod tests {
    use super::round_step;

    #[test]
    fn round_step_is_round_for_step_indices() {
        let mut v = vec![
            0.0f32,
            0.5,
            1.5,
            2.5,
            0.49999997,
            1.4999999,
            65534.5,
            65535.0,
            8_388_607.5,
        ];
        v.extend((0..20_000).map(|i| i as f32 * 3.3));
        for x in v {
            for y in [
                x,
                f32::from_bits(x.to_bits() + 1),
                f32::from_bits(x.to_bits().max(1) - 1),
            ] {
                assert_eq!(round_step(y), y.round(), "{y}");
            }
        }
        assert!(round_step(f32::NAN).is_nan());
        assert_eq!(round_step(-2.5), -3.0);
    }
}
