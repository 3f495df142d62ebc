//! Loss-aware weight quantization and its baselines (METHOD §10) as a
//! training method: every step the forward pass uses `Ŵ = Q(W)`, the gradient
//! with respect to `Ŵ` updates the float `W` (straight-through), and `W` is
//! clipped to [−1, 1] after the update. `Q` is one of `qgrad-scaled`'s
//! quantizers; the loss-aware ones read the curvature `D = sqrt(v) + ε` from
//! Adam's second moment `v` (no bias correction, METHOD §10), as it stands
//! after the previous step (at the first step `v = 0`, so `D` is constant and
//! LAB starts as BWN).
//!
//! What is quantized: the weight of every linear and convolution layer (every
//! layer, as the reference recipes do). Biases and batch-norm parameters stay
//! float, and the size report says so; as an option
//! ([`LossAwareOptions::bias_bits`]) the linear and convolution biases go
//! into the file as fixed point (a decision beyond METHOD §10, for the
//! joint method's smallest files: at 100x, LeNet-300-100's 410 f32 biases
//! would be 15 % of the file).
//!
//! With a non-zero budget ([`SparseBudget`], METHOD §13) the same loop
//! trains jointly quantized and sparse weights: `Q` keeps the `⌊κ·n⌋`
//! elements of each tensor with the largest score, quantizes them with the
//! quantizer restricted to them and zeroes the rest
//! ([`qgrad_scaled::sparse`]); κ falls from 1 to its target along a cubic
//! schedule over the first `ramp_epochs`. The target is per layer: METHOD
//! §13's budget is a layer's, and [`SparseBudget::layers`] gives named
//! layers their own κ in place of the common one. The score is `D_i W_i²` (METHOD
//! §13) or, as an option, the accumulated gradient `A` of the first thesis
//! (METHOD §1): the two theses' importance measures side by side. Pruned
//! weights keep their float `W` and their straight-through gradient, so an
//! element can come back when its score rises; as an option
//! ([`SparseBudget::freeze_after_ramp`], a decision beyond METHOD §13) the
//! ranking is fixed at the first step at the target budget, so that the
//! epochs after the ramp train one network instead of a churning mask.
//!
//! Beyond the thesis ([`LossAwareOptions::important`]): the two theses'
//! ideas in one tensor. The fraction of each weight tensor with the largest
//! accumulated gradient `A` (METHOD §1, summed over this run's steps and any
//! `--init` checkpoint's) is kept at a higher fixed-point width, as the
//! first thesis keeps its most important parameters; the loss-aware
//! quantizer, restricted to the rest, binarizes, ternarizes or m-bit
//! quantizes them. The file holds the two parts as two tensors of the
//! layer, `<layer>.weight` (scaled codes, 0 where the weight is kept
//! high) and `<layer>.weight_high` (fixed point, 0 elsewhere), and the
//! layer's output is the sum of their products (FORMAT.md, `high_weights`).
//! Binary codes have no 0 (one would make the tensor ternary, 2 bits a
//! weight): there the important weights keep their sign code `b` with the
//! scale `α` of the rest, and the high part holds the residual `W − α·b`.
//!
//! # Decisions
//!
//! * The high part: the kept weights rounded to `bits`-bit fixed point with
//!   one exponent per tensor, that of their largest magnitude
//!   (`qgrad_fixed::tensor_exponent`), re-ranked at every step as `A` grows;
//!   their float `W` trains through the straight-through gradient like the
//!   others. Not combined with a non-zero budget.
//! * The budget schedule runs in steps: `t` = completed epochs plus the
//!   fraction of the current epoch ([`LossAwareHook::set_steps_per_epoch`];
//!   without it `t` counts whole epochs). The per-epoch evaluation uses the
//!   budget of the epoch's last step, the exported model the target κ.
//!
//! * The per-epoch evaluation and the exported model use `Q(W)` of the
//!   current `W` with the current `D` ([`LossAwareHook::finish`]).
//! * The warm start of the iterative quantizers (LAT approximate: the
//!   previous codes; LAQ: the previous scale) and TerConnect's random stream
//!   are kept in memory between steps. A resumed run restarts them from
//!   their cold start, so its steps after a resume can differ from an
//!   uninterrupted run's; so does a run with
//!   [`SparseBudget::freeze_after_ramp`] resumed after its ramp, which fixes
//!   its ranking again at its first step (the ranking is not checkpointed).
//!   The other methods resume bit for bit.

use std::collections::{BTreeMap, HashMap};

use qgrad_scaled::{quantize, stochastic_ternary, Method, Quantized};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};
use crate::net::WeightOverrides;
use crate::train::{TrainHook, TrainState};

/// The ε of `D = sqrt(v) + ε` (METHOD §10).
pub const CURVATURE_EPS: f32 = 1e-8;

