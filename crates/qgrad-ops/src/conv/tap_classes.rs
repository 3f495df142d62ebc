//! Convolutions whose zero padding is a large share of their windows, by
//! classes of output positions that read the same kernel taps.
//!
//! On the small maps of AlexNet's late layers (2×2 outputs of a 3×3 kernel
//! with padding 1) four of every nine taps of the im2col matrix read the
//! padding, so half of the GEMMs' multiply-adds were by zero (AlexNet's
//! convolutions did 14.9 M multiply-adds per image where 7.4 M read the
//! input). Along each axis, consecutive outputs whose window overlaps the
//! input in the same range of kernel offsets form a class; a 2-D class is a
//! rectangle of output positions with one rectangle of taps. Each class is
//! unfolded with its own taps only and multiplied by the matching columns
//! of the weight, so every product term reads the input.
//!
//! The sums are those of [`super`]'s path without its zero terms, in a
//! different grouping (another GEMM depth), so results agree within f32
//! rounding, not bit for bit; unpadded convolutions (LeNet-5) never take
//! this path.

use std::ops::Range;

use rayon::prelude::*;

use super::{check_len, ConvGeometry};
use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::scratch::with_scratch;
use crate::OpsError;
use gemm::Parallelism;

/// The share of the full im2col work at or below which the classes are
/// used: they must save at least a quarter. AlexNet's first layer (11×11,
/// stride 4, padding 5 on 32×32: 17 % of its taps read padding, in 16
/// classes) trained slower by classes than by the plain path (2,040 against
/// 2,150 images/s for the network's step on 2 cores); its later layers save
/// 51–56 %, VGG-16's 4×4 and 2×2 layers 31 and 56 %, its larger maps 4–16 %.
const MAX_WORK_NUMERATOR: usize = 3;
const MAX_WORK_DENOMINATOR: usize = 4;

/// Output positions `oh × ow` whose windows read exactly the kernel taps
/// `ki × kj` inside the input. Its unfolded matrix has one row per tap and
/// input channel, in the order `(ki, kj, ci)` (tap-major, the weight
/// transposed to match), and one column per position and sample (`pi · n +
/// sample`: the batch is made sample-minor first, so that every run of the
/// unfolding, the outputs and the folding back is `n` contiguous floats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TapClass {
    oh: Range<usize>,
    ow: Range<usize>,
    ki: Range<usize>,
    kj: Range<usize>,
}

impl TapClass {
    fn positions(&self) -> usize {
        self.oh.len() * self.ow.len()
    }

    fn taps(&self) -> usize {
        self.ki.len() * self.kj.len()
    }
}

impl ConvGeometry {
    /// Along one axis (`size` inputs, `out` outputs, `kernel` offsets): runs
    /// of consecutive outputs with the same range of offsets that land in the
    /// input (`0 ≤ o·stride + k − padding < size`).
    fn axis_classes(
        &self,
        size: usize,
        out: usize,
        kernel: usize,
    ) -> Vec<(Range<usize>, Range<usize>)> {
        let (s, p) = (self.stride, self.padding);
        let mut classes: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        for o in 0..out {
            let start = o * s;
            let lo = p.saturating_sub(start).min(kernel);
            let hi = (size + p).saturating_sub(start).min(kernel).max(lo);
            match classes.last_mut() {
                Some((outputs, taps)) if *taps == (lo..hi) => outputs.end = o + 1,
                _ => classes.push((o..o + 1, lo..hi)),
            }
        }
        classes
    }

    /// The classes of this convolution, when they save enough work (module
    /// docs); `None` for the plain im2col path.
    pub(crate) fn tap_classes(&self) -> Option<Vec<TapClass>> {
        if self.padding == 0 || self.positions() == 0 {
            return None;
        }
        let rows = self.axis_classes(self.height, self.out_h, self.kernel_h);
        let cols = self.axis_classes(self.width, self.out_w, self.kernel_w);
        let classes: Vec<TapClass> = rows
            .iter()
            .flat_map(|(oh, ki)| {
                cols.iter().map(move |(ow, kj)| TapClass {
                    oh: oh.clone(),
                    ow: ow.clone(),
                    ki: ki.clone(),
                    kj: kj.clone(),
                })
            })
            .collect();
        let work: usize = classes.iter().map(|c| c.positions() * c.taps()).sum();
        let full = self.positions() * self.kernel_h * self.kernel_w;
        (work * MAX_WORK_DENOMINATOR <= full * MAX_WORK_NUMERATOR).then_some(classes)
    }

