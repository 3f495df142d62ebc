//! Cluster methods and the assignment of bit widths by importance.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::ckmeans::{optimal_starts, SegmentCost};
use crate::sort::{par_sort_f32, to_key};
use crate::{ClusterError, Result};

/// `eps = LOG_EPS_RELATIVE · max(A)` in [`ClusterMethod::LogKMeans`]'s
/// `ln(A + eps)`: small enough not to disturb any realistic importance,
/// relative so that the method is scale-invariant.
pub const LOG_EPS_RELATIVE: f64 = 1e-12;

/// Tolerance on the sum of quantile fractions.
const FRACTION_SUM_TOLERANCE: f64 = 1e-6;

/// How importances are split into groups (METHOD.md §3 step 2).
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterMethod {
    /// Exact optimal k-means on the importances `A`.
    KMeans,
    /// Exact optimal k-means on `ln(A + eps)` (see [`LOG_EPS_RELATIVE`]);
    /// needs `A >= 0`.
    LogKMeans,
    /// Fixed shares: `fractions[k]` of the elements get `widths[k]` (aligned
    /// with the widths, highest width first); each `>= 0`, summing to 1.
    Quantiles {
        /// Share of the elements per width, highest width first.
        fractions: Vec<f64>,
    },
}

impl ClusterMethod {
    /// Checks the method's own parameters against `k` widths.
    fn validate(&self, k: usize) -> Result<()> {
        if let ClusterMethod::Quantiles { fractions } = self {
            validate_fractions(fractions)?;
            if fractions.len() != k {
                return Err(ClusterError::BadFractions {
                    fractions: fractions.clone(),
                    reason: format!(
                        "{} fractions for {k} bit widths; need one per width",
                        fractions.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn validate_fractions(fractions: &[f64]) -> Result<()> {
    let bad = |reason: String| ClusterError::BadFractions {
        fractions: fractions.to_vec(),
        reason,
    };
    if fractions.is_empty() {
        return Err(bad("no fractions given".into()));
    }
    if let Some(f) = fractions.iter().find(|f| !f.is_finite() || **f < 0.0) {
        return Err(bad(format!("{f} is not a finite non-negative share")));
    }
    let sum: f64 = fractions.iter().sum();
    if (sum - 1.0).abs() > FRACTION_SUM_TOLERANCE {
        return Err(bad(format!("they sum to {sum}, not 1")));
    }
    Ok(())
}

impl FromStr for ClusterMethod {
    type Err = ClusterError;

    /// `kmeans`, `log-kmeans`, or `quantiles:f1,f2,...` (case-insensitive).
    fn from_str(input: &str) -> Result<Self> {
        let parse_err = |reason: &str| ClusterError::Parse {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let lower = input.trim().to_ascii_lowercase();
        match lower.as_str() {
            "kmeans" | "k-means" => return Ok(ClusterMethod::KMeans),
            "log-kmeans" | "logkmeans" | "log-k-means" => return Ok(ClusterMethod::LogKMeans),
            _ => {}
        }
        let Some(list) = lower.strip_prefix("quantiles:") else {
            return Err(parse_err(
                "expected `kmeans`, `log-kmeans` or `quantiles:f1,f2,...`",
            ));
        };
        let fractions = list
            .split(',')
            .map(|s| s.trim().parse::<f64>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| parse_err(&format!("a fraction is not a number: {e}")))?;
        validate_fractions(&fractions)?;
        Ok(ClusterMethod::Quantiles { fractions })
    }
}

impl fmt::Display for ClusterMethod {
    /// The form [`FromStr`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterMethod::KMeans => write!(f, "kmeans"),
            ClusterMethod::LogKMeans => write!(f, "log-kmeans"),
            ClusterMethod::Quantiles { fractions } => {
                write!(f, "quantiles:")?;
                for (i, x) in fractions.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    write!(f, "{x}")?;
                }
                Ok(())
            }
        }
    }
}

/// One bit width per element of `importance` (METHOD.md §3 steps 1–3).
///
/// `widths` must be strictly decreasing (`b_1 > b_2 > …`). The importances
/// are sorted and split into `widths.len()` groups by `method`; groups are
/// ordered by importance, highest first, and group `k` gets `widths[k]`.
/// Equal importances always get equal widths. See the crate docs for fewer
/// distinct values than widths, constant input and the log transform.
/// NaN/infinite importance, bad widths or bad fractions are errors; an empty
/// input gives an empty output.
pub fn assign_widths(importance: &[f32], widths: &[u8], method: &ClusterMethod) -> Result<Vec<u8>> {
    if widths.is_empty() || widths.windows(2).any(|w| w[0] <= w[1]) {
        return Err(ClusterError::BadWidths(widths.to_vec()));
    }
    method.validate(widths.len())?;
    if let Some(index) = first_index_where(importance, |v| !v.is_finite()) {
        return Err(ClusterError::NonFinite {
            index,
            value: f64::from(importance[index]),
        });
    }
    if *method == ClusterMethod::LogKMeans {
        if let Some(index) = first_index_where(importance, |v| v < 0.0) {
            return Err(ClusterError::NegativeImportance {
                index,
                value: f64::from(importance[index]),
            });
        }
    }
    if importance.is_empty() {
        return Ok(Vec::new());
    }

    let (min, max) = importance
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                })
        })
        .reduce(
            || (f32::INFINITY, f32::NEG_INFINITY),
            |a, b| (a.0.min(b.0), a.1.max(b.1)),
        );
    if min == max {
        // Constant importance: nothing distinguishes the parameters.
        return Ok(vec![widths[0]; importance.len()]);
    }
    // (lowest importance of the group, its width), ascending by importance.
    let groups = match method {
        // Quantiles need only K-1 order statistics: select them instead of
        // sorting everything.
        ClusterMethod::Quantiles { fractions } if importance.len() >= SELECT_THRESHOLD => {
            quantile_groups_select(importance, widths, fractions)
        }
        _ => {
            let mut sorted: Vec<f32> = crate::buffer::zeroed(importance.len());
            sorted
                .par_chunks_mut(CHUNK)
                .zip(importance.par_chunks(CHUNK))
                .for_each(|(s, i)| s.copy_from_slice(i));
            par_sort_f32(&mut sorted);
            match method {
                ClusterMethod::KMeans => kmeans_groups(&sorted, widths, f64::from),
                ClusterMethod::LogKMeans => kmeans_groups(&sorted, widths, log_transform(&sorted)),
                ClusterMethod::Quantiles { fractions } => {
                    quantile_groups(&sorted, widths, fractions)
                }
            }?
        }
    };

    Ok(lookup_widths(importance, &groups))
}

/// Elements per parallel task in the element-wise passes.
const CHUNK: usize = 1 << 16;
/// From this many elements on, quantile splits select order statistics
/// instead of sorting.
const SELECT_THRESHOLD: usize = 1 << 16;
/// Bits of the radix-select histogram (the top bits of the order key).
const SELECT_BITS: u32 = 16;

/// Index of the first value that is `bad` (a vectorisable check over
/// parallel chunks first, the position only when something is there).
fn first_index_where(values: &[f32], bad: impl Fn(f32) -> bool + Sync) -> Option<usize> {
    let any_bad = values
        .par_chunks(CHUNK)
        .any(|c| c.iter().fold(false, |found, &v| found | bad(v)));
    if any_bad {
        values.iter().position(|&v| bad(v))
    } else {
        None
    }
}

/// Width of every element from the groups' lower bounds: the number of
/// group lower bounds (above the lowest group's) that an element reaches
/// indexes the width, which compiles to branch-free compares.
fn lookup_widths(importance: &[f32], groups: &[(f32, u8)]) -> Vec<u8> {
    let lowers: Vec<f32> = groups.iter().skip(1).map(|g| g.0).collect();
    let widths: Vec<u8> = groups.iter().map(|g| g.1).collect();
    let mut out = vec![0u8; importance.len()];
    out.par_chunks_mut(CHUNK)
        .zip(importance.par_chunks(CHUNK))
        .for_each(|(out, importance)| {
            for (o, &a) in out.iter_mut().zip(importance) {
                let reached = lowers.iter().map(|&l| usize::from(a >= l)).sum::<usize>();
                *o = widths[reached];
            }
        });
    out
}

/// The transform of [`ClusterMethod::LogKMeans`] for sorted, non-negative `A`.
fn log_transform(sorted: &[f32]) -> impl Fn(f32) -> f64 {
    let max = f64::from(*sorted.last().expect("non-empty"));
    let eps = LOG_EPS_RELATIVE * max;
    move |a| (f64::from(a) + eps).ln()
}

/// Groups from exact k-means on `transform` of the sorted values (a
/// non-decreasing map, so the order and the contiguity of groups hold).
fn kmeans_groups(
    sorted: &[f32],
    widths: &[u8],
    transform: impl Fn(f32) -> f64 + Sync,
) -> Result<Vec<(f32, u8)>> {
    let points = MergedRuns::of(sorted, &transform);
    let m = points.len();
    if m == 1 {
        // Constant importance: nothing distinguishes the parameters.
        return Ok(vec![(points.lowest(0), widths[0])]);
    }
    if u32::try_from(m).is_err() {
        return Err(ClusterError::TooLarge { distinct: m });
    }
    let k = widths.len().min(m);
    // Shifting by the median keeps the sums small (SegmentCost::new).
    let cost = SegmentCost::from_runs(m, points.point(m / 2), points.runs());
    let starts = optimal_starts(&cost, k, None);
    Ok(starts
        .iter()
        .enumerate()
        .map(|(c, &s)| (points.lowest(s), widths[k - 1 - c]))
        .collect())
}

/// One chunk's sorted values merged into weighted points: each distinct
/// transformed value, how many values map to it, and the smallest of them.
struct WeightedRuns {
    points: Vec<f64>,
    weights: Vec<f64>,
    lowest: Vec<f32>,
}

impl WeightedRuns {
    /// Merges equal (transformed) values of `sorted` into weighted points,
    /// remembering the smallest original value of each point. (A two-pass
    /// variant without a branch per value measured no faster on 15 M
    /// log-normal importances: their ties come in long, predictable runs.)
    fn of<F: Fn(f32) -> f64 + ?Sized>(sorted: &[f32], transform: &F) -> Self {
        let (mut points, mut weights, mut lowest) = (Vec::new(), Vec::new(), Vec::new());
        let mut previous: Option<f32> = None;
        for &a in sorted {
            if previous == Some(a) {
                *weights.last_mut().expect("a point is open") += 1.0;
                continue;
            }
            previous = Some(a);
            let x = transform(a);
            if points.last() == Some(&x) {
                *weights.last_mut().expect("a point is open") += 1.0;
            } else {
                points.push(x);
                weights.push(1.0);
                lowest.push(a);
            }
        }
        Self {
            points,
            weights,
            lowest,
        }
    }
}

/// [`WeightedRuns::of`] the whole input, computed in parallel chunks and
/// left in them (copying 15 M points into one vector costs as much as
/// making them). The transform is monotone, so equal transformed values are
/// contiguous: each chunk merges its own runs, and a run cut by a chunk
/// boundary is joined after (its later part's weight moves to its first
/// part, and the later chunk skips that point). Weights are counts, exact in
/// f64, so the order of the additions does not matter: the points equal one
/// sequential pass's.
struct MergedRuns {
    chunks: Vec<WeightedRuns>,
    /// Points of each chunk that belong to an earlier chunk's run (0 or 1).
    skip: Vec<usize>,
    /// Index of each chunk's first own point; the last entry is the total.
    offsets: Vec<usize>,
}

impl MergedRuns {
    fn of<F: Fn(f32) -> f64 + Sync + ?Sized>(sorted: &[f32], transform: &F) -> Self {
        let mut chunks: Vec<WeightedRuns> = sorted
            .par_chunks(CHUNK)
            .map(|chunk| WeightedRuns::of(chunk, transform))
            .collect();
        let mut skip = vec![0usize; chunks.len()];
        // (chunk, index) of the last point so far.
        let mut last: Option<(usize, usize)> = None;
        for c in 0..chunks.len() {
            if let Some((lc, li)) = last {
                if chunks[lc].points[li] == chunks[c].points[0] {
                    let w = chunks[c].weights[0];
                    chunks[lc].weights[li] += w;
                    skip[c] = 1;
                }
            }
            if chunks[c].points.len() > skip[c] {
                last = Some((c, chunks[c].points.len() - 1));
            }
        }
        let mut offsets = Vec::with_capacity(chunks.len() + 1);
        let mut total = 0;
        for (chunk, &skip) in chunks.iter().zip(&skip) {
            offsets.push(total);
            total += chunk.points.len() - skip;
        }
        offsets.push(total);
        Self {
            chunks,
            skip,
            offsets,
        }
    }

