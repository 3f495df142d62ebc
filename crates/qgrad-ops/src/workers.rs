//! Persistent workers for a recurrence: a fixed team of threads that runs a
//! whole sequence, meeting at a spin barrier once or a few times per step.
//!
//! Why not rayon's fork/join per step: an LSTM step at hidden 256 and batch
//! 64 is about 0.3 ms of arithmetic, split into a GEMM and two element-wise
//! passes. Forking and joining each of them (three times per step, 100 steps
//! per sequence, forward and backward) parked and woke rayon's workers so
//! often that `perf record` of a training step put 11 % of the time in the
//! kernel's scheduler (`sched_yield`, futex waits and wake-ups). A team that
//! lives for the whole sequence and waits by spinning costs a few hundred
//! nanoseconds per barrier instead. rayon (and std) have no spin barrier;
//! `std::sync::Barrier` parks on a futex, which is what we are avoiding.
//!
//! The team is made of scoped OS threads, not rayon tasks: every member must
//! run at the same time, or the first barrier never opens, and rayon does not
//! promise that two spawned tasks run concurrently (a one-thread pool, or a
//! pool busy elsewhere, runs them one after the other). A waiter spins for a
//! while and then yields its core, so a team larger than the free cores (the
//! test harness runs tests side by side) still makes progress.
//!
//! This module and `gemm_f32` are the crate's only `unsafe` code: the team
//! writes disjoint parts of shared output buffers ([`SharedBuf`]).

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::OpsError;

/// Spins before a waiter starts yielding its core (about 10-50 µs).
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

/// A reusable barrier for a fixed team that waits by spinning, and that any
/// member can abort (an error, or a panic) so that the others stop waiting.
pub(crate) struct SpinBarrier {
    members: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    aborted: AtomicBool,
}

/// The team was aborted by one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Aborted;

impl SpinBarrier {
    pub fn new(members: usize) -> Self {
        SpinBarrier {
            members: members.max(1),
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
        }
    }

    /// Waits until every member has arrived. Everything a member wrote
    /// before its `wait` is visible to every member after it (the last
    /// arrival acquires all the others' releases through `arrived`, then
    /// releases them all through `generation`).
    pub fn wait(&self) -> Result<(), Aborted> {
        if self.aborted.load(Ordering::Acquire) {
            return Err(Aborted);
        }
        if self.members == 1 {
            return Ok(());
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.members {
            // Nobody can arrive again before the generation moves on.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.aborted.load(Ordering::Acquire) {
                return Err(Aborted);
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Makes every current and future `wait` return [`Aborted`].
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::Release);
    }
}

/// Aborts the team if its member unwinds (a bug): the others then return
/// instead of spinning forever, and the scope re-raises the panic.
struct AbortOnPanic<'a>(&'a SpinBarrier);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort();
        }
    }
}

