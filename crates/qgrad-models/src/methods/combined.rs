//! Combined quantization (METHOD §5): in-training quantization, then
//! post-training quantization of the float remainder only, clustered by the
//! remainder's `A`. Already-quantized elements stay exactly as they are.

use serde::Serialize;

use super::in_training::InTrainingOptions;
use super::post_training::{post_training, PostTrainingOptions};
use super::{QuantizeSummary, QuantizedTensor};
use crate::error::Result;
use crate::NamedTensor;

/// The configuration of combined quantization: the in-training run, then
/// the post-training options for its float remainder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CombinedOptions {
    /// The in-training run (METHOD §4).
    pub in_training: InTrainingOptions,
    /// Post-training quantization of the float remainder (METHOD §3).
    #[serde(skip)]
    pub remainder: PostTrainingOptions,
}

impl CombinedOptions {
    /// Validates both parts.
    pub fn validate(&self) -> Result<()> {
        self.in_training.validate()?;
        self.remainder.validate()
    }
}

/// Combined quantization (METHOD §5): post-training quantization of the float
/// remainder of an in-training result, clustered by the remainder's `A`.
/// In-training's quantized elements (width ≠ 32) are left exactly as they are.
pub fn combined(
    in_training: &[QuantizedTensor],
    accum: &[NamedTensor],
    opts: &PostTrainingOptions,
) -> Result<(Vec<QuantizedTensor>, QuantizeSummary)> {
    let params: Vec<NamedTensor> = in_training.iter().map(QuantizedTensor::to_named).collect();
    post_training(&params, accum, opts, Some(in_training))
}
