//! Training and evaluation (METHOD §11): truncated backpropagation through
//! time over the corpus's chunks in order, the hidden state carried from one
//! chunk to the next and reset at every epoch and evaluation; Adam with the
//! global gradient norm clipped; the learning rate decayed per epoch; after
//! every update, with a quantizer, the float gate matrices clipped to
//! [−1, 1] (METHOD §10). Evaluation gives bits per character: the mean
//! cross-entropy in nats over every target of a part, divided by ln 2.
//!
//! Every epoch ends with a checkpoint (written atomically): the parameters,
//! Adam's moments, batch norm's running averages and the records; a run
//! started with the same settings and checkpoint continues after the last
//! completed epoch, and computes the same numbers as an uninterrupted one
//! (the quantizers' warm starts restart cold after a resume, as in
//! qgrad-models; the other state is all in the file).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use qgrad_data::{TextSplit, TokenChunks};
use qgrad_ops::LstmState;
use qgrad_optim::{adam::EXP_AVG_SQ, Optimizer, OptimizerConfig};
use serde::{Deserialize, Serialize};

use crate::config::LstmConfig;
use crate::error::{LstmError, Result};
use crate::file::RUNNING_TENSORS;
use crate::model::{CharLstm, GateWeights, Mode, RunningStats, GATE_MATRICES};
use crate::quantize::{gate_weights, GateQuantizer, QuantizedGates};

/// The metadata key of a checkpoint's JSON header.
pub const HEADER_KEY: &str = "qgrad.lstm";
/// The metadata key of a checkpoint's CRC-32 (of the header and the tensor
/// bytes), hex.
pub const CHECKSUM_KEY: &str = "qgrad.lstm.crc32";
/// The checkpoint layout version.
pub const CHECKPOINT_VERSION: u32 = 1;

/// What one epoch measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 0-based epoch.
    pub epoch: usize,
    /// Its learning rate.
    pub lr: f64,
    /// Bits per character of the training steps (training-mode forward).
    pub train_bpc: f64,
    /// Bits per character on the validation part after the epoch.
    pub valid_bpc: f64,
    /// Mean global gradient norm before clipping.
    pub grad_norm_mean: f64,
    /// Largest global gradient norm before clipping.
    pub grad_norm_max: f64,
    /// Fraction of steps whose gradient was clipped.
    pub clipped: f64,
    /// Wall-clock seconds of the training steps.
    pub seconds: f64,
    /// Training characters per second.
    pub chars_per_second: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Header {
    format_version: u32,
    config: LstmConfig,
    vocab: Vec<u8>,
    optimizer_steps: u64,
    records: Vec<EpochRecord>,
    grad_norms: Vec<f32>,
}

/// A character-LSTM run: the model, its optimizer and quantizer, and what
/// it has measured so far.
pub struct LstmRun {
    /// The model.
    pub model: CharLstm,
    optimizer: Box<dyn Optimizer>,
    quantizer: Option<GateQuantizer>,
    /// The corpus's vocabulary (token `t` is byte `vocab[t]`).
    pub vocab: Vec<u8>,
    /// One record per completed epoch.
    pub records: Vec<EpochRecord>,
    /// The global gradient norm of every training step, before clipping.
    pub grad_norms: Vec<f32>,
    /// The epoch a checkpoint resumed from, if any.
    pub resumed_from: Option<usize>,
}

impl std::fmt::Debug for LstmRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LstmRun")
            .field("config", &self.model.config)
            .field("epochs_done", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// What one training step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOutcome {
    /// Mean cross-entropy (nats) of the chunk.
    pub loss: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradient was clipped.
    pub clipped: bool,
}

/// Options of [`LstmRun::train`] that do not change its numbers.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Checkpoint after every epoch here, and resume from it.
    pub checkpoint: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

fn adam() -> OptimizerConfig {
    OptimizerConfig::Adam {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    }
}

