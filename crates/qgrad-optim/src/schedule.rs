//! Learning-rate schedules: a function of the epoch (constant within it), so
//! that a resumed run continues with the same rates.

use serde::{Deserialize, Serialize};

use crate::{OptimError, Result};

/// Learning rate as a function of the epoch (constant within an epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// `lr · gamma^(epoch / every)`.
    Step {
        /// Epochs per step.
        every: usize,
        /// Factor per step.
        gamma: f64,
    },
    /// `lr · gamma^(number of milestones ≤ epoch)`.
    MultiStep {
        /// Epochs at which the rate is multiplied by `gamma`.
        milestones: Vec<usize>,
        /// Factor per milestone.
        gamma: f64,
    },
    /// The base rate until epoch `start`, then `× gamma` per epoch:
    /// `lr · gamma^max(0, epoch + 1 − start)` (the character LSTM's
    /// recipe, METHOD §11: `start` 10, `gamma` 0.98).
    DecayAfter {
        /// The first epoch (0-based) whose rate is multiplied.
        start: usize,
        /// Factor per epoch from `start` on.
        gamma: f64,
    },
    /// Cosine annealing from `lr` (epoch 0) towards `min_lr` at `epochs`.
    Cosine {
        /// The rate approached at the last epoch.
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The learning rate of `epoch` (0-based) in a run of `epochs` epochs.
    pub fn lr_at(&self, base_lr: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Constant => base_lr,
            LrSchedule::Step { every, gamma } => {
                base_lr * gamma.powi((epoch / (*every).max(1)) as i32)
            }
            LrSchedule::MultiStep { milestones, gamma } => {
                base_lr * gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32)
            }
            LrSchedule::DecayAfter { start, gamma } => {
                base_lr * gamma.powi((epoch + 1).saturating_sub(*start) as i32)
            }
            LrSchedule::Cosine { min_lr } => {
                let t = epoch as f64 / epochs.max(1) as f64;
                min_lr + 0.5 * (base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// Rejects schedules that cannot work (zero step length, non-positive
    /// factors, negative floors).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(OptimError::Config(m));
        match self {
            LrSchedule::Step { every: 0, .. } => bad("step schedule needs every >= 1".into()),
            LrSchedule::Step { gamma, .. }
            | LrSchedule::MultiStep { gamma, .. }
            | LrSchedule::DecayAfter { gamma, .. }
                if !(gamma.is_finite() && *gamma > 0.0) =>
            {
                bad(format!("schedule gamma must be positive, got {gamma}"))
            }
            LrSchedule::Cosine { min_lr } if !(min_lr.is_finite() && *min_lr >= 0.0) => {
                bad(format!("cosine min_lr must be >= 0, got {min_lr}"))
            }
            _ => Ok(()),
        }
    }
}
