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
mod fake_quant;
mod gemm_f32;
mod lstm;
mod pool;
mod process;
mod scratch;
mod workers;

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
    /// An argument outside what the op defines (a width, a length).
    #[error("invalid argument: {0}")]
    Argument(String),
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

/// The straight-through weight of quantization-aware training: `values`
/// (the quantized weight, as many as `w` has) in the forward pass, with the
/// gradient passed to `w` unchanged. The same values and gradient as
/// candle's `ŵ + (w − w.detach())` ([`reference::straight_through`]), as one
/// op on the CPU instead of three passes over the weight.
pub fn straight_through(w: &Tensor, values: Vec<f32>) -> Result<Tensor> {
    if values.len() != w.elem_count() {
        return Err(OpsError::Shape(format!(
            "{} straight-through values for a weight of shape {:?}",
            values.len(),
            w.dims()
        ))
        .into());
    }
    if !fast_path(&[w]) {
        return reference::straight_through(w, values);
    }
    w.apply_op1(fake_quant::StraightThroughOp {
        values: std::sync::Mutex::new(Some(values)),
    })
}

/// PACT's activation quantizer (Choi et al. 2018; METHOD §9): `x` clipped to
/// `[0, β]` as `relu(x) − relu(x − β)` and rounded to `2^bits − 1` uniform
/// steps of `β / (2^bits − 1)`, with a straight-through gradient to `x`
/// (where `0 ≤ x < β`) and the clip's gradient (the sum of `dy` where
/// `x ≥ β`). `clip` is `[1]` and positive (callers keep it above a floor).
/// The same values and gradients as [`reference::pact`], candle's
/// composition, in one pass forward and one backward on the CPU (module
/// docs of `fake_quant.rs`).
pub fn pact(x: &Tensor, clip: &Tensor, bits: u8) -> Result<Tensor> {
    if !(1..=16).contains(&bits) {
        return Err(OpsError::Argument(format!("PACT width {bits} is outside 1..=16")).into());
    }
    if clip.dims() != [1] {
        return Err(
            OpsError::Shape(format!("the PACT clip must be [1], got {:?}", clip.dims())).into(),
        );
    }
    if !fast_path(&[x, clip]) {
        return reference::pact(x, clip, bits);
    }
    x.contiguous()?
        .apply_op2(&clip.contiguous()?, fake_quant::PactOp { bits })
}

/// The state an LSTM carries from one sequence to the next: hidden `h` and
/// cell `c`, `[batch, hidden]` each.
#[derive(Debug, Clone)]
pub struct LstmState {
    /// Hidden state `h`.
    pub h: Tensor,
    /// Cell state `c`.
    pub c: Tensor,
}

/// The normalisation [`lstm_sequence`] applies to the recurrent term
/// `a_t = h_{t-1}·W_hᵀ` (METHOD §11): `N(a) = gain ⊙ â`, with `â` the
/// standardised `a`. The shift is left to the caller's bias.
#[derive(Debug, Clone, Copy)]
pub enum RecurrentNorm<'a> {
    /// `N(a) = a`.
    None,
    /// Layer norm: each row over its `4H` values.
    Layer {
        /// `[4H]`.
        gain: &'a Tensor,
        /// Added to the variance.
        eps: f64,
    },
    /// Training-mode batch norm: each column over the batch, per step.
    BatchTrain {
        /// `[4H]`.
        gain: &'a Tensor,
        /// Added to the variance.
        eps: f64,
    },
    /// Evaluation-mode batch norm with fixed statistics `[S, 4H]`; step `t`
    /// uses row `min(t, S − 1)` (`S = 1`: shared over time).
    BatchEval {
        /// `[4H]`.
        gain: &'a Tensor,
        /// Means, `[S, 4H]`.
        mean: &'a Tensor,
        /// Biased variances, `[S, 4H]`.
        var: &'a Tensor,
        /// Added to the variance.
        eps: f64,
    },
}

/// What [`lstm_sequence`] returns.
#[derive(Debug, Clone)]
pub struct LstmSequence {
    /// The hidden states of every step, `[T, B, H]`.
    pub hidden: Tensor,
    /// The state after the last step, detached (truncated backpropagation
    /// through time carries it to the next sequence as a constant).
    pub last: LstmState,
    /// Training-mode batch norm: the per-step batch mean and biased variance
    /// of the recurrent term, `[T, 4H]` each, detached.
    pub step_stats: Option<(Tensor, Tensor)>,
}

