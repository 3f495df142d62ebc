//! Datasets held in memory as raw `u8` pixels, and the seeded mini-batch
//! pipeline shared by every dataset.
//!
//! Images stay `u8` until a batch is drawn (MNIST is 47 MB as bytes, 188 MB as
//! f32; CIFAR-10 150 MB vs 600 MB), and conversion, per-channel normalisation
//! and augmentation happen per batch. Every random choice comes from a
//! `ChaCha8Rng` seeded by `(seed, epoch)`, so an epoch's batches are the same
//! on every run and after a resume.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An in-memory labelled image set, `len` images of `shape = [c, h, w]`,
/// pixels channel-major per image (CHW), as stored by MNIST and CIFAR-10.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// `len · c·h·w` pixels, image after image.
    pub images: Vec<u8>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// `[c, h, w]` of every image.
    pub shape: [usize; 3],
    /// Number of classes (labels are below it).
    pub num_classes: usize,
}

/// Per-channel normalisation `(x/255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    /// Per-channel mean of the pixels scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// Training-time augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Augment {
    /// No augmentation.
    None,
    /// Random crop after zero-padding by `pad` pixels, and a horizontal flip
    /// with probability 1/2 (the CIFAR-10 recipe).
    CropFlip {
        /// Zero padding on every side before the crop.
        pad: usize,
    },
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels per image, `c·h·w`.
    pub fn image_size(&self) -> usize {
        self.shape.iter().product()
    }

    /// The first `n` examples (all of them if `n >= len`).
    pub fn take(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            images: self.images[..n * self.image_size()].to_vec(),
            labels: self.labels[..n].to_vec(),
            shape: self.shape,
            num_classes: self.num_classes,
        }
    }

    /// Per-channel mean and standard deviation of the pixels scaled to [0, 1].
    ///
    /// From exact integer sums of the bytes and of their squares (a histogram
    /// would do as well): the f64 sum of `p / 255` pixel by pixel that this
    /// replaced took 1.5 s of every CIFAR-10 run's first epoch on one core,
    /// and its rounding is below what the f32 results keep (the same f32
    /// values on CIFAR-10's training set, and a test against that sum).
    pub fn channel_statistics(&self) -> Normalization {
        let [c, h, w] = self.shape;
        let plane = h * w;
        let mut sum = vec![0u64; c];
        let mut sum_sq = vec![0u64; c];
        for image in self.images.chunks_exact(self.image_size()) {
            for ch in 0..c {
                // u64 sums are exact: 255² per pixel leaves room for 2^47
                // pixels.
                let (s, q) =
                    image[ch * plane..(ch + 1) * plane]
                        .iter()
                        .fold((0u64, 0u64), |(s, q), &p| {
                            let p = u64::from(p);
                            (s + p, q + p * p)
                        });
                sum[ch] += s;
                sum_sq[ch] += q;
            }
        }
        let count = (self.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|&s| s as f64 / 255.0 / count).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(&sq, m)| {
                ((sq as f64 / (255.0 * 255.0) / count - m * m).max(1e-12)).sqrt() as f32
            })
            .collect();
        Normalization {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    /// The order of examples in `epoch`: a seeded permutation, or identity
    /// when `shuffle` is false.
    pub fn epoch_order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if shuffle {
            let mut rng = epoch_rng(seed, epoch, 0);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Fills `out` (`indices.len() · c·h·w` floats, NCHW) with the normalised,
    /// optionally augmented images at `indices`, and returns their labels.
    pub fn gather(
        &self,
        indices: &[usize],
        norm: &Normalization,
        augment: Augment,
        rng: &mut ChaCha8Rng,
        out: &mut Vec<f32>,
    ) -> Vec<u32> {
        let [c, h, w] = self.shape;
        let size = self.image_size();
        out.clear();
        out.resize(indices.len() * size, 0.0);
        let scale: Vec<f32> = norm.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> = norm
            .mean
            .iter()
            .zip(&norm.std)
            .map(|(m, s)| m / s)
            .collect();
        for (slot, &i) in indices.iter().enumerate() {
            let src = &self.images[i * size..(i + 1) * size];
            let dst = &mut out[slot * size..(slot + 1) * size];
            let (dy, dx, flip) = match augment {
                Augment::None => (0isize, 0isize, false),
                Augment::CropFlip { pad } => {
                    // rand 0.9 samples i64 but not isize.
                    let p = pad.min(i32::MAX as usize) as i64;
                    (
                        rng.random_range(-p..=p) as isize,
                        rng.random_range(-p..=p) as isize,
                        rng.random_bool(0.5),
                    )
                }
            };
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let sy = y as isize + dy;
                        let sx0 = if flip {
                            (w - 1 - x) as isize
                        } else {
                            x as isize
                        };
                        let sx = sx0 + dx;
                        // Zero padding means a 0 pixel before normalisation.
                        let pixel = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                            src[ch * h * w + sy as usize * w + sx as usize] as f32
                        } else {
                            0.0
                        };
                        dst[ch * h * w + y * w + x] = pixel * scale[ch] - shift[ch];
                    }
                }
            }
        }
        indices.iter().map(|&i| self.labels[i] as u32).collect()
    }
}

