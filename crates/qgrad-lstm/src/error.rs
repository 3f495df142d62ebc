//! The one error type of qgrad-lstm.

/// Everything that can go wrong building, training, evaluating, saving or
/// sampling a character LSTM.
#[derive(Debug, thiserror::Error)]
pub enum LstmError {
    /// A tensor operation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The corpus could not be loaded or split.
    #[error(transparent)]
    Data(#[from] qgrad_data::DataError),
    /// The optimizer rejected a setting or a state tensor.
    #[error("optimizer: {0}")]
    Optim(#[from] qgrad_optim::OptimError),
    /// A weight quantizer rejected its input (NaN weights, say).
    #[error("quantizer: {0}")]
    Quantize(#[from] qgrad_scaled::ScaledError),
    /// The compressed file could not be written or read.
    #[error("compressed file: {0}")]
    Csr(#[from] qgrad_csr::CsrError),
    /// A compressed file that is valid but does not hold a character LSTM,
    /// or holds an inconsistent one.
    #[error("{0}")]
    NotAnLstm(String),
    /// A setting that cannot work.
    #[error("{0}")]
    Config(String),
    /// Training diverged: the loss or a gradient is NaN or infinite.
    #[error("training diverged at epoch {epoch}, step {step}: the {what} is not finite")]
    Diverged {
        /// 0-based epoch.
        epoch: usize,
        /// Step within the epoch.
        step: usize,
        /// What went non-finite.
        what: &'static str,
    },
    /// The file system refused.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint that is corrupt, truncated or of another model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

impl LstmError {
    pub(crate) fn checkpoint(path: &std::path::Path, message: impl Into<String>) -> Self {
        LstmError::Checkpoint {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}

/// `Result` with [`LstmError`].
pub type Result<T> = std::result::Result<T, LstmError>;
