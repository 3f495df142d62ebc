//! 2-D convolution through im2col / col2im and one GEMM per chunk of samples.
//!
//! Layout: `x [n, c, h, w]`, `weight [o, c, kh, kw]` seen as the matrix
//! `W [o, c·kh·kw]`. A chunk of `b` samples is unfolded into
//! `col [c·kh·kw, b·p]` (`p = oh·ow` output positions per sample), so that
//! - forward:      `Y [o, b·p]      = W · col`
//! - input grad:   `dcol [ckk, b·p] = Wᵀ · dY`, then col2im adds `dcol` into `dx`
//! - weight grad:  `dW [o, ckk]    += dY · colᵀ`
//!
//! Chunks are sized so that each GEMM has a few hundred columns even where a
//! sample has only 2×2 outputs (late VGG layers), yet there are at least as
//! many chunks as threads; the chunks then run in parallel with
//! single-threaded GEMMs, which on 2 cores beats splitting every small GEMM.
//!
//! Where the zero padding is a quarter or more of the windows (AlexNet's
//! late layers, VGG-16's 4×4 and 2×2 maps), [`tap_classes`] replaces this
//! path: classes of output positions that read the same kernel taps, each
//! unfolded with its own taps only.

mod tap_classes;

use rayon::prelude::*;

use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::scratch::with_scratch;
use crate::OpsError;
use gemm::Parallelism;

/// Output columns a chunk aims for (see the module docs).
const TARGET_CHUNK_COLUMNS: usize = 512;

/// Output rows narrower than this are unfolded (and folded back) through a
/// per-position gather table instead of row copies: for the 2×2 and 4×4
/// outputs of AlexNet's and VGG-16's late layers a row copy moves 2–4 floats
/// per `memcpy`/`memset` call, and the calls cost more than the copying
/// (im2col was 15 % of an AlexNet step).
const MIN_COPIED_ROW: usize = 8;

/// Gather-table entry of a position that reads the zero padding; any offset
/// past the input plane reads as 0 (see `im2col_gather`).
const PADDING: usize = usize::MAX;