impl LstmRun {
    /// A fresh run for a corpus with vocabulary `vocab`.
    pub fn new(config: &LstmConfig, vocab: &[u8], device: &Device) -> Result<Self> {
        let model = CharLstm::new(config, vocab.len(), device)?;
        let optimizer = adam().build(model.params())?;
        let quantizer = match config.weights {
            Some(m) => Some(GateQuantizer::new(m, config.per_channel, config.seed)?),
            None => None,
        };
        Ok(LstmRun {
            model,
            optimizer,
            quantizer,
            vocab: vocab.to_vec(),
            records: Vec::new(),
            grad_norms: Vec::new(),
            resumed_from: None,
        })
    }

    /// Resumes from `checkpoint` when it exists (it must hold this run:
    /// same settings but the epoch count, same vocabulary), else a fresh run.
    pub fn resume_or_new(
        config: &LstmConfig,
        vocab: &[u8],
        device: &Device,
        checkpoint: Option<&Path>,
    ) -> Result<Self> {
        match checkpoint {
            Some(path) if path.exists() => {
                let mut run = LstmRun::load(path, device)?;
                if !run.model.config.same_run(config) {
                    return Err(LstmError::checkpoint(
                        path,
                        format!(
                            "it holds a run with other settings ({}); use another checkpoint",
                            serde_json::to_string(&run.model.config).unwrap_or_default()
                        ),
                    ));
                }
                if run.vocab != vocab {
                    return Err(LstmError::checkpoint(
                        path,
                        "it was trained on a corpus with another vocabulary",
                    ));
                }
                run.model.config.epochs = config.epochs;
                run.resumed_from = Some(run.records.len());
                Ok(run)
            }
            _ => LstmRun::new(config, vocab, device),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LstmConfig {
        &self.model.config
    }

    fn second_moment(&self, name: &str) -> Option<Tensor> {
        self.optimizer.state(name, EXP_AVG_SQ).cloned()
    }

    /// The quantized gate tensors as evaluation and export use them (a
    /// function of the weights and Adam's second moment), or `None` for a
    /// float model.
    pub fn quantized_gates(&mut self) -> Result<Option<Vec<QuantizedGates>>> {
        let v: HashMap<String, Tensor> = GATE_MATRICES
            .iter()
            .filter_map(|n| self.second_moment(n).map(|t| (n.to_string(), t)))
            .collect();
        match self.quantizer.as_mut() {
            None => Ok(None),
            Some(q) => Ok(Some(q.quantize_model(
                &self.model,
                &|n| v.get(n).cloned(),
                false,
            )?)),
        }
    }

    /// The gate matrices evaluation multiplies with.
    pub fn eval_weights(&mut self) -> Result<GateWeights> {
        match self.quantized_gates()? {
            None => self.model.float_gate_weights(),
            Some(q) => gate_weights(&self.model, &q, false),
        }
    }

    /// Bits per character of `chunks` (evaluation mode, state carried).
    pub fn bpc(&mut self, chunks: &TokenChunks) -> Result<f64> {
        let weights = self.eval_weights()?;
        bpc_with(&self.model, &weights, chunks)
    }

    /// Trains from the first epoch not yet done up to the configured count,
    /// checkpointing after each. Returns the records of the epochs run now.
    pub fn train(&mut self, split: &TextSplit, options: &TrainOptions) -> Result<&[EpochRecord]> {
        self.train_observed(split, options, &mut |_| {})
    }

    /// [`LstmRun::train`], calling `on_epoch` with each epoch's record once
    /// it is done (after the validation pass and the checkpoint), so that a
    /// caller can report progress as it happens.
    pub fn train_observed(
        &mut self,
        split: &TextSplit,
        options: &TrainOptions,
        on_epoch: &mut dyn FnMut(&EpochRecord),
    ) -> Result<&[EpochRecord]> {
        let c = self.config().clone();
        if split.train.batch != c.batch || split.train.seq_len != c.seq_len {
            return Err(LstmError::Config(format!(
                "the corpus is split into {} × {} chunks, the run trains on {} × {}",
                split.train.batch, split.train.seq_len, c.batch, c.seq_len
            )));
        }
        let first = self.records.len();
        for epoch in first..c.epochs {
            let record = self.train_epoch(epoch, &split.train, &split.valid, options.progress)?;
            self.records.push(record);
            if let Some(path) = &options.checkpoint {
                self.save(path)?;
            }
            if let Some(record) = self.records.last() {
                on_epoch(record);
            }
        }
        Ok(&self.records[first.min(self.records.len())..])
    }

    fn train_epoch(
        &mut self,
        epoch: usize,
        train: &TokenChunks,
        valid: &TokenChunks,
        progress: bool,
    ) -> Result<EpochRecord> {
        let c = self.config().clone();
        let (steps, batch) = (c.seq_len, c.batch);
        let lr = c.lr_at(epoch);
        let n = c.batches_per_epoch(train.len());
        if let Some(q) = self.quantizer.as_mut() {
            q.start_epoch(epoch);
        }
        let bar = progress.then(|| {
            let bar = indicatif::ProgressBar::new(n as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {msg} ({eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("{} epoch {}/{}", c.label(), epoch + 1, c.epochs));
            bar
        });
        let start = Instant::now();
        let mut state: Option<LstmState> = None;
        let (mut loss_sum, mut clipped) = (0f64, 0usize);
        let mut norms = Vec::with_capacity(n);
        for k in 0..n {
            let (inputs, targets) = train.chunk(k);
            let step = self.train_step(inputs, targets, &mut state, epoch, k)?;
            if step.clipped {
                clipped += 1;
            }
            let (loss_value, norm) = (step.loss, step.grad_norm);
            loss_sum += loss_value;
            norms.push(norm as f32);
            if let Some(bar) = &bar {
                bar.set_message(format!(
                    "{:.3} bpc",
                    loss_sum / (k + 1) as f64 / std::f64::consts::LN_2
                ));
                bar.inc(1);
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let valid_bpc = self.bpc(valid)?;
        let record = EpochRecord {
            epoch,
            lr,
            train_bpc: loss_sum / n as f64 / std::f64::consts::LN_2,
            valid_bpc,
            grad_norm_mean: norms.iter().map(|&x| f64::from(x)).sum::<f64>() / n as f64,
            grad_norm_max: norms.iter().fold(0f64, |m, &x| m.max(f64::from(x))),
            clipped: clipped as f64 / n as f64,
            seconds,
            chars_per_second: (n * steps * batch) as f64 / seconds.max(1e-9),
        };
        self.grad_norms.extend(norms);
        Ok(record)
    }

    /// One training step on a chunk (`batch × seq_len` tokens, row-major)
    /// from `state`, which it replaces with the state after the chunk: the
    /// forward pass with `Ŵ = Q(W)`, the backward pass, the gradient-norm
    /// clip, Adam at epoch `epoch`'s rate, the clip of `W` to [−1, 1] and
    /// batch norm's running averages. `step` only labels a divergence.
    pub fn train_step(
        &mut self,
        inputs: &[u16],
        targets: &[u16],
        state: &mut Option<LstmState>,
        epoch: usize,
        step: usize,
    ) -> Result<StepOutcome> {
        let c = &self.model.config;
        let (steps, batch, lr, clip) = (c.seq_len, c.batch, c.lr_at(epoch), c.grad_clip);
        let x = self.model.time_major(inputs, steps, batch)?;
        let y = self.model.time_major(targets, steps, batch)?;
        let weights = match self.quantizer.as_mut() {
            None => self.model.float_gate_weights()?,
            Some(q) => {
                let v: HashMap<String, Tensor> = GATE_MATRICES
                    .iter()
                    .filter_map(|n| {
                        self.optimizer
                            .state(n, EXP_AVG_SQ)
                            .map(|t| (n.to_string(), t.clone()))
                    })
                    .collect();
                let qs = q.quantize_model(&self.model, &|n| v.get(n).cloned(), true)?;
                gate_weights(&self.model, &qs, true)?
            }
        };
        let fwd = self
            .model
            .forward(&weights, &x, steps, batch, state.as_ref(), Mode::Train)?;
        let loss = candle_nn::loss::cross_entropy(&fwd.logits, &y)?;
        let loss_value = f64::from(loss.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(LstmError::Diverged {
                epoch,
                step,
                what: "loss",
            });
        }
        let mut grads = loss.backward()?;
        // The norm in f64: an unnormalised binary LSTM's gradient explodes
        // through time past what a sum of f32 squares can hold (1e19 per
        // element) while every element is still a finite f32; clipping then
        // works as it should. A non-finite element is a divergence.
        let mut sq = 0f64;
        let mut finite = true;
        for (_, var) in self.model.params() {
            if let Some(g) = grads.get(var) {
                for x in g.flatten_all()?.to_vec1::<f32>()? {
                    finite &= x.is_finite();
                    sq += f64::from(x) * f64::from(x);
                }
            }
        }
        let norm = sq.sqrt();
        if !(finite && norm.is_finite()) {
            return Err(LstmError::Diverged {
                epoch,
                step,
                what: "gradient",
            });
        }
        let clipped = norm > clip;
        if clipped {
            let scale = clip / norm;
            for (_, var) in self.model.params() {
                if let Some(g) = grads.get(var) {
                    let g = (g * scale)?;
                    grads.insert(var, g);
                }
            }
        }
        self.optimizer.step(&grads, lr, &[])?;
        if self.quantizer.is_some() {
            for name in GATE_MATRICES {
                let var = self.model.param(name)?;
                var.set(&var.as_tensor().clamp(-1f32, 1f32)?)?;
            }
        }
        if let Some(s) = &fwd.stats {
            self.model.update_running(s);
        }
        *state = Some(fwd.last);
        Ok(StepOutcome {
            loss: loss_value,
            grad_norm: norm,
            clipped,
        })
    }

    /// Writes the run to `path` atomically (module docs).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, var) in self.model.params() {
            tensors.push((name.clone(), var.as_tensor().clone()));
            for slot in self.optimizer.slots() {
                let t = self.optimizer.state(name, slot).ok_or_else(|| {
                    LstmError::checkpoint(path, format!("the optimizer has no {slot} of '{name}'"))
                })?;
                tensors.push((format!("{name}.{slot}"), t.clone()));
            }
        }
        if let Some(r) = &self.model.running {
            let g4 = 4 * self.model.config.hidden;
            for (name, v) in RUNNING_TENSORS
                .iter()
                .zip([&r.x_mean, &r.x_var, &r.h_mean, &r.h_var])
            {
                tensors.push((
                    name.to_string(),
                    Tensor::from_slice(v, (r.steps, g4), &Device::Cpu)?,
                ));
            }
        }
        let header = Header {
            format_version: CHECKPOINT_VERSION,
            config: self.model.config.clone(),
            vocab: self.vocab.clone(),
            optimizer_steps: self.optimizer.steps(),
            records: self.records.clone(),
            grad_norms: self.grad_norms.clone(),
        };
        let json = serde_json::to_string(&header)
            .map_err(|e| LstmError::checkpoint(path, format!("cannot encode the header: {e}")))?;
        let encode = |metadata: HashMap<String, String>| {
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
                .map_err(|e| LstmError::checkpoint(path, format!("cannot encode: {e}")))
        };
        // The checksum covers the header and the tensor bytes; the tensor
        // bytes do not move when the metadata grows by the checksum.
        let unsummed = encode(HashMap::from([(HEADER_KEY.to_string(), json.clone())]))?;
        let sum = content_checksum(&json, tensor_bytes(&unsummed).unwrap_or_default());
        let bytes = encode(HashMap::from([
            (HEADER_KEY.to_string(), json),
            (CHECKSUM_KEY.to_string(), format!("{sum:08x}")),
        ]))?;
        qgrad_accum::write_atomic(path, &bytes)
            .map_err(|e| LstmError::checkpoint(path, e.to_string()))
    }

    /// Reads a run written by [`save`](Self::save).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| LstmError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let bad = |m: String| LstmError::checkpoint(path, m);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(HEADER_KEY))
            .ok_or_else(|| bad("not a qgrad LSTM checkpoint (no header)".into()))?;
        let stored = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CHECKSUM_KEY))
            .ok_or_else(|| bad("it has no checksum".into()))?;
        let sum = content_checksum(json, tensor_bytes(&bytes).unwrap_or_default());
        if *stored != format!("{sum:08x}") {
            return Err(bad(format!(
                "checksum mismatch (stored {stored}, computed {sum:08x}): the file is corrupt"
            )));
        }
        let header: Header =
            serde_json::from_str(json).map_err(|e| bad(format!("unreadable header: {e}")))?;
        if header.format_version != CHECKPOINT_VERSION {
            return Err(bad(format!(
                "layout version {} (this build reads {CHECKPOINT_VERSION})",
                header.format_version
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad(format!("unreadable tensors: {e}")))?;
        let mut run = LstmRun::new(&header.config, &header.vocab, device)
            .map_err(|e| bad(format!("its settings do not build a model: {e}")))?;
        let missing = |n: &str| bad(format!("the tensor '{n}' is missing"));
        for (name, _) in run.model.params().to_vec() {
            let t = tensors.get(&name).ok_or_else(|| missing(&name))?;
            run.model
                .set_param(&name, t)
                .map_err(|e| bad(e.to_string()))?;
            for slot in run.optimizer.slots() {
                let key = format!("{name}.{slot}");
                let t = tensors.get(&key).ok_or_else(|| missing(&key))?;
                run.optimizer
                    .set_state(&name, slot, t)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        run.optimizer.set_steps(header.optimizer_steps);
        if let Some(r) = run.model.running.as_mut() {
            let read = |name: &str| -> Result<Vec<f32>> {
                let t = tensors.get(name).ok_or_else(|| missing(name))?;
                let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if v.len() != r.x_mean.len() {
                    return Err(bad(format!("'{name}' has {} values", v.len())));
                }
                Ok(v)
            };
            *r = RunningStats {
                steps: r.steps,
                x_mean: read(RUNNING_TENSORS[0])?,
                x_var: read(RUNNING_TENSORS[1])?,
                h_mean: read(RUNNING_TENSORS[2])?,
                h_var: read(RUNNING_TENSORS[3])?,
            };
        }
        for v in run.model.params().iter().map(|(_, v)| v) {
            let finite = v
                .as_tensor()
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            if !finite {
                return Err(bad("a parameter holds NaN or infinity".into()));
            }
        }
        run.records = header.records;
        run.grad_norms = header.grad_norms;
        Ok(run)
    }
}

/// The tensor bytes of a safetensors file (after its JSON header).
fn tensor_bytes(file: &[u8]) -> Option<&[u8]> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?);
    file.get(8usize.checked_add(usize::try_from(n).ok()?)?..)
}

fn content_checksum(header: &str, tensors: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(header.as_bytes());
    h.update(tensors);
    h.finalize()
}

/// Bits per character of `chunks` with `weights` (evaluation mode, the
/// state carried from chunk to chunk).
pub fn bpc_with(model: &CharLstm, weights: &GateWeights, chunks: &TokenChunks) -> Result<f64> {
    let (steps, batch) = (chunks.seq_len, chunks.batch);
    let mut state: Option<LstmState> = None;
    let (mut sum, mut count) = (0f64, 0usize);
    for k in 0..chunks.len() {
        let (inputs, targets) = chunks.chunk(k);
        let x = model.time_major(inputs, steps, batch)?;
        let y = model.time_major(targets, steps, batch)?;
        let fwd = model.forward(
            weights,
            &x,
            steps,
            batch,
            state.as_ref(),
            Mode::Eval { start_step: 0 },
        )?;
        let ce = candle_nn::loss::cross_entropy(&fwd.logits, &y)?.to_scalar::<f32>()?;
        sum += f64::from(ce) * (steps * batch) as f64;
        count += steps * batch;
        state = Some(fwd.last);
    }
    if count == 0 {
        return Err(LstmError::Config("no chunks to evaluate".into()));
    }
    Ok(sum / count as f64 / std::f64::consts::LN_2)
}
