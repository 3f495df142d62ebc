//! Data-parallel training with quantized gradients (METHOD §12), as a hook
//! of the training loop: every rank holds the whole model and computes the
//! gradient of its shard of each mini-batch (stage 0); the gradients go
//! through [`qgrad_collective::exchange`](fn@qgrad_collective::exchange) (stage 3: an f32 all-reduce, or
//! stochastic m-bit codes per bucket through an all-gather), and every rank
//! applies the same averaged gradient. The accumulated-gradient bookkeeping
//! of METHOD §1 runs after stage 3, so `A` sums the averaged gradient; a
//! loss-aware quantizer (§10) hook before this one trains the quantized
//! weights as on one process.
//!
//! # Decisions
//!
//! * Shards: rank `r` of `N` computes images `⌊r·B/N⌋ .. ⌊(r+1)·B/N⌋` of a
//!   mini-batch of `B`; the exchange weights each rank by its shard size, so
//!   the average is the gradient of the batch's mean loss. A batch smaller
//!   than `N` is an error.
//! * Randomness: the stochastic rounding of rank `r` in epoch `e` draws
//!   from one ChaCha8 stream, seeded by the run's seed and numbered by
//!   `(e, r)`. Nothing random is carried across epochs, so a resumed run is
//!   bit-identical, and a run resumed on another number of ranks just uses
//!   other streams.
//! * One rank with f32 gradients skips the exchange (nothing to send; the
//!   step is the single-process step bit for bit).
//! * At the first step the ranks check that they agree: the training
//!   configuration (less the checkpoint folder and the progress bar), the
//!   exchange, the network, the starting epoch and a CRC-32 of the starting
//!   parameters. A rank that did not find the checkpoint the others resumed
//!   from fails that check, on every rank.
//! * Batch norm normalises each shard by its own statistics in training
//!   (as PyTorch's DistributedDataParallel without SyncBatchNorm); after
//!   every step the ranks average their running statistics (an all-gather,
//!   summed in rank order), so every rank holds the same buffers. Those
//!   bytes count in the step's `bytes_sent`.
//! * Only rank 0 writes checkpoints; the hook's checkpoint state records the
//!   number of ranks, so a resumed run can say what it continued from.
//! * Timing: a step's compute time runs from this hook's forward-weights
//!   stage to its gradient stage (forward and backward), its exchange time
//!   over the exchange; both are kept per step with the loss.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use qgrad_collective::{
    agree, exchange, mean_in_rank_order, Collective, ExchangeBuffers, GradientExchange, Traffic,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::net::WeightOverrides;
use crate::train::{TrainConfig, TrainHook, TrainState};

/// One step as this rank saw it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The epoch (0-based).
    pub epoch: usize,
    /// The step within the epoch.
    pub step: usize,
    /// The mean training loss of the whole mini-batch (all ranks).
    pub loss: f32,
    /// Forward and backward of this rank's shard, seconds.
    pub compute_seconds: f64,
    /// The exchange (quantize, send, decode, average), seconds.
    pub exchange_seconds: f64,
    /// Bytes this rank passed to the collective in this step (counted at
    /// the call).
    pub bytes_sent: u64,
    /// Of the exchange: encoding this rank's gradient, seconds.
    #[serde(default)]
    pub encode_seconds: f64,
    /// Of the exchange: decoding and averaging all messages, seconds.
    #[serde(default)]
    pub decode_seconds: f64,
}

/// The hook's state in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    ranks: usize,
    exchange: GradientExchange,
    /// The steps of the epochs before (loss curves survive a resume).
    steps: Vec<StepRecord>,
}

/// The data-parallel stage of one rank (module docs).
pub struct DataParallelHook<'g> {
    group: &'g mut dyn Collective,
    exchange: GradientExchange,
    seed: u64,
    /// The configuration the ranks must agree on, until they have.
    shared_config: Option<String>,
    rng: Option<(usize, ChaCha8Rng)>,
    buffers: ExchangeBuffers,
    host: Vec<Vec<f32>>,
    shard_len: usize,
    step_started: Option<Instant>,
    /// Every step of the run on this rank (a resumed run: from the start,
    /// the earlier epochs' steps coming from the checkpoint).
    pub steps: Vec<StepRecord>,
    checkpoint_ranks: Option<usize>,
}

