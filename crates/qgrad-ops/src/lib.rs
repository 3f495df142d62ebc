//! Training ops for candle that run fast on the CPU.
//!
//! (Initial version: delegates to candle's own ops. The im2col/GEMM custom ops
//! replace these bodies; the signatures are the contract that qgrad-models
//! calls, and must not change.)
use candle_core::{Result, Tensor};

/// 2-D convolution, `x: [n, c, h, w]`, `weight: [o, c, k, k]`, `bias: [o]`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dims1()?, 1, 1))?),
        None => Ok(y),
    }
}

/// Fully connected layer, `x: [n, in]`, `weight: [out, in]`, `bias: [out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&weight.t()?)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Non-overlapping max pooling (kernel == stride), `x: [n, c, h, w]`.
pub fn max_pool2d(x: &Tensor, size: usize) -> Result<Tensor> {
    x.max_pool2d(size)
}
