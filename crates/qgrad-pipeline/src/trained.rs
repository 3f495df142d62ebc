//! Trained networks: a float run (fresh or resumed) and loading one from its
//! checkpoint.

use std::path::{Path, PathBuf};

use candle_core::Device;
use qgrad_data::{Dataset, Normalization};
use qgrad_models::checkpoint::{load_checkpoint, CHECKPOINT_FILE};
use qgrad_models::methods::accum_to_host;
use qgrad_models::{train, Arch, NamedTensor, TrainConfig, TrainHook, TrainState};

use crate::error::{training, Context, PipelineError, Result};

/// A trained network with the configuration it was trained with.
pub struct Trained {
    /// The training state (parameters, `A`, optimizer state, history).
    pub state: TrainState,
    /// The configuration it was trained with (its normalisation included,
    /// as checkpoints store it).
    pub config: TrainConfig,
}

impl Trained {
    /// The network's architecture.
    pub fn arch(&self) -> Arch {
        self.state.network.arch
    }

    /// The normalisation the network was trained with (the training set's
    /// statistics if the configuration does not say).
    pub fn normalization(&self, train: &Dataset) -> Normalization {
        normalization(&self.config, train)
    }

    /// The float network's test accuracy.
    pub fn accuracy(&self, test: &Dataset, norm: &Normalization) -> Result<f64> {
        self.state
            .network
            .evaluate(test, norm, crate::EVAL_BATCH)
            .runtime("evaluation of the float model failed")
    }

    /// Parameters, buffers and accumulated gradients on the host.
    pub fn to_host(&self, norm: Normalization) -> Result<HostModel> {
        HostModel::from_state(&self.state, norm)
    }
}

/// A network on the host: what the post-training methods and export read.
#[derive(Debug, Clone)]
pub struct HostModel {
    /// The network's architecture.
    pub arch: Arch,
    /// Trainable parameters.
    pub params: Vec<NamedTensor>,
    /// Batch-norm running statistics.
    pub buffers: Vec<NamedTensor>,
    /// Accumulated gradients, named like their parameters.
    pub accum: Vec<NamedTensor>,
    /// The input normalisation.
    pub norm: Normalization,
}

impl HostModel {
    /// Copies `state` to the host.
    pub fn from_state(state: &TrainState, norm: Normalization) -> Result<Self> {
        let context = "cannot copy the network to the host";
        Ok(HostModel {
            arch: state.network.arch,
            params: state.network.params_to_host().runtime(context)?,
            buffers: state.network.buffers_to_host().runtime(context)?,
            accum: accum_to_host(state).runtime(context)?,
            norm,
        })
    }
}

/// The normalisation of a run: the configured one, or the training set's.
pub fn normalization(config: &TrainConfig, train: &Dataset) -> Normalization {
    config
        .normalization
        .clone()
        .unwrap_or_else(|| train.channel_statistics())
}

/// `path` itself, or its `checkpoint.safetensors` when it is a folder.
pub fn checkpoint_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(CHECKPOINT_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Loads a trained network from a checkpoint file or its folder.
pub fn load_trained(path: &Path, device: &Device) -> Result<Trained> {
    let file = checkpoint_file(path);
    let (state, config) = load_checkpoint(&file, device)
        .input(format!("cannot load checkpoint {}", file.display()))?;
    Ok(Trained { state, config })
}

/// A float training run: continues `config.checkpoint_dir`'s checkpoint if
/// there is one (returning the epoch it resumed after), otherwise starts a
/// fresh network; then trains to `config.epochs` with `hooks`.
pub fn train_float(
    arch: Arch,
    config: &TrainConfig,
    device: &Device,
    (train_set, test_set): (&Dataset, &Dataset),
    hooks: &mut [&mut dyn TrainHook],
    on_start: impl FnOnce(Option<usize>),
) -> Result<Trained> {
    let dir = config
        .checkpoint_dir
        .as_deref()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let (mut state, resumed) = TrainState::resume_or_new(arch, device, config)
        .map_err(|e| training(e, &format!("cannot resume from {dir}")))?;
    on_start(resumed.then_some(state.epoch));
    train(&mut state, train_set, test_set, config, hooks)
        .map_err(|e| training(e, "training failed"))?;
    let mut config = config.clone();
    config.normalization = Some(normalization(&config, train_set));
    Ok(Trained { state, config })
}

/// The error of an `--init` checkpoint that holds another network.
pub(crate) fn check_arch(what: &str, found: Arch, wanted: Arch) -> Result<()> {
    if found != wanted {
        return Err(PipelineError::usage(format!(
            "{what} holds {found}, but the model is {wanted}"
        )));
    }
    Ok(())
}
