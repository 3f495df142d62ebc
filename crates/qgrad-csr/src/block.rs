//! Layout 3, block-sparse rows (format version 4; FORMAT.md §7.7): a scaled
//! tensor's matrix view cut into `br × bc` blocks (edge blocks smaller), a
//! CSR over the grid of blocks, and every code of each kept block. It is
//! what structured (block) sparsity (METHOD §9) produces: one column index
//! per kept block instead of one per weight.
//!
//! The encoder does not need to be told the block shape: it tries every
//! power of two from 1 to [`MAX_TRIED_BLOCK`] on each axis (clipped to the
//! matrix) and keeps the shape with the shortest payload, the smaller block
//! area on a tie, then the fewer block rows.

use crate::format::bits_for;

/// Bits of each of the two block dimensions (stored minus one).
pub(crate) const BLOCK_DIM_BITS: u32 = 16;
/// Bits of the kept-block count.
pub(crate) const BLOCK_COUNT_BITS: u32 = 32;
/// The payload's fixed prefix: the block rows, columns and the count.
pub(crate) const BLOCK_PREFIX_BITS: u32 = 2 * BLOCK_DIM_BITS + BLOCK_COUNT_BITS;
/// The largest block side the encoder tries.
pub(crate) const MAX_TRIED_BLOCK: usize = 128;

/// The kept blocks of one tensor at one block shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BlockPlan {
    /// Block rows and columns.
    pub block: (usize, usize),
    /// `grid_rows + 1` offsets into `block_cols`.
    pub block_ptr: Vec<u64>,
    /// The block column of each kept block, ascending within a block row.
    pub block_cols: Vec<u64>,
    /// Elements inside the kept blocks (each stored as one code).
    pub kept_elements: u64,
}

impl BlockPlan {
    /// Payload bits of this plan without the scales: the prefix, the block
    /// row pointers, the block columns and `d` bits per kept element.
    pub fn bits(&self, grid_cols: u64, code_bits: u32) -> u128 {
        let nb = self.block_cols.len() as u64;
        u128::from(BLOCK_PREFIX_BITS)
            + self.block_ptr.len() as u128 * u128::from(bits_for(nb).max(1))
            + u128::from(nb) * u128::from(bits_for(grid_cols.saturating_sub(1)))
            + u128::from(self.kept_elements) * u128::from(code_bits)
    }
}

/// `ceil(n / b)` blocks along an axis of `n`.
pub(crate) fn grid(n: u64, b: u64) -> u64 {
    n.div_ceil(b)
}

/// The side of block `i` along an axis of `n` cut into blocks of `b`.
pub(crate) fn side(n: u64, b: u64, i: u64) -> u64 {
    b.min(n - i * b)
}

/// The blocks holding a non-zero code of the row-major `rows × cols` matrix
/// `codes`, at block shape `block`. `None` when `binary` and a kept block
/// holds a zero code (binary codes are ±1: only whole blocks can be zero).
pub(crate) fn plan(
    codes: &[i8],
    (rows, cols): (usize, usize),
    block: (usize, usize),
    binary: bool,
) -> Option<BlockPlan> {
    let (br, bc) = block;
    let gr = grid(rows as u64, br as u64) as usize;
    let gc = grid(cols as u64, bc as u64) as usize;
    let mut kept = vec![false; gr * gc];
    let mut nnz = 0u64;
    for r in 0..rows {
        let row = &codes[r * cols..(r + 1) * cols];
        let base = (r / br) * gc;
        for (c, _) in row.iter().enumerate().filter(|(_, &k)| k != 0) {
            kept[base + c / bc] = true;
            nnz += 1;
        }
    }
    let mut block_ptr = Vec::with_capacity(gr + 1);
    let mut block_cols = Vec::new();
    let mut kept_elements = 0u64;
    block_ptr.push(0);
    for i in 0..gr {
        let h = side(rows as u64, br as u64, i as u64);
        for j in 0..gc {
            if kept[i * gc + j] {
                block_cols.push(j as u64);
                kept_elements += h * side(cols as u64, bc as u64, j as u64);
            }
        }
        block_ptr.push(block_cols.len() as u64);
    }
    if binary && kept_elements != nnz {
        return None;
    }
    Some(BlockPlan {
        block,
        block_ptr,
        block_cols,
        kept_elements,
    })
}

