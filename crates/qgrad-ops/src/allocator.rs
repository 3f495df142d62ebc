//! Process-wide allocator settings for training.
//!
//! candle allocates a fresh buffer for every op's output, and its backward
//! pass adds every gradient contribution onto a freshly allocated zero tensor
//! (`GradStore::or_insert`, then `add`). With glibc's defaults a buffer of
//! 128 KiB or more is served by `mmap` and returned with `munmap` when freed
//! (the threshold only adapts upward after such a free), and free memory at
//! the top of the heap above 128 KiB is handed back with `brk`. A training
//! step therefore maps the same few megabytes anew every step, and the kernel
//! faults in and zeroes every page again: `perf record` of a LeNet-300-100
//! step at batch 128 on one thread put 20 % of the time in page-fault
//! handling and another 3 % in `brk`/`munmap`.
//!
//! [`retain_freed_memory`] raises both thresholds so that freed buffers stay
//! in the process and the next step reuses them. Peak memory does not grow
//! (the step needs the same buffers each time); memory freed after the peak
//! stays mapped until the process exits, which suits a training or benchmark
//! process and is why this is a call for binaries to make, not something the
//! ops do behind a library user's back.

/// Largest `M_MMAP_THRESHOLD` glibc accepts on 64-bit targets (32 MiB):
/// buffers up to this size come from the heap and are reused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_BYTES: libc::c_int = 32 << 20;

/// Free memory at the top of the heap that glibc keeps instead of returning
/// it (1 GiB: more than any step of the four networks frees at once).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: libc::c_int = 1 << 30;

/// Keeps freed memory in the process for reuse by later training steps (see
/// the module docs). Call once, early in `main`, before threads start.
/// Returns whether the settings were applied: true on glibc (Linux), false on
/// other platforms, whose allocators are left as they are.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes plain
        // integers and is safe to call at any time (glibc serialises it with
        // the arena locks).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) };
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) };
        // mallopt returns 1 on success.
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn settings_are_accepted_on_glibc() {
        let applied = super::retain_freed_memory();
        assert_eq!(applied, cfg!(all(target_os = "linux", target_env = "gnu")));
        // Allocation still works, large and small, after the change.
        let big = vec![1.0f32; 10 << 20];
        let small: Vec<u8> = (0..100).collect();
        assert_eq!(big.iter().sum::<f32>(), (10 << 20) as f32);
        assert_eq!(small.len(), 100);
    }
}
