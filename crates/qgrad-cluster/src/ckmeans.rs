//! Exact optimal 1-D k-means by dynamic programming (Ckmeans.1d.dp).

use rayon::prelude::*;

use crate::{buffer, ClusterError, Result};

/// Blocks of the divide and conquer with at least this stride split into
/// halves solved in parallel (rayon).
const PARALLEL_STRIDE: usize = 1 << 13;

/// Blocks of at most this stride (`2·SMALL_STRIDE` cells, their candidates
/// a few kilobytes) are solved in one loop instead of by recursion.
const SMALL_STRIDE: usize = 64;

/// An optimal clustering of sorted data into contiguous groups.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Index (in the sorted input) of each cluster's first element,
    /// ascending; `starts[0] == 0`. Cluster `c` is `starts[c]..starts[c+1]`
    /// (the last one runs to the end).
    pub starts: Vec<usize>,
    /// Mean of each cluster, ascending.
    pub centres: Vec<f64>,
    /// Total within-cluster sum of squared distances to the centres.
    pub withinss: f64,
}

/// Exact optimal 1-D k-means (minimum total within-cluster sum of squares)
/// of `sorted` into at most `k` clusters.
///
/// `sorted` must be finite and ascending. Equal values always land in the same
/// cluster, so with fewer than `k` distinct values there are that many
/// clusters (one per distinct value, `withinss` 0). An empty input gives an
/// empty clustering; `k == 0` with data is an error.
pub fn ckmeans_1d(sorted: &[f64], k: usize) -> Result<Clustering> {
    if let Some(index) = sorted.iter().position(|v| !v.is_finite()) {
        return Err(ClusterError::NonFinite {
            index,
            value: sorted[index],
        });
    }
    if let Some(index) = (1..sorted.len()).find(|&i| sorted[i] < sorted[i - 1]) {
        return Err(ClusterError::NotSorted { index });
    }
    if sorted.is_empty() {
        return Ok(Clustering {
            starts: Vec::new(),
            centres: Vec::new(),
            withinss: 0.0,
        });
    }
    if k == 0 {
        return Err(ClusterError::ZeroClusters(k));
    }
    let mut points = Vec::new();
    let mut weights = Vec::new();
    let mut run_starts = Vec::new();
    for (i, &x) in sorted.iter().enumerate() {
        if i > 0 && x == sorted[i - 1] {
            *weights.last_mut().expect("a run is open") += 1.0;
        } else {
            points.push(x);
            weights.push(1.0);
            run_starts.push(i);
        }
    }
    let weighted = ckmeans_weighted(&points, &weights, k)?;
    Ok(Clustering {
        starts: weighted.starts.iter().map(|&s| run_starts[s]).collect(),
        centres: weighted.centres,
        withinss: weighted.withinss,
    })
}

/// Optimal clustering of weighted points (`points` strictly ascending and
/// finite, `weights` positive, same length, at least one point, `k >= 1`).
/// `starts` index into `points`.
pub(crate) fn ckmeans_weighted(points: &[f64], weights: &[f64], k: usize) -> Result<Clustering> {
    ckmeans_weighted_with(points, weights, k, None)
}

/// [`ckmeans_weighted`] with the split search forced to `kernel` (tests; the
/// CPU must support it), or the fastest one this CPU has.
pub(crate) fn ckmeans_weighted_with(
    points: &[f64],
    weights: &[f64],
    k: usize,
    kernel: Option<Kernel>,
) -> Result<Clustering> {
    let m = points.len();
    debug_assert!(m > 0 && k > 0 && weights.len() == m);
    let k = k.min(m);
    if u32::try_from(m).is_err() {
        return Err(ClusterError::TooLarge { distinct: m });
    }
    let cost = SegmentCost::new(points, weights);
    let starts = optimal_starts(&cost, k, kernel);
    let mut centres = Vec::with_capacity(k);
    let mut withinss = 0.0;
    for c in 0..k {
        let end = if c + 1 < k { starts[c + 1] } else { m };
        let range = starts[c]..end;
        let w: f64 = weights[range.clone()].iter().sum();
        let mean = points[range.clone()]
            .iter()
            .zip(&weights[range.clone()])
            .map(|(x, w)| x * w)
            .sum::<f64>()
            / w;
        // Two-pass SSE: accurate whatever the prefix sums' rounding.
        withinss += points[range.clone()]
            .iter()
            .zip(&weights[range])
            .map(|(x, w)| w * (x - mean) * (x - mean))
            .sum::<f64>();
        centres.push(mean);
    }
    Ok(Clustering {
        starts,
        centres,
        withinss,
    })
}

