//! Export of a quantized model to the compressed file of qgrad-csr, and the
//! metadata that lets the file run on its own ([`crate::int_infer`]).
//!
//! The file holds every trainable parameter with its per-element widths and
//! its quantizer's exponent, plus the batch-norm running statistics as f32
//! (width 32) tensors. Statistics are stored, not folded into the preceding
//! convolution: folding would change the quantized weights, and the integer
//! inference must compute exactly what the candle-side quantized model does.
//!
//! Metadata keys (all strings): `arch` (the `Arch` name), `act_bits`,
//! `norm.mean` / `norm.std` (JSON arrays of f32, which round-trip exactly),
//! `method`, `options` (JSON), `seed`, `qgrad_version`, plus any extra pairs
//! the caller adds (e.g. `float_accuracy`).
//!
//! After writing, the exporter decodes the file it wrote and checks that every
//! parameter decodes to exactly the quantized values it was given (bit for
//! bit); a file that would not reproduce the quantized model is an error, not
//! a silent accuracy change.

use std::path::Path;

use qgrad_csr::{CompressedModel, EncodeOptions, LayoutChoice, SizeReport, TensorData};
use qgrad_fixed::FLOAT;
use serde::Serialize;

use crate::data::Normalization;
use crate::error::{ModelsError, Result};
use crate::quantize::QuantizedTensor;
use crate::{Arch, NamedTensor};

fn invalid(message: impl Into<String>) -> ModelsError {
    ModelsError::Config(message.into())
}

/// What to write into the file besides the tensors.
#[derive(Debug, Clone)]
pub struct ExportMetadata {
    pub arch: Arch,
    /// Activation width of the integer inference (2..=16).
    pub act_bits: u8,
    pub norm: Normalization,
    /// `post-training`, `in-training`, `combined` (or anything descriptive).
    pub method: String,
    /// The method's options as JSON.
    pub options: serde_json::Value,
    pub seed: Option<u64>,
    /// Further key/value pairs.
    pub extra: Vec<(String, String)>,
}

/// The metadata a compressed model file must carry to be run.
#[derive(Debug, Clone, PartialEq)]
pub struct FileMetadata {
    pub arch: Arch,
    pub act_bits: u8,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub method: Option<String>,
    pub seed: Option<u64>,
}

/// Writes `quantized` parameters and f32 `buffers` to `path` (atomically) and
/// returns the size report of the file on disk.
pub fn export(
    path: &Path,
    quantized: &[QuantizedTensor],
    buffers: &[NamedTensor],
    meta: &ExportMetadata,
    layout: LayoutChoice,
) -> Result<SizeReport> {
    if !(2..=16).contains(&meta.act_bits) {
        return Err(invalid(format!(
            "activation width {} is not allowed (2..=16)",
            meta.act_bits
        )));
    }
    let channels = meta.arch.input_shape()[0];
    if meta.norm.mean.len() != channels || meta.norm.std.len() != channels {
        return Err(invalid(format!(
            "normalisation has {} means and {} deviations for {channels} input channels",
            meta.norm.mean.len(),
            meta.norm.std.len()
        )));
    }
    let float_widths: Vec<Vec<u8>> = buffers
        .iter()
        .map(|b| vec![FLOAT; b.values.len()])
        .collect();
    let mut tensors = Vec::with_capacity(quantized.len() + buffers.len());
    for q in quantized {
        tensors.push(TensorData {
            name: &q.name,
            shape: &q.shape,
            values: &q.values,
            widths: &q.widths,
            exponent: Some(q.exponent),
        });
    }
    for (b, widths) in buffers.iter().zip(&float_widths) {
        tensors.push(TensorData {
            name: &b.name,
            shape: &b.shape,
            values: &b.values,
            widths,
            exponent: None,
        });
    }
    let mut metadata = vec![
        ("arch".to_string(), meta.arch.name().to_string()),
        ("act_bits".to_string(), meta.act_bits.to_string()),
        ("norm.mean".to_string(), json(&meta.norm.mean)?),
        ("norm.std".to_string(), json(&meta.norm.std)?),
        ("method".to_string(), meta.method.clone()),
        ("options".to_string(), meta.options.to_string()),
        (
            "qgrad_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    if let Some(seed) = meta.seed {
        metadata.push(("seed".to_string(), seed.to_string()));
    }
    metadata.extend(meta.extra.iter().cloned());
    let options = EncodeOptions { layout, metadata };
    let bytes = qgrad_csr::encode(&tensors, &options)?;
    let decoded = CompressedModel::from_bytes(&bytes)?;
    verify_round_trip(&decoded, quantized, buffers)?;
    write_atomically(path, &bytes)?;
    let on_disk = std::fs::metadata(path)
        .map_err(|e| ModelsError::io(path, e))?
        .len();
    let report = decoded.size_report();
    if on_disk != report.file_bytes {
        return Err(ModelsError::Other(format!(
            "{}: wrote {} bytes but the file has {on_disk}",
            path.display(),
            report.file_bytes
        )));
    }
    Ok(report)
}

/// Temporary file in the same directory, synced, renamed over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ModelsError::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| ModelsError::io(path, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| ModelsError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| ModelsError::io(path, e.error))?;
    Ok(())
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|e| ModelsError::Other(format!("metadata: {e}")))
}

