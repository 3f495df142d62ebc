//! The compression methods, one module each, each a configuration plus a
//! function (as torchao's `quantize_`). The three accumulated-gradient
//! methods of METHOD.md §3–5 are pure functions over host tensors ([`NamedTensor`]s of parameters and of
//! their accumulated gradients `A`).
//!
//! * [`post_training`](mod@post_training) (§3): cluster `A` (all layers together, or per layer)
//!   into as many groups as there are bit widths, give the most important
//!   cluster the widest format, quantize every element with its own width.
//! * [`InTrainingQuantizer`] / [`InTrainingHook`] (§4): after each epoch, among
//!   the still-float elements, the fraction `p` with the lowest `A` is
//!   quantized to `b_low` and frozen (the training loop's freeze masks stop
//!   updates, momentum and weight decay for them).
//! * [`combined`](mod@combined) (§5): the in-training result, then post-training on the float
//!   remainder only, clustered by the remainder's `A`.
//! * [`structured`](mod@structured) (§9): block masks ([`sparsity`](mod@sparsity)) co-trained
//!   with `k_w`-bit weights; the `k_a`-bit PACT activations are the network's
//!   ([`crate::net::PactConfig`]).
//!
//! # Decisions
//!
//! * A [`QuantizedTensor`] holds the values **after** quantization (exactly
//!   what the quantized model computes with; width-32 elements are the float
//!   values, width-0 elements are `0.0`) together with its per-element widths
//!   and the tensor's exponent. Quantizing those values again with the same
//!   widths and exponent is the identity (qgrad-fixed's idempotence), so the
//!   exporter can hand them to the encoder with the stored exponent and the
//!   file decodes to exactly these values.
//! * The exponent of a tensor (METHOD §2: `ceil(log2(max |θ|))` over the whole
//!   tensor) is computed once. For post-training it is taken over the trained
//!   values. For in-training it is fixed at the first split that touches the
//!   training run and never recomputed: values frozen with it must stay exactly
//!   representable, so the post-training step of [`combined`](mod@combined) and the exporter
//!   reuse it. A float remainder element that later grows beyond `2^e`
//!   saturates at the range end when [`combined`](mod@combined) quantizes it (counted in
//!   [`QuantizeSummary::saturated`]).
//! * Per-layer scope groups the parameters of one layer (weight and bias, or a
//!   batch norm's scale and shift): the layer of `fc1.weight` is `fc1`, of
//!   `conv3.bn.weight` is `conv3.bn`.
//! * In-training split: the `round(p · n_float)` float elements with the lowest
//!   `A`, ties broken by position (tensor order, then element order) so that a
//!   split is fully deterministic.
//! * A fraction schedule is either one constant `p` (a split after every epoch
//!   from `start_epoch` on) or a list (split `i` uses the `i`-th entry; after
//!   the list no more splits), so the number of splits can be fixed exactly.
//! * Split spacing (`split_every`, default 1 = METHOD §4's "after each
//!   epoch"): a split after epochs `start_epoch`, `start_epoch + k`,
//!   `start_epoch + 2k`, … With `k > 1` the float remainder trains `k` epochs
//!   between splits and recovers from one before the next, as in incremental
//!   network quantization. On LeNet-300-100 this is what turns ≈ 98.0 % into
//!   ≈ 98.3 % at 40–47x (README.md).
//! * Split scope: `A` is ranked over all float elements of the network
//!   (global, default, as §3's default) or per layer, each layer then
//!   freezing its own fraction `p` of its float elements.

pub mod combined;
pub mod data_parallel;
pub mod in_training;
pub mod loss_aware;
pub mod post_training;
pub mod sparsity;
pub mod structured;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::train::TrainState;
use crate::NamedTensor;

pub use combined::{combined, CombinedOptions};
pub use data_parallel::{DataParallelHook, StepRecord};
pub use in_training::{
    FractionSchedule, InTrainingHook, InTrainingOptions, InTrainingQuantizer, InTrainingState,
    SplitOutcome,
};
pub use loss_aware::{
    high_name, Importance, ImportantWeights, LossAwareHook, LossAwareOptions, ScaledWeight,
    SparseBudget, HIGH_SUFFIX, HIGH_WEIGHTS,
};
pub use post_training::{post_training, PostTrainingOptions};
pub use sparsity::{
    block_masks, BlockMask, BlockSelection, BlockSparsityHook, BlockSparsityOptions,
};
pub use structured::{StructuredHook, StructuredOptions, StructuredWeights, WeightScale};

/// The weight of every linear and convolution layer of `arch`, in layer
/// order: what the weight quantizers and the sparsity masks cover.
pub fn weight_names(arch: crate::Arch) -> Vec<String> {
    arch.layers()
        .into_iter()
        .filter_map(|l| match l {
            crate::LayerSpec::Linear { name, .. } | crate::LayerSpec::Conv2d { name, .. } => {
                Some(format!("{name}.weight"))
            }
            _ => None,
        })
        .collect()
}

/// The forward weights of a straight-through quantizer: `Ŵ + (W − W̄)` per
/// weight, whose value is `Ŵ` exactly and whose gradient reaches `W` (one
/// op, [`qgrad_ops::straight_through`]).
pub(crate) fn straight_through(
    state: &TrainState,
    weights: &[ScaledWeight],
    out: &mut crate::net::WeightOverrides,
) -> Result<()> {
    for q in weights {
        insert_straight_through(state, &q.name, q.quantized.values.clone(), out)?;
    }
    Ok(())
}