/// Index of each cluster's first point in an optimal clustering of the
/// points behind `cost` into `k` clusters (`1 <= k <= cost.points()`), with
/// `kernel` or the fastest one this CPU has.
///
/// Layer `l` of the programme holds, for every end point `i`, the cost of
/// the best split of points `0..=i` into `l + 1` clusters and the first
/// point `J_l(i)` of its last cluster (the leftmost optimum). Two facts of
/// 1-D k-means (Wang & Song's Ckmeans.1d.dp uses both) bound where a layer
/// must be solved and where each cell searches:
///
/// * `J_l(i) >= J_{l-1}(i)`: with one more cluster the last one starts no
///   earlier. So `J_l(i) >= J_1(i)`, the best split into two, which costs
///   one scan of the closed-form first layer.
/// * `J_l(i) <= J_l(i + 1)`: the divide and conquer's bound.
///
/// The last layer is needed only at `m - 1`, so it reads layer `k - 2` only
/// from `J_1(m - 1) - 1` on; that layer's cells from there on read layer
/// `k - 3` only from `J_1` of its first cell, and so on down: each layer is
/// solved on a suffix, whose length the data decide (with heavy-tailed
/// importances the high clusters are small, and so are the suffixes of the
/// high layers). Within a layer each cell also starts its search at the
/// layer below's `J_{l-1}(i)`. Both bounds hold for the leftmost optimum in
/// exact arithmetic (checked against the full programme in exact rationals
/// while this was written, and against the full `O(k m²)` programme in the
/// tests below); a bound is clamped into the cell's range, so rounding can
/// never make a range empty.
pub(crate) fn optimal_starts(cost: &SegmentCost, k: usize, kernel: Option<Kernel>) -> Vec<usize> {
    let m = cost.points();
    debug_assert!(k >= 1 && k <= m && u32::try_from(m).is_ok());
    let kernel = kernel.unwrap_or_else(Kernel::detect);
    if k == 1 {
        return vec![0];
    }

    // Layer 0: one cluster covering points 0..=i (closed form, everywhere).
    let mut prev: Vec<f64> = buffer::zeroed(m);
    prev.par_iter_mut()
        .enumerate()
        .for_each(|(i, p)| *p = cost.sse(0, i));
    // `J_1(i)`, the lower bound of every layer's split at `i`: a scan of all
    // `i` candidates, in parallel slices whose leftmost minima reduce to the
    // whole scan's (the smallest value, then the smallest index; a slice
    // with no finite candidate gives +inf at its start, as the scan would).
    let two_way = |i: usize| -> usize {
        const SLICE: usize = 1 << 16;
        if i == 0 {
            return 0;
        }
        (0..i.div_ceil(SLICE))
            .into_par_iter()
            .map(|s| {
                let lo = 1 + s * SLICE;
                kernel.best_split(cost, &prev, i, lo, (lo + SLICE - 1).min(i))
            })
            .reduce(
                || (f64::INFINITY, usize::MAX),
                |a, b| {
                    if b.0 < a.0 || (b.0 == a.0 && b.1 < a.1) {
                        b
                    } else {
                        a
                    }
                },
            )
            .1
    };

    // From the top down, first[l]: the first cell of layer l that a later
    // layer reads (the last layer needs only m - 1), and bound[l]: J_1 at
    // that cell, where every search of layer l may start.
    let last = k - 1;
    let mut first = vec![0usize; k];
    let mut bound = vec![0usize; k];
    first[last] = m - 1;
    for layer in (1..=last).rev() {
        bound[layer] = two_way(first[layer]).max(layer);
        // Layer's candidates j >= bound[layer] read the layer below at j - 1.
        first[layer - 1] = bound[layer] - 1;
    }

    // split[l - 1][i]: J_l(i) for the cells of layers 1..k-1 that were
    // solved (the rest of each table stays zero and is never read).
    let mut cur: Vec<f64> = buffer::zeroed(m);
    let mut split: Vec<Vec<u32>> = Vec::with_capacity(last.saturating_sub(1));
    for layer in 1..last {
        let mut arg = buffer::zeroed(m);
        let lower = layer.checked_sub(2).map(|l| split[l].as_slice());
        let cells = Layer {
            cost,
            prev: &prev,
            layer,
            first: first[layer],
            lower,
        };
        solve_layer(kernel, &cells, &mut cur, &mut arg, bound[layer]);
        split.push(arg);
        std::mem::swap(&mut prev, &mut cur);
    }

    let mut starts = vec![0usize; k];
    let mut lo = bound[last];
    if let Some(below) = split.last() {
        lo = lo.max(below[m - 1] as usize);
    }
    let (_, j) = kernel.best_split(cost, &prev, m - 1, lo.min(m - 1), m - 1);
    starts[last] = j;
    for layer in (1..last).rev() {
        debug_assert!(starts[layer + 1] > first[layer], "read a cell never solved");
        starts[layer] = split[layer - 1][starts[layer + 1] - 1] as usize;
    }
    starts
}

