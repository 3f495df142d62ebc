//! Integer inference straight from the compressed file.
//!
//! # Arithmetic
//! A tensor's fixed-point elements of width `b` have `f_b = b - 1 - e`
//! fractional bits (shared exponent `e`). [`SparseKernel`] brings them to one
//! scale, the largest `F = max f_b` of the tensor, by shifting each integer
//! left by `F - f_b` (at most 14 bits, so every weight still fits an `i32`).
//! Activations are [`FixedActivations`]: an `i32` per element and a number of
//! fractional bits `f_a` per row (sample). The inner loop is then a plain
//! integer multiply-add, and one output is
//!
//! ```text
//! y = acc · 2^-(F + f_a)  +  Σ_float w · x        (in f64, rounded to f32 once)
//! ```
//!
//! where `acc` is the exact integer sum over the fixed-point weights and the
//! second sum covers the width-32 (raw f32) weights, accumulated separately in
//! `f64`. The integer accumulator is chosen per call from a proven bound,
//! `max|w| · max|x| · max non-zeros per row`: integers carried in `f32` when
//! that is below `2^24` (every operand, product and partial sum is then an
//! integer f32 represents exactly, so no operation rounds, and the f32 units
//! are the widest multiply-add of the CPU: the common case of ≤ 8-bit
//! operands), `i32` below `2^31`, else `i64`, else `i128`, so the integer sum
//! never overflows. The result differs from the product of the dequantized
//! operands only by the single final rounding to `f32` ("one output rounding
//! step"), as long as `|acc| < 2^53` (always true for 16-bit weights and
//! activations with fewer than 2^22 non-zeros per row) and the tensor has no
//! f32 weights (whose f64 sum adds a rounding of relative size 2^-53).
//!
//! # Scaled tensors
//! A scaled tensor (codes `k`, `|k| <= n`, level function, scales per group;
//! FORMAT.md §7) is multiplied without multiplying by its levels' fractions.
//! Write `level(k) = sign(k) · L(|k|) / den` with the integer level `L` and
//! the denominator `den` ([`ScaledInfo::integer_level`],
//! [`ScaledInfo::denominator`]):
//!
//! | levels | `L(m)` (`m = |k| >= 1`) | `den` |
//! | --- | --- | --- |
//! | binary | 1 | 1 |
//! | linear, `n` (ternary: `n = 1`) | `m` | `n` |
//! | log, `n` | `2^(m-1)` | `2^(n-1)` |
//!
//! For one sample `b` (integers `q_c`, fractional bits `f_b`) and output row
//! `r`, and for each scale group `g` that row `r`'s elements belong to, the
//! kernel sums exactly, in integers,
//!
//! ```text
//! P_g = Σ_{c in row r ∩ group g, k_c > 0} L(|k_c|) · q_c
//! N_g = Σ_{c in row r ∩ group g, k_c < 0} L(|k_c|) · q_c
//! ```
//!
//! — for binary and ternary codes (`L = 1`) by adding and subtracting the
//! activations, for m-bit linear codes by an integer multiply, for log codes
//! by a shift — and then computes, in IEEE-754 binary64 with
//! round-to-nearest-even, over the groups `g` in ascending order:
//!
//! ```text
//! t = +0.0
//! one-sided:  for g:  t = t + f64(s_g) · f64(P_g - N_g)
//! two-sided:  for g:  t = t + f64(s⁺_g) · f64(P_g);  t = t - f64(s⁻_g) · f64(N_g)
//! y = f32( (t · 2^(-f_b)) / den )
//! ```
//!
//! (each `·`, `+`, `-`, `/` one f64 operation, `2^(-f_b)` exact, the last
//! step Rust's `as f32`, round to nearest even). With `G = 1` or `G = rows`
//! a row meets one group, so this is `y = f32(((f64(s) · f64(A)) · 2^-f_b) /
//! den)` with `A = P - N` one-sided, and `y = f32(((f64(s⁺)·f64(P) -
//! f64(s⁻)·f64(N)) · 2^-f_b) / den)` two-sided. A convolution is the same
//! with the `c·k·k` patch at each output position as the row of
//! activations (padding contributes `q = 0`).
//!
//! *Reproducing it.* The integers `P`, `N` (or `A`) are exact whatever the
//! order of summation, so another implementation (for instance an f64
//! evaluation that multiplies the integer matrices `sign(k)·L(|k|)`, split
//! by sign where two-sided, with the integer activations `q`) matches `y`
//! bit for bit as long as its own sums are exact, i.e. every
//! `Σ_c L(|k_c|)·|q_c| < 2^53` (for m-bit linear codes with `n <= 127` and
//! 16-bit activations: fewer than `2^31` elements per row) and it then
//! applies the formula above in the same order.
//!
//! *Accuracy.* The integer accumulator is chosen per call from the bound
//! `max_r Σ_row L(|k|) · max|q|`: `i32` below `2^31`, `i64` below `2^63`,
//! `i128` below `2^127`, so `P` and `N` never overflow (beyond `2^127`,
//! reachable only by log codes with `n` above about 80, the terms are summed
//! in f64, which rounds). When `|P|, |N| < 2^29` (the scale has 24
//! significant bits) the products are exact, and with one group per row
//! and one-sided scales so is `t`; `den` is a power of two except for
//! linear codes with `n` not one, so `y` is the exact product
//! `Σ s·level(k)·x` rounded once to f32 (where `t` or the division round,
//! they add a relative `2^-53`): within one output rounding step of the
//! exact product. For binary, ternary, log and linear `n = 2` codes every
//! level is a power of two, [`CompressedTensor::dequantize`] is exact, and
//! `y` is within one output rounding step of the f64 product of the
//! dequantized weights and [`FixedActivations::dequantize`]. For linear
//! codes with `n >= 3` `dequantize` rounds each weight `s·k/n` to f32
//! (relative `2^-23` at most, level and product) while the kernel keeps the
//! exact `s·|k|/n`, so against the dequantized product the difference is at
//! most one rounding step plus `2^-23 · Σ |w·x|`.
//!
//! [`ScaledInfo::integer_level`]: crate::ScaledInfo::integer_level
//! [`ScaledInfo::denominator`]: crate::ScaledInfo::denominator
//!
//! # Parallelism
//! Calls with fewer than `SERIAL_WORK` multiply-adds run serially (fork/join
//! costs more than they do). A single sample (mat-vec) runs over weight rows
//! with a gather from the activation row. A batch whose sums are exact in
//! `f64` (every file qgrad writes, fixed or scaled, at up to 16-bit
//! activations) runs in slices of 16 samples, in parallel over the slices:
//! each worker transposes its samples into an L1-sized `[cols][16]` block
//! and multiplies every row into it in f32 or f64 (`sliced`). Other batches
//! (hand-built activations wider than 2^24, sums past 2^53) are transposed
//! to `[cols][batch]` so that every non-zero weight updates a contiguous run
//! of accumulators (a vectorisable axpy), in parallel over weight rows and
//! in tiles of the batch. Convolution lowers the input with im2col into one
//! row of `c·k·k` patch values per output position and runs the batch
//! product over those rows, so each output has the bits of the one-sample
//! kernel on its patch (tested).