/// [`straight_through`] of weights the caller no longer needs: their values
/// move into the forward tensors instead of being copied.
pub(crate) fn straight_through_owned(
    state: &TrainState,
    weights: Vec<ScaledWeight>,
    out: &mut crate::net::WeightOverrides,
) -> Result<()> {
    for q in weights {
        insert_straight_through(state, &q.name, q.quantized.values, out)?;
    }
    Ok(())
}

fn insert_straight_through(
    state: &TrainState,
    name: &str,
    values: Vec<f32>,
    out: &mut crate::net::WeightOverrides,
) -> Result<()> {
    let var = state
        .network
        .parameter(name)
        .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}'")))?;
    out.insert(
        name.to_string(),
        qgrad_ops::straight_through(var.as_tensor(), values)?,
    );
    Ok(())
}

/// The parameters of `state` other than `quantized` (biases, batch norm,
/// PACT clips as the forward pass uses them) as width-32 tensors for the file.
pub(crate) fn float_parameters(
    state: &TrainState,
    quantized: &[String],
) -> Result<Vec<QuantizedTensor>> {
    let clips = state.network.activation_clips()?;
    let mut out = Vec::new();
    for p in state.network.params_to_host()? {
        if quantized.contains(&p.name) {
            continue;
        }
        let p = clips
            .iter()
            .find(|c| c.name == p.name)
            .cloned()
            .unwrap_or(p);
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

pub(crate) fn invalid(message: impl Into<String>) -> ModelsError {
    ModelsError::Config(message.into())
}

/// Over which set of parameters the accumulated gradients are clustered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Scope {
    /// All layers together (METHOD §3 default).
    #[default]
    Global,
    /// Each layer separately (its weight and bias together).
    PerLayer,
}

impl FromStr for Scope {
    type Err = ModelsError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "global" => Ok(Scope::Global),
            "per-layer" | "layer" => Ok(Scope::PerLayer),
            _ => Err(invalid(format!(
                "unknown scope '{s}' (expected global or per-layer)"
            ))),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Global => "global",
            Scope::PerLayer => "per-layer",
        })
    }
}

/// One quantized parameter tensor (see the module docs for what `values` holds).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    /// The parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Values after quantization; width-32 elements are plain floats.
    pub values: Vec<f32>,
    /// Per-element widths: 0, 2..=16 or 32.
    pub widths: Vec<u8>,
    /// The tensor's exponent `e` (range `±2^e`) shared by its fixed-point elements.
    pub exponent: i32,
}

impl QuantizedTensor {
    /// The quantized values as a host tensor.
    pub fn to_named(&self) -> NamedTensor {
        NamedTensor {
            name: self.name.clone(),
            shape: self.shape.clone(),
            values: self.values.clone(),
        }
    }
}

/// Counts over a quantized parameter set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct QuantizeSummary {
    /// Parameter elements counted.
    pub parameters: usize,
    /// `(width, elements)` ascending by width.
    pub width_histogram: Vec<(u8, usize)>,
    /// Elements whose value quantized to 0 (pruned or rounded to zero).
    pub zeros: usize,
    /// Fixed-point elements whose float value lay outside the tensor's range.
    pub saturated: usize,
}

/// Summary of `tensors` (`saturated` is filled by the functions that know the
/// original values; here it is 0).
pub fn summarize(tensors: &[QuantizedTensor]) -> QuantizeSummary {
    let mut histogram = BTreeMap::new();
    let mut zeros = 0;
    let mut parameters = 0;
    for t in tensors {
        parameters += t.values.len();
        for (&w, &v) in t.widths.iter().zip(&t.values) {
            *histogram.entry(w).or_insert(0usize) += 1;
            if v == 0.0 {
                zeros += 1;
            }
        }
    }
    QuantizeSummary {
        parameters,
        width_histogram: histogram.into_iter().collect(),
        zeros,
        saturated: 0,
    }
}

/// The layer a parameter belongs to: the name without its last component.
pub fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(layer, _)| layer)
}

/// Finds the accumulated gradient of `param` (named `param` or `param.accgrad`)
/// and checks its shape.
fn accum_for<'a>(param: &NamedTensor, accum: &'a [NamedTensor]) -> Result<&'a NamedTensor> {
    let alt = format!("{}.accgrad", param.name);
    let found = accum
        .iter()
        .find(|a| a.name == param.name || a.name == alt)
        .ok_or_else(|| {
            invalid(format!(
                "no accumulated gradient for parameter '{}'",
                param.name
            ))
        })?;
    if found.values.len() != param.values.len() || found.shape != param.shape {
        return Err(invalid(format!(
            "accumulated gradient of '{}' has shape {:?}, the parameter {:?}",
            param.name, found.shape, param.shape
        )));
    }
    Ok(found)
}

fn check_param(param: &NamedTensor) -> Result<()> {
    let expected: usize = param.shape.iter().product();
    if expected != param.values.len() {
        return Err(invalid(format!(
            "parameter '{}' has shape {:?} but {} values",
            param.name,
            param.shape,
            param.values.len()
        )));
    }
    if let Some(i) = param.values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "parameter '{}' has a non-finite value at element {i}",
            param.name
        )));
    }
    Ok(())
}

/// The accumulated gradients of a training state as host tensors (named like
/// their parameters).
pub fn accum_to_host(state: &TrainState) -> Result<Vec<NamedTensor>> {
    Ok(state
        .accum
        .to_host()?
        .into_iter()
        .map(|(name, shape, values)| NamedTensor {
            name,
            shape,
            values,
        })
        .collect())
}
