//! The candle-side evaluation of a quantized model, which must equal the
//! integer inference from its file (`qgrad_runtime::FileModel`) image for
//! image (METHOD §6: "that accuracy must equal the accuracy of the same
//! quantized model evaluated during training-side evaluation").
//!
//! # Why the two paths agree exactly
//!
//! The integer kernel multiplies `b_w ≤ 16`-bit weights by `b_a ≤ 16`-bit
//! activations and sums at most `fan_in < 2^21` products in an i64, then
//! scales by a power of two in f64 and rounds to f32 once. This evaluation
//! does the layer in **f64**: every product of the two fixed-point numbers and
//! every partial sum is a multiple of the common step below 2^53 of them, so
//! f64 arithmetic is exact in any summation order and equals the integer
//! accumulator; it then rounds to f32 once as well. Every other operation
//! (bias, batch norm, ReLU, pooling) is the same sequence of IEEE f32
//! operations on both sides. Hence equal logits, equal predictions.
//! (Width-32 weights — the float remainder of in-training quantization — are
//! summed in f64 on both sides but not necessarily in the same order; their
//! results can differ in the last bit of f64, which almost never changes the
//! f32 output.)

use candle_core::{DType, Device, Tensor};
use qgrad_runtime::infer::{batches, check_dataset};
use qgrad_runtime::{EvalReport, BN_EPS};

use crate::data::{epoch_rng, Augment, Dataset, Normalization};
use crate::error::{ModelsError, Result};
use crate::methods::{QuantizedTensor, ScaledWeight};
use crate::{Arch, LayerSpec, NamedTensor};

fn invalid(message: impl Into<String>) -> ModelsError {
    ModelsError::Config(message.into())
}

/// Quantizes `x` (`[n, …]`, f32) to `bits`-bit fixed point with one exponent
/// per sample, exactly as `FixedActivations::quantize`, and returns the
/// dequantized values as f64 (exact).
pub fn quantize_activations(x: &Tensor, bits: u8) -> Result<Tensor> {
    let mut out = Vec::with_capacity(x.elem_count());
    quantized_activation_values(x, bits, |v| out.push(v))?;
    Ok(Tensor::from_vec(out, x.shape(), x.device())?)
}

/// [`quantize_activations`] as f32, for the training forward pass: the same
/// values (each is an integer of at most 16 bits times a power of two, so
/// the f32 is exact), with zeros as `+0.0`, which is what the
/// straight-through `q + (x − x̄)` made of them; one pass and one f32 buffer
/// where the f64 tensor and its conversion were two more.
///
/// In place over the host copy, and for samples without NaN clamped before
/// rounding (the bounds are integers, so the result is the same) and
/// rounded through `i32`: a loop the compiler vectorises, where the push
/// per value and the `i64` conversion kept it scalar (4 % of a structured
/// training epoch of mlp-512x2, which quantizes every input batch).
pub fn quantize_activations_f32(x: &Tensor, bits: u8) -> Result<Tensor> {
    let n = x.dim(0)?;
    let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let per_sample = values.len().checked_div(n).unwrap_or(0).max(1);
    let (lo, hi) = activation_bounds(bits);
    for sample in values.chunks_mut(per_sample) {
        let (up, down) = sample_scale(sample, bits)?;
        if sample.iter().any(|v| v.is_nan()) {
            for v in sample.iter_mut() {
                *v = (round_half_away((*v as f64) * up).clamp(lo, hi) * down) as f32 + 0.0;
            }
            continue;
        }
        for v in sample.iter_mut() {
            // |t| ≤ 2^15: the truncation through i32 and `t − i` are exact.
            let t = ((*v as f64) * up).clamp(lo, hi);
            *v = (round_from_truncation(t, t as i32 as f64) * down) as f32 + 0.0;
        }
    }
    Ok(Tensor::from_vec(values, x.shape(), x.device())?)
}

/// The smallest and largest integer of a `bits`-bit signed activation.
fn activation_bounds(bits: u8) -> (f64, f64) {
    let half = 2f64.powi(bits as i32 - 1);
    (-half, half - 1.0)
}

