//! Whole-network inference straight from the compressed file, with the
//! integer kernels of qgrad-csr (METHOD.md §6).
//!
//! The runtime interprets the one layer list [`Arch::layers`]:
//! linear → `CompressedTensor::matmul`, convolution → `CompressedTensor::conv2d`,
//! bias added in f32, batch norm in f32 from the stored running statistics,
//! ReLU, max pooling, flatten; dropout is the identity. Before every linear or
//! convolution layer the activations are quantized to `act_bits` bits with one
//! exponent per sample (`FixedActivations::quantize`: exponent
//! `ceil(log2(max |x|))` over the sample's whole input to that layer),
//! except for layers that carry a PACT clip (`<layer>.act_clip`, METHOD §9):
//! their input becomes `pact_bits`-bit unsigned codes and each output is
//! multiplied by the step `β / L` once ([`crate::pact`]).
//!
//! The training side (`qgrad-models`) has a candle twin of this evaluation
//! that does the linear and convolution layers in f64, where every product
//! and partial sum of the ≤16-bit fixed-point numbers is exact; both round to
//! f32 once per output and do the other operations as the same sequence of
//! IEEE f32 operations, so they agree image for image (its module docs give
//! the argument).
//!
//! Batch-norm statistics are stored in the file as f32 tensors (width 32), not
//! folded into the convolution: folding would change the quantized weights and
//! break the exact equality with the training-side model.

use qgrad_csr::{CompressedModel, CompressedTensor, FixedActivations};
use qgrad_data::{epoch_rng, Augment, Dataset, Normalization};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Result, RuntimeError};
use crate::metadata::{read_metadata, FileMetadata};
use crate::spec::{Arch, LayerSpec};
use crate::BN_EPS;

/// Default activation width.
pub const DEFAULT_ACT_BITS: u8 = 16;

fn invalid(message: impl Into<String>) -> RuntimeError {
    RuntimeError::Invalid(message.into())
}

/// Accuracy and per-image results of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// Images classified correctly.
    pub correct: usize,
    /// Images evaluated.
    pub total: usize,
    /// `correct / total` (0 for no images).
    pub accuracy: f64,
    /// Predicted class per image, in dataset order.
    pub predictions: Vec<u32>,
    /// Logits, `total × classes`, row-major (not serialized).
    #[serde(skip)]
    pub logits: Vec<f32>,
}

impl EvalReport {
    /// The report of `logits` (`labels.len() × classes`, row-major) against
    /// `labels`; the prediction is the first maximum of each row.
    pub fn from_logits(logits: Vec<f32>, classes: usize, labels: &[u8]) -> Self {
        let predictions: Vec<u32> = logits.chunks_exact(classes).map(argmax).collect();
        let correct = predictions
            .iter()
            .zip(labels)
            .filter(|(p, l)| **p == **l as u32)
            .count();
        let total = labels.len();
        EvalReport {
            correct,
            total,
            accuracy: if total == 0 {
                0.0
            } else {
                correct as f64 / total as f64
            },
            predictions,
            logits,
        }
    }

    /// Number of images on which two evaluations predict different classes.
    pub fn mismatches(&self, other: &EvalReport) -> usize {
        self.predictions
            .iter()
            .zip(&other.predictions)
            .filter(|(a, b)| a != b)
            .count()
            + self.predictions.len().abs_diff(other.predictions.len())
    }
}

/// Index of the first maximum (NaN never wins).
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The dataset's indices in order, cut into batches of `batch`.
pub fn batches(data: &Dataset, batch: usize) -> impl Iterator<Item = Vec<usize>> + '_ {
    let batch = batch.max(1);
    (0..data.len())
        .step_by(batch)
        .map(move |s| (s..(s + batch).min(data.len())).collect())
}

/// Checks that `data`'s images have the shape `arch` takes.
pub fn check_dataset(arch: Arch, data: &Dataset) -> Result<()> {
    if data.shape != arch.input_shape() {
        return Err(invalid(format!(
            "{} expects images of shape {:?}, the dataset has {:?}",
            arch.name(),
            arch.input_shape(),
            data.shape
        )));
    }
    Ok(())
}

