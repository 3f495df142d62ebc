//! The candle custom ops that wrap the kernels of `conv`, `dense`, `pool` and
//! `batch_norm`.
//!
//! Forward ops record themselves in candle's graph (`apply_op2`/`apply_op3`);
//! their `bwd` computes a gradient only for an argument whose `track_op()` is
//! true, i.e. one that leads to a variable: the image batch fed to the first
//! layer never gets an input gradient, and a frozen constant never gets a
//! weight gradient. The backward kernels themselves are applied with
//! `apply_op*_no_bwd` (qgrad never differentiates twice).

use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::batch_norm::{self, BatchStats, BnGeometry, InputGradCoefficients};
use crate::conv::{self, ConvGeometry};
use crate::dense::{self, LinearGeometry};
use crate::pool::{self, PoolGeometry};
use crate::OpsError;

/// The f32 values of a contiguous CPU tensor argument.
pub(crate) fn f32_values<'a>(
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        return Err(
            OpsError::DType(format!("{what} is {:?}, expected f32", storage.dtype())).into(),
        );
    };
    match layout.contiguous_offsets() {
        Some((start, end)) if end <= values.len() => Ok(&values[start..end]),
        _ => Err(OpsError::Internal(format!("{what} is not contiguous")).into()),
    }
}

fn output(values: Vec<f32>, dims: &[usize]) -> Result<(CpuStorage, Shape)> {
    Ok((CpuStorage::F32(values), Shape::from_dims(dims)))
}

/// `grad.contiguous()`, which is free when it already is.
fn contiguous(t: &Tensor) -> Result<Tensor> {
    t.contiguous()
}

// ---------------------------------------------------------------------------
// Convolution

/// Forward convolution; args `(x, weight)` or `(x, weight, bias)`.
pub(crate) struct Conv2dOp {
    pub stride: usize,
    pub padding: usize,
}

impl Conv2dOp {
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<ConvGeometry> {
        Ok(ConvGeometry::new(
            x.dims(),
            w.dims(),
            self.stride,
            self.padding,
        )?)
    }

    fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = contiguous(grad)?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(
                weight,
                &ConvInputGrad {
                    x_dims: x.dims().to_vec(),
                    stride: self.stride,
                    padding: self.padding,
                },
            )?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            Some(x.apply_op2_no_bwd(
                &grad,
                &ConvWeightGrad {
                    w_dims: weight.dims().to_vec(),
                    stride: self.stride,
                    padding: self.padding,
                },
            )?)
        } else {
            None
        };
        let db = match bias {
            Some(b) if b.track_op() => Some(grad.apply_op1_no_bwd(&ChannelSum)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "qgrad-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl, wl)?;
        let x = f32_values("conv2d input", xs, xl)?;
        let w = f32_values("conv2d weight", ws, wl)?;
        output(conv::forward(&g, x, w, None)?, &g.output_dims())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, weight, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "qgrad-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl, wl)?;
        let x = f32_values("conv2d input", xs, xl)?;
        let w = f32_values("conv2d weight", ws, wl)?;
        let b = f32_values("conv2d bias", bs, bl)?;
        output(conv::forward(&g, x, w, Some(b))?, &g.output_dims())
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, weight, Some(bias), grad)
    }
}

/// `dx` of a convolution; args `(dy, weight)`.
struct ConvInputGrad {
    x_dims: Vec<usize>,
    stride: usize,
    padding: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "qgrad-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(&self.x_dims, wl.dims(), self.stride, self.padding)?;
        if dyl.dims() != g.output_dims() {
            return Err(OpsError::Internal(format!(
                "conv2d output gradient has shape {:?}, the output {:?}",
                dyl.dims(),
                g.output_dims()
            ))
            .into());
        }
        let dy = f32_values("conv2d output gradient", dys, dyl)?;
        let w = f32_values("conv2d weight", ws, wl)?;
        output(conv::input_grad(&g, dy, w)?, &self.x_dims)
    }
}

/// `dW` of a convolution; args `(x, dy)`.
struct ConvWeightGrad {
    w_dims: Vec<usize>,
    stride: usize,
    padding: usize,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "qgrad-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = ConvGeometry::new(xl.dims(), &self.w_dims, self.stride, self.padding)?;
        if dyl.dims() != g.output_dims() {
            return Err(OpsError::Internal(format!(
                "conv2d output gradient has shape {:?}, the output {:?}",
                dyl.dims(),
                g.output_dims()
            ))
            .into());
        }
        let x = f32_values("conv2d input", xs, xl)?;
        let dy = f32_values("conv2d output gradient", dys, dyl)?;
        output(conv::weight_grad(&g, x, dy)?, &self.w_dims)
    }
}

