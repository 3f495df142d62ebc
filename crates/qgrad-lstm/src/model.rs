//! The character LSTM (METHOD §11): one LSTM layer over one-hot characters,
//! its normalisation, and a float softmax layer.
//!
//! The input term `W_x·x_t` of a one-hot `x_t` is column `x_t` of `W_x`, so
//! the input projection of a whole sequence is a row gather from the
//! `[V, 4H]` table `W_xᵀ + b`; layer norm of that term is a function of the
//! row alone and is applied to the `V` table rows before the gather. The
//! recurrence is qgrad-ops' fused [`qgrad_ops::lstm_sequence_gathered`] (or
//! [`qgrad_ops::lstm_sequence`] where batch norm of the input term needs the
//! gathered rows).
//!
//! # Decisions
//!
//! * Initialisation: PyTorch's `nn.LSTM` (every weight `U(−1/√H, 1/√H)`),
//!   forget-gate bias 1 (METHOD §11), other biases 0; the softmax layer
//!   likewise.
//! * Weight norm rescales each row of the (quantized) gate matrix to a
//!   learned norm `g`, initialised to the norm of the row at initialisation,
//!   so a quantized matrix starts with the float matrix's row norms: the
//!   normalisation applies to what the forward pass multiplies with.
//! * Layer and batch norm have a gain per pre-activation and no shift of
//!   their own (the LSTM bias is the shift of the sum). Gains start at 1
//!   for layer norm and 0.1 for batch norm (Cooijmans et al.'s
//!   recommendation for recurrent batch norm).
//! * Batch norm in training normalises with the batch statistics of each
//!   time step, for both terms (the recurrent term cannot do otherwise: its
//!   later steps depend on the earlier ones). The options differ in the
//!   running averages that evaluation uses: one per step of the sequence
//!   (later steps than the training length use the last), or one shared by
//!   all steps (pooled over the steps: mean of the means; mean of the
//!   variances plus the variance of the means). Running averages use
//!   momentum 0.1 and the unbiased variance, as PyTorch's.
//! * Steps of batch norm are counted from the start of each sequence of
//!   `seq_len` characters, also when the hidden state carries over.

use candle_core::{DType, Device, Tensor, Var};
use qgrad_ops::{lstm_sequence, lstm_sequence_gathered, LstmState, RecurrentNorm};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{LstmConfig, Normalisation};
use crate::error::{LstmError, Result};

/// Layer norm's ε.
pub const LN_EPS: f64 = 1e-5;
/// Batch norm's ε.
pub const BN_EPS: f64 = 1e-5;
/// Batch norm's running-average momentum.
pub const BN_MOMENTUM: f32 = 0.1;
/// Added to a row's squared norm before the root (weight norm):
/// `‖w‖ = sqrt(Σ w² + ε)`.
pub const WN_EPS: f64 = 1e-8;

/// The input gate matrices `[4H, V]` (rows gate-major: i, f, g, o).
pub const WX: &str = "lstm.wx";
/// The recurrent gate matrices `[4H, H]`.
pub const WH: &str = "lstm.wh";
/// The gate bias `[4H]`.
pub const BIAS: &str = "lstm.bias";
/// Weight norm's row norms of `W_x` `[4H]`.
pub const WX_NORM: &str = "lstm.wx.norm";
/// Weight norm's row norms of `W_h` `[4H]`.
pub const WH_NORM: &str = "lstm.wh.norm";
/// Layer or batch norm's gain of the input term `[4H]`.
pub const X_GAIN: &str = "lstm.x_gain";
/// Layer or batch norm's gain of the recurrent term `[4H]`.
pub const H_GAIN: &str = "lstm.h_gain";
/// The softmax layer's weight `[V, H]`.
pub const OUT_WEIGHT: &str = "out.weight";
/// The softmax layer's bias `[V]`.
pub const OUT_BIAS: &str = "out.bias";

/// The gate matrices the quantizers act on.
pub const GATE_MATRICES: [&str; 2] = [WX, WH];

