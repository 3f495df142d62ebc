//! An in-process group: `N` ranks as threads of one process, exchanging
//! through shared memory. It runs exactly the code an MPI rank runs (the
//! same messages, decoded and averaged in the same rank order), so a run of
//! `N` threads gives the weights of `mpirun -np N` bit for bit, and tests
//! need no MPI library.
//!
//! Every wait is bounded; a rank whose handle is dropped (it returned with
//! an error or panicked) wakes the others with [`CollectiveError::PeerLost`].

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::collective::{sum_in_rank_order, Collective, Traffic};
use crate::error::{CollectiveError, Result};

/// One round of an exchange: what each rank deposited, and the finished
/// rounds' result.
struct Round {
    generation: u64,
    deposits: Vec<Option<Vec<u8>>>,
    arrived: usize,
    published: Arc<Vec<Vec<u8>>>,
    left: Option<usize>,
}

struct Shared {
    size: usize,
    round: Mutex<Round>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // A rank that panicked while holding the lock leaves consistent data
        // (every update is a single assignment); carry on.
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Builds the `N` ranks of one in-process group.
#[derive(Debug, Clone, Copy)]
pub struct ThreadGroup;

impl ThreadGroup {
    /// `size` connected ranks (give each to its own thread); a wait for the
    /// others ends after `timeout`.
    pub fn ranks(size: usize, timeout: Duration) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            size,
            round: Mutex::new(Round {
                generation: 0,
                deposits: vec![None; size],
                arrived: 0,
                published: Arc::new(Vec::new()),
                left: None,
            }),
            changed: Condvar::new(),
        });
        (0..size)
            .map(|rank| ThreadRank {
                rank,
                shared: shared.clone(),
                timeout,
                traffic: Traffic::default(),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
    timeout: Duration,
    traffic: Traffic,
}

impl std::fmt::Debug for ThreadRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadRank")
            .field("rank", &self.rank)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl ThreadRank {
    /// Deposits `send` and returns every rank's deposit of this round.
    fn exchange(&mut self, send: Vec<u8>) -> Result<Arc<Vec<Vec<u8>>>> {
        let start = Instant::now();
        let mut round = self.shared.lock();
        if let Some(peer) = round.left {
            return Err(CollectiveError::PeerLost {
                rank: self.rank,
                peer,
            });
        }
        round.deposits[self.rank] = Some(send);
        round.arrived += 1;
        if round.arrived == self.shared.size {
            let all = round
                .deposits
                .iter_mut()
                .map(|d| d.take().unwrap_or_default())
                .collect();
            round.published = Arc::new(all);
            round.arrived = 0;
            round.generation += 1;
            self.shared.changed.notify_all();
            return Ok(round.published.clone());
        }
        let mine = round.generation;
        loop {
            let waited = start.elapsed();
            if waited >= self.timeout {
                return Err(CollectiveError::Timeout {
                    rank: self.rank,
                    waited,
                });
            }
            let (next, _) = self
                .shared
                .changed
                .wait_timeout(round, self.timeout - waited)
                .unwrap_or_else(|p| p.into_inner());
            round = next;
            // The round this rank joined is complete: its result is the
            // published one (the next round cannot complete without this
            // rank's deposit).
            if round.generation != mine {
                return Ok(round.published.clone());
            }
            if let Some(peer) = round.left {
                return Err(CollectiveError::PeerLost {
                    rank: self.rank,
                    peer,
                });
            }
        }
    }
}

impl Drop for ThreadRank {
    fn drop(&mut self) {
        let mut round = self.shared.lock();
        round.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += send.len() as u64;
        let all = self.exchange(send.to_vec())?;
        recv.clear();
        for (r, part) in all.iter().enumerate() {
            if part.len() != all[0].len() {
                return Err(CollectiveError::LengthMismatch {
                    rank: r,
                    expected: all[0].len(),
                    got: part.len(),
                });
            }
            recv.extend_from_slice(part);
        }
        Ok(())
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += 4 * buf.len() as u64;
        let bytes: Vec<u8> = buf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.exchange(bytes)?;
        for (r, part) in all.iter().enumerate() {
            if part.len() != 4 * buf.len() {
                return Err(CollectiveError::LengthMismatch {
                    rank: r,
                    expected: 4 * buf.len(),
                    got: part.len(),
                });
            }
        }
        sum_in_rank_order(all.iter().map(Vec::as_slice), buf);
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }

    fn engine(&self) -> String {
        format!("{} threads of one process", self.shared.size)
    }
}