/// Options of loss-aware (or baseline) weight quantization.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossAwareOptions {
    /// The quantizer.
    pub quantizer: Method,
    /// One scale per output channel (row) instead of one per tensor.
    pub per_channel: bool,
    /// Clip `W` to [−1, 1] after every update (METHOD §10; the default).
    pub clip: bool,
    /// Seeds TerConnect's stochastic codes in training.
    pub seed: u64,
    /// Joint quantization and sparsification (METHOD §13): a non-zero
    /// budget per tensor. `None`: dense.
    #[serde(default)]
    pub sparsity: Option<SparseBudget>,
    /// Width of the linear and convolution biases in the file: 32 (f32, the
    /// default) or 2..=16 bits of fixed point with one exponent per bias
    /// (`qgrad_fixed::tensor_exponent`, so that no bias saturates). Applied
    /// when the model is exported: training keeps f32 biases, and the
    /// exported model's accuracy (candle and the file alike) is that of the
    /// rounded biases.
    #[serde(default = "float_width", skip_serializing_if = "is_float_width")]
    pub bias_bits: u8,
    /// The most important weights at a higher width (see the module docs):
    /// `None`, every weight by the quantizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub important: Option<ImportantWeights>,
}

/// Which weights stay at a higher width beside the loss-aware codes, and
/// how wide (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImportantWeights {
    /// The fraction of each weight tensor, by the largest accumulated
    /// gradient `A`, in (0, 1): `floor(fraction·n)` weights, at least 1.
    pub fraction: f64,
    /// Their fixed-point width, 2..=16.
    pub bits: u8,
}

impl ImportantWeights {
    /// Checks the fraction and the width.
    pub fn validate(&self) -> Result<()> {
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return Err(ModelsError::Config(format!(
                "the fraction of important weights must lie in (0, 1), not {}",
                self.fraction
            )));
        }
        if !(qgrad_fixed::MIN_FIXED_BITS..=qgrad_fixed::MAX_FIXED_BITS).contains(&self.bits) {
            return Err(ModelsError::Config(format!(
                "important weights at {} bits: expected {}..={}",
                self.bits,
                qgrad_fixed::MIN_FIXED_BITS,
                qgrad_fixed::MAX_FIXED_BITS
            )));
        }
        Ok(())
    }
}

pub use qgrad_csr::{high_part_name as high_name, HIGH_SUFFIX, HIGH_WEIGHTS};

fn float_width() -> u8 {
    qgrad_fixed::FLOAT
}

fn is_float_width(bits: &u8) -> bool {
    *bits == qgrad_fixed::FLOAT
}

/// The non-zero budget of joint quantization and sparsification (METHOD §13).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseBudget {
    /// The target fraction κ ∈ (0, 1] of each weight tensor that may be
    /// non-zero.
    pub kappa: f64,
    /// Per-layer targets (layer name, as `fc3`, to its κ) that replace
    /// `kappa` for those layers' weights: METHOD §13's budget is per layer,
    /// and a small last layer (LeNet-300-100's `fc3` has 1,000 weights) pays
    /// little for a larger one. Each follows the same schedule from 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<String, f64>,
    /// Epochs over which κ falls from 1 to its target (cubic; 0: the target
    /// from the first step).
    pub ramp_epochs: f64,
    /// What ranks the elements that stay non-zero.
    pub importance: Importance,
    /// Fix the set of kept elements once the ramp ends (the ranking of the
    /// first step at the target budget): from then on only the kept
    /// weights' values and codes change. Off by default, as METHOD §13
    /// re-ranks at every step; a decision beyond it (see the module docs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub freeze_after_ramp: bool,
}

/// How the sparse quantizer ranks elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Importance {
    /// `D_i W_i²`: the loss increase of zeroing element `i` in the
    /// second-order model (METHOD §13; with the baselines, which read no
    /// curvature, `W_i²`).
    Curvature,
    /// The accumulated gradient `A_i = Σ |g_i|` of the first thesis (METHOD
    /// §1), summed over this run's steps.
    AccumulatedGradient,
}

impl std::str::FromStr for Importance {
    type Err = ModelsError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "curvature" => Ok(Importance::Curvature),
            "accumulated-gradient" | "accum" => Ok(Importance::AccumulatedGradient),
            other => Err(ModelsError::Config(format!(
                "unknown importance '{other}' (expected curvature or accumulated-gradient)"
            ))),
        }
    }
}

impl SparseBudget {
    /// A budget of `kappa` for every layer.
    pub fn uniform(kappa: f64, ramp_epochs: f64, importance: Importance) -> Self {
        SparseBudget {
            kappa,
            ramp_epochs,
            importance,
            layers: BTreeMap::new(),
            freeze_after_ramp: false,
        }
    }

    /// The target κ of weight `name` (`<layer>.weight`).
    pub fn target_of(&self, name: &str) -> f64 {
        self.layers
            .get(super::layer_of(name))
            .copied()
            .unwrap_or(self.kappa)
    }

    /// Checks κ, the per-layer targets and the ramp.
    pub fn validate(&self) -> Result<()> {
        qgrad_scaled::kept_count(self.kappa, 1).map_err(|e| ModelsError::Config(e.to_string()))?;
        for (layer, &kappa) in &self.layers {
            qgrad_scaled::kept_count(kappa, 1)
                .map_err(|e| ModelsError::Config(format!("layer {layer}: {e}")))?;
        }
        if !(self.ramp_epochs.is_finite() && self.ramp_epochs >= 0.0) {
            return Err(ModelsError::Config(format!(
                "the budget's ramp must be a finite number of epochs >= 0, not {}",
                self.ramp_epochs
            )));
        }
        Ok(())
    }
}