/// The generator for one `(seed, epoch, stream)`: independent streams for the
/// shuffle (0), augmentation (1) and dropout (2).
pub fn epoch_rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_mul(4).wrapping_add(stream));
    rng
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        Dataset {
            images: (0..2 * 3 * 4 * 4).map(|i| (i * 5 % 256) as u8).collect(),
            labels: vec![1, 7],
            shape: [3, 4, 4],
            num_classes: 10,
        }
    }

    /// The pixel-by-pixel f64 sums that `channel_statistics` replaced.
    fn statistics_by_f64_sums(d: &Dataset) -> Normalization {
        let [c, h, w] = d.shape;
        let plane = h * w;
        let (mut sum, mut sum_sq) = (vec![0f64; c], vec![0f64; c]);
        for image in d.images.chunks_exact(d.image_size()) {
            for ch in 0..c {
                for &p in &image[ch * plane..(ch + 1) * plane] {
                    let x = p as f64 / 255.0;
                    sum[ch] += x;
                    sum_sq[ch] += x * x;
                }
            }
        }
        let count = (d.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let std = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| ((sq / count - m * m).max(1e-12)).sqrt() as f32)
            .collect();
        Normalization {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    #[test]
    fn channel_statistics_equal_the_f64_sums() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for (n, shape, spread) in [
            (50, [3, 32, 32], 256u64),
            (7, [1, 28, 28], 256),
            (3, [2, 5, 4], 256),
            (20, [3, 8, 8], 2),
            (1, [1, 1, 1], 256),
        ] {
            let images = (0..n * shape.iter().product::<usize>())
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % spread) as u8
                })
                .collect();
            let d = Dataset {
                images,
                labels: vec![0; n],
                shape,
                num_classes: 10,
            };
            let (fast, slow) = (d.channel_statistics(), statistics_by_f64_sums(&d));
            assert_eq!(fast.mean, slow.mean, "{shape:?}");
            assert_eq!(fast.std, slow.std, "{shape:?}");
        }
        // The real CIFAR-10 training set, where a local copy is named.
        if let Some(dir) = std::env::var_os("QGRAD_CIFAR10") {
            let (train, _) = crate::cifar::load_cifar10(std::path::Path::new(&dir)).unwrap();
            let (fast, slow) = (train.channel_statistics(), statistics_by_f64_sums(&train));
            assert_eq!((fast.mean, fast.std), (slow.mean, slow.std));
        }
    }

    #[test]
    fn shuffle_is_seeded_and_a_permutation() {
        let d = Dataset {
            images: vec![0; 100],
            labels: (0..100).map(|i| (i % 10) as u8).collect(),
            shape: [1, 1, 1],
            num_classes: 10,
        };
        let a = d.epoch_order(7, 3, true);
        assert_eq!(a, d.epoch_order(7, 3, true));
        assert_ne!(a, d.epoch_order(7, 4, true));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn gather_normalises_and_augments_within_bounds() {
        let d = tiny();
        let norm = Normalization {
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        };
        let mut rng = epoch_rng(0, 0, 1);
        let mut out = Vec::new();
        let labels = d.gather(&[1, 0], &norm, Augment::None, &mut rng, &mut out);
        assert_eq!(labels, vec![7, 1]);
        let first = d.images[48] as f32 / 255.0;
        assert!((out[0] - (first - 0.5) / 0.25).abs() < 1e-5);
        let labels = d.gather(
            &[0],
            &norm,
            Augment::CropFlip { pad: 1 },
            &mut rng,
            &mut out,
        );
        assert_eq!(labels, vec![1]);
        let lo = (0.0 - 0.5) / 0.25;
        let hi = (1.0 - 0.5) / 0.25;
        assert!(out.iter().all(|&x| x >= lo - 1e-5 && x <= hi + 1e-5));
    }
}
