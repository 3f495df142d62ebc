//! The candle training network: an interpreter of `Arch::layers()`.
//!
//! Nothing here knows LeNet or VGG: the forward pass walks the `LayerSpec`
//! list, so the training network, the quantized evaluation and the integer
//! inference all read one definition. Trainable parameters live in a
//! `candle_nn::VarMap` (names from `arch.rs`); batch-norm running statistics
//! are buffers kept apart, so neither the optimizer nor the accumulated
//! gradients ever see them.
//!
//! Initialisation follows PyTorch's defaults (Kaiming-uniform with a = √5 for
//! weights, i.e. U(±1/√fan_in), and U(±1/√fan_in) for biases; batch-norm γ = 1,
//! β = 0), drawn on the host from a `ChaCha8Rng` seeded by the caller: candle's
//! own random initialisers are not seedable on every device. Dropout masks
//! come from the same kind of generator, re-seeded per epoch by the training
//! loop, so a resumed run draws the same masks.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::arch::{Arch, LayerSpec};
use crate::data::{epoch_rng, Augment, Dataset, Normalization};
use crate::error::{ModelsError, Result};

/// Batch-norm running-statistics momentum (PyTorch's default).
pub const BN_MOMENTUM: f64 = 0.1;
/// Batch-norm epsilon (PyTorch's default).
pub const BN_EPS: f64 = 1e-5;

/// PACT activation quantization (METHOD §9; Choi et al. 2018): the input of
/// every linear and convolution layer but the first (that is, what follows a
/// ReLU, possibly pooled) is clipped to `[0, β]` and rounded to
/// `2^bits − 1` uniform steps, with one clip `β` per layer, a parameter
/// `<layer>.act_clip` of shape `[1]` that is learned (the straight-through
/// gradient of `min(max(x, 0), β)`: 1 where `x ≥ β`) or kept fixed. The
/// first layer's input, the image, is fixed point at `input_bits` with one
/// exponent per sample (the rule of [`Network::set_activation_bits`]).
///
/// Decided: `β` is used as `max(β, MIN_CLIP)` so that a learning step can
/// never make it zero or negative; the exported clip is that value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PactConfig {
    /// `k_a`, 2..=16.
    pub bits: u8,
    /// `β` at the start (learned) or throughout (fixed).
    pub clip: f32,
    /// Learn `β` per layer; `false` keeps it fixed.
    pub learned: bool,
    /// Width of the network input (2..=16).
    pub input_bits: u8,
}

/// The smallest clip PACT uses (see [`PactConfig`]).
pub const MIN_CLIP: f32 = 1e-3;

impl PactConfig {
    /// Rejects widths outside 2..=16 and a clip that is not a positive number.
    pub fn validate(&self) -> Result<()> {
        for (what, b) in [("activation", self.bits), ("input", self.input_bits)] {
            if !(2..=16).contains(&b) {
                return Err(ModelsError::Config(format!(
                    "PACT {what} width {b} is not allowed (2..=16)"
                )));
            }
        }
        if !(self.clip.is_finite() && self.clip >= MIN_CLIP) {
            return Err(ModelsError::Config(format!(
                "the PACT clip must be a number >= {MIN_CLIP}, not {}",
                self.clip
            )));
        }
        Ok(())
    }
}

/// A tensor copied to the host: the exchange format between training,
/// quantization and export.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The parameter or buffer name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

impl NamedTensor {
    /// Copies `t` to the host as f32.
    pub fn from_tensor(name: &str, t: &Tensor) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            shape: t.dims().to_vec(),
            values: t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        })
    }

    /// A tensor of these values on `device` (shape checked).
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        if self.shape.iter().product::<usize>() != self.values.len() {
            return Err(ModelsError::Shape {
                what: self.name.clone(),
                expected: self.shape.clone(),
                got: vec![self.values.len()],
            });
        }
        Ok(Tensor::from_slice(
            &self.values,
            self.shape.as_slice(),
            device,
        )?)
    }
}

