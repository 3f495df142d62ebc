//! CIFAR-10, binary version (`cifar-10-batches-bin/`).
//!
//! Each batch file is a sequence of 3073-byte records: one label byte (0–9),
//! then a 32×32 colour image as 1024 red, 1024 green and 1024 blue bytes, each
//! plane row-major. There is no header, so validation is by size: a file whose
//! length is not a whole number of records, that is empty, or that holds a
//! label above 9 is rejected with a message naming the file and the offset.
//! The record layout is already CHW, so images are copied as they are into
//! [`Dataset`].
//!
//! `dir` may be the `cifar-10-batches-bin` folder itself or a folder that
//! contains it (as `cargo xtask download` lays it out: `datasets/cifar10/`).

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::image::{Dataset, Normalization};

/// Bytes of one record: label + 3·32·32 pixels.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
const IMAGE_BYTES: usize = 3 * 32 * 32;
/// The five training batches and the test batch of the distribution.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The test batch of the distribution.
pub const TEST_FILE: &str = "test_batch.bin";
/// Class names in label order.
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The per-channel mean and standard deviation of the CIFAR-10 training set
/// (pixels scaled to [0, 1]), the usual normalisation constants.
pub fn standard_normalization() -> Normalization {
    Normalization {
        mean: vec![0.4914, 0.4822, 0.4465],
        std: vec![0.2470, 0.2435, 0.2616],
    }
}

/// Finds the folder holding the batch files.
pub fn batches_dir(dir: &Path) -> Result<PathBuf> {
    for candidate in [
        dir.to_path_buf(),
        dir.join("cifar-10-batches-bin"),
        dir.join("cifar10").join("cifar-10-batches-bin"),
    ] {
        if candidate.join(TEST_FILE).is_file() {
            return Ok(candidate);
        }
    }
    Err(DataError::format(
        dir,
        format!(
            "no CIFAR-10 binary batches found (looked for {TEST_FILE} in it, in \
             cifar-10-batches-bin/ and cifar10/cifar-10-batches-bin/); \
             run `cargo xtask download cifar10`"
        ),
    ))
}

/// Loads `(train, test)`: the five training batches and the test batch.
pub fn load_cifar10(dir: &Path) -> Result<(Dataset, Dataset)> {
    let dir = batches_dir(dir)?;
    let paths: Vec<PathBuf> = TRAIN_FILES.iter().map(|f| dir.join(f)).collect();
    let train = load_batches(&paths)?;
    let test = load_batches(&[dir.join(TEST_FILE)])?;
    Ok((train, test))
}

/// Loads and concatenates batch files.
pub fn load_batches(paths: &[PathBuf]) -> Result<Dataset> {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        parse_batch(path, &bytes, &mut images, &mut labels)?;
    }
    Ok(Dataset {
        images,
        labels,
        shape: [3, 32, 32],
        num_classes: 10,
    })
}

/// Writes a small synthetic CIFAR-10 folder under `root`
/// (`cifar-10-batches-bin/` with the five training batches and the test
/// batch, `records_per_file` records each) and returns `root`. Labels cycle
/// through the classes and each image's brightness follows its label, so
/// there is something to learn. For tests and demos that must not need the
/// real data set.
pub fn write_synthetic(root: &Path, records_per_file: usize) -> Result<PathBuf> {
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    for (f, name) in TRAIN_FILES.iter().chain([&TEST_FILE]).enumerate() {
        let mut bytes = Vec::with_capacity(records_per_file * RECORD_BYTES);
        for i in 0..records_per_file {
            let label = ((i + f) % 10) as u8;
            bytes.push(label);
            bytes.extend(
                (0..IMAGE_BYTES).map(|p| label.wrapping_mul(25).wrapping_add((p % 7) as u8)),
            );
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(root.to_path_buf())
}

/// Appends the records of one batch file's bytes, validating them.
pub fn parse_batch(
    path: &Path,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    if bytes.is_empty() {
        return Err(DataError::format(path, "file is empty"));
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(DataError::format(
            path,
            format!(
                "{} bytes is not a whole number of {RECORD_BYTES}-byte records \
                 (truncated or not a CIFAR-10 binary batch)",
                bytes.len()
            ),
        ));
    }
    let count = bytes.len() / RECORD_BYTES;
    images.reserve(count * IMAGE_BYTES);
    labels.reserve(count);
    for (index, record) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if label > 9 {
            return Err(DataError::format(
                path,
                format!(
                    "record {index} (byte offset {}) has label {label}; CIFAR-10 labels are 0-9",
                    index * RECORD_BYTES
                ),
            ));
        }
        labels.push(label);
        images.extend_from_slice(&record[1..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic_batch(count: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(count * RECORD_BYTES);
        for i in 0..count {
            bytes.push((i % 10) as u8);
            bytes.extend((0..IMAGE_BYTES).map(|p| ((p + 7 * i) % 251) as u8));
        }
        bytes
    }

    #[test]
    fn loads_a_synthetic_batch_directory() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("cifar-10-batches-bin");
        std::fs::create_dir(&nested).unwrap();
        for (i, name) in TRAIN_FILES.iter().enumerate() {
            std::fs::write(nested.join(name), synthetic_batch(3 + i)).unwrap();
        }
        std::fs::write(nested.join(TEST_FILE), synthetic_batch(4)).unwrap();
        let (train, test) = load_cifar10(dir.path()).unwrap();
        assert_eq!(train.len(), 3 + 4 + 5 + 6 + 7);
        assert_eq!(test.len(), 4);
        assert_eq!(train.shape, [3, 32, 32]);
        assert_eq!(test.labels, vec![0, 1, 2, 3]);
        // Record 1 of the test batch: its red plane starts at pixel value 7.
        assert_eq!(test.images[IMAGE_BYTES], 7);
        assert_eq!(test.images.len(), 4 * IMAGE_BYTES);
    }

    #[test]
    fn rejects_truncated_empty_and_bad_label_files() {
        let path = Path::new("data_batch_1.bin");
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let mut bytes = synthetic_batch(2);
        bytes.pop();
        let err = parse_batch(path, &bytes, &mut images, &mut labels).unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
        let err = parse_batch(path, &[], &mut images, &mut labels).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let mut bytes = synthetic_batch(2);
        bytes[RECORD_BYTES] = 12;
        let err = parse_batch(path, &bytes, &mut images, &mut labels).unwrap_err();
        assert!(err.to_string().contains("label 12"), "{err}");
    }

    #[test]
    fn missing_directory_names_the_download_command() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_cifar10(dir.path()).unwrap_err();
        assert!(err.to_string().contains("xtask download cifar10"), "{err}");
    }

    #[test]
    fn real_test_batch_when_present() {
        // Checks against the shared, checksum-verified copy when this machine has it.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/cifar10");
        if !dir.join("cifar-10-batches-bin").join(TEST_FILE).is_file() {
            return;
        }
        let test = load_batches(&[batches_dir(&dir).unwrap().join(TEST_FILE)]).unwrap();
        assert_eq!(test.len(), 10_000);
        let mut counts = [0usize; 10];
        for &l in &test.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(
            counts, [1000; 10],
            "the test batch has 1000 images per class"
        );
    }
}
