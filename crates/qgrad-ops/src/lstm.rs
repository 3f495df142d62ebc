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

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;

use crate::custom::f32_values;
use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::workers::{run_team, share, Aborted, SharedBuf};
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

// The gate non-linearities, written out rather than taken from libm: glibc's
// `tanhf` (through `expm1f`) took a third of a hidden-512 training step, and
// a call per element keeps the loops from vectorising. `exp` below is
// branch-free (range reduction to `2^n · e^r`, |r| ≤ ln2/2, and the degree-7
// Taylor polynomial, whose truncation error 5e-9 is below f32's rounding), so
// LLVM turns the loops over a row into SIMD code; σ and tanh built on it are
// within a few ulp of libm's (the tests compare with candle's ops).

/// `e^x` for f32 (saturating at the f32 range).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // 0x3f31_7200, exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in plain
    // SSE2 (`f32::round`/`floor` are libm calls without SSE4.1).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // Cody–Waite: ln 2 in two parts, the first with few enough bits that
    // n · LN2_HI is exact, so that |n| up to 126 keeps r accurate.
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [-126, 127]: a normal power of two. `shifted` lies in [2^23,
    // 2^24), where the float's step is 1, so its bits are ROUND's plus n:
    // integer arithmetic on the bits gives 2^n without a float-to-int
    // conversion, which Rust's saturating `as` would keep scalar (one
    // `cvttss2si` per lane) and so keep the loops from vectorising.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    f32::from_bits(biased << 23) * p
}

/// The logistic function.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh x = 1 − 2 / (e^{2x} + 1)` (±1 in the limits, never NaN).
#[inline(always)]
fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

// The element-wise kernels of a step, row by row. The crate is built for
// the x86-64 baseline (SSE2), where the loops above vectorise four lanes
// wide; each kernel below is also instantiated with AVX2 enabled and picked
// at run time, which halved the gate pass of a hidden-256 step (12.7 → 6 ms
// per sequence and worker). Rust never fuses a multiply and an add on its
// own, so both instantiations compute the same bits.