/// A network of [`Arch`] on one device: trainable parameters plus buffers.
pub struct Network {
    /// The description this network interprets.
    pub arch: Arch,
    /// The trainable parameters, by the names of `Arch::parameter_shapes`.
    pub varmap: VarMap,
    /// Parameters in layer order (the same `Var`s as in `varmap`).
    params: Vec<(String, Var)>,
    /// Batch-norm running statistics, `Arch::buffer_shapes` order. Updated by
    /// training-mode forward passes, hence the lock (`forward` takes `&self`).
    buffers: Mutex<Vec<(String, Tensor)>>,
    /// Dropout generator; see [`Network::reseed_dropout`].
    dropout_rng: Mutex<ChaCha8Rng>,
    device: Device,
    /// Quantize the input of every linear and convolution layer to this
    /// many bits in the forward pass (see [`Network::set_activation_bits`]).
    act_bits: Option<u8>,
    /// PACT activations, when enabled ([`Network::enable_pact`]).
    pact: Option<PactConfig>,
}

/// Weights the forward pass uses instead of the parameters of the same name
/// (a method's quantized weights `Ŵ = Q(W)` with a straight-through
/// gradient, built by the method from the parameters).
pub type WeightOverrides = std::collections::HashMap<String, Tensor>;

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("arch", &self.arch)
            .field("device", &self.device)
            .finish()
    }
}

fn fan_in(shape: &[usize]) -> usize {
    shape.iter().skip(1).product::<usize>().max(1)
}

