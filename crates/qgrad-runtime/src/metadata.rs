//! The metadata that lets a compressed file run on its own.
//!
//! Keys (all values strings): `arch` (the [`Arch`] name), `act_bits`,
//! `norm.mean` / `norm.std` (JSON arrays of f32, which round-trip exactly),
//! `method`, `options` (JSON), `seed`, `qgrad_version`, `pact_bits` (only in
//! files with PACT activations, [`crate::pact`]), plus any extra pairs
//! the writer adds (e.g. `float_accuracy`). FORMAT.md of qgrad-csr lists them
//! too, so that a reader in another language knows them.

use qgrad_data::Normalization;
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::spec::Arch;

fn bad(message: impl Into<String>) -> RuntimeError {
    RuntimeError::Metadata(message.into())
}

/// Activation widths the integer kernels accept.
pub const ACT_BITS_RANGE: std::ops::RangeInclusive<u8> = 2..=16;

/// What a writer puts into a file besides the tensors.
#[derive(Debug, Clone)]
pub struct ExportMetadata {
    /// The network the file holds.
    pub arch: Arch,
    /// Activation width of the integer inference (2..=16).
    pub act_bits: u8,
    /// The input normalisation the network was trained with.
    pub norm: Normalization,
    /// `post-training`, `in-training`, `combined` (or anything descriptive).
    pub method: String,
    /// The method's options as JSON.
    pub options: serde_json::Value,
    /// The seed of the run that made the file.
    pub seed: Option<u64>,
    /// Further key/value pairs.
    pub extra: Vec<(String, String)>,
}

impl ExportMetadata {
    /// Checks the activation width and the normalisation against the network.
    pub fn validate(&self) -> Result<()> {
        if !ACT_BITS_RANGE.contains(&self.act_bits) {
            return Err(RuntimeError::Invalid(format!(
                "activation width {} is not allowed (2..=16)",
                self.act_bits
            )));
        }
        let channels = self.arch.input_shape()[0];
        if self.norm.mean.len() != channels || self.norm.std.len() != channels {
            return Err(RuntimeError::Invalid(format!(
                "normalisation has {} means and {} deviations for {channels} input channels",
                self.norm.mean.len(),
                self.norm.std.len()
            )));
        }
        Ok(())
    }

    /// The key/value pairs in the order they are written.
    pub fn to_pairs(&self) -> Result<Vec<(String, String)>> {
        self.validate()?;
        let mut pairs = vec![
            ("arch".to_string(), self.arch.name()),
            ("act_bits".to_string(), self.act_bits.to_string()),
            ("norm.mean".to_string(), json(&self.norm.mean)?),
            ("norm.std".to_string(), json(&self.norm.std)?),
            ("method".to_string(), self.method.clone()),
            ("options".to_string(), self.options.to_string()),
            (
                "qgrad_version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ];
        if let Some(seed) = self.seed {
            pairs.push(("seed".to_string(), seed.to_string()));
        }
        pairs.extend(self.extra.iter().cloned());
        Ok(pairs)
    }
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| bad(e.to_string()))
}

pub use qgrad_csr::{HIGH_SUFFIX, HIGH_WEIGHTS};

/// The metadata a compressed model file must carry to be run.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMetadata {
    /// The network.
    pub arch: Arch,
    /// Activation width of the integer inference.
    pub act_bits: u8,
    /// Per-channel input mean (pixels scaled to [0, 1]).
    pub mean: Vec<f32>,
    /// Per-channel input standard deviation.
    pub std: Vec<f32>,
    /// The method that made the file, if recorded.
    pub method: Option<String>,
    /// The seed of the run that made the file, if recorded.
    pub seed: Option<u64>,
    /// `k_a` of the layers whose input is PACT-quantized (key `pact_bits`;
    /// those layers carry a `<layer>.act_clip` tensor, see [`crate::pact`]).
    pub pact_bits: Option<u8>,
    /// The width of the high-width parts of split weights (key
    /// `high_weights`; those layers carry a `<layer>.weight_high` tensor
    /// whose product is added to the weight's, see FORMAT.md).
    pub high_weights: Option<u8>,
}

impl FileMetadata {
    /// The input normalisation.
    pub fn normalization(&self) -> Normalization {
        Normalization {
            mean: self.mean.clone(),
            std: self.std.clone(),
        }
    }
}