/// Bias gradient of a convolution or linear layer: `dy [n, c, ...]` summed
/// over every axis but the channel axis 1.
struct ChannelSum;

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "qgrad-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() < 2 {
            return Err(OpsError::Internal(format!(
                "bias gradient needs a [n, c, ...] gradient, got {dims:?}"
            ))
            .into());
        }
        let positions = dims[2..].iter().product();
        let dy = f32_values("output gradient", s, l)?;
        output(
            conv::bias_grad(dy, dims[0], dims[1], positions)?,
            &[dims[1]],
        )
    }
}

// ---------------------------------------------------------------------------
// Linear

/// Forward linear layer; args `(x, weight)` or `(x, weight, bias)`.
pub(crate) struct LinearOp;

impl LinearOp {
    fn backward(
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = contiguous(grad)?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(weight, &LinearInputGrad)?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            Some(x.apply_op2_no_bwd(&grad, &LinearWeightGrad)?)
        } else {
            None
        };
        let db = match bias {
            Some(b) if b.track_op() => Some(grad.apply_op1_no_bwd(&ChannelSum)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "qgrad-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = LinearGeometry::new(xl.dims(), wl.dims())?;
        let x = f32_values("linear input", xs, xl)?;
        let w = f32_values("linear weight", ws, wl)?;
        output(dense::forward(&g, x, w, None)?, &[g.batch, g.outputs])
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = Self::backward(x, weight, None, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "qgrad-linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = LinearGeometry::new(xl.dims(), wl.dims())?;
        let x = f32_values("linear input", xs, xl)?;
        let w = f32_values("linear weight", ws, wl)?;
        let b = f32_values("linear bias", bs, bl)?;
        output(dense::forward(&g, x, w, Some(b))?, &[g.batch, g.outputs])
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Self::backward(x, weight, Some(bias), grad)
    }
}

/// `dx` of a linear layer; args `(dy, weight)`.
struct LinearInputGrad;

impl CustomOp2 for LinearInputGrad {
    fn name(&self) -> &'static str {
        "qgrad-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[batch, outputs], &[w_out, inputs]) = (dyl.dims(), wl.dims()) else {
            return Err(OpsError::Internal(format!(
                "linear input gradient from dy {:?} and weight {:?}",
                dyl.dims(),
                wl.dims()
            ))
            .into());
        };
        if w_out != outputs {
            return Err(OpsError::Internal(format!(
                "linear output gradient has {outputs} outputs, the weight {w_out}"
            ))
            .into());
        }
        let g = LinearGeometry {
            batch,
            inputs,
            outputs,
        };
        let dy = f32_values("linear output gradient", dys, dyl)?;
        let w = f32_values("linear weight", ws, wl)?;
        output(dense::input_grad(&g, dy, w)?, &[batch, inputs])
    }
}

/// `dW` of a linear layer; args `(x, dy)`.
struct LinearWeightGrad;

impl CustomOp2 for LinearWeightGrad {
    fn name(&self) -> &'static str {
        "qgrad-linear-weight-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (&[batch, inputs], &[dy_batch, outputs]) = (xl.dims(), dyl.dims()) else {
            return Err(OpsError::Internal(format!(
                "linear weight gradient from x {:?} and dy {:?}",
                xl.dims(),
                dyl.dims()
            ))
            .into());
        };
        if dy_batch != batch {
            return Err(OpsError::Internal(format!(
                "linear output gradient has batch {dy_batch}, the input {batch}"
            ))
            .into());
        }
        let g = LinearGeometry {
            batch,
            inputs,
            outputs,
        };
        let x = f32_values("linear input", xs, xl)?;
        let dy = f32_values("linear output gradient", dys, dyl)?;
        output(dense::weight_grad(&g, x, dy)?, &[outputs, inputs])
    }
}

// ---------------------------------------------------------------------------
// Max pooling

pub(crate) struct MaxPool2dOp {
    pub size: usize,
}

