//! Maximum-likelihood fits of truncated discrete laws on `k_min ..= k_max`,
//! `k_min` by the Kolmogorov–Smirnov distance, and Vuong's test.

use serde::Serialize;

use crate::{PowerLawError, Result};

/// The fewest units a tail may have for `k_min` to be considered.
pub const MIN_TAIL: usize = 10;

/// The three laws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Law {
    /// `p(k) ∝ k^−γ`.
    PowerLaw,
    /// `p(k) ∝ e^{−λk}`.
    Exponential,
    /// `p(k) ∝ (1/k) exp(−(ln k − μ)² / (2σ²))`.
    LogNormal,
}

/// The power-law fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PowerLaw {
    /// The exponent γ.
    pub gamma: f64,
    /// Its standard error, `1 / sqrt(n · Var_γ[ln k])` (the inverse Fisher
    /// information).
    pub std_err: f64,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
}

/// The exponential fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Exponential {
    /// The rate λ.
    pub lambda: f64,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
}

/// The log-normal fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LogNormal {
    /// μ of `ln k`.
    pub mu: f64,
    /// σ of `ln k`.
    pub sigma: f64,
    /// The maximised log-likelihood.
    pub log_likelihood: f64,
}

/// Vuong's likelihood-ratio test of the power law against an alternative.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Comparison {
    /// The alternative.
    pub alternative: Law,
    /// `R`: the log-likelihood of the power law minus the alternative's
    /// (positive favours the power law).
    pub ratio: f64,
    /// The two-sided p-value of `R ≠ 0`.
    pub p_value: f64,
    /// The law the data favour at p < 0.1, or `None` when the test cannot
    /// tell them apart.
    pub favours: Option<Law>,
}

impl Comparison {
    /// "power law (R 3.1, p 0.02)": the favoured law (or "neither") with
    /// the statistic and p-value.
    pub fn verdict(&self) -> String {
        let who = match self.favours {
            Some(Law::PowerLaw) => "power law",
            Some(Law::Exponential) => "exponential",
            Some(Law::LogNormal) => "log-normal",
            None => "neither",
        };
        format!("{who} (R {:.1}, p {:.2})", self.ratio, self.p_value)
    }
}

/// The fits of one degree sequence.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TailFit {
    /// Units in the sequence.
    pub units: usize,
    /// Units of degree 0 (not fitted).
    pub zero_degree: usize,
    /// The lower end of the fitted range.
    pub k_min: u32,
    /// The upper end: the largest degree.
    pub k_max: u32,
    /// Units in `k_min ..= k_max`.
    pub tail: usize,
    /// The Kolmogorov–Smirnov distance of the power-law fit on the tail.
    pub ks_distance: f64,
    /// The fits.
    pub power_law: PowerLaw,
    /// See [`Exponential`].
    pub exponential: Exponential,
    /// See [`LogNormal`].
    pub log_normal: LogNormal,
    /// The power law against the exponential, then against the log-normal.
    pub compare: [Comparison; 2],
}

/// Log-probabilities over `k_min ..= k_max` of `log w(k) = −θ t(k) + c(k)`.
fn log_pmf(
    theta: f64,
    k_min: u32,
    k_max: u32,
    t: impl Fn(f64) -> f64,
    c: impl Fn(f64) -> f64,
) -> Vec<f64> {
    let raw: Vec<f64> = (k_min..=k_max)
        .map(|k| -theta * t(k as f64) + c(k as f64))
        .collect();
    let max = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let log_z = max + raw.iter().map(|r| (r - max).exp()).sum::<f64>().ln();
    raw.into_iter().map(|r| r - log_z).collect()
}

