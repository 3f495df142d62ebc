//! Training ops for candle that run fast on the CPU.
//!
//! qgrad-models' forward pass calls [`conv2d`], [`linear`], [`max_pool2d`],
//! [`batch_norm_train`] and [`batch_norm_eval`]; they have candle's semantics
//! (same shapes, same numbers within f32 rounding, same gradients; for batch
//! norm, which candle lacks, the semantics of its composition from candle ops
//! in [`mod@reference`]), and on the CPU they run as candle custom ops:
//!
//! - **Convolution through im2col + GEMM, both ways.** candle differentiates a
//!   convolution's input through its naive `conv_transpose2d` (4–9 GFLOP/s on
//!   the 2-core reference machine, against ~68 GFLOP/s for a large GEMM). Here
//!   the forward pass, the input gradient (`Wᵀ·dY` then col2im) and the weight
//!   gradient (`dY·colᵀ`) are all one GEMM per chunk of samples, with the
//!   `gemm` crate candle itself uses.
//! - **Gradients only where needed.** A custom op's backward returns `None` for
//!   an argument that does not lead to a variable (`track_op()` false): the
//!   first layer's input gradient (the image batch) is never computed. candle's
//!   own matmul and conv always compute both.
//! - **Threading that fits 2 cores.** Convolutions split the batch into one
//!   chunk per thread and run single-threaded GEMMs side by side; GEMMs under
//!   2M multiply-adds are not split at all, since fork/join costs more than
//!   it saves there. The thread count is rayon's (`RAYON_NUM_THREADS`, default
//!   all cores).
//! - **Buffer reuse.** im2col scratch buffers live per worker thread across
//!   calls and training steps, and [`prepare_cpu_training_process`] (called
//!   by the `qgrad` and `xtask` binaries) keeps glibc from unmapping candle's
//!   freed tensors, which cost a fifth of a LeNet-300-100 step in page
//!   faults, and keeps candle's spinning thread pool off the cores rayon uses.
//! - **Batch norm as one op.** Built from candle ops, training-mode batch norm
//!   is about ten broadcast ops, each a full pass over the activation with an
//!   intermediate of its size kept for the backward pass. The custom op makes
//!   three passes forward (mean, two-pass variance, output) and two backward,
//!   keeps only per-channel statistics, accumulates its sums in f64, and
//!   parallelises over channels (see `batch_norm.rs`).
//!
//! Bias addition is fused into the forward GEMM and its gradient is a plain
//! channel sum, so a layer is one graph node instead of candle's three
//! (conv/matmul, reshape, broadcast-add).
//!
//! Where the fast path does not apply (a tensor on a CUDA or Metal device, a
//! dtype other than f32, a linear input with more than 2 dimensions) the same
//! functions call candle's own ops, as [`mod@reference`] does; the CUDA build
//! therefore runs candle's kernels on the GPU, and its CPU tensors take the
//! same fast path as the CPU build.
//!
//! # Example
//! A fully connected layer on the CPU fast path gives candle's
//! `x · Wᵀ + b`, and the same gradients:
//!
//! ```rust
//! use candle_core::{Device, Tensor, Var};
//!
//! let dev = Device::Cpu;
//! let x = Tensor::new(&[[1f32, 2.0, 3.0], [-1.0, 0.5, 4.0]], &dev)?; // [n, in]
//! let w = Var::from_vec(vec![0.5f32, -1.0, 2.0, 1.5, 0.25, -0.5], (2, 3), &dev)?; // [out, in]
//! let b = Var::from_vec(vec![0.1f32, -0.2], 2, &dev)?; // [out]
//!
//! let y = qgrad_ops::linear(&x, &w, Some(&b))?;
//! let expected = x.matmul(&w.t()?)?.broadcast_add(&b)?;
//! assert_eq!(y.dims(), &[2, 2]);
//! let max_diff = |p: &Tensor, q: &Tensor| -> candle_core::Result<f32> {
//!     (p - q)?.abs()?.max_all()?.to_scalar::<f32>()
//! };
//! assert!(max_diff(&y, &expected)? < 1e-6);
//!
//! // Gradients of Σ y through the custom op match candle's.
//! let grads = y.sum_all()?.backward()?;
//! let reference = expected.sum_all()?.backward()?;
//! for v in [&w, &b] {
//!     let (g, r) = (grads.get(v).expect("grad"), reference.get(v).expect("grad"));
//!     assert!(max_diff(g, r)? < 1e-6);
//! }
//! // dW[o, i] = Σ_n x[n, i], the same for every output row.
//! assert_eq!(grads.get(&w).expect("grad").to_vec2::<f32>()?[0], vec![0.0, 2.5, 7.0]);
//! # Ok::<(), candle_core::Error>(())
//! ```

