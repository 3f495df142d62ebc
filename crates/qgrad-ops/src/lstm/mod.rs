//! The fused LSTM recurrence (METHOD §11): forward and backward over a whole
//! sequence as one candle custom op.
//!
//! The input contribution `xproj[t] = W_x·x_t + b` of every step is computed
//! by the caller beforehand (for one-hot characters it is a row gather), so
//! what is left is inherently sequential: per step one GEMM
//! `a = h_{t-1}·W_hᵀ` (`[B, H] × [H, 4H]`, the four gate products as one
//! matrix product), the optional normalisation of `a`, and the element-wise
//! gate math in one pass over the batch rows. Built from candle ops the same
//! step is about twenty graph nodes, each a full pass with an intermediate
//! kept for the backward pass; here the graph holds one node per sequence
//! and the backward pass keeps only the gate activations.
//!
//! Backward runs through time once: per step the element-wise gate
//! derivatives, the normalisation's backward and `dh_{t-1} = da·W_h`; the
//! weight gradient `dW_h = Σ_t da_tᵀ·h_{t-1}` is two GEMMs over all steps at
//! the end rather than one small GEMM per step.
//!
//! Gate order along the `4H` axis: input `i`, forget `f`, cell `g`, output
//! `o`. `c_t = σ(f)⊙c_{t-1} + σ(i)⊙tanh(g)`, `h_t = σ(o)⊙tanh(c_t)`, with
//! `[i f g o] = xproj[t] + N(h_{t-1}·W_hᵀ)`.
//!
//! Threads: a sequence runs on a team of workers ([`workers_for`]: one per
//! thread of the rayon pool once a step's GEMM is large enough) that split
//! the hidden **units**, each owning all four gates of its units. A worker
//! then needs nothing of the others' within a step: its own rows of `W_h`
//! (copied once per sequence) give its gate pre-activations, the gate math
//! and the cell state of its units are its own, and batch norm's statistics
//! are per column, so its own too. Only `h_{t-1}` is shared, so the team
//! meets at one spin barrier per step (`crate::workers`); layer norm adds
//! two, around its row statistics, which every worker computes for its share
//! of the rows. Backward is split the same way: `dh_{t-1}[:, units] = da_t ·
//! W_h[:, units]` needs all of `da_t`, one barrier per step. Against rayon's
//! fork/join around every per-step product and pass, this took the 11 % of a
//! hidden-256 training step that the scheduler had (futex and `sched_yield`)
//! and, with the AVX2 gate kernels below, the step from 45-49k to 57-59k
//! characters per second (`cargo xtask bench-train --nets lstm-256 --threads
//! 2 --skip-torch`, AMD EPYC, 2 vCPUs). The result does not depend on which
//! thread runs a worker: reruns give the same bits; with another number of
//! workers the numbers agree within rounding (a worker's GEMMs are narrower,
//! and gemm may sum them in another order).
//!
//! Normalisations `N` of the recurrent term (all with a gain `γ` of `[4H]`
//! and no shift: the shift of the sum is the caller's bias):
//! - layer norm: each row of `a` over its `4H` values;
//! - batch norm, training: each column of `a` over the batch, at every
//!   step (the op reports the statistics for the caller's running averages);
//! - batch norm, evaluation: fixed per-step (or shared) statistics.

mod backward;
mod forward;
mod kernels;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;

pub(crate) use backward::{backward, Gathered};
pub(crate) use forward::forward;

use crate::custom::f32_values;
use crate::gemm_f32::parallelism_for;
use crate::workers::{share, Aborted};
use crate::OpsError;

/// Sizes of one recurrence: `steps` time steps, `batch` rows, `hidden` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LstmGeometry {
    pub steps: usize,
    pub batch: usize,
    pub hidden: usize,
}