    fn len(&self) -> usize {
        *self.offsets.last().expect("one offset at least")
    }

    /// (chunk, index in it) of point `p < len()`.
    fn locate(&self, p: usize) -> (usize, usize) {
        let c = self.offsets.partition_point(|&o| o <= p) - 1;
        (c, p - self.offsets[c] + self.skip[c])
    }

    fn point(&self, p: usize) -> f64 {
        let (c, i) = self.locate(p);
        self.chunks[c].points[i]
    }

    fn lowest(&self, p: usize) -> f32 {
        let (c, i) = self.locate(p);
        self.chunks[c].lowest[i]
    }

    /// Every point with its weight, in order, as each chunk's slices.
    fn runs(&self) -> impl Iterator<Item = (&[f64], &[f64])> + '_ {
        self.chunks
            .iter()
            .zip(&self.skip)
            .map(|(chunk, &skip)| (&chunk.points[skip..], &chunk.weights[skip..]))
    }
}

/// Groups of the given shares of the sorted values, boundaries moved to the
/// nearer end of any run of equal values they fall into.
fn quantile_groups(sorted: &[f32], widths: &[u8], fractions: &[f64]) -> Result<Vec<(f32, u8)>> {
    let n = sorted.len();
    let k = widths.len();
    // Ascending group g has widths[k-1-g] and fractions[k-1-g].
    let mut boundaries = Vec::with_capacity(k + 1);
    boundaries.push(0usize);
    let mut cumulative = 0.0f64;
    for g in 0..k - 1 {
        cumulative += fractions[k - 1 - g];
        let b = ((n as f64) * cumulative).round().clamp(0.0, n as f64) as usize;
        let b = snap_to_run_edge(sorted, b).max(*boundaries.last().expect("starts with 0"));
        boundaries.push(b);
    }
    boundaries.push(n);
    let mut groups: Vec<(f32, u8)> = (0..k)
        .filter(|&g| boundaries[g] < boundaries[g + 1])
        .map(|g| (sorted[boundaries[g]], widths[k - 1 - g]))
        .collect();
    if groups.is_empty() {
        // Unreachable for n > 0 (the groups cover 0..n); kept total.
        groups.push((sorted[0], widths[0]));
    }
    Ok(groups)
}

