//! Export of a quantized model to the compressed file of qgrad-csr, with the
//! metadata that lets the file run on its own (`qgrad_runtime::metadata`).
//!
//! The file holds every trainable parameter with its per-element widths and
//! its quantizer's exponent, plus the batch-norm running statistics as f32
//! (width 32) tensors. A batch norm whose γ and β stayed f32 (the loss-aware
//! methods, which quantize only the weights of linear and convolution layers)
//! is stored folded for inference instead, as `<layer>.bn.scale` and
//! `<layer>.bn.shift` ([`qgrad_runtime::fold_batch_norm`]): two vectors instead
//! of four, computed by the same f32 formula that the integer inference and
//! the candle-side twin use. Nothing is folded into the preceding layer's
//! weights: that would change the quantized weights, and the integer
//! inference must compute exactly what the candle-side quantized model does.
//! A batch norm whose γ or β was quantized is stored as its four tensors.
//!
//! After writing, the exporter decodes the file it wrote and checks that every
//! parameter decodes to exactly the quantized values it was given (bit for
//! bit); a file that would not reproduce the quantized model is an error, not
//! a silent accuracy change.

use std::path::Path;

use qgrad_csr::{
    CompressedModel, EncodeOptions, LayoutChoice, LevelKind, ScaledTensorData, SizeReport,
    TensorData, TensorInput,
};
use qgrad_fixed::FLOAT;
pub use qgrad_runtime::ExportMetadata;
use qgrad_scaled::Method;

use crate::error::{ModelsError, Result};
use crate::methods::{QuantizedTensor, ScaledWeight};
use crate::NamedTensor;

/// The file extension of compressed models (FORMAT.md).
pub const EXTENSION: &str = "qgz";

/// Writes `quantized` parameters and f32 `buffers` to `path` (atomically) and
/// returns the size report of the file on disk.
pub fn export(
    path: &Path,
    quantized: &[QuantizedTensor],
    buffers: &[NamedTensor],
    meta: &ExportMetadata,
    layout: LayoutChoice,
) -> Result<SizeReport> {
    export_with_scaled(path, quantized, &[], buffers, meta, layout)
}

