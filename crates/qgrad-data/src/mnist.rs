//! MNIST in the IDX format (`train-images-idx3-ubyte.gz` and friends).
//!
//! Each file is read whole (gzip-compressed, or uncompressed under the same
//! name minus `.gz`) and validated before use: magic number, dimensions, the
//! declared count against the actual length, image/label counts agreeing, and
//! labels below 10. Decompression is capped at the size the header declares,
//! so a corrupt or hostile file cannot make us allocate without bound.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::error::{DataError, Result};
use crate::image::Dataset;

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const SIDE: usize = 28;
/// Larger than any real MNIST split (60,000); rejects absurd headers before allocating.
const MAX_EXAMPLES: usize = 10_000_000;

/// The four files of the standard distribution, without `.gz`.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Loads `(train, test)` from `dir`.
pub fn load_mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
    let train = load_split(dir, FILES[0], FILES[1])?;
    let test = load_split(dir, FILES[2], FILES[3])?;
    Ok((train, test))
}

fn load_split(dir: &Path, images: &str, labels: &str) -> Result<Dataset> {
    let (images_path, images) = read_idx(dir, images, IMAGES_MAGIC, 3)?;
    let (labels_path, labels) = read_idx(dir, labels, LABELS_MAGIC, 1)?;
    let (image_dims, pixels) = images;
    let (label_dims, labels) = labels;
    if image_dims[1] != SIDE || image_dims[2] != SIDE {
        return Err(DataError::format(
            &images_path,
            format!(
                "images are {}x{}, MNIST images are {SIDE}x{SIDE}",
                image_dims[1], image_dims[2]
            ),
        ));
    }
    if image_dims[0] != label_dims[0] {
        return Err(DataError::format(
            &labels_path,
            format!(
                "{} labels for {} images in {}",
                label_dims[0],
                image_dims[0],
                images_path.display()
            ),
        ));
    }
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= 10) {
        return Err(DataError::format(
            &labels_path,
            format!("label {l} of example {i} is not a digit 0-9"),
        ));
    }
    Ok(Dataset {
        images: pixels,
        labels,
        shape: [1, SIDE, SIDE],
        num_classes: 10,
    })
}

/// Finds `<name>.gz` or `<name>` in `dir`.
fn locate(dir: &Path, name: &str) -> Result<(PathBuf, bool)> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok((gz, true));
    }
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok((raw, false));
    }
    Err(DataError::format(
        &gz,
        format!(
            "not found (nor {}); download MNIST with `cargo xtask download mnist`",
            raw.display()
        ),
    ))
}

