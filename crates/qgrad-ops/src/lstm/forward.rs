//! The forward pass of the recurrence on a team of workers (module docs of
//! `lstm`, "Threads").

use gemm::Parallelism;

use super::kernels::{activate_row, row_mean_var};
use super::{aborted, LstmCache, LstmGeometry, RecurrentNorm, StepStats, WorkerShare, XSource};
use crate::gemm_f32::{matmul, MatRef};
use crate::workers::{run_team, SharedBuf};
use crate::OpsError;

/// Forward pass on `workers` workers (at most one per unit; the op uses
/// [`workers_for`](super::workers_for)): `(hidden states [T, B, H], cache,
/// stats)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
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
            let WorkerShare {
                units,
                chunks,
                rows: my_rows,
                gain: my_gain,
            } = WorkerShare::new(me, workers, g, gain);
            let nu = units.len();
            let gp = 4 * nu;
            // This worker's rows of W_h (its units of the four gates), copied
            // once per sequence: gemm reads them every step without the
            // other workers' rows in its caches.
            let mut w_mine = Vec::with_capacity(gp * h_n);
            for c in &chunks {
                w_mine.extend_from_slice(&wh[c.start * h_n..c.end * h_n]);
            }
            let w_mine = MatRef::row_major(&w_mine, gp, h_n).t();
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