impl LossAwareOptions {
    /// `quantizer` with one scale per tensor and clipping.
    pub fn new(quantizer: Method) -> Self {
        LossAwareOptions {
            quantizer,
            per_channel: false,
            clip: true,
            seed: 0,
            sparsity: None,
            bias_bits: qgrad_fixed::FLOAT,
            important: None,
        }
    }

    /// Checks a [`LossAwareOptions::bias_bits`]: a stored width other than
    /// 0 (a bias is not pruned).
    pub fn check_bias_bits(bits: u8) -> Result<()> {
        if bits == qgrad_fixed::PRUNED || !qgrad_fixed::is_valid_width(bits) {
            return Err(ModelsError::Config(format!(
                "bias width {bits}: expected 32 (f32) or {}..={} bits",
                qgrad_fixed::MIN_FIXED_BITS,
                qgrad_fixed::MAX_FIXED_BITS
            )));
        }
        Ok(())
    }
}

/// One quantized weight tensor: the scaled codes and the shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaledWeight {
    /// The parameter name.
    pub name: String,
    /// The quantizer that made it.
    pub method: Method,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Groups of the scales (1, or the rows with per-channel scales).
    pub groups: usize,
    /// Codes, scales and the quantized values.
    pub quantized: Quantized,
}

/// Loss-aware quantization as a [`TrainHook`]: forward-weights stage (`Ŵ`),
/// after-update stage (clipping), evaluation weights.
#[derive(Debug)]
pub struct LossAwareHook {
    options: LossAwareOptions,
    names: Vec<String>,
    warm: HashMap<String, Quantized>,
    rng: ChaCha8Rng,
    /// Training steps per epoch (for the budget schedule; 0: unknown).
    steps_per_epoch: usize,
    /// Steps taken in the epoch `step_epoch`.
    steps_in_epoch: usize,
    step_epoch: usize,
    /// The schedule time of the last training step (what the evaluation
    /// uses).
    last_time: Option<f64>,
    /// With [`SparseBudget::freeze_after_ramp`], the ranking scores fixed at
    /// the first step at the target budget (kept in memory: a resumed run
    /// fixes them again at its first step past the ramp).
    frozen_scores: HashMap<String, Vec<f32>>,
}

/// Where in the budget schedule a quantization happens.
#[derive(Debug, Clone, Copy)]
enum BudgetAt {
    /// The target budget (the exported model).
    Target,
    /// `t` epochs into the schedule.
    Time(f64),
}

impl LossAwareHook {
    /// A hook for `state`'s network. The loss-aware quantizers need Adam.
    pub fn new(options: LossAwareOptions, state: &TrainState) -> Result<Self> {
        if options.quantizer.loss_aware() && state.optimizer.config().name() != "adam" {
            return Err(ModelsError::Config(format!(
                "{} reads Adam's second moment: train it with the adam optimizer",
                options.quantizer
            )));
        }
        let names = super::weight_names(state.network.arch);
        if let Some(budget) = &options.sparsity {
            budget.validate()?;
            if let Some(layer) = budget
                .layers
                .keys()
                .find(|l| !names.iter().any(|n| super::layer_of(n) == l.as_str()))
            {
                let layers: Vec<&str> = names.iter().map(|n| super::layer_of(n)).collect();
                return Err(ModelsError::Config(format!(
                    "{} has no weight layer '{layer}' for a budget (its layers: {})",
                    state.network.arch,
                    layers.join(", ")
                )));
            }
            if options.quantizer == Method::TerConnect {
                return Err(ModelsError::Config(
                    "ter-connect's stochastic codes take no non-zero budget".into(),
                ));
            }
        }
        LossAwareOptions::check_bias_bits(options.bias_bits)?;
        if let Some(important) = &options.important {
            important.validate()?;
            if options.sparsity.is_some() {
                return Err(ModelsError::Config(
                    "important weights at a higher width take no non-zero budget".into(),
                ));
            }
            if options.quantizer == Method::TerConnect {
                return Err(ModelsError::Config(
                    "ter-connect's stochastic codes take no important weights".into(),
                ));
            }
        }
        let seed = options.seed;
        Ok(LossAwareHook {
            options,
            names,
            warm: HashMap::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            steps_per_epoch: 0,
            steps_in_epoch: 0,
            step_epoch: state.epoch,
            last_time: None,
            frozen_scores: HashMap::new(),
        })
    }

    /// Tells the budget schedule how many steps an epoch has.
    pub fn set_steps_per_epoch(&mut self, steps: usize) {
        self.steps_per_epoch = steps;
    }

    /// The schedule time of the step about to run, advancing the step
    /// count.
    fn next_time(&mut self, state: &TrainState) -> f64 {
        if state.epoch != self.step_epoch {
            self.step_epoch = state.epoch;
            self.steps_in_epoch = 0;
        }
        let fraction = if self.steps_per_epoch > 0 {
            (self.steps_in_epoch as f64 / self.steps_per_epoch as f64).min(1.0)
        } else {
            0.0
        };
        self.steps_in_epoch += 1;
        state.epoch as f64 + fraction
    }

    /// The budget of weight `name` at `at` (None: dense).
    fn kappa_of(&self, name: &str, at: BudgetAt) -> Option<f64> {
        let budget = self.options.sparsity.as_ref()?;
        let target = budget.target_of(name);
        Some(match at {
            BudgetAt::Target => target,
            BudgetAt::Time(t) => qgrad_scaled::budget_at(target, t, budget.ramp_epochs),
        })
    }

