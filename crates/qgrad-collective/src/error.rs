//! The one error type of this crate.

use std::time::Duration;

/// What can go wrong in a gradient exchange.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A quantizer setting that cannot work.
    #[error("invalid gradient quantizer: {0}")]
    InvalidQuantizer(String),
    /// A buffer of the wrong length arrived.
    #[error("{what} has {got} bytes, expected {expected}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes there.
        got: usize,
    },
    /// A code outside the quantizer's levels.
    #[error("rank {rank} sent the gradient code {code}, above the largest level {max}")]
    BadCode {
        /// The sender.
        rank: usize,
        /// The code.
        code: u32,
        /// The largest allowed code, `2L`.
        max: u32,
    },
    /// A rank's gradient (or the averaged one) holds NaN or infinity.
    #[error(
        "the gradient of rank {rank} is not finite (the run diverged: lower the learning rate)"
    )]
    NonFinite {
        /// The rank whose gradient it was (the averaged gradient: every rank
        /// reports itself, the sum cannot tell).
        rank: usize,
    },
    /// The ranks were started with different settings.
    #[error("rank {rank}: the ranks were started with different settings; start every rank with the same options.\n  this rank: {mine}\n{}", .others.iter().map(|(r, d)| format!("  rank {r}: {d}")).collect::<Vec<_>>().join("\n"))]
    ConfigMismatch {
        /// This rank.
        rank: usize,
        /// This rank's settings.
        mine: String,
        /// The ranks whose settings differ from this rank's, with theirs.
        others: Vec<(usize, String)>,
    },
    /// The ranks passed buffers of different lengths to one collective.
    #[error("rank {rank} passed {got} bytes to a collective where rank 0 passed {expected}")]
    LengthMismatch {
        /// The rank that differs.
        rank: usize,
        /// Rank 0's length.
        expected: usize,
        /// That rank's length.
        got: usize,
    },
    /// A bounded wait ran out: some rank never joined the collective.
    #[error("rank {rank}: the other ranks did not join the exchange within {waited:?} (a rank died, hung or was stopped)")]
    Timeout {
        /// This rank.
        rank: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// A rank of an in-process group left (returned or panicked) while
    /// others still wait for it.
    #[error("rank {rank}: rank {peer} left the group (it stopped with an error or panicked)")]
    PeerLost {
        /// This rank.
        rank: usize,
        /// The rank that left.
        peer: usize,
    },
    /// The MPI library refused.
    #[error("MPI: {0}")]
    Mpi(String),
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, CollectiveError>;