impl std::fmt::Debug for DataParallelHook<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallelHook")
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("exchange", &self.exchange)
            .finish()
    }
}

/// The stochastic-rounding stream of `rank` in `epoch` (module docs).
pub fn rank_rng(seed: u64, epoch: usize, rank: usize) -> ChaCha8Rng {
    // A fixed tweak keeps these streams apart from the data streams that
    // `epoch_rng` derives from the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5147_5241_4451_4e54);
    rng.set_stream(((epoch as u64) << 24) | rank as u64);
    rng
}

impl<'g> DataParallelHook<'g> {
    /// The hook of this rank of `group` for a run of `config`. The ranks
    /// check that they agree ([`DataParallelHook::agree`]) at the first
    /// step, or when the caller asks earlier.
    pub fn new(
        group: &'g mut dyn Collective,
        exchange: GradientExchange,
        config: &TrainConfig,
    ) -> Result<Self> {
        exchange
            .validate()
            .map_err(|e| ModelsError::Config(e.to_string()))?;
        if config.batch_size < group.size() {
            return Err(ModelsError::Config(format!(
                "a batch of {} images cannot be split over {} ranks",
                config.batch_size,
                group.size()
            )));
        }
        let mut shared = config.clone();
        shared.checkpoint_dir = None;
        shared.progress = false;
        let shared =
            serde_json::to_string(&shared).map_err(|e| ModelsError::Other(e.to_string()))?;
        Ok(Self {
            group,
            exchange,
            seed: config.seed,
            shared_config: Some(shared),
            rng: None,
            buffers: ExchangeBuffers::default(),
            host: Vec::new(),
            shard_len: 0,
            step_started: None,
            steps: Vec::new(),
            checkpoint_ranks: None,
        })
    }

    /// Checks, once, that every rank runs the same configuration from the
    /// same state (module docs); the same error on every rank otherwise.
    pub fn agree(&mut self, state: &TrainState) -> Result<()> {
        let Some(shared) = self.shared_config.take() else {
            return Ok(());
        };
        let mut crc = crc32fast::Hasher::new();
        for (_, var) in state.network.parameters() {
            for v in var.flatten_all()?.to_vec1::<f32>()? {
                crc.update(&v.to_bits().to_le_bytes());
            }
        }
        let description = format!(
            "network {}, {} ranks, gradients {}, starting at epoch {} with parameters of CRC-32 {:08x}, training {shared}",
            state.network.arch,
            self.group.size(),
            self.exchange.describe(),
            state.epoch,
            crc.finalize(),
        );
        agree(&mut *self.group, &description)?;
        Ok(())
    }

    /// What this rank has sent.
    pub fn traffic(&self) -> Traffic {
        self.group.traffic()
    }

    /// The number of ranks that wrote the checkpoint this run resumed from.
    pub fn resumed_from_ranks(&self) -> Option<usize> {
        self.checkpoint_ranks
    }
}