/// The gates along the `4H` axis.
pub const GATES: [&str; 4] = ["input", "forget", "cell", "output"];

/// Batch norm's running averages, `[S, 4H]` each, row-major (`S` the
/// sequence length for per-step statistics, 1 for shared ones).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Rows `S`.
    pub steps: usize,
    /// Input term: means.
    pub x_mean: Vec<f32>,
    /// Input term: variances.
    pub x_var: Vec<f32>,
    /// Recurrent term: means.
    pub h_mean: Vec<f32>,
    /// Recurrent term: variances.
    pub h_var: Vec<f32>,
}

/// The batch statistics of one training step, `[T, 4H]` each.
#[derive(Debug, Clone)]
pub struct StepStatistics {
    x_mean: Vec<f32>,
    x_var: Vec<f32>,
    h_mean: Vec<f32>,
    h_var: Vec<f32>,
    steps: usize,
    batch: usize,
}

/// The two gate matrices as the forward pass multiplies with them: float,
/// quantized, or quantized and linked to the float ones by the
/// straight-through estimator.
#[derive(Debug, Clone)]
pub struct GateWeights {
    /// `[4H, V]`.
    pub wx: Tensor,
    /// `[4H, H]`.
    pub wh: Tensor,
}

/// Training (batch statistics) or evaluation (running statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Batch norm uses the batch's statistics and reports them.
    Train,
    /// Batch norm uses the running averages; `start_step` is the position of
    /// the first step within its sequence.
    Eval {
        /// Step index of the first input.
        start_step: usize,
    },
}

/// The input term handed to the recurrence (see `CharLstm::forward`).
enum Input {
    /// `[V, 4H]`, gathered by the op.
    Table(Tensor),
    /// `[T, B, 4H]`.
    Projected(Tensor),
}

/// What [`CharLstm::forward`] returns.
#[derive(Debug)]
pub struct Forward {
    /// `[T·B, V]`, time-major (row `t·B + b`).
    pub logits: Tensor,
    /// The state after the last step (detached).
    pub last: LstmState,
    /// Training-mode batch norm: this step's statistics.
    pub stats: Option<StepStatistics>,
}

/// A one-layer character LSTM with its parameters.
#[derive(Debug)]
pub struct CharLstm {
    /// The run it belongs to.
    pub config: LstmConfig,
    /// Vocabulary size `V`.
    pub vocab: usize,
    params: Vec<(String, Var)>,
    /// Batch norm's running averages (batch norms only).
    pub running: Option<RunningStats>,
    device: Device,
}

fn uniform(rng: &mut ChaCha8Rng, n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-k..k)).collect()
}

fn row_norms(w: &[f32], cols: usize) -> Vec<f32> {
    w.chunks(cols)
        .map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect()
}

