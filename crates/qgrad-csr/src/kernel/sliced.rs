//! The batch product of a fixed tensor in slices of [`SLICE`] samples, for
//! every tensor whose integer sums are exact in `f64` (all of the 8- and
//! 16-bit cases qgrad writes).
//!
//! Why slices: the transposed kernel ([`FixedKernel::spmm_t`]) streams every
//! non-zero's run of batch activations from a `[cols][batch]` copy of the
//! input, which at batch 128 is 400 KB for a 784-column layer: each
//! multiply-add then waits on the L2 cache, and the two transposes and the
//! zeroed buffers around it cost as much again. Here each task gathers its
//! own `SLICE` samples into a `[cols][SLICE]` block of `f32` (50 KB at 784
//! columns, next to L1 for the whole pass over the weights; by 8×8 AVX2
//! transposes), multiplies it by every row with one vector multiply-add per
//! non-zero and lane group, and writes its samples' outputs straight into
//! `y` (by 8×8 transposes again): no batch-wide transposes and no
//! allocation per call beyond `y` itself (the blocks are per worker).
//!
//! Exactness: the activations are integers of magnitude at most 2^24
//! (checked by the caller), so `f32` holds them exactly. The accumulator is
//! `f32` when `max|w| · max|x| · max_row_nnz < 2^24` (8-bit operands: the
//! widest multiply-add of the CPU), else `f64` when that bound is below
//! 2^53 (16-bit activations). Every operand, product and partial sum is then
//! an integer the accumulator represents exactly, so neither the order of
//! the sums ([`UNROLL`] accumulators per row) nor a fused multiply-add
//! changes any bit, and each output is the module's formula
//! `f32(acc · 2^-(F + f_b))` (plus the f64 sum of the f32 weights).

use rayon::prelude::*;

use super::{pow2, FixedActivations, FixedKernel, SERIAL_WORK};

/// An accumulator type of the sliced kernel: `f32` or `f64`.
pub(super) trait Lane: Copy + Default + Send + Sync {
    /// The accumulator's form of an `f32` weight or scale (exact).
    fn from_f32(v: f32) -> Self;
    /// `self + w · x` (fused where `FUSED`).
    fn madd<const FUSED: bool>(self, w: Self, x: f32) -> Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    fn to_f64(self) -> f64;
    /// The output rounding, `self as f32`.
    fn to_f32(self) -> f32;
    /// The scale `2^exponent` in this type, where multiplying an exact
    /// integer by it here gives the same bits as the module's f64 formula
    /// rounded to f32; `None` where it does not.
    fn output_scale(exponent: i64) -> Option<Self>;
}

impl Lane for f32 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn madd<const FUSED: bool>(self, w: Self, x: f32) -> Self {
        if FUSED {
            w.mul_add(x, self)
        } else {
            self + w * x
        }
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self + other
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self - other
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        self * other
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    /// A normal f32 power of two: the f32 product of an exact integer and it
    /// is the correctly rounded `acc · 2^e`, the f64 product rounded once.
    fn output_scale(exponent: i64) -> Option<Self> {
        (-126..=127)
            .contains(&exponent)
            .then(|| pow2(exponent) as f32)
    }
}

impl Lane for f64 {
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f64::from(v)
    }
    #[inline(always)]
    fn madd<const FUSED: bool>(self, w: Self, x: f32) -> Self {
        let x = f64::from(x);
        if FUSED {
            w.mul_add(x, self)
        } else {
            self + w * x
        }
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self + other
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self - other
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        self * other
    }
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    /// The module's formula itself: `f64(acc) · 2^e`, then `as f32`.
    fn output_scale(exponent: i64) -> Option<Self> {
        Some(pow2(exponent))
    }
}

/// Samples per slice: two AVX2 vectors (one AVX-512 vector) of `f32`, so
/// that each non-zero's index, broadcast and address serve two multiply-adds.
pub(super) const SLICE: usize = 16;
/// Independent accumulators per row: enough chains in flight to cover the
/// multiply-add latency and the loads behind it.
const UNROLL: usize = 8;

/// Per-worker buffers: the gathered activations `[cols][SLICE]`, the
/// accumulators `[rows][SLICE]`, the rounded outputs `[rows][SLICE]` and a
/// zero row for the lanes past the batch.
#[derive(Default)]
struct SliceBuffers<T> {
    xs: Vec<f32>,
    acc: Vec<T>,
    out: Vec<f32>,
    zeros: Vec<i32>,
}