/// A sample's power-of-two scale up to the integers, and back.
fn sample_scale(sample: &[f32], bits: u8) -> Result<(f64, f64)> {
    let m = sample.iter().fold(0f32, |m, v| m.max(v.abs()));
    let e = qgrad_fixed::tensor_exponent(&[m])?;
    let up = ((bits as i32 - 1 - e) as f64).exp2();
    Ok((up, 1.0 / up))
}

/// The dequantized values of [`quantize_activations`], in order, to `push`.
fn quantized_activation_values(x: &Tensor, bits: u8, mut push: impl FnMut(f64)) -> Result<()> {
    let n = x.dim(0)?;
    // One host pass per sample (exponent, scale, round, clamp) instead of
    // five candle ops each allocating a full f64 tensor; the arithmetic is
    // the same f64 sequence as the integer evaluator's.
    let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let per_sample = values.len().checked_div(n).unwrap_or(0);
    let (lo, hi) = activation_bounds(bits);
    for sample in values.chunks(per_sample.max(1)) {
        let (up, down) = sample_scale(sample, bits)?;
        for &v in sample {
            push(round_half_away((v as f64) * up).clamp(lo, hi) * down);
        }
    }
    Ok(())
}

/// `v.round()` (half away from zero, the sign of zero kept) without the libm
/// call it is on baseline x86-64, where it was the costliest part of the
/// per-batch input quantization: below 2^52 the truncation through `i64`
/// and `v − t` are exact; larger values are integers already.
#[inline(always)]
fn round_half_away(v: f64) -> f64 {
    if v.abs() < 4_503_599_627_370_496.0 {
        round_from_truncation(v, (v as i64 as f64).copysign(v))
    } else {
        v.round()
    }
}

/// `v` rounded half away from zero, given its truncation `t` (exact, so
/// that `v − t` is too).
#[inline(always)]
fn round_from_truncation(v: f64, t: f64) -> f64 {
    let d = v - t;
    if d >= 0.5 {
        t + 1.0
    } else if d <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// Evaluates the quantized parameters `params` (values as stored in a
/// [`QuantizedTensor`]) and `buffers` in candle, with the same activation
/// quantization as the integer inference, linear and convolution layers in
/// f64. Equals `qgrad_runtime::FileModel::evaluate` of the exported file image for image.
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
    let model = QuantizedModel {
        params,
        scaled: &[],
        buffers,
        pact_bits: None,
    };
    evaluate_candle_model(arch, &model, data, norm, act_bits, batch, device)
}

/// The tensors of a quantized model: fixed-point parameters, scaled-code
/// weights (loss-aware quantization) and f32 buffers.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedModel<'a> {
    /// Fixed-point (or f32) parameters.
    pub params: &'a [QuantizedTensor],
    /// Weights stored as scaled codes.
    pub scaled: &'a [ScaledWeight],
    /// Batch-norm running statistics.
    pub buffers: &'a [NamedTensor],
    /// `k_a` of PACT activations (METHOD §9): the layers whose clip
    /// `<layer>.act_clip` is among `params` take codes, as the file does
    /// (`qgrad_runtime::pact`). `None`: fixed point everywhere.
    pub pact_bits: Option<u8>,
}

/// A scaled-code weight in the form of the file's integer kernel
/// (qgrad-csr, "Scaled tensors"): `y = f32((α₊·P − α₋·Q) / den)` per output,
/// `P`, `Q` the products of the activations with the integer levels
/// `L(|k|)` of the positive and the negative codes (one-sided tensors: `P`
/// with signed levels and `Q = 0`). Every product and sum of `P`, `Q` is
/// exact in f64, and the scales and `den` are applied in the kernel's order,
/// so the result is the kernel's bit for bit.
struct ScaledEval {
    pos: Tensor,
    neg: Option<Tensor>,
    alpha_pos: Tensor,
    alpha_neg: Option<Tensor>,
    den: f64,
}