use rayon::prelude::*;

mod block;
mod conv;
mod scaled;
mod sliced;

use qgrad_fixed::{FixedFormat, FLOAT};

use crate::error::{CsrError, Result};
use crate::model::CompressedTensor;

/// Batch columns processed per tile (keeps the accumulators in L1/L2).
const TILE: usize = 256;
/// Batch columns kept in registers by the inner loop (4 AVX2 vectors of i32).
const REG_TILE: usize = 32;
/// Upper bound on the im2col buffer of one conv chunk, in elements.
const IM2COL_CHUNK_ELEMENTS: usize = 8 << 20;

/// Fixed-point activations: `values[r * cols + c]` means
/// `values[..] · 2^-frac_bits[r]`.
#[derive(Clone, Debug, PartialEq)]
pub struct FixedActivations {
    /// Integers, row-major.
    pub values: Vec<i32>,
    /// Rows (samples).
    pub rows: usize,
    /// Columns (features).
    pub cols: usize,
    /// Fractional bits, one per row.
    pub frac_bits: Vec<i32>,
}

impl FixedActivations {
    /// Quantizes `x` (`rows × cols`, row-major) to `bits`-bit (2..=16)
    /// fixed point with one exponent per row, `tensor_exponent(row)`, rounding
    /// to nearest (ties away from zero) as qgrad-fixed does.
    pub fn quantize(x: &[f32], rows: usize, cols: usize, bits: u8) -> Result<Self> {
        if !(qgrad_fixed::MIN_FIXED_BITS..=qgrad_fixed::MAX_FIXED_BITS).contains(&bits) {
            return Err(CsrError::InvalidOption(format!(
                "activation width {bits} bits: expected 2..=16"
            )));
        }
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| CsrError::ShapeMismatch(format!("{rows} × {cols} overflows")))?;
        if x.len() != n {
            return Err(CsrError::ShapeMismatch(format!(
                "{} activations given for {rows} rows × {cols} columns",
                x.len()
            )));
        }
        let mut values = vec![0i32; n];
        let mut frac_bits = vec![0i32; rows];
        let quantize_row = |(r, (q, f)): (usize, (&mut [i32], &mut i32))| -> Result<()> {
            let row = &x[r * cols..(r + 1) * cols];
            let e = qgrad_fixed::tensor_exponent(row)?;
            let format = FixedFormat::new(bits, e)?;
            *f = format.frac_bits();
            format.quantize_into(row, q);
            Ok(())
        };
        if n < PARALLEL_QUANTIZE || cols == 0 {
            for r in 0..rows {
                let q = &mut values[r * cols..(r + 1) * cols];
                quantize_row((r, (q, &mut frac_bits[r])))?;
            }
        } else {
            // Collected in row order, so the error reported is the first
            // row's, as in the serial loop.
            values
                .par_chunks_mut(cols)
                .zip(frac_bits.par_iter_mut())
                .enumerate()
                .map(quantize_row)
                .collect::<Vec<Result<()>>>()
                .into_iter()
                .collect::<Result<()>>()?;
        }
        Ok(Self {
            values,
            rows,
            cols,
            frac_bits,
        })
    }

    /// The values as `f32` (`q · 2^-f`, computed in f64 and rounded once).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.values.len());
        for r in 0..self.rows {
            let scale = pow2(-i64::from(self.frac_bits.get(r).copied().unwrap_or(0)));
            let row = self
                .values
                .get(r * self.cols..(r + 1) * self.cols)
                .unwrap_or(&[]);
            out.extend(row.iter().map(|&q| (f64::from(q) * scale) as f32));
        }
        out
    }

    fn validate(&self) -> Result<()> {
        let n = self.rows.checked_mul(self.cols).ok_or_else(|| {
            CsrError::ShapeMismatch(format!("{} × {} overflows", self.rows, self.cols))
        })?;
        if self.values.len() != n {
            return Err(CsrError::ShapeMismatch(format!(
                "activations hold {} values but declare {} rows × {} columns",
                self.values.len(),
                self.rows,
                self.cols
            )));
        }
        if self.frac_bits.len() != self.rows {
            return Err(CsrError::ShapeMismatch(format!(
                "activations have {} rows but {} frac_bits",
                self.rows,
                self.frac_bits.len()
            )));
        }
        Ok(())
    }
}

