//! Cluster methods and the assignment of bit widths by importance.

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::ckmeans::ckmeans_weighted;
use crate::sort::par_sort_f32;
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
    Quantiles { fractions: Vec<f64> },
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
    if let Some(index) = importance.par_iter().position_first(|v| !v.is_finite()) {
        return Err(ClusterError::NonFinite {
            index,
            value: f64::from(importance[index]),
        });
    }
    if *method == ClusterMethod::LogKMeans {
        if let Some(index) = importance.par_iter().position_first(|&v| v < 0.0) {
            return Err(ClusterError::NegativeImportance {
                index,
                value: f64::from(importance[index]),
            });
        }
    }
    if importance.is_empty() {
        return Ok(Vec::new());
    }

    let mut sorted = importance.to_vec();
    par_sort_f32(&mut sorted);
    if sorted[0] == sorted[sorted.len() - 1] {
        // Constant importance: nothing distinguishes the parameters.
        return Ok(vec![widths[0]; importance.len()]);
    }
    // (lowest importance of the group, its width), ascending by importance.
    let groups = match method {
        ClusterMethod::KMeans => kmeans_groups(&sorted, widths, &f64::from),
        ClusterMethod::LogKMeans => kmeans_groups(&sorted, widths, &log_transform(&sorted)),
        ClusterMethod::Quantiles { fractions } => quantile_groups(&sorted, widths, fractions),
    }?;
    drop(sorted);

    let (&(_, lowest_width), higher) = groups
        .split_first()
        .expect("non-empty input gives at least one group");
    Ok(importance
        .par_iter()
        .map(|&a| {
            higher
                .iter()
                .rev()
                .find(|(lower, _)| a >= *lower)
                .map_or(lowest_width, |&(_, w)| w)
        })
        .collect())
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
    transform: &dyn Fn(f32) -> f64,
) -> Result<Vec<(f32, u8)>> {
    // Merge equal (transformed) values into weighted points, remembering the
    // smallest original value of each point.
    let mut points: Vec<f64> = Vec::new();
    let mut weights: Vec<f64> = Vec::new();
    let mut lowest: Vec<f32> = Vec::new();
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
    if points.len() == 1 {
        // Constant importance: nothing distinguishes the parameters.
        return Ok(vec![(lowest[0], widths[0])]);
    }
    let clustering = ckmeans_weighted(&points, &weights, widths.len())?;
    let clusters = clustering.starts.len();
    Ok(clustering
        .starts
        .iter()
        .enumerate()
        .map(|(c, &s)| (lowest[s], widths[clusters - 1 - c]))
        .collect())
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