impl CustomOp1 for MaxPool2dOp {
    fn name(&self) -> &'static str {
        "qgrad-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeometry::new(l.dims(), self.size)?;
        let x = f32_values("max_pool2d input", s, l)?;
        output(pool::forward(&g, x)?, &g.output_dims(l.dims()))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let grad = contiguous(grad)?;
        let res = contiguous(res)?;
        Ok(Some(x.apply_op3_no_bwd(
            &res,
            &grad,
            &MaxPool2dGrad { size: self.size },
        )?))
    }
}

/// `dx` of max pooling; args `(x, y, dy)`.
struct MaxPool2dGrad {
    size: usize,
}

impl CustomOp3 for MaxPool2dGrad {
    fn name(&self) -> &'static str {
        "qgrad-max-pool2d-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = PoolGeometry::new(xl.dims(), self.size)?;
        let expected = g.output_dims(xl.dims());
        if yl.dims() != expected.as_slice() || dyl.dims() != expected.as_slice() {
            return Err(OpsError::Internal(format!(
                "max_pool2d gradient: output {:?} and gradient {:?}, expected {expected:?}",
                yl.dims(),
                dyl.dims()
            ))
            .into());
        }
        let x = f32_values("max_pool2d input", xs, xl)?;
        let y = f32_values("max_pool2d output", ys, yl)?;
        let dy = f32_values("max_pool2d output gradient", dys, dyl)?;
        output(pool::backward(&g, x, y, dy)?, xl.dims())
    }
}

// ---------------------------------------------------------------------------
// Batch norm

/// Training-mode batch norm; args `(x, gamma, beta)`.
///
/// The forward pass leaves the batch statistics in `stats`, which the caller
/// shares: [`crate::batch_norm_train`] reads them for the running averages,
/// and `bwd` (the op lives in the graph until the backward pass) reads the
/// mean and variance the output was normalised with instead of recomputing
/// them.
pub(crate) struct BatchNormTrainOp {
    pub eps: f64,
    pub stats: Arc<OnceLock<BatchStats>>,
}

impl CustomOp3 for BatchNormTrainOp {
    fn name(&self) -> &'static str {
        "qgrad-batch-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = BnGeometry::new(xl.dims(), &[("weight", gl.dims()), ("bias", bl.dims())])?;
        let x = f32_values("batch norm input", xs, xl)?;
        let gamma = f32_values("batch norm weight", gs, gl)?;
        let beta = f32_values("batch norm bias", bs, bl)?;
        let stats = batch_norm::batch_stats(&g, x)?;
        let mean: Vec<f32> = stats.mean.iter().map(|&m| m as f32).collect();
        let scale: Vec<f32> = (stats.var.iter().zip(gamma))
            .map(|(&v, &w)| (f64::from(w) / (v + self.eps).sqrt()) as f32)
            .collect();
        let y = batch_norm::channel_affine(&g, x, &mean, &scale, beta)?;
        self.stats
            .set(stats)
            .map_err(|_| OpsError::Internal("batch norm op applied twice".into()))?;
        output(y, xl.dims())
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.get().ok_or_else(|| {
            OpsError::Internal("batch norm backward before its forward pass".into())
        })?;
        let inv_std = stats
            .var
            .iter()
            .map(|&v| 1.0 / (v + self.eps).sqrt())
            .collect();
        let kind = ChannelGradKind::Train {
            mean: stats.mean.clone(),
            inv_std,
        };
        channel_norm_backward(kind, x, gamma, beta, grad)
    }
}

/// Evaluation-mode batch norm, `y = (x - center[c]) · scale[c] + shift[c]`;
/// args `(x, scale, shift)`. `center` (the running mean) is a constant;
/// `scale = γ / sqrt(running var + eps)` comes from candle ops on `[c]`
/// tensors, so γ still gets its gradient through it.
pub(crate) struct ChannelAffineOp {
    pub center: Vec<f32>,
}

impl CustomOp3 for ChannelAffineOp {
    fn name(&self) -> &'static str {
        "qgrad-batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ss: &CpuStorage,
        sl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = BnGeometry::new(xl.dims(), &[("scale", sl.dims()), ("shift", bl.dims())])?;
        let x = f32_values("batch norm input", xs, xl)?;
        let scale = f32_values("batch norm scale", ss, sl)?;
        let shift = f32_values("batch norm shift", bs, bl)?;
        output(
            batch_norm::channel_affine(&g, x, &self.center, scale, shift)?,
            xl.dims(),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let kind = ChannelGradKind::Affine {
            center: self.center.iter().map(|&m| f64::from(m)).collect(),
        };
        channel_norm_backward(kind, x, scale, shift, grad)
    }
}