/// `2^k` in f64 (0 or infinity beyond the f64 range).
fn pow2(k: i64) -> f64 {
    2f64.powi(k.clamp(-2000, 2000) as i32)
}

/// `dst[c * rows + r] = src[r * cols + c]`.
fn transpose<T: Copy>(src: &[T], rows: usize, cols: usize, dst: &mut [T]) {
    transpose_with(src, rows, cols, dst, |v| v);
}

/// [`transpose`] with an element conversion on the way. Eight source rows at
/// a time: eight sequential read streams and one contiguous 8-element write
/// per column, with no per-element bounds checks.
fn transpose_with<T: Copy, U: Copy>(
    src: &[T],
    rows: usize,
    cols: usize,
    dst: &mut [U],
    convert: impl Fn(T) -> U,
) {
    const R: usize = 8;
    let src = &src[..rows * cols];
    let dst = &mut dst[..rows * cols];
    let mut r0 = 0;
    while r0 + R <= rows {
        let block: [&[T]; R] = std::array::from_fn(|k| &src[(r0 + k) * cols..(r0 + k + 1) * cols]);
        for (c, d) in dst.chunks_exact_mut(rows).enumerate() {
            let d: &mut [U; R] = (&mut d[r0..r0 + R]).try_into().expect("R elements");
            for k in 0..R {
                d[k] = convert(block[k][c]);
            }
        }
        r0 += R;
    }
    for r in r0..rows {
        for (c, &v) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            dst[c * rows + r] = convert(v);
        }
    }
}

