//! The three accumulated-gradient quantization methods of METHOD.md §3–5, as
//! pure functions over host tensors ([`NamedTensor`]s of parameters and of
//! their accumulated gradients `A`).
//!
//! * [`post_training`] (§3): cluster `A` (all layers together, or per layer)
//!   into as many groups as there are bit widths, give the most important
//!   cluster the widest format, quantize every element with its own width.
//! * [`InTrainingQuantizer`] / [`InTrainingHook`] (§4): after each epoch, among
//!   the still-float elements, the fraction `p` with the lowest `A` is
//!   quantized to `b_low` and frozen (the training loop's freeze masks stop
//!   updates, momentum and weight decay for them).
//! * [`combined`] (§5): the in-training result, then post-training on the float
//!   remainder only, clustered by the remainder's `A`.
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
//!   representable, so the post-training step of [`combined`] and the exporter
//!   reuse it. A float remainder element that later grows beyond `2^e`
//!   saturates at the range end when [`combined`] quantizes it (counted in
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

use std::collections::BTreeMap;
use std::str::FromStr;

use qgrad_cluster::{assign_widths, ClusterMethod};
use qgrad_fixed::{fake_quantize, is_valid_width, tensor_exponent, FLOAT, PRUNED};
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::train::{EpochHook, TrainState};
use crate::NamedTensor;
use qgrad_accum::FreezeMask;