/// Host-side f32 activations of one batch, `[n, c, h, w]` or `[n, features]`.
struct Activations {
    values: Vec<f32>,
    n: usize,
    /// Per-sample shape.
    shape: Vec<usize>,
}

impl Activations {
    fn per_sample(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A compressed model ready to run: the file's tensors plus the float parts
/// (biases, batch-norm parameters and statistics) dequantized once.
pub struct FileModel<'m> {
    /// The decoded file.
    pub model: &'m CompressedModel,
    /// Its validated metadata.
    pub meta: FileMetadata,
    arch: Arch,
    /// PACT clip `β` per layer that has one.
    clips: std::collections::HashMap<String, f32>,
    /// The high-width part of each split weight, by layer.
    highs: std::collections::HashMap<String, &'m CompressedTensor>,
}

impl<'m> FileModel<'m> {
    /// Validates the metadata and that every tensor the network needs is in
    /// the file with the right shape.
    pub fn new(model: &'m CompressedModel) -> Result<Self> {
        let meta = read_metadata(model)?;
        let arch = meta.arch;
        let mut model_ref = FileModel {
            model,
            meta,
            arch,
            clips: Default::default(),
            highs: Default::default(),
        };
        // Check every tensor the layer list needs, with its shape, up front.
        // A batch norm is stored folded or as its four tensors (FORMAT.md).
        for (name, shape) in arch.stored_tensor_shapes(|layer| model_ref.is_folded(layer)) {
            let t = model_ref.tensor(&name)?;
            if t.shape != shape {
                return Err(invalid(format!(
                    "tensor '{name}' in the file has shape {:?}, {} needs {:?}",
                    t.shape,
                    arch.name(),
                    shape
                )));
            }
        }
        for layer in arch.layers() {
            let (LayerSpec::Linear { name, .. } | LayerSpec::Conv2d { name, .. }) = layer else {
                continue;
            };
            let weight = format!("{name}.weight");
            if let Some(high) = model_ref.model.high_part(&weight) {
                let high_name = &high.name;
                if model_ref.meta.high_weights.is_none() {
                    return Err(invalid(format!(
                        "tensor '{high_name}' is a split weight's high-width part, but the \
                         metadata has no '{}'",
                        crate::metadata::HIGH_WEIGHTS
                    )));
                }
                let shape = &model_ref.tensor(&weight)?.shape;
                if &high.shape != shape {
                    return Err(invalid(format!(
                        "tensor '{high_name}' has shape {:?}, its weight {shape:?}",
                        high.shape
                    )));
                }
                model_ref.highs.insert(name.clone(), high);
            }
            let clip_name = format!("{name}.{}", crate::pact::ACT_CLIP);
            let Some(t) = model_ref.model.tensor(&clip_name) else {
                continue;
            };
            let bits = model_ref.meta.pact_bits.ok_or_else(|| {
                invalid(format!(
                    "tensor '{clip_name}' is a PACT clip, but the metadata has no 'pact_bits'"
                ))
            })?;
            let beta = match t.dequantize().as_slice() {
                [beta] => *beta,
                v => {
                    return Err(invalid(format!(
                        "PACT clip '{clip_name}' holds {} values, not 1",
                        v.len()
                    )))
                }
            };
            crate::pact::check_pact(beta, bits)?;
            model_ref.clips.insert(name, beta);
        }
        Ok(model_ref)
    }

    /// The input of layer `name` as integers for the kernels, and the step
    /// each output must be multiplied by (PACT layers only).
    fn layer_input(
        &self,
        name: &str,
        x: &Activations,
        cols: usize,
    ) -> Result<(FixedActivations, Option<f32>)> {
        match (self.clips.get(name), self.meta.pact_bits) {
            (Some(&beta), Some(bits)) => {
                let values = crate::pact::pact_codes(&x.values, beta, bits)?;
                let acts = FixedActivations {
                    values,
                    rows: x.n,
                    cols,
                    frac_bits: vec![0; x.n],
                };
                Ok((acts, Some(crate::pact::pact_step(beta, bits))))
            }
            _ => Ok((
                FixedActivations::quantize(&x.values, x.n, cols, self.meta.act_bits)?,
                None,
            )),
        }
    }

