//! `qgrad-optim`: the optimizers of qgrad's candle training, behind one
//! interface whose state is readable by parameter name.
//!
//! * [`Sgd`]: momentum and L2 weight decay with PyTorch's semantics; the
//!   first thesis's recipes (METHOD §7).
//! * [`Adam`]: bias-corrected Adam (PyTorch's semantics, L2 weight decay
//!   added to the gradient); the loss-aware quantizers (METHOD §10) read its
//!   second moment `v` after every step through [`Optimizer::state`].
//! * [`LrSchedule`]: the learning rate as a function of the epoch.
//!
//! Every optimizer honours freeze masks (qgrad-accum's [`FreezeMask`]): a
//! frozen element gets no gradient, no decay and no momentum, and stays bit
//! for bit where it is. Its state tensors are named slots per parameter
//! ([`Optimizer::slots`]) so that checkpoints store them as
//! `<param>.<slot>` whatever the optimizer, and [`OptimizerConfig`] (which
//! is serialisable) rebuilds the optimizer on resume.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use qgrad_optim::{OptimizerConfig, adam::EXP_AVG_SQ};
//!
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let params = vec![("w".to_string(), w.clone())];
//! let config = OptimizerConfig::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
//! let mut opt = config.build(&params)?;
//! // loss = Σ w² → g = 2w; Adam's first step moves every element by lr.
//! let grads = w.as_tensor().sqr()?.sum_all()?.backward()?;
//! opt.step(&grads, 0.1, &[])?;
//! let moved = w.as_tensor().to_vec1::<f32>()?;
//! assert!((moved[0] - 0.9).abs() < 1e-6 && (moved[1] + 1.9).abs() < 1e-6);
//! // The second moment, by parameter name: (1 - β₂)·g².
//! let v = opt.state("w", EXP_AVG_SQ).unwrap().to_vec1::<f32>()?;
//! assert!((v[0] - 0.001 * 4.0).abs() < 1e-5);
//! assert_eq!(opt.steps(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod adam;
mod cpu;
pub mod schedule;
pub mod sgd;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use qgrad_accum::FreezeMask;
use serde::{Deserialize, Serialize};

pub use adam::Adam;
pub use schedule::LrSchedule;
pub use sgd::Sgd;

/// The one error type of qgrad-optim.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A tensor operation failed.
    #[error("candle error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A freeze mask could not be applied.
    #[error("freeze mask: {0}")]
    Mask(#[from] qgrad_accum::AccumError),
    /// A hyper-parameter or schedule that cannot work.
    #[error("invalid optimizer setting: {0}")]
    Config(String),
    /// No parameter of that name, or no state slot of that name.
    #[error("the optimizer has no {0}")]
    Unknown(String),
    /// A state tensor of the wrong shape (a checkpoint of another network).
    #[error("optimizer state {what}: expected shape {expected:?}, got {got:?}")]
    Shape {
        /// `<param>.<slot>`.
        what: String,
        /// The parameter's shape.
        expected: Vec<usize>,
        /// The given tensor's shape.
        got: Vec<usize>,
    },
}

/// `Result` with [`OptimError`].
pub type Result<T> = std::result::Result<T, OptimError>;

/// An optimizer over named candle `Var`s.
pub trait Optimizer: Send {
    /// The settings that rebuild this optimizer (without its state).
    fn config(&self) -> OptimizerConfig;
    /// Changes the hyper-parameters, keeping the state (a resumed run whose
    /// caller passes new settings). Changing the kind is an error.
    fn reconfigure(&mut self, config: &OptimizerConfig) -> Result<()>;
    /// One update with learning rate `lr`. `masks[i]` (aligned with
    /// [`params`](Self::params), or empty for none) freezes elements of
    /// parameter `i`. A parameter without a gradient is left alone.
    fn step(&mut self, grads: &GradStore, lr: f64, masks: &[Option<FreezeMask>]) -> Result<()>;
    /// The parameters, in the order masks are given.
    fn params(&self) -> &[(String, Var)];
    /// The names of the state tensors each parameter has.
    fn slots(&self) -> &'static [&'static str];
    /// State tensor `slot` of parameter `param` (live, on the device).
    fn state(&self, param: &str, slot: &str) -> Option<&Tensor>;
    /// Replaces a state tensor (checkpoint resume); its shape must be the
    /// parameter's.
    fn set_state(&mut self, param: &str, slot: &str, value: &Tensor) -> Result<()>;
    /// Updates done so far (Adam's bias correction counts them).
    fn steps(&self) -> u64;
    /// Sets the update count (checkpoint resume).
    fn set_steps(&mut self, steps: u64);
}

