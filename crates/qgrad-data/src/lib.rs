//! `qgrad-data`: the datasets qgrad trains and evaluates on, without candle.
//!
//! Images ([`image`]) stay `u8` in memory until a mini-batch is drawn; the
//! batch is then normalised (and, for CIFAR-10, augmented) into an `f32`
//! buffer that any framework can wrap. Character corpora ([`text`]) are
//! tokens over the file's own byte vocabulary. Every random choice derives
//! from `(seed, epoch)` ([`epoch_rng`]), so an epoch's batches are the same on
//! every run and after a resume. Loaders validate what they read and say which
//! file is wrong ([`DataError`]).
//!
//! Why a crate of its own: the training side (candle) and the deployment side
//! (integer inference from the compressed file, `qgrad-runtime`) both read
//! these datasets, and the deployment side must not depend on candle.
//!
//! ```
//! use qgrad_data::{Augment, Dataset, Normalization, epoch_rng};
//!
//! // Two 1×2×2 images.
//! let data = Dataset {
//!     images: vec![0, 255, 0, 255, 255, 255, 0, 0],
//!     labels: vec![3, 5],
//!     shape: [1, 2, 2],
//!     num_classes: 10,
//! };
//! let norm = Normalization { mean: vec![0.5], std: vec![0.5] };
//! let mut batch = Vec::new();
//! let order = data.epoch_order(7, 0, true);
//! let labels = data.gather(&order, &norm, Augment::None, &mut epoch_rng(7, 0, 1), &mut batch);
//! assert_eq!(batch.len(), 8);
//! assert!(batch.iter().all(|&x| x == -1.0 || x == 1.0));
//! assert_eq!(labels.len(), 2);
//! ```
#![warn(missing_docs)]

pub mod cifar;
pub mod error;
pub mod image;
pub mod mnist;
pub mod text;

pub use error::{DataError, Result};
pub use image::{epoch_rng, Augment, Dataset, Normalization};
pub use text::{TextCorpus, TextSplit, TokenChunks};
