//! The integer kernel of a scaled tensor (see the parent module's docs,
//! "Scaled tensors", for the arithmetic and its exact rounding).
//!
//! Layout: per weight row, one *segment* per scale group the row's non-zero
//! codes fall in (one segment per row when the groups are the tensor or its
//! rows), each segment holding its positive codes, then its negative codes,
//! as column indices and code magnitudes. A product adds (or, for a
//! negative code of a one-sided tensor, subtracts) `L(|k|) · x` into an
//! integer accumulator per segment — for binary and ternary codes `L = 1`,
//! so the inner loop is a plain add or subtract — and multiplies by the
//! scale once per segment and output. A batch runs on the sliced kernel of
//! the fixed tensors (`super::sliced`) where its sums are exact in f32 or
//! f64: `P` and `N` of each segment for 16 samples at once, then the same
//! f64 formula per output.

use std::ops::{AddAssign, SubAssign};

use rayon::prelude::*;

use super::sliced::{dot_slice, gather_slice, scatter_slice, Lane, SLICE};
use super::{max_abs, pow2, transpose, FixedActivations, SERIAL_WORK};
use crate::format::LevelKind;
use crate::model::CompressedTensor;
use crate::scaled::ScaledInfo;

/// One scale group's share of a weight row: entries `start..mid` have
/// positive codes, `mid..end` negative ones.
#[derive(Clone, Copy, Debug)]
struct Segment {
    start: u32,
    mid: u32,
    end: u32,
    pos_scale: f64,
    neg_scale: f64,
}

