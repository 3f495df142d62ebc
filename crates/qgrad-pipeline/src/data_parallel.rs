//! Data-parallel training with quantized gradients (METHOD §12) on any
//! [`Collective`]: MPI ranks, threads of one process, or one process. Float
//! weights, or weights quantized by a loss-aware method (§10) on every rank.
//!
//! Every rank holds the model and resumes from the same checkpoint folder
//! (shared between machines: only rank 0 writes it, atomically, after every
//! epoch). A run can resume on another number of ranks; the outcome says
//! which it continued from.

use std::time::Duration;

use candle_core::Device;
use qgrad_collective::{Collective, CollectiveError, GradientExchange, ThreadGroup, Traffic};
use qgrad_data::Dataset;
use qgrad_models::methods::{DataParallelHook, LossAwareHook, LossAwareOptions, StepRecord};
use qgrad_models::{Arch, TrainConfig, TrainHook, TrainState};
use sha2::{Digest, Sha256};

use crate::error::{Context, PipelineError, Result};
use crate::in_training::Start;
use crate::loss_aware::{run_loss_aware, LossAwareRun};
use crate::trained::train_float;

/// The weights every rank trains.
#[derive(Debug, Clone)]
pub enum ParallelWeights {
    /// Float weights.
    Float,
    /// Weights quantized by a loss-aware method (or a baseline) of §10.
    LossAware(LossAwareOptions),
}

/// One data-parallel run, the same on every rank.
#[derive(Debug, Clone)]
pub struct DataParallelRun {
    /// The network.
    pub arch: Arch,
    /// The training configuration (batch size = the global mini-batch;
    /// `checkpoint_dir`: the shared folder every rank resumes from).
    pub config: TrainConfig,
    /// The weights.
    pub weights: ParallelWeights,
    /// How gradients cross between ranks.
    pub exchange: GradientExchange,
    /// The training device of this rank.
    pub device: Device,
}

/// Where a resumed run continued from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Resumed {
    /// The epochs the checkpoint had finished.
    pub after_epoch: usize,
    /// The number of ranks that wrote it (`None`: a checkpoint of a run
    /// without data parallelism).
    pub from_ranks: Option<usize>,
}

/// A finished data-parallel run, as this rank saw it.
pub struct DataParallelOutcome {
    /// The trained state (the same on every rank).
    pub state: TrainState,
    /// The configuration it ran with (normalisation filled in).
    pub config: TrainConfig,
    /// The loss-aware quantizer, for the quantized weights and export.
    pub loss_aware: Option<LossAwareHook>,
    /// How gradients crossed.
    pub exchange: GradientExchange,
    /// Every step: the batch's mean loss and this rank's timings.
    pub steps: Vec<StepRecord>,
    /// What this rank passed to the collectives (the start-up check
    /// included).
    pub traffic: Traffic,
    /// Bytes this rank sends per step by the exchange's format.
    pub bytes_per_step: usize,
    /// Bytes of the f32 all-reduce of the same gradients.
    pub f32_bytes_per_step: usize,
    /// This rank and the number of ranks.
    pub rank: usize,
    /// The number of ranks.
    pub ranks: usize,
    /// The engine, in words.
    pub engine: String,
    /// Set when the run continued a checkpoint.
    pub resumed: Option<Resumed>,
    /// SHA-256 over every parameter, buffer and accumulated gradient, bit
    /// for bit: equal on every rank, and between `mpirun -np N` and `N`
    /// threads.
    pub digest: String,
}

