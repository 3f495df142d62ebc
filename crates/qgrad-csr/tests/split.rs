//! Files with split weights (FORMAT.md section 3, version 6): written at
//! version 6 and no lower, refused by a writer held to an older version, and
//! a version-5 file that claims them is rejected.

use qgrad_csr::{
    encode, CompressedModel, CsrError, EncodeOptions, TensorData, HIGH_WEIGHTS,
    SPLIT_WEIGHTS_VERSION,
};

fn tensors() -> (Vec<f32>, Vec<u8>) {
    (vec![0.5, 0.0, -0.25, 0.75], vec![8, 0, 8, 8])
}

fn options(split: bool, max_version: Option<u32>) -> EncodeOptions {
    let mut metadata = vec![("arch".to_string(), "x".to_string())];
    if split {
        metadata.push((HIGH_WEIGHTS.to_string(), "8".to_string()));
    }
    EncodeOptions {
        metadata,
        max_version,
        ..Default::default()
    }
}

fn write(split: bool, max_version: Option<u32>) -> Result<Vec<u8>, CsrError> {
    let (values, widths) = tensors();
    let t = TensorData {
        name: "fc.weight_high",
        shape: &[2, 2],
        values: &values,
        widths: &widths,
        exponent: None,
    };
    encode(&[t], &options(split, max_version))
}

fn version(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn split_weights_are_version_6_and_older_ones_refuse_them() {
    // Fixed tensors alone are version 1; the key makes the file version 6.
    assert_eq!(version(&write(false, None).unwrap()), 1);
    let split = write(true, None).unwrap();
    assert_eq!(version(&split), SPLIT_WEIGHTS_VERSION);
    let m = CompressedModel::from_bytes(&split).unwrap();
    assert_eq!(m.metadata_value(HIGH_WEIGHTS), Some("8"));
    // Held to version 5, the writer refuses instead of writing a file an
    // old reader would run without the high-width parts.
    assert!(matches!(
        write(true, Some(5)),
        Err(CsrError::VersionTooLow { needed: 6, .. })
    ));
    // A version-5 file with the key is corrupt: patch the version and the
    // checksum of a valid version-6 file.
    let mut old = split.clone();
    old[8..12].copy_from_slice(&5u32.to_le_bytes());
    let end = old.len() - 4;
    let crc = crc32fast::hash(&old[..end]);
    old[end..].copy_from_slice(&crc.to_le_bytes());
    let err = CompressedModel::from_bytes(&old).unwrap_err();
    assert!(err.to_string().contains(HIGH_WEIGHTS), "{err}");
}