/// `max |v|` (0 when empty).
fn max_abs(values: &[i32]) -> u64 {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { max_abs_avx2(values) };
        }
    }
    max_abs_body(values)
}

/// [`max_abs_body`] for AVX2, which has the unsigned 32-bit max that baseline
/// SSE2 lacks (there the scan costs as much as a sparse product).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn max_abs_avx2(values: &[i32]) -> u64 {
    max_abs_body(values)
}

#[inline(always)]
fn max_abs_body(values: &[i32]) -> u64 {
    u64::from(values.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0))
}

/// `out[j] = Σ_k vals[k] · xt[cols[k] · n + j]` for `j < out.len() <= n`, in
/// f32 (exact under the caller's bound, see [`SparseKernel::spmm_f32`]).
fn axpy_rows_f32(cols: &[u32], vals: &[i32], xt: &[f32], n: usize, out: &mut [f32]) {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { axpy_rows_f32_avx2(cols, vals, xt, n, out) };
            return;
        }
    }
    axpy_rows_f32_body(cols, vals, xt, n, out);
}

/// [`axpy_rows_f32_body`] compiled for AVX2 (the default target is baseline
/// x86-64, whose SSE2 vectors are half as wide).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn axpy_rows_f32_avx2(cols: &[u32], vals: &[i32], xt: &[f32], n: usize, out: &mut [f32]) {
    axpy_rows_f32_body(cols, vals, xt, n, out);
}

#[inline(always)]
fn axpy_rows_f32_body(cols: &[u32], vals: &[i32], xt: &[f32], n: usize, out: &mut [f32]) {
    let len = out.len();
    let mut j = 0;
    while j + F32_LANES <= len {
        axpy_block::<F32_LANES>(cols, vals, xt, n, j, &mut out[j..j + F32_LANES]);
        j += F32_LANES;
    }
    while j + 8 <= len {
        axpy_block::<8>(cols, vals, xt, n, j, &mut out[j..j + 8]);
        j += 8;
    }
    while j < len {
        axpy_block::<1>(cols, vals, xt, n, j, &mut out[j..j + 1]);
        j += 1;
    }
}

/// One block of `L` lanes starting at lane `j`: a fixed-size accumulator
/// array that stays in vector registers across all non-zeros of the row.
#[inline(always)]
fn axpy_block<const L: usize>(
    cols: &[u32],
    vals: &[i32],
    xt: &[f32],
    n: usize,
    j: usize,
    out: &mut [f32],
) {
    let mut acc = [0f32; L];
    for (&c, &v) in cols.iter().zip(vals) {
        let w = v as f32;
        let start = c as usize * n + j;
        let xs: &[f32; L] = xt[start..start + L]
            .try_into()
            .expect("slice of L elements");
        for (a, &x) in acc.iter_mut().zip(xs) {
            *a += w * x;
        }
    }
    out.copy_from_slice(&acc);
}

/// The kernel-ready form of a tensor, built once per tensor
/// ([`CompressedTensor::kernel`]): for a fixed tensor CSR with plain
/// `u32`/`i32` arrays, the fixed-point part at one common scale and the f32
/// part kept apart; for a scaled tensor the non-zero codes split by row,
/// scale group and sign ([`scaled`](self#scaled-tensors)).
#[derive(Clone, Debug)]
pub struct SparseKernel {
    inner: KernelImpl,
}

#[derive(Clone, Debug)]
enum KernelImpl {
    Fixed(FixedKernel),
    Scaled(scaled::ScaledKernel),
}