impl ScaledEval {
    fn new(w: &ScaledWeight, device: &Device) -> Result<Self> {
        let rows = w.shape.first().copied().unwrap_or(1);
        let n = w.method.max_code() as i32;
        let (integer, den): (Box<dyn Fn(i8) -> f64>, f64) = match w.method {
            m if m.binary() => (Box::new(|k: i8| k as f64), 1.0),
            qgrad_scaled::Method::Laq { log: true, .. } => (
                Box::new(|k: i8| {
                    if k == 0 {
                        0.0
                    } else {
                        (k.signum() as f64) * 2f64.powi(k.unsigned_abs() as i32 - 1)
                    }
                }),
                2f64.powi(n - 1),
            ),
            _ => (Box::new(|k: i8| k as f64), n as f64),
        };
        if w.groups != 1 && w.groups != rows {
            return Err(invalid(format!(
                "{}: {} scale groups (the candle evaluation takes one per tensor or per row)",
                w.name, w.groups
            )));
        }
        let spg = w.method.scales_per_group();
        let scale = |side: usize| -> Result<Tensor> {
            let per_row: Vec<f64> = (0..rows)
                .map(|r| {
                    let g = if w.groups == 1 { 0 } else { r };
                    f64::from(w.quantized.scales[g * spg + side])
                })
                .collect();
            Ok(Tensor::from_vec(per_row, (1, rows), device)?)
        };
        let codes = &w.quantized.codes;
        let shape = w.shape.as_slice();
        if spg == 2 {
            let part = |positive: bool| -> Vec<f64> {
                codes
                    .iter()
                    .map(|&k| {
                        if (k > 0) == positive && k != 0 {
                            integer(k).abs()
                        } else {
                            0.0
                        }
                    })
                    .collect()
            };
            Ok(ScaledEval {
                pos: Tensor::from_vec(part(true), shape, device)?,
                neg: Some(Tensor::from_vec(part(false), shape, device)?),
                alpha_pos: scale(0)?,
                alpha_neg: Some(scale(1)?),
                den,
            })
        } else {
            let signed: Vec<f64> = codes.iter().map(|&k| integer(k)).collect();
            Ok(ScaledEval {
                pos: Tensor::from_vec(signed, shape, device)?,
                neg: None,
                alpha_pos: scale(0)?,
                alpha_neg: None,
                den,
            })
        }
    }

    /// `y` (f32) from the per-output products `P` (and `Q`) of `product`,
    /// `[n, rows]` or `[n, rows, h, w]`.
    fn apply(&self, product: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let p = product(&self.pos)?;
        let shape = |a: &Tensor| -> Result<Tensor> {
            Ok(if p.rank() == 4 {
                a.reshape((1, a.dim(1)?, 1, 1))?
            } else {
                a.clone()
            })
        };
        let mut t = p.broadcast_mul(&shape(&self.alpha_pos)?)?;
        if let (Some(neg), Some(alpha)) = (&self.neg, &self.alpha_neg) {
            let q = product(neg)?;
            t = (t - q.broadcast_mul(&shape(alpha)?)?)?;
        }
        // A true division (candle's `Tensor / f64` multiplies by 1/den).
        let den = Tensor::new(self.den, t.device())?;
        Ok(t.broadcast_div(&den)?.to_dtype(DType::F32)?)
    }
}

