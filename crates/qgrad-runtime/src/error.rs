//! The one error type of qgrad-runtime.

/// Why a compressed model cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The file itself is corrupt or cannot be decoded.
    #[error("compressed file: {0}")]
    Csr(#[from] qgrad_csr::CsrError),
    /// A fixed-point operation failed (NaN or infinity among the activations).
    #[error("fixed point: {0}")]
    Fixed(#[from] qgrad_fixed::FixedError),
    /// The file's metadata lacks a key the runtime needs, or holds a bad value.
    #[error("the file's metadata: {0}")]
    Metadata(String),
    /// A tensor the network needs is missing from the file.
    #[error("the file has no tensor '{0}'")]
    MissingTensor(String),
    /// A tensor or an input has a shape the network does not accept.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// What has the wrong shape.
        what: String,
        /// The shape the network needs.
        expected: Vec<usize>,
        /// The shape it got.
        got: Vec<usize>,
    },
    /// An option or a network description that cannot work (activation width
    /// out of range, a layer sequence whose shapes do not chain, …).
    #[error("invalid: {0}")]
    Invalid(String),
}

/// `Result` with [`RuntimeError`].
pub type Result<T> = std::result::Result<T, RuntimeError>;