    /// The options.
    pub fn options(&self) -> &LossAwareOptions {
        &self.options
    }

    /// The ranking score of weight `name` (values `w`, curvature `d`).
    fn score(
        &self,
        state: &TrainState,
        name: &str,
        w: &[f32],
        d: Option<&[f32]>,
        importance: Importance,
    ) -> Result<Vec<f32>> {
        match importance {
            Importance::Curvature => qgrad_scaled::curvature_score(w, d),
            Importance::AccumulatedGradient => {
                let a = state.accum.get(name).ok_or_else(|| {
                    ModelsError::Other(format!("no accumulated gradient of '{name}'"))
                })?;
                Ok(a.flatten_all()?.to_vec1::<f32>()?)
            }
        }
        .map_err(|e| ModelsError::Config(format!("{name}: {e}")))
    }

    /// Fixes every weight's ranking score now (the first step at the target
    /// budget, with [`SparseBudget::freeze_after_ramp`]).
    fn freeze_scores(&mut self, state: &TrainState) -> Result<()> {
        let Some(budget) = &self.options.sparsity else {
            return Ok(());
        };
        let importance = budget.importance;
        let mut frozen = HashMap::with_capacity(self.names.len());
        for name in &self.names {
            let var = state
                .network
                .parameter(name)
                .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}'")))?;
            let w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let d = self.curvature(state, name)?;
            frozen.insert(
                name.clone(),
                self.score(state, name, &w, d.as_deref(), importance)?,
            );
        }
        self.frozen_scores = frozen;
        Ok(())
    }

    /// `D = sqrt(v) + ε` of weight `name` for the loss-aware quantizers,
    /// `None` for the baselines.
    fn curvature(&self, state: &TrainState, name: &str) -> Result<Option<Vec<f32>>> {
        if !self.options.quantizer.loss_aware() {
            return Ok(None);
        }
        let v = state
            .optimizer
            .state(name, qgrad_optim::adam::EXP_AVG_SQ)
            .ok_or_else(|| ModelsError::Config("loss-aware quantizers need Adam".into()))?;
        let v: Vec<f32> = v.flatten_all()?.to_vec1()?;
        Ok(Some(v.iter().map(|v| v.sqrt() + CURVATURE_EPS).collect()))
    }

    /// `Q(W)` of parameter `name` with the current curvature, and its
    /// high-width part with [`LossAwareOptions::important`].
    fn quantize_one(
        &self,
        state: &TrainState,
        name: &str,
        warm: Option<&Quantized>,
        at: BudgetAt,
    ) -> Result<(ScaledWeight, Option<super::QuantizedTensor>)> {
        let kappa = self.kappa_of(name, at);
        let var = state
            .network
            .parameter(name)
            .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}'")))?;
        let shape = var.dims().to_vec();
        let w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let d = self.curvature(state, name)?;
        let groups = if self.options.per_channel {
            shape[0]
        } else {
            1
        };
        let config = |e: qgrad_scaled::ScaledError| ModelsError::Config(format!("{name}: {e}"));
        let high = match self.options.important {
            Some(important) => {
                let a = self.score(state, name, &w, None, Importance::AccumulatedGradient)?;
                let keep = qgrad_scaled::kept_count(important.fraction, w.len()).map_err(config)?;
                Some((qgrad_scaled::sparse::largest(&a, keep), important.bits))
            }
            None => None,
        };
        let quantized = match (&high, kappa, &self.options.sparsity) {
            (Some((mask, _)), _, _) => {
                let rest: Vec<bool> = mask.iter().map(|h| !h).collect();
                qgrad_scaled::quantize_masked(
                    self.options.quantizer,
                    &w,
                    d.as_deref(),
                    groups,
                    &rest,
                    warm,
                )
            }
            (None, Some(kappa), Some(budget)) => {
                // The frozen ranking is read in place, not copied every step.
                let score: std::borrow::Cow<[f32]> = match self.frozen_scores.get(name) {
                    Some(frozen) => frozen.into(),
                    None => self
                        .score(state, name, &w, d.as_deref(), budget.importance)?
                        .into(),
                };
                let keep = qgrad_scaled::kept_count(kappa, w.len())
                    .map_err(|e| ModelsError::Config(format!("{name}: {e}")))?;
                qgrad_scaled::quantize_sparse(
                    self.options.quantizer,
                    &w,
                    d.as_deref(),
                    groups,
                    keep,
                    &score,
                    warm,
                )
            }
            _ => quantize(self.options.quantizer, &w, d.as_deref(), groups, warm),
        }
        .map_err(config)?;
        let mut quantized = quantized;
        let high = match high {
            Some((mask, bits)) if self.options.quantizer.binary() => {
                // Binary codes have no 0: a zero would turn the whole tensor
                // into ternary codes (2 bits a weight). The important weights
                // keep the sign code of their group's scale, and the high
                // part holds the residual `W − α·b` (the weight is the sum).
                let per = w.len() / groups;
                let spg = self.options.quantizer.scales_per_group();
                let mut residual = w.clone();
                for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
                    let code: i8 = if w[i] < 0.0 { -1 } else { 1 };
                    let scale = quantized.scales[(i / per) * spg];
                    quantized.codes[i] = code;
                    quantized.values[i] = scale * f32::from(code);
                    residual[i] = w[i] - quantized.values[i];
                }
                Some(high_part(name, &shape, &residual, &mask, bits)?)
            }
            Some((mask, bits)) => Some(high_part(name, &shape, &w, &mask, bits)?),
            None => None,
        };
        let scaled = ScaledWeight {
            name: name.to_string(),
            method: self.options.quantizer,
            shape,
            groups,
            quantized,
        };
        Ok((scaled, high))
    }

    /// [`LossAwareHook::finish`] and, with [`LossAwareOptions::important`],
    /// the high-width parts of the weights (empty without), each weight
    /// quantized once: what the file holds.
    pub fn finish_split(
        &self,
        state: &TrainState,
    ) -> Result<(Vec<ScaledWeight>, Vec<super::QuantizedTensor>)> {
        let mut scaled = Vec::with_capacity(self.names.len());
        let mut highs = Vec::new();
        for n in &self.names {
            let (w, high) = self.quantize_one(state, n, self.warm.get(n), BudgetAt::Target)?;
            scaled.push(w);
            highs.extend(high);
        }
        Ok((scaled, highs))
    }

    /// The parameters of `state` that the quantizer leaves alone (biases,
    /// batch norm) for the file: width 32, except the linear and
    /// convolution biases at [`LossAwareOptions::bias_bits`] when that is
    /// below 32.
    pub fn float_parameters(&self, state: &TrainState) -> Result<Vec<super::QuantizedTensor>> {
        let mut params = super::float_parameters(state, &self.names)?;
        let bits = self.options.bias_bits;
        if bits == qgrad_fixed::FLOAT {
            return Ok(params);
        }
        for p in params.iter_mut().filter(|p| is_layer_bias(&p.name)) {
            let exponent = qgrad_fixed::tensor_exponent(&p.values)
                .map_err(|e| ModelsError::Other(format!("{}: {e}", p.name)))?;
            p.widths = vec![bits; p.values.len()];
            p.values = qgrad_fixed::fake_quantize(&p.values, &p.widths, exponent)
                .map_err(|e| ModelsError::Other(format!("{}: {e}", p.name)))?;
            p.exponent = exponent;
        }
        Ok(params)
    }

    /// The quantized weights of `state` now (what is exported).
    /// With a budget, the target κ.
    pub fn finish(&self, state: &TrainState) -> Result<Vec<ScaledWeight>> {
        self.quantized_weights(state, BudgetAt::Target)
    }

    fn quantized_weights(&self, state: &TrainState, at: BudgetAt) -> Result<Vec<ScaledWeight>> {
        self.names
            .iter()
            .map(|n| Ok(self.quantize_one(state, n, self.warm.get(n), at)?.0))
            .collect()
    }

    /// The weights the network computes with at `at`: the codes' values,
    /// plus the high-width part where there is one.
    fn forward_values(&self, state: &TrainState, at: BudgetAt) -> Result<Vec<ScaledWeight>> {
        self.names
            .iter()
            .map(|n| {
                let (mut w, high) = self.quantize_one(state, n, self.warm.get(n), at)?;
                if let Some(high) = high {
                    add_high(&mut w.quantized.values, &high);
                }
                Ok(w)
            })
            .collect()
    }
}

