//! Loss-aware (or baseline) weight-quantized training (METHOD §10), from
//! scratch or from a trained baseline, resumable like an in-training run.

use qgrad_data::Dataset;
use qgrad_models::methods::{LossAwareHook, LossAwareOptions};
use qgrad_models::TrainHook;

use crate::error::{PipelineError, Result};
use crate::in_training::{run_method, MethodRun, RunOutcome};

/// One loss-aware training run (Adam for the loss-aware quantizers).
pub type LossAwareRun<'a> = MethodRun<'a, LossAwareOptions>;

/// A finished loss-aware run: the float `W` (clipped) and the hook whose
/// `finish` gives the quantized weights.
pub type LossAwareOutcome = RunOutcome<LossAwareHook>;

/// Trains `run`; `extra` hooks run after the quantizer's.
pub fn run_loss_aware(
    run: LossAwareRun,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
) -> Result<LossAwareOutcome> {
    // The non-zero budget's schedule runs in steps.
    let batches = data.0.len().div_ceil(run.config.batch_size.max(1));
    let steps_per_epoch = run
        .config
        .max_batches_per_epoch
        .map_or(batches, |m| m.min(batches));
    run_method(run, data, extra, |options, state| {
        let mut hook = LossAwareHook::new(options, state)
            .map_err(|e| PipelineError::usage(format!("invalid quantizer options: {e}")))?;
        hook.set_steps_per_epoch(steps_per_epoch);
        Ok(hook)
    })
}