impl LstmGeometry {
    /// From `xproj: [T, B, 4H]` and `wh: [4H, H]`.
    pub fn new(xproj: &[usize], wh: &[usize]) -> std::result::Result<Self, OpsError> {
        let (steps, batch, gates) = match xproj {
            [t, b, g] => (*t, *b, *g),
            d => {
                return Err(OpsError::Shape(format!(
                    "the LSTM input projection must be [steps, batch, 4·hidden], got {d:?}"
                )))
            }
        };
        let hidden = match wh {
            [g, h] if *g == 4 * *h => *h,
            d => {
                return Err(OpsError::Shape(format!(
                    "the LSTM recurrent weight must be [4·hidden, hidden], got {d:?}"
                )))
            }
        };
        if gates != 4 * hidden {
            return Err(OpsError::Shape(format!(
                "the input projection has {gates} gate values per row, the recurrent weight \
                 {} (4 × hidden {hidden})",
                4 * hidden
            )));
        }
        if steps == 0 || batch == 0 || hidden == 0 {
            return Err(OpsError::Shape(format!(
                "an LSTM needs at least one step, row and unit (got {steps} × {batch} × {hidden})"
            )));
        }
        Ok(LstmGeometry {
            steps,
            batch,
            hidden,
        })
    }

    /// From a gathered input's table `[V, 4H]`, `steps × batch` tokens
    /// and `wh: [4H, H]`.
    pub fn gathered(
        table: &[usize],
        steps: usize,
        batch: usize,
        wh: &[usize],
    ) -> std::result::Result<Self, OpsError> {
        match table {
            [v, g] if *v > 0 => Self::new(&[steps, batch, *g], wh),
            d => Err(OpsError::Shape(format!(
                "the LSTM input table must be [vocabulary, 4·hidden], got {d:?}"
            ))),
        }
    }

    fn gates(&self) -> usize {
        4 * self.hidden
    }
}

/// Where step `t`, row `r`'s input term `xproj[t, r]` (`4H` values) comes
/// from: a `[T, B, 4H]` tensor, or row `tokens[t·B + r]` of a `[V, 4H]`
/// table (one-hot characters: the table is `W_xᵀ + b`, a few hundred KiB
/// that stay in cache, where the gathered `[T, B, 4H]` would be tens of MiB
/// written once and read once).
#[derive(Clone, Copy)]
pub(crate) enum XSource<'a> {
    Rows(&'a [f32]),
    Gather { table: &'a [f32], tokens: &'a [u32] },
}

impl<'a> XSource<'a> {
    /// Checks the sizes against the geometry (and every token against the
    /// table), so that [`XSource::row`] cannot go out of bounds.
    fn check(&self, g: &LstmGeometry) -> std::result::Result<(), OpsError> {
        let g4 = g.gates();
        match *self {
            XSource::Rows(x) if x.len() == g.steps * g.batch * g4 => Ok(()),
            XSource::Rows(x) => Err(OpsError::Internal(format!(
                "LSTM input projection holds {} values, not {} x {} x {g4}",
                x.len(),
                g.steps,
                g.batch
            ))),
            XSource::Gather { table, tokens } => {
                if table.len() % g4 != 0 || tokens.len() != g.steps * g.batch {
                    return Err(OpsError::Shape(format!(
                        "an LSTM input table of {} values and {} tokens do not make \
                         [V, {g4}] and {} x {} steps",
                        table.len(),
                        tokens.len(),
                        g.steps,
                        g.batch
                    )));
                }
                let vocab = table.len() / g4;
                match tokens.iter().find(|&&t| t as usize >= vocab) {
                    Some(t) => Err(OpsError::Shape(format!(
                        "token {t} is outside the LSTM input table of {vocab} rows"
                    ))),
                    None => Ok(()),
                }
            }
        }
    }

    /// `xproj` of row `i = t·B + r`.
    #[inline]
    fn row(&self, i: usize, g4: usize) -> &'a [f32] {
        match *self {
            XSource::Rows(x) => &x[i * g4..(i + 1) * g4],
            XSource::Gather { table, tokens } => {
                let v = tokens[i] as usize;
                &table[v * g4..(v + 1) * g4]
            }
        }
    }
}