/// Whether the AVX2 instantiations can run here (std caches the answer).
#[inline]
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name(args)`, which runs `$body` compiled for AVX2 where the
/// processor has it and for the baseline elsewhere.
macro_rules! dispatched {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the processor has AVX2 (checked just above).
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

dispatched! {
    /// One row of a step: `z` holds the pre-activations of `nu` units as
    /// four gate chunks `[i f g o]`; turns them into the activations in place
    /// and writes the units' new cell and hidden state.
    fn activate_row(z: &mut [f32], nu: usize, c_prev: &[f32], c_out: &mut [f32], h_out: &mut [f32]) {
        let (ifg, o) = z.split_at_mut(3 * nu);
        let (if_, g) = ifg.split_at_mut(2 * nu);
        // One simple loop per non-linearity, so that each vectorises.
        for v in if_.iter_mut() {
            *v = sigmoid(*v);
        }
        for v in g.iter_mut() {
            *v = tanh(*v);
        }
        for v in o.iter_mut() {
            *v = sigmoid(*v);
        }
        let (i, f) = if_.split_at(nu);
        let (i, f, g, o) = (&i[..nu], &f[..nu], &g[..nu], &o[..nu]);
        let (c_prev, c_out, h_out) = (&c_prev[..nu], &mut c_out[..nu], &mut h_out[..nu]);
        for k in 0..nu {
            let c = f[k] * c_prev[k] + i[k] * g[k];
            c_out[k] = c;
            h_out[k] = o[k] * tanh(c);
        }
    }
}

dispatched! {
    /// The gate derivatives of one row's `nu` units: from the activations
    /// `[i f g o]`, the cell states, the incoming `dh` (output gradient and
    /// recurrent part) and `dc`; updates `dc` to the previous step's.
    fn gate_grad_row(
        gi: &[f32], gf: &[f32], gg: &[f32], go: &[f32],
        ct: &[f32], cp: &[f32], gh: &[f32], dhn: &[f32], dcn: &mut [f32],
        dz_i: &mut [f32], dz_f: &mut [f32], dz_g: &mut [f32], dz_o: &mut [f32],
    ) {
        let nu = dcn.len();
        let (gi, gf, gg, go) = (&gi[..nu], &gf[..nu], &gg[..nu], &go[..nu]);
        let (ct, cp, gh, dhn) = (&ct[..nu], &cp[..nu], &gh[..nu], &dhn[..nu]);
        let (dz_i, dz_f, dz_g, dz_o) = (&mut dz_i[..nu], &mut dz_f[..nu], &mut dz_g[..nu], &mut dz_o[..nu]);
        for k in 0..nu {
            let (i, f, g, o) = (gi[k], gf[k], gg[k], go[k]);
            let dh = gh[k] + dhn[k];
            let tc = tanh(ct[k]);
            let dc = dcn[k] + dh * o * (1.0 - tc * tc);
            dz_i[k] = dc * g * i * (1.0 - i);
            dz_f[k] = dc * cp[k] * f * (1.0 - f);
            dz_g[k] = dc * i * (1.0 - g * g);
            dz_o[k] = dh * tc * o * (1.0 - o);
            dcn[k] = dc * f;
        }
    }
}

/// Partial sums per lane: a row's f64 sum in one accumulator is a chain of
/// dependent adds (4H of them), eight lanes let them overlap and vectorise.
const SUM_LANES: usize = 8;

#[inline(always)]
fn lane_total(lanes: [f64; SUM_LANES]) -> f64 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

dispatched! {
    /// Mean and biased variance of a row, in f64 (layer norm's statistics).
    fn row_mean_var(a: &[f32]) -> (f64, f64) {
        let n = a.len() as f64;
        let mut lanes = [0f64; SUM_LANES];
        let chunks = a.chunks_exact(SUM_LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..SUM_LANES {
                lanes[l] += f64::from(c[l]);
            }
        }
        for (l, &x) in tail.iter().enumerate() {
            lanes[l] += f64::from(x);
        }
        let mean = lane_total(lanes) / n;
        let mut lanes = [0f64; SUM_LANES];
        let chunks = a.chunks_exact(SUM_LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for l in 0..SUM_LANES {
                let d = f64::from(c[l]) - mean;
                lanes[l] += d * d;
            }
        }
        for (l, &x) in tail.iter().enumerate() {
            let d = f64::from(x) - mean;
            lanes[l] += d * d;
        }
        (mean, lane_total(lanes) / n)
    }
}

dispatched! {
    /// Layer norm's backward row sums, `(Σ dz·γ, Σ dz·γ·â)`, in f64.
    fn row_grad_sums(dz: &[f32], gain: &[f32], n: &[f32]) -> (f64, f64) {
        let len = dz.len();
        let (gain, n) = (&gain[..len], &n[..len]);
        let (mut s1, mut s2) = ([0f64; SUM_LANES], [0f64; SUM_LANES]);
        let whole = len / SUM_LANES * SUM_LANES;
        for base in (0..whole).step_by(SUM_LANES) {
            for l in 0..SUM_LANES {
                let dn = f64::from(dz[base + l] * gain[base + l]);
                s1[l] += dn;
                s2[l] += dn * f64::from(n[base + l]);
            }
        }
        for j in whole..len {
            let dn = f64::from(dz[j] * gain[j]);
            s1[j - whole] += dn;
            s2[j - whole] += dn * f64::from(n[j]);
        }
        (lane_total(s1), lane_total(s2))
    }
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

/// The columns of a `[.., 4H]` row that a worker owning units `units`
/// handles: four chunks of `units.len()`, one per gate, at `q·H + units`.
fn gate_chunks(hidden: usize, units: &Range<usize>) -> [Range<usize>; 4] {
    std::array::from_fn(|q| q * hidden + units.start..q * hidden + units.end)
}

fn aborted(_: Aborted) -> OpsError {
    OpsError::Internal("an LSTM worker stopped after another one failed".into())
}

/// Forward pass: `(hidden states [T, B, H], cache, stats)` on
/// [`workers_for`] workers.
pub(crate) fn forward(
    g: &LstmGeometry,
    norm: &RecurrentNorm,
    x: XSource<'_>,
    wh: &[f32],
    gain: Option<&[f32]>,
    h0: &[f32],
    c0: &[f32],
) -> std::result::Result<(Vec<f32>, LstmCache, StepStats), OpsError> {
    forward_on(workers_for(g), g, norm, x, wh, gain, h0, c0)
}

/// [`forward`] on exactly `workers` workers (at most one per unit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_on(
    workers: usize,
    g: &LstmGeometry,
    norm: &RecurrentNorm,
    x: XSource<'_>,
    wh: &[f32],
    gain: Option<&[f32]>,
    h0: &[f32],
    c0: &[f32],
) -> std::result::Result<(Vec<f32>, LstmCache, StepStats), OpsError> {
    let (t_n, b_n, h_n, g4) = (g.steps, g.batch, g.hidden, g.gates());
    let state = b_n * h_n;
    if h0.len() != state || c0.len() != state {
        return Err(OpsError::Shape(format!(
            "the initial LSTM state must be [{b_n}, {h_n}] (got {} and {} values)",
            h0.len(),
            c0.len()
        )));
    }
    x.check(g)?;
    if wh.len() != g4 * h_n {
        return Err(OpsError::Internal(
            "LSTM forward: the recurrent weight has the wrong size".into(),
        ));
    }
    let gain = match (norm.has_gain(), gain) {
        (false, _) => None,
        (true, Some(gain)) if gain.len() == g4 => Some(gain),
        (true, _) => {
            return Err(OpsError::Shape(format!(
                "the recurrent normalisation's gain must be [{g4}]"
            )))
        }
    };
    if let RecurrentNorm::BatchEval { mean, var, .. } = norm {
        if mean.is_empty() || mean.len() % g4 != 0 || var.len() != mean.len() {
            return Err(OpsError::Shape(format!(
                "batch-norm statistics must be [steps, {g4}] (got {} and {} values)",
                mean.len(),
                var.len()
            )));
        }
    }
    let workers = workers.clamp(1, h_n);
    let mut hs = vec![0f32; t_n * state];
    let mut cs = vec![0f32; t_n * state];
    let mut gates = vec![0f32; t_n * b_n * g4];
    let mut normalised = vec![0f32; if gain.is_some() { t_n * b_n * g4 } else { 0 }];
    let mut inv_std = match norm {
        RecurrentNorm::None => Vec::new(),
        RecurrentNorm::Layer { .. } => vec![0f32; t_n * b_n],
        _ => vec![0f32; t_n * g4],
    };
    let mut stats = StepStats::default();
    if matches!(norm, RecurrentNorm::BatchTrain { .. }) {
        stats.mean = vec![0f32; t_n * g4];
        stats.var = vec![0f32; t_n * g4];
    }
    let layer_eps = match norm {
        RecurrentNorm::Layer { eps } => Some(*eps),
        _ => None,
    };
    // Layer norm's row statistics need every column of a row: the workers
    // put their columns of `a` here, and each computes its share of rows.
    let mut a_rows = vec![0f32; if layer_eps.is_some() { b_n * g4 } else { 0 }];
    let mut row_mean = vec![0f32; if layer_eps.is_some() { b_n } else { 0 }];
    {
        let hs_s = SharedBuf::new(&mut hs);
        let cs_s = SharedBuf::new(&mut cs);
        let gates_s = SharedBuf::new(&mut gates);
        let norm_s = SharedBuf::new(&mut normalised);
        let inv_s = SharedBuf::new(&mut inv_std);
        let mean_s = SharedBuf::new(&mut stats.mean);
        let var_s = SharedBuf::new(&mut stats.var);
        let a_rows_s = SharedBuf::new(&mut a_rows);
        let row_mean_s = SharedBuf::new(&mut row_mean);
        run_team(workers, |me, barrier| {
            let units = share(h_n, workers, me);
            let nu = units.len();
            let gp = 4 * nu;
            let chunks = gate_chunks(h_n, &units);
            let my_rows = share(b_n, workers, me);
            // This worker's rows of W_h (its units of the four gates), copied
            // once per sequence: gemm reads them every step without the
            // other workers' rows in its caches.
            let mut w_mine = Vec::with_capacity(gp * h_n);
            for c in &chunks {
                w_mine.extend_from_slice(&wh[c.start * h_n..c.end * h_n]);
            }
            let w_mine = MatRef::row_major(&w_mine, gp, h_n).t();
            let my_gain: Vec<f32> = match gain {
                Some(gain) => chunks
                    .iter()
                    .flat_map(|c| gain[c.clone()].iter().copied())
                    .collect(),
                None => Vec::new(),
            };
            let mut z = vec![0f32; b_n * gp];
            let (mut col_sum, mut col_sq) = (Vec::new(), Vec::new());
            let (mut mean_t, mut inv_t) = (vec![0f32; gp], vec![0f32; gp]);
            for t in 0..t_n {
                // SAFETY (every shared access below): step t reads h_{t-1}
                // and c_{t-1} (written before the last barrier of step t−1)
                // and writes only this worker's columns of step t; the row
                // buffers of layer norm are written and read between
                // barriers as commented there.
                let h_prev = if t == 0 {
                    h0
                } else {
                    unsafe { hs_s.read((t - 1) * state, state) }
                };
                matmul(
                    &mut z,
                    MatRef::row_major(h_prev, b_n, h_n),
                    w_mine,
                    false,
                    Parallelism::None,
                )?;
                let row0 = t * b_n;
                // z ← xproj + N(a), with the normalisation's statistics.
                match norm {
                    RecurrentNorm::None => {
                        for r in 0..b_n {
                            let x_row = x.row(row0 + r, g4);
                            let zr = &mut z[r * gp..(r + 1) * gp];
                            for (q, c) in chunks.iter().enumerate() {
                                for (zv, &xv) in
                                    zr[q * nu..(q + 1) * nu].iter_mut().zip(&x_row[c.clone()])
                                {
                                    *zv += xv;
                                }
                            }
                        }
                    }
                    RecurrentNorm::Layer { .. } => {
                        let eps = layer_eps.unwrap_or_default();
                        for r in 0..b_n {
                            let row = unsafe { a_rows_s.write(r * g4, g4) };
                            for (q, c) in chunks.iter().enumerate() {
                                row[c.clone()]
                                    .copy_from_slice(&z[r * gp + q * nu..r * gp + (q + 1) * nu]);
                            }
                        }
                        barrier.wait().map_err(aborted)?;
                        // Every column of a is in: this worker's rows' statistics.
                        for r in my_rows.clone() {
                            let a_row = unsafe { a_rows_s.read(r * g4, g4) };
                            let (mean, var) = row_mean_var(a_row);
                            unsafe {
                                inv_s.write(row0 + r, 1)[0] =
                                    (1.0 / (var + f64::from(eps)).sqrt()) as f32;
                                row_mean_s.write(r, 1)[0] = mean as f32;
                            }
                        }
                        barrier.wait().map_err(aborted)?;
                        let inv_rows = unsafe { inv_s.read(row0, b_n) };
                        let means = unsafe { row_mean_s.read(0, b_n) };
                        for r in 0..b_n {
                            let x_row = x.row(row0 + r, g4);
                            let zr = &mut z[r * gp..(r + 1) * gp];
                            let (mean, inv) = (means[r], inv_rows[r]);
                            for (q, c) in chunks.iter().enumerate() {
                                let n_out = unsafe { norm_s.write((row0 + r) * g4 + c.start, nu) };
                                let gq = &my_gain[q * nu..(q + 1) * nu];
                                let zq = &mut zr[q * nu..(q + 1) * nu];
                                for k in 0..nu {
                                    let n = (zq[k] - mean) * inv;
                                    n_out[k] = n;
                                    zq[k] = x_row[c.start + k] + gq[k] * n;
                                }
                            }
                        }
                    }
                    RecurrentNorm::BatchTrain { eps } | RecurrentNorm::BatchEval { eps, .. } => {
                        if let RecurrentNorm::BatchEval { mean, var, .. } = norm {
                            let s = t.min(mean.len() / g4 - 1) * g4;
                            for (q, c) in chunks.iter().enumerate() {
                                for k in 0..nu {
                                    let j = s + c.start + k;
                                    mean_t[q * nu + k] = mean[j];
                                    inv_t[q * nu + k] = 1.0 / (var[j] + eps).sqrt();
                                }
                            }
                        } else {
                            // Column statistics over the batch: local to the
                            // worker, whose columns they are.
                            col_sum.clear();
                            col_sum.resize(gp, 0f64);
                            for zr in z.chunks(gp) {
                                for (s, &x) in col_sum.iter_mut().zip(zr) {
                                    *s += f64::from(x);
                                }
                            }
                            for s in col_sum.iter_mut() {
                                *s /= b_n as f64;
                            }
                            col_sq.clear();
                            col_sq.resize(gp, 0f64);
                            for zr in z.chunks(gp) {
                                for ((s, &x), m) in col_sq.iter_mut().zip(zr).zip(&col_sum) {
                                    let d = f64::from(x) - m;
                                    *s += d * d;
                                }
                            }
                            for (q, c) in chunks.iter().enumerate() {
                                let means = unsafe { mean_s.write(t * g4 + c.start, nu) };
                                let vars = unsafe { var_s.write(t * g4 + c.start, nu) };
                                for k in 0..nu {
                                    let l = q * nu + k;
                                    let var = col_sq[l] / b_n as f64;
                                    mean_t[l] = col_sum[l] as f32;
                                    inv_t[l] = (1.0 / (var + f64::from(*eps)).sqrt()) as f32;
                                    means[k] = col_sum[l] as f32;
                                    vars[k] = var as f32;
                                }
                            }
                        }
                        for (q, c) in chunks.iter().enumerate() {
                            unsafe { inv_s.write(t * g4 + c.start, nu) }
                                .copy_from_slice(&inv_t[q * nu..(q + 1) * nu]);
                        }
                        for r in 0..b_n {
                            let x_row = x.row(row0 + r, g4);
                            let zr = &mut z[r * gp..(r + 1) * gp];
                            for (q, c) in chunks.iter().enumerate() {
                                let n_out = unsafe { norm_s.write((row0 + r) * g4 + c.start, nu) };
                                for k in 0..nu {
                                    let l = q * nu + k;
                                    let n = (zr[l] - mean_t[l]) * inv_t[l];
                                    n_out[k] = n;
                                    zr[l] = x_row[c.start + k] + my_gain[l] * n;
                                }
                            }
                        }
                    }
                }
                // Activations and the new state of this worker's units.
                for r in 0..b_n {
                    let zr = &mut z[r * gp..(r + 1) * gp];
                    let at = (row0 + r) * h_n + units.start;
                    let c_prev = if t == 0 {
                        &c0[r * h_n + units.start..][..nu]
                    } else {
                        unsafe { cs_s.read(at - state, nu) }
                    };
                    let c_row = unsafe { cs_s.write(at, nu) };
                    let h_row = unsafe { hs_s.write(at, nu) };
                    activate_row(zr, nu, c_prev, c_row, h_row);
                    for (q, c) in chunks.iter().enumerate() {
                        unsafe { gates_s.write((row0 + r) * g4 + c.start, nu) }
                            .copy_from_slice(&zr[q * nu..(q + 1) * nu]);
                    }
                }
                // h_t complete before anyone's next GEMM reads it.
                barrier.wait().map_err(aborted)?;
            }
            Ok(())
        })?;
    }
    Ok((
        hs,
        LstmCache {
            cells: cs,
            gates,
            normalised,
            inv_std,
        },
        stats,
    ))
}

/// `(dx, dwh [4H, H], dgain [4H] or empty)`, `dx` the gradient of the
/// input: `[T, B, 4H]`, or `[V, 4H]` for a gathered table.
type LstmGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The gradients of the op's arguments from
/// the gradient of the hidden states `[T, B, H]`, on [`workers_for`] workers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    g: &LstmGeometry,
    norm: &RecurrentNorm,
    cache: &LstmCache,
    hs: &[f32],
    grad_h: &[f32],
    wh: &[f32],
    gain: Option<&[f32]>,
    h0: &[f32],
    c0: &[f32],
    gather: Option<Gathered<'_>>,
) -> std::result::Result<LstmGrads, OpsError> {
    backward_on(
        workers_for(g),
        g,
        norm,
        cache,
        hs,
        grad_h,
        wh,
        gain,
        h0,
        c0,
        gather,
    )
}

/// The input of a gathered forward pass ([`XSource::Gather`]): its tokens
/// and the table's row count.
#[derive(Clone, Copy)]
pub(crate) struct Gathered<'a> {
    pub tokens: &'a [u32],
    pub vocab: usize,
}

/// [`backward`] on exactly `workers` workers (at most one per unit).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_on(
    workers: usize,
    g: &LstmGeometry,
    norm: &RecurrentNorm,
    cache: &LstmCache,
    hs: &[f32],
    grad_h: &[f32],
    wh: &[f32],
    gain: Option<&[f32]>,
    h0: &[f32],
    c0: &[f32],
    gather: Option<Gathered<'_>>,
) -> std::result::Result<LstmGrads, OpsError> {
    let (t_n, b_n, h_n, g4) = (g.steps, g.batch, g.hidden, g.gates());
    if let Some(gt) = gather {
        if gt.tokens.len() != t_n * b_n || gt.tokens.iter().any(|&v| v as usize >= gt.vocab) {
            return Err(OpsError::Internal(
                "LSTM backward: the gathered tokens do not fit the table".into(),
            ));
        }
    }
    let state = b_n * h_n;
    if hs.len() != t_n * state
        || grad_h.len() != hs.len()
        || cache.cells.len() != hs.len()
        || cache.gates.len() != t_n * b_n * g4
        || wh.len() != g4 * h_n
        || h0.len() != state
        || c0.len() != state
    {
        return Err(OpsError::Internal(
            "LSTM backward: output or its gradient has the wrong size".into(),
        ));
    }
    let normalised_mode = norm.has_gain();
    let gain = match (normalised_mode, gain) {
        (false, _) => None,
        (true, Some(gain)) if gain.len() == g4 && cache.normalised.len() == t_n * b_n * g4 => {
            Some(gain)
        }
        (true, _) => {
            return Err(OpsError::Internal(
                "LSTM backward: the normalisation's gain or cache has the wrong size".into(),
            ))
        }
    };
    let workers = workers.clamp(1, h_n);
    let (cs, gates) = (&cache.cells[..], &cache.gates[..]);
    let mut dz_all = vec![0f32; t_n * b_n * g4];
    let mut da_all = vec![0f32; if normalised_mode { t_n * b_n * g4 } else { 0 }];
    let mut dgain = vec![0f32; if normalised_mode { g4 } else { 0 }];
    // Layer norm: the row sums of dz·γ and dz·γ·â, one pair per row.
    let is_layer = matches!(norm, RecurrentNorm::Layer { .. });
    let mut row_m = vec![0f32; if is_layer { 2 * b_n } else { 0 }];
    // A gathered input's gradient: row v of the table sums dz of every
    // (t, r) that read it. Each worker adds its own columns, in the order
    // t descending, r ascending, while dz_t is in its cache.
    let mut d_table = vec![0f32; gather.map_or(0, |gt| gt.vocab * g4)];
    {
        let d_table_s = SharedBuf::new(&mut d_table);
        let dz_s = SharedBuf::new(&mut dz_all);
        let da_s = SharedBuf::new(&mut da_all);
        let dgain_s = SharedBuf::new(&mut dgain);
        let row_m_s = SharedBuf::new(&mut row_m);
        // The recurrent gradient flows through `da` (normalised) or `dz`.
        let dflow_s = if normalised_mode { da_s } else { dz_s };
        run_team(workers, |me, barrier| {
            let units = share(h_n, workers, me);
            let nu = units.len();
            let gp = 4 * nu;
            let chunks = gate_chunks(h_n, &units);
            let my_rows = share(b_n, workers, me);
            // W_h's columns of this worker's units, `[4H, nu]`, for
            // dh_{t-1}[:, units] = da_t · W_h[:, units].
            let mut w_cols = Vec::with_capacity(g4 * nu);
            for row in wh.chunks(h_n) {
                w_cols.extend_from_slice(&row[units.clone()]);
            }
            let my_gain: Vec<f32> = match gain {
                Some(gain) => chunks
                    .iter()
                    .flat_map(|c| gain[c.clone()].iter().copied())
                    .collect(),
                None => Vec::new(),
            };
            let mut dh_next = vec![0f32; b_n * nu];
            let mut dc_next = vec![0f32; b_n * nu];
            let mut my_dgain = vec![0f64; if gain.is_some() { gp } else { 0 }];
            let (mut m1, mut m2) = (vec![0f64; gp], vec![0f64; gp]);
            let (mut m1f, mut m2f) = (vec![0f32; gp], vec![0f32; gp]);
            for t in (0..t_n).rev() {
                let row0 = t * b_n;
                // SAFETY (every shared access below): step t writes only this
                // worker's columns of dz_t and da_t, reads all of da_t only
                // after the barrier that ends its writes, and the row sums of
                // layer norm are written and read between barriers as
                // commented there; step t−1 writes other rows of the buffers.
                // The table's gradient is only ever touched in this worker's
                // columns.
                for r in 0..b_n {
                    let hr = (row0 + r) * h_n + units.start;
                    let gr = &gates[(row0 + r) * g4..(row0 + r + 1) * g4];
                    let ct = &cs[hr..hr + nu];
                    let cp = if t == 0 {
                        &c0[r * h_n + units.start..][..nu]
                    } else {
                        &cs[hr - state..hr - state + nu]
                    };
                    let gh = &grad_h[hr..hr + nu];
                    let dhn = &dh_next[r * nu..(r + 1) * nu];
                    let dcn = &mut dc_next[r * nu..(r + 1) * nu];
                    let (gi, gf) = (&gr[chunks[0].clone()], &gr[chunks[1].clone()]);
                    let (gg, go) = (&gr[chunks[2].clone()], &gr[chunks[3].clone()]);
                    let at = (row0 + r) * g4;
                    let [dz_i, dz_f, dz_g, dz_o] = chunks
                        .clone()
                        .map(|c| unsafe { dz_s.write(at + c.start, nu) });
                    gate_grad_row(gi, gf, gg, go, ct, cp, gh, dhn, dcn, dz_i, dz_f, dz_g, dz_o);
                    if let Some(gt) = gather {
                        let v = gt.tokens[row0 + r] as usize;
                        for (c, dz) in chunks.iter().zip([&*dz_i, &*dz_f, &*dz_g, &*dz_o]) {
                            let acc = unsafe { d_table_s.write(v * g4 + c.start, nu) };
                            for (a, &d) in acc.iter_mut().zip(dz) {
                                *a += d;
                            }
                        }
                    }
                }
                // The normalisation's backward: da_t from dz_t.
                if let Some(gain) = gain {
                    // γ's gradient, per column over (t descending, rows).
                    for r in 0..b_n {
                        let at = (row0 + r) * g4;
                        for (q, c) in chunks.iter().enumerate() {
                            let dz = unsafe { dz_s.read(at + c.start, nu) };
                            let n = &cache.normalised[at + c.start..at + c.end];
                            for k in 0..nu {
                                my_dgain[q * nu + k] += f64::from(dz[k]) * f64::from(n[k]);
                            }
                        }
                    }
                    match norm {
                        RecurrentNorm::Layer { .. } => {
                            // Row sums need every column of dz_t.
                            barrier.wait().map_err(aborted)?;
                            for r in my_rows.clone() {
                                let at = (row0 + r) * g4;
                                let dz = unsafe { dz_s.read(at, g4) };
                                let n = &cache.normalised[at..at + g4];
                                let (s1, s2) = row_grad_sums(dz, gain, n);
                                let sums = unsafe { row_m_s.write(2 * r, 2) };
                                sums[0] = (s1 / g4 as f64) as f32;
                                sums[1] = (s2 / g4 as f64) as f32;
                            }
                            barrier.wait().map_err(aborted)?;
                            let inv_t = &cache.inv_std[row0..row0 + b_n];
                            for (r, &inv) in inv_t.iter().enumerate() {
                                let at = (row0 + r) * g4;
                                let sums = unsafe { row_m_s.read(2 * r, 2) };
                                let (s1, s2) = (sums[0], sums[1]);
                                for (q, c) in chunks.iter().enumerate() {
                                    let dz = unsafe { dz_s.read(at + c.start, nu) };
                                    let n = &cache.normalised[at + c.start..at + c.end];
                                    let da = unsafe { da_s.write(at + c.start, nu) };
                                    let gq = &my_gain[q * nu..(q + 1) * nu];
                                    for k in 0..nu {
                                        da[k] = inv * (dz[k] * gq[k] - s1 - n[k] * s2);
                                    }
                                }
                            }
                        }
                        RecurrentNorm::BatchTrain { .. } => {
                            m1.iter_mut().for_each(|v| *v = 0.0);
                            m2.iter_mut().for_each(|v| *v = 0.0);
                            for r in 0..b_n {
                                let at = (row0 + r) * g4;
                                for (q, c) in chunks.iter().enumerate() {
                                    let dz = unsafe { dz_s.read(at + c.start, nu) };
                                    let n = &cache.normalised[at + c.start..at + c.end];
                                    for k in 0..nu {
                                        let l = q * nu + k;
                                        let dn = f64::from(dz[k] * my_gain[l]);
                                        m1[l] += dn;
                                        m2[l] += dn * f64::from(n[k]);
                                    }
                                }
                            }
                            for l in 0..gp {
                                m1f[l] = (m1[l] / b_n as f64) as f32;
                                m2f[l] = (m2[l] / b_n as f64) as f32;
                            }
                            let inv = &cache.inv_std[t * g4..(t + 1) * g4];
                            for r in 0..b_n {
                                let at = (row0 + r) * g4;
                                for (q, c) in chunks.iter().enumerate() {
                                    let dz = unsafe { dz_s.read(at + c.start, nu) };
                                    let n = &cache.normalised[at + c.start..at + c.end];
                                    let da = unsafe { da_s.write(at + c.start, nu) };
                                    for k in 0..nu {
                                        let l = q * nu + k;
                                        da[k] = inv[c.start + k]
                                            * (dz[k] * my_gain[l] - m1f[l] - n[k] * m2f[l]);
                                    }
                                }
                            }
                        }
                        RecurrentNorm::BatchEval { .. } => {
                            let inv = &cache.inv_std[t * g4..(t + 1) * g4];
                            for r in 0..b_n {
                                let at = (row0 + r) * g4;
                                for (q, c) in chunks.iter().enumerate() {
                                    let dz = unsafe { dz_s.read(at + c.start, nu) };
                                    let da = unsafe { da_s.write(at + c.start, nu) };
                                    for k in 0..nu {
                                        da[k] = dz[k] * my_gain[q * nu + k] * inv[c.start + k];
                                    }
                                }
                            }
                        }
                        RecurrentNorm::None => unreachable!("a gain means a normalisation"),
                    }
                }
                // da_t complete before anyone reads all of it.
                barrier.wait().map_err(aborted)?;
                // dh_{t-1}[:, units] = da_t · W_h[:, units].
                if t > 0 {
                    let da_t = unsafe { dflow_s.read(row0 * g4, b_n * g4) };
                    matmul(
                        &mut dh_next,
                        MatRef::row_major(da_t, b_n, g4),
                        MatRef::row_major(&w_cols, g4, nu),
                        false,
                        Parallelism::None,
                    )?;
                }
            }
            if gain.is_some() {
                for (q, c) in chunks.iter().enumerate() {
                    let out = unsafe { dgain_s.write(c.start, nu) };
                    for k in 0..nu {
                        out[k] = my_dgain[q * nu + k] as f32;
                    }
                }
            }
            Ok(())
        })?;
    }
    // dW_h = Σ_t da_tᵀ · h_{t-1}: step 0 against h0, the rest against hs.
    let da_all = if normalised_mode { &da_all } else { &dz_all };
    let mut dwh = vec![0f32; g4 * h_n];
    let first = b_n * g4;
    matmul(
        &mut dwh,
        MatRef::row_major(&da_all[..first], b_n, g4).t(),
        MatRef::row_major(h0, b_n, h_n),
        false,
        parallelism_for(g4, h_n, b_n),
    )?;
    if t_n > 1 {
        let rows = (t_n - 1) * b_n;
        matmul(
            &mut dwh,
            MatRef::row_major(&da_all[first..], rows, g4).t(),
            MatRef::row_major(&hs[..rows * h_n], rows, h_n),
            true,
            parallelism_for(g4, h_n, rows),
        )?;
    }
    let dx = if gather.is_some() { d_table } else { dz_all };
    Ok((dx, dwh, dgain))
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
        let (out, cache, stats) = forward(&g, &self.norm, x, wh, gain, &self.h0, &self.c0)?;
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

#[cfg(test)]
mod tests {
    use super::{exp, sigmoid, tanh};

    #[test]
    fn the_written_out_nonlinearities_match_libm() {
        let mut worst = (0f32, 0f32, 0f32);
        let mut x = -100.0f32;
        while x <= 100.0 {
            let e = (exp(x) - x.exp()).abs() / x.exp().max(f32::MIN_POSITIVE);
            let s = (sigmoid(x) - 1.0 / (1.0 + (-x).exp())).abs();
            let t = (tanh(x) - x.tanh()).abs();
            if x.abs() < 87.0 {
                worst.0 = worst.0.max(e);
            }
            worst.1 = worst.1.max(s);
            worst.2 = worst.2.max(t);
            x += 0.0137;
        }
        assert!(worst.0 < 4e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 2e-7, "sigmoid absolute error {}", worst.1);
        assert!(worst.2 < 4e-7, "tanh absolute error {}", worst.2);
        // Saturation without NaN or infinity in the limits; NaN propagates.
        assert_eq!((tanh(1e9), tanh(-1e9)), (1.0, -1.0));
        assert_eq!(sigmoid(1e9), 1.0);
        assert!((0.0..1e-37).contains(&sigmoid(-1e9)));
        assert!(exp(1e9).is_finite() && exp(-1e9) >= 0.0);
        assert!(tanh(f32::NAN).is_nan() && sigmoid(f32::NAN).is_nan());
    }
}

#[cfg(test)]
mod worker_tests {
    use super::*;

    fn values(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
            })
            .collect()
    }

    fn modes(g4: usize) -> Vec<RecurrentNorm> {
        vec![
            RecurrentNorm::None,
            RecurrentNorm::Layer { eps: 1e-5 },
            RecurrentNorm::BatchTrain { eps: 1e-5 },
            RecurrentNorm::BatchEval {
                mean: values(7, 2 * g4, 0.3),
                var: values(8, 2 * g4, 1.0)
                    .iter()
                    .map(|v| v.abs() + 0.5)
                    .collect(),
                eps: 1e-5,
            },
        ]
    }

    /// Every output of forward and backward on `workers` workers.
    fn run(workers: usize, g: &LstmGeometry, norm: &RecurrentNorm, seed: u64) -> Vec<Vec<f32>> {
        let (t, b, h) = (g.steps, g.batch, g.hidden);
        let g4 = 4 * h;
        let xproj = values(seed, t * b * g4, 1.0);
        let wh = values(seed + 1, g4 * h, 0.6);
        let gain: Vec<f32> = values(seed + 2, g4, 0.5).iter().map(|v| v + 1.0).collect();
        let (h0, c0) = (values(seed + 3, b * h, 0.5), values(seed + 4, b * h, 0.5));
        let grad_h = values(seed + 5, t * b * h, 1.0);
        let gain = norm.has_gain().then_some(&gain[..]);
        let x = XSource::Rows(&xproj);
        let (hs, cache, stats) = forward_on(workers, g, norm, x, &wh, gain, &h0, &c0).unwrap();
        let (dx, dwh, dgain) = backward_on(
            workers, g, norm, &cache, &hs, &grad_h, &wh, gain, &h0, &c0, None,
        )
        .unwrap();
        vec![
            hs,
            cache.cells,
            cache.gates,
            cache.normalised,
            cache.inv_std,
            stats.mean,
            stats.var,
            dx,
            dwh,
            dgain,
        ]
    }

    /// Within rounding, not bit for bit: a worker's GEMMs have fewer columns,
    /// and gemm sums a one-column product (one unit per worker) in another
    /// order than a wide one.
    #[test]
    fn any_number_of_workers_gives_the_one_worker_numbers() {
        // Uneven unit shares (7 units on 3 or 4 workers), a unit per worker,
        // one row, more workers than units (clamped).
        for &(t, b, h) in &[(3, 4, 7), (2, 3, 2), (4, 1, 5), (2, 5, 3)] {
            let g = LstmGeometry {
                steps: t,
                batch: b,
                hidden: h,
            };
            for norm in modes(4 * h) {
                if matches!(norm, RecurrentNorm::BatchTrain { .. }) && b == 1 {
                    continue;
                }
                let one = run(1, &g, &norm, 40 + h as u64);
                for workers in 2..=4 {
                    let many = run(workers, &g, &norm, 40 + h as u64);
                    for (i, (a, m)) in one.iter().zip(&many).enumerate() {
                        let close = a.len() == m.len()
                            && a.iter()
                                .zip(m)
                                .all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + x.abs().max(y.abs())));
                        assert!(
                            close,
                            "{norm:?}, {t}x{b}x{h}, {workers} workers: output {i} differs"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn reruns_on_two_workers_are_bit_identical() {
        let g = LstmGeometry {
            steps: 5,
            batch: 6,
            hidden: 9,
        };
        for norm in modes(36) {
            let a = run(2, &g, &norm, 3);
            let b = run(2, &g, &norm, 3);
            assert!(a.iter().zip(&b).all(|(x, y)| {
                x.iter()
                    .map(|v| v.to_bits())
                    .eq(y.iter().map(|v| v.to_bits()))
            }));
        }
    }

    #[test]
    fn a_bad_gain_is_an_error_not_a_hang() {
        let g = LstmGeometry {
            steps: 2,
            batch: 2,
            hidden: 3,
        };
        let (x, w, z) = (vec![0f32; 2 * 2 * 12], vec![0f32; 36], vec![0f32; 6]);
        let norm = RecurrentNorm::Layer { eps: 1e-5 };
        let x = XSource::Rows(&x);
        assert!(forward_on(2, &g, &norm, x, &w, Some(&[1.0; 5]), &z, &z).is_err());
        assert!(forward_on(2, &g, &norm, x, &w, None, &z, &z).is_err());
    }
}
