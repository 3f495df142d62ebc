//! Inference straight from the compressed file with integer kernels, and the
//! candle-side evaluation of the same quantized model that it must equal
//! image for image (METHOD §6: "that accuracy must equal the accuracy of the
//! same quantized model evaluated during training-side evaluation").
//!
//! Both interpret the one layer list `Arch::layers()`:
//! linear → `CompressedTensor::matmul`, convolution → `CompressedTensor::conv2d`,
//! bias added in f32, batch norm in f32 from the stored running statistics,
//! ReLU, max pooling, flatten; dropout is the identity. Before every linear or
//! convolution layer the activations are quantized to `act_bits` bits with one
//! exponent per sample (`FixedActivations::quantize`: exponent
//! `ceil(log2(max |x|))` over the sample's whole input to that layer).
//!
//! # Why the two paths agree exactly
//!
//! The integer kernel multiplies `b_w ≤ 16`-bit weights by `b_a ≤ 16`-bit
//! activations and sums at most `fan_in < 2^21` products in an i64, then
//! scales by a power of two in f64 and rounds to f32 once. The candle side
//! ([`evaluate_candle`]) does the layer in **f64**: every product of the two
//! fixed-point numbers and every partial sum is a multiple of the common step
//! below 2^53 of them, so f64 arithmetic is exact in any summation order and
//! equals the integer accumulator; it then rounds to f32 once as well. Every
//! other operation (bias, batch norm, ReLU, pooling) is the same sequence of
//! IEEE f32 operations on both sides. Hence equal logits, equal predictions.
//! (Width-32 weights — the float remainder of in-training quantization — are
//! summed in f64 on both sides but not necessarily in the same order; their
//! results can differ in the last bit of f64, which almost never changes the
//! f32 output.)
//!
//! Batch-norm statistics are stored in the file as f32 tensors (width 32), not
//! folded into the convolution: folding would change the quantized weights and
//! break the exact equality with the training-side model.

use candle_core::{DType, Device, Tensor};
use qgrad_csr::{CompressedModel, CompressedTensor, FixedActivations};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::{epoch_rng, Augment, Dataset, Normalization};
use crate::error::{ModelsError, Result};
use crate::export::{read_metadata, FileMetadata};
use crate::quantize::QuantizedTensor;
use crate::{Arch, LayerSpec, NamedTensor};

/// Batch-norm epsilon; must equal the training forward pass's.
pub const BN_EPS: f32 = crate::net::BN_EPS as f32;

/// Default activation width.
pub const DEFAULT_ACT_BITS: u8 = 16;

fn invalid(message: impl Into<String>) -> ModelsError {
    ModelsError::Config(message.into())
}

/// Accuracy and per-image results of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub correct: usize,
    pub total: usize,
    pub accuracy: f64,
    /// Predicted class per image, in dataset order.
    pub predictions: Vec<u32>,
    /// Logits, `total × classes`, row-major (not serialized).
    #[serde(skip)]
    pub logits: Vec<f32>,
}

impl EvalReport {
    fn from_logits(logits: Vec<f32>, classes: usize, labels: &[u8]) -> Self {
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

fn batches(data: &Dataset, batch: usize) -> impl Iterator<Item = Vec<usize>> + '_ {
    let batch = batch.max(1);
    (0..data.len())
        .step_by(batch)
        .map(move |s| (s..(s + batch).min(data.len())).collect())
}

fn check_dataset(arch: Arch, data: &Dataset) -> Result<()> {
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
    pub model: &'m CompressedModel,
    pub meta: FileMetadata,
    arch: Arch,
}

impl<'m> FileModel<'m> {
    pub fn new(model: &'m CompressedModel) -> Result<Self> {
        let meta = read_metadata(model)?;
        let arch = meta.arch;
        let model_ref = FileModel { model, meta, arch };
        // Check every tensor the layer list needs, with its shape, up front.
        for (name, shape) in arch
            .parameter_shapes()
            .into_iter()
            .chain(arch.buffer_shapes())
        {
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
        Ok(model_ref)
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    fn tensor(&self, name: &str) -> Result<&'m CompressedTensor> {
        self.model
            .tensor(name)
            .ok_or_else(|| invalid(format!("the file has no tensor '{name}'")))
    }

    fn float(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self.tensor(name)?.dequantize())
    }

