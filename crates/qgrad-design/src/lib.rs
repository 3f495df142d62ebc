//! `qgrad-design`: the design-space side of the second thesis (METHOD §9):
//! how much memory a design needs, and which designs are Pareto-optimal in
//! (total memory, test error). Candle-free, so that a report or a device
//! budget check can use it without the training stack.
//!
//! A design's **weight memory** is its compressed file's bytes (qgrad-csr);
//! its **activation memory** is computed here from the network's layer list
//! ([`activation_memory`]); the total is their sum ([`total_memory_bits`]).
//! [`pareto_front`] extracts the optimal designs of any set of points.
//!
//! ```
//! use qgrad_design::{activation_memory, pareto_front, ActivationMemoryConfig, Point};
//! use qgrad_runtime::spec::Arch;
//!
//! let arch: Arch = "mlp-256x2".parse().unwrap();
//! let m = activation_memory(arch, &ActivationMemoryConfig { act_bits: 2, input_bits: 8 }).unwrap();
//! // The 784 input pixels at 8 bits, then the widest pair of consecutive
//! // layer outputs (256 + 256) at 2 bits.
//! assert_eq!(m.bits, 784 * 8 + (256 + 256) * 2);
//!
//! let points = [Point::new(10.0, 0.02), Point::new(5.0, 0.03), Point::new(12.0, 0.03)];
//! assert_eq!(pareto_front(&points).unwrap(), vec![1, 0]);
//! ```

mod memory;
mod pareto;

pub use memory::{activation_memory, total_memory_bits, ActivationMemory, ActivationMemoryConfig};
pub use pareto::{pareto_front, Point};

/// What can go wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DesignError {
    /// An activation or input width outside 1..=32 bits.
    #[error("{what} width {bits} bits: expected 1..=32")]
    InvalidWidth {
        /// Which width.
        what: &'static str,
        /// The width given.
        bits: u8,
    },
    /// A point with a NaN or infinite coordinate, or a negative memory.
    #[error("design {index}: memory {memory} and error {error} must be finite (memory >= 0)")]
    InvalidPoint {
        /// Its index in the input.
        index: usize,
        /// Its memory.
        memory: f64,
        /// Its error.
        error: f64,
    },
    /// A layer list the memory model cannot follow (a shape that does not
    /// fit the next layer).
    #[error("layer {layer}: {reason}")]
    Shape {
        /// The layer's position.
        layer: usize,
        /// What does not fit.
        reason: String,
    },
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, DesignError>;
