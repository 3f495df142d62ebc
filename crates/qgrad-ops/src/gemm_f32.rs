//! A safe, bounds-checked front end to the `gemm` crate for row-major f32
//! matrices, plus the threading policy every op shares.
//!
//! Every matrix operand is described by a [`MatRef`]: a slice and the strides
//! of its rows and columns, so that a transposed operand is just a view with
//! swapped strides and no copy. The wrapper checks that every element the
//! product touches lies inside its slice before calling the unsafe kernel;
//! with `workers` (shared output buffers of a recurrence's team), this is
//! one of the two places in the crate that use `unsafe`.

use gemm::Parallelism;

use crate::OpsError;

/// A read-only strided matrix view: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn max_index(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return None;
        }
        Some((self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride)
    }
}

/// How a product is threaded. Work below this many multiply-adds runs on the
/// calling thread: rayon's fork/join costs a few microseconds, which is more
/// than a small product takes, and the ops already parallelise over the batch
/// where they can (that is why 2 threads were slower than 1 for the MLP).
const PARALLEL_GEMM_MIN_MACS: usize = 1 << 21;

/// The parallelism to use for an `m × k × n` product that is not already
/// inside a parallel region.
pub(crate) fn parallelism_for(m: usize, n: usize, k: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    let macs = m.saturating_mul(n).saturating_mul(k);
    if threads > 1 && macs >= PARALLEL_GEMM_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` with `accumulate`), `dst` a
/// contiguous row-major `lhs.rows × rhs.cols` matrix.
pub(crate) fn matmul(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    parallelism: Parallelism,
) -> Result<(), OpsError> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        return Err(OpsError::Internal(format!(
            "matmul inner dimensions differ: {m}x{k} times {}x{n}",
            rhs.rows
        )));
    }
    if dst.len() != m * n {
        return Err(OpsError::Internal(format!(
            "matmul destination holds {} values, the product has {m}x{n}",
            dst.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return Ok(());
    }
    for (name, view) in [("left", lhs), ("right", rhs)] {
        match view.max_index() {
            Some(max) if max < view.data.len() => {}
            _ => {
                return Err(OpsError::Internal(format!(
                    "matmul {name} operand view {}x{} (strides {}, {}) exceeds its {} values",
                    view.rows,
                    view.cols,
                    view.row_stride,
                    view.col_stride,
                    view.data.len()
                )))
            }
        }
    }
    // SAFETY: every index the kernel reads or writes was checked above: dst is
    // exactly m×n row-major, and both operand views stay inside their slices.
    // The slices outlive the call and dst does not alias the operands (it is a
    // unique borrow).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}
