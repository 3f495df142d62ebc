//! Structured (block) sparsity (METHOD §9), beside the quantizers rather
//! than inside them: a weight matrix (a convolution seen as `[out, in·k·k]`)
//! is cut into blocks of `br × bc` (edge blocks smaller); in every block row
//! exactly `ceil(blocks_in_row / c)` blocks are kept, so every output unit
//! sees the same fan-in. The kept blocks are chosen before training from a
//! seed (random), or by block L2 norm or block accumulated gradient `A`
//! (METHOD §1) after a warm-up.
//!
//! [`BlockSparsityHook`] keeps the masked weights exactly 0.0: it zeroes them
//! and freezes them (the optimizer gives frozen elements no gradient, decay or
//! momentum), and re-applies the mask after every update (the after-update
//! stage of the training loop).
//!
//! Decided: ties between equal block scores go to the lower block index; the
//! random selection draws one score per block from a `ChaCha8Rng` seeded by
//! the seed and the layer's position.

use qgrad_accum::FreezeMask;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::invalid;
use crate::error::Result;
use crate::train::{TrainHook, TrainState};
use crate::NamedTensor;

/// How the kept blocks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockSelection {
    /// At random, before training (the sources' static block-wise connections).
    Random {
        /// The seed.
        seed: u64,
    },
    /// The blocks of largest L2 norm.
    Norm,
    /// The blocks of largest summed accumulated gradient `A`.
    AccumulatedGradient,
}

/// Options of block sparsity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSparsityOptions {
    /// Block rows × block columns.
    pub block: (usize, usize),
    /// Compression `c`: one block in `c` is kept per block row (1, 2, 4, 8, 16).
    pub compression: usize,
    /// How blocks are chosen.
    pub selection: BlockSelection,
    /// Keep the first and the last layer dense.
    pub dense_first_last: bool,
}

impl BlockSparsityOptions {
    /// Rejects empty blocks and compressions METHOD §9 does not list.
    pub fn validate(&self) -> Result<()> {
        if self.block.0 == 0 || self.block.1 == 0 {
            return Err(invalid("blocks need at least one row and one column"));
        }
        if ![1, 2, 4, 8, 16].contains(&self.compression) {
            return Err(invalid(format!(
                "compression must be 1, 2, 4, 8 or 16, not {}",
                self.compression
            )));
        }
        Ok(())
    }
}

/// The mask of one weight tensor: `true` = kept.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockMask {
    /// The parameter name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// One flag per element, row-major.
    pub keep: Vec<bool>,
}

impl BlockMask {
    /// Kept elements.
    pub fn kept(&self) -> usize {
        self.keep.iter().filter(|&&k| k).count()
    }
}

/// The block masks of every linear and convolution weight of `arch` (the
/// first and last left out when `dense_first_last`). `params` holds the
/// weights (for norm selection), `accum` their `A` (for `A` selection; may be
/// empty otherwise).
pub fn block_masks(
    arch: crate::Arch,
    params: &[NamedTensor],
    accum: &[NamedTensor],
    opts: &BlockSparsityOptions,
) -> Result<Vec<BlockMask>> {
    opts.validate()?;
    let weights = super::weight_names(arch);
    let last = weights.len().saturating_sub(1);
    let mut out = Vec::new();
    for (index, name) in weights.iter().enumerate() {
        if opts.dense_first_last && (index == 0 || index == last) {
            continue;
        }
        let p = params
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| invalid(format!("no parameter '{name}'")))?;
        let scores_of = |source: &[f32]| block_scores(&p.shape, opts.block, |i| source[i]);
        let scores = match opts.selection {
            BlockSelection::Norm => scores_of(&p.values.iter().map(|v| v * v).collect::<Vec<_>>()),
            BlockSelection::AccumulatedGradient => {
                let a = accum
                    .iter()
                    .find(|a| &a.name == name)
                    .ok_or_else(|| invalid(format!("no accumulated gradient for '{name}'")))?;
                scores_of(&a.values)
            }
            BlockSelection::Random { seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(index as u64);
                let (rows, cols) = matrix(&p.shape);
                let n = rows.div_ceil(opts.block.0) * cols.div_ceil(opts.block.1);
                (0..n).map(|_| rng.random::<f64>()).collect()
            }
        };
        out.push(mask_from_scores(name, &p.shape, &scores, opts));
    }
    Ok(out)
}

