//! `qgrad-collective`: what crosses between the ranks of data-parallel
//! training (METHOD §12), without candle: each rank's gradient quantized to
//! `m` bits per element by unbiased stochastic rounding, one f32 scale per
//! bucket of `d` elements (optionally clipped at `c·σ` first), packed, and
//! exchanged by an all-gather; every rank decodes and averages the `N`
//! gradients in rank order, so all ranks apply the same update. Full
//! precision (an f32 all-reduce) is the baseline.
//!
//! The engine is a [`Collective`]: [`ThreadGroup`] (ranks as threads of one
//! process: tests and the in-process simulation), [`Solo`] (one process),
//! or, with the `mpi` feature, `MpiWorld` (rsmpi over the system's OpenMPI
//! or MPICH; no transport of our own). All of them run the same
//! [`exchange`], so a simulation of `N` threads gives the same bits as
//! `mpirun -np N`. Every wait is bounded.
//!
//! ```
//! use qgrad_collective::{exchange, ExchangeBuffers, GradientExchange, StochasticQuantizer, ThreadGroup};
//! use rand::SeedableRng;
//! use std::time::Duration;
//!
//! let how = GradientExchange::Quantized(StochasticQuantizer::new(3, 512, Some(2.5))?);
//! let ranks = ThreadGroup::ranks(2, Duration::from_secs(10));
//! let averaged: Vec<Vec<f32>> = std::thread::scope(|s| {
//!     let handles: Vec<_> = ranks
//!         .into_iter()
//!         .map(|mut rank| {
//!             s.spawn(move || {
//!                 let r = qgrad_collective::Collective::rank(&rank) as f32;
//!                 let mut grads = vec![vec![0.5 + r, -0.25, 0.0]];
//!                 let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(r as u64);
//!                 let mut buffers = ExchangeBuffers::default();
//!                 exchange(&mut rank, &how, &mut grads, 1.0, 10.0, &mut rng, &mut buffers).unwrap();
//!                 grads.remove(0)
//!             })
//!         })
//!         .collect();
//!     handles.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! assert_eq!(averaged[0], averaged[1]); // every rank holds the same average
//! assert_eq!(averaged[0][2], 0.0);
//! # Ok::<(), qgrad_collective::CollectiveError>(())
//! ```

#![warn(missing_docs)]

mod collective;
mod error;
pub mod exchange;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod quantize;
mod threads;

pub use collective::{agree, mean_in_rank_order, Collective, Solo, Traffic};
pub use error::{CollectiveError, Result};
pub use exchange::{exchange, ExchangeBuffers, GradientExchange};
#[cfg(feature = "mpi")]
pub use mpi::MpiWorld;
pub use quantize::StochasticQuantizer;
pub use threads::{ThreadGroup, ThreadRank};