/// The kernel of a fixed tensor.
#[derive(Clone, Debug)]
struct FixedKernel {
    rows: usize,
    cols: usize,
    /// Fractional bits `F` of the common integer scale.
    frac_bits: i32,
    row_ptr: Vec<u32>,
    col: Vec<u32>,
    val: Vec<i32>,
    /// `val` as `f32` (exact: every `|v| < 2^15`), for the f32 kernels.
    val_f32: Vec<f32>,
    /// The largest index in `col` (0 when empty): what the sliced kernel's
    /// unchecked loads rely on.
    max_col: u32,
    max_abs_val: u64,
    max_row_nnz: u64,
    float_row_ptr: Vec<u32>,
    float_col: Vec<u32>,
    float_val: Vec<f32>,
}

/// Integer accumulator types the kernel may run with.
trait Acc: Copy + Default + Send + Sync + std::ops::AddAssign {
    fn from_i32(v: i32) -> Self;
    fn mul(a: Self, b: Self) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! impl_acc {
    ($t:ty) => {
        impl Acc for $t {
            #[inline(always)]
            fn from_i32(v: i32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn mul(a: Self, b: Self) -> Self {
                a * b
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
        }
    };
}
impl_acc!(i32);
impl_acc!(i64);
impl_acc!(i128);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccWidth {
    /// Integers carried in `f32`: exact because every operand, product and
    /// partial sum is an integer below `2^24` in magnitude.
    F32,
    I32,
    I64,
    I128,
}

/// Activations below which [`FixedActivations::quantize`] runs serially.
const PARALLEL_QUANTIZE: usize = 1 << 15;
/// Integers up to this magnitude are exactly representable in `f32`.
const F32_EXACT_BOUND: u128 = 1 << 24;
/// Integers up to this magnitude are exactly representable in `f64`.
const F64_EXACT_BOUND: u128 = 1 << 53;
/// Multiply-adds below which one call runs serially: rayon's fork/join costs
/// more than the work (and waits on descheduled workers on a busy machine).
const SERIAL_WORK: usize = 1 << 21;
/// Batch lanes accumulated in registers by the f32 axpy kernel (8 AVX2
/// vectors: enough independent chains to hide the add latency).
const F32_LANES: usize = 64;

impl SparseKernel {
    /// Builds the kernel form of a decoded tensor.
    pub fn from_tensor(t: &CompressedTensor) -> Self {
        let inner = match t.scaled_info() {
            Some(info) => KernelImpl::Scaled(scaled::ScaledKernel::from_tensor(t, info)),
            None => KernelImpl::Fixed(FixedKernel::from_tensor(t)),
        };
        SparseKernel { inner }
    }

    /// Output rows (weight rows).
    pub fn rows(&self) -> usize {
        match &self.inner {
            KernelImpl::Fixed(k) => k.rows,
            KernelImpl::Scaled(k) => k.rows(),
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        match &self.inner {
            KernelImpl::Fixed(k) => k.cols,
            KernelImpl::Scaled(k) => k.cols(),
        }
    }

    /// Fractional bits of the common integer scale of a fixed tensor's
    /// weights; 0 for a scaled tensor (its integers are the codes' levels,
    /// see [the module docs](self#scaled-tensors)).
    pub fn frac_bits(&self) -> i32 {
        match &self.inner {
            KernelImpl::Fixed(k) => k.frac_bits,
            KernelImpl::Scaled(_) => 0,
        }
    }

    /// `y[b, r] = Σ_c W[r, c] · x[b, c]`, returned row-major `[x.rows, self.rows]`.
    pub fn matmul(&self, x: &FixedActivations) -> Result<Vec<f32>> {
        x.validate()?;
        if x.cols != self.cols() {
            return Err(CsrError::ShapeMismatch(format!(
                "activations have {} columns but the weight matrix has {}",
                x.cols,
                self.cols()
            )));
        }
        match &self.inner {
            KernelImpl::Fixed(k) => k.matmul(x),
            KernelImpl::Scaled(k) => Ok(k.matmul(x)),
        }
    }
}

impl FixedKernel {
    fn from_tensor(t: &CompressedTensor) -> Self {
        let (row_ptr_all, col_all) = t.csr_parts();
        let widths = t.entry_widths();
        let max_fixed_width = widths.iter().copied().filter(|&w| w != FLOAT).max();
        let frac_bits = max_fixed_width.map_or(0, |w| i32::from(w) - 1 - t.exponent);
        let mut k = FixedKernel {
            rows: t.rows(),
            cols: t.cols(),
            frac_bits,
            row_ptr: Vec::with_capacity(t.rows() + 1),
            col: Vec::new(),
            val: Vec::new(),
            val_f32: Vec::new(),
            max_col: 0,
            max_abs_val: 0,
            max_row_nnz: 0,
            float_row_ptr: Vec::with_capacity(t.rows() + 1),
            float_col: Vec::new(),
            float_val: Vec::new(),
        };
        k.row_ptr.push(0);
        k.float_row_ptr.push(0);
        for r in 0..t.rows() {
            let start = k.val.len();
            for e in row_ptr_all[r] as usize..row_ptr_all[r + 1] as usize {
                match t.entry_int(e) {
                    Some(q) => {
                        // Shift by max width - own width (<= 14): |q << s| < 2^15.
                        let shift = max_fixed_width.map_or(0, |m| m - widths[e]);
                        let v = q << shift;
                        k.max_abs_val = k.max_abs_val.max(u64::from(v.unsigned_abs()));
                        k.col.push(col_all[e]);
                        k.val.push(v);
                        k.val_f32.push(v as f32);
                        k.max_col = k.max_col.max(col_all[e]);
                    }
                    None => {
                        k.float_col.push(col_all[e]);
                        k.float_val.push(f32::from_bits(t.raw_bits(e)));
                    }
                }
            }
            k.max_row_nnz = k.max_row_nnz.max((k.val.len() - start) as u64);
            k.row_ptr.push(k.val.len() as u32);
            k.float_row_ptr.push(k.float_val.len() as u32);
        }
        k
    }

    /// `max|w| · max|x| · max_row_nnz`: a bound on every partial sum.
    fn acc_bound(&self, max_abs_x: u64) -> u128 {
        u128::from(self.max_abs_val) * u128::from(max_abs_x) * u128::from(self.max_row_nnz)
    }

    fn acc_width(&self, max_abs_x: u64) -> AccWidth {
        let bound = self.acc_bound(max_abs_x);
        if bound < F32_EXACT_BOUND {
            AccWidth::F32
        } else if bound < 1 << 31 {
            AccWidth::I32
        } else if bound < 1 << 63 {
            AccWidth::I64
        } else {
            AccWidth::I128
        }
    }

    /// `y[b, r] = Σ_c W[r, c] · x[b, c]`; the caller checked the shapes.
    fn matmul(&self, x: &FixedActivations) -> Result<Vec<f32>> {
        let batch = x.rows;
        let max_abs_x = max_abs(&x.values);
        let width = self.acc_width(max_abs_x);
        if batch == 1 {
            let mut y = vec![0f32; self.rows];
            match width {
                // A gather is scalar either way; i32 needs no conversion of x.
                AccWidth::F32 | AccWidth::I32 => {
                    self.matvec::<i32>(&x.values, x.frac_bits[0], &mut y)
                }
                AccWidth::I64 => self.matvec::<i64>(&x.values, x.frac_bits[0], &mut y),
                AccWidth::I128 => self.matvec::<i128>(&x.values, x.frac_bits[0], &mut y),
            }
            return Ok(y);
        }
        let mut y = vec![0f32; batch * self.rows];
        // Every case qgrad writes (activations of up to 16 bits): slices of
        // samples whose activations stay near L1 (see `sliced`), with f32
        // accumulators for 8-bit-sized operands, f64 ones for 16-bit ones.
        if max_abs_x <= 1 << 24 {
            if width == AccWidth::F32 {
                self.matmul_sliced::<f32>(x, &mut y);
                return Ok(y);
            }
            if self.acc_bound(max_abs_x) < F64_EXACT_BOUND {
                self.matmul_sliced::<f64>(x, &mut y);
                return Ok(y);
            }
        }
        // Wider integers (activations built by hand): transpose to [cols][batch] so that each weight
        // updates a contiguous run. The transposes are serial and blocked:
        // they are cheap next to integer products this wide, and one parallel
        // phase per call (the product) avoids waiting on descheduled workers
        // more than once on a busy machine.
        let mut yt = vec![0f32; self.rows * batch];
        let mut xt = vec![0i32; x.values.len()];
        transpose(&x.values, batch, self.cols, &mut xt);
        self.spmm_t(&xt, batch, &x.frac_bits, max_abs_x, &mut yt);
        transpose(&yt, self.rows, batch, &mut y);
        Ok(y)
    }

    fn matvec<A: Acc>(&self, x: &[i32], frac: i32, y: &mut [f32]) {
        let scale = pow2(-(i64::from(self.frac_bits) + i64::from(frac)));
        let x_scale = pow2(-i64::from(frac));
        let row = |r: usize, out: &mut f32| {
            let mut acc = A::default();
            let (lo, hi) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            for (&c, &v) in self.col[lo..hi].iter().zip(&self.val[lo..hi]) {
                acc += A::mul(A::from_i32(v), A::from_i32(x[c as usize]));
            }
            let mut facc = 0f64;
            for k in self.float_row_ptr[r] as usize..self.float_row_ptr[r + 1] as usize {
                facc += f64::from(self.float_val[k])
                    * f64::from(x[self.float_col[k] as usize])
                    * x_scale;
            }
            *out = (acc.to_f64() * scale + facc) as f32;
        };
        if self.val.len() + self.float_val.len() < SERIAL_WORK {
            y.iter_mut().enumerate().for_each(|(r, out)| row(r, out));
        } else {
            y.par_iter_mut()
                .with_min_len(32)
                .enumerate()
                .for_each(|(r, out)| row(r, out));
        }
    }

    /// `yt[r][j] = Σ_c W[r, c] · xt[c][j]` for `n` columns `j` with
    /// fractional bits `col_frac[j]` (one per column).
    fn spmm_t(&self, xt: &[i32], n: usize, col_frac: &[i32], max_abs_x: u64, yt: &mut [f32]) {
        match self.acc_width(max_abs_x) {
            AccWidth::F32 => {
                let xf: Vec<f32> = xt.iter().map(|&v| v as f32).collect();
                self.spmm_f32(&xf, n, col_frac, yt)
            }
            AccWidth::I32 => self.spmm_t_with::<i32>(xt, n, col_frac, yt),
            AccWidth::I64 => self.spmm_t_with::<i64>(xt, n, col_frac, yt),
            AccWidth::I128 => self.spmm_t_with::<i128>(xt, n, col_frac, yt),
        }
    }

    /// [`Self::spmm_t`] for `acc_width == F32`: the integers of `xt` carried
    /// in `f32`. Exact: every operand, product and partial sum is an integer
    /// of magnitude `<= max|w| · max|x| · max_row_nnz < 2^24`, and f32
    /// represents all such integers, so no multiply or add ever rounds. The
    /// f32 units are the widest multiply-add the CPU has (8 lanes per AVX2
    /// instruction, no widening needed).
    fn spmm_f32(&self, xt: &[f32], n: usize, col_frac: &[i32], yt: &mut [f32]) {
        if n == 0 {
            return;
        }
        let scale: Vec<f64> = col_frac
            .iter()
            .map(|&f| pow2(-(i64::from(self.frac_bits) + i64::from(f))))
            .collect();
        let x_scale: Vec<f64> = col_frac.iter().map(|&f| pow2(-i64::from(f))).collect();
        let row = |r: usize, out: &mut [f32]| {
            let (lo, hi) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
            let wvals: &[i32] = &self.val[lo..hi];
            let cols = &self.col[lo..hi];
            axpy_rows_f32(cols, wvals, xt, n, out);
            let (flo, fhi) = (
                self.float_row_ptr[r] as usize,
                self.float_row_ptr[r + 1] as usize,
            );
            if flo == fhi {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = (f64::from(*o) * scale[j]) as f32;
                }
            } else {
                // Rare: width-32 weights, summed in f64 per column.
                for (j, o) in out.iter_mut().enumerate() {
                    let mut facc = 0f64;
                    for k in flo..fhi {
                        facc += f64::from(self.float_val[k])
                            * f64::from(xt[self.float_col[k] as usize * n + j])
                            * x_scale[j];
                    }
                    *o = (f64::from(*o) * scale[j] + facc) as f32;
                }
            }
        };
        if (self.val.len() + self.float_val.len()).saturating_mul(n) < SERIAL_WORK {
            yt.chunks_mut(n)
                .enumerate()
                .for_each(|(r, out)| row(r, out));
        } else {
            yt.par_chunks_mut(n)
                .enumerate()
                .for_each(|(r, out)| row(r, out));
        }
    }

    fn spmm_t_with<A: Acc>(&self, xt: &[i32], n: usize, col_frac: &[i32], yt: &mut [f32]) {
        if n == 0 {
            return;
        }
        let scale: Vec<f64> = col_frac
            .iter()
            .map(|&f| pow2(-(i64::from(self.frac_bits) + i64::from(f))))
            .collect();
        let x_scale: Vec<f64> = col_frac.iter().map(|&f| pow2(-i64::from(f))).collect();
        yt.par_chunks_mut(n).enumerate().for_each_init(
            || (vec![A::default(); TILE], vec![0f64; TILE]),
            |(acc, facc), (r, out)| {
                for j0 in (0..n).step_by(TILE) {
                    let len = TILE.min(n - j0);
                    let acc = &mut acc[..len];
                    let facc = &mut facc[..len];
                    facc.fill(0.0);
                    let (lo, hi) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                    let (cols, vals) = (&self.col[lo..hi], &self.val[lo..hi]);
                    // Full register tiles first: a fixed-size accumulator array
                    // stays in vector registers across all non-zeros of the row.
                    let mut j = 0;
                    while j + REG_TILE <= len {
                        let mut regs = [A::default(); REG_TILE];
                        for (&c, &v) in cols.iter().zip(vals) {
                            let w = A::from_i32(v);
                            let start = c as usize * n + j0 + j;
                            let xs: &[i32; REG_TILE] = xt[start..start + REG_TILE]
                                .try_into()
                                .expect("slice of REG_TILE elements");
                            for (a, &xv) in regs.iter_mut().zip(xs) {
                                *a += A::mul(w, A::from_i32(xv));
                            }
                        }
                        acc[j..j + REG_TILE].copy_from_slice(&regs);
                        j += REG_TILE;
                    }
                    if j < len {
                        let rest = &mut acc[j..len];
                        let rest_len = rest.len();
                        rest.fill(A::default());
                        for (&c, &v) in cols.iter().zip(vals) {
                            let w = A::from_i32(v);
                            let start = c as usize * n + j0 + j;
                            for (a, &xv) in rest.iter_mut().zip(&xt[start..start + rest_len]) {
                                *a += A::mul(w, A::from_i32(xv));
                            }
                        }
                    }
                    for k in self.float_row_ptr[r] as usize..self.float_row_ptr[r + 1] as usize {
                        let w = f64::from(self.float_val[k]);
                        let start = self.float_col[k] as usize * n + j0;
                        for (j, (a, &xv)) in
                            facc.iter_mut().zip(&xt[start..start + len]).enumerate()
                        {
                            *a += w * f64::from(xv) * x_scale[j0 + j];
                        }
                    }
                    for j in 0..len {
                        out[j0 + j] = (acc[j].to_f64() * scale[j0 + j] + facc[j]) as f32;
                    }
                }
            },
        );
    }
}

impl CompressedTensor {
    /// `y[b, r] = Σ_c W[r, c] · x[b, c]` with integer accumulation (see the
    /// module docs), row-major `[x.rows, self.rows()]`.
    pub fn matmul(&self, x: &FixedActivations) -> Result<Vec<f32>> {
        self.kernel().matmul(x)
    }

    /// Convolution with this tensor as the weight `[o, c, kernel, kernel]`
    /// (im2col + the same integer kernel). `x` rows are samples of
    /// `input = [c, h, w]`. Returns `[samples, o, oh, ow]` and `[o, oh, ow]`.
    pub fn conv2d(
        &self,
        x: &FixedActivations,
        input: [usize; 3],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<(Vec<f32>, [usize; 3])> {
        let expected = [self.rows(), input[0], kernel, kernel];
        if self.shape.as_slice() != expected.as_slice() {
            return Err(CsrError::ShapeMismatch(format!(
                "conv2d weight `{}` has shape {:?}, expected {:?} ([o, c, k, k])",
                self.name, self.shape, expected
            )));
        }
        self.kernel().conv2d(x, input, kernel, stride, padding)
    }
}