/// Reads and validates the metadata that [`crate::FileModel`] needs.
pub fn read_metadata(model: &qgrad_csr::CompressedModel) -> Result<FileMetadata> {
    let get = |key: &str| -> Result<&str> {
        model
            .metadata_value(key)
            .ok_or_else(|| bad(format!("no '{key}'")))
    };
    let arch: Arch = get("arch")?.parse().map_err(|e| bad(format!("{e}")))?;
    let act_bits: u8 = get("act_bits")?
        .parse()
        .ok()
        .filter(|b| ACT_BITS_RANGE.contains(b))
        .ok_or_else(|| bad("'act_bits' is not a width in 2..=16"))?;
    let floats = |key: &str| -> Result<Vec<f32>> {
        let v: Vec<f32> =
            serde_json::from_str(get(key)?).map_err(|e| bad(format!("'{key}': {e}")))?;
        if v.len() != arch.input_shape()[0] || v.iter().any(|x| !x.is_finite()) {
            return Err(bad(format!(
                "'{key}' must hold {} finite numbers",
                arch.input_shape()[0]
            )));
        }
        Ok(v)
    };
    let mean = floats("norm.mean")?;
    let std = floats("norm.std")?;
    if std.iter().any(|&s| s <= 0.0) {
        return Err(bad("'norm.std' must be positive"));
    }
    let pact_bits = match model.metadata_value("pact_bits") {
        None => None,
        Some(v) => Some(
            v.parse()
                .ok()
                .filter(|b| crate::pact::PACT_BITS_RANGE.contains(b))
                .ok_or_else(|| bad("'pact_bits' is not a width in 2..=16"))?,
        ),
    };
    let high_weights = match model.metadata_value(HIGH_WEIGHTS) {
        None => None,
        Some(v) => Some(
            v.parse()
                .ok()
                .filter(|b| (2..=16).contains(b))
                .ok_or_else(|| bad(format!("'{HIGH_WEIGHTS}' is not a width in 2..=16")))?,
        ),
    };
    Ok(FileMetadata {
        pact_bits,
        high_weights,
        arch,
        act_bits,
        mean,
        std,
        method: model.metadata_value("method").map(str::to_string),
        seed: model.metadata_value("seed").and_then(|s| s.parse().ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `shapes`, every element 0.25 at 4 bits, with `metadata`.
    fn file_of(
        shapes: &[(String, Vec<usize>)],
        metadata: &[(&str, &str)],
    ) -> qgrad_csr::CompressedModel {
        let values: Vec<Vec<f32>> = shapes
            .iter()
            .map(|(_, s)| vec![0.25; s.iter().product()])
            .collect();
        let widths: Vec<Vec<u8>> = values.iter().map(|v| vec![4; v.len()]).collect();
        let tensors: Vec<qgrad_csr::TensorData> = shapes
            .iter()
            .zip(values.iter().zip(&widths))
            .map(|((name, shape), (values, widths))| qgrad_csr::TensorData {
                name,
                shape,
                values,
                widths,
                exponent: None,
            })
            .collect();
        let options = qgrad_csr::EncodeOptions {
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let bytes = qgrad_csr::encode(&tensors, &options).unwrap();
        qgrad_csr::CompressedModel::from_bytes(&bytes).unwrap()
    }

    #[test]
    fn files_without_the_metadata_to_run_them_are_rejected() {
        let shapes = Arch::Lenet300100.parameter_shapes();
        let cases: [Vec<(&str, &str)>; 4] = [
            vec![],
            vec![
                ("arch", "resnet"),
                ("act_bits", "16"),
                ("norm.mean", "[0.1]"),
                ("norm.std", "[0.3]"),
            ],
            vec![
                ("arch", "lenet-300-100"),
                ("act_bits", "40"),
                ("norm.mean", "[0.1]"),
                ("norm.std", "[0.3]"),
            ],
            vec![
                ("arch", "lenet-5"),
                ("act_bits", "8"),
                ("norm.mean", "[0.1]"),
                ("norm.std", "[0.3]"),
            ],
        ];
        for metadata in cases {
            let model = file_of(&shapes, &metadata);
            let err = crate::FileModel::new(&model)
                .err()
                .expect("must be rejected");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn a_high_width_part_needs_its_key_and_its_weight_shape() {
        let shapes = Arch::Lenet300100.parameter_shapes();
        let fc1: Vec<usize> = shapes
            .iter()
            .find(|(n, _)| n == "fc1.weight")
            .unwrap()
            .1
            .clone();
        let high = format!("fc1.weight{HIGH_SUFFIX}");
        let base = |high_shape: &[usize], key: bool| {
            let mut all = shapes.clone();
            all.push((high.clone(), high_shape.to_vec()));
            let mut metadata = vec![
                ("arch", "lenet-300-100"),
                ("act_bits", "8"),
                ("norm.mean", "[0.1]"),
                ("norm.std", "[0.3]"),
            ];
            if key {
                metadata.push((HIGH_WEIGHTS, "8"));
            }
            file_of(&all, &metadata)
        };
        let good = base(&fc1, true);
        assert!(crate::FileModel::new(&good).is_ok());
        // Each parameter once: the high part is fc1's own.
        assert_eq!(
            good.num_parameters(),
            Arch::Lenet300100.num_parameters() as u64
        );
        assert!(crate::FileModel::new(&base(&fc1, false)).is_err());
        assert!(crate::FileModel::new(&base(&[fc1[0], fc1[1] - 1], true)).is_err());
    }
}
