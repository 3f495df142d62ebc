//! Sampling text from a trained model: the prompt is fed through the LSTM,
//! then one character at a time is drawn from `softmax(logits / T)` and fed
//! back. A seed fixes the draws, so the same model, prompt, length,
//! temperature and seed give the same text.
//!
//! Batch norm's per-step statistics are indexed by the position modulo the
//! sequence length, as in evaluation, where every sequence of `seq_len`
//! characters restarts the step count.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LstmError, Result};
use crate::model::Mode;
use crate::train::LstmRun;

/// How to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// Characters to generate after the prompt.
    pub chars: usize,
    /// Softmax temperature (> 0; 1 samples the model's distribution, lower
    /// is greedier).
    pub temperature: f64,
    /// Seeds the draws.
    pub seed: u64,
}

/// The `chars` bytes that follow `prompt` (not including it).
pub fn generate(run: &mut LstmRun, prompt: &[u8], sampling: &Sampling) -> Result<Vec<u8>> {
    if !(sampling.temperature.is_finite() && sampling.temperature > 0.0) {
        return Err(LstmError::Config(format!(
            "the temperature must be a number > 0, not {}",
            sampling.temperature
        )));
    }
    if prompt.is_empty() {
        return Err(LstmError::Config(
            "the prompt is empty: give at least one character".into(),
        ));
    }
    let mut index = [None; 256];
    for (t, &b) in run.vocab.iter().enumerate() {
        index[b as usize] = Some(t as u32);
    }
    let tokens: Vec<u32> = prompt
        .iter()
        .map(|&b| {
            index[b as usize].ok_or_else(|| {
                LstmError::Config(format!(
                    "the prompt holds {:?} (byte {b}), which the training corpus never had",
                    b as char
                ))
            })
        })
        .collect::<Result<_>>()?;
    let weights = run.eval_weights()?;
    let model = &run.model;
    let seq_len = model.config.seq_len;
    let dev = model.device().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(sampling.seed);
    let mut state = None;
    let mut out = Vec::with_capacity(sampling.chars);
    let mut position = 0usize;
    let vocab = &run.vocab;
    // Feeds tokens in pieces that do not cross a sequence boundary; returns
    // the logits after the last one.
    let feed = |toks: &[u32], position: &mut usize, state: &mut Option<_>| -> Result<Vec<f32>> {
        let mut last = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            let start = *position % seq_len;
            let take = (seq_len - start).min(toks.len() - i);
            let x = Tensor::from_slice(&toks[i..i + take], take, &dev)?;
            let fwd = model.forward(
                &weights,
                &x,
                take,
                1,
                state.as_ref(),
                Mode::Eval { start_step: start },
            )?;
            last = fwd.logits.get(take - 1)?.to_vec1::<f32>()?;
            *state = Some(fwd.last);
            *position += take;
            i += take;
        }
        Ok(last)
    };
    let mut logits = feed(&tokens, &mut position, &mut state)?;
    for _ in 0..sampling.chars {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| (f64::from(l - max) / sampling.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut pick = weights.len() - 1;
        for (t, w) in weights.iter().enumerate() {
            if u < *w {
                pick = t;
                break;
            }
            u -= w;
        }
        out.push(vocab[pick]);
        logits = feed(&[pick as u32], &mut position, &mut state)?;
    }
    Ok(out)
}