/// Moves a split position `b` (elements `..b` below, `b..` above) out of a
/// run of equal values: to the run's start or end, whichever is nearer (the
/// start on a tie).
fn snap_to_run_edge(sorted: &[f32], b: usize) -> usize {
    if b == 0 || b >= sorted.len() || sorted[b - 1] != sorted[b] {
        return b;
    }
    let v = sorted[b];
    let start = sorted[..b].partition_point(|&x| x < v);
    let end = b + sorted[b..].partition_point(|&x| x <= v);
    if b - start <= end - b {
        start
    } else {
        end
    }
}

/// The same groups as [`quantile_groups`] without a full sort: a histogram
/// of the top 16 bits of the order keys locates each needed order statistic
/// in one bucket; one more pass gathers those buckets, which are sorted
/// (they are small for any spread-out data). Boundaries that fall in a run
/// of equal values get the run's ends from one counting pass each.
fn quantile_groups_select(importance: &[f32], widths: &[u8], fractions: &[f64]) -> Vec<(f32, u8)> {
    let n = importance.len();
    let k = widths.len();
    let shift = 32 - SELECT_BITS;
    let bucket_of = |v: f32| (to_key(v) >> shift) as usize;
    let hist = importance
        .par_chunks(CHUNK)
        .fold(
            || vec![0usize; 1 << SELECT_BITS],
            |mut h, c| {
                c.iter().for_each(|&v| h[bucket_of(v)] += 1);
                h
            },
        )
        .reduce(
            || vec![0usize; 1 << SELECT_BITS],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let mut below = Vec::with_capacity(hist.len() + 1);
    let mut acc = 0usize;
    below.push(0usize);
    for &h in &hist {
        acc += h;
        below.push(acc);
    }
    let bucket_of_rank = |r: usize| below.partition_point(|&b| b <= r) - 1;

    // Target boundaries (ascending group g has fractions[k-1-g]), and the
    // ranks whose values they need.
    let mut targets = Vec::with_capacity(k - 1);
    let mut cumulative = 0.0f64;
    for g in 0..k - 1 {
        cumulative += fractions[k - 1 - g];
        targets.push(((n as f64) * cumulative).round().clamp(0.0, n as f64) as usize);
    }
    let mut wanted = vec![false; hist.len()];
    for &b in &targets {
        if b > 0 && b < n {
            wanted[bucket_of_rank(b - 1)] = true;
            wanted[bucket_of_rank(b)] = true;
        }
    }
    let mut gathered: Vec<f32> = importance
        .par_iter()
        .copied()
        .filter(|&v| wanted[bucket_of(v)])
        .collect();
    par_sort_f32(&mut gathered);
    // Position in `gathered` of the first element of each wanted bucket.
    let mut gathered_start = vec![0usize; hist.len()];
    let mut offset = 0usize;
    for (bucket, &is_wanted) in wanted.iter().enumerate() {
        if is_wanted {
            gathered_start[bucket] = offset;
            offset += hist[bucket];
        }
    }
    let value_at = |r: usize| {
        let bucket = bucket_of_rank(r);
        gathered[gathered_start[bucket] + (r - below[bucket])]
    };

    // (position, value at that rank) of every boundary, as in
    // `snap_to_run_edge`, kept non-decreasing.
    let mut boundaries: Vec<(usize, Option<f32>)> = vec![(0, None)];
    for &b in &targets {
        let snapped = if b == 0 || b >= n {
            (b, None)
        } else {
            let (lo, hi) = (value_at(b - 1), value_at(b));
            if lo != hi {
                (b, Some(hi))
            } else {
                let (less, less_or_equal, next_above) = run_around(importance, hi);
                if b - less <= less_or_equal - b {
                    (less, Some(hi))
                } else {
                    (less_or_equal, next_above)
                }
            }
        };
        let previous = *boundaries.last().expect("starts with 0");
        boundaries.push(if snapped.0 < previous.0 {
            previous
        } else {
            snapped
        });
    }
    boundaries.push((n, None));
    (0..k)
        .filter(|&g| boundaries[g].0 < boundaries[g + 1].0)
        .map(|g| {
            (
                boundaries[g].1.unwrap_or(f32::NEG_INFINITY),
                widths[k - 1 - g],
            )
        })
        .collect()
}

/// Counts of values `< v` and `<= v`, and the smallest value `> v`.
fn run_around(values: &[f32], v: f32) -> (usize, usize, Option<f32>) {
    values
        .par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .fold((0usize, 0usize, None::<f32>), |(lt, le, above), &x| {
                    let above = if x > v {
                        Some(above.map_or(x, |a: f32| a.min(x)))
                    } else {
                        above
                    };
                    (lt + usize::from(x < v), le + usize::from(x <= v), above)
                })
        })
        .reduce(
            || (0, 0, None),
            |a, b| {
                let above = match (a.2, b.2) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
                (a.0 + b.0, a.1 + b.1, above)
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The chunked merge of ties equals one sequential pass, with runs cut
    /// by chunk boundaries, signed zeros (equal, but the smaller one is
    /// remembered) and a transform that merges distinct values.
    #[test]
    fn parallel_merge_of_ties_equals_one_pass() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for distinct in [1u16, 3, 700, 60_000] {
            let mut sorted: Vec<f32> = (0..5 * CHUNK + 123)
                .map(|_| f32::from(rng.random_range(0..distinct)) * 0.5 - 1.0)
                .chain((0..CHUNK / 3).map(|i| if i % 3 == 0 { -0.0 } else { 0.0 }))
                .collect();
            sorted.sort_by(f32::total_cmp);
            for transform in [&f64::from as &(dyn Fn(f32) -> f64 + Sync), &|a: f32| {
                f64::from(a).floor()
            }] {
                let one = WeightedRuns::of(&sorted, transform);
                let parallel = MergedRuns::of(&sorted, transform);
                assert_eq!(parallel.len(), one.points.len(), "{distinct} distinct");
                let (points, weights): (Vec<f64>, Vec<f64>) = parallel
                    .runs()
                    .flat_map(|(p, w)| p.iter().copied().zip(w.iter().copied()))
                    .unzip();
                assert_eq!(points, one.points);
                assert_eq!(weights, one.weights);
                for (p, &low) in one.lowest.iter().enumerate() {
                    assert_eq!(parallel.lowest(p).to_bits(), low.to_bits());
                    assert_eq!(parallel.point(p), one.points[p]);
                }
            }
        }
    }

    /// The selection path gives exactly the groups of the sorting path, ties
    /// and all.
    #[test]
    fn quantile_select_equals_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let widths = [16u8, 8, 4, 2, 0];
        for case in 0..12 {
            let n = 70_000 + case * 1_000;
            let values: Vec<f32> = (0..n)
                .map(|_| match case % 4 {
                    // Heavy ties: boundaries land inside runs.
                    0 => f32::from(rng.random_range(0u8..7)),
                    1 => (rng.random::<f32>() * 10.0 - 5.0).exp(),
                    2 => {
                        if rng.random_bool(0.6) {
                            0.0
                        } else {
                            rng.random::<f32>()
                        }
                    }
                    _ => {
                        (rng.random::<f32>() - 0.5) * if rng.random_bool(0.5) { -0.0 } else { 1.0 }
                    }
                })
                .collect();
            let fractions = match case % 3 {
                0 => vec![0.01, 0.02, 0.03, 0.04, 0.90],
                1 => vec![0.2, 0.2, 0.2, 0.2, 0.2],
                _ => vec![0.0, 0.5, 0.0, 0.25, 0.25],
            };
            let mut sorted = values.clone();
            par_sort_f32(&mut sorted);
            let by_sort = quantile_groups(&sorted, &widths, &fractions).unwrap();
            let by_select = quantile_groups_select(&values, &widths, &fractions);
            assert_eq!(
                lookup_widths(&values, &by_sort),
                lookup_widths(&values, &by_select),
                "case {case}"
            );
        }
    }
}
