//! Per-thread scratch buffers that live across calls and training steps.
//!
//! im2col matrices are the largest temporaries of a convolution (up to tens of
//! MB for VGG-16). Allocating them per call means fresh pages from the kernel,
//! zeroed on first touch, every step; keeping one growing buffer per worker
//! thread avoids both the page faults and the allocator churn. Rayon's workers
//! are long-lived, so the buffers are reused step after step.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch slice of exactly `len` values (contents
/// unspecified: callers overwrite what they read).
///
/// Re-entrant: a thread that waits inside a parallel GEMM may be handed
/// another chunk of the same op by rayon's work stealing; the nested call then
/// finds the buffer in use and works on a fresh allocation instead.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => {
            let mut fresh = vec![0.0; len];
            f(&mut fresh)
        }
    })
}