    /// Rows (`taps · c`) and columns (`positions · n`) of `class`'s
    /// unfolded matrix.
    fn class_dims(&self, class: &TapClass) -> (usize, usize) {
        (
            self.in_channels * class.taps(),
            self.batch * class.positions(),
        )
    }

    /// The weight in tap-major order, `[o, kh, kw, c]`, so that a class's
    /// weight columns are runs of `kj.len() · c` floats (see [`TapClass`]'s
    /// row order).
    fn tap_major(&self, weight: &[f32]) -> Vec<f32> {
        let (c, kk) = (self.in_channels, self.kernel_h * self.kernel_w);
        let mut out = vec![0.0f32; weight.len()];
        if self.patch_len() > 0 {
            out.par_chunks_mut(self.patch_len())
                .zip(weight.par_chunks(self.patch_len()))
                .for_each(|(dst, filter)| {
                    for (ci, channel) in filter.chunks_exact(kk).enumerate() {
                        for (t, &v) in channel.iter().enumerate() {
                            dst[t * c + ci] = v;
                        }
                    }
                });
        }
        out
    }

    /// [`Self::tap_major`] undone.
    fn channel_major(&self, tap_major: &[f32]) -> Vec<f32> {
        let (c, kk) = (self.in_channels, self.kernel_h * self.kernel_w);
        let mut out = vec![0.0f32; tap_major.len()];
        if self.patch_len() > 0 {
            out.par_chunks_mut(self.patch_len())
                .zip(tap_major.par_chunks(self.patch_len()))
                .for_each(|(filter, src)| {
                    for (ci, channel) in filter.chunks_exact_mut(kk).enumerate() {
                        for (t, d) in channel.iter_mut().enumerate() {
                            *d = src[t * c + ci];
                        }
                    }
                });
        }
        out
    }

    /// Where `class`'s weight columns for kernel row `ki` start in a filter
    /// of the tap-major weight, and how many there are.
    fn tap_run(&self, class: &TapClass, ki: usize) -> (usize, usize) {
        let c = self.in_channels;
        (
            (ki * self.kernel_w + class.kj.start) * c,
            class.kj.len() * c,
        )
    }

    /// The tap-major weight's columns of `class`: `[o, taps·c]`.
    fn class_weight(&self, class: &TapClass, tap_major: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.out_channels * self.in_channels * class.taps());
        if self.patch_len() == 0 {
            return out;
        }
        for filter in tap_major.chunks_exact(self.patch_len()) {
            for ki in class.ki.clone() {
                let (start, len) = self.tap_run(class, ki);
                out.extend_from_slice(&filter[start..start + len]);
            }
        }
        out
    }

    /// The input offsets (in a sample) of `class`'s unfolded rows, for
    /// every position: `offsets[row · positions + pi]`, rows in
    /// [`TapClass`]'s order.
    fn class_offsets(&self, class: &TapClass) -> Vec<usize> {
        let (s, pad, w) = (self.stride, self.padding, self.width);
        let plane = self.height * self.width;
        let mut offsets = Vec::with_capacity(self.in_channels * class.taps() * class.positions());
        for ki in class.ki.clone() {
            for kj in class.kj.clone() {
                for ci in 0..self.in_channels {
                    for oh in class.oh.clone() {
                        for ow in class.ow.clone() {
                            offsets.push(ci * plane + (oh * s + ki - pad) * w + ow * s + kj - pad);
                        }
                    }
                }
            }
        }
        offsets
    }

    /// The output offsets (in a sample's `[o, oh, ow]`) of `class`'s
    /// positions, channel 0.
    fn class_positions(&self, class: &TapClass) -> Vec<usize> {
        class
            .oh
            .clone()
            .flat_map(|oh| class.ow.clone().map(move |ow| oh * self.out_w + ow))
            .collect()
    }

    /// Unfolds `class` from the sample-minor input `x_t [c·h·w, n]` into
    /// `col [taps·c, positions·n]` (column `pi · n + sample`): every entry
    /// run is a copy of `n` contiguous floats.
    fn class_im2col(&self, offsets: &[usize], x_t: &[f32], col: &mut [f32]) {
        let n = self.batch;
        for (d, &offset) in col.chunks_exact_mut(n).zip(offsets) {
            d.copy_from_slice(&x_t[offset * n..(offset + 1) * n]);
        }
    }

    /// `class`'s outputs from the sample-minor `dy_t [o·p, n]` as
    /// `[o, positions·n]`.
    fn class_output_grad(&self, positions: &[usize], dy_t: &[f32], dst: &mut [f32]) {
        let (n, p) = (self.batch, self.positions());
        let mut runs = dst.chunks_exact_mut(n);
        for oc in 0..self.out_channels {
            for &pos in positions {
                if let Some(d) = runs.next() {
                    let at = (oc * p + pos) * n;
                    d.copy_from_slice(&dy_t[at..at + n]);
                }
            }
        }
    }
}

