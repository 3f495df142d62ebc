//! The training loop: seeded mini-batches, an optimizer (SGD or Adam),
//! accumulated gradients after every backward pass, per-epoch evaluation,
//! checkpoints and resume, and the named stages where a method plugs in.
//!
//! # The stages of a step and of an epoch
//!
//! A [`TrainHook`] may act at each of these points, in this order; hooks run
//! in the order they are given, at every stage:
//!
//! 0. **shard** ([`TrainHook::batch_shard`]): the part of the mini-batch this
//!    process computes (data-parallel training: each rank its own shard;
//!    otherwise the whole batch);
//! 1. **forward weights** ([`TrainHook::forward_weights`]): weights the
//!    forward pass uses instead of the parameters (quantized weights with a
//!    straight-through gradient; the per-epoch evaluation asks
//!    [`TrainHook::eval_weights`] instead);
//! 2. forward, cross-entropy, backward;
//! 3. **gradients** ([`TrainHook::transform_gradients`]): the gradients (and
//!    the step's loss) may be replaced before anything reads them (the
//!    data-parallel exchange of METHOD §12 puts the average over the ranks
//!    there, clipping could);
//! 4. **observe** ([`TrainHook::observe_gradients`]): the final gradients are
//!    read. The accumulated-gradient bookkeeping of METHOD §1 is the observer
//!    [`AccumulateGradients`], which [`train`] always runs after the given
//!    hooks, so `A` sums the gradients the update uses;
//! 5. the optimizer update (frozen elements do not move);
//! 6. **after update** ([`TrainHook::after_update`]): re-applying sparsity
//!    masks, projecting or clipping weights;
//!
//! and after every epoch:
//!
//! 7. **after epoch** ([`TrainHook::after_epoch`]), before evaluation and
//!    checkpointing: in-training quantization's splits (METHOD §4);
//! 8. **epoch finished** ([`TrainHook::epoch_finished`]), after evaluation,
//!    with the epoch's statistics: reporting.
//!
//! A hook's own state goes into every checkpoint under the hook's
//! [`name`](TrainHook::name) and comes back on resume.
//!
//! Resume is bit-identical because nothing random is carried between epochs:
//! the shuffle, augmentation and dropout generators of epoch `e` are derived
//! from `(seed, e)`, and the learning rate is a function of `e`. A checkpoint
//! written after epoch `e` holds everything else (parameters, buffers,
//! momentum, accumulated gradients, freeze masks), so continuing from it runs
//! exactly the same arithmetic as the uninterrupted run.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use qgrad_accum::{AccumulatedGradients, FreezeMask};
use qgrad_optim::{LrSchedule, Optimizer, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::arch::{Arch, DatasetKind};
use crate::checkpoint;
use crate::data::{epoch_rng, Augment, Dataset, Normalization};
use crate::error::{ModelsError, Result};
use crate::net::{Network, WeightOverrides};

/// Which optimizer a run uses; its weight decay is
/// [`TrainConfig::weight_decay`], SGD's momentum [`TrainConfig::momentum`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// SGD with momentum (the first thesis's recipes).
    #[default]
    Sgd,
    /// Bias-corrected Adam (the loss-aware recipes, METHOD §15).
    Adam {
        /// First-moment decay β₁.
        beta1: f64,
        /// Second-moment decay β₂.
        beta2: f64,
        /// ε added to `sqrt(v̂)`.
        eps: f64,
    },
}

impl OptimizerKind {
    /// PyTorch's Adam defaults.
    pub const ADAM: OptimizerKind = OptimizerKind::Adam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };

    fn is_sgd(&self) -> bool {
        *self == OptimizerKind::Sgd
    }
}

/// Everything that defines a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Epochs to train (a resumed run continues up to this many).
    pub epochs: usize,
    /// Images per mini-batch.
    pub batch_size: usize,
    /// Base learning rate (epoch 0), scaled by `schedule`.
    pub lr: f64,
    /// SGD momentum μ.
    pub momentum: f64,
    /// L2 weight decay λ (any optimizer).
    pub weight_decay: f64,
    /// How the learning rate changes with the epoch.
    pub schedule: LrSchedule,
    /// Seeds initialisation, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Training-time augmentation.
    pub augment: Augment,
    /// `None`: per-channel mean/std of the training set.
    pub normalization: Option<Normalization>,
    /// Images per evaluation batch.
    pub eval_batch_size: usize,
    /// Stop each epoch after this many batches (quick runs, tests, benches).
    pub max_batches_per_epoch: Option<usize>,
    /// Show a progress bar (only ever drawn when stderr is a terminal).
    pub progress: bool,
    /// Write `checkpoint.safetensors` (and `checkpoint.accgrad.safetensors`)
    /// here after every epoch; `TrainState::resume_or_new` continues from it.
    pub checkpoint_dir: Option<PathBuf>,
    /// The optimizer (SGD unless set; left out of the serialised config then,
    /// so configurations written before it existed hash the same).
    #[serde(default, skip_serializing_if = "OptimizerKind::is_sgd")]
    pub optimizer: OptimizerKind,
    /// Quantize the input of every linear and convolution layer to this many
    /// bits in the forward pass, as the integer inference does (straight-
    /// through gradient); `None`: f32 activations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act_bits: Option<u8>,
    /// PACT activations (METHOD §9; [`crate::net::PactConfig`]) instead of
    /// `act_bits`; the network gets its clip parameters when the state is
    /// made ([`TrainState::new`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pact: Option<crate::net::PactConfig>,
}