/// Checks that every tensor of `model` decodes to exactly the given values.
pub fn verify_round_trip(
    model: &CompressedModel,
    quantized: &[QuantizedTensor],
    buffers: &[NamedTensor],
) -> Result<()> {
    let expected = quantized
        .iter()
        .map(|q| (&q.name, &q.values))
        .chain(buffers.iter().map(|b| (&b.name, &b.values)));
    for (name, values) in expected {
        let t = model
            .tensor(name)
            .ok_or_else(|| ModelsError::Other(format!("the encoded file lacks tensor '{name}'")))?;
        let decoded = t.dequantize();
        let differing = decoded
            .iter()
            .zip(values.iter())
            .filter(|(a, b)| a != b)
            .count();
        if differing > 0 || decoded.len() != values.len() {
            return Err(ModelsError::Other(format!(
                "tensor '{name}': {differing} of {} values decode differently from the \
                 quantized model (file exponent {}); the file would not reproduce it",
                values.len(),
                t.exponent
            )));
        }
    }
    Ok(())
}

/// Reads and validates the metadata that [`crate::int_infer`] needs.
pub fn read_metadata(model: &CompressedModel) -> Result<FileMetadata> {
    let get = |key: &str| -> Result<&str> {
        model
            .metadata_value(key)
            .ok_or_else(|| invalid(format!("the file's metadata has no '{key}'")))
    };
    let arch: Arch = get("arch")?
        .parse()
        .map_err(|e| invalid(format!("the file's metadata: {e}")))?;
    let act_bits: u8 = get("act_bits")?
        .parse()
        .ok()
        .filter(|b| (2..=16).contains(b))
        .ok_or_else(|| invalid("the file's metadata 'act_bits' is not a width in 2..=16"))?;
    let floats = |key: &str| -> Result<Vec<f32>> {
        let v: Vec<f32> = serde_json::from_str(get(key)?)
            .map_err(|e| invalid(format!("the file's metadata '{key}': {e}")))?;
        if v.len() != arch.input_shape()[0] || v.iter().any(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "the file's metadata '{key}' must hold {} finite numbers",
                arch.input_shape()[0]
            )));
        }
        Ok(v)
    };
    let mean = floats("norm.mean")?;
    let std = floats("norm.std")?;
    if std.iter().any(|&s| s <= 0.0) {
        return Err(invalid("the file's metadata 'norm.std' must be positive"));
    }
    Ok(FileMetadata {
        arch,
        act_bits,
        mean,
        std,
        method: model.metadata_value("method").map(str::to_string),
        seed: model.metadata_value("seed").and_then(|s| s.parse().ok()),
    })
}