#![warn(missing_docs)]

mod batch_norm;
mod conv;
mod custom;
mod dense;
mod gemm_f32;
mod pool;
mod process;
mod scratch;

pub use process::{
    keep_candle_single_threaded, prepare_cpu_training_process, retain_freed_memory, ProcessSetup,
};

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Result, Tensor};

/// What can go wrong in this crate; converted into `candle_core::Error` at
/// the public boundary (the public signatures are candle's).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Arguments whose shapes do not fit together.
    #[error("invalid shape: {0}")]
    Shape(String),
    /// A dtype the fast kernels do not handle (callers normally fall back to
    /// candle before this can happen).
    #[error("unsupported dtype: {0}")]
    DType(String),
    /// A broken internal invariant (a bug in this crate, never a user error).
    #[error("qgrad-ops internal error: {0}")]
    Internal(String),
}

impl From<OpsError> for candle_core::Error {
    fn from(e: OpsError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// True when every tensor is an f32 tensor in CPU memory.
fn fast_path(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32)
}

fn bias_len(bias: &Tensor, expected: usize, what: &str) -> Result<()> {
    match bias.dims() {
        [len] if *len == expected => Ok(()),
        dims => {
            Err(OpsError::Shape(format!("{what} bias must be [{expected}], got {dims:?}")).into())
        }
    }
}

/// 2-D convolution, `x: [n, c, h, w]`, `weight: [o, c, kh, kw]`, `bias: [o]`;
/// the same `stride` and zero `padding` on both axes, no dilation or groups.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let mut all = vec![x, weight];
    all.extend(bias);
    if !fast_path(&all) {
        return reference::conv2d(x, weight, bias, stride, padding);
    }
    let geometry = conv::ConvGeometry::new(x.dims(), weight.dims(), stride, padding)?;
    let op = custom::Conv2dOp { stride, padding };
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => {
            bias_len(b, geometry.out_channels, "conv2d")?;
            x.apply_op3(&weight, &b.contiguous()?, op)
        }
        None => x.apply_op2(&weight, op),
    }
}

/// Fully connected layer, `x: [n, in]`, `weight: [out, in]`, `bias: [out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let mut all = vec![x, weight];
    all.extend(bias);
    if !fast_path(&all) || x.rank() != 2 {
        return reference::linear(x, weight, bias);
    }
    let geometry = dense::LinearGeometry::new(x.dims(), weight.dims())?;
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => {
            bias_len(b, geometry.outputs, "linear")?;
            x.apply_op3(&weight, &b.contiguous()?, custom::LinearOp)
        }
        None => x.apply_op2(&weight, custom::LinearOp),
    }
}

/// Non-overlapping max pooling (kernel == stride), `x: [n, c, h, w]`.
/// Trailing rows and columns that do not fill a window are dropped.
pub fn max_pool2d(x: &Tensor, size: usize) -> Result<Tensor> {
    if !fast_path(&[x]) {
        return reference::max_pool2d(x, size);
    }
    pool::PoolGeometry::new(x.dims(), size)?;
    x.contiguous()?.apply_op1(custom::MaxPool2dOp { size })
}

/// Training-mode batch norm over the channel axis of `x: [n, c]` or
/// `[n, c, h, w]`, with the batch statistics; `gamma` and `beta` are `[c]`.
///
/// Returns `(y, mean, var)`: `y = (x - mean) / sqrt(var + eps) · gamma + beta`
/// and the per-channel batch mean and *biased* batch variance (`[c]`, the
/// values `y` was normalised with), for the caller's running averages. The
/// statistics are detached: gradients flow through `y` only.
///
/// On the CPU one custom op computes `y` and leaves the statistics in a slot
/// it shares with this function (a custom op has one output), so they cost no
/// extra pass.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    batch_norm::BnGeometry::new(x.dims(), &[("weight", gamma.dims()), ("bias", beta.dims())])?;
    if !fast_path(&[x, gamma, beta]) {
        return reference::batch_norm_train(x, gamma, beta, eps);
    }
    let stats = Arc::new(OnceLock::new());
    let op = custom::BatchNormTrainOp {
        eps,
        stats: Arc::clone(&stats),
    };
    let y = x
        .contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    let stats = stats
        .get()
        .ok_or_else(|| OpsError::Internal("batch norm forward left no statistics".into()))?;
    let to_tensor = |v: &[f64]| {
        let v: Vec<f32> = v.iter().map(|&s| s as f32).collect();
        Tensor::from_vec(v, gamma.dims(), x.device())
    };
    Ok((y, to_tensor(&stats.mean)?, to_tensor(&stats.var)?))
}

