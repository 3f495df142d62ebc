//! Loss-aware (or baseline) weight-quantized training (METHOD §10), from
//! scratch or from a trained baseline, resumable like an in-training run.

use candle_core::Device;
use qgrad_data::Dataset;
use qgrad_models::methods::{LossAwareHook, LossAwareOptions};
use qgrad_models::{Arch, TrainConfig, TrainHook, TrainState};

use crate::error::{PipelineError, Result};
use crate::in_training::{starting_state, train_with, Start};
use crate::trained::normalization;

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

/// A finished loss-aware run.
pub struct LossAwareOutcome {
    /// The trained state (float `W`, clipped).
    pub state: TrainState,
    /// The hook: `finish` gives the quantized weights.
    pub hook: LossAwareHook,
    /// The configuration it ran with (normalisation filled in).
    pub config: TrainConfig,
    /// The baseline's accuracy, when it was evaluated.
    pub float_accuracy: Option<f64>,
    /// The epoch a resumed run continued after.
    pub resumed_after: Option<usize>,
}

/// Trains `run`; `extra` hooks run after the quantizer's.
pub fn run_loss_aware(
    run: LossAwareRun,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
) -> Result<LossAwareOutcome> {
    let LossAwareRun {
        arch,
        mut config,
        options,
        start,
        device,
    } = run;
    let (mut state, float_accuracy, resumed_after) =
        starting_state(arch, &mut config, start, &device, data)?;
    let mut hook = LossAwareHook::new(options, &state)
        .map_err(|e| PipelineError::usage(format!("invalid quantizer options: {e}")))?;
    train_with(&mut state, &mut hook, extra, &config, data)?;
    config.normalization = Some(normalization(&config, data.0));
    Ok(LossAwareOutcome {
        state,
        hook,
        config,
        float_accuracy,
        resumed_after,
    })
}
