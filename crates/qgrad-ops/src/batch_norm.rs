//! Batch normalisation over the channel axis of `[n, c]` or `[n, c, h, w]`,
//! as per-channel kernels on slices.
//!
//! candle has no batch-norm op, so a training step built from its generic
//! ops (mean, subtract, square, mean, sqrt, reciprocal, two multiplies, add,
//! each broadcast) makes about ten full passes over the activation, keeps an
//! intermediate of its size alive for every one of them until the backward
//! pass, and differentiates each separately. Here the forward pass is three
//! passes (mean, variance, output) and keeps nothing but the batch
//! statistics; the backward pass is two (the channel sums `Σ dy` and
//! `Σ dy·(x - mean)`, then `dx`), with the textbook formula
//!
//! ```text
//! xhat = (x - mean) · inv_std,   inv_std = 1 / sqrt(var + eps)
//! dβ = Σ dy,   dγ = Σ dy·xhat,
//! dx = γ·inv_std / N · (N·dy - Σ dy - xhat · Σ dy·xhat)
//! ```
//!
//! where `N = n·h·w` and `var` is the biased batch variance.
//!
//! Accuracy and determinism: every sum over a channel is accumulated in f64
//! (eight lanes per plane, planes added in sample order), and the variance is
//! the two-pass `Σ (x - mean)² / N`, so a channel with a large mean and a
//! small spread loses nothing to cancellation. The statistics are computed one
//! channel per task in a fixed order, and element-wise passes read only
//! per-channel constants, so the results do not depend on the thread count.

use rayon::prelude::*;

use crate::OpsError;

/// Values one parallel task should cover: enough to amortise rayon's
/// scheduling on tiny planes (late VGG layers are 2×2).
const TASK_VALUES: usize = 16 * 1024;
/// Independent f64 accumulators per sum, so the adds pipeline and vectorise.
const LANES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BnGeometry {
    pub batch: usize,
    pub channels: usize,
    /// `h·w` for a rank-4 input, 1 for a rank-2 one.
    pub plane: usize,
}

impl BnGeometry {
    /// `x_dims` must be `[n, c]` or `[n, c, h, w]` with at least one value per
    /// channel; `params` are the dims of each per-channel parameter, all `[c]`.
    pub fn new(x_dims: &[usize], params: &[(&str, &[usize])]) -> Result<Self, OpsError> {
        let (batch, channels, plane) = match *x_dims {
            [n, c] => (n, c, 1),
            [n, c, h, w] => (n, c, h * w),
            _ => {
                return Err(OpsError::Shape(format!(
                    "batch norm input must be [n, c] or [n, c, h, w], got {x_dims:?}"
                )))
            }
        };
        if batch * plane == 0 {
            return Err(OpsError::Shape(format!(
                "batch norm needs at least one value per channel, got an input {x_dims:?}"
            )));
        }
        for (what, dims) in params {
            if *dims != [channels] {
                return Err(OpsError::Shape(format!(
                    "batch norm {what} must be [{channels}], got {dims:?}"
                )));
            }
        }
        Ok(Self {
            batch,
            channels,
            plane,
        })
    }

    /// Values per channel, `N` in the formulas.
    pub fn count(&self) -> usize {
        self.batch * self.plane
    }

    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Offsets of channel `c`'s planes, one per sample.
    fn planes_of(&self, c: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.batch).map(move |s| (s * self.channels + c) * self.plane)
    }
}

fn check_len(what: &str, data: &[f32], expected: usize) -> Result<(), OpsError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(OpsError::Internal(format!(
            "batch norm {what} holds {} values, its shape needs {expected}",
            data.len()
        )))
    }
}

/// `f(c)` for every channel, in parallel, collected in channel order.
fn per_channel<T: Send>(g: &BnGeometry, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    let per_task = (TASK_VALUES / g.count()).max(1);
    (0..g.channels)
        .into_par_iter()
        .with_min_len(per_task)
        .map(f)
        .collect()
}

/// A new `[n, c, plane]` buffer whose every plane is `f(channel, offset, out)`,
/// `offset` being the plane's start in the inputs, in parallel.
fn map_planes(g: &BnGeometry, f: impl Fn(usize, usize, &mut [f32]) + Sync + Send) -> Vec<f32> {
    let mut out = vec![0.0f32; g.len()];
    let per_task = (TASK_VALUES / g.plane).max(1);
    out.par_chunks_mut(g.plane)
        .enumerate()
        .with_min_len(per_task)
        .for_each(|(i, plane)| f(i % g.channels, i * g.plane, plane));
    out
}