impl FixedKernel {
    /// `y[b, r] = Σ_c W[r, c] · x[b, c]` with accumulator `T`, which the
    /// caller chose from the bound (see the module docs); every `|x| <=
    /// 2^24`. `y` is `[x.rows][self.rows]`.
    pub(super) fn matmul_sliced<T: Lane>(&self, x: &FixedActivations, y: &mut [f32]) {
        let rows = self.rows;
        if rows == 0 || x.rows == 0 {
            return;
        }
        let chunk = SLICE * rows;
        let work = (self.val.len() + self.float_val.len()).saturating_mul(x.rows);
        let run = |bufs: &mut SliceBuffers<T>, (s, ys): (usize, &mut [f32])| {
            self.slice(x, s * SLICE, ys, bufs)
        };
        if work < SERIAL_WORK {
            let mut bufs = SliceBuffers::default();
            y.chunks_mut(chunk)
                .enumerate()
                .for_each(|item| run(&mut bufs, item));
        } else {
            y.par_chunks_mut(chunk)
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
        bufs: &mut SliceBuffers<T>,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        let lanes = ys.len() / rows;
        bufs.xs.resize(cols * SLICE, 0.0);
        bufs.acc.resize(rows * SLICE, T::default());
        bufs.zeros.resize(cols, 0);
        let sample: [&[i32]; SLICE] = std::array::from_fn(|l| {
            if l < lanes {
                &x.values[(b0 + l) * cols..(b0 + l + 1) * cols]
            } else {
                &bufs.zeros[..]
            }
        });
        gather_slice(&sample, cols, &mut bufs.xs);
        // The output scale `2^-(F + f_b)` of each sample, applied in the
        // kernel where `T` gives the formula's bits with it (see
        // `Lane::output_scale`) and the tensor has no f32 weights; otherwise
        // the f64 formula below.
        let exponent = |l: usize| -(i64::from(self.frac_bits) + i64::from(x.frac_bits[b0 + l]));
        let scales: [Option<T>; SLICE] = std::array::from_fn(|l| {
            if l < lanes {
                T::output_scale(exponent(l))
            } else {
                Some(T::from_f32(1.0))
            }
        });
        let in_kernel = self.float_val.is_empty() && scales.iter().all(Option::is_some);
        let lane_scale: [T; SLICE] = std::array::from_fn(|l| match scales[l] {
            Some(s) if in_kernel => s,
            _ => T::from_f32(1.0),
        });
        axpy_slice(self, &bufs.xs, &lane_scale, &mut bufs.acc);
        if in_kernel {
            bufs.out.clear();
            bufs.out.extend(bufs.acc.iter().map(|a| a.to_f32()));
            scatter_slice(&bufs.out, rows, ys);
            return;
        }
        for (l, yrow) in ys.chunks_exact_mut(rows).enumerate() {
            let frac = i64::from(x.frac_bits[b0 + l]);
            let scale = pow2(exponent(l));
            let x_scale = pow2(-frac);
            for (r, out) in yrow.iter_mut().enumerate() {
                let acc = bufs.acc[r * SLICE + l].to_f64() * scale;
                let (flo, fhi) = (
                    self.float_row_ptr[r] as usize,
                    self.float_row_ptr[r + 1] as usize,
                );
                *out = if flo == fhi {
                    acc as f32
                } else {
                    // Rare: width-32 weights, summed in f64 as the other
                    // kernels do, in the order of the row.
                    let mut facc = 0f64;
                    for k in flo..fhi {
                        facc += f64::from(self.float_val[k])
                            * f64::from(sample[l][self.float_col[k] as usize])
                            * x_scale;
                    }
                    (acc + facc) as f32
                };
            }
        }
    }
}

/// `xs[c][l] = sample[l][c] as f32` for every column `c < cols`: the
/// transposition into a slice, with AVX2 8×8 block transposes where the CPU
/// has AVX2 (about a third of the instructions of the element loop, which
/// took a quarter of a batch-128 call).
pub(super) fn gather_slice(sample: &[&[i32]; SLICE], cols: usize, xs: &mut [f32]) {
    assert!(sample.iter().all(|s| s.len() >= cols) && xs.len() >= cols * SLICE);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above; the lengths
            // were checked on entry.
            done = unsafe { gather_slice_avx2(sample, cols, xs) };
        }
    }
    for c in done..cols {
        for (l, s) in sample.iter().enumerate() {
            xs[c * SLICE + l] = s[c] as f32;
        }
    }
}