/// SHA-256 of a state's parameters, buffers and accumulated gradients.
pub fn state_digest(state: &TrainState) -> Result<String> {
    let mut hash = Sha256::new();
    let tensors = state.network.to_host().runtime("cannot read the network")?;
    for t in tensors {
        hash.update(t.name.as_bytes());
        for v in t.values {
            hash.update(v.to_bits().to_le_bytes());
        }
    }
    for (name, _, values) in state.accum.to_host().runtime("cannot read A")? {
        hash.update(name.as_bytes());
        for v in values {
            hash.update(v.to_bits().to_le_bytes());
        }
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Trains `run` as this rank of `group`; `extra` hooks (progress printing)
/// run after the data-parallel one.
pub fn run_data_parallel(
    run: DataParallelRun,
    data: (&Dataset, &Dataset),
    group: &mut dyn Collective,
    extra: &mut [&mut dyn TrainHook],
) -> Result<DataParallelOutcome> {
    let DataParallelRun {
        arch,
        config,
        weights,
        exchange,
        device,
    } = run;
    let (rank, ranks, engine) = (group.rank(), group.size(), group.engine());
    let mut hook = DataParallelHook::new(group, exchange, &config)
        .map_err(|e| crate::error::training(e, "cannot start data-parallel training"))?;
    let (state, config, loss_aware, resumed_after) = {
        let mut hooks: Vec<&mut dyn TrainHook> = vec![&mut hook];
        hooks.extend(extra.iter_mut().map(|h| &mut **h as &mut dyn TrainHook));
        match weights {
            ParallelWeights::Float => {
                let mut resumed_after = None;
                let trained = train_float(arch, &config, &device, data, &mut hooks, |r| {
                    resumed_after = r;
                })?;
                (trained.state, trained.config, None, resumed_after)
            }
            ParallelWeights::LossAware(options) => {
                let run = LossAwareRun {
                    arch,
                    config,
                    options,
                    start: Start::Scratch,
                    device,
                };
                let outcome = run_loss_aware(run, data, &mut hooks)?;
                (
                    outcome.state,
                    outcome.config,
                    Some(outcome.hook),
                    outcome.resumed_after,
                )
            }
        }
    };
    let sizes: Vec<usize> = state
        .network
        .parameters()
        .iter()
        .map(|(_, v)| v.elem_count())
        .collect();
    Ok(DataParallelOutcome {
        digest: state_digest(&state)?,
        bytes_per_step: exchange.message_len(&sizes),
        f32_bytes_per_step: GradientExchange::Float.message_len(&sizes),
        resumed: resumed_after.map(|after_epoch| Resumed {
            after_epoch,
            from_ranks: hook.resumed_from_ranks(),
        }),
        exchange,
        steps: hook.steps.clone(),
        traffic: hook.traffic(),
        state,
        config,
        loss_aware,
        rank,
        ranks,
        engine,
    })
}

/// A rank that stopped only because another rank left or went silent.
fn lost_a_peer(e: &PipelineError) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(m) = s.downcast_ref::<qgrad_models::ModelsError>() {
            return matches!(
                m,
                qgrad_models::ModelsError::Collective(
                    CollectiveError::PeerLost { .. } | CollectiveError::Timeout { .. }
                )
            );
        }
        source = s.source();
    }
    false
}

/// [`run_data_parallel`] on `ranks` threads of this process (a
/// [`ThreadGroup`]: the bits of `mpirun -np ranks`), rank 0 on the calling
/// thread with the `rank0_extra` hooks. Returns rank 0's outcome after
/// checking that every rank ended in the same state; when ranks fail, the
/// error of the one that caused it (not of those that lost a peer).
pub fn run_on_threads(
    run: &DataParallelRun,
    data: (&Dataset, &Dataset),
    ranks: usize,
    timeout: Duration,
    rank0_extra: &mut [&mut dyn TrainHook],
) -> Result<DataParallelOutcome> {
    if ranks == 0 {
        return Err(PipelineError::usage("at least one rank is needed"));
    }
    let mut group = ThreadGroup::ranks(ranks, timeout).into_iter();
    let mut first = group.next().expect("ranks >= 1");
    let (mine, others) = std::thread::scope(|s| {
        let handles: Vec<_> = group
            .map(|mut rank| {
                s.spawn(move || {
                    run_data_parallel(run.clone(), data, &mut rank, &mut []).map(|o| o.digest)
                })
            })
            .collect();
        let mine = run_data_parallel(run.clone(), data, &mut first, rank0_extra);
        // Rank 0's handle goes now: ranks still waiting for it stop instead
        // of waiting out the timeout.
        drop(first);
        let others: Vec<Result<String>> = handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(qgrad_models::ModelsError::Other(
                        "a rank thread panicked".into(),
                    ))
                    .runtime("data-parallel training failed")
                })
            })
            .collect();
        (mine, others)
    });
    let mine = match mine {
        Ok(o) => o,
        Err(e) => {
            let cause = others
                .into_iter()
                .filter_map(Result::err)
                .find(|e| !lost_a_peer(e));
            return Err(cause.unwrap_or(e));
        }
    };
    for (r, other) in others.into_iter().enumerate() {
        if other? != mine.digest {
            return Err(qgrad_models::ModelsError::Other(format!(
                "rank {} ended with other weights than rank 0",
                r + 1
            )))
            .runtime("data-parallel training failed");
        }
    }
    Ok(mine)
}