impl TrainConfig {
    /// Recipes that reach the float baselines of METHOD.md §7 on the full data
    /// sets: SGD with momentum 0.9, weight decay 5e-4 and cosine decay.
    pub fn default_for(arch: Arch) -> Self {
        let (epochs, lr, augment) = match arch {
            Arch::Lenet300100 | Arch::Lenet5 | Arch::Mlp { .. } => (20, 0.05, Augment::None),
            Arch::AlexNet | Arch::CifarCnn { .. } => (100, 0.05, Augment::CropFlip { pad: 4 }),
            Arch::Vgg16 => (150, 0.05, Augment::CropFlip { pad: 4 }),
        };
        Self {
            epochs,
            batch_size: 128,
            lr,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: LrSchedule::Cosine { min_lr: 0.0 },
            seed: 1,
            augment,
            normalization: match arch.dataset() {
                DatasetKind::Mnist => Some(Normalization {
                    mean: vec![0.1307],
                    std: vec![0.3081],
                }),
                DatasetKind::Cifar10 => None,
            },
            eval_batch_size: 1000,
            max_batches_per_epoch: None,
            progress: true,
            checkpoint_dir: None,
            optimizer: OptimizerKind::Sgd,
            act_bits: None,
            pact: None,
        }
    }

    /// The optimizer settings of this run.
    pub fn optimizer_config(&self) -> OptimizerConfig {
        match self.optimizer {
            OptimizerKind::Sgd => OptimizerConfig::Sgd {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
            },
            OptimizerKind::Adam { beta1, beta2, eps } => OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay: self.weight_decay,
            },
        }
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelsError::Config(m));
        if self.batch_size == 0 || self.eval_batch_size == 0 {
            return bad("batch sizes must be >= 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate must be positive, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay must be zero or positive, got {}",
                self.weight_decay
            ));
        }
        if let Some(n) = &self.normalization {
            if n.mean.len() != n.std.len() || n.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return bad("normalization needs one positive std per mean".into());
            }
        }
        if let Some(b) = self.act_bits {
            if !(2..=16).contains(&b) {
                return bad(format!("activation width {b} is not allowed (2..=16)"));
            }
        }
        if let Some(p) = &self.pact {
            p.validate()?;
            if self.act_bits.is_some() {
                return bad(
                    "PACT and fixed-point activations (act_bits) exclude each other".into(),
                );
            }
        }
        self.optimizer_config()
            .validate()
            .map_err(|e| ModelsError::Config(e.to_string()))?;
        self.schedule
            .validate()
            .map_err(|e| ModelsError::Config(e.to_string()))
    }
}

/// One finished epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochStats {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Its learning rate.
    pub lr: f64,
    /// Mean training cross-entropy over the epoch's batches.
    pub train_loss: f64,
    /// Test accuracy in [0, 1] after the epoch (and after the hook).
    pub test_accuracy: f64,
    /// Mean test cross-entropy after the epoch.
    pub test_loss: f64,
    /// Training time of the epoch (without evaluation).
    pub seconds: f64,
    /// Training images per second of the epoch.
    pub images_per_second: f64,
    /// Fraction of parameter elements frozen after the epoch.
    pub frozen_fraction: f64,
}

/// The history of a run (including epochs from before a resume).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Every finished epoch.
    pub epochs: Vec<EpochStats>,
    /// The epoch this call started at (0 for a fresh run).
    pub started_at_epoch: usize,
}

impl TrainReport {
    /// The test accuracy after the last epoch.
    pub fn final_accuracy(&self) -> Option<f64> {
        self.epochs.last().map(|e| e.test_accuracy)
    }
}

/// A method plugged into the training loop at its named stages (module
/// docs). Every stage does nothing unless the hook says otherwise.
pub trait TrainHook {
    /// The key under which checkpoints keep this hook's state.
    fn name(&self) -> &'static str;

    /// Stage 1: weights for the forward pass instead of the parameters.
    fn forward_weights(
        &mut self,
        _state: &TrainState,
        _overrides: &mut WeightOverrides,
    ) -> Result<()> {
        Ok(())
    }

