//! Structured sparsity co-trained with low-bit weights (METHOD §9): block
//! masks ([`super::sparsity`]) and `k_w`-bit symmetric uniform weights at
//! once; the activations' `k_a` bits are PACT's, set on the network through
//! [`TrainConfig::pact`](crate::TrainConfig) because its clips are
//! parameters the optimizer must see from the start.
//!
//! Every step the forward pass uses `Ŵ = Q(W ⊙ M)`: `k_w = 1` is
//! `α·sign(W)` with `α = mean |W|` over the kept weights, masked ones 0;
//! `k_w ≥ 2` is [`qgrad_scaled::Method::Uniform`] (`α = max |W|`, masked
//! weights are exactly 0.0 and so get code 0); `k_w = 32` is the float `W`.
//! The gradient passes straight through to the float `W`; the mask is
//! re-applied after every update and masked elements are frozen (no
//! gradient, no momentum), so they stay exactly 0.0.
//!
//! # Decisions
//!
//! * One scale per layer (METHOD §9), computed on the host every step from
//!   the current `W`; the evaluation and the export use the same function.
//! * No clipping of `W` (unlike the loss-aware methods of §10): with
//!   `α = max |W|` no weight lies outside the levels' range, so the STE of
//!   the weights passes every gradient.
//! * The masks are chosen when the hook is made, from the weights (block
//!   norm), their accumulated gradient, or a seed; a caller that wants the
//!   warm-up of §9 trains the float network first and then makes the hook.

use candle_core::Tensor;
use qgrad_scaled::{quantize, quantize_masked, Method};
use serde::{Deserialize, Serialize};

use super::sparsity::{block_masks, BlockMask, BlockSparsityHook, BlockSparsityOptions};
use super::{invalid, QuantizedTensor, ScaledWeight};
use crate::error::{ModelsError, Result};
use crate::net::WeightOverrides;
use crate::train::{TrainHook, TrainState};

/// The weight widths of METHOD §9.
pub const WEIGHT_BITS: [u8; 6] = [1, 2, 3, 4, 8, 32];

/// Options of structured sparsity with low-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StructuredOptions {
    /// `k_w` ∈ {1, 2, 3, 4, 8, 32} (32: float weights).
    pub weight_bits: u8,
    /// The block masks; `None` (or compression 1) is dense.
    pub blocks: Option<BlockSparsityOptions>,
}

impl StructuredOptions {
    /// Rejects widths METHOD §9 does not list and bad block options.
    pub fn validate(&self) -> Result<()> {
        if !WEIGHT_BITS.contains(&self.weight_bits) {
            return Err(invalid(format!(
                "weight width {} is not one of 1, 2, 3, 4, 8, 32",
                self.weight_bits
            )));
        }
        if let Some(b) = &self.blocks {
            b.validate()?;
        }
        Ok(())
    }

    /// The weight quantizer (`None` for float weights).
    pub fn quantizer(&self) -> Option<Method> {
        match self.weight_bits {
            32 => None,
            1 => Some(Method::Bwn),
            bits => Some(Method::Uniform { bits }),
        }
    }
}

/// The exported weights of a structured run: scaled codes (`k_w < 32`) or
/// float weights with the masked elements at width 0 (`k_w = 32`).
#[derive(Debug, Clone)]
pub enum StructuredWeights {
    /// `k_w < 32`.
    Scaled(Vec<ScaledWeight>),
    /// `k_w = 32`.
    Float(Vec<QuantizedTensor>),
}

/// The method as a [`TrainHook`] (module docs).
#[derive(Debug)]
pub struct StructuredHook {
    options: StructuredOptions,
    names: Vec<String>,
    sparsity: Option<BlockSparsityHook>,
}

impl StructuredHook {
    /// Chooses the masks (from `state`'s weights and accumulated gradients)
    /// and applies them.
    pub fn new(options: StructuredOptions, state: &mut TrainState) -> Result<Self> {
        options.validate()?;
        let sparsity = match options.blocks {
            Some(blocks) if blocks.compression > 1 => {
                let params = state.network.params_to_host()?;
                let accum = match blocks.selection {
                    super::BlockSelection::AccumulatedGradient => super::accum_to_host(state)?,
                    _ => Vec::new(),
                };
                let masks = block_masks(state.network.arch, &params, &accum, &blocks)?;
                Some(BlockSparsityHook::new(masks, state)?)
            }
            _ => None,
        };
        Ok(StructuredHook {
            options,
            names: super::weight_names(state.network.arch),
            sparsity,
        })
    }

