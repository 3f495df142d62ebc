//! Structured sparsity co-trained with low-bit weights (METHOD §9): block
//! masks ([`super::sparsity`]) and `k_w`-bit symmetric uniform weights at
//! once; the activations' `k_a` bits are PACT's, set on the network through
//! [`TrainConfig::pact`](crate::TrainConfig) because its clips are
//! parameters the optimizer must see from the start.
//!
//! Every step the forward pass uses `Ŵ = Q(W ⊙ M)`: `k_w = 1` is
//! `α·sign(W)` with `α = mean |W|` over the kept weights, masked ones 0;
//! `k_w ≥ 2` is [`qgrad_scaled::Method::Uniform`] (`α = max |W|`, masked
//! weights are exactly 0.0 and so get code 0) or, as an option
//! ([`WeightScale::LeastSquares`]), the same levels with the least-squares
//! scale; `k_w = 32` is the float `W`.
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

use qgrad_scaled::{quantize, quantize_masked, Method};
use serde::{Deserialize, Serialize};

use super::sparsity::{block_masks, BlockMask, BlockSparsityHook, BlockSparsityOptions};
use super::{invalid, QuantizedTensor, ScaledWeight};
use crate::error::{ModelsError, Result};
use crate::net::WeightOverrides;
use crate::train::{TrainHook, TrainState};

/// The weight widths of METHOD §9.
pub const WEIGHT_BITS: [u8; 6] = [1, 2, 3, 4, 8, 32];

/// The scale `α` of `k_w ≥ 2`-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightScale {
    /// `α = max |W|` of the layer (METHOD §9's decision; the default).
    #[default]
    Max,
    /// The least-squares uniform scale, `α` minimising `Σ (α·b(α) − W)²`
    /// with `b(α)` the nearest levels (Lloyd iterations from the previous
    /// step's `α`; qgrad-scaled's LAQ solver at constant curvature). With
    /// `α = max |W|` most weights of a 2- or 3-bit layer round to 0 (the
    /// threshold is `α/2`); this keeps the levels where the weights are.
    LeastSquares,
}

/// Options of structured sparsity with low-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StructuredOptions {
    /// `k_w` ∈ {1, 2, 3, 4, 8, 32} (32: float weights).
    pub weight_bits: u8,
    /// The block masks; `None` (or compression 1) is dense.
    pub blocks: Option<BlockSparsityOptions>,
    /// How `α` of `k_w ≥ 2` is chosen.
    #[serde(default)]
    pub scale: WeightScale,
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
        match (self.weight_bits, self.scale) {
            (32, _) => None,
            (1, _) => Some(Method::Bwn),
            (bits, WeightScale::Max) => Some(Method::Uniform { bits }),
            // The codes and levels are the uniform ones; only α differs.
            (bits, WeightScale::LeastSquares) => Some(Method::Laq { bits, log: false }),
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
    /// The last step's result per weight: the least-squares scale starts
    /// from it (a resumed run starts from `max |W|` again).
    warm: std::sync::Mutex<std::collections::HashMap<String, qgrad_scaled::Quantized>>,
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
            warm: Default::default(),
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
                let mut warm = self
                    .warm
                    .lock()
                    .map_err(|_| ModelsError::Other("warm-start lock poisoned".into()))?;
                let quantized = match self.mask_of(name) {
                    Some(m) if method.binary() => {
                        quantize_masked(method, &w, None, 1, &m.keep, None)
                    }
                    _ => quantize(method, &w, None, 1, warm.get(name)),
                }
                .map_err(|e| ModelsError::Config(format!("{name}: {e}")))?;
                // Only the least-squares scale starts from the last step's
                // result; the others would pay a copy of every code and value.
                if matches!(method, Method::Laq { .. }) {
                    warm.insert(name.clone(), quantized.clone());
                }
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
        super::float_parameters(state, &self.names)
    }

    fn overrides(&self, state: &TrainState, out: &mut WeightOverrides) -> Result<()> {
        match self.options.quantizer() {
            Some(method) => {
                super::straight_through_owned(state, self.quantized(state, method)?, out)
            }
            None => Ok(()),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::methods::BlockSelection;
    use crate::train::OptimizerKind;
    use crate::{train, Arch, TrainConfig};
    use candle_core::Device;
    use std::path::Path;

    #[test]
    fn masks_hold_and_codes_keep_to_their_levels_through_training() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train_set, test_set) = load_mnist(&dir).unwrap();
        let (train_set, test_set) = (train_set.take(1200), test_set.take(100));
        let arch: Arch = "mlp-64x2".parse().unwrap();
        for (weight_bits, scale) in [
            (1, WeightScale::Max),
            (2, WeightScale::Max),
            (3, WeightScale::LeastSquares),
            (32, WeightScale::Max),
        ] {
            let mut config = TrainConfig::default_for(arch);
            (config.epochs, config.batch_size, config.lr, config.progress) = (2, 20, 0.01, false);
            config.optimizer = OptimizerKind::ADAM;
            let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
            let options = StructuredOptions {
                weight_bits,
                blocks: Some(BlockSparsityOptions {
                    block: (8, 8),
                    compression: 4,
                    selection: BlockSelection::Random { seed: 2 },
                    dense_first_last: false,
                }),
                scale,
            };
            let mut hook = StructuredHook::new(options, &mut state).unwrap();
            // 120 optimizer steps.
            train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
            assert_eq!(hook.masks().len(), 3);
            let finished = hook.finish(&state).unwrap();
            for m in hook.masks() {
                let w: Vec<f32> = state
                    .network
                    .parameter(&m.name)
                    .unwrap()
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(w.iter().zip(&m.keep).all(|(v, k)| *k || v.to_bits() == 0));
                assert!(w.iter().zip(&m.keep).any(|(v, k)| *k && *v != 0.0));
                match &finished {
                    StructuredWeights::Scaled(scaled) => {
                        let q = scaled.iter().find(|q| q.name == m.name).unwrap();
                        assert!(q
                            .quantized
                            .codes
                            .iter()
                            .zip(&m.keep)
                            .all(|(c, k)| *k || *c == 0));
                        let mut v: Vec<u32> = q
                            .quantized
                            .values
                            .iter()
                            .zip(&m.keep)
                            .filter(|(_, k)| **k)
                            .map(|(x, _)| x.to_bits())
                            .collect();
                        v.sort();
                        v.dedup();
                        // At most 2^k values among the kept weights.
                        assert!(v.len() <= (1 << weight_bits), "{}: {}", m.name, v.len());
                        if weight_bits == 1 {
                            // ±α where kept.
                            assert!(q
                                .quantized
                                .codes
                                .iter()
                                .zip(&m.keep)
                                .all(|(c, k)| !*k || *c != 0));
                        }
                    }
                    StructuredWeights::Float(weights) => {
                        let t = weights.iter().find(|t| t.name == m.name).unwrap();
                        assert!(t.widths.iter().zip(&m.keep).all(|(b, k)| (*b == 0) != *k));
                    }
                }
            }
        }
        let bad = StructuredOptions {
            weight_bits: 5,
            blocks: None,
            scale: WeightScale::Max,
        };
        assert!(bad.validate().is_err());
    }
}
