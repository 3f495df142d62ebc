//! Loss-aware (or baseline) weight-quantized training (METHOD §10), from
//! scratch or from a trained baseline, resumable like an in-training run.

use candle_core::Device;
use qgrad_data::Dataset;
use qgrad_models::methods::{LossAwareHook, LossAwareOptions};
use qgrad_models::{Arch, TrainConfig, TrainHook};

use crate::error::{PipelineError, Result};
use crate::in_training::{run_method, RunOutcome, Start};

/// One loss-aware training run.
pub struct LossAwareRun<'a> {
    /// The network.
    pub arch: Arch,
    /// The training configuration (Adam for the loss-aware quantizers).
    pub config: TrainConfig,
    /// The quantizer and its options.
    pub options: LossAwareOptions,
    /// Where it starts.
    pub start: Start<'a>,
    /// The training device.
    pub device: Device,
}

/// A finished loss-aware run: the float `W` (clipped) and the hook whose
/// `finish` gives the quantized weights.
pub type LossAwareOutcome = RunOutcome<LossAwareHook>;

/// Trains `run`; `extra` hooks run after the quantizer's.
pub fn run_loss_aware(
    run: LossAwareRun,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
) -> Result<LossAwareOutcome> {
    let LossAwareRun {
        arch,
        config,
        options,
        start,
        device,
    } = run;
    run_method(arch, config, start, &device, data, extra, |state| {
        LossAwareHook::new(options, state)
            .map_err(|e| PipelineError::usage(format!("invalid quantizer options: {e}")))
    })
}