/// The block shape with the shortest payload (see the module docs), or
/// `None` when no shape can hold the tensor (binary codes with zeros inside
/// every candidate's kept blocks) or the matrix is empty. `scale_bits` are
/// the payload's scales; a plan whose payload would have no more than `rows`
/// bits is skipped (FORMAT.md §7.7 bounds the rows by the payload).
pub(crate) fn best_plan(
    codes: &[i8],
    (rows, cols): (usize, usize),
    code_bits: u32,
    binary: bool,
    scale_bits: u128,
) -> Option<BlockPlan> {
    if rows == 0 || cols == 0 {
        return None;
    }
    let sides = |n: usize| {
        std::iter::successors(Some(1usize), |&b| Some(b * 2))
            .take_while(move |&b| b <= n.min(MAX_TRIED_BLOCK))
            .collect::<Vec<_>>()
    };
    let mut best: Option<(u128, usize, BlockPlan)> = None;
    for &br in &sides(rows) {
        for &bc in &sides(cols) {
            let Some(p) = plan(codes, (rows, cols), (br, bc), binary) else {
                continue;
            };
            let gc = grid(cols as u64, bc as u64);
            let bits = p.bits(gc, code_bits) + scale_bits;
            if bits <= rows as u128 {
                continue;
            }
            let key = (bits, br * bc);
            let better = match &best {
                None => true,
                Some((bits, area, _)) => key < (*bits, *area),
            };
            if better {
                best = Some((key.0, key.1, p));
            }
        }
    }
    best.map(|(_, _, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_counts_edge_blocks_at_their_size() {
        // 3 × 5, blocks 2 × 2: grid 2 × 3, edge blocks 1 high / 1 wide.
        #[rustfmt::skip]
        let codes: [i8; 15] = [
            0, 0, 1, 0, 0,
            0, 0, 0, 0, 0,
            0, 0, 0, 0, -1,
        ];
        let p = plan(&codes, (3, 5), (2, 2), false).unwrap();
        assert_eq!(p.block_ptr, vec![0, 1, 2]);
        assert_eq!(p.block_cols, vec![1, 2]);
        assert_eq!(p.kept_elements, 4 + 1);
        // Binary codes cannot have a zero inside a kept block.
        assert!(plan(&codes, (3, 5), (2, 2), true).is_none());
        assert!(plan(&codes, (3, 5), (1, 1), true).is_some());
    }

    #[test]
    fn the_best_shape_is_the_true_block_shape_of_a_block_sparse_matrix() {
        // 16 × 32 with 4 × 8 blocks, one in two kept in a checkerboard.
        let (rows, cols) = (16, 32);
        let codes: Vec<i8> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                if ((r / 4) + (c / 8)) % 2 == 0 {
                    if i % 3 == 0 {
                        -1
                    } else {
                        1
                    }
                } else {
                    0
                }
            })
            .collect();
        let p = best_plan(&codes, (rows, cols), 2, false, 32).unwrap();
        assert_eq!(p.block, (4, 8));
        assert_eq!(p.kept_elements, (rows * cols / 2) as u64);
        let p = best_plan(&codes, (rows, cols), 1, true, 32).unwrap();
        assert_eq!(p.block, (4, 8));
        assert!(best_plan(&[], (0, 0), 1, false, 32).is_none());
        // One non-zero in 1,000 rows: only plans of more than 1,000 bits.
        let mut sparse = vec![0i8; 1000];
        sparse[500] = 1;
        let p = best_plan(&sparse, (1000, 1), 1, true, 32).unwrap();
        assert!(p.bits(1, 1) + 32 > 1000, "{p:?}");
    }
}
