//! Post-training quantization (METHOD §3): cluster the accumulated
//! gradients `A` (all layers together, or per layer) into as many groups as
//! there are bit widths, give the most important cluster the widest format,
//! and quantize every element with its own width.

use std::collections::BTreeMap;

use qgrad_cluster::{assign_widths, ClusterMethod};
use qgrad_fixed::{fake_quantize, is_valid_width, tensor_exponent, FLOAT, PRUNED};

use super::{
    accum_for, check_param, invalid, layer_of, summarize, QuantizeSummary, QuantizedTensor, Scope,
};
use crate::error::Result;
use crate::NamedTensor;

/// Options of post-training quantization (METHOD §3).
#[derive(Debug, Clone, PartialEq)]
pub struct PostTrainingOptions {
    /// Strictly decreasing bit widths `b_1 > … > b_K`; 32 (keep float), 2..=16
    /// or 0 (prune).
    pub widths: Vec<u8>,
    /// How `A` is clustered.
    pub method: ClusterMethod,
    /// Over which parameters `A` is clustered.
    pub scope: Scope,
}

impl Default for PostTrainingOptions {
    fn default() -> Self {
        PostTrainingOptions {
            widths: vec![16, 8, 4, 2, 0],
            method: ClusterMethod::KMeans,
            scope: Scope::Global,
        }
    }
}

impl PostTrainingOptions {
    /// Rejects width lists METHOD §3 does not allow.
    pub fn validate(&self) -> Result<()> {
        if self.widths.is_empty() {
            return Err(invalid("the list of bit widths is empty"));
        }
        for &w in &self.widths {
            if !is_valid_width(w) {
                return Err(invalid(format!(
                    "bit width {w} is not allowed (0, 2..=16 or 32)"
                )));
            }
        }
        if self.widths.windows(2).any(|p| p[0] <= p[1]) {
            return Err(invalid(format!(
                "bit widths must be strictly decreasing, got {:?}",
                self.widths
            )));
        }
        if let ClusterMethod::Quantiles { fractions } = &self.method {
            if fractions.len() != self.widths.len() {
                return Err(invalid(format!(
                    "{} quantile fractions for {} bit widths",
                    fractions.len(),
                    self.widths.len()
                )));
            }
        }
        Ok(())
    }
}

/// Post-training quantization (METHOD §3).
///
/// With `already = None` every element is clustered by its `A` and quantized;
/// each tensor's exponent comes from its values. With `already = Some(q)` (one
/// entry per parameter, same names and order — the in-training result), only
/// the elements of width 32 in `q` are clustered and quantized, with `q`'s
/// exponents; every other element keeps `q`'s value and width bit for bit.
pub fn post_training(
    params: &[NamedTensor],
    accum: &[NamedTensor],
    opts: &PostTrainingOptions,
    already: Option<&[QuantizedTensor]>,
) -> Result<(Vec<QuantizedTensor>, QuantizeSummary)> {
    opts.validate()?;
    if let Some(q) = already {
        if q.len() != params.len() {
            return Err(invalid(format!(
                "{} already-quantized tensors for {} parameters",
                q.len(),
                params.len()
            )));
        }
    }
    // Candidate elements (to be clustered) per tensor, and their importances
    // gathered per group.
    let mut candidates: Vec<Vec<usize>> = Vec::with_capacity(params.len());
    let mut groups: BTreeMap<String, Vec<(usize, usize, f32)>> = BTreeMap::new();
    for (t, param) in params.iter().enumerate() {
        check_param(param)?;
        let a = accum_for(param, accum)?;
        let prior = already.map(|q| &q[t]);
        if let Some(p) = prior {
            if p.name != param.name || p.values.len() != param.values.len() {
                return Err(invalid(format!(
                    "already-quantized tensor '{}' does not match parameter '{}'",
                    p.name, param.name
                )));
            }
        }
        let key = match opts.scope {
            Scope::Global => String::new(),
            Scope::PerLayer => layer_of(&param.name).to_string(),
        };
        let group = groups.entry(key).or_default();
        let mut cand = Vec::new();
        for (i, &imp) in a.values.iter().enumerate() {
            let is_candidate = prior.is_none_or(|p| p.widths[i] == FLOAT);
            if is_candidate {
                if !imp.is_finite() {
                    return Err(invalid(format!(
                        "accumulated gradient of '{}' is not finite at element {i}",
                        param.name
                    )));
                }
                cand.push(i);
                group.push((t, i, imp));
            }
        }
        candidates.push(cand);
    }
    // Cluster each group and scatter its widths back.
    let mut widths: Vec<Vec<u8>> = params
        .iter()
        .enumerate()
        .map(|(t, p)| match already {
            Some(q) => q[t].widths.clone(),
            None => vec![FLOAT; p.values.len()],
        })
        .collect();
    for members in groups.values() {
        let importance: Vec<f32> = members.iter().map(|m| m.2).collect();
        let assigned = assign_widths(&importance, &opts.widths, &opts.method)?;
        for (&(t, i, _), w) in members.iter().zip(assigned) {
            widths[t][i] = w;
        }
    }
    let mut out = Vec::with_capacity(params.len());
    let mut saturated = 0;
    for (t, param) in params.iter().enumerate() {
        let exponent = match already {
            Some(q) => q[t].exponent,
            None => tensor_exponent(&param.values)?,
        };
        let quantized = fake_quantize(&param.values, &widths[t], exponent)?;
        let mut values = quantized;
        if let Some(q) = already {
            // Frozen elements keep their stored value bit for bit.
            for (i, (&w, &v)) in q[t].widths.iter().zip(&q[t].values).enumerate() {
                if w != FLOAT {
                    values[i] = v;
                }
            }
        }
        let limit = (exponent as f64).exp2();
        saturated += candidates[t]
            .iter()
            .filter(|&&i| {
                let w = widths[t][i];
                w != FLOAT && w != PRUNED && (param.values[i].abs() as f64) > limit
            })
            .count();
        out.push(QuantizedTensor {
            name: param.name.clone(),
            shape: param.shape.clone(),
            values,
            widths: std::mem::take(&mut widths[t]),
            exponent,
        });
    }
    let mut summary = summarize(&out);
    summary.saturated = saturated;
    Ok((out, summary))
}
