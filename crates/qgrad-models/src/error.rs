//! The one error type of qgrad-models.

use std::path::Path;

/// Everything that can go wrong in datasets, networks, training and checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("accumulated gradients: {0}")]
    Accum(#[from] qgrad_accum::AccumError),
    #[error("fixed point: {0}")]
    Fixed(#[from] qgrad_fixed::FixedError),
    #[error("clustering: {0}")]
    Cluster(#[from] qgrad_cluster::ClusterError),
    #[error("compressed file: {0}")]
    Csr(#[from] qgrad_csr::CsrError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("dataset file {path}: {message}")]
    Dataset { path: String, message: String },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error("shape mismatch for {what}: expected {expected:?}, got {got:?}")]
    Shape {
        what: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, ModelsError>;

impl ModelsError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelsError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn dataset(path: &Path, message: impl Into<String>) -> Self {
        ModelsError::Dataset {
            path: path.display().to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn checkpoint(path: &Path, message: impl Into<String>) -> Self {
        ModelsError::Checkpoint {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
