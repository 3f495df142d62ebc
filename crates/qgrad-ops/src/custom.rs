//! The candle custom ops that wrap the kernels of `conv`, `dense` and `pool`.
//!
//! Forward ops record themselves in candle's graph (`apply_op2`/`apply_op3`);
//! their `bwd` computes a gradient only for an argument whose `track_op()` is
//! true, i.e. one that leads to a variable: the image batch fed to the first
//! layer never gets an input gradient, and a frozen constant never gets a
//! weight gradient. The backward kernels themselves are applied with
//! `apply_op*_no_bwd` (qgrad never differentiates twice).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use crate::conv::{self, ConvGeometry};
use crate::dense::{self, LinearGeometry};
use crate::pool::{self, PoolGeometry};
use crate::OpsError;

/// The f32 values of a contiguous CPU tensor argument.
fn f32_values<'a>(what: &str, storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
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