/// `values += high`, in f32: a split weight is the sum of its parts
/// (exact where the codes are 0; binary codes add their residual, and the
/// file's readers add in the same f32 order).
fn add_high(values: &mut [f32], high: &super::QuantizedTensor) {
    for (v, h) in values.iter_mut().zip(&high.values) {
        *v += *h;
    }
}

/// The weights of `w` under `mask` at `bits`-bit fixed point, one exponent
/// for the tensor from their largest magnitude; 0 (width 0) elsewhere and
/// where the rounding gives 0.
fn high_part(
    name: &str,
    shape: &[usize],
    w: &[f32],
    mask: &[bool],
    bits: u8,
) -> Result<super::QuantizedTensor> {
    let fixed = |e: qgrad_fixed::FixedError| ModelsError::Other(format!("{name}: {e}"));
    let kept: Vec<f32> = w
        .iter()
        .zip(mask)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v)
        .collect();
    let exponent = qgrad_fixed::tensor_exponent(&kept).map_err(fixed)?;
    let mut widths: Vec<u8> = mask.iter().map(|&m| if m { bits } else { 0 }).collect();
    let values = qgrad_fixed::fake_quantize(w, &widths, exponent).map_err(fixed)?;
    for (width, v) in widths.iter_mut().zip(&values) {
        if *v == 0.0 {
            *width = qgrad_fixed::PRUNED;
        }
    }
    Ok(super::QuantizedTensor {
        name: high_name(name),
        shape: shape.to_vec(),
        values,
        widths,
        exponent,
    })
}

