//! In-training runs (METHOD §4), the ground of the in-training and combined
//! methods: from a trained baseline or from scratch, resumable, with the
//! accumulated-gradient policy decided once for every entry point.

use std::path::Path;

use candle_core::Device;
use qgrad_data::Dataset;
use qgrad_models::checkpoint::CHECKPOINT_FILE;
use qgrad_models::methods::{InTrainingHook, InTrainingOptions};
use qgrad_models::{train, Arch, TrainConfig, TrainHook, TrainState};

use crate::error::{training, Context, PipelineError, Result};
use crate::trained::{check_arch, load_trained, normalization};
use crate::AccumStart;

/// Where an in-training run starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// A fresh network seeded by the run's seed.
    Scratch,
    /// Fine-tuning the network of this checkpoint (file or folder) with its
    /// normalisation; a fresh optimizer and schedule, nothing frozen, and
    /// the accumulated gradients as `accum` says.
    Checkpoint {
        /// The checkpoint.
        path: &'a Path,
        /// Carry the baseline's `A` on, or start it at zero.
        accum: AccumStart,
        /// Evaluate the baseline first (reported as the float accuracy).
        evaluate: bool,
    },
}

/// One run of a training method with options `O`.
pub struct MethodRun<'a, O> {
    /// The network.
    pub arch: Arch,
    /// The run's configuration; with a `checkpoint_dir` the run checkpoints
    /// after every epoch and a rerun resumes it.
    pub config: TrainConfig,
    /// The method's options.
    pub options: O,
    /// Where it starts.
    pub start: Start<'a>,
    /// The training device.
    pub device: Device,
}

/// One in-training run.
pub type InTrainingRun<'a> = MethodRun<'a, InTrainingOptions>;

/// A finished run of a training method (in-training, loss-aware): the
/// trained state with the method's hook.
pub struct RunOutcome<H> {
    /// The trained state.
    pub state: TrainState,
    /// The method's hook, with its state (splits, quantizer warm starts).
    pub hook: H,
    /// The configuration it ran with (normalisation filled in).
    pub config: TrainConfig,
    /// The baseline's accuracy, when it was evaluated.
    pub float_accuracy: Option<f64>,
    /// The epoch a resumed run continued after.
    pub resumed_after: Option<usize>,
}

/// A finished in-training run: the frozen quantized part plus the float
/// remainder, and the hook with the split state and log.
pub type InTrainingOutcome = RunOutcome<InTrainingHook>;

/// The state a run starts from: its checkpoint if `config.checkpoint_dir`
/// holds one, else the `start` network; the start's normalisation goes into
/// `config`. Returns the state, the baseline's accuracy (when evaluated) and
/// the epoch a resumed run continues after.
fn starting_state(
    arch: Arch,
    config: &mut TrainConfig,
    start: Start,
    device: &Device,
    (train_set, test_set): (&Dataset, &Dataset),
) -> Result<(TrainState, Option<f64>, Option<usize>)> {
    let mut float_accuracy = None;
    let mut fresh = None;
    if let Start::Checkpoint {
        path,
        accum,
        evaluate,
    } = start
    {
        let trained = load_trained(path, device)?;
        check_arch("--init", trained.arch(), arch)?;
        // The normalisation the baseline was trained with.
        config.normalization = Some(trained.normalization(train_set));
        if evaluate {
            let norm = normalization(config, train_set);
            float_accuracy = Some(trained.accuracy(test_set, &norm)?);
        }
        fresh = Some(
            trained
                .state
                .restart(config, accum == AccumStart::Carry)
                .map_err(|e| training(e, "cannot restart the baseline"))?,
        );
    }
    let mut resumed_after = None;
    let resumed = match &config.checkpoint_dir {
        Some(dir) if dir.join(CHECKPOINT_FILE).is_file() => {
            let state = TrainState::resume(arch, device, config)
                .map_err(|e| training(e, &format!("cannot resume from {}", dir.display())))?
                .ok_or_else(|| PipelineError::usage("the run checkpoint disappeared"))?;
            resumed_after = Some(state.epoch);
            Some(state)
        }
        _ => None,
    };
    let state = match (resumed, fresh) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            TrainState::new(arch, device, config).runtime("cannot create the network")?
        }
    };
    check_arch("the run checkpoint", state.network.arch, arch)?;
    Ok((state, float_accuracy, resumed_after))
}

/// A run of a training method whose hook `make_hook` builds from the options
/// and the starting state: from `start` (or the run's checkpoint), trained
/// with the hook and then `extra` at their stages.
pub(crate) fn run_method<O, H: TrainHook>(
    run: MethodRun<O>,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
    make_hook: impl FnOnce(O, &mut TrainState) -> Result<H>,
) -> Result<RunOutcome<H>> {
    let MethodRun {
        arch,
        mut config,
        options,
        start,
        device,
    } = run;
    let (mut state, float_accuracy, resumed_after) =
        starting_state(arch, &mut config, start, &device, data)?;
    let mut hook = make_hook(options, &mut state)?;
    {
        let mut hooks: Vec<&mut dyn TrainHook> = vec![&mut hook];
        hooks.extend(extra.iter_mut().map(|h| &mut **h as &mut dyn TrainHook));
        train(&mut state, data.0, data.1, &config, &mut hooks)
            .map_err(|e| training(e, "training failed"))?;
    }
    config.normalization = Some(normalization(&config, data.0));
    Ok(RunOutcome {
        state,
        hook,
        config,
        float_accuracy,
        resumed_after,
    })
}

/// Runs `run` on `train_set`, evaluating on `test_set` after every epoch;
/// `extra` hooks (progress printing, …) run after the in-training hook.
pub fn run_in_training(
    run: InTrainingRun,
    data: (&Dataset, &Dataset),
    extra: &mut [&mut dyn TrainHook],
) -> Result<InTrainingOutcome> {
    run.options
        .validate()
        .map_err(|e| PipelineError::usage(format!("invalid in-training options: {e}")))?;
    run_method(run, data, extra, |options, state| {
        InTrainingHook::new(options, state)
            .map_err(|e| PipelineError::usage(format!("invalid in-training options: {e}")))
    })
}