/// Which per-channel op a [`ChannelNormGrad`] differentiates.
enum ChannelGradKind {
    /// Training batch norm: `y = (x - mean)·inv_std·γ + β`, the statistics
    /// themselves functions of `x`.
    Train { mean: Vec<f64>, inv_std: Vec<f64> },
    /// `y = (x - center)·scale + shift` with a constant `center`.
    Affine { center: Vec<f64> },
}

/// The shared `bwd` of the two batch-norm ops: one [`ChannelNormGrad`] pass,
/// its flat output split into the gradients that were asked for.
fn channel_norm_backward(
    kind: ChannelGradKind,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (want_x, want_w, want_b) = (x.track_op(), weight.track_op(), bias.track_op());
    if !(want_x || want_w || want_b) {
        return Ok((None, None, None));
    }
    let grad = contiguous(grad)?;
    let op = ChannelNormGrad {
        kind,
        input_grad: want_x,
    };
    let flat = x.apply_op3_no_bwd(weight, &grad, &op)?;
    let (len, channels) = (x.elem_count(), weight.elem_count());
    let start = if want_x { len } else { 0 };
    let dx = if want_x {
        Some(flat.narrow(0, 0, len)?.reshape(x.dims())?)
    } else {
        None
    };
    let dw = want_w
        .then(|| flat.narrow(0, start, channels))
        .transpose()?;
    let db = want_b
        .then(|| flat.narrow(0, start + channels, channels))
        .transpose()?;
    Ok((dx, dw, db))
}

/// Gradients of a per-channel normalisation; args `(x, weight, dy)`, where
/// the weight is γ (training) or the scale (evaluation). One flat output:
/// `dx` (when `input_grad`), then the weight gradient `[c]`, then the bias
/// gradient `[c]`, since a custom op returns a single tensor. The parameter
/// gradients are cheap by-products of the sums `dx` needs anyway.
struct ChannelNormGrad {
    kind: ChannelGradKind,
    input_grad: bool,
}

impl CustomOp3 for ChannelNormGrad {
    fn name(&self) -> &'static str {
        "qgrad-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        dys: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = BnGeometry::new(xl.dims(), &[("weight", wl.dims())])?;
        if dyl.dims() != xl.dims() {
            return Err(OpsError::Internal(format!(
                "batch norm output gradient has shape {:?}, the input {:?}",
                dyl.dims(),
                xl.dims()
            ))
            .into());
        }
        let x = f32_values("batch norm input", xs, xl)?;
        let w = f32_values("batch norm weight", ws, wl)?;
        let dy = f32_values("batch norm output gradient", dys, dyl)?;
        let n = g.count() as f64;
        let center = match &self.kind {
            ChannelGradKind::Train { mean, .. } => mean,
            ChannelGradKind::Affine { center } => center,
        };
        let (sum_dy, sum_dyx) = batch_norm::channel_sums(&g, x, center, dy)?;
        let (mut out, dw) = match &self.kind {
            ChannelGradKind::Train { mean, inv_std } => {
                let dx = if self.input_grad {
                    let f = |v: f64| v as f32;
                    let co = InputGradCoefficients {
                        mean: mean.iter().map(|&m| f(m)).collect(),
                        k: (w.iter().zip(inv_std))
                            .map(|(&w, &s)| f(f64::from(w) * s))
                            .collect(),
                        a: sum_dy.iter().map(|&s| f(s / n)).collect(),
                        b: (sum_dyx.iter().zip(inv_std))
                            .map(|(&s, &i)| f(i * i * s / n))
                            .collect(),
                    };
                    batch_norm::train_input_grad(&g, x, dy, &co)?
                } else {
                    Vec::new()
                };
                let dgamma = sum_dyx.iter().zip(inv_std).map(|(&s, &i)| s * i);
                (dx, dgamma.collect::<Vec<f64>>())
            }
            ChannelGradKind::Affine { .. } => {
                let dx = if self.input_grad {
                    batch_norm::scaled_grad(&g, dy, w)?
                } else {
                    Vec::new()
                };
                (dx, sum_dyx)
            }
        };
        out.reserve_exact(2 * g.channels);
        out.extend(dw.iter().map(|&v| v as f32));
        out.extend(sum_dy.iter().map(|&v| v as f32));
        let len = out.len();
        output(out, &[len])
    }
}