/// The maximum-likelihood θ of the one-parameter family `w(k) = e^{−θ t(k)}`
/// on the range: the root of `E_θ[t] = mean t`, found by bisection (`E_θ[t]`
/// falls as θ grows). Returns θ and `Var_θ[t]` there.
fn one_parameter_mle(
    ks: &[u32],
    k_min: u32,
    k_max: u32,
    t: impl Fn(f64) -> f64 + Copy,
) -> (f64, f64) {
    let mean_t = ks.iter().map(|&k| t(k as f64)).sum::<f64>() / ks.len() as f64;
    let moments = |theta: f64| {
        let lp = log_pmf(theta, k_min, k_max, t, |_| 0.0);
        let (mut m1, mut m2) = (0.0, 0.0);
        for (i, l) in lp.iter().enumerate() {
            let p = l.exp();
            let x = t((k_min + i as u32) as f64);
            m1 += p * x;
            m2 += p * x * x;
        }
        (m1, (m2 - m1 * m1).max(0.0))
    };
    let (mut lo, mut hi) = (-50.0f64, 50.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if moments(mid).0 > mean_t {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-10 {
            break;
        }
    }
    let theta = 0.5 * (lo + hi);
    (theta, moments(theta).1)
}

fn log_likelihood(ks: &[u32], k_min: u32, lp: &[f64]) -> f64 {
    ks.iter().map(|&k| lp[(k - k_min) as usize]).sum()
}

fn log_normal_pmf(mu: f64, sigma: f64, k_min: u32, k_max: u32) -> Vec<f64> {
    log_pmf(
        0.0,
        k_min,
        k_max,
        |_| 0.0,
        |k| -k.ln() - (k.ln() - mu).powi(2) / (2.0 * sigma * sigma),
    )
}

/// Nelder–Mead on (μ, ln σ) for the log-normal's likelihood.
fn fit_log_normal(ks: &[u32], k_min: u32, k_max: u32) -> LogNormal {
    let logs: Vec<f64> = ks.iter().map(|&k| (k as f64).ln()).collect();
    let mean = logs.iter().sum::<f64>() / logs.len() as f64;
    let sd = (logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / logs.len() as f64)
        .sqrt()
        .max(0.1);
    let neg = |x: [f64; 2]| -> f64 {
        let sigma = x[1].exp();
        if !sigma.is_finite() || sigma < 1e-3 {
            return f64::INFINITY;
        }
        -log_likelihood(ks, k_min, &log_normal_pmf(x[0], sigma, k_min, k_max))
    };
    let mut simplex = [
        [mean, sd.ln()],
        [mean + 0.5, sd.ln()],
        [mean, sd.ln() + 0.5],
    ];
    let mut values = simplex.map(neg);
    for _ in 0..400 {
        let mut order = [0usize, 1, 2];
        order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
        let [b, m, w] = order;
        if (values[w] - values[b]).abs() < 1e-10 {
            break;
        }
        let centre = [
            0.5 * (simplex[b][0] + simplex[m][0]),
            0.5 * (simplex[b][1] + simplex[m][1]),
        ];
        let at = |s: f64| {
            [
                centre[0] + s * (simplex[w][0] - centre[0]),
                centre[1] + s * (simplex[w][1] - centre[1]),
            ]
        };
        let reflected = at(-1.0);
        let fr = neg(reflected);
        if fr < values[b] {
            let expanded = at(-2.0);
            let fe = neg(expanded);
            (simplex[w], values[w]) = if fe < fr {
                (expanded, fe)
            } else {
                (reflected, fr)
            };
        } else if fr < values[m] {
            (simplex[w], values[w]) = (reflected, fr);
        } else {
            let contracted = at(0.5);
            let fc = neg(contracted);
            if fc < values[w] {
                (simplex[w], values[w]) = (contracted, fc);
            } else {
                for i in [m, w] {
                    simplex[i] = [
                        0.5 * (simplex[i][0] + simplex[b][0]),
                        0.5 * (simplex[i][1] + simplex[b][1]),
                    ];
                    values[i] = neg(simplex[i]);
                }
            }
        }
    }
    let best = (0..3)
        .min_by(|&a, &b| values[a].total_cmp(&values[b]))
        .unwrap_or(0);
    LogNormal {
        mu: simplex[best][0],
        sigma: simplex[best][1].exp(),
        log_likelihood: -values[best],
    }
}

/// Vuong's test from the pointwise log-likelihoods of two laws.
fn vuong(ks: &[u32], k_min: u32, lp_power: &[f64], lp_alt: &[f64], alternative: Law) -> Comparison {
    let diffs: Vec<f64> = ks
        .iter()
        .map(|&k| lp_power[(k - k_min) as usize] - lp_alt[(k - k_min) as usize])
        .collect();
    let n = diffs.len() as f64;
    let ratio: f64 = diffs.iter().sum();
    let mean = ratio / n;
    let var = diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n;
    let p_value = if var > 0.0 {
        libm::erfc(ratio.abs() / (2.0 * n * var).sqrt())
    } else if ratio == 0.0 {
        1.0
    } else {
        0.0
    };
    let favours = (p_value < 0.1).then_some(if ratio > 0.0 {
        Law::PowerLaw
    } else {
        alternative
    });
    Comparison {
        alternative,
        ratio,
        p_value,
        favours,
    }
}

/// Fits the units of `degrees` with degree in `k_min ..= max degree`.
pub fn fit_tail_from(degrees: &[u32], k_min: u32) -> Result<TailFit> {
    let k_min = k_min.max(1);
    let zero_degree = degrees.iter().filter(|&&d| d == 0).count();
    let ks: Vec<u32> = degrees.iter().copied().filter(|&d| d >= k_min).collect();
    if ks.len() < 2 {
        return Err(PowerLawError::TooFewPoints {
            found: ks.len(),
            needed: 2,
        });
    }
    let k_max = ks.iter().copied().max().unwrap_or(k_min);
    let n = ks.len();
    let (gamma, var_log) = one_parameter_mle(&ks, k_min, k_max, f64::ln);
    let lp_power = log_pmf(gamma, k_min, k_max, f64::ln, |_| 0.0);
    let (lambda, _) = one_parameter_mle(&ks, k_min, k_max, |k| k);
    let lp_exp = log_pmf(lambda, k_min, k_max, |k| k, |_| 0.0);
    let log_normal = fit_log_normal(&ks, k_min, k_max);
    let lp_ln = log_normal_pmf(log_normal.mu, log_normal.sigma, k_min, k_max);
    // The KS distance of the power law on the tail.
    let mut counts = vec![0usize; (k_max - k_min + 1) as usize];
    for &k in &ks {
        counts[(k - k_min) as usize] += 1;
    }
    let (mut emp, mut model, mut ks_distance) = (0.0f64, 0.0f64, 0.0f64);
    for (i, &c) in counts.iter().enumerate() {
        emp += c as f64 / n as f64;
        model += lp_power[i].exp();
        ks_distance = ks_distance.max((emp - model).abs());
    }
    Ok(TailFit {
        units: degrees.len(),
        zero_degree,
        k_min,
        k_max,
        tail: n,
        ks_distance,
        power_law: PowerLaw {
            gamma,
            std_err: 1.0 / (n as f64 * var_log).sqrt(),
            log_likelihood: log_likelihood(&ks, k_min, &lp_power),
        },
        exponential: Exponential {
            lambda,
            log_likelihood: log_likelihood(&ks, k_min, &lp_exp),
        },
        log_normal,
        compare: [
            vuong(&ks, k_min, &lp_power, &lp_exp, Law::Exponential),
            vuong(&ks, k_min, &lp_power, &lp_ln, Law::LogNormal),
        ],
    })
}

/// Fits `degrees` with `k_min` chosen among the observed degrees (leaving at
/// least [`MIN_TAIL`] units) to minimise the power law's KS distance.
pub fn fit_tail(degrees: &[u32]) -> Result<TailFit> {
    let mut candidates: Vec<u32> = degrees.iter().copied().filter(|&d| d >= 1).collect();
    if candidates.len() < MIN_TAIL {
        return Err(PowerLawError::TooFewPoints {
            found: candidates.len(),
            needed: MIN_TAIL,
        });
    }
    candidates.sort_unstable();
    let n = candidates.len();
    let mut best: Option<TailFit> = None;
    let mut i = 0;
    while i < n && n - i >= MIN_TAIL {
        let k = candidates[i];
        if candidates[n - 1] > k {
            let fit = fit_tail_from(degrees, k)?;
            if best
                .as_ref()
                .is_none_or(|b| fit.ks_distance < b.ks_distance)
            {
                best = Some(fit);
            }
        }
        while i < n && candidates[i] == k {
            i += 1;
        }
    }
    match best {
        Some(b) => Ok(b),
        // Every unit has the same degree: the range is one point.
        None => fit_tail_from(degrees, candidates[0]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `n` draws from `p(k) ∝ w(k)` on `k_min ..= k_max` by the inverse CDF.
    fn sample(n: usize, k_min: u32, k_max: u32, w: impl Fn(f64) -> f64, seed: u64) -> Vec<u32> {
        let weights: Vec<f64> = (k_min..=k_max).map(|k| w(k as f64)).collect();
        let total: f64 = weights.iter().sum();
        let mut cdf = Vec::with_capacity(weights.len());
        let mut acc = 0.0;
        for x in &weights {
            acc += x / total;
            cdf.push(acc);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let u: f64 = rng.random();
                k_min + cdf.iter().position(|&c| c >= u).unwrap_or(cdf.len() - 1) as u32
            })
            .collect()
    }

    #[test]
    fn the_mle_recovers_gamma_within_its_standard_error() {
        for (gamma, seed) in [(2.0, 1), (2.5, 2), (1.5, 3)] {
            let d = sample(3000, 1, 500, |k| k.powf(-gamma), seed);
            let fit = fit_tail_from(&d, 1).unwrap();
            let err = (fit.power_law.gamma - gamma).abs();
            assert!(
                err < 3.0 * fit.power_law.std_err,
                "γ {gamma}: fitted {} ± {}",
                fit.power_law.gamma,
                fit.power_law.std_err
            );
            // Against the exponential the power law wins clearly.
            assert_eq!(fit.compare[0].favours, Some(Law::PowerLaw), "{fit:?}");
        }
    }

    #[test]
    fn exponential_samples_reject_the_power_law() {
        let d = sample(3000, 1, 200, |k| (-0.1 * k).exp(), 4);
        let fit = fit_tail_from(&d, 1).unwrap();
        assert!((fit.exponential.lambda - 0.1).abs() < 0.01, "{fit:?}");
        assert_eq!(fit.compare[0].favours, Some(Law::Exponential), "{fit:?}");
        assert!(fit.compare[0].ratio < 0.0);
    }

    #[test]
    fn log_normal_samples_fit_their_parameters() {
        let (mu, sigma) = (3.0f64, 0.5f64);
        let d = sample(
            3000,
            1,
            400,
            |k| (-(k.ln() - mu).powi(2) / (2.0 * sigma * sigma)).exp() / k,
            5,
        );
        let fit = fit_tail_from(&d, 1).unwrap();
        assert!((fit.log_normal.mu - mu).abs() < 0.05, "{fit:?}");
        assert!((fit.log_normal.sigma - sigma).abs() < 0.05, "{fit:?}");
        assert_eq!(fit.compare[1].favours, Some(Law::LogNormal), "{fit:?}");
    }

    #[test]
    fn k_min_is_found_above_a_flat_head() {
        // Uniform on 1..=9, then a power-law tail from 10.
        let mut d = sample(500, 1, 9, |_| 1.0, 6);
        d.extend(sample(3000, 10, 1000, |k| k.powf(-2.5), 7));
        let fit = fit_tail(&d).unwrap();
        assert!((8..=14).contains(&fit.k_min), "k_min {}", fit.k_min);
        assert!(
            (fit.power_law.gamma - 2.5).abs() < 3.0 * fit.power_law.std_err + 0.05,
            "{fit:?}"
        );
    }

    #[test]
    fn too_few_units_are_an_error_and_zeros_are_counted() {
        assert!(fit_tail(&[0, 0, 1, 2, 3]).is_err());
        let mut d = vec![0u32; 7];
        d.extend(1..=30);
        let fit = fit_tail(&d).unwrap();
        assert_eq!(fit.zero_degree, 7);
        assert_eq!(fit.units, 37);
        assert_eq!(fit.k_max, 30);
        // All units of one degree: a one-point range, no panic.
        let fit = fit_tail(&[5u32; 20]).unwrap();
        assert_eq!((fit.k_min, fit.k_max, fit.tail), (5, 5, 20));
    }
}