/// How the recurrent term is normalised (module docs).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RecurrentNorm {
    None,
    Layer {
        eps: f32,
    },
    BatchTrain {
        eps: f32,
    },
    /// `mean`, `var`: `[S, 4H]`; step `t` uses row `min(t, S − 1)`.
    BatchEval {
        mean: Vec<f32>,
        var: Vec<f32>,
        eps: f32,
    },
}

impl RecurrentNorm {
    fn has_gain(&self) -> bool {
        !matches!(self, RecurrentNorm::None)
    }
}

/// What the forward pass keeps for the backward pass.
pub(crate) struct LstmCache {
    /// Cell states `[T, B, H]` (the op's output is the hidden states only:
    /// the caller takes the last cell state from here, detached).
    pub cells: Vec<f32>,
    /// Gate activations `[T, B, 4H]`: σ(i), σ(f), tanh(g), σ(o).
    gates: Vec<f32>,
    /// The normalised recurrent term `â` `[T, B, 4H]` (normalised modes).
    normalised: Vec<f32>,
    /// `1/σ`: `[T, B]` (layer norm) or `[T, 4H]` (batch norm).
    inv_std: Vec<f32>,
}

/// Per-step batch statistics of the recurrent term, `[T, 4H]` each (batch
/// norm in training; biased variance).
#[derive(Debug, Clone, Default)]
pub(crate) struct StepStats {
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

/// The fused recurrence; args `(xproj, wh)` or `(xproj, wh, gain)`, with
/// `xproj` a `[T, B, 4H]` tensor or, when `gathered` is set, the `[V, 4H]`
/// table its rows come from. Output `[T, B, H]`: the hidden states (the cell
/// states stay in the cache).
pub(crate) struct LstmOp {
    pub norm: RecurrentNorm,
    pub gathered: Option<GatherSpec>,
    /// Initial hidden and cell state, `[B, H]` each (constants).
    pub h0: Vec<f32>,
    pub c0: Vec<f32>,
    pub cache: Arc<OnceLock<LstmCache>>,
    pub stats: Arc<OnceLock<StepStats>>,
}

/// How many workers run one recurrence (module docs, "Threads"): one when
/// a step's GEMM is too small to split (the same threshold as every other
/// product in this crate) or the pool has one thread, else one per thread of
/// the pool, at most one per hidden unit.
pub(crate) fn workers_for(g: &LstmGeometry) -> usize {
    let threads = rayon::current_num_threads();
    if threads <= 1
        || matches!(
            parallelism_for(g.batch, g.gates(), g.hidden),
            Parallelism::None
        )
    {
        1
    } else {
        threads.min(g.hidden)
    }
}

/// What worker `me` of a team of `workers` owns (module docs, "Threads").
struct WorkerShare {
    /// Its hidden units.
    units: Range<usize>,
    /// Its columns of a `[.., 4H]` row: four chunks of `nu`, one per gate,
    /// at `q·H + units`.
    chunks: [Range<usize>; 4],
    /// Its share of the batch rows (layer norm's row statistics).
    rows: Range<usize>,
    /// The normalisation's gain at its columns, chunk after chunk (empty
    /// without a gain).
    gain: Vec<f32>,
}

impl WorkerShare {
    fn new(me: usize, workers: usize, g: &LstmGeometry, gain: Option<&[f32]>) -> Self {
        let units = share(g.hidden, workers, me);
        let chunks: [Range<usize>; 4] =
            std::array::from_fn(|q| q * g.hidden + units.start..q * g.hidden + units.end);
        let gain = match gain {
            Some(gain) => chunks
                .iter()
                .flat_map(|c| gain[c.clone()].iter().copied())
                .collect(),
            None => Vec::new(),
        };
        WorkerShare {
            units,
            chunks,
            rows: share(g.batch, workers, me),
            gain,
        }
    }
}

fn aborted(_: Aborted) -> OpsError {
    OpsError::Internal("an LSTM worker stopped after another one failed".into())
}

/// A contiguous CPU f32 tensor's values, without a copy.
fn with_values<R>(
    what: &str,
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> std::result::Result<R, OpsError>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        return Err(OpsError::DType(format!("{what} must be an f32 CPU tensor")).into());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(OpsError::Internal(format!("{what} is not contiguous")).into());
    };
    Ok(f(&values[start..end])?)
}

