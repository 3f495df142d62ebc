//! The one error type of qgrad-data.

use std::path::Path;

/// A data file that cannot be read or is not what it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file system refused (missing file, permissions, …).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file was read but its contents are invalid (bad magic, truncated,
    /// labels out of range, not text, too short, …).
    #[error("dataset file {path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A request that the data cannot satisfy (a split or batch shape that
    /// does not fit).
    #[error("invalid data request: {0}")]
    Request(String),
}

/// `Result` with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}