impl Network {
    /// A freshly initialised network (seeded, see the module docs).
    pub fn new(arch: Arch, device: &Device, seed: u64) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shapes = arch.parameter_shapes();
        let varmap = VarMap::new();
        let mut params = Vec::with_capacity(shapes.len());
        // Biases use the fan-in of the weight before them.
        let mut last_fan_in = 1usize;
        for (name, shape) in &shapes {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bn.weight") {
                vec![1.0; count]
            } else if name.ends_with(".bn.bias") {
                vec![0.0; count]
            } else {
                if name.ends_with(".weight") {
                    last_fan_in = fan_in(shape);
                }
                let bound = 1.0 / (last_fan_in as f32).sqrt();
                (0..count)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect()
            };
            let var = Var::from_vec(values, shape.as_slice(), device)?;
            varmap
                .data()
                .lock()
                .map_err(|_| ModelsError::Other("VarMap lock poisoned".into()))?
                .insert(name.clone(), var.clone());
            params.push((name.clone(), var));
        }
        let buffers = arch
            .buffer_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let t = if name.ends_with("running_var") {
                    Tensor::ones(shape.as_slice(), DType::F32, device)?
                } else {
                    Tensor::zeros(shape.as_slice(), DType::F32, device)?
                };
                Ok((name, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            arch,
            varmap,
            params,
            buffers: Mutex::new(buffers),
            dropout_rng: Mutex::new(epoch_rng(seed, 0, 2)),
            device: device.clone(),
            act_bits: None,
            pact: None,
        })
    }

    /// Turns on PACT activations ([`PactConfig`]): adds the parameter
    /// `<layer>.act_clip` (shape `[1]`, value `config.clip`) of every linear
    /// and convolution layer but the first, after the other parameters.
    /// Call it before an optimizer is built over [`parameters`](Self::parameters).
    pub fn enable_pact(&mut self, config: PactConfig) -> Result<()> {
        config.validate()?;
        if self.pact.is_some() {
            return Err(ModelsError::Config("PACT is already enabled".into()));
        }
        for name in self.clip_names() {
            let var = Var::from_vec(vec![config.clip], 1, &self.device)?;
            self.varmap
                .data()
                .lock()
                .map_err(|_| ModelsError::Other("VarMap lock poisoned".into()))?
                .insert(name.clone(), var.clone());
            self.params.push((name, var));
        }
        self.pact = Some(config);
        Ok(())
    }

    /// The PACT settings, if enabled.
    pub fn pact(&self) -> Option<PactConfig> {
        self.pact
    }

    /// The clip parameters PACT adds, in layer order.
    pub fn clip_names(&self) -> Vec<String> {
        self.arch
            .layers()
            .into_iter()
            .filter_map(|l| match l {
                LayerSpec::Linear { name, .. } | LayerSpec::Conv2d { name, .. } => Some(name),
                _ => None,
            })
            .skip(1)
            .map(|name| format!("{name}.{}", qgrad_runtime::ACT_CLIP))
            .collect()
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `(name, Var)` of every trainable parameter, in layer order.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    /// The parameter `name`.
    pub fn parameter(&self, name: &str) -> Option<&Var> {
        self.params.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Re-seeds the dropout generator; the training loop calls this at the
    /// start of every epoch with `(seed, epoch)`.
    pub fn reseed_dropout(&self, seed: u64, epoch: u64) {
        if let Ok(mut rng) = self.dropout_rng.lock() {
            *rng = epoch_rng(seed, epoch, 2);
        }
    }

    fn buffers_lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<(String, Tensor)>>> {
        self.buffers
            .lock()
            .map_err(|_| ModelsError::Other("network buffers lock poisoned".into()))
    }

    /// Trainable parameters copied to the host, in layer order.
    pub fn params_to_host(&self) -> Result<Vec<NamedTensor>> {
        self.params
            .iter()
            .map(|(n, v)| NamedTensor::from_tensor(n, v.as_tensor()))
            .collect()
    }

    /// Buffers (batch-norm running statistics) copied to the host.
    pub fn buffers_to_host(&self) -> Result<Vec<NamedTensor>> {
        self.buffers_lock()?
            .iter()
            .map(|(n, t)| NamedTensor::from_tensor(n, t))
            .collect()
    }

    /// Parameters (layer order) followed by buffers, copied to the host.
    /// Buffers are recognisable by their `.running_mean`/`.running_var` names
    /// and are not weights: quantizers must skip them.
    pub fn to_host(&self) -> Result<Vec<NamedTensor>> {
        let mut out = self.params_to_host()?;
        out.extend(self.buffers_to_host()?);
        Ok(out)
    }

    /// Overwrites parameters and/or buffers by name. Every given tensor must
    /// exist with the same shape; tensors not given keep their values.
    pub fn set_from_host(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        for t in tensors {
            if let Some((_, var)) = self.params.iter().find(|(n, _)| n == &t.name) {
                check_shape(&t.name, var.dims(), &t.shape)?;
                var.set(&t.to_tensor(&self.device)?)?;
                continue;
            }
            let mut buffers = self.buffers_lock()?;
            let Some((_, buf)) = buffers.iter_mut().find(|(n, _)| n == &t.name) else {
                return Err(ModelsError::Other(format!(
                    "{} has no parameter or buffer named '{}'",
                    self.arch, t.name
                )));
            };
            check_shape(&t.name, buf.dims(), &t.shape)?;
            *buf = t.to_tensor(&self.device)?;
        }
        Ok(())
    }

    /// Replaces one parameter's values on the device (no host copy); used by
    /// in-training quantization hooks.
    pub fn set_parameter(&self, name: &str, values: &Tensor) -> Result<()> {
        let var = self
            .parameter(name)
            .ok_or_else(|| ModelsError::Other(format!("no parameter named '{name}'")))?;
        check_shape(name, var.dims(), values.dims())?;
        var.set(&values.to_device(&self.device)?.to_dtype(DType::F32)?)?;
        Ok(())
    }

    /// Logits `[n, classes]` for `x: [n, c, h, w]`. In training mode batch norm
    /// uses batch statistics (and updates its running statistics) and dropout
    /// is active.
    /// Quantizes the input of every linear and convolution layer to `bits`
    /// bits (2..=16) in every forward pass, training and evaluation alike,
    /// exactly as the integer inference from the file does (one exponent per
    /// sample), with a straight-through gradient; `None` computes in f32.
    pub fn set_activation_bits(&mut self, bits: Option<u8>) -> Result<()> {
        if let Some(b) = bits {
            if !(2..=16).contains(&b) {
                return Err(ModelsError::Config(format!(
                    "activation width {b} is not allowed (2..=16)"
                )));
            }
        }
        self.act_bits = bits;
        Ok(())
    }

    /// The activation width of the forward pass, if quantized.
    pub fn activation_bits(&self) -> Option<u8> {
        self.act_bits
    }

    /// The forward pass: logits `[n, classes]` of images `[n, c, h, w]`.
    /// `train` selects batch statistics for batch norm and enables dropout.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_with(x, train, &WeightOverrides::new())
    }

    /// [`forward`](Self::forward) with some weights replaced by `overrides`.
    pub fn forward_with(
        &self,
        x: &Tensor,
        train: bool,
        overrides: &WeightOverrides,
    ) -> Result<Tensor> {
        self.forward_layers(x, train, overrides, true)
    }

    /// The forward pass; without `track`, every layer's output is detached,
    /// so that no graph keeps the activations of earlier layers alive (an
    /// evaluation batch of 1,000 CIFAR-10 images through VGG-16 held about
    /// 2 GB of them).
    fn forward_layers(
        &self,
        x: &Tensor,
        train: bool,
        overrides: &WeightOverrides,
        track: bool,
    ) -> Result<Tensor> {
        let [c, h, w] = self.arch.input_shape();
        let dims = x.dims();
        if dims.len() != 4 || dims[1..] != [c, h, w] {
            return Err(ModelsError::Shape {
                what: format!("{} input", self.arch),
                expected: vec![dims.first().copied().unwrap_or(0), c, h, w],
                got: dims.to_vec(),
            });
        }
        let mut x = x.clone();
        for layer in self.arch.layers() {
            x = match layer {
                LayerSpec::Linear { name, .. } => {
                    let (w, b) = self.weight_bias(&name, overrides)?;
                    let x = self.quantize_input(&x, &name)?;
                    qgrad_ops::linear(&x, w, Some(b))?
                }
                LayerSpec::Conv2d {
                    name,
                    stride,
                    padding,
                    ..
                } => {
                    let (w, b) = self.weight_bias(&name, overrides)?;
                    let x = self.quantize_input(&x, &name)?;
                    qgrad_ops::conv2d(&x, w, Some(b), stride, padding)?
                }
                LayerSpec::BatchNorm { name, .. } => self.batch_norm(&x, &name, train)?,
                LayerSpec::MaxPool2d { size } => qgrad_ops::max_pool2d(&x, size)?,
                LayerSpec::Relu => x.relu()?,
                LayerSpec::Dropout { p_percent } => {
                    if train && p_percent > 0 {
                        self.dropout(&x, p_percent)?
                    } else {
                        x
                    }
                }
                LayerSpec::Flatten => x.flatten_from(1)?,
            };
            if !track {
                x = x.detach();
            }
        }
        Ok(x)
    }

    fn weight_bias<'a>(
        &'a self,
        layer: &str,
        overrides: &'a WeightOverrides,
    ) -> Result<(&'a Tensor, &'a Tensor)> {
        let get = |suffix: &str| {
            let name = format!("{layer}.{suffix}");
            if let Some(t) = overrides.get(&name) {
                return Ok(t);
            }
            self.parameter(&name)
                .map(|v| v.as_tensor())
                .ok_or_else(|| ModelsError::Other(format!("missing parameter '{name}'")))
        };
        Ok((get("weight")?, get("bias")?))
    }

    /// `x` quantized to the network's activation width with one exponent per
    /// sample (`FixedActivations::quantize`'s rule), straight-through:
    /// the value is the quantized one, the gradient passes to `x` unchanged.
    /// With PACT, layers with a clip get [`pact`] and the first layer
    /// `input_bits`.
    fn quantize_input(&self, x: &Tensor, layer: &str) -> Result<Tensor> {
        if let Some(config) = self.pact {
            let clip = format!("{layer}.{}", qgrad_runtime::ACT_CLIP);
            return match self.parameter(&clip) {
                Some(beta) => pact(x, beta.as_tensor(), config.bits),
                None => straight_through_activations(x, config.input_bits),
            };
        }
        let Some(bits) = self.act_bits else {
            return Ok(x.clone());
        };
        straight_through_activations(x, bits)
    }

    /// The clip `β` of every PACT layer as used (`max(β, MIN_CLIP)`), by
    /// parameter name.
    pub fn activation_clips(&self) -> Result<Vec<NamedTensor>> {
        self.clip_names()
            .iter()
            .filter_map(|n| self.parameter(n).map(|v| (n, v)))
            .map(|(n, v)| {
                let mut t = NamedTensor::from_tensor(n, v.as_tensor())?;
                t.values.iter_mut().for_each(|b| *b = b.max(MIN_CLIP));
                Ok(t)
            })
            .collect()
    }

    /// Batch norm over the channel axis (1) of a rank-2 or rank-4 input, as
    /// one qgrad-ops op. Training mode normalises with the batch statistics
    /// and updates the running ones (PyTorch's update, with the unbiased
    /// variance); evaluation mode uses the running statistics.
    fn batch_norm(&self, x: &Tensor, layer: &str, train: bool) -> Result<Tensor> {
        let none = WeightOverrides::new();
        let (gamma, beta) = self.weight_bias(&format!("{layer}.bn"), &none)?;
        if !matches!(x.rank(), 2 | 4) {
            return Err(ModelsError::Other(format!(
                "batch norm '{layer}' needs a rank-2 or rank-4 input, got rank {}",
                x.rank()
            )));
        }
        let mean_name = format!("{layer}.bn.running_mean");
        let var_name = format!("{layer}.bn.running_var");
        if train {
            let (y, mean, var) = qgrad_ops::batch_norm_train(x, gamma, beta, BN_EPS)?;
            // Values per channel: every axis but the channel axis.
            let count = x.elem_count() / gamma.dim(0)?.max(1);
            let unbiased = count as f64 / (count.max(2) - 1) as f64;
            let mut buffers = self.buffers_lock()?;
            for (name, batch_stat, scale) in [(&mean_name, &mean, 1.0), (&var_name, &var, unbiased)]
            {
                let slot = buffers
                    .iter_mut()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| ModelsError::Other(format!("missing buffer '{name}'")))?;
                let stat = batch_stat.affine(BN_MOMENTUM * scale, 0.0)?;
                slot.1 = (slot.1.affine(1.0 - BN_MOMENTUM, 0.0)? + stat)?;
            }
            Ok(y)
        } else {
            let buffers = self.buffers_lock()?;
            let find = |name: &str| {
                buffers
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t)
                    .ok_or_else(|| ModelsError::Other(format!("missing buffer '{name}'")))
            };
            Ok(qgrad_ops::batch_norm_eval(
                x,
                gamma,
                beta,
                find(&mean_name)?,
                find(&var_name)?,
                BN_EPS,
            )?)
        }
    }

    fn dropout(&self, x: &Tensor, p_percent: u8) -> Result<Tensor> {
        let p = f64::from(p_percent.min(100)) / 100.0;
        if p >= 1.0 {
            return Ok(x.zeros_like()?);
        }
        let keep_scale = (1.0 / (1.0 - p)) as f32;
        let mut rng = self
            .dropout_rng
            .lock()
            .map_err(|_| ModelsError::Other("dropout generator lock poisoned".into()))?;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random_bool(p) { 0.0 } else { keep_scale })
            .collect();
        let mask = Tensor::from_vec(mask, x.dims(), x.device())?;
        Ok(x.mul(&mask)?)
    }

    /// Test accuracy (fraction in [0, 1]) and mean cross-entropy loss,
    /// evaluation mode, batches in dataset order.
    pub fn evaluate_with_loss(
        &self,
        data: &Dataset,
        norm: &Normalization,
        batch: usize,
    ) -> Result<(f64, f64)> {
        self.evaluate_with_overrides(data, norm, batch, &WeightOverrides::new())
    }

    /// [`evaluate_with_loss`](Self::evaluate_with_loss) with some weights
    /// replaced (a method's quantized weights).
    pub fn evaluate_with_overrides(
        &self,
        data: &Dataset,
        norm: &Normalization,
        batch: usize,
        overrides: &WeightOverrides,
    ) -> Result<(f64, f64)> {
        if data.is_empty() {
            return Err(ModelsError::Config(
                "cannot evaluate on an empty dataset".into(),
            ));
        }
        if data.shape != self.arch.input_shape() {
            return Err(ModelsError::Shape {
                what: format!("{} dataset images", self.arch),
                expected: self.arch.input_shape().to_vec(),
                got: data.shape.to_vec(),
            });
        }
        let batch = batch.max(1);
        let order: Vec<usize> = (0..data.len()).collect();
        let mut rng = epoch_rng(0, 0, 0);
        let mut buf = Vec::new();
        let mut correct = 0u64;
        let mut loss_sum = 0f64;
        for idx in order.chunks(batch) {
            let labels = data.gather(idx, norm, Augment::None, &mut rng, &mut buf);
            let [c, h, w] = data.shape;
            let x = Tensor::from_slice(&buf, (idx.len(), c, h, w), &self.device)?;
            let y = Tensor::from_vec(labels, idx.len(), &self.device)?;
            let logits = self.forward_layers(&x, false, overrides, false)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * idx.len() as f64;
            let pred = logits.argmax(D::Minus1)?;
            correct += pred
                .eq(&y)?
                .to_dtype(DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()? as u64;
        }
        Ok((
            correct as f64 / data.len() as f64,
            loss_sum / data.len() as f64,
        ))
    }

    /// Test accuracy (fraction in [0, 1]).
    pub fn evaluate(&self, data: &Dataset, norm: &Normalization, batch: usize) -> Result<f64> {
        Ok(self.evaluate_with_loss(data, norm, batch)?.0)
    }
}