/// Runs `work(member, barrier)` on `members` threads at once (the calling
/// thread is member 0) and returns their results in member order. A member
/// that returns an error aborts the barrier, so the others stop at their
/// next `wait`; the error returned is the first member's to fail, not the
/// [`Aborted`] its teammates saw.
pub(crate) fn run_team<T, F>(members: usize, work: F) -> Result<Vec<T>, OpsError>
where
    T: Send,
    F: Fn(usize, &SpinBarrier) -> Result<T, OpsError> + Sync,
{
    let members = members.max(1);
    let barrier = SpinBarrier::new(members);
    let first_failure = AtomicUsize::new(usize::MAX);
    let run = |member: usize| {
        let _guard = AbortOnPanic(&barrier);
        let out = work(member, &barrier);
        if out.is_err() {
            let _ = first_failure.compare_exchange(
                usize::MAX,
                member,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            barrier.abort();
        }
        out
    };
    let results: Vec<Result<T, OpsError>> = if members == 1 {
        vec![run(0)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (1..members)
                .map(|member| {
                    let run = &run;
                    scope.spawn(move || run(member))
                })
                .collect();
            let mut out = vec![run(0)];
            for handle in handles {
                match handle.join() {
                    Ok(r) => out.push(r),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            out
        })
    };
    let first = first_failure.load(Ordering::Acquire);
    let mut out = Vec::with_capacity(members);
    let mut failure = None;
    for (member, result) in results.into_iter().enumerate() {
        match result {
            Ok(v) => out.push(v),
            // Keep the first failure's own error; any error will do when
            // the record is missing.
            Err(e) if member == first || failure.is_none() => failure = Some(e),
            Err(_) => {}
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// `range` split into `parts` contiguous pieces whose sizes differ by at most
/// one; piece `part`.
pub(crate) fn share(range: usize, parts: usize, part: usize) -> Range<usize> {
    let parts = parts.max(1);
    range * part / parts..range * (part + 1) / parts
}

/// An f32 buffer that the members of a team write in disjoint parts.
///
/// Every access is `unsafe`: the caller promises that between two barriers
/// no element is written by one member while another member reads or writes
/// it. Bounds are still checked (a panic, not undefined behaviour).
#[derive(Clone, Copy)]
pub(crate) struct SharedBuf<'a> {
    ptr: *mut f32,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: the buffer is only reached through the unsafe accessors below,
// whose callers keep concurrent accesses disjoint (barrier discipline).
unsafe impl Send for SharedBuf<'_> {}
unsafe impl Sync for SharedBuf<'_> {}

impl<'a> SharedBuf<'a> {
    /// Shares `values` for as long as the returned handle lives.
    pub fn new(values: &'a mut [f32]) -> Self {
        SharedBuf {
            ptr: values.as_mut_ptr(),
            len: values.len(),
            _borrow: PhantomData,
        }
    }

    /// Reads `len` values from `start`.
    ///
    /// # Safety
    /// No other member writes any of these values until the reference is
    /// dropped.
    pub unsafe fn read(&self, start: usize, len: usize) -> &[f32] {
        assert!(
            start <= self.len && len <= self.len - start,
            "shared read out of bounds"
        );
        // SAFETY: in bounds (checked above); no concurrent writer (the
        // caller's promise); the borrow `'a` keeps the allocation alive.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) }
    }

    /// Writes access to `len` values from `start`.
    ///
    /// # Safety
    /// No other member reads or writes any of these values until the
    /// reference is dropped.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn write(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(
            start <= self.len && len <= self.len - start,
            "shared write out of bounds"
        );
        // SAFETY: as for `read`, and no other reference to these values
        // exists while this one lives (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_team_meets_at_every_barrier_in_order() {
        // Each member writes its slot, waits, then checks everyone's slot of
        // this round: the barrier must order the writes before the reads.
        let members = 3;
        let rounds = 200;
        let mut slots = vec![0f32; members * rounds];
        let shared = SharedBuf::new(&mut slots);
        let out = run_team(members, |me, barrier| {
            for round in 0..rounds {
                // SAFETY: each member writes only its own slot of the round.
                unsafe { shared.write(round * members + me, 1)[0] = (round + me) as f32 };
                barrier
                    .wait()
                    .map_err(|_| OpsError::Internal("aborted".into()))?;
                // SAFETY: nobody writes this round's slots any more.
                let seen = unsafe { shared.read(round * members, members) };
                for (other, &v) in seen.iter().enumerate() {
                    assert_eq!(v, (round + other) as f32);
                }
            }
            Ok(me)
        })
        .unwrap();
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[test]
    fn an_error_in_one_member_releases_the_others() {
        let out = run_team(2, |me, barrier| {
            if me == 1 {
                return Err(OpsError::Internal("member 1 failed".into()));
            }
            // Member 0 would wait forever for member 1 without the abort.
            for _ in 0..10 {
                barrier
                    .wait()
                    .map_err(|_| OpsError::Internal("aborted".into()))?;
            }
            Ok(())
        });
        // The cause, not what member 0 saw.
        let err = out.unwrap_err().to_string();
        assert!(err.contains("member 1 failed"), "{err}");
    }

    #[test]
    fn shares_cover_the_range_without_gaps() {
        for range in [0usize, 1, 5, 64, 97] {
            for parts in 1..6 {
                let mut next = 0;
                for part in 0..parts {
                    let r = share(range, parts, part);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, range);
            }
        }
    }
}