/// [`evaluate_candle`] of a model that may hold scaled-code weights.
pub fn evaluate_candle_model(
    arch: Arch,
    model: &QuantizedModel,
    data: &Dataset,
    norm: &Normalization,
    act_bits: u8,
    batch: usize,
    device: &Device,
) -> Result<EvalReport> {
    let QuantizedModel {
        params,
        scaled,
        buffers,
        pact_bits,
    } = *model;
    // PACT clip per layer (the file's `<layer>.act_clip`).
    let mut clips = std::collections::HashMap::new();
    if let Some(bits) = pact_bits {
        for p in params {
            if let Some(layer) = p
                .name
                .strip_suffix(&format!(".{}", qgrad_runtime::ACT_CLIP))
            {
                let &[beta] = p.values.as_slice() else {
                    return Err(invalid(format!("PACT clip '{}' is not one value", p.name)));
                };
                qgrad_runtime::pact::check_pact(beta, bits).map_err(|e| invalid(e.to_string()))?;
                clips.insert(layer.to_string(), beta);
            }
        }
    }
    // The input of layer `name`: PACT codes (f64, exact) and the step each
    // output is multiplied by, or fixed point.
    let layer_input = |x: &Tensor, name: &str| -> Result<(Tensor, Option<Tensor>)> {
        match (clips.get(name), pact_bits) {
            (Some(&beta), Some(bits)) => {
                let values: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let codes: Vec<f64> = qgrad_runtime::pact_codes(&values, beta, bits)
                    .map_err(|e| invalid(e.to_string()))?
                    .into_iter()
                    .map(f64::from)
                    .collect();
                let step = Tensor::new(&[qgrad_runtime::pact_step(beta, bits)], x.device())?;
                Ok((Tensor::from_vec(codes, x.shape(), x.device())?, Some(step)))
            }
            _ => Ok((quantize_activations(x, act_bits)?, None)),
        }
    };
    check_dataset(arch, data)?;
    if !(2..=16).contains(&act_bits) {
        return Err(invalid(format!(
            "activation width {act_bits} is not allowed (2..=16)"
        )));
    }
    // The tensors the file of this model holds (batch norms with f32 γ and β
    // folded, as the export does), so that both compute the same f32 ops.
    let (params, buffers) = crate::export::fold_float_batch_norms(arch, params, buffers);
    let (params, buffers) = (params.as_slice(), buffers.as_slice());
    let mut scaled_evals = std::collections::HashMap::new();
    for w in scaled {
        scaled_evals.insert(w.name.clone(), ScaledEval::new(w, device)?);
    }
    let lookup = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        if let Some(w) = scaled.iter().find(|w| w.name == name) {
            return Ok((w.shape.clone(), w.quantized.values.clone()));
        }
        if let Some(p) = params.iter().find(|p| p.name == name) {
            return Ok((p.shape.clone(), p.values.clone()));
        }
        if let Some(b) = buffers.iter().find(|b| b.name == name) {
            return Ok((b.shape.clone(), b.values.clone()));
        }
        Err(invalid(format!("no tensor '{name}' for {}", arch.name())))
    };
    let stored = |name: &str| {
        params.iter().any(|p| p.name == name) || buffers.iter().any(|b| b.name == name)
    };
    let folded = |layer: &str| stored(&format!("{layer}.{}", qgrad_runtime::BN_SCALE));
    let mut tensors = std::collections::HashMap::new();
    for (name, shape) in arch.stored_tensor_shapes(folded) {
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
    // The high-width parts of split weights (`<layer>.weight_high`, loss-aware
    // codes with important weights kept wide): their product is added to the
    // codes' output, in f32, as the file's reader does.
    let mut highs = std::collections::HashMap::new();
    for p in params {
        if let Some(weight) = p.name.strip_suffix(crate::methods::HIGH_SUFFIX) {
            let shape = get(weight.to_string())?.dims().to_vec();
            if p.shape != shape {
                return Err(invalid(format!(
                    "'{}' has shape {:?}, its weight {shape:?}",
                    p.name, p.shape
                )));
            }
            let t = Tensor::from_vec(p.values.clone(), shape, device)?.to_dtype(DType::F64)?;
            highs.insert(weight.to_string(), t);
        }
    }
    let add_high =
        |y: Tensor, weight: &str, product: &dyn Fn(&Tensor) -> Result<Tensor>| match highs
            .get(weight)
        {
            Some(h) => Ok::<_, ModelsError>((y + product(h)?.to_dtype(DType::F32)?)?),
            None => Ok(y),
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
                    let (q, step) = layer_input(&x, &name)?;
                    let y = match scaled_evals.get(&format!("{name}.weight")) {
                        Some(s) => s.apply(|w| Ok(q.matmul(&w.t()?)?))?,
                        None => {
                            let weight = get(format!("{name}.weight"))?;
                            q.matmul(&weight.t()?)?.to_dtype(DType::F32)?
                        }
                    };
                    let y = add_high(y, &format!("{name}.weight"), &|w| Ok(q.matmul(&w.t()?)?))?;
                    let y = match step {
                        Some(step) => y.broadcast_mul(&step)?,
                        None => y,
                    };
                    y.broadcast_add(get(format!("{name}.bias"))?)?
                }
                LayerSpec::Conv2d {
                    name,
                    stride,
                    padding,
                    ..
                } => {
                    let (q, step) = layer_input(&x, &name)?;
                    let y = match scaled_evals.get(&format!("{name}.weight")) {
                        Some(s) => s.apply(|w| Ok(q.conv2d(w, padding, stride, 1, 1)?))?,
                        None => {
                            let weight = get(format!("{name}.weight"))?;
                            q.conv2d(weight, padding, stride, 1, 1)?
                                .to_dtype(DType::F32)?
                        }
                    };
                    let y = add_high(y, &format!("{name}.weight"), &|w| {
                        Ok(q.conv2d(w, padding, stride, 1, 1)?)
                    })?;
                    let y = match step {
                        Some(step) => y.broadcast_mul(&step)?,
                        None => y,
                    };
                    let bias = get(format!("{name}.bias"))?;
                    y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?
                }
                LayerSpec::BatchNorm { name, channels } if folded(&name) => {
                    let mut shape = vec![1, channels];
                    shape.resize(x.rank(), 1);
                    let shape = shape.as_slice();
                    let scale =
                        get(format!("{name}.{}", qgrad_runtime::BN_SCALE))?.reshape(shape)?;
                    let shift =
                        get(format!("{name}.{}", qgrad_runtime::BN_SHIFT))?.reshape(shape)?;
                    x.broadcast_mul(&scale)?.broadcast_add(&shift)?
                }
                LayerSpec::BatchNorm { name, channels } => {
                    // Over the channel axis: [n, c] after a linear layer,
                    // [n, c, h, w] after a convolution.
                    let mut shape = vec![1, channels];
                    shape.resize(x.rank(), 1);
                    let shape = shape.as_slice();
                    let gamma = get(format!("{name}.bn.weight"))?.reshape(shape)?;
                    let beta = get(format!("{name}.bn.bias"))?.reshape(shape)?;
                    let mean = get(format!("{name}.bn.running_mean"))?.reshape(shape)?;
                    let var = get(format!("{name}.bn.running_var"))?.reshape(shape)?;
                    let scale = gamma.broadcast_div(&(var + f64::from(BN_EPS))?.sqrt()?)?;
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
    #[test]
    fn f32_activations_equal_the_f64_ones() {
        // Halves, the clamp bounds, subnormals, zeros of both signs, one NaN
        // sample (the slow path), and random values, at 2, 8 and 16 bits.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut random = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        let fixed = [
            0.5f32, -0.5, 1.5, -1.5, 2.5, 127.5, -128.5, 126.49999, 1e-40, -0.0, 0.0, 3.0, -3.0,
            0.25, 0.75,
        ];
        for bits in [2u8, 8, 16] {
            let mut values: Vec<f32> = fixed.to_vec();
            values.extend((0..15).map(|_| ((random() - 0.5) * 300.0) as f32));
            values.extend((0..15).map(|_| ((random() - 0.5) * 1e-3) as f32));
            values.extend([1.0, f32::NAN, -2.0, 0.7, 0.5].iter().chain(&[0.0; 10]));
            let x = Tensor::from_vec(values, (4, 15), &candle_core::Device::Cpu).unwrap();
            let fast: Vec<f32> = quantize_activations_f32(&x, bits)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let exact: Vec<f64> = quantize_activations(&x, bits)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (f, e)) in fast.iter().zip(&exact).enumerate() {
                let e = *e as f32 + 0.0;
                assert!(
                    f.to_bits() == e.to_bits() || (f.is_nan() && e.is_nan()),
                    "{bits} bits, {i}: {f} {e}"
                );
            }
        }
    }

    #[test]
    fn round_half_away_is_round() {
        let mut v = vec![
            0.0f64,
            -0.0,
            0.5,
            -0.5,
            1.5,
            -2.5,
            0.49999999999999994,
            -0.3,
            1e15 + 0.5,
            4.6e15,
            -1e300,
        ];
        v.extend((0..20_000).map(|i| (i as f64 - 10_000.0) * 0.37));
        for x in v {
            for y in [
                x,
                f64::from_bits(x.to_bits() + 1),
                f64::from_bits(x.to_bits().max(1) - 1),
            ] {
                assert_eq!(
                    super::round_half_away(y).to_bits(),
                    y.round().to_bits(),
                    "{y}"
                );
            }
        }
        assert!(super::round_half_away(f64::NAN).is_nan());
    }

    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::export::export;
    use crate::methods::post_training::{post_training, PostTrainingOptions};
    use crate::Network;
    use qgrad_cluster::ClusterMethod;
    use qgrad_csr::{CompressedModel, LayoutChoice};
    use qgrad_runtime::{ExportMetadata, FileModel};
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
    fn batch_norm_after_linear_layers_agrees_too() {
        // An MLP's batch norm normalises [n, c] activations (not [n, c, h, w]).
        let arch = Arch::Mlp {
            width: 48,
            depth: 2,
            batch_norm: true,
        };
        let data = mnist_test(100);
        let (q, mut buffers) = quantized(arch, 5, ClusterMethod::KMeans);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for b in &mut buffers {
            let var = b.name.ends_with("running_var");
            for v in &mut b.values {
                *v = if var {
                    rng.random_range(0.5f32..2.0)
                } else {
                    rng.random_range(-0.3f32..0.3)
                };
            }
        }
        let (file, candle) = run_both(arch, &q, &buffers, &data, &mnist_norm(), 8);
        assert_eq!(file.logits.len(), 100 * 10);
        assert_eq!(file.logits, candle.logits);

        // With γ and β left f32 (as the loss-aware methods leave them) the
        // file stores each batch norm folded, and still agrees bit for bit.
        let mut q = q;
        let original = Network::new(arch, &Device::Cpu, 5)
            .unwrap()
            .params_to_host()
            .unwrap();
        for (t, o) in q.iter_mut().zip(&original) {
            if t.name.contains(".bn.") {
                t.widths = vec![qgrad_fixed::FLOAT; t.values.len()];
                t.values = o.values.iter().map(|v| v * 1.3 - 0.1).collect();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("folded.qgz");
        let meta = ExportMetadata {
            arch,
            act_bits: 8,
            norm: mnist_norm(),
            method: "test".into(),
            options: serde_json::json!({}),
            seed: Some(1),
            extra: vec![],
        };
        let folded_report = export(&path, &q, &buffers, &meta, LayoutChoice::Auto).unwrap();
        let model = CompressedModel::read_file(&path).unwrap();
        let names: Vec<&str> = model.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.iter().any(|n| n.ends_with(".bn.scale")), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("running")), "{names:?}");
        let file = FileModel::new(&model).unwrap().evaluate(&data, 64).unwrap();
        let candle = evaluate_candle(
            arch,
            &q,
            &buffers,
            &data,
            &mnist_norm(),
            8,
            37,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(file.logits, candle.logits);
        // Two f32 vectors per batch norm instead of four.
        let unfolded = dir.path().join("unfolded.qgz");
        let mut kept = q.clone();
        for t in kept.iter_mut().filter(|t| t.name.ends_with(".bn.weight")) {
            t.widths[0] = 16;
            t.values[0] = 0.5;
        }
        let unfolded_report =
            export(&unfolded, &kept, &buffers, &meta, LayoutChoice::Auto).unwrap();
        let bn_channels: u64 = buffers.iter().map(|b| b.values.len() as u64).sum::<u64>() / 2;
        assert!(
            unfolded_report.file_bytes >= folded_report.file_bytes + 2 * 4 * bn_channels - 16,
            "{} vs {}",
            unfolded_report.file_bytes,
            folded_report.file_bytes
        );
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
}