impl CharLstm {
    /// A freshly initialised model for a vocabulary of `vocab` characters.
    pub fn new(config: &LstmConfig, vocab: usize, device: &Device) -> Result<Self> {
        config.validate()?;
        if vocab < 2 {
            return Err(LstmError::Config(format!(
                "a language model needs at least 2 distinct characters, the corpus has {vocab}"
            )));
        }
        let h = config.hidden;
        let g4 = 4 * h;
        let k = 1.0 / (h as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let wx = uniform(&mut rng, g4 * vocab, k);
        let wh = uniform(&mut rng, g4 * h, k);
        let mut bias = vec![0f32; g4];
        bias[h..2 * h].fill(1.0);
        let out_w = uniform(&mut rng, vocab * h, k);
        let var = |v: Vec<f32>, dims: &[usize]| Var::from_vec(v, dims, device);
        let mut params = Vec::new();
        match config.norm {
            Normalisation::Weight => {
                params.push((WX_NORM.to_string(), var(row_norms(&wx, vocab), &[g4])?));
                params.push((WH_NORM.to_string(), var(row_norms(&wh, h), &[g4])?));
            }
            Normalisation::Layer => {
                params.push((X_GAIN.to_string(), var(vec![1.0; g4], &[g4])?));
                params.push((H_GAIN.to_string(), var(vec![1.0; g4], &[g4])?));
            }
            Normalisation::BatchPerStep | Normalisation::BatchShared => {
                params.push((X_GAIN.to_string(), var(vec![0.1; g4], &[g4])?));
                params.push((H_GAIN.to_string(), var(vec![0.1; g4], &[g4])?));
            }
            Normalisation::None => {}
        }
        params.splice(
            0..0,
            [
                (WX.to_string(), var(wx, &[g4, vocab])?),
                (WH.to_string(), var(wh, &[g4, h])?),
                (BIAS.to_string(), var(bias, &[g4])?),
                (OUT_WEIGHT.to_string(), var(out_w, &[vocab, h])?),
                (OUT_BIAS.to_string(), var(vec![0.0; vocab], &[vocab])?),
            ],
        );
        let running = config.norm.batch().then(|| {
            let steps = match config.norm {
                Normalisation::BatchPerStep => config.seq_len,
                _ => 1,
            };
            RunningStats {
                steps,
                x_mean: vec![0.0; steps * g4],
                x_var: vec![1.0; steps * g4],
                h_mean: vec![0.0; steps * g4],
                h_var: vec![1.0; steps * g4],
            }
        });
        Ok(CharLstm {
            config: config.clone(),
            vocab,
            params,
            running,
            device: device.clone(),
        })
    }

    /// The parameters, by name, in a fixed order.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameter `name`.
    pub fn param(&self, name: &str) -> Result<&Var> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| LstmError::Config(format!("the model has no parameter '{name}'")))
    }

    /// The float gate matrices (no quantizer).
    pub fn float_gate_weights(&self) -> Result<GateWeights> {
        Ok(GateWeights {
            wx: self.param(WX)?.as_tensor().clone(),
            wh: self.param(WH)?.as_tensor().clone(),
        })
    }

    /// The row-normalised matrix `g_r · w_r / sqrt(‖w_r‖² + ε)` (weight norm).
    fn weight_normalised(&self, w: &Tensor, norm: &str) -> Result<Tensor> {
        let g = self.param(norm)?.as_tensor();
        // ε inside the root: a TerConnect draw can zero a whole row, where
        // the root's derivative would be infinite.
        let n = (w.sqr()?.sum_keepdim(1)? + WN_EPS)?.sqrt()?;
        Ok(w.broadcast_mul(&g.unsqueeze(1)?.broadcast_div(&n)?)?)
    }

    /// The gate matrices after weight norm (the others: as given).
    pub fn effective_gate_weights(&self, weights: &GateWeights) -> Result<GateWeights> {
        Ok(match self.config.norm {
            Normalisation::Weight => GateWeights {
                wx: self.weight_normalised(&weights.wx, WX_NORM)?,
                wh: self.weight_normalised(&weights.wh, WH_NORM)?,
            },
            _ => weights.clone(),
        })
    }

    /// Running averages for steps `start .. start + steps`, as `[steps, 4H]`
    /// tensors (input mean, input var, recurrent mean, recurrent var).
    fn running_rows(&self, start: usize, steps: usize) -> Result<[Tensor; 4]> {
        let r = self
            .running
            .as_ref()
            .ok_or_else(|| LstmError::Config("batch norm without running statistics".into()))?;
        let g4 = 4 * self.config.hidden;
        let pick = |v: &[f32]| -> Result<Tensor> {
            let mut out = Vec::with_capacity(steps * g4);
            for t in 0..steps {
                let s = (start + t).min(r.steps - 1);
                out.extend_from_slice(&v[s * g4..(s + 1) * g4]);
            }
            Ok(Tensor::from_vec(out, (steps, g4), &self.device)?)
        };
        Ok([
            pick(&r.x_mean)?,
            pick(&r.x_var)?,
            pick(&r.h_mean)?,
            pick(&r.h_var)?,
        ])
    }

    /// The logits of `tokens` (time-major: `tokens[t·B + b]` is row `b`'s
    /// input at step `t`, `u32`, `[T·B]`) from `state` (zeros when `None`).
    pub fn forward(
        &self,
        weights: &GateWeights,
        tokens: &Tensor,
        steps: usize,
        batch: usize,
        state: Option<&LstmState>,
        mode: Mode,
    ) -> Result<Forward> {
        let h = self.config.hidden;
        let g4 = 4 * h;
        if tokens.dims() != [steps * batch] {
            return Err(LstmError::Config(format!(
                "{:?} tokens for {steps} steps of {batch} rows",
                tokens.dims()
            )));
        }
        let w = self.effective_gate_weights(weights)?;
        let bias = self.param(BIAS)?.as_tensor();
        let table = w.wx.t()?.contiguous()?; // [V, 4H]
        let mut stats = None;
        let running = match (self.config.norm.batch(), mode) {
            (true, Mode::Eval { start_step }) => Some(self.running_rows(start_step, steps)?),
            _ => None,
        };
        // The input term: a row of a `[V, 4H]` table per character. Where the
        // table is the same for every step (no, weight or layer norm of the
        // input term), the fused op gathers its rows itself; batch norm of
        // the input term normalises the gathered rows per step, so those
        // are built here.
        let input = match self.config.norm {
            Normalisation::Layer => {
                let mean = table.mean_keepdim(1)?;
                let centered = table.broadcast_sub(&mean)?;
                let var = centered.sqr()?.mean_keepdim(1)?;
                let n = centered.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
                Input::Table(
                    n.broadcast_mul(self.param(X_GAIN)?.as_tensor())?
                        .broadcast_add(bias)?,
                )
            }
            Normalisation::BatchPerStep | Normalisation::BatchShared => {
                let raw = table.index_select(tokens, 0)?.reshape((steps, batch, g4))?;
                let gain = self.param(X_GAIN)?.as_tensor();
                let n = match &running {
                    None => {
                        let mean = raw.mean_keepdim(1)?;
                        let centered = raw.broadcast_sub(&mean)?;
                        let var = centered.sqr()?.mean_keepdim(1)?;
                        stats = Some((
                            mean.flatten_all()?.to_vec1::<f32>()?,
                            var.flatten_all()?.to_vec1::<f32>()?,
                        ));
                        centered.broadcast_div(&(var + BN_EPS)?.sqrt()?)?
                    }
                    Some([xm, xv, _, _]) => {
                        let inv = (xv + BN_EPS)?.sqrt()?.recip()?.unsqueeze(1)?;
                        raw.broadcast_sub(&xm.unsqueeze(1)?)?.broadcast_mul(&inv)?
                    }
                };
                Input::Projected(n.broadcast_mul(gain)?.broadcast_add(bias)?)
            }
            Normalisation::None | Normalisation::Weight => Input::Table(table.broadcast_add(bias)?),
        };
        let h_gain = match self.config.norm {
            Normalisation::Layer | Normalisation::BatchPerStep | Normalisation::BatchShared => {
                Some(self.param(H_GAIN)?.as_tensor())
            }
            _ => None,
        };
        let norm = match (self.config.norm, h_gain, &running) {
            (Normalisation::Layer, Some(gain), _) => RecurrentNorm::Layer { gain, eps: LN_EPS },
            (_, Some(gain), None) => RecurrentNorm::BatchTrain { gain, eps: BN_EPS },
            (_, Some(gain), Some([_, _, hm, hv])) => RecurrentNorm::BatchEval {
                gain,
                mean: hm,
                var: hv,
                eps: BN_EPS,
            },
            _ => RecurrentNorm::None,
        };
        let seq = match &input {
            Input::Table(t) => lstm_sequence_gathered(t, tokens, steps, batch, &w.wh, state, norm)?,
            Input::Projected(x) => lstm_sequence(x, &w.wh, state, norm)?,
        };
        let hidden = seq.hidden.reshape((steps * batch, h))?;
        let logits = qgrad_ops::linear(
            &hidden,
            self.param(OUT_WEIGHT)?.as_tensor(),
            Some(self.param(OUT_BIAS)?.as_tensor()),
        )?;
        let stats = match (stats, seq.step_stats) {
            (Some((x_mean, x_var)), Some((hm, hv))) => Some(StepStatistics {
                x_mean,
                x_var,
                h_mean: hm.flatten_all()?.to_vec1()?,
                h_var: hv.flatten_all()?.to_vec1()?,
                steps,
                batch,
            }),
            _ => None,
        };
        Ok(Forward {
            logits,
            last: seq.last,
            stats,
        })
    }

    /// Folds one training step's batch statistics into the running averages.
    pub fn update_running(&mut self, s: &StepStatistics) {
        let g4 = 4 * self.config.hidden;
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let m = BN_MOMENTUM;
        let blend = |run: &mut [f32], new: &[f32]| {
            for (r, n) in run.iter_mut().zip(new) {
                *r = (1.0 - m) * *r + m * n;
            }
        };
        if r.steps == 1 {
            // Pooled over the steps (module docs), unbiased over T·B values.
            let n = (s.steps * s.batch) as f32;
            let pool = |mean: &[f32], var: &[f32]| -> (Vec<f32>, Vec<f32>) {
                let mut pm = vec![0f32; g4];
                for row in mean.chunks(g4) {
                    for (p, x) in pm.iter_mut().zip(row) {
                        *p += x / s.steps as f32;
                    }
                }
                let mut pv = vec![0f32; g4];
                for (mrow, vrow) in mean.chunks(g4).zip(var.chunks(g4)) {
                    for j in 0..g4 {
                        let d = mrow[j] - pm[j];
                        pv[j] += (vrow[j] + d * d) / s.steps as f32;
                    }
                }
                for v in &mut pv {
                    *v *= n / (n - 1.0).max(1.0);
                }
                (pm, pv)
            };
            let (xm, xv) = pool(&s.x_mean, &s.x_var);
            let (hm, hv) = pool(&s.h_mean, &s.h_var);
            blend(&mut r.x_mean, &xm);
            blend(&mut r.x_var, &xv);
            blend(&mut r.h_mean, &hm);
            blend(&mut r.h_var, &hv);
        } else {
            let rows = s.steps.min(r.steps) * g4;
            let unbias = s.batch as f32 / (s.batch as f32 - 1.0).max(1.0);
            let ub = |v: &[f32]| v.iter().map(|x| x * unbias).collect::<Vec<_>>();
            blend(&mut r.x_mean[..rows], &s.x_mean[..rows]);
            blend(&mut r.x_var[..rows], &ub(&s.x_var[..rows]));
            blend(&mut r.h_mean[..rows], &s.h_mean[..rows]);
            blend(&mut r.h_var[..rows], &ub(&s.h_var[..rows]));
        }
    }

    /// Time-major `u32` tokens of a chunk stored row-major (`r·T + t`).
    pub fn time_major(&self, tokens: &[u16], steps: usize, batch: usize) -> Result<Tensor> {
        if tokens.len() != steps * batch {
            return Err(LstmError::Config(format!(
                "{} tokens for {steps} steps of {batch} rows",
                tokens.len()
            )));
        }
        let mut tm = vec![0u32; tokens.len()];
        for r in 0..batch {
            for t in 0..steps {
                let tok = tokens[r * steps + t] as usize;
                if tok >= self.vocab {
                    return Err(LstmError::Config(format!(
                        "token {tok} is outside the model's vocabulary of {}",
                        self.vocab
                    )));
                }
                tm[t * batch + r] = tok as u32;
            }
        }
        Ok(Tensor::from_vec(tm, steps * batch, &self.device)?)
    }

    /// Replaces the parameter values and running averages (checkpoint
    /// resume, loading a saved model).
    pub(crate) fn set_param(&self, name: &str, value: &Tensor) -> Result<()> {
        let var = self.param(name)?;
        if var.dims() != value.dims() {
            return Err(LstmError::Config(format!(
                "'{name}' is {:?} in the model and {:?} in the file",
                var.dims(),
                value.dims()
            )));
        }
        var.set(&value.to_dtype(DType::F32)?.to_device(&self.device)?)?;
        Ok(())
    }
}
