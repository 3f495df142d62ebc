//! The MPI engine (rsmpi over the system's OpenMPI or MPICH), behind the
//! `mpi` feature.
//!
//! Collectives are started non-blocking (`MPI_Iallgather`,
//! `MPI_Iallreduce`) and polled with `MPI_Test` until a deadline, so that a
//! rank that died or hung does not hang the others: when the wait runs out
//! the rank prints a clear error to stderr and aborts the job
//! (`MPI_Abort`, which ends every rank). A request in flight cannot be
//! abandoned and returned from (MPI still owns its buffers), which is why
//! the timeout aborts instead of returning an error.

use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, SystemOperation};
use mpi::environment::Universe;
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::collective::{Collective, Traffic};
use crate::error::{CollectiveError, Result};

/// `MPI_COMM_WORLD` of this process, initialised once.
pub struct MpiWorld {
    // Dropping the universe finalises MPI: it lives as long as the world.
    _universe: Universe,
    world: SimpleCommunicator,
    timeout: Duration,
    traffic: Traffic,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .finish()
    }
}

/// The exit code of a job aborted by a bounded wait.
pub const TIMEOUT_EXIT_CODE: i32 = 1;

impl MpiWorld {
    /// Initialises MPI (once per process); a wait for the other ranks
    /// aborts the job after `timeout`.
    pub fn init(timeout: Duration) -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| CollectiveError::Mpi("MPI was already initialised".into()))?;
        let world = universe.world();
        Ok(Self {
            _universe: universe,
            world,
            timeout,
            traffic: Traffic::default(),
        })
    }

    /// Ends every rank of the job now (`MPI_Abort`) with `code`: what a rank
    /// does after a failure of its own, so that the others do not wait for
    /// it.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Waits for `request` within the deadline (or aborts the job).
    fn complete<'a, D: ?Sized, S: Scope<'a>>(&self, what: &str, request: Request<'a, D, S>) {
        let mut pending = Some(request);
        self.wait(what, || match pending.take().map(Request::test) {
            Some(Ok(_)) | None => true,
            Some(Err(r)) => {
                pending = Some(r);
                false
            }
        });
    }

    /// Polls `test` until it reports completion; past the deadline, prints
    /// why and aborts the job.
    fn wait(&self, what: &str, mut test: impl FnMut() -> bool) {
        let start = Instant::now();
        let mut polls = 0u32;
        while !test() {
            let waited = start.elapsed();
            if waited >= self.timeout {
                eprintln!(
                    "qgrad: error: {} ({what}); aborting the MPI job",
                    CollectiveError::Timeout {
                        rank: self.rank(),
                        waited
                    }
                );
                self.world.abort(TIMEOUT_EXIT_CODE);
            }
            polls += 1;
            // Spin briefly (a step's exchange is usually quick), then sleep
            // so that oversubscribed ranks leave the cores to each other.
            if polls > 200 {
                std::thread::sleep(Duration::from_micros(100));
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += send.len() as u64;
        recv.clear();
        recv.resize(send.len() * self.size(), 0);
        mpi::request::scope(|scope| {
            let request = self
                .world
                .immediate_all_gather_into(scope, send, &mut recv[..]);
            self.complete("all-gather", request);
        });
        Ok(())
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += 4 * buf.len() as u64;
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let request = self.world.immediate_all_reduce_into(
                scope,
                &send[..],
                &mut buf[..],
                SystemOperation::sum(),
            );
            self.complete("all-reduce", request);
        });
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }

    fn engine(&self) -> String {
        let version = mpi::environment::library_version()
            .map(|v| v.lines().next().unwrap_or("").trim().to_string())
            .unwrap_or_else(|_| "unknown library".into());
        format!("MPI, {} ranks ({version})", self.size())
    }
}
