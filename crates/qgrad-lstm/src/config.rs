//! What a character-LSTM run is: the model, its normalisation, its weight
//! quantizer and the training recipe (METHOD §11).

use std::fmt;
use std::str::FromStr;

use qgrad_scaled::Method;
use serde::{Deserialize, Serialize};

use crate::error::{LstmError, Result};

/// The normalisation of the gate pre-activations (METHOD §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalisation {
    /// Plain LSTM.
    None,
    /// Weight normalisation: every row of every (quantized) gate matrix is
    /// rescaled to a learned norm.
    Weight,
    /// Layer normalisation of `W_x·x` and of `W_h·h`, separately, over the
    /// `4H` pre-activations of each row and step.
    Layer,
    /// Batch normalisation of the two terms, separately; statistics per time
    /// step (running averages kept per step).
    // Spelled as on the command line; files from before read too.
    #[serde(rename = "batch", alias = "batch-per-step")]
    BatchPerStep,
    /// Batch normalisation with running averages shared over time steps.
    BatchShared,
}

impl Normalisation {
    /// Every option, in table order.
    pub const ALL: [Normalisation; 5] = [
        Normalisation::None,
        Normalisation::Weight,
        Normalisation::Layer,
        Normalisation::BatchPerStep,
        Normalisation::BatchShared,
    ];

    /// Whether this is one of the batch norms.
    pub fn batch(self) -> bool {
        matches!(
            self,
            Normalisation::BatchPerStep | Normalisation::BatchShared
        )
    }
}

impl fmt::Display for Normalisation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Normalisation::None => "none",
            Normalisation::Weight => "weight",
            Normalisation::Layer => "layer",
            Normalisation::BatchPerStep => "batch",
            Normalisation::BatchShared => "batch-shared",
        })
    }
}

impl FromStr for Normalisation {
    type Err = LstmError;
    fn from_str(s: &str) -> Result<Self> {
        Normalisation::ALL
            .into_iter()
            .find(|n| n.to_string() == s)
            .ok_or_else(|| {
                LstmError::Config(format!(
                    "unknown normalisation '{s}' (expected none, weight, layer, batch or batch-shared)"
                ))
            })
    }
}

/// A character-LSTM run: model, quantizer, recipe. [`Default`] is the
/// reference recipe (METHOD §11) with float weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LstmConfig {
    /// Hidden units `H`.
    pub hidden: usize,
    /// Truncated backpropagation through time: steps per sequence.
    pub seq_len: usize,
    /// Sequences per batch.
    pub batch: usize,
    /// The normalisation.
    pub norm: Normalisation,
    /// The quantizer of the eight gate matrices (`None`: float).
    pub weights: Option<Method>,
    /// One scale per row (output unit) instead of one per gate matrix.
    pub per_channel: bool,
    /// Adam's learning rate.
    pub lr: f64,
    /// The global gradient norm is clipped to this.
    pub grad_clip: f64,
    /// The first epoch (0-based) whose learning rate is multiplied by
    /// `decay`, and every later one again.
    pub decay_start: usize,
    /// Learning-rate factor per epoch from `decay_start` on.
    pub decay: f64,
    /// Epochs to train.
    pub epochs: usize,
    /// Seeds the initial weights and TerConnect's stochastic codes.
    pub seed: u64,
    /// A CPU budget: at most this many training sequences-batches per epoch
    /// (the first ones, in order). `None`: the whole training part.
    #[serde(default)]
    pub train_chunks: Option<usize>,
}

impl Default for LstmConfig {
    fn default() -> Self {
        LstmConfig {
            hidden: 512,
            seq_len: 100,
            batch: 64,
            norm: Normalisation::None,
            weights: None,
            per_channel: false,
            lr: 0.002,
            grad_clip: 5.0,
            decay_start: 10,
            decay: 0.98,
            epochs: 200,
            seed: 0,
            train_chunks: None,
        }
    }
}

impl LstmConfig {
    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(LstmError::Config(m));
        if self.hidden == 0 || self.seq_len == 0 || self.batch == 0 {
            return bad(format!(
                "hidden ({}), sequence length ({}) and batch ({}) must be >= 1",
                self.hidden, self.seq_len, self.batch
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("the learning rate must be > 0, not {}", self.lr));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip > 0.0) {
            return bad(format!(
                "the gradient-norm clip must be > 0, not {}",
                self.grad_clip
            ));
        }
        if !(self.decay.is_finite() && self.decay > 0.0) {
            return bad(format!("the decay factor must be > 0, not {}", self.decay));
        }
        if self.train_chunks == Some(0) {
            return bad("a budget of 0 training batches trains nothing".into());
        }
        if self.norm.batch() && self.batch < 2 {
            return bad("batch normalisation needs a batch of at least 2".into());
        }
        if let Some(m) = self.weights {
            m.validate()?;
        }
        Ok(())
    }

    /// The learning rate of `epoch`.
    pub fn lr_at(&self, epoch: usize) -> f64 {
        qgrad_optim::LrSchedule::DecayAfter {
            start: self.decay_start,
            gamma: self.decay,
        }
        .lr_at(self.lr, epoch, self.epochs)
    }

    /// Training batches per epoch out of `available` chunks: all of them,
    /// or at most `train_chunks`.
    pub fn batches_per_epoch(&self, available: usize) -> usize {
        self.train_chunks.map_or(available, |n| n.min(available))
    }

    /// A short name: `<weights>-<norm>`, e.g. `binary-connect-layer`.
    pub fn label(&self) -> String {
        let w = self.weights.map_or("float".to_string(), |m| m.to_string());
        format!("{w}-{}", self.norm)
    }

    /// Whether `other` trains the same model the same way (everything but
    /// the epoch count, which a resumed run may raise).
    pub fn same_run(&self, other: &LstmConfig) -> bool {
        let mut a = self.clone();
        a.epochs = other.epochs;
        a == *other
    }
}