    /// The weights the per-epoch evaluation uses instead of the parameters
    /// (the quantized network a method trains; read-only).
    fn eval_weights(&self, _state: &TrainState, _overrides: &mut WeightOverrides) -> Result<()> {
        Ok(())
    }

    /// Stage 0: the part (indices into the mini-batch's `batch`) that this
    /// process computes; the whole batch unless a hook says otherwise. The
    /// step's loss still counts for the whole batch: a hook that shards
    /// also replaces the loss by the batch's mean at stage 3.
    fn batch_shard(&mut self, batch: std::ops::Range<usize>) -> Result<std::ops::Range<usize>> {
        Ok(batch)
    }

    /// Whether this process writes the run's checkpoints (data-parallel
    /// training: rank 0 only). Every hook must agree for a checkpoint to be
    /// written.
    fn writes_checkpoints(&self) -> bool {
        true
    }

    /// Stage 3: replace or change the gradients (and the step's mean loss)
    /// before anything reads them.
    fn transform_gradients(
        &mut self,
        _grads: &mut GradStore,
        _loss: &mut Tensor,
        _state: &TrainState,
    ) -> Result<()> {
        Ok(())
    }

    /// Stage 4: read the final gradients (before the update).
    fn observe_gradients(&mut self, _grads: &GradStore, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }

    /// Stage 6: after the optimizer update.
    fn after_update(&mut self, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }

    /// Stage 7: after each epoch's training, before evaluation and
    /// checkpointing. In-training quantization quantizes parameters here
    /// (`state.network.set_parameter`) and freezes them (`state.set_mask`).
    fn after_epoch(&mut self, _epoch: usize, _state: &mut TrainState) -> Result<()> {
        Ok(())
    }

    /// Stage 8: after the epoch's evaluation, with its statistics.
    fn epoch_finished(&mut self, _stats: &EpochStats, _state: &TrainState) -> Result<()> {
        Ok(())
    }

    /// The hook's state, serialised, to be stored in the checkpoint written
    /// after each epoch (`None`: the hook keeps no state worth resuming).
    fn checkpoint_state(&self) -> Result<Option<String>> {
        Ok(None)
    }