/// The kernel form of a scaled tensor.
#[derive(Clone, Debug)]
pub(super) struct ScaledKernel {
    rows: usize,
    cols: usize,
    two_sided: bool,
    /// How `L(|k|)` is applied: 1 (every code ±1), `|k|` or `2^(|k|-1)`.
    level: LevelOp,
    /// `den`: 1, `n` or `2^(n-1)`.
    den: f64,
    /// `rows + 1` offsets into `segments`.
    row_seg: Vec<u32>,
    segments: Vec<Segment>,
    col: Vec<u32>,
    /// `|k|` of each entry.
    mag: Vec<u8>,
    /// `L(|k|)` of each entry as `f32` (exact wherever the sliced kernel
    /// runs: its bound covers every level).
    level_f32: Vec<f32>,
    /// The largest index in `col` (0 when empty): what the sliced kernel's
    /// unchecked loads rely on.
    max_col: u32,
    /// `max_r Σ_{entries of row r} L(|k|)` (saturating): with `max |x|`
    /// it bounds every accumulator.
    max_row_weight: u128,
    /// The block mat-vec of a layout-3 tensor, where it applies.
    block: Option<super::block::BlockMatvec>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LevelOp {
    Unit,
    Multiply,
    Shift,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccWidth {
    I32,
    I64,
    I128,
    /// Only for logarithmic codes with a very large `max_code`, where even
    /// `i128` could overflow: terms are exact in f64, the sum rounds.
    F64,
}

/// Accumulators of the scaled kernel.
trait SAcc: Copy + Default + Send + Sync + AddAssign + SubAssign {
    fn from_i32(v: i32) -> Self;
    /// `self · m`.
    fn times(self, m: u8) -> Self;
    /// `self · 2^e`.
    fn pow2_times(self, e: u32) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! impl_sacc {
    ($t:ty) => {
        impl SAcc for $t {
            #[inline(always)]
            fn from_i32(v: i32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn times(self, m: u8) -> Self {
                self * m as $t
            }
            #[inline(always)]
            fn pow2_times(self, e: u32) -> Self {
                // The caller's bound keeps the result in range.
                self << e
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_sacc!(i32);
impl_sacc!(i64);
impl_sacc!(i128);

impl SAcc for f64 {
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        f64::from(v)
    }
    #[inline(always)]
    fn times(self, m: u8) -> Self {
        self * f64::from(m)
    }
    #[inline(always)]
    fn pow2_times(self, e: u32) -> Self {
        self * pow2(i64::from(e))
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// `L(|k|) · x` for one level function, chosen at compile time.
trait Level {
    fn apply<A: SAcc>(x: A, mag: u8) -> A;
}

struct Unit;
struct Multiply;
struct Shift;

impl Level for Unit {
    #[inline(always)]
    fn apply<A: SAcc>(x: A, _mag: u8) -> A {
        x
    }
}

impl Level for Multiply {
    #[inline(always)]
    fn apply<A: SAcc>(x: A, mag: u8) -> A {
        x.times(mag)
    }
}

impl Level for Shift {
    #[inline(always)]
    fn apply<A: SAcc>(x: A, mag: u8) -> A {
        x.pow2_times(u32::from(mag) - 1)
    }
}

/// Columns whose accumulators a block keeps in registers (4 AVX2 vectors of i32).
const LANES: usize = 32;

/// Per-worker buffers of the sliced product: the gathered activations
/// `[cols][SLICE]`, the outputs `[rows][SLICE]` and a zero row for the lanes
/// past the batch.
#[derive(Default)]
struct SliceBuffers {
    xs: Vec<f32>,
    out: Vec<f32>,
    zeros: Vec<i32>,
}

impl ScaledKernel {
    pub(super) fn from_tensor(t: &CompressedTensor, info: ScaledInfo) -> Self {
        let (row_ptr, col_all) = t.csr_parts();
        let scales = t.scales();
        let (rows, cols) = (t.rows(), t.cols());
        let elements = t.num_elements();
        // Validated on decode: groups >= 1 divides the element count.
        let group_size = (elements / info.groups.max(1)).max(1);
        let per_group = info.scales_per_group();
        let level = match info.levels {
            _ if info.max_code == 1 => LevelOp::Unit,
            LevelKind::Binary => LevelOp::Unit,
            LevelKind::Linear => LevelOp::Multiply,
            LevelKind::Log => LevelOp::Shift,
        };
        let nnz = t.nnz();
        let mut k = ScaledKernel {
            rows,
            cols,
            two_sided: info.two_sided,
            level,
            den: info.denominator(),
            row_seg: Vec::with_capacity(rows + 1),
            segments: Vec::new(),
            col: Vec::with_capacity(nnz),
            mag: Vec::with_capacity(nnz),
            level_f32: Vec::with_capacity(nnz),
            max_col: 0,
            max_row_weight: 0,
            block: super::block::BlockMatvec::from_tensor(t, info),
        };
        k.row_seg.push(0);
        let code = |e: usize| t.entry_int(e).unwrap_or(0);
        for r in 0..rows {
            let (lo, hi) = (row_ptr[r] as usize, row_ptr[r + 1] as usize);
            let group_of = |e: usize| (r * cols + col_all[e] as usize) / group_size;
            let mut row_weight = 0u128;
            let mut e = lo;
            while e < hi {
                let g = group_of(e);
                let mut f = e;
                while f < hi && group_of(f) == g {
                    f += 1;
                }
                let start = k.col.len() as u32;
                let mut mid = start;
                for positive in [true, false] {
                    for (i, &column) in (e..f).zip(&col_all[e..f]) {
                        let c = code(i);
                        if c != 0 && (c > 0) == positive {
                            let mag = c.unsigned_abs() as u8;
                            k.col.push(column);
                            k.mag.push(mag);
                            k.level_f32.push(info.integer_level(mag) as f32);
                            k.max_col = k.max_col.max(column);
                            row_weight = row_weight.saturating_add(info.integer_level(mag));
                        }
                    }
                    if positive {
                        mid = k.col.len() as u32;
                    }
                }
                let end = k.col.len() as u32;
                let pos_scale = scales.get(g * per_group).copied().unwrap_or(0.0);
                let neg_scale = scales
                    .get(g * per_group + per_group - 1)
                    .copied()
                    .unwrap_or(0.0);
                k.segments.push(Segment {
                    start,
                    mid,
                    end,
                    pos_scale: f64::from(pos_scale),
                    neg_scale: f64::from(neg_scale),
                });
                e = f;
            }
            k.max_row_weight = k.max_row_weight.max(row_weight);
            k.row_seg.push(k.segments.len() as u32);
        }
        k
    }

    pub(super) fn rows(&self) -> usize {
        self.rows
    }

    pub(super) fn cols(&self) -> usize {
        self.cols
    }

    fn acc_width(&self, max_abs_x: u64) -> AccWidth {
        // At least max_row_weight: every L(|k|) itself must fit the type (a
        // shift by |k| - 1 happens even when the activations are all 0).
        let bound = self
            .max_row_weight
            .saturating_mul(u128::from(max_abs_x.max(1)));
        if bound < 1 << 31 {
            AccWidth::I32
        } else if bound < 1 << 63 {
            AccWidth::I64
        } else if bound < 1 << 127 {
            AccWidth::I128
        } else {
            AccWidth::F64
        }
    }

    /// `y[b, r] = Σ_c W[r, c] · x[b, c]`, row-major `[x.rows, rows]`; the
    /// caller checked the shapes.
    pub(super) fn matmul(&self, x: &FixedActivations) -> Vec<f32> {
        let batch = x.rows;
        let max_abs_x = max_abs(&x.values);
        if batch == 1 {
            let mut y = vec![0f32; self.rows];
            match &self.block {
                Some(b)
                    if b.max_row_weight
                        .saturating_mul(u128::from(max_abs_x.max(1)))
                        < 1 << 31 =>
                {
                    b.matvec(&x.values, x.frac_bits[0], &mut y)
                }
                _ => self.spmm_t(&x.values, 1, &x.frac_bits, max_abs_x, &mut y),
            }
            return y;
        }
        // Slices of samples (see `sliced`) wherever the sums are exact in
        // f32 or f64: every file qgrad writes, at up to 16-bit activations.
        if max_abs_x <= 1 << 24 {
            let bound = self
                .max_row_weight
                .saturating_mul(u128::from(max_abs_x.max(1)));
            let mut y = vec![0f32; batch * self.rows];
            if bound < 1 << 24 {
                self.matmul_sliced::<f32>(x, &mut y);
                return y;
            }
            if bound < 1 << 53 {
                self.matmul_sliced::<f64>(x, &mut y);
                return y;
            }
        }
        let mut xt = vec![0i32; x.values.len()];
        transpose(&x.values, batch, self.cols, &mut xt);
        let mut yt = vec![0f32; self.rows * batch];
        self.spmm_t(&xt, batch, &x.frac_bits, max_abs_x, &mut yt);
        let mut y = vec![0f32; batch * self.rows];
        transpose(&yt, self.rows, batch, &mut y);
        y
    }

    /// The batch product in slices of [`SLICE`] samples with exact sums in
    /// `T` (the caller checked `max_row_weight · max|x|` against `T` and
    /// `max|x| <= 2^24`): `P` and `N` of every segment by the shared
    /// slice kernel, then the module's f64 formula per output, in the
    /// scalar kernel's order, so the bits are the one-sample kernel's.
    fn matmul_sliced<T: Lane>(&self, x: &FixedActivations, y: &mut [f32]) {
        let rows = self.rows;
        if rows == 0 || x.rows == 0 {
            return;
        }
        let work = self.col.len().saturating_mul(x.rows);
        let run = |bufs: &mut SliceBuffers, (s, ys): (usize, &mut [f32])| {
            self.slice::<T>(x, s * SLICE, ys, bufs)
        };
        if work < SERIAL_WORK {
            let mut bufs = SliceBuffers::default();
            y.chunks_mut(SLICE * rows)
                .enumerate()
                .for_each(|item| run(&mut bufs, item));
        } else {
            y.par_chunks_mut(SLICE * rows)
                .enumerate()
                .for_each_init(SliceBuffers::default, run);
        }
    }

    /// One slice: samples `b0 .. b0 + ys.len() / rows`.
    fn slice<T: Lane>(
        &self,
        x: &FixedActivations,
        b0: usize,
        ys: &mut [f32],
        bufs: &mut SliceBuffers,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let lanes = ys.len() / rows;
        bufs.xs.resize(cols * SLICE, 0.0);
        bufs.out.resize(rows * SLICE, 0.0);
        bufs.zeros.resize(cols, 0);
        let sample: [&[i32]; SLICE] = std::array::from_fn(|l| {
            if l < lanes {
                &x.values[(b0 + l) * cols..(b0 + l + 1) * cols]
            } else {
                &bufs.zeros[..]
            }
        });
        gather_slice(&sample, cols, &mut bufs.xs);
        let x_scale: [f64; SLICE] = std::array::from_fn(|l| {
            if l < lanes {
                pow2(-i64::from(x.frac_bits[b0 + l]))
            } else {
                1.0
            }
        });
        // What makes the unchecked loads of `dot_slice` sound: every column
        // index of the kernel is at most `max_col`, fixed when it was built.
        assert!(
            self.col.is_empty() || (self.max_col as usize + 1) * SLICE <= bufs.xs.len(),
            "activation slice shorter than the weight's columns"
        );
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                unsafe { self.slice_rows_avx512::<T>(&bufs.xs, &x_scale, &mut bufs.out) };
                scatter_slice(&bufs.out, rows, ys);
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                unsafe { self.slice_rows_avx2_fma::<T>(&bufs.xs, &x_scale, &mut bufs.out) };
                scatter_slice(&bufs.out, rows, ys);
                return;
            }
        }
        self.slice_rows::<T, false>(&bufs.xs, &x_scale, &mut bufs.out);
        scatter_slice(&bufs.out, rows, ys);
    }

    /// [`Self::slice_rows`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx512f")]
    unsafe fn slice_rows_avx512<T: Lane>(
        &self,
        xs: &[f32],
        x_scale: &[f64; SLICE],
        out: &mut [f32],
    ) {
        self.slice_rows::<T, true>(xs, x_scale, out);
    }

    /// [`Self::slice_rows`] compiled for AVX2 with fused multiply-adds.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn slice_rows_avx2_fma<T: Lane>(
        &self,
        xs: &[f32],
        x_scale: &[f64; SLICE],
        out: &mut [f32],
    ) {
        self.slice_rows::<T, true>(xs, x_scale, out);
    }

    /// `out[r][l]` for every row: the segments' exact `P` and `N`, then
    /// `t = t + s·(P - N)` (or `t = t + s⁺·P; t = t - s⁻·N`) over the
    /// segments in order and `f32((t · 2^-f_b) / den)`, as in [`Self::row`].
    /// The caller checked the columns against `xs`.
    #[inline(always)]
    fn slice_rows<T: Lane, const FUSED: bool>(
        &self,
        xs: &[f32],
        x_scale: &[f64; SLICE],
        out: &mut [f32],
    ) {
        for (r, o) in out.chunks_exact_mut(SLICE).enumerate() {
            let mut total = [0f64; SLICE];
            let segments = &self.segments[self.row_seg[r] as usize..self.row_seg[r + 1] as usize];
            for seg in segments {
                let (start, mid, end) = (seg.start as usize, seg.mid as usize, seg.end as usize);
                // SAFETY: every column is at most `max_col`, which the
                // caller checked against `xs`.
                let (pos, neg) = unsafe {
                    (
                        dot_slice::<T, FUSED>(
                            &self.col[start..mid],
                            &self.level_f32[start..mid],
                            xs,
                        ),
                        dot_slice::<T, FUSED>(&self.col[mid..end], &self.level_f32[mid..end], xs),
                    )
                };
                for l in 0..SLICE {
                    if self.two_sided {
                        total[l] += seg.pos_scale * pos[l].to_f64();
                        total[l] -= seg.neg_scale * neg[l].to_f64();
                    } else {
                        total[l] += seg.pos_scale * pos[l].sub(neg[l]).to_f64();
                    }
                }
            }
            for l in 0..SLICE {
                o[l] = ((total[l] * x_scale[l]) / self.den) as f32;
            }
        }
    }

    /// `yt[r][j] = Σ_c W[r, c] · xt[c][j]` for `n` columns `j` with
    /// fractional bits `col_frac[j]`.
    pub(super) fn spmm_t(
        &self,
        xt: &[i32],
        n: usize,
        col_frac: &[i32],
        max_abs_x: u64,
        yt: &mut [f32],
    ) {
        macro_rules! with_level {
            ($a:ty) => {
                match self.level {
                    LevelOp::Unit => self.run::<$a, Unit>(xt, n, col_frac, yt),
                    LevelOp::Multiply => self.run::<$a, Multiply>(xt, n, col_frac, yt),
                    LevelOp::Shift => self.run::<$a, Shift>(xt, n, col_frac, yt),
                }
            };
        }
        match self.acc_width(max_abs_x) {
            AccWidth::I32 => with_level!(i32),
            AccWidth::I64 => with_level!(i64),
            AccWidth::I128 => with_level!(i128),
            AccWidth::F64 => with_level!(f64),
        }
    }

    fn run<A: SAcc, L: Level>(&self, xt: &[i32], n: usize, col_frac: &[i32], yt: &mut [f32]) {
        if n == 0 {
            return;
        }
        let x_scale: Vec<f64> = col_frac.iter().map(|&f| pow2(-i64::from(f))).collect();
        let row = |r: usize, out: &mut [f32]| self.row::<A, L>(r, xt, n, &x_scale, out);
        if self.col.len().saturating_mul(n) < SERIAL_WORK {
            yt.chunks_mut(n)
                .enumerate()
                .for_each(|(r, out)| row(r, out));
        } else {
            yt.par_chunks_mut(n)
                .with_min_len(if n == 1 { 32 } else { 1 })
                .enumerate()
                .for_each(|(r, out)| row(r, out));
        }
    }

    /// One weight row for all `n` columns.
    fn row<A: SAcc, L: Level>(
        &self,
        r: usize,
        xt: &[i32],
        n: usize,
        x_scale: &[f64],
        out: &mut [f32],
    ) {
        if n == 1 {
            // Mat-vec: a scalar gather per entry.
            let segments = &self.segments[self.row_seg[r] as usize..self.row_seg[r + 1] as usize];
            let mut total = 0f64;
            for seg in segments {
                let (start, mid, end) = (seg.start as usize, seg.mid as usize, seg.end as usize);
                let gather = |range: std::ops::Range<usize>| {
                    let mut acc = A::default();
                    for (&c, &m) in self.col[range.clone()].iter().zip(&self.mag[range]) {
                        acc += L::apply(A::from_i32(xt[c as usize]), m);
                    }
                    acc
                };
                let mut pos = gather(start..mid);
                let neg = gather(mid..end);
                if self.two_sided {
                    total += seg.pos_scale * pos.to_f64();
                    total -= seg.neg_scale * neg.to_f64();
                } else {
                    pos -= neg;
                    total += seg.pos_scale * pos.to_f64();
                }
            }
            out[0] = ((total * x_scale[0]) / self.den) as f32;
            return;
        }
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            if n >= 8 && std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                unsafe { self.row_avx2::<A, L>(r, xt, n, x_scale, out) };
                return;
            }
        }
        self.row_body::<A, L>(r, xt, n, x_scale, out);
    }

    /// [`Self::row_body`] compiled for AVX2 (8 lanes of i32 per add).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    #[target_feature(enable = "avx2")]
    unsafe fn row_avx2<A: SAcc, L: Level>(
        &self,
        r: usize,
        xt: &[i32],
        n: usize,
        x_scale: &[f64],
        out: &mut [f32],
    ) {
        self.row_body::<A, L>(r, xt, n, x_scale, out);
    }

    /// Blocks of [`LANES`] columns whose accumulators stay in registers
    /// across all entries of a segment, then blocks of 8 and of 1.
    #[inline(always)]
    fn row_body<A: SAcc, L: Level>(
        &self,
        r: usize,
        xt: &[i32],
        n: usize,
        x_scale: &[f64],
        out: &mut [f32],
    ) {
        let segments = &self.segments[self.row_seg[r] as usize..self.row_seg[r + 1] as usize];
        let mut j = 0;
        while j + LANES <= n {
            self.block::<A, L, LANES>(segments, xt, n, j, x_scale, &mut out[j..j + LANES]);
            j += LANES;
        }
        while j + 8 <= n {
            self.block::<A, L, 8>(segments, xt, n, j, x_scale, &mut out[j..j + 8]);
            j += 8;
        }
        while j < n {
            self.block::<A, L, 1>(segments, xt, n, j, x_scale, &mut out[j..j + 1]);
            j += 1;
        }
    }

    /// Columns `j .. j + W` of one row: the formula of the module docs.
    #[inline(always)]
    fn block<A: SAcc, L: Level, const W: usize>(
        &self,
        segments: &[Segment],
        xt: &[i32],
        n: usize,
        j: usize,
        x_scale: &[f64],
        out: &mut [f32],
    ) {
        let mut total = [0f64; W];
        for seg in segments {
            let (start, mid, end) = (seg.start as usize, seg.mid as usize, seg.end as usize);
            let mut pos = [A::default(); W];
            self.accumulate::<A, L, W, false>(start..mid, xt, n, j, &mut pos);
            if self.two_sided {
                let mut neg = [A::default(); W];
                self.accumulate::<A, L, W, false>(mid..end, xt, n, j, &mut neg);
                for ((t, p), q) in total.iter_mut().zip(&pos).zip(&neg) {
                    *t += seg.pos_scale * p.to_f64();
                    *t -= seg.neg_scale * q.to_f64();
                }
            } else {
                self.accumulate::<A, L, W, true>(mid..end, xt, n, j, &mut pos);
                for (t, p) in total.iter_mut().zip(&pos) {
                    *t += seg.pos_scale * p.to_f64();
                }
            }
        }
        for ((o, &t), &xs) in out.iter_mut().zip(&total).zip(&x_scale[j..j + W]) {
            *o = ((t * xs) / self.den) as f32;
        }
    }

    /// `acc[l] ±= L(|k_e|) · xt[col_e · n + j + l]` over the entries `range`.
    #[inline(always)]
    fn accumulate<A: SAcc, L: Level, const W: usize, const SUB: bool>(
        &self,
        range: std::ops::Range<usize>,
        xt: &[i32],
        n: usize,
        j: usize,
        acc: &mut [A; W],
    ) {
        for (&c, &m) in self.col[range.clone()].iter().zip(&self.mag[range]) {
            let start = c as usize * n + j;
            let xs: &[i32; W] = xt[start..start + W]
                .try_into()
                .expect("slice of W elements");
            for (a, &x) in acc.iter_mut().zip(xs) {
                let v = L::apply(A::from_i32(x), m);
                if SUB {
                    *a -= v;
                } else {
                    *a += v;
                }
            }
        }
    }
}