impl TrainHook for LossAwareHook {
    fn name(&self) -> &'static str {
        "loss-aware"
    }

    fn forward_weights(
        &mut self,
        state: &TrainState,
        overrides: &mut WeightOverrides,
    ) -> Result<()> {
        let t = self.next_time(state);
        self.last_time = Some(t);
        let at = BudgetAt::Time(t);
        let freeze_now = self
            .options
            .sparsity
            .as_ref()
            .is_some_and(|b| b.freeze_after_ramp && t >= b.ramp_epochs);
        if freeze_now && self.frozen_scores.is_empty() {
            self.freeze_scores(state)?;
        }
        let mut weights = Vec::with_capacity(self.names.len());
        for name in &self.names {
            if self.options.quantizer != Method::TerConnect {
                let (mut w, high) = self.quantize_one(state, name, self.warm.get(name), at)?;
                if let Some(high) = high {
                    // The warm start keeps the codes' own values.
                    let scaled = w.quantized.clone();
                    add_high(&mut w.quantized.values, &high);
                    super::straight_through(state, std::slice::from_ref(&w), overrides)?;
                    self.warm.insert(w.name, scaled);
                    continue;
                }
                weights.push(w);
                continue;
            }
            // TerConnect is stochastic in training (qgrad-scaled's docs).
            let var = state
                .network
                .parameter(name)
                .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}'")))?;
            let w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let u: Vec<f32> = (0..w.len()).map(|_| self.rng.random::<f32>()).collect();
            weights.push(ScaledWeight {
                name: name.clone(),
                method: Method::TerConnect,
                shape: var.dims().to_vec(),
                groups: 1,
                quantized: stochastic_ternary(&w, &u)
                    .map_err(|e| ModelsError::Config(format!("{name}: {e}")))?,
            });
        }
        super::straight_through(state, &weights, overrides)?;
        for q in weights {
            self.warm.insert(q.name, q.quantized);
        }
        Ok(())
    }

    fn after_update(&mut self, state: &mut TrainState) -> Result<()> {
        if !self.options.clip {
            return Ok(());
        }
        for name in &self.names {
            if let Some(var) = state.network.parameter(name) {
                // On the weight's device: no host copy in the training step.
                let clipped = var.as_tensor().detach().clamp(-1f32, 1f32)?;
                var.set(&clipped)?;
            }
        }
        Ok(())
    }

    fn eval_weights(&self, state: &TrainState, overrides: &mut WeightOverrides) -> Result<()> {
        let at = self.last_time.map_or(BudgetAt::Target, BudgetAt::Time);
        let weights = self.forward_values(state, at)?;
        super::straight_through_owned(state, weights, overrides)
    }
}

