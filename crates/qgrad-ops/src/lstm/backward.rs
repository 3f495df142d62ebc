//! The backward pass through time on a team of workers, and `dW_h` at the
//! end (module docs of `lstm`).

use gemm::Parallelism;

use super::kernels::{gate_grad_row, row_grad_sums};
use super::{aborted, LstmCache, LstmGeometry, RecurrentNorm, WorkerShare};
use crate::gemm_f32::{matmul, parallelism_for, MatRef};
use crate::workers::{run_team, SharedBuf};
use crate::OpsError;

/// `(dx, dwh [4H, H], dgain [4H] or empty)`, `dx` the gradient of the
/// input: `[T, B, 4H]`, or `[V, 4H]` for a gathered table.
type LstmGrads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The input of a gathered forward pass ([`XSource::Gather`]): its tokens
/// and the table's row count.
#[derive(Clone, Copy)]
pub(crate) struct Gathered<'a> {
    pub tokens: &'a [u32],
    pub vocab: usize,
}

/// The gradients of the op's arguments from the gradient of the hidden
/// states `[T, B, H]`, on `workers` workers (at most one per unit; the op
/// uses [`workers_for`](super::workers_for)).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
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
            let WorkerShare {
                units,
                chunks,
                rows: my_rows,
                gain: my_gain,
            } = WorkerShare::new(me, workers, g, gain);
            let nu = units.len();
            let gp = 4 * nu;
            // W_h's columns of this worker's units, `[4H, nu]`, for
            // dh_{t-1}[:, units] = da_t · W_h[:, units].
            let mut w_cols = Vec::with_capacity(g4 * nu);
            for row in wh.chunks(h_n) {
                w_cols.extend_from_slice(&row[units.clone()]);
            }
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