/// The fixed tensors and buffers a file of `arch` stores: every batch norm
/// whose γ and β are f32 throughout (width 32 everywhere) and whose running
/// statistics are present is replaced by its folded `<layer>.bn.scale` and
/// `<layer>.bn.shift` (as buffers); everything else is kept as it is.
pub fn fold_float_batch_norms(
    arch: qgrad_runtime::Arch,
    quantized: &[QuantizedTensor],
    buffers: &[NamedTensor],
) -> (Vec<QuantizedTensor>, Vec<NamedTensor>) {
    let float_param = |name: &str| {
        quantized
            .iter()
            .find(|q| q.name == name && q.widths.iter().all(|&w| w == FLOAT))
    };
    let buffer = |name: &str| buffers.iter().find(|b| b.name == name);
    let mut dropped: Vec<String> = Vec::new();
    let mut folded: Vec<NamedTensor> = Vec::new();
    for layer in arch.layers() {
        let qgrad_runtime::LayerSpec::BatchNorm { name, channels } = layer else {
            continue;
        };
        let names = ["bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
            .map(|suffix| format!("{name}.{suffix}"));
        let (Some(gamma), Some(beta), Some(mean), Some(var)) = (
            float_param(&names[0]),
            float_param(&names[1]),
            buffer(&names[2]),
            buffer(&names[3]),
        ) else {
            continue;
        };
        if [
            gamma.values.len(),
            beta.values.len(),
            mean.values.len(),
            var.values.len(),
        ] != [channels; 4]
        {
            // Left to the file's shape checks to report.
            continue;
        }
        let (scale, shift) =
            qgrad_runtime::fold_batch_norm(&gamma.values, &beta.values, &mean.values, &var.values);
        for (suffix, values) in [
            (qgrad_runtime::BN_SCALE, scale),
            (qgrad_runtime::BN_SHIFT, shift),
        ] {
            folded.push(NamedTensor {
                name: format!("{name}.{suffix}"),
                shape: vec![channels],
                values,
            });
        }
        dropped.extend(names);
    }
    let kept_params = quantized
        .iter()
        .filter(|q| !dropped.contains(&q.name))
        .cloned()
        .collect();
    let kept_buffers = buffers
        .iter()
        .filter(|b| !dropped.contains(&b.name))
        .cloned()
        .chain(folded)
        .collect();
    (kept_params, kept_buffers)
}

/// How the codes of `w` are stored: [`scaled_layout`] of its quantizer,
/// except that binary codes with zeros (a binary quantizer under a non-zero
/// budget: ±α or 0) are stored as ternary codes, whose levels are the same,
/// unless their zeros fill whole blocks (a block-sparsity mask, METHOD §9):
/// then they can stay binary, one bit per kept weight in layout 3, and do
/// when that encoding is the smaller of the two.
pub fn weight_layout(w: &ScaledWeight) -> (LevelKind, u8, bool) {
    if w.method.binary() && w.quantized.codes.contains(&0) {
        let bytes = |levels: LevelKind| {
            let input = TensorInput::Scaled(ScaledTensorData {
                name: &w.name,
                shape: &w.shape,
                codes: &w.quantized.codes,
                levels,
                max_code: 1,
                groups: w.groups,
                two_sided: false,
                scales: &w.quantized.scales,
            });
            let options = EncodeOptions {
                layout: LayoutChoice::Auto,
                metadata: Vec::new(),
                ..Default::default()
            };
            qgrad_csr::encode_tensors(&[input], &options).map(|b| b.len())
        };
        return match (bytes(LevelKind::Binary), bytes(LevelKind::Linear)) {
            (Ok(binary), Ok(ternary)) if binary <= ternary => (LevelKind::Binary, 1, false),
            _ => (LevelKind::Linear, 1, false),
        };
    }
    scaled_layout(w.method)
}

/// How a quantizer's codes are stored: level function, largest code,
/// two-sided scales.
pub fn scaled_layout(method: Method) -> (LevelKind, u8, bool) {
    let levels = match method {
        m if m.binary() => LevelKind::Binary,
        Method::Laq { log: true, .. } => LevelKind::Log,
        _ => LevelKind::Linear,
    };
    (
        levels,
        method.max_code() as u8,
        method.scales_per_group() == 2,
    )
}

/// [`export`] with some weights as scaled codes (loss-aware quantization).
pub fn export_with_scaled(
    path: &Path,
    quantized: &[QuantizedTensor],
    scaled: &[ScaledWeight],
    buffers: &[NamedTensor],
    meta: &ExportMetadata,
    layout: LayoutChoice,
) -> Result<SizeReport> {
    let metadata = meta
        .to_pairs()
        .map_err(|e| ModelsError::Config(e.to_string()))?;
    let (quantized, buffers) = fold_float_batch_norms(meta.arch, quantized, buffers);
    let (quantized, buffers) = (quantized.as_slice(), buffers.as_slice());
    let float_widths: Vec<Vec<u8>> = buffers
        .iter()
        .map(|b| vec![FLOAT; b.values.len()])
        .collect();
    let mut tensors = Vec::with_capacity(quantized.len() + scaled.len() + buffers.len());
    for q in quantized {
        tensors.push(TensorInput::Fixed(TensorData {
            name: &q.name,
            shape: &q.shape,
            values: &q.values,
            widths: &q.widths,
            exponent: Some(q.exponent),
        }));
    }
    for w in scaled {
        let (levels, max_code, two_sided) = weight_layout(w);
        tensors.push(TensorInput::Scaled(ScaledTensorData {
            name: &w.name,
            shape: &w.shape,
            codes: &w.quantized.codes,
            levels,
            max_code,
            groups: w.groups,
            two_sided,
            scales: &w.quantized.scales,
        }));
    }
    for (b, widths) in buffers.iter().zip(&float_widths) {
        tensors.push(TensorInput::Fixed(TensorData {
            name: &b.name,
            shape: &b.shape,
            values: &b.values,
            widths,
            exponent: None,
        }));
    }
    let options = EncodeOptions {
        layout,
        metadata,
        ..EncodeOptions::default()
    };
    let bytes = qgrad_csr::encode_tensors(&tensors, &options)?;
    let decoded = CompressedModel::from_bytes(&bytes)?;
    verify_round_trip(&decoded, quantized, buffers)?;
    verify_values(
        &decoded,
        scaled.iter().map(|w| (&w.name, &w.quantized.values)),
    )?;
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
    Ok(qgrad_csr::write_bytes_atomically(path, bytes)?)
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
    verify_values(model, expected)
}

fn verify_values<'a>(
    model: &CompressedModel,
    expected: impl Iterator<Item = (&'a String, &'a Vec<f32>)>,
) -> Result<()> {
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
                 quantized model ({:?}); the file would not reproduce it",
                values.len(),
                t.kind()
            )));
        }
    }
    Ok(())
}
