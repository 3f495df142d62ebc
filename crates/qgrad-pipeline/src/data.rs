//! Where the data sets are and how they are loaded.

use std::path::{Path, PathBuf};

use qgrad_data::cifar::load_cifar10;
use qgrad_data::mnist::load_mnist;
use qgrad_data::Dataset;
use qgrad_runtime::{Arch, DatasetKind};

use crate::error::{Context, PipelineError, Result};

/// The folder of a data set under `datasets/`: `mnist-mini` (the subset
/// shipped in the repository) for MNIST, `cifar10` (where
/// `cargo xtask download cifar10` puts it) for CIFAR-10.
pub fn default_folder(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Mnist => "mnist-mini",
        DatasetKind::Cifar10 => "cifar10",
    }
}

/// `datasets/<folder>` in the current directory or an ancestor of it or of
/// the running binary (a binary under `target/…/` finds the repository's
/// copy), if it exists.
pub fn find_datasets_folder(folder: &str) -> Option<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.push(exe);
    }
    roots.iter().find_map(|root| {
        root.ancestors()
            .map(|dir| dir.join("datasets").join(folder))
            .find(|dir| dir.is_dir())
    })
}

/// `dir`, or the default folder of `arch`'s data set, or a usage error that
/// says where it looked.
pub fn resolve_data_dir(arch: Arch, dir: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = dir {
        return Ok(dir.to_path_buf());
    }
    find_datasets_folder(default_folder(arch.dataset())).ok_or_else(|| {
        let hint = match arch.dataset() {
            DatasetKind::Mnist => "the shipped subset datasets/mnist-mini was not found",
            DatasetKind::Cifar10 => {
                "datasets/cifar10 was not found (fetch it with `cargo xtask download cifar10`)"
            }
        };
        PipelineError::usage(format!(
            "{arch}: no --data given and {hint} from the current directory or the binary's \
             location"
        ))
    })
}

/// Loads `(train, test)` of `arch`'s data set from `dir`, keeping at most
/// `train_limit` / `test_limit` images (the first ones).
pub fn load_datasets(
    arch: Arch,
    dir: &Path,
    train_limit: Option<usize>,
    test_limit: Option<usize>,
) -> Result<(Dataset, Dataset)> {
    let (name, fetch) = match arch.dataset() {
        DatasetKind::Mnist => ("MNIST", "mnist"),
        DatasetKind::Cifar10 => ("CIFAR-10", "cifar10"),
    };
    let loaded = match arch.dataset() {
        DatasetKind::Mnist => load_mnist(dir),
        DatasetKind::Cifar10 => load_cifar10(dir),
    };
    let (mut train, mut test) = loaded.input(format!(
        "cannot load {name} from {} (fetch it with `cargo xtask download {fetch}`, or pass the \
         folder that holds it)",
        dir.display()
    ))?;
    if let Some(n) = train_limit {
        train = train.take(n);
    }
    if let Some(n) = test_limit {
        test = test.take(n);
    }
    if train.is_empty() || test.is_empty() {
        return Err(PipelineError::usage(
            "the training or test set is empty (check the limits)",
        ));
    }
    Ok((train, test))
}