/// How [`Kernel::best_split`] searches: the same arithmetic in every variant,
/// so that every CPU gets the same clustering, bit for bit.
///
/// Each candidate costs `prev[j-1] + max(q - s·s/w, 0)` with `w`, `s`, `q`
/// the differences of the prefix sums, computed by the same IEEE operations
/// in the same order (no fused multiply-add), so a lane of a vector computes
/// exactly the scalar value. Each lane keeps its own leftmost strict minimum;
/// the lanes are then reduced to the smallest value and, among equal values,
/// the smallest index: the scalar loop's leftmost minimum. The division is
/// what bounds the scalar loop (one `divsd` every few cycles), which is why
/// eight lanes of `vdivpd` pay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// One candidate at a time (any CPU).
    Scalar,
    /// Four candidates per step (x86 AVX2).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Eight candidates per step (x86 AVX-512F).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// The widest kernel this CPU runs.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
        }
        Kernel::Scalar
    }

    /// Every kernel this CPU runs (tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut all = vec![Kernel::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Kernel::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Kernel::Avx512);
            }
        }
        all
    }

    /// Best first point `j` in `lo..=hi.min(i)` of the last cluster ending at
    /// `i`, given the previous layer's costs (`1 <= lo <= hi.min(i)`,
    /// `i < prev.len()`). The leftmost minimum on ties.
    pub(crate) fn best_split(
        self,
        cost: &SegmentCost,
        prev: &[f64],
        i: usize,
        lo: usize,
        hi: usize,
    ) -> (f64, usize) {
        // What makes the unchecked loads of the vector kernels sound.
        assert!(
            lo >= 1 && lo <= hi.min(i) && i < prev.len() && i + 1 < cost.weight.len(),
            "split range {lo}..={hi} of point {i} out of bounds"
        );
        match self {
            Kernel::Scalar => best_split_scalar(cost, prev, i, lo, hi),
            // SAFETY: `Kernel::Avx2` is only built where the CPU has AVX2
            // (`detect`, `available`); the range was checked above.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::best_split_avx2(cost, prev, i, lo, hi) },
            // SAFETY: as above, for AVX-512F.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::best_split_avx512(cost, prev, i, lo, hi) },
        }
    }

    /// Solves a small [`Block`] (see [`fill_block_cells`]).
    fn fill_block(self, layer: &Layer, cur: &mut [f64], arg: &mut [u32], block: Block) {
        match self {
            Kernel::Scalar => fill_block_cells(layer, cur, arg, block, best_split_scalar),
            // SAFETY: as in `best_split`; `fill_block_cells` checks every
            // range.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::fill_block_avx2(layer, cur, arg, block) },
            // SAFETY: as above, for AVX-512F.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::fill_block_avx512(layer, cur, arg, block) },
        }
    }
}

/// The plain loop: the definition the vector kernels reproduce.
#[inline(always)]
fn best_split_scalar(
    cost: &SegmentCost,
    prev: &[f64],
    i: usize,
    lo: usize,
    hi: usize,
) -> (f64, usize) {
    let mut best = f64::INFINITY;
    let mut best_j = lo;
    for j in lo..=hi.min(i) {
        let v = prev[j - 1] + cost.sse(j, i);
        if v < best {
            best = v;
            best_j = j;
        }
    }
    (best, best_j)
}

/// What every cell of a layer shares.
///
/// The layer's cells are the end points `i = first + p - 1` for positions
/// `p = 1..=n` (`n = m - first`, `first >= layer`); its candidates are
/// `layer..=i`, from `lower[i]` on where the layer below's splits are given
/// (see [`optimal_starts`]).
struct Layer<'a> {
    cost: &'a SegmentCost,
    prev: &'a [f64],
    layer: usize,
    first: usize,
    lower: Option<&'a [u32]>,
}

impl Layer<'_> {
    /// The search range of cell `i` within the bounds `lo..=hi` of its
    /// neighbours: raised to the layer below's split, and kept non-empty
    /// (the bounds are exact facts, but the costs are rounded).
    #[inline(always)]
    fn range(&self, i: usize, lo: usize, hi: usize) -> (usize, usize) {
        let lo = match self.lower {
            Some(lower) => lo.max(lower[i] as usize),
            None => lo,
        };
        (lo.min(hi.min(i)), hi)
    }
}

/// The cells strictly between two solved positions `start` and
/// `start + 2·stride` (`stride` a power of two; `start` is 0 or a multiple
/// of `2·stride`), whose splits `lo` and `hi` bound every cell's search: the
/// optimal split is monotone in the end point. (`lo` is `layer` at the
/// first position, `hi` is `m - 1` past the last.) Its middle cell is at
/// `start + stride`, and the halves are blocks of half the stride.
#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    stride: usize,
    lo: usize,
    hi: usize,
}