    /// Runs the model on the whole dataset with the integer kernels.
    pub fn evaluate(&self, data: &Dataset, batch: usize) -> Result<EvalReport> {
        check_dataset(self.arch, data)?;
        let norm = Normalization {
            mean: self.meta.mean.clone(),
            std: self.meta.std.clone(),
        };
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
        let bits = self.meta.act_bits;
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
                    let acts = FixedActivations::quantize(&x.values, x.n, inputs, bits)?;
                    let mut y = self.tensor(&format!("{name}.weight"))?.matmul(&acts)?;
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
                    let acts = FixedActivations::quantize(&x.values, x.n, per, bits)?;
                    let input = [x.shape[0], x.shape[1], x.shape[2]];
                    let (mut y, out_shape) = self
                        .tensor(&format!("{name}.weight"))?
                        .conv2d(&acts, input, kernel, stride, padding)?;
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
fn batch_norm_host(
    mut x: Activations,
    channels: usize,
    bn: &BatchNormParams,
) -> Result<Activations> {
    if x.shape.first() != Some(&channels) {
        return Err(invalid(format!(
            "batch norm over {channels} channels got activations of shape {:?}",
            x.shape
        )));
    }
    let plane: usize = x.shape[1..].iter().product();
    let scale: Vec<f32> = (0..channels)
        .map(|c| bn.gamma[c] / (bn.var[c] + BN_EPS).sqrt())
        .collect();
    for sample in x.values.chunks_exact_mut(channels * plane) {
        for (c, channel) in sample.chunks_exact_mut(plane).enumerate() {
            for v in channel {
                *v = (*v - bn.mean[c]) * scale[c] + bn.beta[c];
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

/// Quantizes `x` (`[n, …]`, f32) to `bits`-bit fixed point with one exponent
/// per sample, exactly as `FixedActivations::quantize`, and returns the
/// dequantized values as f64 (exact).
fn quantize_activations_candle(x: &Tensor, bits: u8) -> Result<Tensor> {
    let n = x.dim(0)?;
    let flat = x.flatten_from(1)?;
    let max_abs: Vec<f32> = flat.abs()?.max_keepdim(1)?.flatten_all()?.to_vec1()?;
    let mut scale = Vec::with_capacity(n);
    for m in max_abs {
        let e = qgrad_fixed::tensor_exponent(&[m])?;
        let f = bits as i32 - 1 - e;
        scale.push((f as f64).exp2());
    }
    let up = Tensor::from_vec(scale.clone(), (n, 1), x.device())?;
    let down = Tensor::from_vec(
        scale.iter().map(|s| 1.0 / s).collect::<Vec<f64>>(),
        (n, 1),
        x.device(),
    )?;
    let lo = -(2f64.powi(bits as i32 - 1));
    let hi = 2f64.powi(bits as i32 - 1) - 1.0;
    let q = flat
        .to_dtype(DType::F64)?
        .broadcast_mul(&up)?
        .round()?
        .clamp(lo, hi)?
        .broadcast_mul(&down)?;
    Ok(q.reshape(x.shape())?)
}

/// Evaluates the quantized parameters `params` (values as stored in a
/// [`QuantizedTensor`]) and `buffers` in candle, with the same activation
/// quantization as the integer inference, linear and convolution layers in
/// f64. Equals [`FileModel::evaluate`] of the exported file image for image.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_candle(
    arch: Arch,
    params: &[QuantizedTensor],
    buffers: &[NamedTensor],
    data: &Dataset,
    norm: &Normalization,
    act_bits: u8,
    batch: usize,
    device: &Device,
) -> Result<EvalReport> {
    check_dataset(arch, data)?;
    if !(2..=16).contains(&act_bits) {
        return Err(invalid(format!(
            "activation width {act_bits} is not allowed (2..=16)"
        )));
    }
    let lookup = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        if let Some(p) = params.iter().find(|p| p.name == name) {
            return Ok((p.shape.clone(), p.values.clone()));
        }
        if let Some(b) = buffers.iter().find(|b| b.name == name) {
            return Ok((b.shape.clone(), b.values.clone()));
        }
        Err(invalid(format!("no tensor '{name}' for {}", arch.name())))
    };
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in arch
        .parameter_shapes()
        .into_iter()
        .chain(arch.buffer_shapes())
    {
        let (s, v) = lookup(&name)?;
        if s != shape || v.len() != shape.iter().product::<usize>() {
            return Err(invalid(format!(
                "tensor '{name}' has shape {s:?}, {} needs {shape:?}",
                arch.name()
            )));
        }
        let t = Tensor::from_vec(v, shape, device)?;
        // Weights of linear/conv layers take part in f64 products.
        let t = if name.ends_with(".weight") && !name.ends_with(".bn.weight") {
            t.to_dtype(DType::F64)?
        } else {
            t
        };
        tensors.insert(name, t);
    }
    let get = |name: String| -> Result<&Tensor> {
        tensors
            .get(&name)
            .ok_or_else(|| invalid(format!("no tensor '{name}'")))
    };
    let classes = arch.num_classes();
    let mut logits = Vec::with_capacity(data.len() * classes);
    let mut rng = epoch_rng(0, 0, 0);
    let mut input = Vec::new();
    let [c, h, w] = data.shape;
    for indices in batches(data, batch) {
        data.gather(&indices, norm, Augment::None, &mut rng, &mut input);
        let mut x = Tensor::from_slice(&input, (indices.len(), c, h, w), device)?;
        for layer in arch.layers() {
            x = match layer {
                LayerSpec::Flatten => x.flatten_from(1)?,
                LayerSpec::Relu => x.relu()?,
                LayerSpec::Dropout { .. } => x,
                LayerSpec::MaxPool2d { size } => x.max_pool2d(size)?,
                LayerSpec::Linear { name, .. } => {
                    let q = quantize_activations_candle(&x, act_bits)?;
                    let weight = get(format!("{name}.weight"))?;
                    let y = q.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
                    y.broadcast_add(get(format!("{name}.bias"))?)?
                }
                LayerSpec::Conv2d {
                    name,
                    stride,
                    padding,
                    ..
                } => {
                    let q = quantize_activations_candle(&x, act_bits)?;
                    let weight = get(format!("{name}.weight"))?;
                    let y = q
                        .conv2d(weight, padding, stride, 1, 1)?
                        .to_dtype(DType::F32)?;
                    let bias = get(format!("{name}.bias"))?;
                    y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?
                }
                LayerSpec::BatchNorm { name, channels } => {
                    let shape = (1, channels, 1, 1);
                    let gamma = get(format!("{name}.bn.weight"))?.reshape(shape)?;
                    let beta = get(format!("{name}.bn.bias"))?.reshape(shape)?;
                    let mean = get(format!("{name}.bn.running_mean"))?.reshape(shape)?;
                    let var = get(format!("{name}.bn.running_var"))?.reshape(shape)?;
                    let scale = gamma.broadcast_div(&(var + BN_EPS as f64)?.sqrt()?)?;
                    x.broadcast_sub(&mean)?
                        .broadcast_mul(&scale)?
                        .broadcast_add(&beta)?
                }
            };
        }
        let out: Vec<f32> = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if out.len() != indices.len() * classes {
            return Err(invalid(format!(
                "the network produced {} logits for {} images",
                out.len(),
                indices.len()
            )));
        }
        logits.extend_from_slice(&out);
    }
    Ok(EvalReport::from_logits(logits, classes, &data.labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::export::{export, ExportMetadata};
    use crate::quantize::{post_training, PostTrainingOptions};
    use crate::Network;
    use qgrad_cluster::ClusterMethod;
    use qgrad_csr::LayoutChoice;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn mnist_test(n: usize) -> Dataset {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        load_mnist(&dir).unwrap().1.take(n)
    }

    fn mnist_norm() -> Normalization {
        Normalization {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// A seeded network quantized post-training with seeded importances.
    fn quantized(
        arch: Arch,
        seed: u64,
        method: ClusterMethod,
    ) -> (Vec<QuantizedTensor>, Vec<NamedTensor>) {
        let net = Network::new(arch, &Device::Cpu, seed).unwrap();
        let params = net.params_to_host().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let accum: Vec<NamedTensor> = params
            .iter()
            .map(|p| NamedTensor {
                name: p.name.clone(),
                shape: p.shape.clone(),
                values: p
                    .values
                    .iter()
                    .map(|_| rng.random_range(0f32..1.0).powi(3))
                    .collect(),
            })
            .collect();
        let opts = PostTrainingOptions {
            widths: vec![16, 8, 4, 2, 0],
            method,
            ..Default::default()
        };
        let (q, _) = post_training(&params, &accum, &opts, None).unwrap();
        (q, net.buffers_to_host().unwrap())
    }

    fn run_both(
        arch: Arch,
        q: &[QuantizedTensor],
        buffers: &[NamedTensor],
        data: &Dataset,
        norm: &Normalization,
        act_bits: u8,
    ) -> (EvalReport, EvalReport) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.qgz");
        let meta = ExportMetadata {
            arch,
            act_bits,
            norm: norm.clone(),
            method: "test".into(),
            options: serde_json::json!({}),
            seed: Some(1),
            extra: vec![],
        };
        let report = export(&path, q, buffers, &meta, LayoutChoice::Auto).unwrap();
        assert_eq!(report.file_bytes, std::fs::metadata(&path).unwrap().len());
        let model = CompressedModel::read_file(&path).unwrap();
        let file = FileModel::new(&model).unwrap().evaluate(data, 64).unwrap();
        let candle =
            evaluate_candle(arch, q, buffers, data, norm, act_bits, 37, &Device::Cpu).unwrap();
        (file, candle)
    }

    #[test]
    fn file_inference_equals_candle_evaluation_image_for_image() {
        let data = mnist_test(200);
        for (arch, act_bits) in [
            (Arch::Lenet300100, 16),
            (Arch::Lenet300100, 6),
            (Arch::Lenet5, 16),
        ] {
            let (q, buffers) = quantized(arch, 7, ClusterMethod::KMeans);
            let (file, candle) = run_both(arch, &q, &buffers, &data, &mnist_norm(), act_bits);
            assert_eq!(file.total, 200);
            assert_eq!(file.mismatches(&candle), 0, "{arch}");
            let differing = file
                .logits
                .iter()
                .zip(&candle.logits)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(
                differing, 0,
                "{arch}, {act_bits}-bit activations: logits differ"
            );
            assert_eq!(file.accuracy, candle.accuracy);
        }
    }

    #[test]
    fn strided_padded_convolutions_agree_too() {
        // AlexNet's first layer is an 11x11 convolution, stride 4, padding 5.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 6;
        let data = Dataset {
            images: (0..n * 3 * 32 * 32).map(|_| rng.random::<u8>()).collect(),
            labels: (0..n).map(|i| (i % 10) as u8).collect(),
            shape: [3, 32, 32],
            num_classes: 10,
        };
        let norm = Normalization {
            mean: vec![0.5, 0.4, 0.3],
            std: vec![0.25, 0.25, 0.2],
        };
        let fractions = vec![0.05, 0.15, 0.3, 0.2, 0.3];
        let (q, buffers) = quantized(Arch::AlexNet, 2, ClusterMethod::Quantiles { fractions });
        let (file, candle) = run_both(Arch::AlexNet, &q, &buffers, &data, &norm, 12);
        assert_eq!(file.logits.len(), n * 10);
        assert_eq!(file.logits, candle.logits);
    }

    #[test]
    fn float_remainder_elements_run_too() {
        let data = mnist_test(100);
        let (mut q, buffers) = quantized(Arch::Lenet300100, 8, ClusterMethod::LogKMeans);
        // Keep every 7th element of fc2 as f32, as in-training quantization does.
        let net = Network::new(Arch::Lenet300100, &Device::Cpu, 8).unwrap();
        let original = net.params_to_host().unwrap();
        for i in (0..q[2].values.len()).step_by(7) {
            q[2].widths[i] = qgrad_fixed::FLOAT;
            q[2].values[i] = original[2].values[i];
        }
        let (file, candle) = run_both(Arch::Lenet300100, &q, &buffers, &data, &mnist_norm(), 16);
        assert_eq!(file.mismatches(&candle), 0);
        for (a, b) in file.logits.iter().zip(&candle.logits) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn files_without_the_metadata_to_run_them_are_rejected() {
        let (q, _) = quantized(Arch::Lenet300100, 1, ClusterMethod::KMeans);
        let tensors: Vec<qgrad_csr::TensorData> = q
            .iter()
            .map(|t| qgrad_csr::TensorData {
                name: &t.name,
                shape: &t.shape,
                values: &t.values,
                widths: &t.widths,
                exponent: Some(t.exponent),
            })
            .collect();
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
            let options = qgrad_csr::EncodeOptions {
                metadata: metadata
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            };
            let bytes = qgrad_csr::encode(&tensors, &options).unwrap();
            let model = CompressedModel::from_bytes(&bytes).unwrap();
            let err = FileModel::new(&model).err().expect("must be rejected");
            assert!(!err.to_string().is_empty());
        }
    }
}