/// The AVX2 part of [`gather_slice`]: whole blocks of 8 columns; returns how
/// many columns it wrote.
///
/// # Safety
/// The CPU must support AVX2, every `sample[l]` must hold at least `cols`
/// values and `xs` at least `cols · SLICE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gather_slice_avx2(sample: &[&[i32]; SLICE], cols: usize, xs: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let blocks = cols / 8;
    for b in 0..blocks {
        let c0 = b * 8;
        for half in 0..SLICE / 8 {
            // SAFETY: c0 + 8 <= cols <= sample[l].len() (the caller's bound).
            let r: [__m256; 8] = std::array::from_fn(|i| unsafe {
                let p = sample[half * 8 + i].as_ptr().add(c0).cast::<__m256i>();
                _mm256_cvtepi32_ps(_mm256_loadu_si256(p))
            });
            let out = transpose_8x8(r);
            for (i, v) in out.into_iter().enumerate() {
                // SAFETY: (c0 + i) · SLICE + half · 8 + 8 <= cols · SLICE
                // <= xs.len().
                unsafe {
                    let p = xs.as_mut_ptr().add((c0 + i) * SLICE + half * 8);
                    _mm256_storeu_ps(p, v);
                }
            }
        }
    }
    blocks * 8
}

/// The 8×8 transpose of `r` (row `i` of the result holds element `i` of
/// every input vector).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose_8x8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// `ys[l][r] = acc[r][l]` for the slice's `ys.len() / rows` lanes: the
/// transposition out of a slice, by 8×8 blocks where the CPU has AVX2.
pub(super) fn scatter_slice(acc: &[f32], rows: usize, ys: &mut [f32]) {
    let lanes = ys.len() / rows;
    assert!(acc.len() >= rows * SLICE && lanes <= SLICE);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above; the lengths
            // were checked on entry.
            done = unsafe { scatter_slice_avx2(acc, rows, ys) };
        }
    }
    for (l, yrow) in ys.chunks_exact_mut(rows).enumerate() {
        for r in done..rows {
            yrow[r] = acc[r * SLICE + l];
        }
    }
}

/// The AVX2 part of [`scatter_slice`]: whole blocks of 8 rows; returns how
/// many rows it wrote.
///
/// # Safety
/// The CPU must support AVX2, `acc` must hold `rows · SLICE` values and
/// `ys.len() / rows <= SLICE`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scatter_slice_avx2(acc: &[f32], rows: usize, ys: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let lanes = ys.len() / rows;
    let blocks = rows / 8;
    for b in 0..blocks {
        let r0 = b * 8;
        for half in 0..lanes.div_ceil(8) {
            // SAFETY: (r0 + i) · SLICE + half · 8 + 8 <= rows · SLICE.
            let v: [__m256; 8] = std::array::from_fn(|i| unsafe {
                _mm256_loadu_ps(acc.as_ptr().add((r0 + i) * SLICE + half * 8))
            });
            let out = transpose_8x8(v);
            for (j, o) in out.into_iter().enumerate() {
                let l = half * 8 + j;
                if l < lanes {
                    // SAFETY: l < lanes, so l · rows + r0 + 8 <= ys.len().
                    unsafe { _mm256_storeu_ps(ys.as_mut_ptr().add(l * rows + r0), o) };
                }
            }
        }
    }
    blocks * 8
}

/// `acc[r][l] = scale[l] · Σ_k val[k] · xs[col[k]][l]` over row `r`'s
/// non-zeros, for every row, with the AVX2 and FMA units where the CPU has
/// them.
fn axpy_slice<T: Lane>(k: &FixedKernel, xs: &[f32], scale: &[T; SLICE], acc: &mut [T]) {
    // What makes the unchecked loads in the body sound: every column index
    // of the kernel is at most `max_col`, fixed when it was built.
    assert!(
        k.val_f32.is_empty() || (k.max_col as usize + 1) * SLICE <= xs.len(),
        "activation slice shorter than the weight's columns"
    );
    assert_eq!(acc.len(), k.rows * SLICE, "accumulators for every row");
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            unsafe { axpy_slice_avx512(k, xs, scale, acc) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            unsafe { axpy_slice_avx2_fma(k, xs, scale, acc) };
            return;
        }
    }
    axpy_slice_body::<T, false>(k, xs, scale, acc);
}

