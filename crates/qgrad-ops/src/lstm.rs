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
//! Normalisations `N` of the recurrent term (all with a gain `γ` of `[4H]`
//! and no shift: the shift of the sum is the caller's bias):
//! - layer norm: each row of `a` over its `4H` values;
//! - batch norm, training: each column of `a` over the batch, at every
//!   step (the op reports the statistics for the caller's running averages);
//! - batch norm, evaluation: fixed per-step (or shared) statistics.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::custom::f32_values;
use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::OpsError;

/// Rows × hidden units below which the element-wise passes stay on the
/// calling thread (fork/join costs more than the work).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 14;

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

    fn gates(&self) -> usize {
        4 * self.hidden
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

/// The fused recurrence; args `(xproj, wh)` or `(xproj, wh, gain)`. Output
/// `[T, B, H]`: the hidden states (the cell states stay in the cache).
pub(crate) struct LstmOp {
    pub norm: RecurrentNorm,
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
    let n = (x * LOG2E + ROUND) - ROUND;
    // Cody–Waite: ln 2 in two parts, the first with few enough bits that
    // n · LN2_HI is exact, so that |n| up to 126 keeps r accurate.
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // n ∈ [-126, 127]: a normal power of two.
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
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

/// Row-parallel when the work is large enough.
fn for_rows<F>(rows: usize, width: usize, f: F, bufs: &mut [&mut [f32]], widths: &[usize])
where
    F: Fn(usize, &mut [&mut [f32]]) + Sync,
{
    // Split every buffer into per-row chunks of its own width.
    let mut per_row: Vec<Vec<&mut [f32]>> = (0..rows).map(|_| Vec::new()).collect();
    for (buf, &w) in bufs.iter_mut().zip(widths) {
        for (r, chunk) in buf.chunks_mut(w).enumerate().take(rows) {
            per_row[r].push(chunk);
        }
    }
    if rows * width >= PARALLEL_MIN_ELEMENTS && rayon::current_num_threads() > 1 {
        per_row
            .par_iter_mut()
            .enumerate()
            .for_each(|(r, chunks)| f(r, chunks));
    } else {
        for (r, chunks) in per_row.iter_mut().enumerate() {
            f(r, chunks);
        }
    }
}

/// Forward pass: `(hidden states [T, B, H], cache, stats)`.
pub(crate) fn forward(
    g: &LstmGeometry,
    norm: &RecurrentNorm,
    xproj: &[f32],
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
    if norm.has_gain() && gain.map(<[f32]>::len) != Some(g4) {
        return Err(OpsError::Shape(format!(
            "the recurrent normalisation's gain must be [{g4}]"
        )));
    }
    if let RecurrentNorm::BatchEval { mean, var, .. } = norm {
        if mean.is_empty() || mean.len() % g4 != 0 || var.len() != mean.len() {
            return Err(OpsError::Shape(format!(
                "batch-norm statistics must be [steps, {g4}] (got {} and {} values)",
                mean.len(),
                var.len()
            )));
        }
    }
    let mut hs_buf = vec![0f32; t_n * state];
    let mut cs_buf = vec![0f32; t_n * state];
    let (hs, cs) = (&mut hs_buf[..], &mut cs_buf[..]);
    let mut gates = vec![0f32; t_n * b_n * g4];
    let normalised_len = if norm.has_gain() { t_n * b_n * g4 } else { 0 };
    let mut normalised = vec![0f32; normalised_len];
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
    let whv = MatRef::row_major(wh, g4, h_n).t();
    let mut a = vec![0f32; b_n * g4];
    let par = parallelism_for(b_n, g4, h_n);
    for t in 0..t_n {
        let h_prev: &[f32] = if t == 0 {
            h0
        } else {
            &hs[(t - 1) * state..t * state]
        };
        let tg = t * b_n * g4..(t + 1) * b_n * g4;
        if matches!(norm, RecurrentNorm::None) {
            // z = xproj + a straight from the GEMM: no pass over `a`.
            let gates_t = &mut gates[tg.clone()];
            gates_t.copy_from_slice(&xproj[tg.clone()]);
            matmul(gates_t, MatRef::row_major(h_prev, b_n, h_n), whv, true, par)?;
        } else {
            matmul(&mut a, MatRef::row_major(h_prev, b_n, h_n), whv, false, par)?;
        }
        // Column statistics of batch norm, before the row pass.
        if let RecurrentNorm::BatchTrain { eps } | RecurrentNorm::BatchEval { eps, .. } = norm {
            let inv = &mut inv_std[t * g4..(t + 1) * g4];
            let mut mean_t = vec![0f32; g4];
            match norm {
                RecurrentNorm::BatchTrain { .. } => {
                    let mut sum = vec![0f64; g4];
                    for row in a.chunks(g4) {
                        for (s, &x) in sum.iter_mut().zip(row) {
                            *s += f64::from(x);
                        }
                    }
                    let mean: Vec<f64> = sum.iter().map(|s| s / b_n as f64).collect();
                    let mut sq = vec![0f64; g4];
                    for row in a.chunks(g4) {
                        for ((s, &x), m) in sq.iter_mut().zip(row).zip(&mean) {
                            let d = f64::from(x) - m;
                            *s += d * d;
                        }
                    }
                    for j in 0..g4 {
                        let var = sq[j] / b_n as f64;
                        mean_t[j] = mean[j] as f32;
                        inv[j] = (1.0 / (var + f64::from(*eps)).sqrt()) as f32;
                        stats.mean[t * g4 + j] = mean[j] as f32;
                        stats.var[t * g4 + j] = var as f32;
                    }
                }
                RecurrentNorm::BatchEval { mean, var, .. } => {
                    let s = (t.min(mean.len() / g4 - 1)) * g4;
                    for j in 0..g4 {
                        mean_t[j] = mean[s + j];
                        inv[j] = 1.0 / (var[s + j] + eps).sqrt();
                    }
                }
                _ => unreachable!("matched batch norm above"),
            }
            let inv = &inv[..];
            for (row, nrow) in a.chunks(g4).zip(normalised[tg.clone()].chunks_mut(g4)) {
                for j in 0..g4 {
                    nrow[j] = (row[j] - mean_t[j]) * inv[j];
                }
            }
        }
        let layer_eps = match norm {
            RecurrentNorm::Layer { eps } => Some(*eps),
            _ => None,
        };
        let xp = &xproj[tg.clone()];
        let a_ref = &a;
        let step_rows = |r: usize, bufs: &mut [&mut [f32]]| {
            let (gate_row, rest) = bufs.split_at_mut(1);
            let gate_row = &mut *gate_row[0];
            let a_row = &a_ref[r * g4..(r + 1) * g4];
            let x_row = &xp[r * g4..(r + 1) * g4];
            // z = xproj + N(a), into the gate row.
            match (layer_eps, gain) {
                (Some(eps), Some(gain)) => {
                    let (nrow, rest2) = rest.split_at_mut(1);
                    let nrow = &mut *nrow[0];
                    let mean = a_row.iter().map(|&x| f64::from(x)).sum::<f64>() / g4 as f64;
                    let var = a_row
                        .iter()
                        .map(|&x| (f64::from(x) - mean).powi(2))
                        .sum::<f64>()
                        / g4 as f64;
                    let inv = (1.0 / (var + f64::from(eps)).sqrt()) as f32;
                    rest2[0][0] = inv;
                    let mean = mean as f32;
                    for j in 0..g4 {
                        nrow[j] = (a_row[j] - mean) * inv;
                        gate_row[j] = x_row[j] + gain[j] * nrow[j];
                    }
                }
                (None, Some(gain)) => {
                    let nrow = &*rest[0];
                    for j in 0..g4 {
                        gate_row[j] = x_row[j] + gain[j] * nrow[j];
                    }
                }
                // The plain recurrence never gets here: its GEMM adds the
                // input term itself.
                _ => unreachable!("pass 1 runs only for normalised recurrences"),
            }
        };
        // Pass 1: pre-activations (and layer norm), row by row.
        {
            let gates_t = &mut gates[tg.clone()];
            match norm {
                RecurrentNorm::Layer { .. } => {
                    let norm_t = &mut normalised[tg.clone()];
                    let inv_t = &mut inv_std[t * b_n..(t + 1) * b_n];
                    for_rows(
                        b_n,
                        g4,
                        step_rows,
                        &mut [gates_t, norm_t, inv_t],
                        &[g4, g4, 1],
                    );
                }
                RecurrentNorm::None => {}
                _ => {
                    let norm_t = &mut normalised[tg.clone()];
                    for_rows(b_n, g4, step_rows, &mut [gates_t, norm_t], &[g4, g4]);
                }
            }
        }
        // Pass 2: activations and the new state.
        let h_t = &mut hs[t * state..(t + 1) * state];
        let (c_before, c_rest) = cs.split_at_mut(t * state);
        let c_t = &mut c_rest[..state];
        let c_prev: &[f32] = if t == 0 {
            c0
        } else {
            &c_before[(t - 1) * state..]
        };
        let gates_t = &mut gates[tg];
        for_rows(
            b_n,
            g4,
            |r, bufs| {
                let (gate_row, rest) = bufs.split_at_mut(1);
                let gate_row = &mut *gate_row[0];
                let (h_row, c_row) = rest.split_at_mut(1);
                let (h_row, c_row) = (&mut *h_row[0], &mut *c_row[0]);
                let cp = &c_prev[r * h_n..(r + 1) * h_n];
                // One simple loop per non-linearity, so that each vectorises.
                let (ifg, o) = gate_row.split_at_mut(3 * h_n);
                let (if_, g) = ifg.split_at_mut(2 * h_n);
                for z in if_.iter_mut() {
                    *z = sigmoid(*z);
                }
                for z in g.iter_mut() {
                    *z = tanh(*z);
                }
                for z in o.iter_mut() {
                    *z = sigmoid(*z);
                }
                let (i, f) = if_.split_at(h_n);
                for k in 0..h_n {
                    let c = f[k] * cp[k] + i[k] * g[k];
                    c_row[k] = c;
                    h_row[k] = o[k] * tanh(c);
                }
            },
            &mut [gates_t, h_t, c_t],
            &[g4, h_n, h_n],
        );
    }
    Ok((
        hs_buf,
        LstmCache {
            cells: cs_buf,
            gates,
            normalised,
            inv_std,
        },
        stats,
    ))
}

/// `(dxproj [T, B, 4H], dwh [4H, H], dgain [4H] or empty)`.
type LstmGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The gradients of the op's arguments from
/// the gradient of the hidden states `[T, B, H]`.
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
) -> std::result::Result<LstmGrads, OpsError> {
    let (t_n, b_n, h_n, g4) = (g.steps, g.batch, g.hidden, g.gates());
    let state = b_n * h_n;
    if hs.len() != t_n * state || grad_h.len() != hs.len() || cache.cells.len() != hs.len() {
        return Err(OpsError::Internal(
            "LSTM backward: output or its gradient has the wrong size".into(),
        ));
    }
    let (cs, ghs) = (&cache.cells[..], grad_h);
    let mut dz_all = vec![0f32; t_n * b_n * g4];
    let normalised_mode = norm.has_gain();
    let mut da_all = if normalised_mode {
        vec![0f32; t_n * b_n * g4]
    } else {
        Vec::new()
    };
    let mut dgain = vec![0f64; if normalised_mode { g4 } else { 0 }];
    let mut dh_next = vec![0f32; state];
    let mut dc_next = vec![0f32; state];
    let par = parallelism_for(b_n, h_n, g4);
    for t in (0..t_n).rev() {
        let tg = t * b_n * g4..(t + 1) * b_n * g4;
        let c_prev = if t == 0 {
            c0
        } else {
            &cs[(t - 1) * state..t * state]
        };
        let c_t = &cs[t * state..(t + 1) * state];
        let gates_t = &cache.gates[tg.clone()];
        let gh_t = &ghs[t * state..(t + 1) * state];
        let dh_in = &dh_next;
        {
            let dz_t = &mut dz_all[tg.clone()];
            for_rows(
                b_n,
                g4,
                |r, bufs| {
                    let (dz_row, rest) = bufs.split_at_mut(1);
                    let dz_row = &mut *dz_row[0];
                    let dc_row = &mut *rest[0];
                    let hr = r * h_n..(r + 1) * h_n;
                    let gr = &gates_t[r * g4..(r + 1) * g4];
                    let (ct, cp) = (&c_t[hr.clone()], &c_prev[hr.clone()]);
                    let (gh, dhn) = (&gh_t[hr.clone()], &dh_in[hr]);
                    for k in 0..h_n {
                        let (i, f, gg, o) = (gr[k], gr[h_n + k], gr[2 * h_n + k], gr[3 * h_n + k]);
                        let dh = gh[k] + dhn[k];
                        let tc = tanh(ct[k]);
                        let dc = dc_row[k] + dh * o * (1.0 - tc * tc);
                        dz_row[k] = dc * gg * i * (1.0 - i);
                        dz_row[h_n + k] = dc * cp[k] * f * (1.0 - f);
                        dz_row[2 * h_n + k] = dc * i * (1.0 - gg * gg);
                        dz_row[3 * h_n + k] = dh * tc * o * (1.0 - o);
                        dc_row[k] = dc * f;
                    }
                },
                &mut [dz_t, &mut dc_next],
                &[g4, h_n],
            );
        }
        // The normalisation's backward: da_t from dz_t.
        if let Some(gain) = gain.filter(|_| normalised_mode) {
            let dz_t = &dz_all[tg.clone()];
            let n_t = &cache.normalised[tg.clone()];
            for (dzr, nr) in dz_t.chunks(g4).zip(n_t.chunks(g4)) {
                for j in 0..g4 {
                    dgain[j] += f64::from(dzr[j]) * f64::from(nr[j]);
                }
            }
            let da_t = &mut da_all[tg.clone()];
            match norm {
                RecurrentNorm::Layer { .. } => {
                    let inv_t = &cache.inv_std[t * b_n..(t + 1) * b_n];
                    let row = |r: usize, bufs: &mut [&mut [f32]]| {
                        let da = &mut *bufs[0];
                        let (dzr, nr) = (&dz_t[r * g4..(r + 1) * g4], &n_t[r * g4..(r + 1) * g4]);
                        let (mut m1, mut m2) = (0f64, 0f64);
                        for j in 0..g4 {
                            let dn = f64::from(dzr[j] * gain[j]);
                            m1 += dn;
                            m2 += dn * f64::from(nr[j]);
                        }
                        let (m1, m2) = ((m1 / g4 as f64) as f32, (m2 / g4 as f64) as f32);
                        let inv = inv_t[r];
                        for j in 0..g4 {
                            da[j] = inv * (dzr[j] * gain[j] - m1 - nr[j] * m2);
                        }
                    };
                    for_rows(b_n, g4, row, &mut [da_t], &[g4]);
                }
                RecurrentNorm::BatchTrain { .. } => {
                    let inv = &cache.inv_std[t * g4..(t + 1) * g4];
                    let (mut m1, mut m2) = (vec![0f64; g4], vec![0f64; g4]);
                    for (dzr, nr) in dz_t.chunks(g4).zip(n_t.chunks(g4)) {
                        for j in 0..g4 {
                            let dn = f64::from(dzr[j] * gain[j]);
                            m1[j] += dn;
                            m2[j] += dn * f64::from(nr[j]);
                        }
                    }
                    let m1: Vec<f32> = m1.iter().map(|s| (s / b_n as f64) as f32).collect();
                    let m2: Vec<f32> = m2.iter().map(|s| (s / b_n as f64) as f32).collect();
                    for ((da, dzr), nr) in
                        da_t.chunks_mut(g4).zip(dz_t.chunks(g4)).zip(n_t.chunks(g4))
                    {
                        for j in 0..g4 {
                            da[j] = inv[j] * (dzr[j] * gain[j] - m1[j] - nr[j] * m2[j]);
                        }
                    }
                }
                RecurrentNorm::BatchEval { .. } => {
                    let inv = &cache.inv_std[t * g4..(t + 1) * g4];
                    for (da, dzr) in da_t.chunks_mut(g4).zip(dz_t.chunks(g4)) {
                        for j in 0..g4 {
                            da[j] = dzr[j] * gain[j] * inv[j];
                        }
                    }
                }
                RecurrentNorm::None => unreachable!("normalised mode"),
            }
        }
        // dh_{t-1} = da_t · W_h.
        if t > 0 {
            let da_t = if normalised_mode {
                &da_all[tg]
            } else {
                &dz_all[tg]
            };
            matmul(
                &mut dh_next,
                MatRef::row_major(da_t, b_n, g4),
                MatRef::row_major(wh, g4, h_n),
                false,
                par,
            )?;
        }
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
    Ok((dz_all, dwh, dgain.iter().map(|&s| s as f32).collect()))
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

impl LstmOp {
    fn run_forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gain: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = LstmGeometry::new(xl.dims(), wl.dims())?;
        let xproj = f32_values("LSTM input projection", xs, xl)?;
        let wh = f32_values("LSTM recurrent weight", ws, wl)?;
        let gain = match gain {
            Some((s, l)) => Some(f32_values("LSTM normalisation gain", s, l)?),
            None => None,
        };
        let (out, cache, stats) = forward(&g, &self.norm, xproj, wh, gain, &self.h0, &self.c0)?;
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
        let g = LstmGeometry::new(xproj.dims(), wh.dims())?;
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