impl TrainHook for DataParallelHook<'_> {
    fn name(&self) -> &'static str {
        "data-parallel"
    }

    fn batch_shard(&mut self, batch: std::ops::Range<usize>) -> Result<std::ops::Range<usize>> {
        let (n, r) = (self.group.size(), self.group.rank());
        let len = batch.len();
        if len < n {
            return Err(ModelsError::Config(format!(
                "a batch of {len} images cannot be split over {n} ranks"
            )));
        }
        let shard = batch.start + r * len / n..batch.start + (r + 1) * len / n;
        self.shard_len = shard.len();
        Ok(shard)
    }

    fn writes_checkpoints(&self) -> bool {
        self.group.rank() == 0
    }

    fn forward_weights(
        &mut self,
        state: &TrainState,
        _overrides: &mut WeightOverrides,
    ) -> Result<()> {
        self.agree(state)?;
        self.step_started = Some(Instant::now());
        Ok(())
    }

    fn transform_gradients(
        &mut self,
        grads: &mut GradStore,
        loss: &mut Tensor,
        state: &TrainState,
    ) -> Result<()> {
        let compute_seconds = self
            .step_started
            .take()
            .map_or(0.0, |t| t.elapsed().as_secs_f64());
        let epoch = state.epoch;
        let step = self
            .steps
            .iter()
            .rev()
            .take_while(|s| s.epoch == epoch)
            .count();
        let start = Instant::now();
        let sent_before = self.group.traffic().bytes_sent;
        let single = self.group.size() == 1 && self.exchange == GradientExchange::Float;
        let mean_loss = if single {
            loss.to_scalar::<f32>()?
        } else {
            let params = state.network.parameters();
            self.host.resize(params.len(), Vec::new());
            for ((_, var), host) in params.iter().zip(self.host.iter_mut()) {
                host.clear();
                match grads.get(var.as_tensor()) {
                    Some(g) => host.extend(g.flatten_all()?.to_vec1::<f32>()?),
                    // A parameter outside the graph: no gradient on any rank.
                    None => host.resize(var.elem_count(), 0.0),
                }
            }
            let rng = match &mut self.rng {
                Some((e, rng)) if *e == epoch => rng,
                slot => {
                    *slot = Some((epoch, rank_rng(self.seed, epoch, self.group.rank())));
                    &mut slot.as_mut().unwrap().1
                }
            };
            let local = loss.to_scalar::<f32>()?;
            let mean = exchange(
                &mut *self.group,
                &self.exchange,
                &mut self.host,
                local,
                self.shard_len as f32,
                rng,
                &mut self.buffers,
            )?;
            for ((_, var), host) in params.iter().zip(&self.host) {
                let g = Tensor::from_slice(host, var.dims(), var.device())?;
                grads.insert(var.as_tensor(), g);
            }
            *loss = Tensor::new(mean, loss.device())?;
            mean
        };
        self.steps.push(StepRecord {
            epoch,
            step,
            loss: mean_loss,
            compute_seconds,
            exchange_seconds: start.elapsed().as_secs_f64(),
            bytes_sent: self.group.traffic().bytes_sent - sent_before,
            // Zero when the exchange was skipped (never called).
            encode_seconds: self.buffers.encode_seconds,
            decode_seconds: self.buffers.decode_seconds,
        });
        Ok(())
    }

    fn after_update(&mut self, state: &mut TrainState) -> Result<()> {
        if self.group.size() == 1 {
            return Ok(());
        }
        // Batch norm's running statistics come from each rank's own shard:
        // average them (in rank order) so that every rank holds the same
        // buffers.
        let buffers = state.network.buffers_to_host()?;
        if buffers.is_empty() {
            return Ok(());
        }
        let sent_before = self.group.traffic().bytes_sent;
        let mut values: Vec<f32> = buffers
            .iter()
            .flat_map(|b| b.values.iter().copied())
            .collect();
        mean_in_rank_order(&mut *self.group, &mut values)?;
        let mut averaged = buffers;
        let mut rest = values.as_slice();
        for b in averaged.iter_mut() {
            let (mine, tail) = rest.split_at(b.values.len());
            b.values.copy_from_slice(mine);
            rest = tail;
        }
        state.network.set_from_host(&averaged)?;
        if let Some(last) = self.steps.last_mut() {
            last.bytes_sent += self.group.traffic().bytes_sent - sent_before;
        }
        Ok(())
    }

    fn checkpoint_state(&self) -> Result<Option<String>> {
        let saved = Saved {
            ranks: self.group.size(),
            exchange: self.exchange,
            steps: self.steps.clone(),
        };
        serde_json::to_string(&saved)
            .map(Some)
            .map_err(|e| ModelsError::Other(e.to_string()))
    }

    fn restore_state(&mut self, saved: &str, _state: &TrainState) -> Result<()> {
        let saved: Saved = serde_json::from_str(saved).map_err(|e| {
            ModelsError::Config(format!("the data-parallel state of the checkpoint: {e}"))
        })?;
        self.checkpoint_ranks = Some(saved.ranks);
        self.steps = saved.steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use candle_core::Device;
    use qgrad_collective::{StochasticQuantizer, ThreadGroup};

    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::data::Dataset;
    use crate::train::train;
    use crate::Arch;

    fn mini() -> (Dataset, Dataset) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train, test) = load_mnist(&dir).unwrap();
        (train, test.take(200))
    }

    fn config(batch: usize, batches: usize, epochs: usize) -> TrainConfig {
        let mut c = TrainConfig::default_for(Arch::Lenet300100);
        c.epochs = epochs;
        c.batch_size = batch;
        c.max_batches_per_epoch = Some(batches);
        c.progress = false;
        c.seed = 5;
        c
    }

    type Snapshot = Vec<(String, Vec<f32>)>;
    /// One rank's snapshot, steps and the ranks it resumed from, or its error.
    type RankRun = std::result::Result<(Snapshot, Vec<StepRecord>, Option<usize>), String>;

    fn snapshot(state: &TrainState) -> Snapshot {
        let mut out: Snapshot = state
            .network
            .to_host()
            .unwrap()
            .into_iter()
            .map(|t| (t.name, t.values))
            .collect();
        for (name, _, values) in state.accum.to_host().unwrap() {
            out.push((format!("{name}.accgrad"), values));
        }
        out
    }

    /// Trains `config` on `n` ranks (threads); per rank: its snapshot, the
    /// hook's steps and what it resumed from, or the error.
    fn on_ranks(n: usize, exchange: GradientExchange, config: &TrainConfig) -> Vec<RankRun> {
        on_ranks_of(Arch::Lenet300100, n, exchange, config)
    }

    fn on_ranks_of(
        arch: Arch,
        n: usize,
        exchange: GradientExchange,
        config: &TrainConfig,
    ) -> Vec<RankRun> {
        let (train_set, test_set) = mini();
        let ranks = ThreadGroup::ranks(n, Duration::from_secs(60));
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|mut rank| {
                    let (train_set, test_set) = (&train_set, &test_set);
                    s.spawn(move || -> std::result::Result<_, String> {
                        let mut run = || -> Result<_> {
                            let (mut state, _) =
                                TrainState::resume_or_new(arch, &Device::Cpu, config)?;
                            let mut hook = DataParallelHook::new(&mut rank, exchange, config)?;
                            train(&mut state, train_set, test_set, config, &mut [&mut hook])?;
                            Ok((
                                snapshot(&state),
                                hook.steps.clone(),
                                hook.resumed_from_ranks(),
                            ))
                        };
                        run().map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn single(config: &TrainConfig) -> Snapshot {
        let (train_set, test_set) = mini();
        let mut state = TrainState::new(Arch::Lenet300100, &Device::Cpu, config).unwrap();
        train(&mut state, &train_set, &test_set, config, &mut []).unwrap();
        snapshot(&state)
    }

    #[test]
    fn simulated_ranks_without_quantization_equal_one_worker_on_the_whole_batch() {
        // 31 images: shards of 15 and 16 (weighted by size) on two ranks,
        // 10, 10 and 11 on three.
        let config = config(31, 4, 1);
        let one = single(&config);
        for n in [2usize, 3] {
            let runs = on_ranks(n, GradientExchange::Float, &config);
            let first = runs[0].as_ref().unwrap();
            for (name_values, reference) in first.0.iter().zip(&one) {
                assert_eq!(name_values.0, reference.0);
                let scale = reference.1.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                let worst = name_values
                    .1
                    .iter()
                    .zip(&reference.1)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    worst <= 1e-5 * scale,
                    "{n} ranks, {}: {worst} (scale {scale})",
                    reference.0
                );
            }
            for other in &runs[1..] {
                assert_eq!(
                    other.as_ref().unwrap().0,
                    first.0,
                    "every rank holds the same weights"
                );
            }
        }
    }

    #[test]
    fn quantized_runs_are_bit_identical_and_resume_bit_identically() {
        let how = GradientExchange::Quantized(StochasticQuantizer::new(2, 512, Some(2.5)).unwrap());
        let whole = config(32, 3, 2);
        let a = on_ranks(2, how, &whole);
        let b = on_ranks(2, how, &whole);
        let a0 = a[0].as_ref().unwrap();
        assert_eq!(
            a0.0,
            b[0].as_ref().unwrap().0,
            "a rerun gives the same bits"
        );
        assert_eq!(
            a0.0,
            a[1].as_ref().unwrap().0,
            "both ranks hold the same weights"
        );
        assert_eq!(a0.1.len(), 6);
        assert!(a0.1.iter().all(|s| s.loss.is_finite()));
        // Stop after one epoch, then resume on the same two ranks.
        let dir = tempfile::tempdir().unwrap();
        let mut first = config(32, 3, 1);
        first.checkpoint_dir = Some(dir.path().to_path_buf());
        let mut rest = first.clone();
        rest.epochs = 2;
        on_ranks(2, how, &first)[0].as_ref().unwrap();
        let resumed = on_ranks(2, how, &rest);
        let r0 = resumed[0].as_ref().unwrap();
        assert_eq!(r0.0, a0.0, "resumed after epoch 1 = uninterrupted");
        assert_eq!(r0.2, Some(2));
        // The loss curve carries over the resume (timings differ).
        assert_eq!(
            r0.1.iter().map(|s| s.loss).collect::<Vec<_>>(),
            a0.1.iter().map(|s| s.loss).collect::<Vec<_>>()
        );
        // The same checkpoint resumed on three ranks says it came from two.
        let mut three = rest.clone();
        three.epochs = 3;
        let dir3 = tempfile::tempdir().unwrap();
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), dir3.path().join(f.file_name())).unwrap();
        }
        three.checkpoint_dir = Some(dir3.path().to_path_buf());
        let on_three = on_ranks(3, how, &three);
        assert_eq!(on_three[2].as_ref().unwrap().2, Some(2));
    }

    #[test]
    fn batch_norm_statistics_agree_across_ranks() {
        let bn = Arch::Mlp {
            width: 32,
            depth: 1,
            batch_norm: true,
        };
        let how = GradientExchange::Quantized(StochasticQuantizer::new(3, 64, None).unwrap());
        let runs = on_ranks_of(bn, 3, how, &config(30, 3, 1));
        let first = runs[0].as_ref().unwrap();
        assert!(
            first.0.iter().any(|(name, _)| name.contains("running")),
            "{:?}",
            first.0.iter().map(|t| &t.0).collect::<Vec<_>>()
        );
        for other in &runs[1..] {
            assert_eq!(
                other.as_ref().unwrap().0,
                first.0,
                "parameters and buffers agree"
            );
        }
    }

    #[test]
    fn ranks_started_differently_all_stop_with_the_same_error() {
        let ranks = ThreadGroup::ranks(2, Duration::from_secs(30));
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|mut rank| {
                    s.spawn(move || {
                        let mut c = config(32, 1, 1);
                        if qgrad_collective::Collective::rank(&rank) == 1 {
                            c.lr = 0.5;
                        }
                        let state = TrainState::new(Arch::Lenet300100, &Device::Cpu, &c).unwrap();
                        DataParallelHook::new(&mut rank, GradientExchange::Float, &c)
                            .unwrap()
                            .agree(&state)
                            .unwrap_err()
                            .to_string()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            errors[0].contains("rank 1:") && errors[0].contains("\"lr\":0.5"),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains("rank 0:"), "{}", errors[1]);
    }
}