/// [`axpy_slice_body`] compiled for AVX2 with fused multiply-adds.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_slice_avx2_fma<T: Lane>(
    k: &FixedKernel,
    xs: &[f32],
    scale: &[T; SLICE],
    acc: &mut [T],
) {
    axpy_slice_body::<T, true>(k, xs, scale, acc);
}

/// [`axpy_slice_body`] compiled for AVX-512: a slice is one vector, so each
/// non-zero costs one multiply-add instruction instead of two.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_slice_avx512<T: Lane>(
    k: &FixedKernel,
    xs: &[f32],
    scale: &[T; SLICE],
    acc: &mut [T],
) {
    axpy_slice_body::<T, true>(k, xs, scale, acc);
}

/// `acc[r][l] = scale[l] · Σ_k val[k] · xs[col[k]][l]` for every row. The
/// caller checked that every `col[k] · SLICE + SLICE <= xs.len()`.
#[inline(always)]
fn axpy_slice_body<T: Lane, const FUSED: bool>(
    k: &FixedKernel,
    xs: &[f32],
    scale: &[T; SLICE],
    acc: &mut [T],
) {
    for (r, out) in acc.chunks_exact_mut(SLICE).enumerate() {
        let (lo, hi) = (k.row_ptr[r] as usize, k.row_ptr[r + 1] as usize);
        // SAFETY: the caller's bound on every column of the kernel.
        let sum = unsafe { dot_slice::<T, FUSED>(&k.col[lo..hi], &k.val_f32[lo..hi], xs) };
        for ((o, s), &f) in out.iter_mut().zip(sum).zip(scale) {
            *o = s.mul(f);
        }
    }
}

/// `Σ_k vals[k] · xs[cols[k]][l]` for the `SLICE` lanes `l`, with
/// [`UNROLL`] independent accumulators to hide the multiply-add latency.
/// `FUSED` picks `mul_add` (one instruction where FMA is enabled, a slow
/// library call where it is not); the results are the same either way (see
/// the module docs).
///
/// # Safety
/// Every `cols[k] · SLICE + SLICE <= xs.len()`.
#[inline(always)]
pub(super) unsafe fn dot_slice<T: Lane, const FUSED: bool>(
    cols: &[u32],
    vals: &[f32],
    xs: &[f32],
) -> [T; SLICE] {
    #[inline(always)]
    unsafe fn madd<T: Lane, const FUSED: bool>(a: &mut [T; SLICE], w: T, xs: &[f32], c: u32) {
        let start = c as usize * SLICE;
        debug_assert!(start + SLICE <= xs.len());
        // SAFETY: `start + SLICE <= xs.len()` (the caller's bound), so the
        // SLICE floats from `start` are in bounds; `[f32; SLICE]` has the
        // alignment of `f32`.
        let x: &[f32; SLICE] = unsafe { &*xs.as_ptr().add(start).cast::<[f32; SLICE]>() };
        for (a, &x) in a.iter_mut().zip(x) {
            *a = a.madd::<FUSED>(w, x);
        }
    }
    let mut a = [[T::default(); SLICE]; UNROLL];
    let mut cc = cols.chunks_exact(UNROLL);
    let mut vv = vals.chunks_exact(UNROLL);
    for (cu, vu) in (&mut cc).zip(&mut vv) {
        for u in 0..UNROLL {
            // SAFETY: the caller's bound.
            unsafe { madd::<T, FUSED>(&mut a[u], T::from_f32(vu[u]), xs, cu[u]) };
        }
    }
    for (u, (&c, &v)) in cc.remainder().iter().zip(vv.remainder()).enumerate() {
        // SAFETY: the caller's bound.
        unsafe { madd::<T, FUSED>(&mut a[u], T::from_f32(v), xs, c) };
    }
    let mut sum = [T::default(); SLICE];
    for (l, s) in sum.iter_mut().enumerate() {
        for acc in &a {
            *s = s.add(acc[l]);
        }
    }
    sum
}