/// Solves a block of at most `2·SMALL_STRIDE` cells (`cur`, `arg` hold its
/// positions `start + 1..`) level by level: at stride `t` the cells at odd
/// multiples of `t`, bounded by their neighbours at `p ± t`, solved by the
/// level before or the block's own bounds. The same cells with the same
/// bounds as the recursion, without its calls.
#[inline(always)]
fn fill_block_cells(
    layer: &Layer,
    cur: &mut [f64],
    arg: &mut [u32],
    block: Block,
    best_split: impl Fn(&SegmentCost, &[f64], usize, usize, usize) -> (f64, usize),
) {
    let len = cur.len();
    let mut t = block.stride;
    loop {
        let mut q = t - 1;
        while q < len {
            // Local index q is position start + q + 1, between the solved
            // positions at local indices q - t and q + t.
            let lo = if q < t { block.lo } else { arg[q - t] as usize };
            // (`len < 2·stride`: the block's end is never a local index.)
            let hi = if q + t < len {
                arg[q + t] as usize
            } else {
                block.hi
            };
            let i = layer.first + block.start + q;
            let (lo, hi) = layer.range(i, lo, hi);
            // What makes the unchecked loads of the vector kernels sound.
            assert!(
                lo >= 1
                    && lo <= hi.min(i)
                    && i < layer.prev.len()
                    && i + 1 < layer.cost.weight.len(),
                "split range {lo}..={hi} of point {i} out of bounds"
            );
            let (v, j) = best_split(layer.cost, layer.prev, i, lo, hi);
            cur[q] = v;
            // `m` fits in u32 (checked by the caller), so does `j < m`.
            arg[q] = j as u32;
            q += 2 * t;
        }
        if t == 1 {
            break;
        }
        t /= 2;
    }
}

/// Fills `cur[i]`, `arg[i]` for the layer's cells `i` in `first..m` (the
/// rest is untouched), every search starting at `lo` or later
/// (`layer <= lo <= first`).
fn solve_layer(kernel: Kernel, layer: &Layer, cur: &mut [f64], arg: &mut [u32], lo: usize) {
    let m = layer.prev.len();
    let first = layer.first;
    if first >= m {
        return;
    }
    let n = m - first;
    let top = 1usize << (usize::BITS - 1 - n.leading_zeros());
    solve_block(
        kernel,
        layer,
        &mut cur[first..],
        &mut arg[first..],
        Block {
            start: 0,
            stride: top,
            lo: lo.clamp(layer.layer, first),
            hi: m - 1,
        },
    );
}

/// Divide and conquer over a [`Block`]: the middle cell, then both halves
/// (in parallel while they are large), down to blocks of
/// [`SMALL_STRIDE`], which [`Kernel::fill_block`] solves level by level in
/// one loop. The order is depth first, so once a block's candidates fit in
/// the cache all its deeper levels run from there.
fn solve_block(kernel: Kernel, layer: &Layer, cur: &mut [f64], arg: &mut [u32], block: Block) {
    if cur.is_empty() {
        return;
    }
    let s = block.stride;
    if s <= SMALL_STRIDE {
        kernel.fill_block(layer, cur, arg, block);
        return;
    }
    let mid = s - 1;
    if mid >= cur.len() {
        // Past the last point: only the left half has cells.
        return solve_block(
            kernel,
            layer,
            cur,
            arg,
            Block {
                stride: s / 2,
                ..block
            },
        );
    }
    let i = layer.first + block.start + mid;
    let (lo, hi) = layer.range(i, block.lo, block.hi);
    let (v, j) = kernel.best_split(layer.cost, layer.prev, i, lo, hi);
    cur[mid] = v;
    // `m` fits in u32 (checked by the caller), so does `j < m`.
    arg[mid] = j as u32;
    let (cur_left, cur_right) = cur.split_at_mut(mid);
    let (arg_left, arg_right) = arg.split_at_mut(mid);
    let (cur_right, arg_right) = (&mut cur_right[1..], &mut arg_right[1..]);
    let left = Block {
        stride: s / 2,
        hi: j,
        ..block
    };
    let right = Block {
        start: block.start + s,
        stride: s / 2,
        lo: j,
        hi: block.hi,
    };
    let mut left = move || solve_block(kernel, layer, cur_left, arg_left, left);
    let mut right = move || solve_block(kernel, layer, cur_right, arg_right, right);
    if s >= PARALLEL_STRIDE {
        rayon::join(left, right);
    } else {
        left();
        right();
    }
}