    /// The network the file holds.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    fn tensor(&self, name: &str) -> Result<&'m CompressedTensor> {
        self.model
            .tensor(name)
            .ok_or_else(|| RuntimeError::MissingTensor(name.to_string()))
    }

    fn float(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.tensor(name)?.dequantize())
    }

    /// Whether batch-norm layer `layer` is stored folded for inference.
    fn is_folded(&self, layer: &str) -> bool {
        self.model
            .tensor(&format!("{layer}.{}", crate::BN_SCALE))
            .is_some()
    }

    /// Runs the model on the whole dataset with the integer kernels.
    pub fn evaluate(&self, data: &Dataset, batch: usize) -> Result<EvalReport> {
        check_dataset(self.arch, data)?;
        let norm: Normalization = self.meta.normalization();
        let classes = self.arch.num_classes();
        let mut logits = Vec::with_capacity(data.len() * classes);
        let mut rng = epoch_rng(0, 0, 0);
        let mut input = Vec::new();
        for indices in batches(data, batch) {
            data.gather(&indices, &norm, Augment::None, &mut rng, &mut input);
            let out = self.forward(Activations {
                values: std::mem::take(&mut input),
                n: indices.len(),
                shape: data.shape.to_vec(),
            })?;
            if out.per_sample() != classes {
                return Err(invalid(format!(
                    "the network produced {} outputs per image, expected {classes}",
                    out.per_sample()
                )));
            }
            logits.extend_from_slice(&out.values);
        }
        Ok(EvalReport::from_logits(logits, classes, &data.labels))
    }

    fn forward(&self, mut x: Activations) -> Result<Activations> {
        for layer in self.arch.layers() {
            x = match layer {
                LayerSpec::Flatten => Activations {
                    shape: vec![x.per_sample()],
                    ..x
                },
                LayerSpec::Relu => {
                    let mut x = x;
                    x.values.par_iter_mut().for_each(|v| *v = v.max(0.0));
                    x
                }
                LayerSpec::Dropout { .. } => x,
                LayerSpec::MaxPool2d { size } => max_pool_host(x, size)?,
                LayerSpec::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    if x.per_sample() != inputs {
                        return Err(invalid(format!(
                            "layer {name} expects {inputs} inputs, got {}",
                            x.per_sample()
                        )));
                    }
                    let (acts, step) = self.layer_input(&name, &x, inputs)?;
                    let mut y = self.tensor(&format!("{name}.weight"))?.matmul(&acts)?;
                    if let Some(high) = self.highs.get(&name) {
                        add_into(&mut y, &high.matmul(&acts)?);
                    }
                    if let Some(step) = step {
                        y.iter_mut().for_each(|v| *v *= step);
                    }
                    let bias = self.float(&format!("{name}.bias"))?;
                    for row in y.chunks_exact_mut(outputs) {
                        for (v, b) in row.iter_mut().zip(&bias) {
                            *v += *b;
                        }
                    }
                    Activations {
                        values: y,
                        n: x.n,
                        shape: vec![outputs],
                    }
                }
                LayerSpec::Conv2d {
                    name,
                    in_channels,
                    out_channels,
                    kernel,
                    stride,
                    padding,
                } => {
                    if x.shape.len() != 3 || x.shape[0] != in_channels {
                        return Err(invalid(format!(
                            "layer {name} expects [{in_channels}, h, w] inputs, got {:?}",
                            x.shape
                        )));
                    }
                    let per = x.per_sample();
                    let (acts, step) = self.layer_input(&name, &x, per)?;
                    let input = [x.shape[0], x.shape[1], x.shape[2]];
                    let (mut y, out_shape) = self
                        .tensor(&format!("{name}.weight"))?
                        .conv2d(&acts, input, kernel, stride, padding)?;
                    if let Some(high) = self.highs.get(&name) {
                        add_into(
                            &mut y,
                            &high.conv2d(&acts, input, kernel, stride, padding)?.0,
                        );
                    }
                    if let Some(step) = step {
                        y.iter_mut().for_each(|v| *v *= step);
                    }
                    let bias = self.float(&format!("{name}.bias"))?;
                    let plane = out_shape[1] * out_shape[2];
                    if out_shape[0] != out_channels || y.len() != x.n * out_channels * plane {
                        return Err(invalid(format!(
                            "layer {name} produced {} values of shape {out_shape:?}",
                            y.len()
                        )));
                    }
                    for sample in y.chunks_exact_mut(out_channels * plane) {
                        for (channel, b) in sample.chunks_exact_mut(plane).zip(&bias) {
                            for v in channel {
                                *v += *b;
                            }
                        }
                    }
                    Activations {
                        values: y,
                        n: x.n,
                        shape: out_shape.to_vec(),
                    }
                }
                LayerSpec::BatchNorm { name, channels } if self.is_folded(&name) => {
                    let scale = self.float(&format!("{name}.{}", crate::BN_SCALE))?;
                    let shift = self.float(&format!("{name}.{}", crate::BN_SHIFT))?;
                    folded_batch_norm_host(x, channels, &scale, &shift)?
                }
                LayerSpec::BatchNorm { name, channels } => {
                    let bn = BatchNormParams {
                        gamma: self.float(&format!("{name}.bn.weight"))?,
                        beta: self.float(&format!("{name}.bn.bias"))?,
                        mean: self.float(&format!("{name}.bn.running_mean"))?,
                        var: self.float(&format!("{name}.bn.running_var"))?,
                    };
                    batch_norm_host(x, channels, &bn)?
                }
            };
        }
        Ok(x)
    }
}