/// A one-layer LSTM over a whole sequence (METHOD §11): gates
/// `[i f g o] = xproj[t] + N(h_{t-1}·W_hᵀ)`, `c_t = σ(f)⊙c_{t-1} +
/// σ(i)⊙tanh(g)`, `h_t = σ(o)⊙tanh(c_t)`.
///
/// `xproj: [T, B, 4H]` is the input's contribution with the bias (the
/// caller computes it for all steps at once), `wh: [4H, H]` the recurrent
/// weight (rows gate-major: `i` units first), `init` the initial state
/// (zeros when `None`; a constant, never differentiated). Gradients flow to
/// `xproj`, `wh` and the normalisation's gain. On the CPU the whole
/// sequence, forward and backward, is one custom op (`lstm.rs`); elsewhere
/// it is [`reference::lstm_sequence`], with the same numbers within f32
/// rounding.
pub fn lstm_sequence(
    xproj: &Tensor,
    wh: &Tensor,
    init: Option<&LstmState>,
    norm: RecurrentNorm<'_>,
) -> Result<LstmSequence> {
    lstm_sequence_from(LstmInput::Projected(xproj), wh, init, norm)
}

/// [`lstm_sequence`] over `xproj = table.index_select(tokens, 0)` reshaped to
/// `[steps, batch, 4H]`, without building it: `table: [V, 4H]` (for one-hot
/// characters `W_xᵀ + b`), `tokens: [steps · batch]` time-major `u32` row
/// indices. The op reads each step's rows from the table, which stays in
/// cache, and returns the table's gradient directly (the gradient of the
/// gathered tensor, tens of MiB, is never built); the numbers are those of
/// the composed `index_select` and [`lstm_sequence`] (tested). A token
/// outside the table is an error.
pub fn lstm_sequence_gathered(
    table: &Tensor,
    tokens: &Tensor,
    steps: usize,
    batch: usize,
    wh: &Tensor,
    init: Option<&LstmState>,
    norm: RecurrentNorm<'_>,
) -> Result<LstmSequence> {
    if tokens.dims() != [steps * batch] {
        return Err(OpsError::Shape(format!(
            "{steps} steps of {batch} rows need [{}] tokens, got {:?}",
            steps * batch,
            tokens.dims()
        ))
        .into());
    }
    lstm_sequence_from(
        LstmInput::Gathered {
            table,
            tokens,
            steps,
            batch,
        },
        wh,
        init,
        norm,
    )
}

/// The input term of [`lstm_sequence_from`].
#[derive(Clone, Copy)]
enum LstmInput<'a> {
    Projected(&'a Tensor),
    Gathered {
        table: &'a Tensor,
        tokens: &'a Tensor,
        steps: usize,
        batch: usize,
    },
}

