//! A failed command: the error with its cause chain, and the exit code that
//! says what kind of failure it was (see `EXIT_CODES` in main.rs).

use std::fmt::Display;

/// Runtime failure.
pub const RUNTIME: u8 = 1;
/// Usage error (clap uses 2 for its own errors too).
pub const USAGE: u8 = 2;
/// Bad input data or file.
pub const INPUT: u8 = 3;

#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
    /// Already printed (an MPI rank prints before it waits for the others).
    pub reported: bool,
}

impl Failure {
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code,
            error: error.into(),
            reported: false,
        }
    }

    pub fn usage(message: impl Display) -> Self {
        Failure::new(USAGE, anyhow::anyhow!("{message}"))
    }

    pub fn print(&self) {
        if self.reported {
            return;
        }
        eprintln!("error: {}", self.error);
        for cause in self.error.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
    }
}

pub type CliResult<T> = Result<T, Failure>;

/// Attaches a context message and an exit code to an error.
pub trait Classify<T> {
    /// A problem with an input file or data set (exit 3).
    fn input(self, context: impl Display) -> CliResult<T>;
    /// Any other failure (exit 1).
    fn runtime(self, context: impl Display) -> CliResult<T>;
    /// Inconsistent options (exit 2).
    fn usage(self, context: impl Display) -> CliResult<T>;
}

impl<T, E> Classify<T> for Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn input(self, context: impl Display) -> CliResult<T> {
        self.map_err(|e| Failure::new(INPUT, anyhow::Error::new(e).context(context.to_string())))
    }

    fn runtime(self, context: impl Display) -> CliResult<T> {
        self.map_err(|e| Failure::new(RUNTIME, anyhow::Error::new(e).context(context.to_string())))
    }

    fn usage(self, context: impl Display) -> CliResult<T> {
        self.map_err(|e| Failure::new(USAGE, anyhow::Error::new(e).context(context.to_string())))
    }
}

impl From<qgrad_pipeline::PipelineError> for Failure {
    fn from(e: qgrad_pipeline::PipelineError) -> Self {
        use qgrad_pipeline::FailureKind;
        let code = match e.kind() {
            FailureKind::Input => INPUT,
            FailureKind::Usage => USAGE,
            FailureKind::Runtime => RUNTIME,
        };
        Failure::new(code, anyhow::Error::new(e))
    }
}
