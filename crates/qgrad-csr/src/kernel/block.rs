//! The mat-vec of a tensor stored in layout 3 (block-sparse rows), block by
//! block: each kept block's integer levels `sign(k)·L(|k|)` are stored
//! densely, so its product is a contiguous integer dot product over a slice
//! of the activations (vectorised by the compiler) instead of one gather
//! per weight. Used for one sample (batch 1, where the element-CSR gather
//! is slowest) of one-sided scales with one group per tensor or per row,
//! when the `i32` accumulator is proven not to overflow; it computes the
//! module's "Scaled tensors" formula exactly (integer sums are order-free),
//! so its outputs equal the element-CSR kernel's bit for bit.

use rayon::prelude::*;

use super::{pow2, SERIAL_WORK};
use crate::block::side;
use crate::model::CompressedTensor;
use crate::scaled::ScaledInfo;

/// The block form of a one-sided scaled tensor.
#[derive(Clone, Debug)]
pub(super) struct BlockMatvec {
    cols: usize,
    block: (usize, usize),
    /// `grid rows + 1` offsets into `block_col`.
    block_ptr: Vec<u32>,
    block_col: Vec<u32>,
    /// The offset of each kept block's levels in `levels`.
    block_start: Vec<u32>,
    /// `sign(k) · L(|k|)` of every element of every kept block, block by
    /// block, column-major within a block (a block column's `h` levels
    /// are contiguous: one vector multiply-add per activation).
    levels: Vec<i32>,
    /// The scale of each row's group.
    row_scale: Vec<f64>,
    den: f64,
    /// `max_r Σ_row L(|k|)`: with `max |x|` it bounds every accumulator.
    pub(super) max_row_weight: u128,
}

impl BlockMatvec {
    /// `None` unless `t` is in layout 3 with one-sided scales, one group per
    /// tensor or per row, and integer levels that fit an `i32`.
    pub(super) fn from_tensor(t: &CompressedTensor, info: ScaledInfo) -> Option<Self> {
        let (br, bc) = t.block_shape()?;
        let (rows, cols) = (t.rows(), t.cols());
        if info.two_sided || !(info.groups == 1 || info.groups == rows) || rows == 0 {
            return None;
        }
        let level = |m: u8| i32::try_from(info.integer_level(m)).ok();
        level(info.max_code)?;
        let codes = t.codes()?;
        // The decoded tensor keeps only the element CSR; its blocks are the
        // stored block shape's blocks holding a non-zero (a stored all-zero
        // block adds nothing to the product).
        let plan = crate::block::plan(&codes, (rows, cols), (br, bc), false)?;
        let scales = t.scales();
        let row_scale = (0..rows)
            .map(|r| f64::from(scales[if info.groups == 1 { 0 } else { r }]))
            .collect();
        let mut levels = Vec::with_capacity(plan.kept_elements as usize);
        let mut block_start = Vec::with_capacity(plan.block_cols.len());
        let mut row_weight = vec![0u128; rows];
        for (i, pair) in plan.block_ptr.windows(2).enumerate() {
            let r0 = i * br;
            let h = side(rows as u64, br as u64, i as u64) as usize;
            for &j in &plan.block_cols[pair[0] as usize..pair[1] as usize] {
                block_start.push(levels.len() as u32);
                let c0 = j as usize * bc;
                let w = side(cols as u64, bc as u64, j) as usize;
                for c in c0..c0 + w {
                    for r in r0..r0 + h {
                        let k = codes[r * cols + c];
                        let l = if k == 0 { 0 } else { level(k.unsigned_abs())? };
                        row_weight[r] += l as u128;
                        levels.push(if k < 0 { -l } else { l });
                    }
                }
            }
        }
        Some(BlockMatvec {
            cols,
            block: (br, bc),
            block_ptr: plan.block_ptr.iter().map(|&p| p as u32).collect(),
            block_col: plan.block_cols.iter().map(|&j| j as u32).collect(),
            block_start,
            levels,
            row_scale,
            den: info.denominator(),
            max_row_weight: row_weight.into_iter().max().unwrap_or(0),
        })
    }

    /// `y[r] = Σ_c W[r, c] · x[c]` for one sample `x` with `frac` fractional
    /// bits; the caller checked `max_row_weight · max|x| < 2^31`.
    pub(super) fn matvec(&self, x: &[i32], frac: i32, y: &mut [f32]) {
        let (br, bc) = self.block;
        let x_scale = pow2(-i64::from(frac));
        let block_row = |i: usize, out: &mut [f32]| {
            let h = out.len();
            let mut acc = [0i32; 64];
            let mut acc_big;
            let acc: &mut [i32] = if h <= 64 {
                &mut acc[..h]
            } else {
                acc_big = vec![0i32; h];
                &mut acc_big
            };
            for b in self.block_ptr[i] as usize..self.block_ptr[i + 1] as usize {
                let c0 = self.block_col[b] as usize * bc;
                let w = bc.min(self.cols - c0);
                let xs = &x[c0..c0 + w];
                let start = self.block_start[b] as usize;
                let levels = &self.levels[start..start + h * w];
                if h == 8 {
                    // The common block height: the accumulators are one
                    // AVX2 register, updated once per activation.
                    let a8: &mut [i32; 8] = (&mut acc[..8]).try_into().expect("8 rows");
                    for (column, &v) in levels.chunks_exact(8).zip(xs) {
                        for (a, &l) in a8.iter_mut().zip(column) {
                            *a += l * v;
                        }
                    }
                } else {
                    for (column, &v) in levels.chunks_exact(h).zip(xs) {
                        for (a, &l) in acc.iter_mut().zip(column) {
                            *a += l * v;
                        }
                    }
                }
            }
            for (dr, (o, &a)) in out.iter_mut().zip(acc.iter()).enumerate() {
                let s = self.row_scale[i * br + dr];
                // t = +0.0 + s·A, then y = f32((t · 2^-f) / den), as the
                // module's formula.
                let t = 0.0 + s * f64::from(a);
                *o = ((t * x_scale) / self.den) as f32;
            }
        };
        if self.levels.len() < SERIAL_WORK {
            y.chunks_mut(br)
                .enumerate()
                .for_each(|(i, out)| block_row(i, out));
        } else {
            y.par_chunks_mut(br)
                .enumerate()
                .for_each(|(i, out)| block_row(i, out));
        }
    }
}