/// `Σ f(x)` over a slice in f64, `LANES` accumulators.
#[inline(always)]
fn sum1(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// `Σ f(x, y)` over two slices of one length in f64, `LANES` accumulators.
#[inline(always)]
fn sum2(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    let tail: f64 = (xc.remainder().iter().zip(yc.remainder()))
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (xk, yk) in xc.zip(yc) {
        for ((a, &x), &y) in acc.iter_mut().zip(xk).zip(yk) {
            *a += f(x, y);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// Per-channel batch statistics: the mean and the biased variance, in f64.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

/// Mean and biased variance of every channel (two passes over each).
pub(crate) fn batch_stats(g: &BnGeometry, x: &[f32]) -> Result<BatchStats, OpsError> {
    check_len("input", x, g.len())?;
    let n = g.count() as f64;
    let p = g.plane;
    let stats = per_channel(g, |c| {
        let mean = g
            .planes_of(c)
            .map(|o| sum1(&x[o..o + p], f64::from))
            .sum::<f64>()
            / n;
        let var = g
            .planes_of(c)
            .map(|o| {
                sum1(&x[o..o + p], |v| {
                    let d = f64::from(v) - mean;
                    d * d
                })
            })
            .sum::<f64>()
            / n;
        (mean, var)
    });
    let (mean, var) = stats.into_iter().unzip();
    Ok(BatchStats { mean, var })
}

/// `y = (x - center[c]) · scale[c] + shift[c]`: the training forward pass
/// (center = batch mean, scale = γ·inv_std, shift = β) and the evaluation one
/// (running mean, γ / sqrt(running var + eps), β).
pub(crate) fn channel_affine(
    g: &BnGeometry,
    x: &[f32],
    center: &[f32],
    scale: &[f32],
    shift: &[f32],
) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.len())?;
    for (what, v) in [("center", center), ("scale", scale), ("shift", shift)] {
        check_len(what, v, g.channels)?;
    }
    Ok(map_planes(g, |c, o, out| {
        let (m, k, b) = (center[c], scale[c], shift[c]);
        for (y, &v) in out.iter_mut().zip(&x[o..o + g.plane]) {
            *y = (v - m) * k + b;
        }
    }))
}

/// Per-channel `(Σ dy, Σ dy·(x - center[c]))` in f64 (one pass over each).
pub(crate) fn channel_sums(
    g: &BnGeometry,
    x: &[f32],
    center: &[f64],
    dy: &[f32],
) -> Result<(Vec<f64>, Vec<f64>), OpsError> {
    check_len("input", x, g.len())?;
    check_len("output gradient", dy, g.len())?;
    if center.len() != g.channels {
        return Err(OpsError::Internal(format!(
            "batch norm centre has {} channels, the input {}",
            center.len(),
            g.channels
        )));
    }
    let p = g.plane;
    let sums = per_channel(g, |c| {
        let m = center[c];
        g.planes_of(c).fold((0.0, 0.0), |(s_dy, s_dyx), o| {
            let (xs, ds) = (&x[o..o + p], &dy[o..o + p]);
            (
                s_dy + sum1(ds, f64::from),
                s_dyx + sum2(xs, ds, |v, d| f64::from(d) * (f64::from(v) - m)),
            )
        })
    });
    Ok(sums.into_iter().unzip())
}

/// The training input gradient, `dx = k[c] · (dy - a[c] - (x - mean[c]) · b[c])`
/// with `k = γ·inv_std`, `a = Σ dy / N` and `b = inv_std² · Σ dy·(x - mean) / N`
/// (the formula in the module docs, multiplied out).
pub(crate) struct InputGradCoefficients {
    pub mean: Vec<f32>,
    pub k: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

pub(crate) fn train_input_grad(
    g: &BnGeometry,
    x: &[f32],
    dy: &[f32],
    co: &InputGradCoefficients,
) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.len())?;
    check_len("output gradient", dy, g.len())?;
    for (what, v) in [("mean", &co.mean), ("k", &co.k), ("a", &co.a), ("b", &co.b)] {
        check_len(what, v, g.channels)?;
    }
    Ok(map_planes(g, |c, o, out| {
        let (m, k, a, b) = (co.mean[c], co.k[c], co.a[c], co.b[c]);
        let planes = out
            .iter_mut()
            .zip(&x[o..o + g.plane])
            .zip(&dy[o..o + g.plane]);
        for ((dx, &v), &d) in planes {
            *dx = k * (d - a - (v - m) * b);
        }
    }))
}

/// The evaluation input gradient, `dx = dy · scale[c]`.
pub(crate) fn scaled_grad(g: &BnGeometry, dy: &[f32], scale: &[f32]) -> Result<Vec<f32>, OpsError> {
    check_len("output gradient", dy, g.len())?;
    check_len("scale", scale, g.channels)?;
    Ok(map_planes(g, |c, o, out| {
        let k = scale[c];
        for (dx, &d) in out.iter_mut().zip(&dy[o..o + g.plane]) {
            *dx = d * k;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_of_a_channel_with_a_large_mean() {
        // Two channels, the second offset by 1e4: the two-pass f64 variance
        // is exact where E[x²] - E[x]² in f32 would be noise.
        let g = BnGeometry::new(&[2, 2, 1, 2], &[]).unwrap();
        let x = [
            1.0,
            2.0,
            1e4 + 1.0,
            1e4 + 2.0,
            3.0,
            4.0,
            1e4 + 3.0,
            1e4 + 4.0,
        ];
        let s = batch_stats(&g, &x).unwrap();
        assert_eq!(s.mean, vec![2.5, 1e4 + 2.5]);
        assert_eq!(s.var, vec![1.25, 1.25]);
    }

    #[test]
    fn lane_sums_cover_the_tail() {
        for len in 0..20 {
            let xs: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let want: f64 = (0..len).map(|i| f64::from(i * i)).sum();
            assert_eq!(sum1(&xs, |v| f64::from(v * v)), want);
            assert_eq!(sum2(&xs, &xs, |a, b| f64::from(a * b)), want);
        }
    }

    #[test]
    fn geometry_rejects_bad_shapes() {
        assert!(BnGeometry::new(&[2, 3, 4], &[]).is_err());
        assert!(BnGeometry::new(&[0, 3], &[]).is_err());
        assert!(BnGeometry::new(&[2, 3, 0, 4], &[]).is_err());
        assert!(BnGeometry::new(&[2, 3], &[("weight", &[4])]).is_err());
        let g = BnGeometry::new(&[2, 3, 4, 5], &[("weight", &[3])]).unwrap();
        assert_eq!((g.count(), g.len()), (40, 120));
    }
}