    /// Restores the state a checkpoint holds before a resumed run goes on;
    /// `state` is the resumed training state (its freeze masks included).
    fn restore_state(&mut self, _saved: &str, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// The accumulated-gradient bookkeeping of METHOD §1 as a stage-4 observer:
/// `A += |g|` on the training device after every backward pass.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccumulateGradients;

impl TrainHook for AccumulateGradients {
    fn name(&self) -> &'static str {
        "accumulated-gradients"
    }

    fn observe_gradients(&mut self, grads: &GradStore, state: &mut TrainState) -> Result<()> {
        state.accum.accumulate(grads)?;
        Ok(())
    }
}

/// Everything that changes during training.
pub struct TrainState {
    /// The network being trained.
    pub network: Network,
    /// `A` of METHOD §1, one tensor per parameter.
    pub accum: AccumulatedGradients,
    /// Per parameter (aligned with `network.parameters()`): `None` = all trainable.
    pub masks: Vec<Option<FreezeMask>>,
    /// The optimizer with its state.
    pub optimizer: Box<dyn Optimizer>,
    /// Completed epochs; training continues at this epoch.
    pub epoch: usize,
    /// Statistics of the completed epochs.
    pub history: Vec<EpochStats>,
    /// The hooks' states as of the last completed epoch, by hook name (see
    /// [`TrainHook::checkpoint_state`]); saved in and loaded from checkpoints.
    pub hook_states: BTreeMap<String, String>,
}

impl std::fmt::Debug for TrainState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainState")
            .field("network", &self.network)
            .field("optimizer", &self.optimizer.config())
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl TrainState {
    /// A fresh network (seeded by `config.seed`) with zero optimizer state
    /// and zero `A`.
    pub fn new(arch: Arch, device: &Device, config: &TrainConfig) -> Result<Self> {
        let mut network = Network::new(arch, device, config.seed)?;
        if let Some(pact) = config.pact {
            network.enable_pact(pact)?;
        }
        let mut state = Self::from_network(network, config)?;
        state.freeze_fixed_clips()?;
        Ok(state)
    }

    /// A fixed PACT clip is a parameter the optimizer never moves.
    pub(crate) fn freeze_fixed_clips(&mut self) -> Result<()> {
        if let Some(pact) = self.network.pact() {
            if !pact.learned {
                for name in self.network.clip_names() {
                    let mask =
                        FreezeMask::from_frozen(&[1], &[true], &self.network.device().clone())?;
                    self.set_mask(&name, mask)?;
                }
            }
        }
        Ok(())
    }

    /// Starts training an existing network (zero optimizer state, zero `A`).
    pub fn from_network(network: Network, config: &TrainConfig) -> Result<Self> {
        let params = network.parameters();
        let accum = AccumulatedGradients::new(&params)?;
        let optimizer = config.optimizer_config().build(&params)?;
        Ok(Self {
            masks: vec![None; params.len()],
            network,
            accum,
            optimizer,
            epoch: 0,
            history: Vec::new(),
            hook_states: BTreeMap::new(),
        })
    }

    /// Continues a trained state as the start of a new run with `config`:
    /// a fresh optimizer and schedule, no frozen elements, epoch 0; the
    /// parameters, buffers and, if `keep_accum`, the accumulated gradients
    /// carry on (METHOD §1's sum over the training process).
    pub fn restart(mut self, config: &TrainConfig, keep_accum: bool) -> Result<Self> {
        let params = self.network.parameters();
        self.optimizer = config.optimizer_config().build(&params)?;
        if !keep_accum {
            self.accum = AccumulatedGradients::new(&params)?;
        }
        self.masks = vec![None; params.len()];
        self.epoch = 0;
        self.history.clear();
        self.hook_states.clear();
        Ok(self)
    }

    /// Continues from `config.checkpoint_dir`'s checkpoint if there is one,
    /// otherwise starts fresh. Returns whether it resumed.
    pub fn resume_or_new(
        arch: Arch,
        device: &Device,
        config: &TrainConfig,
    ) -> Result<(Self, bool)> {
        if let Some(state) = Self::resume(arch, device, config)? {
            return Ok((state, true));
        }
        Ok((Self::new(arch, device, config)?, false))
    }

    /// The state of `config.checkpoint_dir`'s checkpoint, if there is one.
    /// The caller's optimizer settings win over the stored ones.
    pub fn resume(arch: Arch, device: &Device, config: &TrainConfig) -> Result<Option<Self>> {
        let Some(dir) = &config.checkpoint_dir else {
            return Ok(None);
        };
        let path = dir.join(checkpoint::CHECKPOINT_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let (mut state, _) = checkpoint::load_checkpoint(&path, device)?;
        if state.network.arch != arch {
            return Err(ModelsError::checkpoint(
                &path,
                format!("holds {}, not {arch}", state.network.arch),
            ));
        }
        state
            .optimizer
            .reconfigure(&config.optimizer_config())
            .map_err(|e| ModelsError::checkpoint(&path, e.to_string()))?;
        Ok(Some(state))
    }
    fn index_of(&self, name: &str) -> Result<usize> {
        self.network
            .parameters()
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| ModelsError::Other(format!("no parameter named '{name}'")))
    }

    /// The freeze mask of parameter `name`, if any element of it is frozen.
    pub fn mask(&self, name: &str) -> Option<&FreezeMask> {
        let i = self.index_of(name).ok()?;
        self.masks[i].as_ref()
    }

    /// Sets the freeze mask of parameter `name` (replacing the old one).
    pub fn set_mask(&mut self, name: &str, mask: FreezeMask) -> Result<()> {
        let i = self.index_of(name)?;
        let params = self.network.parameters();
        if mask.dims() != params[i].1.dims() {
            return Err(ModelsError::Shape {
                what: format!("{name} freeze mask"),
                expected: params[i].1.dims().to_vec(),
                got: mask.dims().to_vec(),
            });
        }
        self.masks[i] = Some(mask);
        Ok(())
    }

    /// Fraction of all parameter elements that are frozen.
    pub fn frozen_fraction(&self) -> Result<f64> {
        let mut frozen = 0usize;
        for m in self.masks.iter().flatten() {
            frozen += m.num_frozen()?;
        }
        Ok(frozen as f64 / self.network.num_parameters().max(1) as f64)
    }

    /// One optimizer step on a batch with only the accumulated-gradient
    /// bookkeeping: forward, cross-entropy, backward, `A += |g|`, update.
    /// Returns the (device) loss, detached.
    pub fn train_step(&mut self, x: &Tensor, labels: &Tensor, lr: f64) -> Result<Tensor> {
        self.train_step_with(x, labels, lr, &mut [])
    }

    /// One optimizer step through every stage (module docs) with `hooks`,
    /// then the accumulated-gradient bookkeeping as the last observer.
    pub fn train_step_with(
        &mut self,
        x: &Tensor,
        labels: &Tensor,
        lr: f64,
        hooks: &mut [&mut dyn TrainHook],
    ) -> Result<Tensor> {
        let mut overrides = WeightOverrides::new();
        for h in hooks.iter_mut() {
            h.forward_weights(self, &mut overrides)?;
        }
        let logits = self.network.forward_with(x, true, &overrides)?;
        drop(overrides);
        let mut loss = candle_nn::loss::cross_entropy(&logits, labels)?;
        let mut grads = loss.backward()?;
        for h in hooks.iter_mut() {
            h.transform_gradients(&mut grads, &mut loss, self)?;
        }
        for h in hooks.iter_mut() {
            h.observe_gradients(&grads, self)?;
        }
        AccumulateGradients.observe_gradients(&grads, self)?;
        self.optimizer.step(&grads, lr, &self.masks)?;
        drop(grads);
        for h in hooks.iter_mut() {
            h.after_update(self)?;
        }
        Ok(loss.detach())
    }
}

fn progress_bar(config: &TrainConfig, steps: usize, epoch: usize) -> ProgressBar {
    if !config.progress || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "epoch {prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{}/{}", epoch + 1, config.epochs));
    bar
}