/// A linear or convolution layer's bias (`<layer>.bias`, not a batch
/// norm's `<layer>.bn.bias`).
fn is_layer_bias(name: &str) -> bool {
    name.strip_suffix(".bias")
        .is_some_and(|layer| !layer.ends_with(".bn"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::train::OptimizerKind;
    use crate::{train, Arch, TrainConfig};
    use candle_core::Device;
    use std::path::Path;

    /// A short Adam run: `epochs` of `batches` batches of 50 at lr 0.005.
    fn adam_config(arch: Arch, epochs: usize, batches: usize) -> TrainConfig {
        let mut config = TrainConfig::default_for(arch);
        (config.epochs, config.batch_size, config.lr) = (epochs, 50, 0.005);
        config.max_batches_per_epoch = Some(batches);
        config.optimizer = OptimizerKind::ADAM;
        config.progress = false;
        config
    }

    /// The float values of parameter `name`.
    fn values(state: &TrainState, name: &str) -> Vec<f32> {
        let var = state.network.parameter(name).unwrap();
        var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    fn mini() -> (crate::data::Dataset, crate::data::Dataset) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train, test) = load_mnist(&dir).unwrap();
        (train.take(2000), test.take(200))
    }

    #[test]
    fn a_short_run_with_each_quantizer_lowers_the_loss() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        for method in Method::all() {
            let mut config = adam_config(arch, 2, 12);
            config.weight_decay = 0.0;
            let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
            let mut hook = LossAwareHook::new(LossAwareOptions::new(method), &state).unwrap();
            let norm = config.normalization.clone().unwrap();
            let mut initial = WeightOverrides::new();
            hook.eval_weights(&state, &mut initial).unwrap();
            let (_, before) = state
                .network
                .evaluate_with_overrides(&test_set, &norm, 100, &initial)
                .unwrap();
            let report =
                train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
            if method == Method::TerConnect {
                // Its exported codes start at 0 (|W| < ½): the stochastic
                // training loss is what moves.
                let (first, last) = (&report.epochs[0], report.epochs.last().unwrap());
                assert!(last.train_loss < first.train_loss, "{method}: {report:?}");
            } else {
                let after = report.epochs.last().unwrap().test_loss;
                assert!(after < before, "{method}: test loss {before} -> {after}");
            }
            // Weights stay clipped, and the exported weights hold at most the
            // method's levels.
            let weights = hook.finish(&state).unwrap();
            assert_eq!(weights.len(), 3);
            for q in &weights {
                let w = values(&state, &q.name);
                assert!(w.iter().all(|x| x.abs() <= 1.0), "{method}");
                let mut levels: Vec<u32> = q.quantized.values.iter().map(|v| v.to_bits()).collect();
                levels.sort();
                levels.dedup();
                let limit = match method {
                    m if m.binary() => 2,
                    Method::Laq { bits, .. } => (1 << bits) - 1,
                    _ => 3,
                };
                assert!(levels.len() <= limit, "{method}: {} levels", levels.len());
            }
        }
    }

    #[test]
    fn the_evaluation_runs_the_quantized_network() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        let config = adam_config(arch, 1, 10);
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let mut hook = LossAwareHook::new(LossAwareOptions::new(Method::LatExact), &state).unwrap();
        let report = train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
        // Copy Q(W) into a plain network: its accuracy is the reported one.
        let weights = hook.finish(&state).unwrap();
        let mut host = state.network.to_host().unwrap();
        for q in &weights {
            let t = host.iter_mut().find(|t| t.name == q.name).unwrap();
            t.values = q.quantized.values.clone();
        }
        let mut plain = crate::Network::new(arch, &Device::Cpu, 9).unwrap();
        plain.set_from_host(&host).unwrap();
        let norm = config.normalization.clone().unwrap();
        let accuracy = plain.evaluate(&test_set, &norm, 100).unwrap();
        assert_eq!(accuracy, report.epochs[0].test_accuracy);
        // SGD cannot drive a loss-aware quantizer; a baseline it can.
        let sgd = TrainState::new(arch, &Device::Cpu, &TrainConfig::default_for(arch)).unwrap();
        assert!(LossAwareHook::new(LossAwareOptions::new(Method::Lab), &sgd).is_err());
        assert!(LossAwareHook::new(LossAwareOptions::new(Method::Bwn), &sgd).is_ok());
    }

    #[test]
    fn a_budget_trains_sparse_weights_within_it() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        for (method, importance) in [
            (Method::LatExact, Importance::Curvature),
            (Method::Lab, Importance::AccumulatedGradient),
            (
                Method::Laq {
                    bits: 3,
                    log: false,
                },
                Importance::Curvature,
            ),
        ] {
            let mut config = adam_config(arch, 2, 12);
            config.weight_decay = 0.0;
            let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
            let mut options = LossAwareOptions::new(method);
            options.sparsity = Some(SparseBudget::uniform(0.1, 1.0, importance));
            let mut hook = LossAwareHook::new(options, &state).unwrap();
            hook.set_steps_per_epoch(12);
            let report =
                train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
            let (first, last) = (&report.epochs[0], report.epochs.last().unwrap());
            assert!(
                last.test_loss.is_finite() && last.test_accuracy > 0.5,
                "{method}: {report:?}"
            );
            assert!(
                last.train_loss < first.train_loss * 1.5,
                "{method}: {report:?}"
            );
            for q in hook.finish(&state).unwrap() {
                let n = q.quantized.codes.len();
                let nonzero = q.quantized.codes.iter().filter(|&&c| c != 0).count();
                assert!(nonzero <= n / 10, "{method} {}: {nonzero} of {n}", q.name);
                assert!(nonzero > 0);
            }
        }
        // A budget outside (0, 1] is refused.
        let state = TrainState::new(arch, &Device::Cpu, &TrainConfig::default_for(arch)).unwrap();
        let mut options = LossAwareOptions::new(Method::Bwn);
        options.sparsity = Some(SparseBudget::uniform(0.0, 1.0, Importance::Curvature));
        assert!(LossAwareHook::new(options.clone(), &state).is_err());
        // So is a per-layer budget outside it, or for a layer the network
        // does not have.
        for (layer, kappa) in [("fc3", 1.5), ("fc9", 0.5), ("fc3.weight", 0.5)] {
            let mut budget = SparseBudget::uniform(0.1, 1.0, Importance::Curvature);
            budget.layers.insert(layer.into(), kappa);
            options.sparsity = Some(budget);
            assert!(
                LossAwareHook::new(options.clone(), &state).is_err(),
                "{layer}"
            );
        }
    }

    #[test]
    fn a_frozen_mask_keeps_the_ranking_of_the_ramp_end() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        let mut config = adam_config(arch, 3, 12);
        config.weight_decay = 0.0;
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let mut options = LossAwareOptions::new(Method::Laq {
            bits: 3,
            log: false,
        });
        let mut budget = SparseBudget::uniform(0.1, 1.0, Importance::Curvature);
        budget.freeze_after_ramp = true;
        options.sparsity = Some(budget);
        let mut hook = LossAwareHook::new(options, &state).unwrap();
        hook.set_steps_per_epoch(12);
        train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
        assert_eq!(hook.frozen_scores.len(), hook.names.len());
        let top = |score: &[f32], keep: usize| -> std::collections::HashSet<usize> {
            let mut order: Vec<usize> = (0..score.len()).collect();
            order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
            order.into_iter().take(keep).collect()
        };
        let mut moved = false;
        for q in hook.finish(&state).unwrap() {
            let n = q.quantized.codes.len();
            let keep = qgrad_scaled::kept_count(0.1, n).unwrap();
            let frozen = top(&hook.frozen_scores[&q.name], keep);
            // Every non-zero of the export lies in the set fixed at the ramp's end.
            for (i, &c) in q.quantized.codes.iter().enumerate() {
                assert!(c == 0 || frozen.contains(&i), "{} element {i}", q.name);
            }
            // Two epochs later the current ranking is another set: the
            // freeze is what kept it.
            let w = values(&state, &q.name);
            let d = hook.curvature(&state, &q.name).unwrap();
            let now = hook
                .score(&state, &q.name, &w, d.as_deref(), Importance::Curvature)
                .unwrap();
            moved |= top(&now, keep) != frozen;
        }
        assert!(moved, "the ranking never changed after the ramp");
    }

    #[test]
    fn per_layer_budgets_and_bias_widths_hold_in_the_export() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        let config = adam_config(arch, 2, 8);
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let mut options = LossAwareOptions::new(Method::LatExact);
        let mut budget = SparseBudget::uniform(0.05, 1.0, Importance::Curvature);
        budget.layers.insert("fc3".into(), 0.5);
        options.sparsity = Some(budget);
        options.bias_bits = 8;
        let mut hook = LossAwareHook::new(options, &state).unwrap();
        hook.set_steps_per_epoch(8);
        train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
        for q in hook.finish(&state).unwrap() {
            let n = q.quantized.codes.len();
            let nonzero = q.quantized.codes.iter().filter(|&&c| c != 0).count();
            let limit = if q.name == "fc3.weight" {
                n / 2
            } else {
                n / 20
            };
            assert!(nonzero <= limit, "{}: {nonzero} of {n}", q.name);
            if q.name == "fc3.weight" {
                // Far more than the uniform budget's 50 are kept.
                assert!(nonzero > n / 20, "{}: {nonzero} of {n}", q.name);
            }
        }
        let host = state.network.params_to_host().unwrap();
        let params = hook.float_parameters(&state).unwrap();
        assert_eq!(params.len(), 3);
        for p in &params {
            assert!(p.name.ends_with(".bias"), "{}", p.name);
            assert!(p.widths.iter().all(|&w| w == 8), "{}", p.name);
            let f32s = &host.iter().find(|h| h.name == p.name).unwrap().values;
            // Rounded to the grid of step 2^(e - 7), none saturated.
            let step = 2f32.powi(p.exponent - 7);
            for (&q, &x) in p.values.iter().zip(f32s) {
                assert!((q - x).abs() <= step / 2.0 + 1e-9, "{}: {x} -> {q}", p.name);
                assert_eq!((q / step).fract(), 0.0, "{}: {q}", p.name);
            }
        }
        let mut options = LossAwareOptions::new(Method::LatExact);
        options.bias_bits = 1;
        assert!(LossAwareHook::new(options, &state).is_err());
    }

    #[test]
    fn important_weights_are_the_largest_accumulated_gradients_at_their_width() {
        let (train_set, test_set) = mini();
        let arch = Arch::Lenet300100;
        let mut config = adam_config(arch, 1, 6);
        config.weight_decay = 0.0;
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let mut options = LossAwareOptions::new(Method::LatExact);
        options.important = Some(ImportantWeights {
            fraction: 0.03,
            bits: 6,
        });
        let mut hook = LossAwareHook::new(options.clone(), &state).unwrap();
        train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
        let (scaled, highs) = hook.finish_split(&state).unwrap();
        let mut forward = WeightOverrides::new();
        hook.eval_weights(&state, &mut forward).unwrap();
        assert_eq!(highs.len(), scaled.len());
        for (w, high) in scaled.iter().zip(&highs) {
            assert_eq!(high.name, high_name(&w.name));
            let a: Vec<f32> = state
                .accum
                .get(&w.name)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let n = a.len();
            let top = qgrad_scaled::sparse::largest(&a, (0.03 * n as f64).floor() as usize);
            let ranked: Vec<f32> = {
                let mut v = a.clone();
                v.sort_by(|x, y| y.total_cmp(x));
                v
            };
            let forward: Vec<f32> = forward[&w.name].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..n {
                if top[i] {
                    // No code, and the weight on the 6-bit grid of the tensor.
                    assert_eq!(w.quantized.codes[i], 0, "{} {i}", w.name);
                    let step = 2f32.powi(high.exponent - 5);
                    assert_eq!((high.values[i] / step).fract(), 0.0);
                    assert!(high.widths[i] == 6 || high.values[i] == 0.0);
                } else {
                    assert_eq!(high.widths[i], 0);
                    assert_eq!(high.values[i], 0.0);
                }
                assert_eq!(forward[i], w.quantized.values[i] + high.values[i]);
            }
            // The kept ones are the largest A.
            let kept_min = (0..n)
                .filter(|&i| top[i])
                .map(|i| a[i])
                .fold(f32::INFINITY, f32::min);
            assert_eq!(kept_min, ranked[(0.03 * n as f64).floor() as usize - 1]);
            // The rest is ternary with one scale.
            let mut levels: Vec<u32> = (0..n)
                .filter(|&i| !top[i])
                .map(|i| w.quantized.values[i].to_bits())
                .collect();
            levels.sort();
            levels.dedup();
            assert!(levels.len() <= 3, "{}: {} levels", w.name, levels.len());
        }
        // Not with a non-zero budget or TerConnect, nor at a bad width.
        for (method, sparse, fraction, bits) in [
            (Method::LatExact, true, 0.03, 8),
            (Method::TerConnect, false, 0.03, 8),
            (Method::LatExact, false, 1.0, 8),
            (Method::LatExact, false, 0.03, 1),
        ] {
            let mut bad = LossAwareOptions::new(method);
            bad.important = Some(ImportantWeights { fraction, bits });
            if sparse {
                bad.sparsity = Some(SparseBudget::uniform(0.1, 0.0, Importance::Curvature));
            }
            assert!(
                LossAwareHook::new(bad, &state).is_err(),
                "{method} {fraction} {bits}"
            );
        }
    }
}
