//! Exact optimal 1-D k-means by dynamic programming (Ckmeans.1d.dp).

use crate::{ClusterError, Result};

/// Layers with at least this many cells split their divide-and-conquer
/// recursion across rayon threads.
const PARALLEL_CELLS: usize = 1 << 14;

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
    let m = points.len();
    debug_assert!(m > 0 && k > 0 && weights.len() == m);
    let k = k.min(m);
    if u32::try_from(m).is_err() {
        return Err(ClusterError::TooLarge { distinct: m });
    }
    let cost = SegmentCost::new(points, weights);

    // Layer 0: one cluster covering points 0..=i.
    let mut prev: Vec<f64> = (0..m).map(|i| cost.sse(0, i)).collect();
    let mut cur = vec![0.0f64; m];
    // split[l][i]: first point of the last cluster in the best split of 0..=i
    // into l+1 clusters (layers 1..k-1; the last layer needs only i = m-1).
    let mut split: Vec<Vec<u32>> = Vec::with_capacity(k.saturating_sub(2));
    for layer in 1..k.saturating_sub(1) {
        let mut arg = vec![0u32; m];
        solve_layer(
            &cost,
            &prev,
            &mut cur[layer..],
            &mut arg[layer..],
            layer,
            layer,
            m - 1,
        );
        split.push(arg);
        std::mem::swap(&mut prev, &mut cur);
    }

    let mut starts = vec![0usize; k];
    if k > 1 {
        let last = k - 1;
        let (_, j) = best_split(&cost, &prev, m - 1, last, m - 1);
        starts[last] = j;
        for layer in (1..last).rev() {
            starts[layer] = split[layer - 1][starts[layer + 1] - 1] as usize;
        }
    }

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

/// Best first point `j` in `lo..=hi.min(i)` of the last cluster ending at `i`,
/// given the previous layer's costs. The leftmost minimum on ties.
#[inline]
fn best_split(cost: &SegmentCost, prev: &[f64], i: usize, lo: usize, hi: usize) -> (f64, usize) {
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

/// Fills `cur[t]`, `arg[t]` for point `first + t` by divide and conquer: the
/// optimal split is monotone in the end point, so the middle cell's optimum
/// bounds the search of both halves.
fn solve_layer(
    cost: &SegmentCost,
    prev: &[f64],
    cur: &mut [f64],
    arg: &mut [u32],
    first: usize,
    opt_lo: usize,
    opt_hi: usize,
) {
    if cur.is_empty() {
        return;
    }
    let mid = cur.len() / 2;
    let i = first + mid;
    let (best, j) = best_split(cost, prev, i, opt_lo, opt_hi);
    cur[mid] = best;
    // `m` fits in u32 (checked by the caller), so does `j < m`.
    arg[mid] = j as u32;
    let (cur_left, cur_right) = cur.split_at_mut(mid);
    let (arg_left, arg_right) = arg.split_at_mut(mid);
    let (cur_right, arg_right) = (&mut cur_right[1..], &mut arg_right[1..]);
    let mut left = move || solve_layer(cost, prev, cur_left, arg_left, first, opt_lo, j);
    let mut right = move || solve_layer(cost, prev, cur_right, arg_right, i + 1, j, opt_hi);
    if mid >= PARALLEL_CELLS {
        rayon::join(left, right);
    } else {
        left();
        right();
    }
}

/// Within-cluster sum of squares of any contiguous run of points in O(1)
/// from prefix sums of the weights and of the weighted (shifted) values.
struct SegmentCost {
    weight: Vec<f64>,
    sum: Vec<f64>,
    sum_sq: Vec<f64>,
}

impl SegmentCost {
    fn new(points: &[f64], weights: &[f64]) -> Self {
        // Shifting by the median keeps the sums small, which limits the
        // cancellation in `sum_sq - sum^2 / weight`.
        let shift = points[points.len() / 2];
        let n = points.len();
        let (mut weight, mut sum, mut sum_sq) = (
            Vec::with_capacity(n + 1),
            Vec::with_capacity(n + 1),
            Vec::with_capacity(n + 1),
        );
        let (mut w_acc, mut s_acc, mut q_acc) = (0.0f64, 0.0f64, 0.0f64);
        weight.push(0.0);
        sum.push(0.0);
        sum_sq.push(0.0);
        for (&x, &w) in points.iter().zip(weights) {
            let d = x - shift;
            w_acc += w;
            s_acc += w * d;
            q_acc += w * d * d;
            weight.push(w_acc);
            sum.push(s_acc);
            sum_sq.push(q_acc);
        }
        Self {
            weight,
            sum,
            sum_sq,
        }
    }

    /// SSE of points `j..=i` (`j <= i`).
    #[inline(always)]
    fn sse(&self, j: usize, i: usize) -> f64 {
        let w = self.weight[i + 1] - self.weight[j];
        let s = self.sum[i + 1] - self.sum[j];
        let q = self.sum_sq[i + 1] - self.sum_sq[j];
        (q - s * s / w).max(0.0)
    }
}
