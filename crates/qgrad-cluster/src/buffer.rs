//! Large working buffers backed by transparent huge pages where the system
//! offers them.
//!
//! Exact k-means on 15 M values works through about a gigabyte of fresh
//! buffers (prefix sums, two layers of costs, the split tables). With 4 KiB
//! pages the first touch of each page is a fault and every free a TLB
//! shootdown to the other threads: on the 2-vCPU VM where qgrad is measured
//! that took 0.45 s per GiB to fault in, more than the k-means arithmetic
//! itself. Linux's transparent huge pages in `madvise` mode (a common
//! default) back a region with 2 MiB pages only when asked, so the buffers
//! ask: `madvise(MADV_HUGEPAGE)` on the 2 MiB-aligned interior of the
//! allocation, before anything touches it. The advice changes no byte of
//! the data, only how the kernel maps it; where it is refused or the system
//! is not Linux nothing changes.

/// Regions smaller than this are not worth the advice (a huge page is
/// 2 MiB; a buffer needs several to gain).
const MIN_ADVISED_BYTES: usize = 8 << 20;

/// `len` zeros, in a buffer advised to huge pages when large, whose pages
/// are not touched until written.
///
/// `vec![0; len]` allocates through `alloc_zeroed`: a large block comes
/// straight from the kernel's zero pages, so only the pages a caller writes
/// are faulted in and cleared (the k-means solves each layer only on the
/// suffix a later layer reads). The advice comes before any touch.
pub(crate) fn zeroed<T: Zeroable>(len: usize) -> Vec<T> {
    let mut v: Vec<T> = vec![T::ZERO; len];
    advise_huge_pages(
        v.as_mut_ptr().cast::<u8>(),
        v.capacity() * std::mem::size_of::<T>(),
    );
    v
}

/// Element types whose zero is all-zero bytes, so that `vec![ZERO; n]`
/// takes the standard library's zeroed-allocation path.
pub(crate) trait Zeroable: Copy {
    const ZERO: Self;
}

impl Zeroable for f64 {
    const ZERO: Self = 0.0;
}

impl Zeroable for u32 {
    const ZERO: Self = 0;
}

impl Zeroable for f32 {
    const ZERO: Self = 0.0;
}

#[cfg(target_os = "linux")]
fn advise_huge_pages(start: *mut u8, bytes: usize) {
    const HUGE_PAGE: usize = 2 << 20;
    if bytes < MIN_ADVISED_BYTES {
        return;
    }
    let first = (start as usize).next_multiple_of(HUGE_PAGE);
    let end = (start as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: the range lies inside the allocation just made (first and
        // end are rounded inwards), and MADV_HUGEPAGE only advises how to map
        // it: it never changes or frees memory. A refusal (THP disabled, an
        // old kernel) leaves the ordinary pages, so the result is ignored.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages(_start: *mut u8, _bytes: usize) {}

#[cfg(test)]
mod tests {
    #[test]
    fn buffers_hold_what_was_asked() {
        for len in [0usize, 1, 1000, 3 << 20] {
            let z: Vec<f64> = super::zeroed(len);
            assert!(z.len() == len && z.iter().all(|&x| x.to_bits() == 0));
            let mut u: Vec<u32> = super::zeroed(len);
            assert!(u.len() == len && u.iter().all(|&x| x == 0));
            // Written after the advice, read back.
            u.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
            assert!(u.iter().enumerate().all(|(i, &x)| x == i as u32));
        }
    }
}
