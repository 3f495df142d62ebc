//! Convolution: im2col straight into the transposed `[c·k·k][oh·ow]` layout,
//! then the same sparse product as a batch of matrix products, for both
//! tensor kinds.

use rayon::prelude::*;

use super::{max_abs, FixedActivations, SparseKernel, IM2COL_CHUNK_ELEMENTS};
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
        let max_abs_x = max_abs(&x.values);
        let mut y = vec![0f32; samples * o * positions];
        let per_sample = (patch * positions).max(1);
        let chunk = (IM2COL_CHUNK_ELEMENTS / per_sample).clamp(1, samples.max(1));
        for s0 in (0..samples).step_by(chunk) {
            let ns = chunk.min(samples - s0);
            let n = ns * positions;
            // im2col in the transposed layout: row (ci, ki, kj), column (sample, oy, ox).
            let mut xt = vec![0i32; patch * n];
            xt.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
                let ci = row / (kernel * kernel);
                let ki = (row / kernel) % kernel;
                let kj = row % kernel;
                for s in 0..ns {
                    let img = &x.values[(s0 + s) * image..(s0 + s + 1) * image];
                    for oy in 0..oh {
                        let iy = (oy * stride + ki) as isize - padding as isize;
                        let base = s * positions + oy * ow;
                        if iy < 0 || iy >= h as isize {
                            continue; // stays zero
                        }
                        for ox in 0..ow {
                            let ix = (ox * stride + kj) as isize - padding as isize;
                            if ix >= 0 && ix < w as isize {
                                dst[base + ox] = img[ci * h * w + iy as usize * w + ix as usize];
                            }
                        }
                    }
                }
            });
            let col_frac: Vec<i32> = (0..n).map(|j| x.frac_bits[s0 + j / positions]).collect();
            let mut yt = vec![0f32; o * n];
            self.spmm_t(&xt, n, &col_frac, max_abs_x, &mut yt);
            // yt is [o][sample][position]; y is [sample][o][position].
            for s in 0..ns {
                for oc in 0..o {
                    let src = &yt[oc * n + s * positions..oc * n + (s + 1) * positions];
                    let dst_start = ((s0 + s) * o + oc) * positions;
                    y[dst_start..dst_start + positions].copy_from_slice(src);
                }
            }
        }
        Ok((y, [o, oh, ow]))
    }
}
