//! The gate-matrix quantizers (METHOD §10 applied to §11): every step the
//! forward pass uses `Ŵ = Q(W)` for `W_x` and `W_h`, each of whose four gate
//! matrices has its own scale (one group per gate, `[H, ·]` consecutive
//! rows; per-channel: one per row), and the gradient with respect to `Ŵ`
//! reaches the float `W` unchanged (straight-through).
//!
//! The loss-aware quantizers read the curvature `D = sqrt(v) + ε` from
//! Adam's second moment as it stands after the previous step, as
//! qgrad-models' loss-aware method does. The iterative ones (LAT
//! approximate, LAQ) warm-start from the previous step's result;
//! TerConnect draws stochastic codes in training (a stream reseeded from
//! `(seed, epoch)` at every epoch, so that a resumed run draws the same
//! codes).
//!
//! # Decision: TerConnect's evaluated model is one seeded draw
//!
//! qgrad-models evaluates TerConnect by deterministic rounding of
//! `clip(W)`. For an LSTM that rounds every weight to 0: trained with
//! stochastic codes, whose mean is `W`, the weights stay well inside
//! (−½, ½) (a ±1 recurrent matrix makes the pre-activations explode, so the
//! network learns small probabilities). The evaluated, saved and exported
//! model is therefore one draw of the stochastic codes from a stream seeded
//! by the run's seed and the tensor (not the epoch): a ternary network of
//! the kind training saw, the same at every evaluation of the same `W`.

use std::collections::HashMap;

use candle_core::{Tensor, Var};
use qgrad_scaled::{quantize, stochastic_ternary, Method, Quantized};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LstmError, Result};
use crate::model::{CharLstm, GateWeights, GATE_MATRICES, WH, WX};

/// The ε of `D = sqrt(v) + ε` (METHOD §10).
pub const CURVATURE_EPS: f32 = 1e-8;

/// One quantized gate-matrix tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedGates {
    /// The parameter ([`WX`] or [`WH`]).
    pub name: String,
    /// `[4H, ·]`.
    pub shape: Vec<usize>,
    /// Scale groups: 4 (one per gate) or `4H` (per row).
    pub groups: usize,
    /// Codes, scales and `Ŵ`.
    pub quantized: Quantized,
}

/// A quantizer of both gate tensors, with its state between steps.
#[derive(Debug)]
pub struct GateQuantizer {
    method: Method,
    per_channel: bool,
    seed: u64,
    warm: HashMap<String, Quantized>,
    rng: ChaCha8Rng,
}

fn stream_seed(seed: u64, epoch: usize) -> u64 {
    seed ^ 0x7e57_c0de_u64.wrapping_mul(epoch as u64 + 1)
}

impl GateQuantizer {
    /// A quantizer with `method`.
    pub fn new(method: Method, per_channel: bool, seed: u64) -> Result<Self> {
        method.validate()?;
        Ok(GateQuantizer {
            method,
            per_channel,
            seed,
            warm: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(stream_seed(seed, 0)),
        })
    }

    /// The method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Restarts TerConnect's stream for `epoch`.
    pub fn start_epoch(&mut self, epoch: usize) {
        self.rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, epoch));
    }

    fn curvature(&self, v: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
        if !self.method.loss_aware() {
            return Ok(None);
        }
        let v = v.ok_or_else(|| {
            LstmError::Config(format!(
                "{} reads Adam's second moment, which is missing",
                self.method
            ))
        })?;
        let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        Ok(Some(v.iter().map(|v| v.sqrt() + CURVATURE_EPS).collect()))
    }

    /// `Q(W)` of one gate tensor. `training`: TerConnect draws, and the
    /// iterative methods warm-start from (and update) the previous step's
    /// result. Otherwise `Q` is a function of `W` and `v` alone (a cold
    /// start; TerConnect's seeded draw, module docs), so that a model loaded from a
    /// checkpoint evaluates exactly as it did when it was saved.
    pub fn quantize(
        &mut self,
        name: &str,
        w: &Tensor,
        v: Option<&Tensor>,
        training: bool,
    ) -> Result<QuantizedGates> {
        let shape = w.dims().to_vec();
        let rows = shape.first().copied().unwrap_or(0);
        if rows == 0 || rows % 4 != 0 {
            return Err(LstmError::Config(format!(
                "'{name}' must have 4·H rows, has shape {shape:?}"
            )));
        }
        let groups = if self.per_channel { rows } else { 4 };
        let values: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let quantized = if self.method == Method::TerConnect {
            let uniforms: Vec<f32> = if training {
                (0..values.len())
                    .map(|_| self.rng.random::<f32>())
                    .collect()
            } else {
                let salt = name
                    .bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31) ^ u64::from(b));
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0xe7a1_0000 ^ salt);
                (0..values.len()).map(|_| rng.random::<f32>()).collect()
            };
            stochastic_ternary(&values, &uniforms)?
        } else {
            let d = self.curvature(v)?;
            quantize(
                self.method,
                &values,
                d.as_deref(),
                groups,
                if training { self.warm.get(name) } else { None },
            )?
        };
        if training {
            self.warm.insert(name.to_string(), quantized.clone());
        }
        Ok(QuantizedGates {
            name: name.to_string(),
            shape,
            groups,
            quantized,
        })
    }

    /// Both gate tensors of `model`, quantized (`v` looks up Adam's second
    /// moment by parameter name).
    pub fn quantize_model(
        &mut self,
        model: &CharLstm,
        v: &dyn Fn(&str) -> Option<Tensor>,
        training: bool,
    ) -> Result<Vec<QuantizedGates>> {
        GATE_MATRICES
            .iter()
            .map(|name| {
                let w = model.param(name)?.as_tensor().clone();
                self.quantize(name, &w, v(name).as_ref(), training)
            })
            .collect()
    }
}

/// `w + (Ŵ − w)` with the difference detached: `Ŵ` forward, the identity
/// backward (the straight-through estimator).
pub fn straight_through(w: &Var, values: &[f32]) -> Result<Tensor> {
    let q = Tensor::from_slice(values, w.dims(), w.device())?;
    Ok((w.as_tensor() + (q - w.as_tensor())?.detach())?)
}

/// The gate weights for the forward pass from quantized tensors: linked to
/// the float parameters (`training`) or the plain quantized values.
pub fn gate_weights(
    model: &CharLstm,
    quantized: &[QuantizedGates],
    training: bool,
) -> Result<GateWeights> {
    let get = |name: &str| -> Result<Tensor> {
        let q = quantized
            .iter()
            .find(|q| q.name == name)
            .ok_or_else(|| LstmError::Config(format!("'{name}' was not quantized")))?;
        let var = model.param(name)?;
        if training {
            straight_through(var, &q.quantized.values)
        } else {
            Ok(Tensor::from_slice(
                &q.quantized.values,
                var.dims(),
                var.device(),
            )?)
        }
    };
    Ok(GateWeights {
        wx: get(WX)?,
        wh: get(WH)?,
    })
}