/// Trains `state` from `state.epoch` to `config.epochs` on `train_data`,
/// evaluating on `test_data` after every epoch, with `hooks` at their stages
/// (module docs); the checkpoint (if configured) is written after the
/// after-epoch stage and the evaluation.
pub fn train(
    state: &mut TrainState,
    train_data: &Dataset,
    test_data: &Dataset,
    config: &TrainConfig,
    hooks: &mut [&mut dyn TrainHook],
) -> Result<TrainReport> {
    config.validate()?;
    state.network.set_activation_bits(config.act_bits)?;
    let arch = state.network.arch;
    for (what, data) in [("training", train_data), ("test", test_data)] {
        if data.is_empty() {
            return Err(ModelsError::Config(format!("the {what} set is empty")));
        }
        if data.shape != arch.input_shape() {
            return Err(ModelsError::Shape {
                what: format!("{what} images for {arch}"),
                expected: arch.input_shape().to_vec(),
                got: data.shape.to_vec(),
            });
        }
    }
    let norm = config
        .normalization
        .clone()
        .unwrap_or_else(|| train_data.channel_statistics());
    if norm.mean.len() != train_data.shape[0] {
        return Err(ModelsError::Config(format!(
            "normalization has {} channels, images have {}",
            norm.mean.len(),
            train_data.shape[0]
        )));
    }
    let device = state.network.device().clone();
    let [c, h, w] = train_data.shape;
    let started_at_epoch = state.epoch;
    for h in hooks.iter_mut() {
        // A resumed run: the hook continues where the checkpoint left it.
        if let Some(saved) = state.hook_states.get(h.name()).cloned() {
            h.restore_state(&saved, state)?;
        }
    }
    let mut buf = Vec::new();
    for epoch in state.epoch..config.epochs {
        let lr = config.schedule.lr_at(config.lr, epoch, config.epochs);
        let order = train_data.epoch_order(config.seed, epoch as u64, true);
        let mut aug_rng = epoch_rng(config.seed, epoch as u64, 1);
        state.network.reseed_dropout(config.seed, epoch as u64);
        let batches: Vec<&[usize]> = order
            .chunks(config.batch_size)
            .take(config.max_batches_per_epoch.unwrap_or(usize::MAX))
            .collect();
        let bar = progress_bar(config, batches.len(), epoch);
        let start = Instant::now();
        let mut loss_sum = Tensor::zeros((), DType::F32, &device)?;
        let mut images = 0usize;
        for (step, idx) in batches.iter().enumerate() {
            let mut shard = 0..idx.len();
            for h in hooks.iter_mut() {
                shard = h.batch_shard(shard)?;
            }
            let local = idx
                .get(shard.clone())
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    ModelsError::Config(format!(
                        "the shard {shard:?} of a batch of {} images is empty or out of range",
                        idx.len()
                    ))
                })?;
            let labels = train_data.gather(local, &norm, config.augment, &mut aug_rng, &mut buf);
            let x = Tensor::from_slice(&buf, (local.len(), c, h, w), &device)?;
            let y = Tensor::from_vec(labels, local.len(), &device)?;
            let loss = state.train_step_with(&x, &y, lr, hooks)?;
            loss_sum = (loss_sum + loss.affine(idx.len() as f64, 0.0)?)?;
            images += idx.len();
            if !bar.is_hidden() && step % 20 == 0 {
                bar.set_message(format!(
                    "loss {:.4}",
                    loss.to_scalar::<f32>().unwrap_or(f32::NAN)
                ));
            }
            bar.inc(1);
        }
        let seconds = start.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let train_loss = loss_sum.to_scalar::<f32>()? as f64 / images.max(1) as f64;
        if !train_loss.is_finite() {
            return Err(ModelsError::Diverged(format!(
                "mean training loss of epoch {} is {train_loss} (learning rate {lr} too high?)",
                epoch + 1
            )));
        }
        for h in hooks.iter_mut() {
            h.after_epoch(epoch, state)?;
        }
        let mut overrides = WeightOverrides::new();
        for h in hooks.iter() {
            h.eval_weights(state, &mut overrides)?;
        }
        let (test_accuracy, test_loss) = state.network.evaluate_with_overrides(
            test_data,
            &norm,
            config.eval_batch_size,
            &overrides,
        )?;
        drop(overrides);
        state.history.push(EpochStats {
            epoch,
            lr,
            train_loss,
            test_accuracy,
            test_loss,
            seconds,
            images_per_second: images as f64 / seconds.max(1e-9),
            frozen_fraction: state.frozen_fraction()?,
        });
        state.epoch = epoch + 1;
        for h in hooks.iter() {
            if let Some(saved) = h.checkpoint_state()? {
                state.hook_states.insert(h.name().to_string(), saved);
            }
        }
        if let Some(dir) = &config.checkpoint_dir {
            if hooks.iter().all(|h| h.writes_checkpoints()) {
                save_in_dir(state, config, &norm, dir)?;
            }
        }
        if let Some(stats) = state.history.last().cloned() {
            for h in hooks.iter_mut() {
                h.epoch_finished(&stats, state)?;
            }
        }
    }
    Ok(TrainReport {
        epochs: state.history.clone(),
        started_at_epoch,
    })
}

