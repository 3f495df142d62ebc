//! Fully connected layer kernels: `y = x·Wᵀ + b` and its gradients.

use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::OpsError;

/// Shapes of one linear layer: `x [batch, inputs]`, `weight [outputs, inputs]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinearGeometry {
    pub batch: usize,
    pub inputs: usize,
    pub outputs: usize,
}

impl LinearGeometry {
    pub fn new(x_dims: &[usize], w_dims: &[usize]) -> Result<Self, OpsError> {
        let &[batch, inputs] = x_dims else {
            return Err(OpsError::Shape(format!(
                "linear input must be [n, in], got {x_dims:?}"
            )));
        };
        let &[outputs, w_in] = w_dims else {
            return Err(OpsError::Shape(format!(
                "linear weight must be [out, in], got {w_dims:?}"
            )));
        };
        if w_in != inputs {
            return Err(OpsError::Shape(format!(
                "linear weight {w_dims:?} expects {w_in} inputs, input {x_dims:?} has {inputs}"
            )));
        }
        Ok(Self {
            batch,
            inputs,
            outputs,
        })
    }
}

fn check_len(what: &str, data: &[f32], expected: usize) -> Result<(), OpsError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(OpsError::Internal(format!(
            "linear {what} holds {} values, its shape needs {expected}",
            data.len()
        )))
    }
}

/// `y [n, out] = x · Wᵀ + b`; the bias initialises the destination so the
/// GEMM adds onto it in the same pass.
pub(crate) fn forward(
    g: &LinearGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>, OpsError> {
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    check_len("input", x, n * i)?;
    check_len("weight", weight, o * i)?;
    let mut y = vec![0.0f32; n * o];
    if let Some(bias) = bias {
        check_len("bias", bias, o)?;
        if o > 0 {
            for row in y.chunks_exact_mut(o) {
                row.copy_from_slice(bias);
            }
        }
    }
    matmul(
        &mut y,
        MatRef::row_major(x, n, i),
        MatRef::row_major(weight, o, i).t(),
        bias.is_some(),
        parallelism_for(n, o, i),
    )?;
    Ok(y)
}

/// `dx [n, in] = dy · W`.
pub(crate) fn input_grad(
    g: &LinearGeometry,
    dy: &[f32],
    weight: &[f32],
) -> Result<Vec<f32>, OpsError> {
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    check_len("output gradient", dy, n * o)?;
    check_len("weight", weight, o * i)?;
    let mut dx = vec![0.0f32; n * i];
    matmul(
        &mut dx,
        MatRef::row_major(dy, n, o),
        MatRef::row_major(weight, o, i),
        false,
        parallelism_for(n, i, o),
    )?;
    Ok(dx)
}

/// `dW [out, in] = dyᵀ · x`.
pub(crate) fn weight_grad(g: &LinearGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, OpsError> {
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    check_len("input", x, n * i)?;
    check_len("output gradient", dy, n * o)?;
    let mut dw = vec![0.0f32; o * i];
    matmul(
        &mut dw,
        MatRef::row_major(dy, n, o).t(),
        MatRef::row_major(x, n, i),
        false,
        parallelism_for(o, i, n),
    )?;
    Ok(dw)
}