/// Reads one IDX file with `rank` dimensions and the given magic number.
/// Returns its path, dimensions and payload.
#[allow(clippy::type_complexity)]
fn read_idx(
    dir: &Path,
    name: &str,
    magic: u32,
    rank: usize,
) -> Result<(PathBuf, (Vec<usize>, Vec<u8>))> {
    let (path, gz) = locate(dir, name)?;
    let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
    let mut reader: Box<dyn Read> = if gz {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let read_err = |e: std::io::Error| {
        DataError::format(
            &path,
            format!(
                "cannot read{}: {e}",
                if gz { " (corrupt gzip?)" } else { "" }
            ),
        )
    };
    let header_len = 4 + 4 * rank;
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            DataError::format(&path, format!("shorter than its {header_len}-byte header"))
        } else {
            read_err(e)
        }
    })?;
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let found = word(0);
    if found != magic {
        return Err(DataError::format(
            &path,
            format!("bad magic number 0x{found:08x}, expected 0x{magic:08x}"),
        ));
    }
    let dims: Vec<usize> = (0..rank).map(|d| word(4 + 4 * d) as usize).collect();
    if dims[0] > MAX_EXAMPLES {
        return Err(DataError::format(
            &path,
            format!("declares {} examples, more than any MNIST file", dims[0]),
        ));
    }
    let payload_len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_EXAMPLES * SIDE * SIDE)
        .ok_or_else(|| DataError::format(&path, format!("absurd dimensions {dims:?}")))?;
    // Read at most one byte more than declared, to detect trailing data
    // without trusting the file to end.
    let mut payload = Vec::with_capacity(payload_len);
    reader
        .take(payload_len as u64 + 1)
        .read_to_end(&mut payload)
        .map_err(read_err)?;
    if payload.len() != payload_len {
        let what = if payload.len() < payload_len {
            "truncated"
        } else {
            "longer than declared"
        };
        return Err(DataError::format(
            &path,
            format!(
                "{what}: header declares {dims:?} = {payload_len} bytes of data, found {}{}",
                payload.len(),
                if payload.len() > payload_len { "+" } else { "" }
            ),
        ));
    }
    Ok((path, (dims, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mini_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini")
    }

    #[test]
    fn loads_the_shipped_subset() {
        let (train, test) = load_mnist(&mini_dir()).unwrap();
        assert_eq!(train.len(), 6000);
        assert_eq!(test.len(), 1000);
        assert_eq!(train.shape, [1, 28, 28]);
        assert_eq!(train.images.len(), 6000 * 784);
        // Every digit occurs.
        for d in 0..10u8 {
            assert!(train.labels.contains(&d));
        }
    }

    fn write_gz(path: &Path, bytes: &[u8]) {
        let f = File::create(path).unwrap();
        let mut enc = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap();
    }

    fn idx(magic: u32, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend(d.to_be_bytes());
        }
        v.extend(payload);
        v
    }

    /// A valid 2-image dataset, uncompressed, with one file replaced.
    fn dataset_with(replace: Option<(&str, Vec<u8>)>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let images = idx(IMAGES_MAGIC, &[2, 28, 28], &[7u8; 2 * 784]);
        let labels = idx(LABELS_MAGIC, &[2], &[3, 9]);
        for (i, name) in FILES.iter().enumerate() {
            let bytes = if i % 2 == 0 { &images } else { &labels };
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        if let Some((name, bytes)) = replace {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    fn err_of(dir: &tempfile::TempDir) -> String {
        load_mnist(dir.path()).unwrap_err().to_string()
    }

    #[test]
    fn accepts_uncompressed_files() {
        let dir = dataset_with(None);
        let (train, test) = load_mnist(dir.path()).unwrap();
        assert_eq!(train.labels, vec![3, 9]);
        assert_eq!(test.len(), 2);
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let bad_magic = dataset_with(Some((FILES[0], idx(0x0803_0000, &[2, 28, 28], &[0; 1568]))));
        assert!(
            err_of(&bad_magic).contains("bad magic number"),
            "{}",
            err_of(&bad_magic)
        );

        let truncated = dataset_with(Some((
            FILES[0],
            idx(IMAGES_MAGIC, &[2, 28, 28], &[0; 1000]),
        )));
        let msg = err_of(&truncated);
        assert!(msg.contains("truncated") && msg.contains(FILES[0]), "{msg}");

        let long = dataset_with(Some((FILES[1], idx(LABELS_MAGIC, &[2], &[1, 2, 3]))));
        assert!(
            err_of(&long).contains("longer than declared"),
            "{}",
            err_of(&long)
        );

        let count = dataset_with(Some((FILES[1], idx(LABELS_MAGIC, &[3], &[1, 2, 3]))));
        assert!(
            err_of(&count).contains("3 labels for 2 images"),
            "{}",
            err_of(&count)
        );

        let size = dataset_with(Some((
            FILES[0],
            idx(IMAGES_MAGIC, &[2, 32, 32], &[0; 2048]),
        )));
        assert!(err_of(&size).contains("32x32"), "{}", err_of(&size));

        let label = dataset_with(Some((FILES[1], idx(LABELS_MAGIC, &[2], &[1, 12]))));
        assert!(err_of(&label).contains("label 12"), "{}", err_of(&label));

        let header = dataset_with(Some((FILES[0], vec![0, 0, 8])));
        assert!(err_of(&header).contains("header"), "{}", err_of(&header));

        let huge = dataset_with(Some((
            FILES[0],
            idx(IMAGES_MAGIC, &[u32::MAX, 28, 28], &[]),
        )));
        assert!(err_of(&huge).contains("examples"), "{}", err_of(&huge));

        let empty = tempfile::tempdir().unwrap();
        assert!(err_of(&empty).contains("not found"));
    }

    #[test]
    fn corrupt_gzip_is_reported() {
        let dir = dataset_with(None);
        std::fs::remove_file(dir.path().join(FILES[0])).unwrap();
        let gz = dir.path().join(format!("{}.gz", FILES[0]));
        write_gz(&gz, &idx(IMAGES_MAGIC, &[2, 28, 28], &[1; 1568]));
        assert!(load_mnist(dir.path()).is_ok());
        let mut bytes = std::fs::read(&gz).unwrap();
        let mid = bytes.len() / 2;
        bytes.truncate(mid);
        std::fs::write(&gz, &bytes).unwrap();
        let msg = err_of(&dir);
        assert!(msg.contains(FILES[0]), "{msg}");
    }
}
