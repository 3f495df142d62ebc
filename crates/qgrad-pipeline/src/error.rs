//! The one error type of qgrad-pipeline: every failure says what kind it is,
//! so that a binary can map it to its exit code.

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What kind of failure, for the caller's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A bad input file or data set (the `qgrad` CLI exits with 3).
    Input,
    /// Options that do not fit together (exit 2).
    Usage,
    /// Anything else (exit 1).
    Runtime,
}

/// A pipeline step that failed, with its context and cause.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// An input file or data set is missing, corrupt or of another network.
    #[error("{context}")]
    Input {
        /// What the pipeline was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: Source,
    },
    /// Options that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// Training, quantization, evaluation or writing failed.
    #[error("{context}")]
    Runtime {
        /// What the pipeline was doing.
        context: String,
        /// Why it failed.
        #[source]
        source: Source,
    },
}

impl PipelineError {
    /// The kind of failure.
    pub fn kind(&self) -> FailureKind {
        match self {
            PipelineError::Input { .. } => FailureKind::Input,
            PipelineError::Usage(_) => FailureKind::Usage,
            PipelineError::Runtime { .. } => FailureKind::Runtime,
        }
    }

    /// A usage error.
    pub fn usage(message: impl Into<String>) -> Self {
        PipelineError::Usage(message.into())
    }
}

/// `Result` with [`PipelineError`].
pub type Result<T> = std::result::Result<T, PipelineError>;

/// Attaches a context and a kind to an error.
pub(crate) trait Context<T> {
    fn input(self, context: impl Into<String>) -> Result<T>;
    fn runtime(self, context: impl Into<String>) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> Context<T> for std::result::Result<T, E> {
    fn input(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| PipelineError::Input {
            context: context.into(),
            source: Box::new(e),
        })
    }

    fn runtime(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| PipelineError::Runtime {
            context: context.into(),
            source: Box::new(e),
        })
    }
}

/// A training error: bad options (or a resumed checkpoint that does not
/// fit them) are the user's to fix; anything else failed at run time.
pub(crate) fn training(e: qgrad_models::ModelsError, context: &str) -> PipelineError {
    match e {
        qgrad_models::ModelsError::Config(m) => PipelineError::Usage(m),
        // Ranks started with different options: the user's to fix.
        e @ qgrad_models::ModelsError::Collective(
            qgrad_collective::CollectiveError::ConfigMismatch { .. },
        ) => PipelineError::Usage(e.to_string()),
        e @ (qgrad_models::ModelsError::Checkpoint { .. } | qgrad_models::ModelsError::Data(_)) => {
            PipelineError::Input {
                context: context.to_string(),
                source: Box::new(e),
            }
        }
        e => PipelineError::Runtime {
            context: context.to_string(),
            source: Box::new(e),
        },
    }
}