fn matrix(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    (rows, shape.iter().skip(1).product::<usize>().max(1))
}

/// Per block (block-row major), the sum of `value(i)` over its elements.
fn block_scores(shape: &[usize], block: (usize, usize), value: impl Fn(usize) -> f32) -> Vec<f64> {
    let (rows, cols) = matrix(shape);
    let (brows, bcols) = (rows.div_ceil(block.0), cols.div_ceil(block.1));
    let mut scores = vec![0f64; brows * bcols];
    for r in 0..rows {
        for c in 0..cols {
            scores[(r / block.0) * bcols + c / block.1] += value(r * cols + c) as f64;
        }
    }
    scores
}

/// Keeps the `ceil(bcols / c)` highest-scoring blocks of every block row.
fn mask_from_scores(
    name: &str,
    shape: &[usize],
    scores: &[f64],
    opts: &BlockSparsityOptions,
) -> BlockMask {
    let (rows, cols) = matrix(shape);
    let (br, bc) = opts.block;
    let bcols = cols.div_ceil(bc);
    let keep_per_row = bcols.div_ceil(opts.compression);
    let mut keep = vec![false; rows * cols];
    for brow in 0..rows.div_ceil(br) {
        let mut order: Vec<usize> = (0..bcols).collect();
        let row_scores = &scores[brow * bcols..(brow + 1) * bcols];
        order.sort_by(|&a, &b| row_scores[b].total_cmp(&row_scores[a]).then(a.cmp(&b)));
        for &bcol in &order[..keep_per_row] {
            for r in brow * br..((brow + 1) * br).min(rows) {
                for c in bcol * bc..((bcol + 1) * bc).min(cols) {
                    keep[r * cols + c] = true;
                }
            }
        }
    }
    BlockMask {
        name: name.to_string(),
        shape: shape.to_vec(),
        keep,
    }
}

/// Block sparsity as a [`TrainHook`]: masked weights are zero and frozen
/// from the start, and zeroed again after every update.
#[derive(Debug)]
pub struct BlockSparsityHook {
    masks: Vec<BlockMask>,
    /// The freeze mask of each block mask, on the weights' device, made once
    /// (the after-update stage runs every step).
    frozen: Vec<FreezeMask>,
}

impl BlockSparsityHook {
    /// Applies `masks` to `state` (zeroes and freezes the masked weights).
    pub fn new(masks: Vec<BlockMask>, state: &mut TrainState) -> Result<Self> {
        let device = state.network.device().clone();
        let frozen = masks
            .iter()
            .map(|m| {
                let frozen: Vec<bool> = m.keep.iter().map(|k| !k).collect();
                FreezeMask::from_frozen(&m.shape, &frozen, &device)
            })
            .collect::<qgrad_accum::Result<Vec<_>>>()?;
        for (m, mask) in masks.iter().zip(&frozen) {
            state.set_mask(&m.name, mask.clone())?;
        }
        let hook = BlockSparsityHook { masks, frozen };
        hook.apply(state)?;
        Ok(hook)
    }

    /// The masks.
    pub fn masks(&self) -> &[BlockMask] {
        &self.masks
    }

    fn apply(&self, state: &mut TrainState) -> Result<()> {
        for (m, frozen) in self.masks.iter().zip(&self.frozen) {
            let var = state
                .network
                .parameter(&m.name)
                .ok_or_else(|| invalid(format!("no parameter '{}'", m.name)))?;
            // A select, not a product: a masked negative weight becomes +0.0,
            // not −0.0 (in place on the CPU).
            frozen.zero_frozen(var)?;
        }
        Ok(())
    }
}

