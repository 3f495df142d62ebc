//! Project automation behind `cargo xtask`: dataset download, the end-to-end
//! reproduction of the thesis results, the accuracy–compression sweep, and the
//! report and plots.
//!
//! Design: the binary (`main.rs`) only parses the command line; everything
//! else lives in this library so that the integration tests in `xtask/tests/`
//! can drive the downloader against a loopback server and the report and plot
//! writers against synthetic results, without a network or a training run.
//! The reproduction calls `qgrad-pipeline`, the same steps the `qgrad` CLI
//! calls (training, the three quantization methods, export, integer
//! inference), and never re-implements one: this crate decides *what* to run
//! and records it; the library crates decide *how*.
//!
//! Everything written (datasets, results, reports, plots) goes to a temporary
//! name in the target directory first and is renamed into place, so an
//! interrupted run never leaves a half-written file under a final name — which
//! is also what makes `reproduce` safely resumable.

pub mod continual;
pub mod curve;
pub mod data_parallel;
pub mod download;
pub mod fsutil;
mod loss_aware;
pub mod lstm;
pub mod plot;
pub mod powerlaw;
mod recipe;
pub mod report;
pub mod reproduce;
pub mod results;
pub mod structured;
pub mod versus;

use std::path::PathBuf;

/// The repository root (the workspace), found from this crate's manifest
/// directory at compile time: `cargo xtask` is always run from a checkout.
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `datasets/` in the repository.
pub fn default_data_dir() -> PathBuf {
    repo_root().join("datasets")
}

/// The processor model as `/proc/cpuinfo` names it (printed beside every
/// speed figure), or "unknown processor".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown processor".into())
}
