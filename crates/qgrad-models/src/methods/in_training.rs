//! In-training quantization (METHOD §4): after each due epoch, among the
//! still-float elements, the fraction `p` with the lowest `A` is quantized to
//! `b_low` and frozen (the training loop's freeze masks stop updates,
//! momentum and weight decay for them). [`InTrainingQuantizer`] is the
//! host-side decision, [`InTrainingHook`] plugs it into the training loop's
//! after-epoch stage.

use std::collections::BTreeMap;
use std::str::FromStr;

use qgrad_accum::FreezeMask;
use qgrad_fixed::{fake_quantize, is_valid_width, tensor_exponent, FLOAT};
use serde::{Deserialize, Serialize};

use super::{accum_for, accum_to_host, check_param, invalid, layer_of, QuantizedTensor, Scope};
use crate::error::{ModelsError, Result};
use crate::train::{TrainHook, TrainState};
use crate::NamedTensor;

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

    /// Rejects fractions outside (0, 1) and empty lists.
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
    /// The split fraction `p`, constant or per split.
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
    /// Rejects widths and fractions METHOD §4 does not allow.
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

/// Serializable state of in-training quantization (for resuming a run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InTrainingState {
    /// The options of the run.
    pub options: InTrainingOptions,
    /// Parameter names, in the order of `frozen` and `exponents`.
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
    /// The split (0-based).
    pub split: usize,
    /// Indices of the tensors that got newly frozen elements.
    pub changed_tensors: Vec<usize>,
    /// Elements frozen by this split.
    pub newly_frozen: usize,
    /// Elements frozen after it.
    pub frozen: usize,
    /// Elements still float after it.
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

    /// Continues from a saved state.
    pub fn from_state(state: InTrainingState) -> Result<Self> {
        state.options.validate()?;
        if state.frozen.len() != state.names.len() || state.exponents.len() != state.names.len() {
            return Err(invalid("in-training state has inconsistent lengths"));
        }
        Ok(InTrainingQuantizer { state })
    }

    /// The state to save.
    pub fn state(&self) -> &InTrainingState {
        &self.state
    }

    /// The options of the run.
    pub fn options(&self) -> &InTrainingOptions {
        &self.state.options
    }

    /// Whether a split is due after `epoch` (0-based).
    pub fn split_due(&self, epoch: usize) -> bool {
        let options = &self.state.options;
        epoch >= options.start_epoch
            && (epoch - options.start_epoch).is_multiple_of(options.split_every)
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

/// In-training quantization as a [`TrainHook`] (after-epoch stage): after every due epoch it
/// copies parameters and accumulated gradients to the host (once per epoch,
/// not per step), runs [`InTrainingQuantizer::split`], writes the quantized
/// values back into the network and sets the freeze masks.
#[derive(Debug, Clone)]
pub struct InTrainingHook {
    /// The host-side split logic and state.
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

impl TrainHook for InTrainingHook {
    fn name(&self) -> &'static str {
        "in-training"
    }

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

    impl TrainHook for KilledAfter<'_> {
        fn name(&self) -> &'static str {
            "in-training"
        }

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
            &mut [&mut hook],
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
            &mut [&mut KilledAfter {
                inner: &mut first_hook,
                at: 2,
            }],
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
            &mut [&mut second_hook],
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
            &mut [&mut other_hook],
        )
        .unwrap_err();
        assert!(err.to_string().contains("other options"), "{err}");
    }
}