/// `src [rows, cols]` transposed into `dst [cols, rows]`, in parallel over
/// tiles.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    if rows == 0 || cols == 0 {
        return;
    }
    // Each task writes TILE output rows (TILE input columns), all of them.
    dst.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let j0 = block * TILE;
            let width = dst.len() / rows;
            for i0 in (0..rows).step_by(TILE) {
                for i in i0..(i0 + TILE).min(rows) {
                    let row = &src[i * cols + j0..i * cols + j0 + width];
                    for (jj, &v) in row.iter().enumerate() {
                        dst[jj * rows + i] = v;
                    }
                }
            }
        });
}

/// [`transpose_into`] a fresh vector (an op's result).
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    transpose_into(src, rows, cols, &mut out);
    out
}

/// `buffer` cut into consecutive slices of `sizes` (one per class), each
/// filled by `fill(slice, class)` with the classes in parallel; the filled
/// slices, in class order.
fn fill_per_class<'a>(
    mut buffer: &'a mut [f32],
    sizes: &[usize],
    classes: &[TapClass],
    fill: impl Fn(&mut [f32], &TapClass) -> Result<(), OpsError> + Sync,
) -> Result<Vec<&'a [f32]>, OpsError> {
    let mut slices = Vec::with_capacity(sizes.len());
    for &size in sizes {
        let (head, tail) = std::mem::take(&mut buffer).split_at_mut(size);
        slices.push(head);
        buffer = tail;
    }
    slices
        .par_iter_mut()
        .zip(classes.par_iter())
        .try_for_each(|(slice, class)| fill(slice, class))?;
    Ok(slices.into_iter().map(|s| &*s).collect())
}

/// GEMM parallelism inside one class's product: only when there are fewer
/// classes than threads (the classes run in parallel otherwise).
fn class_parallelism(classes: &[TapClass], m: usize, n: usize, k: usize) -> Parallelism {
    if classes.len() >= rayon::current_num_threads() {
        Parallelism::None
    } else {
        parallelism_for(m, n, k)
    }
}