struct BatchNormParams {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
}

/// `(x - mean) * (gamma / sqrt(var + eps)) + beta`, in this order of f32
/// operations (the candle side does the same).
/// `y += high`, element by element in f32: a split weight's output is the
/// sum of its two parts' (FORMAT.md, `high_weights`).
fn add_into(y: &mut [f32], high: &[f32]) {
    for (v, h) in y.iter_mut().zip(high) {
        *v += *h;
    }
}

fn batch_norm_host(x: Activations, channels: usize, bn: &BatchNormParams) -> Result<Activations> {
    let scale: Vec<f32> = (0..channels)
        .map(|c| bn.gamma[c] / (bn.var[c] + BN_EPS).sqrt())
        .collect();
    per_channel(x, channels, |c, v| (v - bn.mean[c]) * scale[c] + bn.beta[c])
}

/// `x · scale + shift` per channel ([`crate::fold_batch_norm`]), in f32.
fn folded_batch_norm_host(
    x: Activations,
    channels: usize,
    scale: &[f32],
    shift: &[f32],
) -> Result<Activations> {
    per_channel(x, channels, |c, v| v * scale[c] + shift[c])
}

/// Applies `f(channel, value)` to every element of `channels`-channel
/// activations (the shapes were checked against the file's tensors).
fn per_channel(
    mut x: Activations,
    channels: usize,
    f: impl Fn(usize, f32) -> f32,
) -> Result<Activations> {
    if x.shape.first() != Some(&channels) {
        return Err(invalid(format!(
            "batch norm over {channels} channels got activations of shape {:?}",
            x.shape
        )));
    }
    let plane: usize = x.shape[1..].iter().product();
    for sample in x.values.chunks_exact_mut(channels * plane) {
        for (c, channel) in sample.chunks_exact_mut(plane).enumerate() {
            for v in channel {
                *v = f(c, *v);
            }
        }
    }
    Ok(x)
}

fn max_pool_host(x: Activations, size: usize) -> Result<Activations> {
    if x.shape.len() != 3 || size == 0 || x.shape[1] < size || x.shape[2] < size {
        return Err(invalid(format!(
            "max pooling {size}x{size} of activations with shape {:?}",
            x.shape
        )));
    }
    let [c, h, w] = [x.shape[0], x.shape[1], x.shape[2]];
    let (oh, ow) = (h / size, w / size);
    let mut out = vec![0f32; x.n * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .zip(x.values.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for dy in 0..size {
                        for dx in 0..size {
                            let v = src[(oy * size + dy) * w + ox * size + dx];
                            if v > m {
                                m = v;
                            }
                        }
                    }
                    dst[oy * ow + ox] = m;
                }
            }
        });
    Ok(Activations {
        values: out,
        n: x.n,
        shape: vec![c, oh, ow],
    })
}
