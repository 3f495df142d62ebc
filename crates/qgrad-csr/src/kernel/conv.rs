//! Convolution: im2col into rows of patches, one row per output position,
//! then the batch product of [`SparseKernel::matmul`] over those rows, for
//! both tensor kinds.
//!
//! Why rows and `matmul`: each output is then computed exactly as the
//! one-sample kernel computes a dense layer's output (its bits, whatever
//! the accumulator), and the batch product's slices keep sixteen patches
//! next to L1 while every weight row passes over them. The earlier layout,
//! one `[c·k·k][positions]` matrix streamed once per output channel with
//! generic integer accumulators, ran 16-bit activations through 64-bit
//! integer multiplies, which baseline x86-64 has no vector form of: most of
//! a VGG-16 file's evaluation was spent there.

use rayon::prelude::*;

use super::{FixedActivations, SparseKernel, IM2COL_CHUNK_ELEMENTS};
use crate::error::{CsrError, Result};

impl SparseKernel {
    /// 2-D convolution of `x` (rows = samples, cols = `c·h·w`) with this
    /// kernel read as `[o, c, kernel, kernel]`, zero padding, square stride.
    /// Returns `[samples, o, oh, ow]` row-major and `[o, oh, ow]`.
    pub fn conv2d(
        &self,
        x: &FixedActivations,
        input: [usize; 3],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<(Vec<f32>, [usize; 3])> {
        x.validate()?;
        let [c, h, w] = input;
        if stride == 0 || kernel == 0 {
            return Err(CsrError::InvalidOption(format!(
                "conv2d needs kernel >= 1 and stride >= 1, got kernel {kernel}, stride {stride}"
            )));
        }
        let patch = c
            .checked_mul(kernel)
            .and_then(|v| v.checked_mul(kernel))
            .ok_or_else(|| CsrError::ShapeMismatch("c·k·k overflows".into()))?;
        if patch != self.cols() {
            return Err(CsrError::ShapeMismatch(format!(
                "weight has {} columns but c·k·k = {c}·{kernel}·{kernel} = {patch}",
                self.cols()
            )));
        }
        let image = c
            .checked_mul(h)
            .and_then(|v| v.checked_mul(w))
            .ok_or_else(|| CsrError::ShapeMismatch("c·h·w overflows".into()))?;
        if image != x.cols {
            return Err(CsrError::ShapeMismatch(format!(
                "activations have {} columns but the input [{c}, {h}, {w}] has {image}",
                x.cols
            )));
        }
        let overflow = || CsrError::ShapeMismatch("conv2d output size overflows".into());
        let padded_h = padding
            .checked_mul(2)
            .and_then(|p| p.checked_add(h))
            .ok_or_else(overflow)?;
        let padded_w = padding
            .checked_mul(2)
            .and_then(|p| p.checked_add(w))
            .ok_or_else(overflow)?;
        if padded_h < kernel || padded_w < kernel {
            return Err(CsrError::ShapeMismatch(format!(
                "kernel {kernel} is larger than the padded input {padded_h}×{padded_w}"
            )));
        }
        let oh = (padded_h - kernel) / stride + 1;
        let ow = (padded_w - kernel) / stride + 1;
        oh.checked_mul(ow)
            .and_then(|p| p.checked_mul(self.rows().max(1)))
            .and_then(|p| p.checked_mul(x.rows.max(1)))
            .and_then(|p| p.checked_mul(patch.max(1)))
            .ok_or_else(overflow)?;
        let positions = oh * ow;
        let o = self.rows();
        let samples = x.rows;
        let mut y = vec![0f32; samples * o * positions];
        let per_sample = (patch * positions).max(1);
        let chunk = (IM2COL_CHUNK_ELEMENTS / per_sample).clamp(1, samples.max(1));
        for s0 in (0..samples).step_by(chunk) {
            let ns = chunk.min(samples - s0);
            let n = ns * positions;
            // im2col: row (sample, oy, ox), column (ci, ki, kj); outside the
            // image stays zero.
            let mut rows = vec![0i32; n * patch];
            rows.par_chunks_mut(patch.max(1))
                .with_min_len(64)
                .enumerate()
                .for_each(|(r, dst)| {
                    let (s, p) = (r / positions, r % positions);
                    let (oy, ox) = (p / ow, p % ow);
                    let img = &x.values[(s0 + s) * image..(s0 + s + 1) * image];
                    for ci in 0..c {
                        for ki in 0..kernel {
                            let iy = (oy * stride + ki) as isize - padding as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let src = ci * h * w + iy as usize * w;
                            let out = (ci * kernel + ki) * kernel;
                            for kj in 0..kernel {
                                let ix = (ox * stride + kj) as isize - padding as isize;
                                if ix >= 0 && ix < w as isize {
                                    dst[out + kj] = img[src + ix as usize];
                                }
                            }
                        }
                    }
                });
            let patches = FixedActivations {
                values: rows,
                rows: n,
                cols: patch,
                frac_bits: (0..n).map(|r| x.frac_bits[s0 + r / positions]).collect(),
            };
            // [sample, position][o] to y's [sample][o][position].
            let yc = self.matmul(&patches)?;
            y[s0 * o * positions..(s0 + ns) * o * positions]
                .par_chunks_mut(o * positions)
                .enumerate()
                .for_each(|(s, ys)| {
                    for (p, yp) in yc[s * positions * o..(s + 1) * positions * o]
                        .chunks_exact(o)
                        .enumerate()
                    {
                        for (oc, &v) in yp.iter().enumerate() {
                            ys[oc * positions + p] = v;
                        }
                    }
                });
        }
        Ok((y, [o, oh, ow]))
    }
}