/// Evaluation-mode batch norm with running statistics (all of `gamma`,
/// `beta`, `running_mean`, `running_var` `[c]`):
/// `y = (x - running_mean) · (gamma / sqrt(running_var + eps)) + beta`.
///
/// On the CPU this is one element-wise pass; the per-channel scale is a
/// candle op on `[c]` tensors, so `gamma` and `beta` still get gradients (the
/// running statistics are treated as constants; one that is part of a graph
/// takes candle's path, which differentiates it).
pub fn batch_norm_eval(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    batch_norm::BnGeometry::new(
        x.dims(),
        &[
            ("weight", gamma.dims()),
            ("bias", beta.dims()),
            ("running mean", running_mean.dims()),
            ("running variance", running_var.dims()),
        ],
    )?;
    if !fast_path(&[x, gamma, beta, running_mean, running_var]) || running_mean.track_op() {
        return reference::batch_norm_eval(x, gamma, beta, running_mean, running_var, eps);
    }
    let scale = gamma.div(&(running_var + eps)?.sqrt()?)?;
    let op = custom::ChannelAffineOp {
        center: running_mean.to_vec1()?,
    };
    x.contiguous()?
        .apply_op3(&scale.contiguous()?, &beta.contiguous()?, op)
}

/// candle's own ops with the same signatures: what the fast ops replace, the
/// path for non-CPU devices and other dtypes, and the reference the tests and
/// benchmarks compare against.
pub mod reference {
    use candle_core::{Result, Tensor};

    /// candle's `conv2d` plus a broadcast bias; the signature of [`crate::conv2d`].
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

    /// `x · weightᵀ (+ bias)` with candle's `broadcast_matmul`; the signature
    /// of [`crate::linear`], and any input rank of at least 2.
    pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = x.broadcast_matmul(&weight.t()?)?;
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// candle's `max_pool2d` (kernel == stride); see [`crate::max_pool2d`].
    pub fn max_pool2d(x: &Tensor, size: usize) -> Result<Tensor> {
        x.max_pool2d(size)
    }

    /// The axes batch norm reduces over (all but the channel axis 1) and the
    /// shape a `[c]` tensor broadcasts from.
    fn batch_norm_axes(x: &Tensor, channels: usize) -> Result<(Vec<usize>, Vec<usize>)> {
        match x.rank() {
            4 => Ok((vec![0, 2, 3], vec![1, channels, 1, 1])),
            2 => Ok((vec![0], vec![1, channels])),
            r => Err(crate::OpsError::Shape(format!(
                "batch norm needs a rank-2 or rank-4 input, got rank {r}"
            ))
            .into()),
        }
    }

    /// Training-mode batch norm composed of candle ops; returns `(y, mean,
    /// biased var)` like [`crate::batch_norm_train`], statistics detached.
    pub fn batch_norm_train(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (reduce, bshape) = batch_norm_axes(x, gamma.dims1()?)?;
        let mean = x.mean_keepdim(reduce.as_slice())?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(reduce.as_slice())?;
        let inv_std = (&var + eps)?.sqrt()?.recip()?;
        let y = centered
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&gamma.reshape(bshape.as_slice())?)?
            .broadcast_add(&beta.reshape(bshape.as_slice())?)?;
        Ok((y, mean.detach().flatten_all()?, var.detach().flatten_all()?))
    }

    /// Evaluation-mode batch norm composed of candle ops, differentiable in
    /// every argument; the formula of [`crate::batch_norm_eval`].
    pub fn batch_norm_eval(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        let (_, bshape) = batch_norm_axes(x, gamma.dims1()?)?;
        let shape = bshape.as_slice();
        let inv_std = (running_var.reshape(shape)? + eps)?.sqrt()?.recip()?;
        x.broadcast_sub(&running_mean.reshape(shape)?)?
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&gamma.reshape(shape)?)?
            .broadcast_add(&beta.reshape(shape)?)
    }
}
