//! The one error type of qgrad-models.

use std::path::Path;

/// Everything that can go wrong in networks, training, checkpoints, the
/// methods and export.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// A tensor operation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Accumulated-gradient bookkeeping failed.
    #[error("accumulated gradients: {0}")]
    Accum(#[from] qgrad_accum::AccumError),
    /// A fixed-point operation failed.
    #[error("fixed point: {0}")]
    Fixed(#[from] qgrad_fixed::FixedError),
    /// Clustering of the accumulated gradients failed.
    #[error("clustering: {0}")]
    Cluster(#[from] qgrad_cluster::ClusterError),
    /// Encoding or decoding the compressed file failed.
    #[error("compressed file: {0}")]
    Csr(#[from] qgrad_csr::CsrError),
    /// A dataset could not be loaded.
    #[error(transparent)]
    Data(#[from] qgrad_data::DataError),
    /// The runtime rejected a file or its metadata.
    #[error(transparent)]
    Runtime(#[from] qgrad_runtime::RuntimeError),
    /// The optimizer rejected a setting or a state tensor.
    #[error("optimizer: {0}")]
    Optim(#[from] qgrad_optim::OptimError),
    /// The data-parallel gradient exchange failed (a rank diverged, died,
    /// or was started with other settings).
    #[error(transparent)]
    Collective(#[from] qgrad_collective::CollectiveError),
    /// The file system refused.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint that is corrupt, truncated or of another network.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor of the wrong shape.
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        /// What has the wrong shape.
        what: String,
        /// The expected shape.
        expected: Vec<usize>,
        /// The shape given.
        got: Vec<usize>,
    },
    /// Options that cannot work (the user's to fix).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The training loss became NaN or infinite.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// An internal inconsistency (a bug, not bad input).
    #[error("{0}")]
    Other(String),
}

/// `Result` with [`ModelsError`].
pub type Result<T> = std::result::Result<T, ModelsError>;

impl ModelsError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelsError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        ModelsError::Checkpoint {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