/// The vector kernels (see [`Kernel`]).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{fill_block_cells, Block, Layer, SegmentCost};

    /// [`super::best_split_scalar`], eight candidates per step.
    ///
    /// # Safety
    /// The CPU must support AVX-512F, and `1 <= lo <= hi.min(i)`,
    /// `i < prev.len()`, `i + 1 < cost.weight.len()`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(super) unsafe fn best_split_avx512(
        cost: &SegmentCost,
        prev: &[f64],
        i: usize,
        lo: usize,
        hi: usize,
    ) -> (f64, usize) {
        let len = hi.min(i) + 1 - lo;
        // SAFETY (all loads): candidate `lo + t` for `t < len` reads
        // `weight`, `sum`, `sum_sq` at `lo + t <= i < len` and `prev` at
        // `lo - 1 + t < i`; the masked tail reads only lanes with `t < len`.
        let (wp, sp, qp) = (
            cost.weight.as_ptr().add(lo),
            cost.sum.as_ptr().add(lo),
            cost.sum_sq.as_ptr().add(lo),
        );
        let pp = prev.as_ptr().add(lo - 1);
        let wi = _mm512_set1_pd(cost.weight[i + 1]);
        let si = _mm512_set1_pd(cost.sum[i + 1]);
        let qi = _mm512_set1_pd(cost.sum_sq[i + 1]);
        let zero = _mm512_setzero_pd();
        let lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
        let mut best = _mm512_set1_pd(f64::INFINITY);
        let mut best_t = _mm512_setzero_si512();
        let value = |w: __m512d, s: __m512d, q: __m512d, p: __m512d| {
            let w = _mm512_sub_pd(wi, w);
            let s = _mm512_sub_pd(si, s);
            let q = _mm512_sub_pd(qi, q);
            let t = _mm512_max_pd(
                _mm512_sub_pd(q, _mm512_div_pd(_mm512_mul_pd(s, s), w)),
                zero,
            );
            _mm512_add_pd(p, t)
        };
        let mut t = 0usize;
        while t + 8 <= len {
            let v = value(
                _mm512_loadu_pd(wp.add(t)),
                _mm512_loadu_pd(sp.add(t)),
                _mm512_loadu_pd(qp.add(t)),
                _mm512_loadu_pd(pp.add(t)),
            );
            let lt = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(v, best);
            best = _mm512_mask_blend_pd(lt, best, v);
            best_t = _mm512_mask_blend_epi64(
                lt,
                best_t,
                _mm512_add_epi64(lane, _mm512_set1_epi64(t as i64)),
            );
            t += 8;
        }
        if t < len {
            let mask: __mmask8 = (1u8 << (len - t)) - 1;
            let v = value(
                _mm512_maskz_loadu_pd(mask, wp.add(t)),
                _mm512_maskz_loadu_pd(mask, sp.add(t)),
                _mm512_maskz_loadu_pd(mask, qp.add(t)),
                _mm512_maskz_loadu_pd(mask, pp.add(t)),
            );
            let lt = _mm512_mask_cmp_pd_mask::<_CMP_LT_OQ>(mask, v, best);
            best = _mm512_mask_blend_pd(lt, best, v);
            best_t = _mm512_mask_blend_epi64(
                lt,
                best_t,
                _mm512_add_epi64(lane, _mm512_set1_epi64(t as i64)),
            );
        }
        // The lanes' leftmost minima to the overall one: the smallest value,
        // then the smallest offset among the lanes that hold it. (Lanes
        // never updated hold +inf at offset 0, as the scalar loop's start.)
        let min = _mm512_reduce_min_pd(best);
        let holders = _mm512_cmp_pd_mask::<_CMP_EQ_OQ>(best, _mm512_set1_pd(min));
        if holders == 0 {
            // Every candidate was NaN: the scalar loop keeps its start.
            return (f64::INFINITY, lo);
        }
        let t = _mm512_mask_reduce_min_epi64(holders, best_t);
        (min, lo + t as usize)
    }

    /// [`super::best_split_scalar`], four candidates per step.
    ///
    /// # Safety
    /// The CPU must support AVX2, and the range as for
    /// [`best_split_avx512`].
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn best_split_avx2(
        cost: &SegmentCost,
        prev: &[f64],
        i: usize,
        lo: usize,
        hi: usize,
    ) -> (f64, usize) {
        let len = hi.min(i) + 1 - lo;
        // SAFETY: as in `best_split_avx512`; masked loads read no lane past
        // `len`.
        let (wp, sp, qp) = (
            cost.weight.as_ptr().add(lo),
            cost.sum.as_ptr().add(lo),
            cost.sum_sq.as_ptr().add(lo),
        );
        let pp = prev.as_ptr().add(lo - 1);
        let wi = _mm256_set1_pd(cost.weight[i + 1]);
        let si = _mm256_set1_pd(cost.sum[i + 1]);
        let qi = _mm256_set1_pd(cost.sum_sq[i + 1]);
        let zero = _mm256_setzero_pd();
        // Offsets as f64 lanes: exact below 2^53, and blended like the values.
        let lane = _mm256_set_pd(3.0, 2.0, 1.0, 0.0);
        let mut best = _mm256_set1_pd(f64::INFINITY);
        let mut best_t = _mm256_setzero_pd();
        let value = |w: __m256d, s: __m256d, q: __m256d, p: __m256d| {
            let w = _mm256_sub_pd(wi, w);
            let s = _mm256_sub_pd(si, s);
            let q = _mm256_sub_pd(qi, q);
            let t = _mm256_max_pd(
                _mm256_sub_pd(q, _mm256_div_pd(_mm256_mul_pd(s, s), w)),
                zero,
            );
            _mm256_add_pd(p, t)
        };
        let mut t = 0usize;
        while t + 4 <= len {
            let v = value(
                _mm256_loadu_pd(wp.add(t)),
                _mm256_loadu_pd(sp.add(t)),
                _mm256_loadu_pd(qp.add(t)),
                _mm256_loadu_pd(pp.add(t)),
            );
            let lt = _mm256_cmp_pd::<_CMP_LT_OQ>(v, best);
            best = _mm256_blendv_pd(best, v, lt);
            best_t = _mm256_blendv_pd(best_t, _mm256_add_pd(lane, _mm256_set1_pd(t as f64)), lt);
            t += 4;
        }
        if t < len {
            // `rest` is 1..=3: lane 3 is never in the tail.
            let rest = (len - t) as i64;
            let mask = _mm256_set_epi64x(0, -i64::from(rest > 2), -i64::from(rest > 1), -1);
            let v = value(
                _mm256_maskload_pd(wp.add(t), mask),
                _mm256_maskload_pd(sp.add(t), mask),
                _mm256_maskload_pd(qp.add(t), mask),
                _mm256_maskload_pd(pp.add(t), mask),
            );
            let lt = _mm256_and_pd(
                _mm256_cmp_pd::<_CMP_LT_OQ>(v, best),
                _mm256_castsi256_pd(mask),
            );
            best = _mm256_blendv_pd(best, v, lt);
            best_t = _mm256_blendv_pd(best_t, _mm256_add_pd(lane, _mm256_set1_pd(t as f64)), lt);
        }
        let mut values = [0f64; 4];
        let mut offsets = [0f64; 4];
        _mm256_storeu_pd(values.as_mut_ptr(), best);
        _mm256_storeu_pd(offsets.as_mut_ptr(), best_t);
        reduce(&values, &offsets.map(|o| o as u64), lo)
    }

    /// The lanes' leftmost minima to the overall leftmost minimum: the
    /// smallest value, then the smallest offset among equal values.
    #[inline(always)]
    fn reduce(values: &[f64], offsets: &[u64], lo: usize) -> (f64, usize) {
        let mut best = f64::INFINITY;
        let mut best_t = 0u64;
        for (&v, &t) in values.iter().zip(offsets) {
            if v < best || (v == best && t < best_t) {
                best = v;
                best_t = t;
            }
        }
        (best, lo + best_t as usize)
    }

    /// [`super::Kernel::fill_block`] for AVX-512F.
    ///
    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_block_avx512(
        layer: &Layer,
        cur: &mut [f64],
        arg: &mut [u32],
        block: Block,
    ) {
        // SAFETY: the CPU has AVX-512F (the caller's promise);
        // `fill_block_cells` checked the range.
        fill_block_cells(layer, cur, arg, block, |c, p, i, lo, hi| unsafe {
            best_split_avx512(c, p, i, lo, hi)
        });
    }

    /// [`super::Kernel::fill_block`] for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fill_block_avx2(
        layer: &Layer,
        cur: &mut [f64],
        arg: &mut [u32],
        block: Block,
    ) {
        // SAFETY: as above, for AVX2.
        fill_block_cells(layer, cur, arg, block, |c, p, i, lo, hi| unsafe {
            best_split_avx2(c, p, i, lo, hi)
        });
    }
}