fn invalid(message: impl Into<String>) -> ModelsError {
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

/// Options of post-training quantization (METHOD §3).
#[derive(Debug, Clone, PartialEq)]
pub struct PostTrainingOptions {
    /// Strictly decreasing bit widths `b_1 > … > b_K`; 32 (keep float), 2..=16
    /// or 0 (prune).
    pub widths: Vec<u8>,
    pub method: ClusterMethod,
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

/// The split fraction `p` of in-training quantization, per split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FractionSchedule {
    /// The same `p` at every split, a split after every epoch from the start epoch.
    Constant(f64),
    /// Split `i` uses entry `i`; there are exactly `len` splits.
    PerSplit(Vec<f64>),
}

impl FractionSchedule {
    /// The fraction of split number `split` (0-based), or `None` when the
    /// schedule has no more splits.
    pub fn fraction_for_split(&self, split: usize) -> Option<f64> {
        match self {
            FractionSchedule::Constant(p) => Some(*p),
            FractionSchedule::PerSplit(list) => list.get(split).copied(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let list: &[f64] = match self {
            FractionSchedule::Constant(p) => std::slice::from_ref(p),
            FractionSchedule::PerSplit(list) => list,
        };
        if list.is_empty() {
            return Err(invalid("the fraction schedule is empty"));
        }
        for &p in list {
            // METHOD §4: the larger group, 0.5 < p < 1.
            if !(p > 0.5 && p < 1.0) {
                return Err(invalid(format!(
                    "split fraction {p} is outside (0.5, 1): the quantized group is the larger one"
                )));
            }
        }
        Ok(())
    }
}

impl FromStr for FractionSchedule {
    type Err = ModelsError;
    /// `"0.7"` (constant) or `"0.5,0.7,0.9"` (one per split).
    fn from_str(s: &str) -> Result<Self> {
        let parsed: std::result::Result<Vec<f64>, _> =
            s.split(',').map(|p| p.trim().parse::<f64>()).collect();
        let list = parsed.map_err(|e| invalid(format!("bad fraction list '{s}': {e}")))?;
        let schedule = if list.len() == 1 {
            FractionSchedule::Constant(list[0])
        } else {
            FractionSchedule::PerSplit(list)
        };
        schedule.validate()?;
        Ok(schedule)
    }
}

impl std::fmt::Display for FractionSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FractionSchedule::Constant(p) => write!(f, "{p}"),
            FractionSchedule::PerSplit(list) => {
                let parts: Vec<String> = list.iter().map(|p| p.to_string()).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Options of in-training quantization (METHOD §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InTrainingOptions {
    pub fraction: FractionSchedule,
    /// `b_low`: 0 (prune) or 2..=16.
    pub low_bits: u8,
    /// The first epoch (0-based, as counted by the training loop) after which a
    /// split happens.
    pub start_epoch: usize,
    /// Epochs between two splits: 1 (METHOD §4: after every epoch) or more,
    /// which gives the float remainder that many epochs to recover before the
    /// next split.
    #[serde(default = "one_epoch", skip_serializing_if = "is_one_epoch")]
    pub split_every: usize,
    /// Over which set of float elements a split ranks `A`: all layers together
    /// (global) or each layer separately (every layer freezes its own
    /// fraction `p`).
    #[serde(default, skip_serializing_if = "is_global")]
    pub scope: Scope,
}

// The defaults are left out of what is serialized, so a file written with
// them stays byte for byte what it was before these options existed (and so
// does its compression ratio).
fn one_epoch() -> usize {
    1
}

fn is_one_epoch(n: &usize) -> bool {
    *n == 1
}

fn is_global(scope: &Scope) -> bool {
    *scope == Scope::Global
}

impl Default for InTrainingOptions {
    fn default() -> Self {
        InTrainingOptions {
            fraction: FractionSchedule::Constant(0.7),
            low_bits: 4,
            start_epoch: 0,
            split_every: 1,
            scope: Scope::Global,
        }
    }
}

impl InTrainingOptions {
    pub fn validate(&self) -> Result<()> {
        self.fraction.validate()?;
        if self.split_every == 0 {
            return Err(invalid("splits must be at least 1 epoch apart"));
        }
        if self.low_bits == FLOAT || !is_valid_width(self.low_bits) {
            return Err(invalid(format!(
                "low bit width {} is not allowed (0 or 2..=16)",
                self.low_bits
            )));
        }
        Ok(())
    }
}

/// One quantized parameter tensor (see the module docs for what `values` holds).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Values after quantization; width-32 elements are plain floats.
    pub values: Vec<f32>,
    /// Per-element widths: 0, 2..=16 or 32.
    pub widths: Vec<u8>,
    /// The tensor's exponent `e` (range `±2^e`) shared by its fixed-point elements.
    pub exponent: i32,
}

impl QuantizedTensor {
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

/// Serializable state of in-training quantization (for resuming a run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InTrainingState {
    pub options: InTrainingOptions,
    pub names: Vec<String>,
    /// Per tensor, per element: true when quantized and frozen at `low_bits`.
    pub frozen: Vec<Vec<bool>>,
    /// Per tensor: the exponent fixed at the first split.
    pub exponents: Vec<Option<i32>>,
    /// Splits done so far.
    pub splits: usize,
}

/// What one split did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitOutcome {
    pub split: usize,
    /// Indices of the tensors that got newly frozen elements.
    pub changed_tensors: Vec<usize>,
    pub newly_frozen: usize,
    pub frozen: usize,
    pub float_remaining: usize,
}

/// The host-side logic of in-training quantization (METHOD §4), independent of
/// the training loop: it decides which elements to freeze and returns their
/// quantized values; [`InTrainingHook`] moves the data between it and the
/// network.
#[derive(Debug, Clone)]
pub struct InTrainingQuantizer {
    state: InTrainingState,
}

impl InTrainingQuantizer {
    /// For parameters of these names and shapes (in the network's order).
    pub fn new(options: InTrainingOptions, shapes: &[(String, Vec<usize>)]) -> Result<Self> {
        options.validate()?;
        Ok(InTrainingQuantizer {
            state: InTrainingState {
                options,
                names: shapes.iter().map(|(n, _)| n.clone()).collect(),
                frozen: shapes
                    .iter()
                    .map(|(_, s)| vec![false; s.iter().product()])
                    .collect(),
                exponents: vec![None; shapes.len()],
                splits: 0,
            },
        })
    }

    pub fn from_state(state: InTrainingState) -> Result<Self> {
        state.options.validate()?;
        if state.frozen.len() != state.names.len() || state.exponents.len() != state.names.len() {
            return Err(invalid("in-training state has inconsistent lengths"));
        }
        Ok(InTrainingQuantizer { state })
    }

    pub fn state(&self) -> &InTrainingState {
        &self.state
    }

    pub fn options(&self) -> &InTrainingOptions {
        &self.state.options
    }

    /// Whether a split is due after `epoch` (0-based).
    pub fn split_due(&self, epoch: usize) -> bool {
        let options = &self.state.options;
        epoch >= options.start_epoch
            && (epoch - options.start_epoch) % options.split_every == 0
            && options
                .fraction
                .fraction_for_split(self.state.splits)
                .is_some()
    }

    /// Freeze masks, one per tensor: 1.0 = trainable, 0.0 = frozen.
    pub fn masks(&self) -> Vec<Vec<f32>> {
        self.state
            .frozen
            .iter()
            .map(|f| f.iter().map(|&z| if z { 0.0 } else { 1.0 }).collect())
            .collect()
    }

    fn check_inputs(&self, params: &[NamedTensor]) -> Result<()> {
        if params.len() != self.state.names.len() {
            return Err(invalid(format!(
                "{} parameter tensors, in-training quantization was set up for {}",
                params.len(),
                self.state.names.len()
            )));
        }
        for (p, (name, frozen)) in params
            .iter()
            .zip(self.state.names.iter().zip(&self.state.frozen))
        {
            if &p.name != name || p.values.len() != frozen.len() {
                return Err(invalid(format!(
                    "parameter '{}' ({} values) does not match '{}' ({} values)",
                    p.name,
                    p.values.len(),
                    name,
                    frozen.len()
                )));
            }
            check_param(p)?;
        }
        Ok(())
    }

    /// One split: among the float elements, the fraction `p` with the lowest
    /// `A` is quantized to `b_low` and marked frozen. Updates `params` in place
    /// (only the newly frozen elements change).
    pub fn split(
        &mut self,
        params: &mut [NamedTensor],
        accum: &[NamedTensor],
    ) -> Result<SplitOutcome> {
        self.check_inputs(params)?;
        let split = self.state.splits;
        let p = self
            .state
            .options
            .fraction
            .fraction_for_split(split)
            .ok_or_else(|| invalid("the fraction schedule has no more splits"))?;
        // Exponents are fixed at the first split and never change afterwards.
        for (t, param) in params.iter().enumerate() {
            if self.state.exponents[t].is_none() {
                self.state.exponents[t] = Some(tensor_exponent(&param.values)?);
            }
        }
        // (A, tensor, element) of every float element, gathered per ranking
        // group (one group, or one per layer); ties broken by position.
        let mut groups: BTreeMap<&str, Vec<(f32, u32, u32)>> = BTreeMap::new();
        let mut float_count = 0;
        for (t, param) in params.iter().enumerate() {
            let a = accum_for(param, accum)?;
            let key = match self.state.options.scope {
                Scope::Global => "",
                Scope::PerLayer => layer_of(&param.name),
            };
            let group = groups.entry(key).or_default();
            for (i, (&imp, &frozen)) in a.values.iter().zip(&self.state.frozen[t]).enumerate() {
                if !frozen {
                    if !imp.is_finite() {
                        return Err(invalid(format!(
                            "accumulated gradient of '{}' is not finite at element {i}",
                            param.name
                        )));
                    }
                    group.push((imp, t as u32, i as u32));
                    float_count += 1;
                }
            }
        }
        let mut per_tensor: Vec<Vec<usize>> = vec![Vec::new(); params.len()];
        let mut taken = 0;
        for float in groups.values_mut() {
            let take = ((p * float.len() as f64).round() as usize).min(float.len());
            if take > 0 && take < float.len() {
                float.select_nth_unstable_by(take, |x, y| {
                    x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2)))
                });
            }
            for &(_, t, i) in &float[..take] {
                per_tensor[t as usize].push(i as usize);
            }
            taken += take;
        }
        let low = self.state.options.low_bits;
        for (t, elements) in per_tensor.iter().enumerate() {
            if elements.is_empty() {
                continue;
            }
            let exponent = self.state.exponents[t].unwrap_or(0);
            let selected: Vec<f32> = elements.iter().map(|&i| params[t].values[i]).collect();
            let quantized = fake_quantize(&selected, &vec![low; selected.len()], exponent)?;
            for (&i, q) in elements.iter().zip(quantized) {
                params[t].values[i] = q;
                self.state.frozen[t][i] = true;
            }
        }
        self.state.splits += 1;
        let frozen: usize = self
            .state
            .frozen
            .iter()
            .map(|f| f.iter().filter(|&&z| z).count())
            .sum();
        Ok(SplitOutcome {
            split,
            changed_tensors: (0..params.len())
                .filter(|&t| !per_tensor[t].is_empty())
                .collect(),
            newly_frozen: taken,
            frozen,
            float_remaining: float_count - taken,
        })
    }

    /// The in-training result for the final parameter values: frozen elements
    /// at `b_low` (their values must be the frozen ones — they are checked),
    /// the rest as f32. Tensors never split get their exponent from `params`.
    pub fn finish(&self, params: &[NamedTensor]) -> Result<Vec<QuantizedTensor>> {
        self.check_inputs(params)?;
        let low = self.state.options.low_bits;
        let mut out = Vec::with_capacity(params.len());
        for (t, param) in params.iter().enumerate() {
            let exponent = match self.state.exponents[t] {
                Some(e) => e,
                None => tensor_exponent(&param.values)?,
            };
            let widths: Vec<u8> = self.state.frozen[t]
                .iter()
                .map(|&z| if z { low } else { FLOAT })
                .collect();
            // A frozen value that moved would mean the training loop ignored
            // the freeze mask; re-quantizing would hide that, so refuse.
            let requantized = fake_quantize(&param.values, &widths, exponent)?;
            if let Some(i) = requantized
                .iter()
                .zip(&param.values)
                .position(|(a, b)| a != b)
            {
                return Err(ModelsError::Config(format!(
                    "frozen element {i} of '{}' changed after it was quantized \
                     (the training loop did not respect the freeze mask)",
                    param.name
                )));
            }
            out.push(QuantizedTensor {
                name: param.name.clone(),
                shape: param.shape.clone(),
                values: param.values.clone(),
                widths,
                exponent,
            });
        }
        Ok(out)
    }
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

/// In-training quantization as an [`EpochHook`]: after every due epoch it
/// copies parameters and accumulated gradients to the host (once per epoch,
/// not per step), runs [`InTrainingQuantizer::split`], writes the quantized
/// values back into the network and sets the freeze masks.
#[derive(Debug, Clone)]
pub struct InTrainingHook {
    pub quantizer: InTrainingQuantizer,
    /// One entry per split done, with the epoch after which it happened.
    pub log: Vec<(usize, SplitOutcome)>,
}

impl InTrainingHook {
    /// For the parameters of `state`'s network.
    pub fn new(options: InTrainingOptions, state: &TrainState) -> Result<Self> {
        let shapes: Vec<(String, Vec<usize>)> = state
            .network
            .parameters()
            .iter()
            .map(|(n, v)| (n.clone(), v.dims().to_vec()))
            .collect();
        Ok(InTrainingHook {
            quantizer: InTrainingQuantizer::new(options, &shapes)?,
            log: Vec::new(),
        })
    }

    /// The in-training result for the network's current parameters.
    pub fn finish(&self, state: &TrainState) -> Result<Vec<QuantizedTensor>> {
        self.quantizer.finish(&state.network.params_to_host()?)
    }
}

/// What an in-training checkpoint stores beside the network: everything of
/// [`InTrainingState`] but the frozen flags, which the checkpoint's freeze
/// masks already hold (one bit of JSON per element would be far larger).
#[derive(Debug, Serialize, Deserialize)]
struct SavedHook {
    options: InTrainingOptions,
    names: Vec<String>,
    exponents: Vec<Option<i32>>,
    splits: usize,
    log: Vec<(usize, SplitOutcome)>,
}

impl EpochHook for InTrainingHook {
    fn checkpoint_state(&self) -> Result<Option<String>> {
        let st = &self.quantizer.state;
        let saved = SavedHook {
            options: st.options.clone(),
            names: st.names.clone(),
            exponents: st.exponents.clone(),
            splits: st.splits,
            log: self.log.clone(),
        };
        serde_json::to_string(&saved)
            .map(Some)
            .map_err(|e| ModelsError::Other(format!("cannot encode the in-training state: {e}")))
    }

    fn restore_state(&mut self, saved: &str, state: &TrainState) -> Result<()> {
        let saved: SavedHook = serde_json::from_str(saved).map_err(|e| {
            ModelsError::Config(format!(
                "the checkpoint's in-training state is unreadable ({e}); it was not written by this kind of run"
            ))
        })?;
        let st = &mut self.quantizer.state;
        if saved.options != st.options || saved.names != st.names {
            return Err(ModelsError::Config(format!(
                "the checkpoint comes from an in-training run with other options \
                 (p = {}, b_low = {}, start epoch {}); resume with those or use another directory",
                saved.options.fraction, saved.options.low_bits, saved.options.start_epoch
            )));
        }
        let params = state.network.parameters();
        for (t, (name, _)) in params.iter().enumerate() {
            st.frozen[t] = match state.mask(name) {
                Some(mask) => mask.frozen_flags()?,
                None => vec![false; st.frozen[t].len()],
            };
        }
        st.exponents = saved.exponents;
        st.splits = saved.splits;
        self.log = saved.log;
        Ok(())
    }

    fn after_epoch(&mut self, epoch: usize, state: &mut TrainState) -> Result<()> {
        if !self.quantizer.split_due(epoch) {
            return Ok(());
        }
        let mut params = state.network.params_to_host()?;
        let accum = accum_to_host(state)?;
        let outcome = self.quantizer.split(&mut params, &accum)?;
        let device = state.network.device().clone();
        for &t in &outcome.changed_tensors {
            let p = &params[t];
            state
                .network
                .set_parameter(&p.name, &p.to_tensor(&device)?)?;
            let mask = FreezeMask::from_frozen(&p.shape, &self.quantizer.state.frozen[t], &device)?;
            state.set_mask(&p.name, mask)?;
        }
        self.log.push((epoch, outcome));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn tensor(name: &str, shape: &[usize], values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            values,
        }
    }

    /// Two layers of random weights and importances.
    fn model(seed: u64) -> (Vec<NamedTensor>, Vec<NamedTensor>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let shapes: [(&str, Vec<usize>); 4] = [
            ("fc1.weight", vec![20, 30]),
            ("fc1.bias", vec![20]),
            ("fc2.weight", vec![10, 20]),
            ("fc2.bias", vec![10]),
        ];
        let mut params = Vec::new();
        let mut accum = Vec::new();
        for (name, shape) in shapes {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| rng.random_range(-0.6f32..0.6)).collect();
            let scores = (0..n)
                .map(|_| rng.random_range(0f32..1.0).powi(4))
                .collect();
            params.push(tensor(name, &shape, values));
            accum.push(tensor(name, &shape, scores));
        }
        (params, accum)
    }

    #[test]
    fn post_training_gives_wider_formats_to_more_important_elements() {
        let (params, accum) = model(1);
        let opts = PostTrainingOptions::default();
        let (q, summary) = post_training(&params, &accum, &opts, None).unwrap();
        assert_eq!(summary.parameters, 600 + 20 + 200 + 10);
        // Widths are monotone in A over the whole parameter set.
        let mut pairs: Vec<(f32, u8)> = Vec::new();
        for (t, a) in q.iter().zip(&accum) {
            pairs.extend(a.values.iter().copied().zip(t.widths.iter().copied()));
        }
        pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
        assert!(pairs.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(summary.width_histogram.len() >= 3, "{summary:?}");
        // Values are exactly the per-tensor fake quantization of the input.
        for (t, p) in q.iter().zip(&params) {
            let e = tensor_exponent(&p.values).unwrap();
            assert_eq!(t.exponent, e);
            assert_eq!(t.values, fake_quantize(&p.values, &t.widths, e).unwrap());
            assert!(t.widths.iter().all(|w| opts.widths.contains(w)));
        }
    }

    #[test]
    fn per_layer_scope_clusters_each_layer_separately() {
        let (params, mut accum) = model(2);
        // Make fc2 a thousand times less important: globally it would be all
        // at the lowest widths, per layer it still gets the widest one.
        for a in accum.iter_mut().filter(|a| a.name.starts_with("fc2")) {
            a.values.iter_mut().for_each(|v| *v *= 1e-3);
        }
        let mut opts = PostTrainingOptions {
            widths: vec![8, 4, 0],
            method: ClusterMethod::Quantiles {
                fractions: vec![0.2, 0.3, 0.5],
            },
            scope: Scope::Global,
        };
        let (global, _) = post_training(&params, &accum, &opts, None).unwrap();
        assert!(!global[2].widths.contains(&8));
        opts.scope = Scope::PerLayer;
        let (per_layer, _) = post_training(&params, &accum, &opts, None).unwrap();
        let eights = per_layer[2]
            .widths
            .iter()
            .chain(&per_layer[3].widths)
            .filter(|&&w| w == 8)
            .count();
        assert_eq!(eights, 42, "20 % of fc2's 210 elements");
    }

    #[test]
    fn bad_options_and_inputs_are_errors() {
        let (params, accum) = model(3);
        let bad_widths = [vec![], vec![4, 8], vec![8, 1], vec![17, 4], vec![8, 8]];
        for widths in bad_widths {
            let opts = PostTrainingOptions {
                widths,
                ..Default::default()
            };
            assert!(post_training(&params, &accum, &opts, None).is_err());
        }
        let mut nan = params.clone();
        nan[0].values[3] = f32::NAN;
        assert!(post_training(&nan, &accum, &PostTrainingOptions::default(), None).is_err());
        assert!(
            post_training(&params, &accum[..2], &PostTrainingOptions::default(), None).is_err()
        );
        for s in ["0.5", "1", "0.3", "0.7,1.2", "x", ""] {
            assert!(s.parse::<FractionSchedule>().is_err(), "{s}");
        }
        assert_eq!(
            "0.6,0.8".parse::<FractionSchedule>().unwrap(),
            FractionSchedule::PerSplit(vec![0.6, 0.8])
        );
        assert!("per-layer".parse::<Scope>().is_ok() && "layers?".parse::<Scope>().is_err());
        let opts = InTrainingOptions {
            low_bits: 1,
            ..Default::default()
        };
        assert!(InTrainingQuantizer::new(opts, &[("a".into(), vec![2])]).is_err());
    }

    #[test]
    fn splits_can_be_spaced_out_and_ranked_per_layer() {
        let (mut params, mut accum) = model(6);
        // fc2 is far more important than fc1: ranked globally it would never
        // be split before fc1 is exhausted.
        for a in &mut accum[2..] {
            a.values.iter_mut().for_each(|v| *v = *v * 100.0 + 1.0);
        }
        let opts = InTrainingOptions {
            fraction: FractionSchedule::Constant(0.6),
            low_bits: 4,
            start_epoch: 1,
            split_every: 3,
            scope: Scope::PerLayer,
        };
        let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
        let due: Vec<usize> = (0..9).filter(|&e| q.split_due(e)).collect();
        assert_eq!(due, vec![1, 4, 7]);
        let outcome = q.split(&mut params, &accum).unwrap();
        let layer_frozen = |q: &InTrainingQuantizer, range: std::ops::Range<usize>| -> usize {
            q.state().frozen[range]
                .iter()
                .map(|f| f.iter().filter(|&&z| z).count())
                .sum()
        };
        // Each layer (weight and bias together) freezes its own 60 %.
        assert_eq!(layer_frozen(&q, 0..2), 372, "0.6 of fc1's 620 elements");
        assert_eq!(layer_frozen(&q, 2..4), 126, "0.6 of fc2's 210 elements");
        assert_eq!(outcome.newly_frozen, 372 + 126);
        assert_eq!(outcome.float_remaining, 830 - 372 - 126);
        // Within a layer the frozen elements are the least important ones.
        for range in [0..2, 2..4] {
            assert_frozen_are_least_important(&q, &accum, range);
        }
        let zero_gap = InTrainingOptions {
            split_every: 0,
            ..Default::default()
        };
        assert!(InTrainingQuantizer::new(zero_gap, &shapes(&params)).is_err());
    }

    /// Over the tensors in `range`, no frozen element has a larger `A` than
    /// a float one.
    fn assert_frozen_are_least_important(
        q: &InTrainingQuantizer,
        accum: &[NamedTensor],
        range: std::ops::Range<usize>,
    ) {
        let mut max_frozen = f32::MIN;
        let mut min_float = f32::MAX;
        for t in range {
            for (&a, &frozen) in accum[t].values.iter().zip(&q.state().frozen[t]) {
                if frozen {
                    max_frozen = max_frozen.max(a);
                } else {
                    min_float = min_float.min(a);
                }
            }
        }
        assert!(max_frozen <= min_float, "{max_frozen} > {min_float}");
    }

    fn shapes(params: &[NamedTensor]) -> Vec<(String, Vec<usize>)> {
        params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect()
    }

    /// Stands in for training between splits: moves only float elements.
    fn train_a_bit(q: &InTrainingQuantizer, params: &mut [NamedTensor], rng: &mut ChaCha8Rng) {
        for (t, p) in params.iter_mut().enumerate() {
            for (i, v) in p.values.iter_mut().enumerate() {
                if !q.state().frozen[t][i] {
                    *v += rng.random_range(-0.05f32..0.05);
                }
            }
        }
    }

    #[test]
    fn in_training_freezes_the_least_important_fraction_of_the_float_elements() {
        let (mut params, accum) = model(4);
        let total = 830;
        let opts = InTrainingOptions {
            fraction: FractionSchedule::PerSplit(vec![0.6, 0.75]),
            low_bits: 4,
            start_epoch: 1,
            ..Default::default()
        };
        let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
        assert!(!q.split_due(0) && q.split_due(1));
        let before = params.clone();
        let first = q.split(&mut params, &accum).unwrap();
        assert_eq!(first.newly_frozen, (0.6f64 * total as f64).round() as usize);
        assert_eq!(first.float_remaining, total - first.newly_frozen);
        // The frozen set is exactly the lowest-A elements.
        assert_frozen_are_least_important(&q, &accum, 0..accum.len());
        // Frozen values are quantized with the exponent of their tensor.
        let exponents: Vec<i32> = q.state().exponents.iter().map(|e| e.unwrap()).collect();
        for (t, p) in params.iter().enumerate() {
            assert_eq!(exponents[t], tensor_exponent(&before[t].values).unwrap());
            for (i, &v) in p.values.iter().enumerate() {
                if q.state().frozen[t][i] {
                    let expect =
                        fake_quantize(&[before[t].values[i]], &[4], exponents[t]).unwrap()[0];
                    assert_eq!(v, expect);
                } else {
                    assert_eq!(v, before[t].values[i]);
                }
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        train_a_bit(&q, &mut params, &mut rng);
        let second = q.split(&mut params, &accum).unwrap();
        assert_eq!(
            second.newly_frozen,
            (0.75 * first.float_remaining as f64).round() as usize
        );
        assert_eq!(second.frozen, first.newly_frozen + second.newly_frozen);
        assert!(!q.split_due(5), "the list schedule has two splits");
        // Exponents stay fixed even though values moved.
        assert_eq!(
            q.state()
                .exponents
                .iter()
                .map(|e| e.unwrap())
                .collect::<Vec<_>>(),
            exponents
        );
        let masks = q.masks();
        let result = q.finish(&params).unwrap();
        for ((r, m), f) in result.iter().zip(&masks).zip(&q.state().frozen) {
            for ((&w, &mask), &frozen) in r.widths.iter().zip(m).zip(f) {
                assert_eq!(w, if frozen { 4 } else { FLOAT });
                assert_eq!(mask, if frozen { 0.0 } else { 1.0 });
            }
        }
        // A frozen element that moved is detected.
        let (t, i) = (0, q.state().frozen[0].iter().position(|&f| f).unwrap());
        params[t].values[i] += 0.01;
        assert!(q.finish(&params).is_err());
    }

    #[test]
    fn combined_leaves_the_in_training_group_untouched() {
        let (mut params, accum) = model(5);
        let opts = InTrainingOptions {
            fraction: FractionSchedule::Constant(0.7),
            low_bits: 2,
            start_epoch: 0,
            ..Default::default()
        };
        let mut q = InTrainingQuantizer::new(opts, &shapes(&params)).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        q.split(&mut params, &accum).unwrap();
        // The remainder grows past the tensor's range: it must saturate, not
        // change the exponent under the frozen values.
        train_a_bit(&q, &mut params, &mut rng);
        for (t, p) in params.iter_mut().enumerate() {
            if let Some(i) = q.state().frozen[t].iter().position(|&f| !f) {
                p.values[i] = 3.0;
            }
        }
        let in_training = q.finish(&params).unwrap();
        let post = PostTrainingOptions {
            widths: vec![8, 4, 0],
            method: ClusterMethod::LogKMeans,
            scope: Scope::Global,
        };
        let (result, summary) = combined(&in_training, &accum, &post).unwrap();
        assert!(summary.saturated >= 1, "{summary:?}");
        for (r, it) in result.iter().zip(&in_training) {
            assert_eq!(r.exponent, it.exponent);
            for i in 0..r.values.len() {
                if it.widths[i] != FLOAT {
                    assert_eq!(r.widths[i], it.widths[i]);
                    assert_eq!(r.values[i].to_bits(), it.values[i].to_bits());
                } else {
                    assert!(post.widths.contains(&r.widths[i]));
                }
            }
            assert!(!r.widths.contains(&FLOAT), "the remainder is quantized");
            // Re-quantizing the result with its own widths and exponent is exact.
            assert_eq!(
                fake_quantize(&r.values, &r.widths, r.exponent).unwrap(),
                r.values
            );
        }
    }
}

/// In-training runs through the real training loop on the shipped MNIST
/// subset: checkpointing and resuming mid-run.
#[cfg(test)]
mod resume_tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::{train, Arch, TrainConfig};
    use candle_core::Device;
    use std::path::Path;

    /// The in-training hook, with the process "killed" after epoch `at`'s
    /// hook ran but before its checkpoint was written.
    struct KilledAfter<'a> {
        inner: &'a mut InTrainingHook,
        at: usize,
    }

    impl EpochHook for KilledAfter<'_> {
        fn after_epoch(&mut self, epoch: usize, state: &mut TrainState) -> Result<()> {
            self.inner.after_epoch(epoch, state)?;
            if epoch == self.at {
                return Err(ModelsError::Other("killed".into()));
            }
            Ok(())
        }
        fn checkpoint_state(&self) -> Result<Option<String>> {
            self.inner.checkpoint_state()
        }
        fn restore_state(&mut self, saved: &str, state: &TrainState) -> Result<()> {
            self.inner.restore_state(saved, state)
        }
    }

    #[test]
    fn an_interrupted_in_training_run_resumes_to_the_same_result() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train_set, test_set) = load_mnist(&dir).unwrap();
        let test_set = test_set.take(200);
        let dev = Device::Cpu;
        let arch = Arch::Lenet300100;
        let mut config = TrainConfig::default_for(arch);
        config.epochs = 4;
        config.batch_size = 32;
        config.max_batches_per_epoch = Some(6);
        config.progress = false;
        let options = InTrainingOptions {
            fraction: FractionSchedule::PerSplit(vec![0.6, 0.7, 0.8]),
            low_bits: 3,
            start_epoch: 0,
            ..Default::default()
        };

        let straight_dir = tempfile::tempdir().unwrap();
        config.checkpoint_dir = Some(straight_dir.path().to_path_buf());
        let (mut straight, _) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
        let mut hook = InTrainingHook::new(options.clone(), &straight).unwrap();
        train(
            &mut straight,
            &train_set,
            &test_set,
            &config,
            Some(&mut hook),
        )
        .unwrap();
        let expected = hook.finish(&straight).unwrap();

        let dir = tempfile::tempdir().unwrap();
        config.checkpoint_dir = Some(dir.path().to_path_buf());
        let (mut first, _) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
        let mut first_hook = InTrainingHook::new(options.clone(), &first).unwrap();
        let killed = train(
            &mut first,
            &train_set,
            &test_set,
            &config,
            Some(&mut KilledAfter {
                inner: &mut first_hook,
                at: 2,
            }),
        );
        assert!(matches!(killed, Err(ModelsError::Other(m)) if m == "killed"));
        drop((first, first_hook));

        // A fresh process: state and hook come back from the checkpoint of
        // epoch 1 (two splits done).
        let (mut second, resumed) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
        assert!(resumed);
        assert_eq!(second.epoch, 2);
        let mut second_hook = InTrainingHook::new(options.clone(), &second).unwrap();
        train(
            &mut second,
            &train_set,
            &test_set,
            &config,
            Some(&mut second_hook),
        )
        .unwrap();
        assert_eq!(second_hook.quantizer.state().splits, 3);
        assert_eq!(second_hook.log, hook.log);
        let got = second_hook.finish(&second).unwrap();
        assert_eq!(got, expected, "resumed in-training result differs");

        // Resuming with other options is refused, not silently mixed.
        let other = InTrainingOptions {
            low_bits: 4,
            ..options
        };
        let (mut third, _) = TrainState::resume_or_new(arch, &dev, &config).unwrap();
        let mut other_hook = InTrainingHook::new(other, &third).unwrap();
        config.epochs = 5;
        let err = train(
            &mut third,
            &train_set,
            &test_set,
            &config,
            Some(&mut other_hook),
        )
        .unwrap_err();
        assert!(err.to_string().contains("other options"), "{err}");
    }
}
