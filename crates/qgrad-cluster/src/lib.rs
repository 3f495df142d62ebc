//! `qgrad-cluster`: parallel sorting, exact optimal 1-D k-means
//! (Ckmeans.1d.dp), quantile splits, and the assignment of bit widths by
//! importance (METHOD.md §3, steps 1–3).
//!
//! # Design
//! Post-training quantization sorts the accumulated gradients `A` of all
//! parameters (about 15 M for VGG-16), splits them into `K` groups and gives
//! the group with the highest centre the most bits. Everything here works on
//! plain slices so that the deployment side never compiles candle.
//!
//! * [`par_sort_f32`] sorts in IEEE total order with a radix sort: one
//!   most-significant-digit pass, then the buckets in parallel (rayon), each
//!   with least-significant-digit passes. Comparison sorts are several times
//!   slower on 15 M keys.
//! * [`ckmeans_1d`] is the exact dynamic programme of Ckmeans.1d.dp (Wang &
//!   Song 2011): `D[k][i] = min_j D[k-1][j-1] + SSE(j..=i)`, with `SSE` from
//!   prefix sums over data shifted by its median (less cancellation). The
//!   optimal split point is monotone in `i`, so each layer is solved by divide
//!   and conquer in `O(n log n)` (the two halves in parallel, depth first so
//!   that a block's candidates stay in the cache, the smallest blocks in one
//!   loop), `O(K n log n)` in all. With one more cluster the last one starts
//!   no earlier, so every layer's split at `i` is at least the best
//!   two-cluster split `J_1(i)`, and at least the layer below's: each layer is
//!   solved only on the suffix of end points that a later layer reads (the
//!   last layer needs only the last point), and each cell searches from the
//!   layer below's split. On heavy-tailed importances, whose high clusters
//!   are small, the three middle layers of a five-width k-means then cover
//!   40 %, 23 % and 7 % of the points. The split search is the hot loop: it runs
//!   eight candidates at a time with AVX-512 (four with AVX2, one otherwise),
//!   each lane with the scalar loop's operations in the same order and the
//!   lanes reduced to the scalar loop's leftmost minimum, so that every CPU
//!   gets the same clustering bit for bit (unit tests compare every kernel
//!   the CPU has with the scalar one). Its large buffers ask Linux for
//!   transparent huge pages: faulting in a gigabyte of 4 KiB pages cost more
//!   than the arithmetic on the VM where it was measured. Equal values are first merged into weighted points: an optimal
//!   clustering never separates equal values (moving a copy to its twins'
//!   cluster cannot increase the SSE), so the result stays exact, ties are
//!   never split, and heavily tied data (pruned or quantized models) gets
//!   faster.
//! * [`assign_widths`] sorts a copy of the importances, clusters it, and maps
//!   every element to its cluster by comparing with the clusters' value
//!   boundaries (no index sort needed, because clusters are contiguous value
//!   ranges).
//!
//! # Decisions (documented choices where METHOD.md is silent)
//! * Fewer distinct importances than widths: there are fewer clusters; the
//!   highest cluster gets `widths[0]`, the next `widths[1]`, and so on, and the
//!   lowest widths are not used. The safe direction: parameters keep more bits.
//! * Constant importance (one distinct value, which includes an all-zero `A`):
//!   nothing distinguishes the parameters, so all get `widths[0]` — the safe
//!   choice; the user sees an unquantized-looking result rather than a model
//!   pruned at random.
//! * [`ClusterMethod::LogKMeans`] clusters `ln(A + eps)` with
//!   `eps = LOG_EPS_RELATIVE · max(A)` ([`LOG_EPS_RELATIVE`] = 1e-12). `A` must
//!   be `>= 0`. Relative `eps` keeps the method scale-invariant (multiplying
//!   `A` by a constant, e.g. a different learning-rate schedule length, does
//!   not change the widths) and puts parameters that never saw a gradient
//!   (`A = 0`) far below all others.
//! * [`ClusterMethod::Quantiles`]: group `k` gets `fractions[k]` of the
//!   elements (rounded so that the counts sum to `n`: boundaries are
//!   `round(n · cumulative fraction)`). A boundary that falls inside a run of
//!   equal importances moves to the nearer end of the run (the lower end on a
//!   tie), so equal importances always get equal widths; a group may then be
//!   larger or smaller than asked, or empty.
//! * NaN or infinite importance is an error; an empty input gives an empty
//!   output.
//!
//! # Example
//! Three clear groups of importances get 8, 4 and 0 (pruned) bits; the exact
//! k-means behind it can also be called on its own:
//!
//! ```rust
//! use qgrad_cluster::{assign_widths, ckmeans_1d, par_sort_f32, ClusterMethod};
//!
//! let importance = [5.0f32, 0.0, 100.0, 0.01, 5.1, 0.02];
//! let widths = assign_widths(&importance, &[8, 4, 0], &ClusterMethod::KMeans)?;
//! assert_eq!(widths, vec![4, 0, 8, 0, 4, 0]);
//!
//! // Quantiles: the top half of the elements gets 8 bits, the rest 2.
//! let method: ClusterMethod = "quantiles:0.5,0.5".parse()?;
//! let widths = assign_widths(&importance, &[8, 2], &method)?;
//! assert_eq!(widths, vec![8, 2, 8, 2, 8, 2]);
//!
//! let mut sorted = importance.to_vec();
//! par_sort_f32(&mut sorted);
//! assert_eq!(sorted, vec![0.0, 0.01, 0.02, 5.0, 5.1, 100.0]);
//! let sorted: Vec<f64> = sorted.iter().map(|&v| f64::from(v)).collect();
//! let clustering = ckmeans_1d(&sorted, 3)?;
//! assert_eq!(clustering.starts, vec![0, 3, 5]);
//! assert_eq!(clustering.centres[2], 100.0);
//! # Ok::<(), qgrad_cluster::ClusterError>(())
//! ```