/// The settings of an optimizer: what a checkpoint stores to rebuild it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerConfig {
    /// [`Sgd`].
    Sgd {
        /// Momentum μ in [0, 1).
        momentum: f64,
        /// L2 weight decay λ ≥ 0.
        weight_decay: f64,
    },
    /// [`Adam`].
    Adam {
        /// First-moment decay β₁ in [0, 1).
        beta1: f64,
        /// Second-moment decay β₂ in [0, 1).
        beta2: f64,
        /// ε > 0 added to `sqrt(v̂)`.
        eps: f64,
        /// L2 weight decay λ ≥ 0, added to the gradient.
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// PyTorch's Adam defaults (β₁ 0.9, β₂ 0.999, ε 1e-8, no decay).
    pub fn adam() -> Self {
        OptimizerConfig::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }

    /// `sgd` or `adam`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "sgd",
            OptimizerConfig::Adam { .. } => "adam",
        }
    }

    /// The L2 weight decay.
    pub fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerConfig::Sgd { weight_decay, .. }
            | OptimizerConfig::Adam { weight_decay, .. } => weight_decay,
        }
    }

    /// Rejects settings outside their ranges.
    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, x: f64| {
            if (0.0..1.0).contains(&x) {
                Ok(())
            } else {
                Err(OptimError::Config(format!(
                    "{name} must be in [0, 1), got {x}"
                )))
            }
        };
        let decay = self.weight_decay();
        if !(decay.is_finite() && decay >= 0.0) {
            return Err(OptimError::Config(format!(
                "weight decay must be >= 0, got {decay}"
            )));
        }
        match *self {
            OptimizerConfig::Sgd { momentum, .. } => unit("momentum", momentum),
            OptimizerConfig::Adam {
                beta1, beta2, eps, ..
            } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(OptimError::Config(format!("eps must be > 0, got {eps}")));
                }
                Ok(())
            }
        }
    }

    /// A fresh optimizer (zero state) over `params`.
    pub fn build(&self, params: &[(String, Var)]) -> Result<Box<dyn Optimizer>> {
        Ok(match *self {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
            } => Box::new(Sgd::new(params, momentum, weight_decay)?),
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => Box::new(Adam::new(params, beta1, beta2, eps, weight_decay)?),
        })
    }
}

pub(crate) fn check_masks(masks: &[Option<FreezeMask>], params: usize) -> Result<()> {
    if masks.len() != params && !masks.is_empty() {
        return Err(OptimError::Config(format!(
            "{} freeze masks for {params} parameters",
            masks.len()
        )));
    }
    Ok(())
}

/// The index of `param` if `slot` is one of `slots`.
pub(crate) fn slot_index(
    params: &[(String, Var)],
    slots: &[&str],
    param: &str,
    slot: &str,
) -> Result<usize> {
    if !slots.contains(&slot) {
        return Err(OptimError::Unknown(format!("state slot '{slot}'")));
    }
    params
        .iter()
        .position(|(n, _)| n == param)
        .ok_or_else(|| OptimError::Unknown(format!("parameter '{param}'")))
}

/// `value` on the parameter's device, if its shape is the parameter's.
pub(crate) fn checked_state(
    (name, var): &(String, Var),
    slot: &str,
    value: &Tensor,
) -> Result<Tensor> {
    if value.dims() != var.dims() {
        return Err(OptimError::Shape {
            what: format!("{name}.{slot}"),
            expected: var.dims().to_vec(),
            got: value.dims().to_vec(),
        });
    }
    Ok(value.to_device(var.device())?.contiguous()?)
}