/// [`super::forward`] by classes: the input made sample-minor once, each
/// class's product over the whole batch (one GEMM with `positions · n`
/// columns, so that packing the weight pays), the classes in parallel, the
/// outputs put in place sample-minor and transposed back. The temporaries
/// live in the calling thread's scratch (no zero-filled fresh pages per
/// call).
pub(crate) fn forward(
    g: &ConvGeometry,
    classes: &[TapClass],
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>, OpsError> {
    let (o, n, p, isl) = (g.out_channels, g.batch, g.positions(), g.input_sample_len());
    if n * g.output_sample_len() == 0 {
        return Ok(Vec::new());
    }
    let tap_major = g.tap_major(weight);
    let sizes: Vec<usize> = classes.iter().map(|c| o * n * c.positions()).collect();
    let y_len = o * p * n;
    with_scratch(n * isl + 2 * y_len, |buffer| {
        let (x_t, rest) = buffer.split_at_mut(n * isl);
        let (all_products, y_t) = rest.split_at_mut(y_len);
        transpose_into(x, n, isl, x_t);
        let x_t = &*x_t;
        let products = fill_per_class(all_products, &sizes, classes, |product, class| {
            let (k, cols) = g.class_dims(class);
            let w = g.class_weight(class, &tap_major);
            with_scratch(k * cols, |col| {
                g.class_im2col(&g.class_offsets(class), x_t, col);
                matmul(
                    product,
                    MatRef::row_major(&w, o, k),
                    MatRef::row_major(col, k, cols),
                    false,
                    class_parallelism(classes, o, cols, k),
                )
            })
        })?;
        // y_t [o·p, n]: row (oc, position) from its class's product.
        let mut row_source = vec![(0usize, 0usize); p];
        for (c, class) in classes.iter().enumerate() {
            for (pi, pos) in g.class_positions(class).into_iter().enumerate() {
                row_source[pos] = (c, pi);
            }
        }
        y_t.par_chunks_mut(p * n)
            .enumerate()
            .for_each(|(oc, rows)| {
                let b = bias.map_or(0.0, |bias| bias[oc]);
                for (dst, &(c, pi)) in rows.chunks_exact_mut(n).zip(&row_source) {
                    let cols = n * classes[c].positions();
                    let src = &products[c][oc * cols + pi * n..oc * cols + (pi + 1) * n];
                    for (d, v) in dst.iter_mut().zip(src) {
                        *d = v + b;
                    }
                }
            });
        Ok(transpose(y_t, o * p, n))
    })
}

/// [`super::input_grad`] by classes: the output gradient made
/// sample-minor once, each class's unfolded gradient over the whole batch,
/// the classes in parallel (a GEMM per kernel row, straight from the
/// tap-major weight), folded back sample-minor and transposed back.
pub(crate) fn input_grad(
    g: &ConvGeometry,
    classes: &[TapClass],
    dy: &[f32],
    weight: &[f32],
) -> Result<Vec<f32>, OpsError> {
    let (o, n, ckk, isl) = (g.out_channels, g.batch, g.patch_len(), g.input_sample_len());
    let osl = g.output_sample_len();
    if n * isl == 0 {
        return Ok(vec![0.0; n * isl]);
    }
    let tap_major = g.tap_major(weight);
    let sizes: Vec<usize> = classes
        .iter()
        .map(|c| {
            let (k, cols) = g.class_dims(c);
            k * cols
        })
        .collect();
    let dcols_len: usize = sizes.iter().sum();
    with_scratch(n * osl + dcols_len + isl * n, |buffer| {
        let (dy_t, rest) = buffer.split_at_mut(n * osl);
        let (all_dcols, dx_t) = rest.split_at_mut(dcols_len);
        transpose_into(dy, n, osl, dy_t);
        let dy_t = &*dy_t;
        let dcols = fill_per_class(all_dcols, &sizes, classes, |dcol, class| {
            let (k, cols) = g.class_dims(class);
            if k == 0 || cols == 0 {
                return Ok(());
            }
            with_scratch(o * cols, |dy_class| {
                g.class_output_grad(&g.class_positions(class), dy_t, dy_class);
                let mut rows = dcol.chunks_mut(class.kj.len() * g.in_channels * cols);
                for ki in class.ki.clone() {
                    let (start, len) = g.tap_run(class, ki);
                    let w = MatRef {
                        data: &tap_major[start..],
                        rows: o,
                        cols: len,
                        row_stride: ckk,
                        col_stride: 1,
                    };
                    let dst = rows.next().ok_or_else(|| {
                        OpsError::Internal("conv2d class gradient rows run short".into())
                    })?;
                    matmul(
                        dst,
                        w.t(),
                        MatRef::row_major(dy_class, o, cols),
                        false,
                        class_parallelism(classes, len, cols, o),
                    )?;
                }
                Ok(())
            })
        })?;
        // dx_t [c·h·w, n], in parallel over input channels (the classes' runs
        // of one channel land in that channel's rows only).
        let plane = g.height * g.width;
        let offsets: Vec<Vec<usize>> = classes.iter().map(|c| g.class_offsets(c)).collect();
        if plane > 0 {
            dx_t.par_chunks_mut(plane * n)
                .enumerate()
                .for_each(|(ci, rows)| {
                    rows.fill(0.0);
                    for ((class, offsets), dcol) in classes.iter().zip(&offsets).zip(&dcols) {
                        let run = class.positions();
                        // Rows (ki, kj, ci): this channel's rows are every c-th.
                        let rows_of_all = offsets.chunks_exact(run).enumerate();
                        for (t, offsets) in rows_of_all.skip(ci).step_by(g.in_channels) {
                            for (pi, &offset) in offsets.iter().enumerate() {
                                let at = (offset - ci * plane) * n;
                                let src = &dcol[(t * run + pi) * n..(t * run + pi + 1) * n];
                                for (d, v) in rows[at..at + n].iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                });
        }
        Ok(transpose(dx_t, isl, n))
    })
}

/// [`super::weight_grad`] by classes: input and output gradient made
/// sample-minor once, each class's `[o, taps·c]` gradient over the whole
/// batch, the classes in parallel, then added into place.
pub(crate) fn weight_grad(
    g: &ConvGeometry,
    classes: &[TapClass],
    x: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>, OpsError> {
    let (o, n, isl, osl) = (
        g.out_channels,
        g.batch,
        g.input_sample_len(),
        g.output_sample_len(),
    );
    let sizes: Vec<usize> = classes
        .iter()
        .map(|c| o * g.in_channels * c.taps())
        .collect();
    let grads_len: usize = sizes.iter().sum();
    let weight_len = g.weight_len();
    let tap_major = with_scratch(n * isl + n * osl + grads_len + weight_len, |buffer| {
        let (x_t, rest) = buffer.split_at_mut(n * isl);
        let (dy_t, rest) = rest.split_at_mut(n * osl);
        let (all_grads, tap_major) = rest.split_at_mut(grads_len);
        transpose_into(x, n, isl, x_t);
        transpose_into(dy, n, osl, dy_t);
        let (x_t, dy_t) = (&*x_t, &*dy_t);
        let grads = fill_per_class(all_grads, &sizes, classes, |grad, class| {
            let (k, cols) = g.class_dims(class);
            with_scratch(k * cols + o * cols, |scratch| {
                let (col, dy_class) = scratch.split_at_mut(k * cols);
                g.class_im2col(&g.class_offsets(class), x_t, col);
                g.class_output_grad(&g.class_positions(class), dy_t, dy_class);
                matmul(
                    grad,
                    MatRef::row_major(dy_class, o, cols),
                    MatRef::row_major(col, k, cols).t(),
                    false,
                    class_parallelism(classes, o, k, cols),
                )
            })
        })?;
        if g.patch_len() > 0 {
            tap_major
                .par_chunks_mut(g.patch_len())
                .enumerate()
                .for_each(|(oc, filter)| {
                    filter.fill(0.0);
                    for (class, grad) in classes.iter().zip(&grads) {
                        let k = g.in_channels * class.taps();
                        if k == 0 {
                            continue;
                        }
                        let mut src =
                            grad[oc * k..(oc + 1) * k].chunks(class.kj.len() * g.in_channels);
                        for ki in class.ki.clone() {
                            let (start, len) = g.tap_run(class, ki);
                            if let Some(src) = src.next() {
                                for (d, v) in filter[start..start + len].iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                });
        }
        Ok::<_, OpsError>(g.channel_major(tap_major))
    })?;
    check_len("weight gradient", &tap_major, weight_len)?;
    Ok(tap_major)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(hw: usize, k: usize, stride: usize, padding: usize) -> ConvGeometry {
        ConvGeometry::new(&[2, 3, hw, hw], &[4, 3, k, k], stride, padding).unwrap()
    }

    #[test]
    fn classes_of_alexnets_late_layers_and_the_threshold() {
        // 2×2 outputs of a 3×3 kernel with padding 1: four classes of one
        // position and four taps each.
        let classes = geometry(2, 3, 1, 1).tap_classes().unwrap();
        assert_eq!(classes.len(), 4);
        assert!(classes.iter().all(|c| c.positions() == 1 && c.taps() == 4));
        assert_eq!((classes[0].ki.clone(), classes[0].kj.clone()), (1..3, 1..3));
        assert_eq!((classes[3].ki.clone(), classes[3].kj.clone()), (0..2, 0..2));
        // 32×32 with 3×3 and padding 1 saves 8 %, 8×8 16 %: the plain path;
        // 4×4 saves 31 %.
        assert!(geometry(32, 3, 1, 1).tap_classes().is_none());
        assert!(geometry(8, 3, 1, 1).tap_classes().is_none());
        assert!(geometry(4, 3, 1, 1).tap_classes().is_some());
        // AlexNet's first layer (17 %): the plain path.
        assert!(ConvGeometry::new(&[2, 3, 32, 32], &[4, 3, 11, 11], 4, 5)
            .unwrap()
            .tap_classes()
            .is_none());
        // Unpadded: the plain path.
        assert!(geometry(4, 3, 1, 0).tap_classes().is_none());
        // Every output position is in exactly one class.
        let g = geometry(5, 5, 2, 2);
        let classes = g.tap_classes().unwrap();
        let mut seen = vec![0; g.positions()];
        for c in &classes {
            for oh in c.oh.clone() {
                for ow in c.ow.clone() {
                    seen[oh * g.out_w + ow] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    #[test]
    fn outputs_that_read_only_padding_get_the_bias() {
        // A 1×1 input, a 1×1 kernel and padding 2: 5×5 outputs, of which only
        // the centre reads the input.
        let g = ConvGeometry::new(&[1, 1, 1, 1], &[1, 1, 1, 1], 1, 2).unwrap();
        let classes = g.tap_classes().unwrap();
        let y = forward(&g, &classes, &[3.0], &[2.0], Some(&[0.5])).unwrap();
        let mut expected = vec![0.5; 25];
        expected[12] = 6.5;
        assert_eq!(y, expected);
        assert_eq!(
            weight_grad(&g, &classes, &[3.0], &[1.0; 25]).unwrap(),
            vec![3.0]
        );
        assert_eq!(
            input_grad(&g, &classes, &[1.0; 25], &[2.0]).unwrap(),
            vec![2.0]
        );
    }
}