#![warn(missing_docs)]

mod buffer;
mod ckmeans;
mod method;
mod sort;

pub use ckmeans::{ckmeans_1d, Clustering};
pub use method::{assign_widths, ClusterMethod, LOG_EPS_RELATIVE};
pub use sort::par_sort_f32;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, ClusterError>;

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClusterError {
    /// A NaN or infinite input value.
    #[error("value at index {index} is not finite ({value})")]
    NonFinite {
        /// Position of the offending value in the input.
        index: usize,
        /// The offending value (NaN or ±infinity), widened to `f64`.
        value: f64,
    },
    /// Input that must be sorted ascending is not.
    #[error("input is not sorted ascending at index {index}")]
    NotSorted {
        /// First index whose value is smaller than its predecessor's.
        index: usize,
    },
    /// Zero clusters asked for a non-empty input.
    #[error("number of clusters must be at least 1 (got {0})")]
    ZeroClusters(usize),
    /// The widths list is empty or not strictly decreasing.
    #[error(
        "bit widths must be a non-empty, strictly decreasing list (b_1 > b_2 > ...), got {0:?}"
    )]
    BadWidths(Vec<u8>),
    /// Quantile fractions that are negative, not finite, do not sum to 1, or
    /// do not match the number of widths.
    #[error("bad quantile fractions {fractions:?}: {reason}")]
    BadFractions {
        /// The fractions as given.
        fractions: Vec<f64>,
        /// What is wrong with them.
        reason: String,
    },
    /// A negative importance where the method needs `A >= 0`.
    #[error("importance at index {index} is negative ({value}); log-k-means needs A >= 0")]
    NegativeImportance {
        /// Position of the negative importance.
        index: usize,
        /// The negative value, widened to `f64`.
        value: f64,
    },
    /// More distinct values than the exact k-means keeps indices for.
    #[error("too many distinct values for exact k-means: {distinct} (at most 2^32 - 1)")]
    TooLarge {
        /// Number of distinct values in the input.
        distinct: usize,
    },
    /// A cluster method name that cannot be parsed.
    #[error("cannot parse cluster method {input:?}: {reason}")]
    Parse {
        /// The string that failed to parse.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
}