/// A gathered input's tokens, `[T·B]` time-major.
pub(crate) struct GatherSpec {
    pub tokens: Vec<u32>,
    pub steps: usize,
    pub batch: usize,
}

impl LstmOp {
    fn geometry(&self, x: &[usize], wh: &[usize]) -> std::result::Result<LstmGeometry, OpsError> {
        match &self.gathered {
            Some(gs) => LstmGeometry::gathered(x, gs.steps, gs.batch, wh),
            None => LstmGeometry::new(x, wh),
        }
    }

    fn run_forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gain: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(xl.dims(), wl.dims())?;
        let xproj = f32_values("LSTM input projection", xs, xl)?;
        let x = match &self.gathered {
            Some(gs) => XSource::Gather {
                table: xproj,
                tokens: &gs.tokens,
            },
            None => XSource::Rows(xproj),
        };
        let wh = f32_values("LSTM recurrent weight", ws, wl)?;
        let gain = match gain {
            Some((s, l)) => Some(f32_values("LSTM normalisation gain", s, l)?),
            None => None,
        };
        let workers = workers_for(&g);
        let (out, cache, stats) =
            forward(workers, &g, &self.norm, x, wh, gain, &self.h0, &self.c0)?;
        self.cache
            .set(cache)
            .map_err(|_| OpsError::Internal("LSTM op applied twice".into()))?;
        let _ = self.stats.set(stats);
        Ok((
            CpuStorage::F32(out),
            Shape::from_dims(&[g.steps, g.batch, g.hidden]),
        ))
    }

    fn run_backward(
        &self,
        xproj: &Tensor,
        wh: &Tensor,
        gain: Option<&Tensor>,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geometry(xproj.dims(), wh.dims())?;
        let gather = self.gathered.as_ref().map(|gs| Gathered {
            tokens: &gs.tokens,
            vocab: xproj.dims()[0],
        });
        let cache = self
            .cache
            .get()
            .ok_or_else(|| OpsError::Internal("LSTM backward before its forward pass".into()))?;
        let gain_values = match gain {
            Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        let (dx, dw, dgain) = with_values("LSTM output", res, |out| {
            let grad = grad
                .contiguous()
                .map_err(|e| OpsError::Internal(e.to_string()))?;
            with_values("LSTM output gradient", &grad, |gout| {
                with_values("LSTM recurrent weight", wh, |w| {
                    backward(
                        workers_for(&g),
                        &g,
                        &self.norm,
                        cache,
                        out,
                        gout,
                        w,
                        gain_values.as_deref(),
                        &self.h0,
                        &self.c0,
                        gather,
                    )
                })
                .map_err(|e| OpsError::Internal(e.to_string()))
            })
            .map_err(|e| OpsError::Internal(e.to_string()))
        })?;
        let dev = xproj.device();
        let dx = if xproj.track_op() {
            Some(Tensor::from_vec(dx, xproj.dims(), dev)?)
        } else {
            None
        };
        let dw = if wh.track_op() {
            Some(Tensor::from_vec(dw, wh.dims(), dev)?)
        } else {
            None
        };
        let dgain = match gain {
            Some(t) if t.track_op() => Some(Tensor::from_vec(dgain, t.dims(), dev)?),
            _ => None,
        };
        Ok((dx, dw, dgain))
    }
}

impl CustomOp2 for LstmOp {
    fn name(&self) -> &'static str {
        "qgrad-lstm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_forward(xs, xl, ws, wl, None)
    }

    fn bwd(
        &self,
        xproj: &Tensor,
        wh: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.run_backward(xproj, wh, None, res, grad)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for LstmOp {
    fn name(&self) -> &'static str {
        "qgrad-lstm-normalised"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run_forward(xs, xl, ws, wl, Some((gs, gl)))
    }

    fn bwd(
        &self,
        xproj: &Tensor,
        wh: &Tensor,
        gain: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.run_backward(xproj, wh, Some(gain), res, grad)
    }
}
