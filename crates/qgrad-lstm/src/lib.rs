//! `qgrad-lstm`: quantized character-level LSTM language models, and the
//! normalisations that make them trainable (METHOD §11, the third thesis).
//!
//! A one-layer LSTM reads one-hot characters; its eight gate matrices (`W_x`
//! and `W_h` of the input, forget, cell and output gates) are quantized by
//! any quantizer of METHOD §10 (BinaryConnect, TerConnect, BWN, TWN, LAB,
//! LAT, LAQ), each gate matrix with its own scale, while a float softmax
//! layer predicts the next character. Without normalisation, binary and
//! ternary LSTMs fail to train: a ±1 matrix `[H, d]` has spectral norm of
//! at least `√d`, and the recurrent pre-activations blow up. Weight, layer
//! or batch normalisation of the pre-activations fixes that; this crate
//! trains every combination and measures bits per character, gradient-norm
//! traces and the spectral norms of the trained gate matrices.
//!
//! * [`config`]: the run (model size, normalisation, quantizer, recipe);
//! * [`model`]: the parameters and the forward pass, over qgrad-ops' fused
//!   recurrence [`qgrad_ops::lstm_sequence`];
//! * [`quantize`]: the gate-matrix quantizers with the straight-through
//!   estimator and Adam's curvature;
//! * [`train`]: truncated backpropagation through time, evaluation in bits
//!   per character, resumable checkpoints;
//! * [`generate()`]: seeded sampling; [`spectral`]: spectral norms.
//!
//! # Example
//!
//! A ternary (TWN) LSTM with layer norm learns a short repeated phrase:
//!
//! ```
//! use candle_core::Device;
//! use qgrad_data::TextCorpus;
//! use qgrad_lstm::{LstmConfig, LstmRun, Normalisation, TrainOptions};
//!
//! let text = "the cat sat on the mat. ".repeat(60);
//! let corpus = TextCorpus::from_bytes(text.as_bytes()).unwrap();
//! let split = corpus.split(4, 16)?;
//! let config = LstmConfig {
//!     hidden: 32,
//!     seq_len: 16,
//!     batch: 4,
//!     norm: Normalisation::Layer,
//!     weights: Some("twn".parse()?),
//!     epochs: 4,
//!     lr: 0.01,
//!     ..LstmConfig::default()
//! };
//! let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu)?;
//! run.train(&split, &TrainOptions::default())?;
//! let first = run.records[0].valid_bpc;
//! let last = run.records.last().unwrap().valid_bpc;
//! assert!(last < first, "{first} -> {last}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

pub mod config;
pub mod error;
pub mod file;
pub mod generate;
pub mod model;
pub mod quantize;
pub mod spectral;
pub mod train;

pub use config::{LstmConfig, Normalisation};
pub use error::{LstmError, Result};
pub use generate::{generate, Sampling};
pub use model::CharLstm;
pub use spectral::{gate_spectral_norms, SpectralNorm};
pub use train::{bpc_with, EpochRecord, LstmRun, StepOutcome, TrainOptions};