    /// The options.
    pub fn options(&self) -> &StructuredOptions {
        &self.options
    }

    /// The block masks (empty when dense).
    pub fn masks(&self) -> &[BlockMask] {
        self.sparsity.as_ref().map_or(&[], |s| s.masks())
    }

    fn mask_of(&self, name: &str) -> Option<&BlockMask> {
        self.masks().iter().find(|m| m.name == name)
    }

    /// The quantized weights of `state` now.
    fn quantized(&self, state: &TrainState, method: Method) -> Result<Vec<ScaledWeight>> {
        self.names
            .iter()
            .map(|name| {
                let var = state
                    .network
                    .parameter(name)
                    .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}'")))?;
                let shape = var.dims().to_vec();
                let w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                // Masked weights are exactly 0.0, which the uniform levels
                // map to code 0; only the binary quantizer needs the mask.
                let quantized = match self.mask_of(name) {
                    Some(m) if method.binary() => {
                        quantize_masked(method, &w, None, 1, &m.keep, None)
                    }
                    _ => quantize(method, &w, None, 1, None),
                }
                .map_err(|e| ModelsError::Config(format!("{name}: {e}")))?;
                Ok(ScaledWeight {
                    name: name.clone(),
                    method,
                    shape,
                    groups: 1,
                    quantized,
                })
            })
            .collect()
    }

    /// What is exported: the weights as they are now (module docs).
    pub fn finish(&self, state: &TrainState) -> Result<StructuredWeights> {
        if let Some(method) = self.options.quantizer() {
            return Ok(StructuredWeights::Scaled(self.quantized(state, method)?));
        }
        let mut out = Vec::new();
        for p in state.network.params_to_host()? {
            if !self.names.contains(&p.name) {
                continue;
            }
            let widths = match self.mask_of(&p.name) {
                Some(m) => m
                    .keep
                    .iter()
                    .map(|&k| if k { qgrad_fixed::FLOAT } else { 0 })
                    .collect(),
                None => vec![qgrad_fixed::FLOAT; p.values.len()],
            };
            out.push(QuantizedTensor {
                widths,
                exponent: 0,
                name: p.name,
                shape: p.shape,
                values: p.values,
            });
        }
        Ok(StructuredWeights::Float(out))
    }

    /// The parameters the weight quantizer leaves alone (biases, batch norm,
    /// PACT clips as used), as width-32 tensors for the file.
    pub fn float_parameters(&self, state: &TrainState) -> Result<Vec<QuantizedTensor>> {
        let clips = state.network.activation_clips()?;
        let mut out = Vec::new();
        for p in state.network.params_to_host()? {
            if self.names.contains(&p.name) {
                continue;
            }
            let p = clips.iter().find(|c| c.name == p.name).cloned().unwrap_or(p);
            out.push(QuantizedTensor {
                widths: vec![qgrad_fixed::FLOAT; p.values.len()],
                exponent: 0,
                name: p.name,
                shape: p.shape,
                values: p.values,
            });
        }
        Ok(out)
    }

    fn overrides(&self, state: &TrainState, out: &mut WeightOverrides) -> Result<()> {
        let Some(method) = self.options.quantizer() else {
            return Ok(());
        };
        for q in self.quantized(state, method)? {
            let var = state
                .network
                .parameter(&q.name)
                .ok_or_else(|| ModelsError::Other(format!("no parameter '{}'", q.name)))?;
            let w = var.as_tensor();
            let hat = Tensor::from_slice(&q.quantized.values, q.shape.as_slice(), w.device())?;
            // Ŵ + (W − W̄): the value is Ŵ exactly, the gradient reaches W.
            out.insert(q.name.clone(), (hat + (w - w.detach())?)?);
        }
        Ok(())
    }
}

impl TrainHook for StructuredHook {
    fn name(&self) -> &'static str {
        "structured"
    }

    fn forward_weights(
        &mut self,
        state: &TrainState,
        overrides: &mut WeightOverrides,
    ) -> Result<()> {
        self.overrides(state, overrides)
    }

    fn after_update(&mut self, state: &mut TrainState) -> Result<()> {
        match &mut self.sparsity {
            Some(s) => s.after_update(state),
            None => Ok(()),
        }
    }

    fn eval_weights(&self, state: &TrainState, overrides: &mut WeightOverrides) -> Result<()> {
        self.overrides(state, overrides)
    }
}