/// Within-cluster sum of squares of any contiguous run of points in O(1)
/// from prefix sums of the weights and of the weighted (shifted) values.
pub(crate) struct SegmentCost {
    weight: Vec<f64>,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl SegmentCost {
    fn new(points: &[f64], weights: &[f64]) -> Self {
        // Shifting by the median keeps the sums small, which limits the
        // cancellation in `sum_sq - sum^2 / weight`.
        let shift = points[points.len() / 2];
        Self::from_runs(points.len(), shift, std::iter::once((points, weights)))
    }

    /// Prefix sums of `m` weighted points shifted by `shift` (the median
    /// point: see [`Self::new`]), the points given as consecutive runs of
    /// `(values, weights)` slices of equal lengths.
    ///
    /// One sequential pass: the sums' rounding is that of adding the points
    /// in order, whatever the runs (a parallel scan would round differently
    /// and could move a clustering). The loop writes into sized buffers
    /// without a capacity check per point, three independent additions per
    /// step.
    pub(crate) fn from_runs<'a>(
        m: usize,
        shift: f64,
        runs: impl Iterator<Item = (&'a [f64], &'a [f64])>,
    ) -> Self {
        let (mut weight, mut sum, mut sum_sq): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            buffer::zeroed(m + 1),
            buffer::zeroed(m + 1),
            buffer::zeroed(m + 1),
        );
        let (mut w_acc, mut s_acc, mut q_acc) = (0.0f64, 0.0f64, 0.0f64);
        let mut end = 1;
        for (points, weights) in runs {
            assert_eq!(points.len(), weights.len(), "a run's lengths");
            let next = end + points.len();
            assert!(next <= m + 1, "more than {m} points");
            for (((x, w), (wo, so)), qo) in points
                .iter()
                .zip(weights)
                .zip(weight[end..next].iter_mut().zip(&mut sum[end..next]))
                .zip(&mut sum_sq[end..next])
            {
                let d = x - shift;
                w_acc += w;
                s_acc += w * d;
                q_acc += w * d * d;
                *wo = w_acc;
                *so = s_acc;
                *qo = q_acc;
            }
            end = next;
        }
        assert_eq!(end, m + 1, "point count");
        Self {
            weight,
            sum,
            sum_sq,
        }
    }

    /// Number of points.
    pub(crate) fn points(&self) -> usize {
        self.weight.len() - 1
    }

    /// SSE of points `j..=i` (`j <= i`).
    #[inline(always)]
    fn sse(&self, j: usize, i: usize) -> f64 {
        let w = self.weight[i + 1] - self.weight[j];
        let s = self.sum[i + 1] - self.sum[j];
        let q = self.sum_sq[i + 1] - self.sum_sq[j];
        // max(t, 0) spelled as the vector kernels' `maxpd t, 0` computes it:
        // 0 for NaN and for either zero, so no kernel ever yields -0.
        let t = q - s * s / w;
        if t > 0.0 {
            t
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// Random `(i, lo, hi)` with ranges of every length from 1 to `m - 1`,
    /// short ones (the vector kernels' masked tails) most often.
    fn ranges(rng: &mut ChaCha8Rng, m: usize, count: usize) -> Vec<(usize, usize, usize)> {
        (0..count)
            .map(|_| {
                let i = rng.random_range(1..m);
                let len = if rng.random_bool(0.5) {
                    rng.random_range(1..=i.min(20))
                } else {
                    rng.random_range(1..=i)
                };
                let lo = rng.random_range(1..=i + 1 - len);
                // `hi` past `i` is clipped to `i`.
                let hi = lo + len - 1 + if rng.random_bool(0.2) { m } else { 0 };
                (i, lo, hi)
            })
            .collect()
    }

    fn assert_kernels_agree(cost: &SegmentCost, prev: &[f64], queries: &[(usize, usize, usize)]) {
        for &(i, lo, hi) in queries {
            let (v, j) = Kernel::Scalar.best_split(cost, prev, i, lo, hi);
            for kernel in Kernel::available() {
                let (kv, kj) = kernel.best_split(cost, prev, i, lo, hi);
                assert_eq!(
                    (kv.to_bits(), kj),
                    (v.to_bits(), j),
                    "{kernel:?} at i={i}, {lo}..={hi}"
                );
            }
        }
    }

    /// `values` sorted and deduplicated, each with a random integer weight
    /// in `1..max_weight`.
    fn weighted_points(
        rng: &mut ChaCha8Rng,
        mut values: Vec<f64>,
        max_weight: u8,
    ) -> (Vec<f64>, Vec<f64>) {
        values.sort_by(f64::total_cmp);
        values.dedup();
        let weights = (0..values.len())
            .map(|_| f64::from(rng.random_range(1..max_weight)))
            .collect();
        (values, weights)
    }

    #[test]
    fn vector_kernels_equal_the_scalar_loop_bit_for_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let m = 300;
        let values = (0..m).map(|_| rng.random::<f64>().powi(3) * 10.0).collect();
        let (points, weights) = weighted_points(&mut rng, values, 4);
        let cost = SegmentCost::new(&points, &weights);
        let prev: Vec<f64> = (0..points.len())
            .map(|_| rng.random::<f64>() * 5.0)
            .collect();
        assert_kernels_agree(&cost, &prev, &ranges(&mut rng, points.len(), 5000));
    }

    #[test]
    fn vector_kernels_break_ties_leftmost() {
        // Zero sums make every segment's SSE max(0 - 0/w, 0) = 0, so a
        // candidate costs `prev[j-1]`: small integers tie in every lane.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let m = 200;
        let cost = SegmentCost {
            weight: (0..=m).map(|i| i as f64).collect(),
            sum: vec![0.0; m + 1],
            sum_sq: vec![0.0; m + 1],
        };
        let prev: Vec<f64> = (0..m)
            .map(|_| f64::from(rng.random_range(0u8..3)))
            .collect();
        let queries = ranges(&mut rng, m, 5000);
        assert!(queries.iter().any(|&(i, lo, hi)| {
            let hi = hi.min(i);
            prev[lo - 1..hi].iter().filter(|&&p| p == 0.0).count() > 1
        }));
        assert_kernels_agree(&cost, &prev, &queries);
    }

    #[test]
    fn every_kernel_gives_the_same_clustering() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let values = (0..20_000)
            .map(|_| (rng.random::<f64>() * 8.0).exp())
            .collect();
        let (points, weights) = weighted_points(&mut rng, values, 5);
        for k in [2, 3, 5, 9] {
            let reference =
                ckmeans_weighted_with(&points, &weights, k, Some(Kernel::Scalar)).unwrap();
            for kernel in Kernel::available() {
                let c = ckmeans_weighted_with(&points, &weights, k, Some(kernel)).unwrap();
                assert_eq!(c.starts, reference.starts, "{kernel:?}, k = {k}");
                assert_eq!(c.withinss.to_bits(), reference.withinss.to_bits());
            }
        }
    }

    #[test]
    fn levels_equal_the_full_dynamic_programme() {
        // The O(k m^2) programme over the same candidate costs: the levels'
        // bounds must never cut the optimum off.
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        // 1500 points: blocks above SMALL_STRIDE recurse before the loop.
        for m in [1usize, 2, 3, 7, 64, 257, 1500] {
            let mut points: Vec<f64> = (0..m).map(|_| rng.random::<f64>() * 100.0).collect();
            points.sort_by(f64::total_cmp);
            points.dedup();
            let m = points.len();
            let weights = vec![1.0; m];
            let cost = SegmentCost::new(&points, &weights);
            let mut prev: Vec<f64> = (0..m).map(|i| cost.sse(0, i)).collect();
            for layer in 1..m.min(5) {
                let (mut cur, mut arg) = (vec![0.0; m], vec![0u32; m]);
                let cells = Layer {
                    cost: &cost,
                    prev: &prev,
                    layer,
                    first: layer,
                    lower: None,
                };
                solve_layer(Kernel::detect(), &cells, &mut cur, &mut arg, layer);
                for (i, &got) in cur.iter().enumerate().skip(layer) {
                    let (v, _) = best_split_scalar(&cost, &prev, i, layer, i);
                    assert!(
                        (got - v).abs() <= 1e-9 * v.abs().max(1.0),
                        "m={m} layer={layer} i={i}: {got} against {v}"
                    );
                }
                prev = cur;
            }
        }
    }

    /// The plain `O(k m²)` programme over every cell with leftmost optima,
    /// backtracked: what [`optimal_starts`] must return.
    fn full_programme_starts(cost: &SegmentCost, k: usize) -> Vec<usize> {
        let m = cost.points();
        let mut prev: Vec<f64> = (0..m).map(|i| cost.sse(0, i)).collect();
        let mut split = Vec::new();
        for layer in 1..k {
            let mut cur = vec![f64::INFINITY; m];
            let mut arg = vec![0usize; m];
            for i in layer..m {
                (cur[i], arg[i]) = best_split_scalar(cost, &prev, i, layer, i);
            }
            split.push(arg);
            prev = cur;
        }
        let mut starts = vec![0usize; k];
        if k > 1 {
            starts[k - 1] = split[k - 2][m - 1];
            for layer in (1..k - 1).rev() {
                starts[layer] = split[layer - 1][starts[layer + 1] - 1];
            }
        }
        starts
    }

    #[test]
    fn bounded_suffixes_equal_the_full_programme() {
        // Small integers with weights tie often (equal costs, where the
        // leftmost optimum matters); reals and heavy tails (small high
        // clusters, so short suffixes) do not.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut cases = 0;
        for trial in 0..240 {
            let n = [5usize, 40, 300, 1500][trial % 4];
            let values = (0..n)
                .map(|_| match trial % 3 {
                    0 => f64::from(rng.random_range(0u32..60)),
                    1 => rng.random::<f64>() * 100.0,
                    _ => (rng.random::<f64>() * 12.0).exp(),
                })
                .collect();
            let (points, weights) = weighted_points(&mut rng, values, 4);
            let cost = SegmentCost::new(&points, &weights);
            for k in 1..=points.len().min(9) {
                let want = full_programme_starts(&cost, k);
                for kernel in Kernel::available() {
                    let got = optimal_starts(&cost, k, Some(kernel));
                    assert_eq!(got, want, "trial {trial}, m = {}, k = {k}", points.len());
                }
                cases += 1;
            }
        }
        assert!(cases > 1000);
    }
}
