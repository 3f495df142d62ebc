//! Process-wide settings for CPU training, for binaries to apply at startup.
//!
//! Two process-wide defaults cost a training step more than any kernel left
//! to tune, and both belong to the process, not to a library call, so the
//! `qgrad` and `xtask` binaries apply them first thing in `main` through
//! [`prepare_cpu_training_process`]:
//!
//! - **Freed memory goes back to the OS.** candle allocates a fresh buffer for
//!   every op's output, and its backward pass adds every gradient contribution
//!   onto a freshly allocated zero tensor (`GradStore::or_insert`, then `add`).
//!   With glibc's defaults a buffer of 128 KiB or more is served by `mmap` and
//!   returned with `munmap` when freed (the threshold only adapts upward after
//!   such a free), and free memory at the top of the heap above 128 KiB is
//!   handed back with `brk`. A step therefore maps the same few megabytes anew
//!   every time, and the kernel faults in and zeroes every page again:
//!   `perf record` of a LeNet-300-100 step at batch 128 on one thread put 20 %
//!   of the time in page-fault handling and another 3 % in `brk`/`munmap`.
//!   [`retain_freed_memory`] serves every allocation from the heap and
//!   raises the trim threshold, so freed buffers stay in the process and the
//!   next step reuses them. A step needs the same buffers every time, so
//!   peak memory grows only by heap fragmentation (VGG-16 at batch 128: 980
//!   -> 1,004 MiB) while the step gets faster (`cargo xtask bench-train`:
//!   AlexNet 1.2k -> 1.3k images/s, VGG-16 59 -> 63, on top of the speed-ups
//!   below); memory freed after the peak stays mapped until the process
//!   exits, which suits a training process.
//! - **candle's own CPU thread pool spins.** candle 0.11 runs its elementwise
//!   ops on a barrier pool of `CANDLE_NUM_THREADS - 1` workers (default: all
//!   cores) that spin up to 25,000 times after every op before parking. The
//!   heavy work of a step (GEMMs, convolutions, batch norm) runs in this
//!   crate on rayon's pool, and there the spinning worker takes a core away:
//!   with 2 threads it held 19.5 % of a LeNet-300-100 profile. The remaining
//!   candle ops are memory-bound passes that gain little from a second thread.
//!   [`keep_candle_single_threaded`] sets `CANDLE_NUM_THREADS=1` unless the
//!   user chose a value. `cargo xtask bench-train --threads 2`: LeNet-300-100
//!   61k -> 72k images/s, LeNet-5 3.9k -> 4.4k, AlexNet 1.0k -> 1.12k,
//!   VGG-16 unchanged (57-58).

/// Free memory at the top of the heap that glibc keeps instead of returning
/// it (1 GiB: more than any step of the four networks frees at once).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD_BYTES: libc::c_int = 1 << 30;

/// Applies both settings of the module docs; call first thing in `main`,
/// before any thread starts. Returns what was applied.
pub fn prepare_cpu_training_process() -> ProcessSetup {
    ProcessSetup {
        retained_freed_memory: retain_freed_memory(),
        candle_single_threaded: keep_candle_single_threaded(),
    }
}

/// What [`prepare_cpu_training_process`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessSetup {
    /// glibc's thresholds were raised (false on other platforms).
    pub retained_freed_memory: bool,
    /// `CANDLE_NUM_THREADS` was set to 1 (false when the user had set it).
    pub candle_single_threaded: bool,
}

/// The variable candle reads, once, when its barrier pool first starts.
const CANDLE_THREADS_VAR: &str = "CANDLE_NUM_THREADS";

/// Sets `CANDLE_NUM_THREADS=1` unless it is already set (see the module
/// docs). Must run before the first candle op, and before other threads
/// exist: changing the environment races with threads that read it.
pub fn keep_candle_single_threaded() -> bool {
    if std::env::var_os(CANDLE_THREADS_VAR).is_some() {
        return false;
    }
    std::env::set_var(CANDLE_THREADS_VAR, "1");
    true
}

/// Keeps freed memory in the process for reuse by later training steps (see
/// the module docs).
/// Returns whether the settings were applied: true on glibc (Linux), false on
/// other platforms, whose allocators are left as they are.
pub fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it takes plain
        // integers and is safe to call at any time (glibc serialises it with
        // the arena locks).
        // M_MMAP_MAX 0: no allocation is served by mmap. Raising
        // M_MMAP_THRESHOLD instead stops at 32 MiB, and glibc maps requests
        // at or above it: VGG-16's largest activations (128·64·32·32 f32, 32
        // MiB exactly) then still cost 8 % of a step in page faults.
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) };
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