/// Everything about one convolution's shapes, validated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl ConvGeometry {
    pub fn new(
        x_dims: &[usize],
        w_dims: &[usize],
        stride: usize,
        padding: usize,
    ) -> Result<Self, OpsError> {
        let &[batch, in_channels, height, width] = x_dims else {
            return Err(OpsError::Shape(format!(
                "conv2d input must be [n, c, h, w], got {x_dims:?}"
            )));
        };
        let &[out_channels, w_in, kernel_h, kernel_w] = w_dims else {
            return Err(OpsError::Shape(format!(
                "conv2d weight must be [o, c, kh, kw], got {w_dims:?}"
            )));
        };
        if w_in != in_channels {
            return Err(OpsError::Shape(format!(
                "conv2d weight {w_dims:?} expects {w_in} input channels, input {x_dims:?} has {in_channels}"
            )));
        }
        if stride == 0 {
            return Err(OpsError::Shape("conv2d stride must be at least 1".into()));
        }
        if kernel_h == 0 || kernel_w == 0 {
            return Err(OpsError::Shape(format!(
                "conv2d kernel must be at least 1x1, got {kernel_h}x{kernel_w}"
            )));
        }
        let padded_h = height + 2 * padding;
        let padded_w = width + 2 * padding;
        if kernel_h > padded_h || kernel_w > padded_w {
            return Err(OpsError::Shape(format!(
                "conv2d kernel {kernel_h}x{kernel_w} is larger than the padded input {padded_h}x{padded_w}"
            )));
        }
        Ok(Self {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel_h,
            kernel_w,
            stride,
            padding,
            out_h: (padded_h - kernel_h) / stride + 1,
            out_w: (padded_w - kernel_w) / stride + 1,
        })
    }

    /// Rows of the im2col matrix: `c · kh · kw`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }
    /// Output positions per sample: `oh · ow`.
    pub fn positions(&self) -> usize {
        self.out_h * self.out_w
    }
    pub fn input_sample_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    pub fn output_sample_len(&self) -> usize {
        self.out_channels * self.positions()
    }
    pub fn output_dims(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_h, self.out_w]
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.patch_len()
    }

    /// A 1×1, stride 1, unpadded convolution: a sample's input already is its
    /// im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }

    /// Samples per chunk.
    fn chunk_samples(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let wanted = TARGET_CHUNK_COLUMNS.div_ceil(self.positions().max(1));
        let fair_share = self.batch.div_ceil(threads);
        wanted.min(fair_share).max(1)
    }

    fn chunk_count(&self) -> usize {
        self.batch.div_ceil(self.chunk_samples())
    }

    /// GEMM parallelism inside a chunk: only when there are too few chunks to
    /// keep every thread busy.
    fn inner_parallelism(&self, m: usize, n: usize, k: usize) -> Parallelism {
        if self.chunk_count() >= rayon::current_num_threads() {
            Parallelism::None
        } else {
            parallelism_for(m, n, k)
        }
    }

    /// For kernel offset `k_off` along an axis of `size` inputs: the range of
    /// output indices whose input index `o·stride + k_off - padding` is inside
    /// the input.
    fn valid_outputs(&self, k_off: usize, size: usize, out: usize) -> (usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // o·s + k_off >= p  <=>  o >= ceil((p - k_off) / s)
        let lo = if k_off >= p {
            0
        } else {
            (p - k_off).div_ceil(s)
        };
        // o·s + k_off - p <= size - 1  <=>  o <= (size - 1 + p - k_off) / s
        let hi = if size > 0 && size + p > k_off {
            ((size - 1 + p - k_off) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Whether im2col and col2im go through [`Self::gather_table`]: for
    /// strided convolutions (element-wise anyway) and narrow outputs.
    fn uses_gather(&self) -> bool {
        self.stride != 1 || self.out_w < MIN_COPIED_ROW
    }

    /// For every kernel offset `(ki, kj)` (row `ki·kw + kj`, `p` entries per
    /// row), the offset in an input plane that each output position reads, or
    /// [`PADDING`].
    fn gather_table(&self) -> Vec<usize> {
        let (kh, kw, s, pad) = (self.kernel_h, self.kernel_w, self.stride, self.padding);
        let mut table = Vec::with_capacity(kh * kw * self.positions());
        for ki in 0..kh {
            for kj in 0..kw {
                for oh in 0..self.out_h {
                    for ow in 0..self.out_w {
                        let (ih, iw) = (
                            (oh * s + ki).wrapping_sub(pad),
                            (ow * s + kj).wrapping_sub(pad),
                        );
                        table.push(if ih < self.height && iw < self.width {
                            ih * self.width + iw
                        } else {
                            PADDING
                        });
                    }
                }
            }
        }
        table
    }

    /// Unfolds samples `first..first + count` of `x` into `col [ckk, count·p]`.
    fn im2col(&self, x: &[f32], first: usize, count: usize, col: &mut [f32]) {
        if self.uses_gather() {
            return self.im2col_gather(x, first, count, col);
        }
        let (p, cols) = (self.positions(), count * self.positions());
        let (kh, kw, s) = (self.kernel_h, self.kernel_w, self.stride);
        let (h, w, ow) = (self.height, self.width, self.out_w);
        let plane = h * w;
        for ci in 0..self.in_channels {
            for ki in 0..kh {
                let (oh_lo, oh_hi) = self.valid_outputs(ki, h, self.out_h);
                for kj in 0..kw {
                    let (ow_lo, ow_hi) = self.valid_outputs(kj, w, ow);
                    let r = (ci * kh + ki) * kw + kj;
                    let row = &mut col[r * cols..(r + 1) * cols];
                    for b in 0..count {
                        let src = &x[(first + b) * self.input_sample_len() + ci * plane..][..plane];
                        let dst = &mut row[b * p..(b + 1) * p];
                        dst[..oh_lo * ow].fill(0.0);
                        dst[oh_hi * ow..].fill(0.0);
                        for oh in oh_lo..oh_hi {
                            let ih = oh * s + ki - self.padding;
                            let out_row = &mut dst[oh * ow..(oh + 1) * ow];
                            out_row[..ow_lo].fill(0.0);
                            out_row[ow_hi..].fill(0.0);
                            if ow_lo >= ow_hi {
                                continue;
                            }
                            // Stride 1 here (strided convolutions gather).
                            let iw0 = ow_lo + kj - self.padding;
                            let src_row = &src[ih * w..(ih + 1) * w];
                            out_row[ow_lo..ow_hi]
                                .copy_from_slice(&src_row[iw0..iw0 + (ow_hi - ow_lo)]);
                        }
                    }
                }
            }
        }
    }

    /// Walks the gather table for a chunk of `count` samples: calls
    /// `f(block, plane, offsets)` for every `p`-long block of the column
    /// matrix (row `(ci, ki, kj)`, sample `b`; `block` is its start in the
    /// matrix), where `plane` is the start of sample `b`'s channel `ci`
    /// relative to the chunk's first sample, and `offsets` that row's table
    /// entries. im2col and col2im are this walk with a read or an add.
    fn for_each_gather_block(&self, count: usize, mut f: impl FnMut(usize, usize, &[usize])) {
        let (p, cols) = (self.positions(), count * self.positions());
        let (kk, plane) = (self.kernel_h * self.kernel_w, self.height * self.width);
        let table = self.gather_table();
        for ci in 0..self.in_channels {
            for (k, offsets) in table.chunks_exact(p).enumerate() {
                let row = (ci * kk + k) * cols;
                for b in 0..count {
                    f(
                        row + b * p,
                        b * self.input_sample_len() + ci * plane,
                        offsets,
                    );
                }
            }
        }
    }

    /// [`Self::im2col`] through the gather table.
    fn im2col_gather(&self, x: &[f32], first: usize, count: usize, col: &mut [f32]) {
        let (p, plane) = (self.positions(), self.height * self.width);
        let x = &x[first * self.input_sample_len()..];
        self.for_each_gather_block(count, |block, start, offsets| {
            let src = &x[start..start + plane];
            for (d, &offset) in col[block..block + p].iter_mut().zip(offsets) {
                *d = src.get(offset).copied().unwrap_or(0.0);
            }
        });
    }

    /// [`Self::col2im_add`] through the gather table.
    fn col2im_add_gather(&self, col: &[f32], count: usize, dx: &mut [f32]) {
        let (p, plane) = (self.positions(), self.height * self.width);
        self.for_each_gather_block(count, |block, start, offsets| {
            let dst = &mut dx[start..start + plane];
            for (v, &offset) in col[block..block + p].iter().zip(offsets) {
                if let Some(d) = dst.get_mut(offset) {
                    *d += v;
                }
            }
        });
    }

    /// Adds `col [ckk, count·p]` back onto `dx` (the samples of the chunk,
    /// `dx` starting at the chunk's first sample).
    fn col2im_add(&self, col: &[f32], count: usize, dx: &mut [f32]) {
        if self.uses_gather() {
            return self.col2im_add_gather(col, count, dx);
        }
        let (p, cols) = (self.positions(), count * self.positions());
        let (kh, kw, s) = (self.kernel_h, self.kernel_w, self.stride);
        let (h, w, ow) = (self.height, self.width, self.out_w);
        let plane = h * w;
        for ci in 0..self.in_channels {
            for ki in 0..kh {
                let (oh_lo, oh_hi) = self.valid_outputs(ki, h, self.out_h);
                for kj in 0..kw {
                    let (ow_lo, ow_hi) = self.valid_outputs(kj, w, ow);
                    if ow_lo >= ow_hi {
                        continue;
                    }
                    let r = (ci * kh + ki) * kw + kj;
                    let row = &col[r * cols..(r + 1) * cols];
                    for b in 0..count {
                        let dst = &mut dx[b * self.input_sample_len() + ci * plane..][..plane];
                        let src = &row[b * p..(b + 1) * p];
                        for oh in oh_lo..oh_hi {
                            let ih = oh * s + ki - self.padding;
                            // Stride 1 here (strided convolutions gather).
                            let iw0 = ow_lo + kj - self.padding;
                            let in_row = &src[oh * ow + ow_lo..oh * ow + ow_hi];
                            let dst_row = &mut dst[ih * w..(ih + 1) * w];
                            for (d, v) in dst_row[iw0..iw0 + in_row.len()].iter_mut().zip(in_row) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Copies `dy` of samples `first..first + count` into `[o, count·p]`.
    fn gather_output_grad(&self, dy: &[f32], first: usize, count: usize, dst: &mut [f32]) {
        let p = self.positions();
        let cols = count * p;
        for oc in 0..self.out_channels {
            for b in 0..count {
                let src = &dy[(first + b) * self.output_sample_len() + oc * p..][..p];
                dst[oc * cols + b * p..oc * cols + (b + 1) * p].copy_from_slice(src);
            }
        }
    }
}

fn check_len(what: &str, data: &[f32], expected: usize) -> Result<(), OpsError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(OpsError::Internal(format!(
            "conv2d {what} holds {} values, its shape needs {expected}",
            data.len()
        )))
    }
}

/// `y = conv(x, weight) + bias`, all contiguous row-major.
pub(crate) fn forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.batch * g.input_sample_len())?;
    check_len("weight", weight, g.weight_len())?;
    if let Some(bias) = bias {
        check_len("bias", bias, g.out_channels)?;
    }
    if let Some(classes) = g.tap_classes() {
        return tap_classes::forward(g, &classes, x, weight, bias);
    }
    let (o, ckk, p) = (g.out_channels, g.patch_len(), g.positions());
    let mut y = vec![0.0f32; g.batch * g.output_sample_len()];
    if y.is_empty() {
        return Ok(y);
    }
    let chunk = g.chunk_samples();
    let w_mat = MatRef::row_major(weight, o, ckk);
    y.par_chunks_mut(chunk * g.output_sample_len())
        .enumerate()
        .try_for_each(|(index, y_chunk)| {
            let first = index * chunk;
            let count = y_chunk.len() / g.output_sample_len();
            let cols = count * p;
            let par = g.inner_parallelism(o, cols, ckk);
            if count == 1 {
                // [o, p] is already the sample's output layout: write in place.
                if let Some(bias) = bias {
                    for (row, &b) in y_chunk.chunks_exact_mut(p).zip(bias) {
                        row.fill(b);
                    }
                }
                if g.is_pointwise() {
                    let xs = &x[first * g.input_sample_len()..][..g.input_sample_len()];
                    return matmul(
                        y_chunk,
                        w_mat,
                        MatRef::row_major(xs, ckk, cols),
                        bias.is_some(),
                        par,
                    );
                }
                return with_scratch(ckk * cols, |col| {
                    g.im2col(x, first, count, col);
                    matmul(
                        y_chunk,
                        w_mat,
                        MatRef::row_major(col, ckk, cols),
                        bias.is_some(),
                        par,
                    )
                });
            }
            with_scratch(ckk * cols + o * cols, |scratch| {
                let (col, product) = scratch.split_at_mut(ckk * cols);
                g.im2col(x, first, count, col);
                matmul(
                    product,
                    w_mat,
                    MatRef::row_major(col, ckk, cols),
                    false,
                    par,
                )?;
                for oc in 0..o {
                    let b = bias.map_or(0.0, |bias| bias[oc]);
                    for s in 0..count {
                        let src = &product[oc * cols + s * p..oc * cols + (s + 1) * p];
                        let dst = &mut y_chunk[s * g.output_sample_len() + oc * p..][..p];
                        for (d, v) in dst.iter_mut().zip(src) {
                            *d = v + b;
                        }
                    }
                }
                Ok(())
            })
        })?;
    Ok(y)
}

/// `dx` from `dy` and the weight.
pub(crate) fn input_grad(
    g: &ConvGeometry,
    dy: &[f32],
    weight: &[f32],
) -> Result<Vec<f32>, OpsError> {
    check_len("output gradient", dy, g.batch * g.output_sample_len())?;
    check_len("weight", weight, g.weight_len())?;
    if let Some(classes) = g.tap_classes() {
        return tap_classes::input_grad(g, &classes, dy, weight);
    }
    let (o, ckk, p) = (g.out_channels, g.patch_len(), g.positions());
    let mut dx = vec![0.0f32; g.batch * g.input_sample_len()];
    if dx.is_empty() {
        return Ok(dx);
    }
    let chunk = g.chunk_samples();
    let w_t = MatRef::row_major(weight, o, ckk).t();
    dx.par_chunks_mut(chunk * g.input_sample_len())
        .enumerate()
        .try_for_each(|(index, dx_chunk)| {
            let first = index * chunk;
            let count = dx_chunk.len() / g.input_sample_len();
            let cols = count * p;
            let par = g.inner_parallelism(ckk, cols, o);
            if count == 1 {
                let dys = &dy[first * g.output_sample_len()..][..g.output_sample_len()];
                let dy_mat = MatRef::row_major(dys, o, cols);
                if g.is_pointwise() {
                    return matmul(dx_chunk, w_t, dy_mat, false, par);
                }
                return with_scratch(ckk * cols, |dcol| {
                    matmul(dcol, w_t, dy_mat, false, par)?;
                    g.col2im_add(dcol, count, dx_chunk);
                    Ok(())
                });
            }
            with_scratch(ckk * cols + o * cols, |scratch| {
                let (dcol, dy_chunk) = scratch.split_at_mut(ckk * cols);
                g.gather_output_grad(dy, first, count, dy_chunk);
                matmul(dcol, w_t, MatRef::row_major(dy_chunk, o, cols), false, par)?;
                g.col2im_add(dcol, count, dx_chunk);
                Ok(())
            })
        })?;
    Ok(dx)
}

/// `dW` from the input and `dy`.
pub(crate) fn weight_grad(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.batch * g.input_sample_len())?;
    check_len("output gradient", dy, g.batch * g.output_sample_len())?;
    if let Some(classes) = g.tap_classes() {
        return tap_classes::weight_grad(g, &classes, x, dy);
    }
    let (o, ckk, p) = (g.out_channels, g.patch_len(), g.positions());
    let chunk = g.chunk_samples();
    let chunks = g.chunk_count();
    // One accumulator per thread, not per chunk: a VGG-16 weight gradient is
    // 9 MB, and the chunks of a group run one after the other anyway.
    let groups = rayon::current_num_threads().clamp(1, chunks.max(1));
    let partials: Vec<Vec<f32>> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut acc = vec![0.0f32; o * ckk];
            let par = g.inner_parallelism(o, ckk, chunk * p);
            let mut index = group;
            while index < chunks {
                let first = index * chunk;
                let count = chunk.min(g.batch - first);
                let cols = count * p;
                if count == 1 && g.is_pointwise() {
                    let xs = &x[first * g.input_sample_len()..][..g.input_sample_len()];
                    let dys = &dy[first * g.output_sample_len()..][..g.output_sample_len()];
                    matmul(
                        &mut acc,
                        MatRef::row_major(dys, o, cols),
                        MatRef::row_major(xs, ckk, cols).t(),
                        true,
                        par,
                    )?;
                } else {
                    with_scratch(ckk * cols + o * cols, |scratch| {
                        let (col, dy_chunk) = scratch.split_at_mut(ckk * cols);
                        g.im2col(x, first, count, col);
                        let dy_mat = if count == 1 {
                            let dys = &dy[first * g.output_sample_len()..][..g.output_sample_len()];
                            MatRef::row_major(dys, o, cols)
                        } else {
                            g.gather_output_grad(dy, first, count, dy_chunk);
                            MatRef::row_major(dy_chunk, o, cols)
                        };
                        matmul(
                            &mut acc,
                            dy_mat,
                            MatRef::row_major(col, ckk, cols).t(),
                            true,
                            par,
                        )
                    })?;
                }
                index += groups;
            }
            Ok(acc)
        })
        .collect::<Result<_, OpsError>>()?;
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_else(|| vec![0.0; o * ckk]);
    for partial in partials {
        for (t, v) in total.iter_mut().zip(&partial) {
            *t += v;
        }
    }
    Ok(total)
}

/// `db[o] = Σ_n Σ_p dy[n, o, p]` for `dy [n, o, p]`.
pub(crate) fn bias_grad(
    dy: &[f32],
    batch: usize,
    channels: usize,
    positions: usize,
) -> Result<Vec<f32>, OpsError> {
    check_len("output gradient", dy, batch * channels * positions)?;
    let mut db = vec![0.0f32; channels];
    if positions == 0 || channels == 0 {
        return Ok(db);
    }
    if positions == 1 {
        // A linear layer: add whole rows (vectorised), the same additions in
        // the same order as the general loop below.
        for row in dy.chunks_exact(channels) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        return Ok(db);
    }
    for sample in dy.chunks_exact(channels * positions) {
        for (d, plane) in db.iter_mut().zip(sample.chunks_exact(positions)) {
            *d += plane.iter().sum::<f32>();
        }
    }
    Ok(db)
}
