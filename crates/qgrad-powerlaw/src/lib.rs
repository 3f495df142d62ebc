//! `qgrad-powerlaw`: the power law of pruned networks (METHOD §14). It
//! counts, for every weight layer of a compressed file, each unit's degree
//! (its non-zero incoming and outgoing connections; for a convolution, the
//! non-zero kernel taps of an output or input channel), and fits the degrees
//! with a truncated discrete power law `p(k) ∝ k^−γ` on `k_min ≤ k ≤ k_max`
//! by maximum likelihood, `k_min` chosen by the Kolmogorov–Smirnov distance
//! (Clauset, Shalizi and Newman 2009), beside truncated exponential and
//! log-normal fits on the same range, compared by Vuong's likelihood-ratio
//! test.
//!
//! No candle: it reads files, like the runtime.
//!
//! # Decisions
//!
//! * `k_max` is the largest observed degree, so every distribution is a
//!   finite sum over `k_min ..= k_max` and needs no zeta function.
//! * Units of degree 0 (cut off entirely) are counted but not fitted: the
//!   laws are defined for `k ≥ 1`.
//! * `k_min` ranges over the distinct observed degrees that leave at least
//!   [`MIN_TAIL`] units in the tail.
//! * The likelihood-ratio p-value is Vuong's two-sided normal test,
//!   `p = erfc(|R| / sqrt(2 n σ²))` (Clauset et al., eq. 5.3 ff.), with `R`
//!   the log-likelihood ratio of the power law over the alternative (`R > 0`
//!   favours the power law) and `σ²` the variance of the pointwise ratios.
//! * `libm` provides `erfc`; the one- and two-parameter maximisations are
//!   written here (bisection on the monotone score, and a Nelder–Mead
//!   simplex for the log-normal), a few dozen lines that no kept crate of
//!   the workspace provides.
//!
//! ```
//! use qgrad_powerlaw::{fit_tail, Law};
//!
//! // Degrees with a heavy tail.
//! let degrees: Vec<u32> = (1..=200u32).map(|i| 1 + 400 / i).collect();
//! let fit = fit_tail(&degrees).unwrap();
//! assert!(fit.power_law.gamma > 1.0);
//! assert!(fit.k_min >= 1 && fit.k_max == 401);
//! assert_eq!(fit.compare[0].alternative, Law::Exponential);
//! ```
#![warn(missing_docs)]

pub mod degrees;
mod fit;

pub use degrees::{layer_degrees, LayerDegrees};
pub use fit::{
    fit_tail, fit_tail_from, Comparison, Exponential, Law, LogNormal, PowerLaw, TailFit, MIN_TAIL,
};

/// The one error type of qgrad-powerlaw.
#[derive(Debug, thiserror::Error)]
pub enum PowerLawError {
    /// Too few units of degree ≥ 1 to fit.
    #[error("{found} units with a non-zero degree, at least {needed} are needed for a fit")]
    TooFewPoints {
        /// Units available.
        found: usize,
        /// Units needed.
        needed: usize,
    },
    /// A tensor's shape is not that of a weight layer.
    #[error("tensor '{0}' is not a linear or convolution weight (rank 2 or 4)")]
    NotAWeight(String),
}

/// `Result` with [`PowerLawError`].
pub type Result<T> = std::result::Result<T, PowerLawError>;