/// `x` at `bits` with one exponent per sample, straight through:
/// `q + (x − x̄)` is `q` exactly (with `+0.0` for zeros) and has `x`'s
/// gradient. An input without a gradient (the image batch of the first
/// layer) gets `q` itself: the same values, two tensor passes fewer.
fn straight_through_activations(x: &Tensor, bits: u8) -> Result<Tensor> {
    let q = crate::eval::quantize_activations_f32(&x.detach(), bits)?;
    if !x.track_op() {
        return Ok(q);
    }
    Ok((q + (x - x.detach())?)?)
}

/// PACT's forward (see [`PactConfig`]): `y = min(max(x, 0), β)`, written as
/// `relu(x) − relu(x − β)` so that `β` gets gradient 1 where `x ≥ β`, then
/// `round(y · L/β) · β/L` with a straight-through gradient to `y`; `β` is
/// used as `max(β, MIN_CLIP)`. One op on the CPU ([`qgrad_ops::pact`], equal
/// to its candle composition value for value).
pub fn pact(x: &Tensor, beta: &Tensor, bits: u8) -> Result<Tensor> {
    let beta = beta.maximum(MIN_CLIP)?;
    Ok(qgrad_ops::pact(x, &beta, bits)?)
}

fn check_shape(name: &str, expected: &[usize], got: &[usize]) -> Result<()> {
    if expected != got {
        return Err(ModelsError::Shape {
            what: name.to_string(),
            expected: expected.to_vec(),
            got: got.to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_of_the_lenets() {
        let dev = Device::Cpu;
        assert_eq!(
            Network::new(Arch::Lenet300100, &dev, 0)
                .unwrap()
                .num_parameters(),
            266_610
        );
        assert_eq!(
            Network::new(Arch::Lenet5, &dev, 0)
                .unwrap()
                .num_parameters(),
            431_080
        );
    }

    #[test]
    fn init_is_seeded_and_pytorch_like() {
        let dev = Device::Cpu;
        let a = Network::new(Arch::Lenet300100, &dev, 3)
            .unwrap()
            .to_host()
            .unwrap();
        let b = Network::new(Arch::Lenet300100, &dev, 3)
            .unwrap()
            .to_host()
            .unwrap();
        let c = Network::new(Arch::Lenet300100, &dev, 4)
            .unwrap()
            .to_host()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let bound = 1.0 / 784f32.sqrt();
        assert!(a[0].values.iter().all(|v| v.abs() <= bound));
        assert!(a[0].values.iter().any(|v| v.abs() > 0.9 * bound));
    }

    #[test]
    fn forward_shapes_and_bad_input() {
        let dev = Device::Cpu;
        for arch in [Arch::Lenet300100, Arch::Lenet5] {
            let net = Network::new(arch, &dev, 0).unwrap();
            let x = Tensor::zeros((3, 1, 28, 28), DType::F32, &dev).unwrap();
            assert_eq!(net.forward(&x, true).unwrap().dims(), &[3, 10]);
            let bad = Tensor::zeros((3, 784), DType::F32, &dev).unwrap();
            assert!(matches!(
                net.forward(&bad, false),
                Err(ModelsError::Shape { .. })
            ));
        }
    }

    #[test]
    fn batch_norm_and_dropout_on_vgg_small_batch() {
        let dev = Device::Cpu;
        let net = Network::new(Arch::Vgg16, &dev, 1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
        net.reseed_dropout(5, 0);
        let a = net.forward(&x, true).unwrap();
        assert_eq!(a.dims(), &[2, 10]);
        // Running statistics moved away from their initial values.
        let bufs = net.buffers_to_host().unwrap();
        assert_eq!(bufs[0].name, "conv1.bn.running_mean");
        assert!(bufs[0].values.iter().any(|&v| v != 0.0));
        // Same dropout seed, same buffers -> same output; eval is deterministic.
        let e1 = net.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        let e2 = net.forward(&x, false).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e1, e2);
        assert!(e1.iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn set_from_host_round_trip_and_errors() {
        let dev = Device::Cpu;
        let src = Network::new(Arch::Lenet5, &dev, 1).unwrap();
        let mut dst = Network::new(Arch::Lenet5, &dev, 2).unwrap();
        dst.set_from_host(&src.to_host().unwrap()).unwrap();
        assert_eq!(dst.to_host().unwrap(), src.to_host().unwrap());
        let bad = NamedTensor {
            name: "conv1.weight".into(),
            shape: vec![1],
            values: vec![0.0],
        };
        assert!(dst.set_from_host(&[bad]).is_err());
        let unknown = NamedTensor {
            name: "nope".into(),
            shape: vec![1],
            values: vec![0.0],
        };
        assert!(dst.set_from_host(&[unknown]).is_err());
    }

    #[test]
    fn pact_clips_rounds_and_passes_gradients_only_inside_the_clip() {
        let dev = Device::Cpu;
        let x = Var::from_vec(vec![-1.0f32, 0.2, 0.9, 1.4, 3.0], (1, 5), &dev).unwrap();
        let beta = Var::from_vec(vec![1.5f32], 1, &dev).unwrap();
        // 2 bits: steps of 0.5 on [0, 1.5].
        let y = pact(x.as_tensor(), beta.as_tensor(), 2).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0.0, 0.0, 1.0, 1.5, 1.5]);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = grads
            .get(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Straight through inside [0, β], blocked outside.
        assert_eq!(gx, vec![0.0, 1.0, 1.0, 1.0, 0.0]);
        // β gets 1 from every input above it (only 3.0 here).
        let gb: Vec<f32> = grads.get(&beta).unwrap().to_vec1().unwrap();
        assert_eq!(gb, vec![1.0]);
        // A clip driven below MIN_CLIP is used as MIN_CLIP.
        let tiny = Tensor::new(&[-3.0f32], &dev).unwrap();
        let y = pact(x.as_tensor(), &tiny, 2).unwrap();
        let m: f32 = y.max_all().unwrap().to_scalar().unwrap();
        assert!((m - MIN_CLIP).abs() < 1e-9);
    }

    #[test]
    fn pact_adds_one_clip_per_layer_but_the_first_and_checkpoints_them() {
        let arch: Arch = "mlp-32x3".parse().unwrap();
        let mut net = Network::new(arch, &Device::Cpu, 1).unwrap();
        let before = net.parameters().len();
        let config = PactConfig {
            bits: 3,
            clip: 2.0,
            learned: true,
            input_bits: 8,
        };
        net.enable_pact(config).unwrap();
        assert_eq!(net.parameters().len(), before + 3);
        assert_eq!(
            net.clip_names(),
            vec!["fc2.act_clip", "fc3.act_clip", "fc4.act_clip"]
        );
        assert!(net.enable_pact(config).is_err());
        assert!(PactConfig { bits: 1, ..config }.validate().is_err());
        assert!(PactConfig {
            clip: f32::NAN,
            ..config
        }
        .validate()
        .is_err());
        // The activations after the first layer take at most 2^3 values.
        let x = Tensor::randn(0f32, 1.0, (4, 1, 28, 28), &Device::Cpu).unwrap();
        assert!(net.forward(&x, false).is_ok());
        let h = net
            .quantize_input(
                &Tensor::randn(0f32, 3.0, (4, 32), &Device::Cpu).unwrap(),
                "fc2",
            )
            .unwrap();
        let mut v: Vec<u32> = h
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        v.sort();
        v.dedup();
        assert!(v.len() <= 8, "{} values", v.len());
        // A state with PACT saves and resumes its clips.
        let mut cfg = crate::TrainConfig::default_for(arch);
        cfg.pact = Some(PactConfig {
            learned: false,
            ..config
        });
        let dir = tempfile::tempdir().unwrap();
        cfg.checkpoint_dir = Some(dir.path().to_path_buf());
        let state = crate::TrainState::new(arch, &Device::Cpu, &cfg).unwrap();
        // A fixed clip is frozen.
        assert!(state.mask("fc2.act_clip").is_some());
        let path = dir.path().join(crate::checkpoint::CHECKPOINT_FILE);
        crate::checkpoint::save_checkpoint(&state, &cfg, &path).unwrap();
        let (loaded, _) = crate::checkpoint::load_checkpoint(&path, &Device::Cpu).unwrap();
        assert_eq!(
            loaded.network.activation_clips().unwrap(),
            state.network.activation_clips().unwrap()
        );
        assert!(loaded.mask("fc3.act_clip").is_some());
    }
}