impl TrainHook for BlockSparsityHook {
    fn name(&self) -> &'static str {
        "block-sparsity"
    }

    fn after_update(&mut self, state: &mut TrainState) -> Result<()> {
        self.apply(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::load_mnist;
    use crate::{train, Arch, TrainConfig};
    use candle_core::Device;
    use std::path::Path;

    #[test]
    fn every_block_row_keeps_the_same_number_of_blocks() {
        let arch = Arch::Lenet300100;
        let net = crate::Network::new(arch, &Device::Cpu, 3).unwrap();
        let params = net.params_to_host().unwrap();
        for (selection, dense) in [
            (BlockSelection::Random { seed: 5 }, false),
            (BlockSelection::Norm, true),
        ] {
            let opts = BlockSparsityOptions {
                block: (4, 8),
                compression: 4,
                selection,
                dense_first_last: dense,
            };
            let masks = block_masks(arch, &params, &[], &opts).unwrap();
            assert_eq!(masks.len(), if dense { 1 } else { 3 });
            for m in &masks {
                let (rows, cols) = matrix(&m.shape);
                let keep_blocks = cols.div_ceil(8).div_ceil(4);
                for r in 0..rows {
                    let kept = m.keep[r * cols..(r + 1) * cols]
                        .iter()
                        .filter(|&&k| k)
                        .count();
                    // Whole blocks, the same count per row (edge blocks narrower).
                    assert!(
                        kept <= keep_blocks * 8 && kept > (keep_blocks - 1) * 8,
                        "{}",
                        m.name
                    );
                }
            }
        }
        // Norm selection keeps the block of largest norm.
        let w = NamedTensor {
            name: "fc2.weight".into(),
            shape: vec![100, 300],
            values: (0..30_000)
                .map(|i| if i % 300 < 10 { 1.0 } else { 0.01 })
                .collect(),
        };
        let mut p = params.clone();
        *p.iter_mut().find(|t| t.name == "fc2.weight").unwrap() = w;
        let opts = BlockSparsityOptions {
            block: (100, 10),
            compression: 16,
            selection: BlockSelection::Norm,
            dense_first_last: true,
        };
        let m = &block_masks(arch, &p, &[], &opts).unwrap()[0];
        // Two blocks of 30 per row: the large one and, among equal scores, the
        // lower index.
        assert!(m.keep[..20].iter().all(|&k| k) && !m.keep[20]);
        assert_eq!(m.kept(), 100 * 20);
        assert!(BlockSparsityOptions {
            compression: 3,
            ..opts
        }
        .validate()
        .is_err());
    }

    #[test]
    fn masked_weights_stay_exactly_zero_through_training() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
        let (train_set, test_set) = load_mnist(&dir).unwrap();
        let (train_set, test_set) = (train_set.take(1000), test_set.take(200));
        let arch = Arch::Lenet300100;
        let mut config = TrainConfig::default_for(arch);
        (config.epochs, config.batch_size, config.progress) = (2, 50, false);
        let mut state = TrainState::new(arch, &Device::Cpu, &config).unwrap();
        let params = state.network.params_to_host().unwrap();
        let opts = BlockSparsityOptions {
            block: (4, 4),
            compression: 4,
            selection: BlockSelection::Random { seed: 1 },
            dense_first_last: false,
        };
        let masks = block_masks(arch, &params, &[], &opts).unwrap();
        let mut hook = BlockSparsityHook::new(masks, &mut state).unwrap();
        let report = train(&mut state, &train_set, &test_set, &config, &mut [&mut hook]).unwrap();
        assert!(
            report.epochs[1].train_loss < report.epochs[0].train_loss,
            "{report:?}"
        );
        for m in hook.masks() {
            let w: Vec<f32> = state
                .network
                .parameter(&m.name)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (v, k) in w.iter().zip(&m.keep) {
                if !k {
                    assert_eq!(v.to_bits(), 0, "{}", m.name);
                }
            }
            assert!(w.iter().zip(&m.keep).any(|(v, k)| *k && *v != 0.0));
            // ceil(blocks / 4) of every block row: 49/196 for fc1, 19/75 for
            // fc2, 7/25 for fc3.
            let (_, cols) = matrix(&m.shape);
            let blocks = cols.div_ceil(4);
            let share = m.kept() as f64 / m.keep.len() as f64;
            let expected = blocks.div_ceil(4) as f64 / blocks as f64;
            assert!((share - expected).abs() < 1e-9, "{}: {share}", m.name);
        }
    }
}