fn save_in_dir(
    state: &TrainState,
    config: &TrainConfig,
    norm: &Normalization,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelsError::io(dir, e))?;
    let mut config = config.clone();
    config.normalization = Some(norm.clone());
    checkpoint::save_checkpoint(state, &config, &dir.join(checkpoint::CHECKPOINT_FILE))?;
    state
        .accum
        .save(dir.join(checkpoint::ACCGRAD_FILE))
        .map_err(ModelsError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::net::NamedTensor;
    use qgrad_accum::{select_lowest, Scope};

    fn mini() -> (Dataset, Dataset) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train, test) = load_mnist(&dir).unwrap();
        (train, test.take(300))
    }

    fn quick_config(arch: Arch, epochs: usize, batches: usize) -> TrainConfig {
        let mut c = TrainConfig::default_for(arch);
        c.epochs = epochs;
        c.batch_size = 32;
        c.max_batches_per_epoch = Some(batches);
        c.progress = false;
        c.seed = 11;
        c
    }

    #[test]
    fn a_short_run_lowers_the_loss() {
        let (train_set, test_set) = mini();
        let config = quick_config(Arch::Lenet300100, 3, 40);
        let mut state = TrainState::new(Arch::Lenet300100, &Device::Cpu, &config).unwrap();
        let (_, initial_loss) = state
            .network
            .evaluate_with_loss(&test_set, config.normalization.as_ref().unwrap(), 100)
            .unwrap();
        let report = train(&mut state, &train_set, &test_set, &config, &mut []).unwrap();
        assert_eq!(report.epochs.len(), 3);
        let first = &report.epochs[0];
        let last = &report.epochs[2];
        assert!(last.train_loss < first.train_loss, "{report:?}");
        assert!(
            last.test_loss < 0.5 * initial_loss,
            "{initial_loss} -> {report:?}"
        );
        assert!(last.test_accuracy > 0.8, "{report:?}");
        assert!(first.images_per_second > 0.0);
        assert_eq!(state.accum.steps(), 120);
        // Every parameter, biases included, has collected importance.
        for (name, _, values) in state.accum.to_host().unwrap() {
            assert!(values.iter().any(|&v| v > 0.0), "{name}");
        }
    }

    #[test]
    fn cifar_models_give_logits_and_a_few_steps_lower_the_loss() {
        // Tiny inputs: four fixed images, a few steps on the same batch.
        let dev = Device::Cpu;
        for arch in [Arch::AlexNet, Arch::Vgg16] {
            let mut config = TrainConfig::default_for(arch);
            config.seed = 3;
            config.lr = 0.01;
            let mut state = TrainState::new(arch, &dev, &config).unwrap();
            let x = Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev).unwrap();
            let labels = Tensor::new(&[1u32, 3, 5, 7], &dev).unwrap();
            let logits = state.network.forward(&x, false).unwrap();
            assert_eq!(logits.dims(), &[4, 10], "{arch}");
            let first = state
                .train_step(&x, &labels, config.lr)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let mut last = first;
            for _ in 0..4 {
                last = state
                    .train_step(&x, &labels, config.lr)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
            }
            assert!(first.is_finite() && last.is_finite(), "{arch}");
            assert!(last < first, "{arch}: loss {first} -> {last}");
        }
    }

    /// Freezes the lower half (by accumulated gradient) of fc1 after epoch 0,
    /// writing rounded values into it first, like in-training quantization.
    struct FreezeHalfOfFc1;

    impl TrainHook for FreezeHalfOfFc1 {
        fn name(&self) -> &'static str {
            "freeze-half"
        }

        fn after_epoch(&mut self, epoch: usize, state: &mut TrainState) -> Result<()> {
            if epoch != 0 {
                return Ok(());
            }
            let scores: Vec<_> = state
                .accum
                .to_host()?
                .into_iter()
                .filter(|(n, _, _)| n == "fc1.weight")
                .collect();
            let selected = select_lowest(&scores, 0.5, Scope::Global, None)?;
            let current = NamedTensor::from_tensor(
                "fc1.weight",
                state.network.parameter("fc1.weight").unwrap().as_tensor(),
            )?;
            let rounded: Vec<f32> = current
                .values
                .iter()
                .zip(&selected[0])
                .map(|(&v, &s)| if s { (v * 16.0).round() / 16.0 } else { v })
                .collect();
            let shape = current.shape.as_slice();
            let t = Tensor::from_vec(rounded, shape, state.network.device())?;
            state.network.set_parameter("fc1.weight", &t)?;
            let mask = FreezeMask::from_frozen(shape, &selected[0], state.network.device())?;
            state.set_mask("fc1.weight", mask)
        }
    }

    #[test]
    fn frozen_parameters_stay_unchanged() {
        let (train_set, test_set) = mini();
        let config = quick_config(Arch::Lenet300100, 3, 15);
        let mut state = TrainState::new(Arch::Lenet300100, &Device::Cpu, &config).unwrap();
        let mut first = config.clone();
        first.epochs = 1;
        train(
            &mut state,
            &train_set,
            &test_set,
            &first,
            &mut [&mut FreezeHalfOfFc1],
        )
        .unwrap();
        let frozen = state.mask("fc1.weight").unwrap().frozen_flags().unwrap();
        assert_eq!(frozen.iter().filter(|&&f| f).count(), 300 * 784 / 2);
        let before = state.network.params_to_host().unwrap();
        train(
            &mut state,
            &train_set,
            &test_set,
            &config,
            &mut [&mut FreezeHalfOfFc1],
        )
        .unwrap();
        let after = state.network.params_to_host().unwrap();
        let (b, a) = (&before[0].values, &after[0].values);
        let mut moved = 0;
        for i in 0..b.len() {
            if frozen[i] {
                assert_eq!(a[i].to_bits(), b[i].to_bits(), "frozen element {i} moved");
            } else if a[i] != b[i] {
                moved += 1;
            }
        }
        assert!(
            moved > b.len() / 4,
            "trainable elements should move ({moved})"
        );
        assert_ne!(before[2].values, after[2].values, "fc2 keeps training");
        assert!((state.history[2].frozen_fraction - 117_600.0 / 266_610.0).abs() < 1e-9);
    }

    /// Runs `FreezeHalfOfFc1`, then fails in epoch `.0`, before that epoch's
    /// checkpoint: what a kill in the middle of the epoch leaves on disk.
    struct KillAt(usize);

    impl TrainHook for KillAt {
        fn name(&self) -> &'static str {
            "kill-at"
        }

        fn after_epoch(&mut self, epoch: usize, state: &mut TrainState) -> Result<()> {
            if epoch == self.0 {
                return Err(ModelsError::Other("killed".into()));
            }
            FreezeHalfOfFc1.after_epoch(epoch, state)
        }
    }

    fn snapshot(state: &TrainState) -> Vec<(String, Vec<u32>)> {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut out: Vec<(String, Vec<u32>)> = state
            .network
            .to_host()
            .unwrap()
            .into_iter()
            .map(|t| (t.name, bits(&t.values)))
            .collect();
        for (name, _, values) in state.accum.to_host().unwrap() {
            out.push((format!("{name}.accgrad"), bits(&values)));
        }
        for (name, _) in state.network.parameters() {
            for slot in state.optimizer.slots() {
                let v = state.optimizer.state(&name, slot).unwrap();
                out.push((
                    format!("{name}.{slot}"),
                    bits(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
                ));
            }
        }
        out
    }

    #[test]
    fn an_interrupted_and_resumed_run_matches_an_uninterrupted_one_bitwise() {
        let (train_set, test_set) = mini();
        let dev = Device::Cpu;
        for arch in [Arch::Lenet300100, Arch::Lenet5] {
            let dir_a = tempfile::tempdir().unwrap();
            let dir_b = tempfile::tempdir().unwrap();
            let mut config = quick_config(arch, 3, 4);
            config.checkpoint_dir = Some(dir_a.path().to_path_buf());
            let mut hook = FreezeHalfOfFc1;
            let (mut straight, resumed) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
            assert!(!resumed);
            let full = train(
                &mut straight,
                &train_set,
                &test_set,
                &config,
                &mut [&mut hook],
            )
            .unwrap();

            // The same run, killed during its third epoch (after the second
            // epoch's checkpoint) ...
            config.checkpoint_dir = Some(dir_b.path().to_path_buf());
            let (mut first, _) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
            let killed = train(
                &mut first,
                &train_set,
                &test_set,
                &config,
                &mut [&mut KillAt(2)],
            );
            assert!(matches!(killed, Err(ModelsError::Other(m)) if m == "killed"));
            drop(first);
            // ... and resumed in a fresh state from disk.
            let (mut second, resumed) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
            assert!(resumed);
            assert_eq!(second.epoch, 2);
            let rest = train(
                &mut second,
                &train_set,
                &test_set,
                &config,
                &mut [&mut hook],
            )
            .unwrap();
            assert_eq!(rest.started_at_epoch, 2);
            assert_eq!(rest.epochs.len(), 3);
            assert_eq!(rest.epochs[2].train_loss, full.epochs[2].train_loss);
            assert_eq!(rest.epochs[2].test_accuracy, full.epochs[2].test_accuracy);
            assert!(
                snapshot(&second) == snapshot(&straight),
                "{arch}: resumed run differs"
            );
            assert_eq!(second.accum.steps(), straight.accum.steps());
        }
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let (train_set, test_set) = mini();
        let mut config = quick_config(Arch::Lenet300100, 1, 1);
        let mut state = TrainState::new(Arch::Lenet300100, &Device::Cpu, &config).unwrap();
        config.batch_size = 0;
        assert!(matches!(
            train(&mut state, &train_set, &test_set, &config, &mut []),
            Err(ModelsError::Config(_))
        ));
        config.batch_size = 8;
        config.lr = f64::NAN;
        assert!(train(&mut state, &train_set, &test_set, &config, &mut []).is_err());
        config.lr = 0.01;
        config.weight_decay = -1e-4;
        assert!(matches!(
            train(&mut state, &train_set, &test_set, &config, &mut []),
            Err(ModelsError::Config(_))
        ));
        config.weight_decay = 5e-4;
        config.lr = 1e9;
        config.max_batches_per_epoch = Some(10);
        assert!(matches!(
            train(&mut state, &train_set, &test_set, &config, &mut []),
            Err(ModelsError::Diverged(_))
        ));
        let mut cifar_like = train_set.take(4);
        cifar_like.shape = [3, 32, 32];
        config.lr = 0.1;
        assert!(matches!(
            train(&mut state, &cifar_like, &test_set, &config, &mut []),
            Err(ModelsError::Shape { .. })
        ));
        let bad_mask = FreezeMask::trainable(&[3], &Device::Cpu).unwrap();
        assert!(state.set_mask("fc1.weight", bad_mask.clone()).is_err());
        assert!(state.set_mask("nope", bad_mask).is_err());
    }

    /// The default recipe on the real MNIST (release build; minutes):
    /// `QGRAD_MNIST_DIR=/path QGRAD_ARCH=lenet-300-100 [QGRAD_EPOCHS=n]
    /// cargo test --release -p qgrad-models -- --ignored --nocapture full_mnist`.
    /// With the full default epochs it checks the METHOD.md §7 baseline.
    #[test]
    #[ignore = "needs the full MNIST and minutes of CPU"]
    fn full_mnist_default_recipe() {
        let dir = std::env::var("QGRAD_MNIST_DIR").expect("set QGRAD_MNIST_DIR");
        let arch: Arch = std::env::var("QGRAD_ARCH")
            .unwrap_or_else(|_| "lenet-300-100".into())
            .parse()
            .unwrap();
        let (train_set, test_set) = load_mnist(Path::new(&dir)).unwrap();
        let mut config = TrainConfig::default_for(arch);
        let full_epochs = config.epochs;
        if let Ok(e) = std::env::var("QGRAD_EPOCHS") {
            config.epochs = e.parse().unwrap();
        }
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let report = train(&mut state, &train_set, &test_set, &config, &mut []).unwrap();
        for e in &report.epochs {
            eprintln!(
                "{arch} epoch {:>2} lr {:.4} loss {:.4} test {:.2}% {:.1}s {:.0} img/s",
                e.epoch + 1,
                e.lr,
                e.train_loss,
                100.0 * e.test_accuracy,
                e.seconds,
                e.images_per_second
            );
        }
        let target = match arch {
            Arch::Lenet300100 => 0.982,
            _ => 0.990,
        };
        let accuracy = report.final_accuracy().unwrap();
        if config.epochs >= full_epochs {
            assert!(accuracy >= target, "{arch}: {accuracy} < {target}");
        } else {
            assert!(accuracy > 0.95, "{arch}: {accuracy}");
        }
    }
}