fn lstm_sequence_from(
    input: LstmInput<'_>,
    wh: &Tensor,
    init: Option<&LstmState>,
    norm: RecurrentNorm<'_>,
) -> Result<LstmSequence> {
    let (xproj, g) = match input {
        LstmInput::Projected(x) => (x, lstm::LstmGeometry::new(x.dims(), wh.dims())?),
        LstmInput::Gathered {
            table,
            steps,
            batch,
            ..
        } => (
            table,
            lstm::LstmGeometry::gathered(table.dims(), steps, batch, wh.dims())?,
        ),
    };
    let state_dims = [g.batch, g.hidden];
    if let Some(s) = init {
        for (name, t) in [("h", &s.h), ("c", &s.c)] {
            if t.dims() != state_dims {
                return Err(OpsError::Shape(format!(
                    "the initial {name} must be {state_dims:?}, got {:?}",
                    t.dims()
                ))
                .into());
            }
        }
    }
    let gain = match norm {
        RecurrentNorm::None => None,
        RecurrentNorm::Layer { gain, .. }
        | RecurrentNorm::BatchTrain { gain, .. }
        | RecurrentNorm::BatchEval { gain, .. } => Some(gain),
    };
    if let Some(gain) = gain {
        if gain.dims() != [4 * g.hidden] {
            return Err(OpsError::Shape(format!(
                "the recurrent normalisation's gain must be [{}], got {:?}",
                4 * g.hidden,
                gain.dims()
            ))
            .into());
        }
    }
    let mut all = vec![xproj, wh];
    all.extend(gain);
    if let Some(s) = init {
        all.extend([&s.h, &s.c]);
    }
    if let RecurrentNorm::BatchEval { mean, var, .. } = norm {
        all.extend([mean, var]);
    }
    // The op gathers u32 tokens on the CPU; anything else takes the
    // composition (`index_select`, then the reference recurrence).
    let gather_tokens = match input {
        LstmInput::Gathered { tokens, .. } => Some(tokens),
        LstmInput::Projected(_) => None,
    };
    let tokens_fit =
        gather_tokens.is_none_or(|t| t.dtype() == DType::U32 && matches!(t.device(), Device::Cpu));
    if !(fast_path(&all) && tokens_fit) {
        let xproj = match gather_tokens {
            None => xproj.clone(),
            Some(tokens) => {
                xproj
                    .index_select(tokens, 0)?
                    .reshape((g.steps, g.batch, 4 * g.hidden))?
            }
        };
        return reference::lstm_sequence(&xproj, wh, init, norm);
    }
    let gathered = match gather_tokens {
        Some(tokens) => Some(lstm::GatherSpec {
            tokens: tokens.to_vec1::<u32>()?,
            steps: g.steps,
            batch: g.batch,
        }),
        None => None,
    };
    let (h0, c0) = match init {
        Some(s) => (
            s.h.flatten_all()?.to_vec1::<f32>()?,
            s.c.flatten_all()?.to_vec1::<f32>()?,
        ),
        None => (
            vec![0f32; g.batch * g.hidden],
            vec![0f32; g.batch * g.hidden],
        ),
    };
    let op_norm = match norm {
        RecurrentNorm::None => lstm::RecurrentNorm::None,
        RecurrentNorm::Layer { eps, .. } => lstm::RecurrentNorm::Layer { eps: eps as f32 },
        RecurrentNorm::BatchTrain { eps, .. } => {
            lstm::RecurrentNorm::BatchTrain { eps: eps as f32 }
        }
        RecurrentNorm::BatchEval { mean, var, eps, .. } => lstm::RecurrentNorm::BatchEval {
            mean: mean.flatten_all()?.to_vec1()?,
            var: var.flatten_all()?.to_vec1()?,
            eps: eps as f32,
        },
    };
    let stats = Arc::new(OnceLock::new());
    let cache = Arc::new(OnceLock::new());
    let op = lstm::LstmOp {
        norm: op_norm,
        gathered,
        h0,
        c0,
        cache: Arc::clone(&cache),
        stats: Arc::clone(&stats),
    };
    let xproj = xproj.contiguous()?;
    let wh = wh.contiguous()?;
    let out = match gain {
        Some(gain) => xproj.apply_op3(&wh, &gain.contiguous()?, op)?,
        None => xproj.apply_op2(&wh, op)?,
    };
    let cells = cache
        .get()
        .ok_or_else(|| OpsError::Internal("the LSTM op left no cell states".into()))?;
    let state = g.batch * g.hidden;
    let last_c = cells.cells[(g.steps - 1) * state..].to_vec();
    let last = LstmState {
        h: out.get(g.steps - 1)?.detach(),
        c: Tensor::from_vec(last_c, (g.batch, g.hidden), xproj.device())?,
    };
    let hidden = out;
    let step_stats = match norm {
        RecurrentNorm::BatchTrain { .. } => {
            let s: &lstm::StepStats = stats
                .get()
                .ok_or_else(|| OpsError::Internal("the LSTM op left no statistics".into()))?;
            let dims = (g.steps, 4 * g.hidden);
            Some((
                Tensor::from_vec(s.mean.clone(), dims, xproj.device())?,
                Tensor::from_vec(s.var.clone(), dims, xproj.device())?,
            ))
        }
        _ => None,
    };
    Ok(LstmSequence {
        hidden,
        last,
        step_stats,
    })
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

    /// `ŵ + (w − w.detach())`; see [`crate::straight_through`].
    pub fn straight_through(w: &Tensor, values: Vec<f32>) -> Result<Tensor> {
        let hat = Tensor::from_vec(values, w.shape(), w.device())?;
        hat + (w - w.detach())?
    }

    /// PACT composed of candle ops; see [`crate::pact`].
    pub fn pact(x: &Tensor, clip: &Tensor, bits: u8) -> Result<Tensor> {
        let mut shape = vec![1usize; x.rank()];
        if shape.is_empty() {
            shape.push(1);
        }
        let beta = clip.reshape(shape.as_slice())?;
        let y = (x.relu()? - x.broadcast_sub(&beta)?.relu()?)?;
        let levels = f64::from((1u32 << bits) - 1);
        let (yd, bd) = (y.detach(), beta.detach());
        let q = yd
            .broadcast_div(&bd)?
            .affine(levels, 0.0)?
            .round()?
            .affine(1.0 / levels, 0.0)?
            .broadcast_mul(&bd)?;
        q + (&y - yd)?
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
    fn sigmoid(x: &Tensor) -> Result<Tensor> {
        (x.neg()?.exp()? + 1.0)?.recip()
    }

    /// The LSTM recurrence step by step with candle's ops; the signature and
    /// semantics of [`crate::lstm_sequence`], differentiable in `xproj`,
    /// `wh` and the gain.
    pub fn lstm_sequence(
        xproj: &Tensor,
        wh: &Tensor,
        init: Option<&crate::LstmState>,
        norm: crate::RecurrentNorm<'_>,
    ) -> Result<crate::LstmSequence> {
        use crate::RecurrentNorm;
        let (steps, batch, _) = xproj.dims3()?;
        let hidden = wh.dim(1)?;
        let (mut h, mut c) = match init {
            Some(s) => (s.h.clone(), s.c.clone()),
            None => {
                let z = Tensor::zeros((batch, hidden), xproj.dtype(), xproj.device())?;
                (z.clone(), z)
            }
        };
        let standardise = |a: &Tensor, axis: usize, eps: f64| -> Result<(Tensor, Tensor, Tensor)> {
            let mean = a.mean_keepdim(axis)?;
            let centered = a.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(axis)?;
            let n = centered.broadcast_div(&(&var + eps)?.sqrt()?)?;
            Ok((n, mean, var))
        };
        let (mut hs, mut means, mut vars) = (Vec::new(), Vec::new(), Vec::new());
        for t in 0..steps {
            let a = h.matmul(&wh.t()?)?;
            let r = match norm {
                RecurrentNorm::None => a,
                RecurrentNorm::Layer { gain, eps } => {
                    standardise(&a, 1, eps)?.0.broadcast_mul(gain)?
                }
                RecurrentNorm::BatchTrain { gain, eps } => {
                    let (n, m, v) = standardise(&a, 0, eps)?;
                    means.push(m.detach());
                    vars.push(v.detach());
                    n.broadcast_mul(gain)?
                }
                RecurrentNorm::BatchEval {
                    gain,
                    mean,
                    var,
                    eps,
                } => {
                    let s = t.min(mean.dim(0)? - 1);
                    let inv = (var.get(s)? + eps)?.sqrt()?.recip()?;
                    a.broadcast_sub(&mean.get(s)?)?
                        .broadcast_mul(&inv)?
                        .broadcast_mul(gain)?
                }
            };
            let z = (xproj.get(t)? + r)?;
            let i = sigmoid(&z.narrow(1, 0, hidden)?)?;
            let f = sigmoid(&z.narrow(1, hidden, hidden)?)?;
            let g = z.narrow(1, 2 * hidden, hidden)?.tanh()?;
            let o = sigmoid(&z.narrow(1, 3 * hidden, hidden)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            hs.push(h.clone());
        }
        let step_stats = if means.is_empty() {
            None
        } else {
            Some((Tensor::cat(&means, 0)?, Tensor::cat(&vars, 0)?))
        };
        Ok(crate::LstmSequence {
            hidden: Tensor::stack(&hs, 0)?,
            last: crate::LstmState {
                h: h.detach(),
                c: c.detach(),
            },
            step_stats,
        })
    }
}
