//! The per-group solvers of METHOD §10: each returns the codes and the
//! scale(s) of one group of weights `w` with curvature `d`.

use crate::Method;

/// Convergence threshold on α and the round limit of the iterative solvers.
const TOL: f64 = 1e-6;
const MAX_ROUNDS: usize = 10;

type Warm<'a> = Option<(&'a [i8], &'a [f32])>;

pub(crate) fn solve(method: Method, w: &[f32], d: &[f32], warm: Warm) -> (Vec<i8>, Vec<f32>) {
    match method {
        Method::BinaryConnect => (signs(w), vec![1.0]),
        Method::Bwn => (signs(w), vec![mean_abs(w) as f32]),
        Method::Lab => {
            let (num, den) = curvature_weighted_abs(w, d);
            let alpha = if den > 0.0 { num / den } else { mean_abs(w) };
            (signs(w), vec![alpha as f32])
        }
        Method::TerConnect => {
            let codes = w
                .iter()
                .map(|&x| if x.abs() > 0.5 { sign(x) } else { 0 })
                .collect();
            (codes, vec![1.0])
        }
        Method::Twn => {
            let (codes, alpha) = twn(w);
            (codes, vec![alpha])
        }
        Method::LatApprox => {
            let start = warm.map(|(c, _)| c.to_vec()).unwrap_or_else(|| twn(w).0);
            let (codes, alpha) = lat_approx(w, d, start);
            (codes, vec![alpha])
        }
        Method::LatExact => {
            let (codes, alpha) = lat_exact(w, d);
            (codes, vec![alpha])
        }
        Method::Lat2Approx | Method::Lat2Exact => two_sided(method, w, d, warm),
        Method::Uniform { .. } => {
            let alpha = max_abs(w);
            let codes = if alpha > 0.0 {
                uniform_codes(w, alpha, method.max_code())
            } else {
                vec![0; w.len()]
            };
            (codes, vec![alpha])
        }
        Method::Laq { .. } => {
            let start = warm
                .map(|(_, s)| s[0] as f64)
                .filter(|a| *a > 0.0)
                .unwrap_or_else(|| w.iter().fold(0f64, |m, &x| m.max((x as f64).abs())));
            let (codes, alpha) = laq(method, w, d, start);
            (codes, vec![alpha])
        }
    }
}

fn sign(x: f32) -> i8 {
    if x < 0.0 {
        -1
    } else {
        1
    }
}

/// `(Σ D_i |W_i|, Σ D_i)` in f64, over eight partial sums: one accumulator
/// is a chain of dependent adds as long as the tensor (a third of a
/// millisecond per step for LeNet-300-100's 266k weights), eight overlap.
/// The scale is rounded to f32 afterwards, where the order of an f64 sum of
/// this length does not show.
fn curvature_weighted_abs(w: &[f32], d: &[f32]) -> (f64, f64) {
    const LANES: usize = 8;
    let n = w.len().min(d.len());
    let (w, d) = (&w[..n], &d[..n]);
    let (mut num, mut den) = ([0f64; LANES], [0f64; LANES]);
    let whole = n / LANES * LANES;
    for base in (0..whole).step_by(LANES) {
        for l in 0..LANES {
            let dl = f64::from(d[base + l]);
            num[l] += dl * f64::from(w[base + l]).abs();
            den[l] += dl;
        }
    }
    for i in whole..n {
        let dl = f64::from(d[i]);
        num[i - whole] += dl * f64::from(w[i]).abs();
        den[i - whole] += dl;
    }
    (num.iter().sum(), den.iter().sum())
}

fn signs(w: &[f32]) -> Vec<i8> {
    w.iter().map(|&x| sign(x)).collect()
}

fn mean_abs(w: &[f32]) -> f64 {
    if w.is_empty() {
        return 0.0;
    }
    w.iter().map(|&x| (x as f64).abs()).sum::<f64>() / w.len() as f64
}

/// The optimal scale of ternary codes: `Σ |b| D |W| / Σ |b| D` (0 if no
/// code is non-zero).
fn ternary_alpha(w: &[f32], d: &[f32], codes: &[i8]) -> f64 {
    let (num, den) = w
        .iter()
        .zip(d)
        .zip(codes)
        .filter(|(_, &c)| c != 0)
        .fold((0f64, 0f64), |(n, s), ((&w, &d), _)| {
            (n + d as f64 * (w as f64).abs(), s + d as f64)
        });
    if den > 0.0 {
        num / den
    } else {
        0.0
    }
}

fn threshold(w: &[f32], delta: f64) -> Vec<i8> {
    w.iter()
        .map(|&x| if (x as f64).abs() > delta { sign(x) } else { 0 })
        .collect()
}

/// TWN: `Δ = 0.7·mean |W|`, `α` = mean |W| over `|W| > Δ`.
fn twn(w: &[f32]) -> (Vec<i8>, f32) {
    let codes = threshold(w, 0.7 * mean_abs(w));
    let ones = vec![1f32; w.len()];
    let alpha = ternary_alpha(w, &ones, &codes);
    (codes, alpha as f32)
}

/// LAT approximate: alternate `α` (optimal for the codes) and the codes
/// (`|W| > α/2`) until α moves by less than [`TOL`], at most
/// [`MAX_ROUNDS`] rounds; the returned α is optimal for the returned codes.
fn lat_approx(w: &[f32], d: &[f32], mut codes: Vec<i8>) -> (Vec<i8>, f32) {
    let mut alpha = ternary_alpha(w, d, &codes);
    for _ in 0..MAX_ROUNDS {
        codes = threshold(w, alpha / 2.0);
        let next = ternary_alpha(w, d, &codes);
        let moved = (next - alpha).abs();
        alpha = next;
        if moved < TOL {
            break;
        }
    }
    (codes, alpha as f32)
}

/// LAT exact (METHOD §10): over the `|W|` sorted descending, the prefix `k`
/// with `a_k > c_k ≥ a_{k+1}` that maximises `c_k² C_k`, where
/// `c_k = S_k / (2 C_k)`; `Δ = c_k`, `α = 2Δ`.
fn lat_exact(w: &[f32], d: &[f32]) -> (Vec<i8>, f32) {
    let order = by_magnitude_descending(w);
    let (mut s, mut c) = (0f64, 0f64);
    let mut best: Option<(f64, f64)> = None; // (c_k² C_k, c_k)
    for (k, &i) in order.iter().enumerate() {
        let a = (w[i] as f64).abs();
        s += d[i] as f64 * a;
        c += d[i] as f64;
        if c <= 0.0 {
            continue;
        }
        let ck = s / (2.0 * c);
        let next = order.get(k + 1).map_or(0.0, |&j| (w[j] as f64).abs());
        if a > ck && ck >= next {
            let score = ck * ck * c;
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, ck));
            }
        }
    }
    match best {
        Some((_, delta)) => (threshold(w, delta), (2.0 * delta) as f32),
        None => (vec![0; w.len()], 0.0),
    }
}

/// The indices of `w` by |w| descending, ties by ascending index.
///
/// Sorted as one integer key per element, |w|'s bits complemented above the
/// index: the bit patterns of non-negative floats order as their values
/// (`total_cmp`'s order), so ascending keys are exactly that order. Sorting
/// indices through a comparator that read `w` twice per comparison made
/// exact LAT four times slower than LAB on LeNet-300-100 (the sort runs on
/// every tensor at every step); plain integers sort several times faster.
fn by_magnitude_descending(w: &[f32]) -> Vec<usize> {
    if u32::try_from(w.len()).is_err() {
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&i, &j| w[j].abs().total_cmp(&w[i].abs()).then(i.cmp(&j)));
        return order;
    }
    let mut keys: Vec<u64> = w
        .iter()
        .enumerate()
        .map(|(i, x)| (u64::from(!x.abs().to_bits()) << 32) | i as u64)
        .collect();
    keys.sort_unstable();
    keys.iter()
        .map(|k| (k & u64::from(u32::MAX)) as usize)
        .collect()
}

/// LAT2: the ternary solver on the positive and the negative weights apart;
/// scales `[α₊, α₋]`.
fn two_sided(method: Method, w: &[f32], d: &[f32], warm: Warm) -> (Vec<i8>, Vec<f32>) {
    let mut codes = vec![0i8; w.len()];
    let mut scales = vec![0f32; 2];
    for (side, positive) in [(0usize, true), (1, false)] {
        let idx: Vec<usize> = (0..w.len())
            .filter(|&i| if positive { w[i] > 0.0 } else { w[i] < 0.0 })
            .collect();
        let ws: Vec<f32> = idx.iter().map(|&i| w[i].abs()).collect();
        let ds: Vec<f32> = idx.iter().map(|&i| d[i]).collect();
        let (c, alpha) = if method == Method::Lat2Exact {
            lat_exact(&ws, &ds)
        } else {
            let start = match warm {
                Some((c, _)) => idx.iter().map(|&i| c[i].abs()).collect(),
                None => twn(&ws).0,
            };
            lat_approx(&ws, &ds, start)
        };
        for (&i, &ci) in idx.iter().zip(&c) {
            codes[i] = if ci != 0 { sign(w[i]) } else { 0 };
        }
        scales[side] = alpha;
    }
    (codes, scales)
}

/// The code of the level nearest to `x` (already clipped to [−1, 1]); ties
/// go to the smaller magnitude. `levels[k]` is `method.level(k)` as f64 for
/// `k` in `0..=n`, computed once per call of the solver: the 10-million
/// weights of the reference MLP make this the inner loop of a training step.
fn nearest_code(levels: &[f64], x: f64) -> i8 {
    let mut best = 0i8;
    let mut best_dist = x.abs();
    for (k, &level) in levels.iter().enumerate().skip(1) {
        let dist = (x.abs() - level).abs();
        if dist < best_dist {
            best = k as i8;
            best_dist = dist;
        }
    }
    if x < 0.0 {
        -best
    } else {
        best
    }
}

/// [`nearest_code`] of `clip(W_i/α)` for every weight, with the `L` levels
/// in an array: the same comparisons in the same order (the first level
/// strictly nearer wins), written as selects over a loop of known length so
/// that the loop over the weights vectorises. Through a slice of runtime
/// length the scan kept it scalar: 44 % of a LAQ3 training step on
/// LeNet-300-100, where the solver assigns every weight up to eleven times a
/// step.
fn nearest_codes<const L: usize>(levels: &[f64], w: &[f32], alpha: f64) -> Vec<i8> {
    let mut lv = [0f64; L];
    lv.copy_from_slice(&levels[..L]);
    w.iter()
        .map(|&x| {
            let x = (x as f64 / alpha).clamp(-1.0, 1.0);
            let a = x.abs();
            let (mut best, mut best_dist) = (0i8, a);
            for (k, &level) in lv.iter().enumerate().skip(1) {
                let dist = (a - level).abs();
                let nearer = dist < best_dist;
                best = if nearer { k as i8 } else { best };
                best_dist = if nearer { dist } else { best_dist };
            }
            if x < 0.0 {
                -best
            } else {
                best
            }
        })
        .collect()
}

/// LAQ: alternate the codes (nearest level of `clip(W/α)`) and α (the
/// minimiser `Σ D b W / Σ D b²`), from `alpha`, until α moves by less than
/// [`TOL`], at most [`MAX_ROUNDS`] rounds; the returned α is optimal for the
/// returned codes.
fn laq(method: Method, w: &[f32], d: &[f32], mut alpha: f64) -> (Vec<i8>, f32) {
    let levels: Vec<f64> = (0..=method.max_code())
        .map(|k| method.level(k) as f64)
        .collect();
    let codes_for = |alpha: f64| -> Vec<i8> {
        if alpha <= 0.0 {
            return vec![0; w.len()];
        }
        match levels.len() {
            2 => nearest_codes::<2>(&levels, w, alpha),
            4 => nearest_codes::<4>(&levels, w, alpha),
            8 => nearest_codes::<8>(&levels, w, alpha),
            _ => w
                .iter()
                .map(|&x| nearest_code(&levels, (x as f64 / alpha).clamp(-1.0, 1.0)))
                .collect(),
        }
    };
    let alpha_for = |codes: &[i8]| -> f64 {
        let (num, den) = w
            .iter()
            .zip(d)
            .zip(codes)
            .fold((0f64, 0f64), |(n, s), ((&w, &d), &c)| {
                // level(−k) = −level(k).
                let b = levels[c.unsigned_abs() as usize] * f64::from(c.signum());
                (n + d as f64 * b * w as f64, s + d as f64 * b * b)
            });
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    };
    let mut codes = codes_for(alpha);
    for _ in 0..MAX_ROUNDS {
        let next = alpha_for(&codes);
        let moved = (next - alpha).abs();
        alpha = next;
        codes = codes_for(alpha);
        if moved < TOL {
            break;
        }
    }
    let alpha = alpha_for(&codes);
    (codes, alpha.max(0.0) as f32)
}

#[cfg(test)]
mod order_tests {
    use super::by_magnitude_descending;

    #[test]
    fn the_integer_keys_give_the_comparators_order() {
        // Ties of equal magnitude and sign-opposite pairs, zeros of both
        // signs, subnormals and large values.
        let w = [
            0.5f32, -0.5, 0.0, -0.0, 1e-40, -1e-40, 3.0, -2.0, 0.5, 7.5, -7.5, 1e-3, 2.0,
        ];
        let mut want: Vec<usize> = (0..w.len()).collect();
        want.sort_by(|&i, &j| w[j].abs().total_cmp(&w[i].abs()).then(i.cmp(&j)));
        assert_eq!(by_magnitude_descending(&w), want);
        let mut state = 7u64;
        let many: Vec<f32> = (0..5000)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                // Few distinct values, so that ties are common.
                ((state >> 40) % 64) as f32 / 16.0 - 2.0
            })
            .collect();
        let mut want: Vec<usize> = (0..many.len()).collect();
        want.sort_by(|&i, &j| many[j].abs().total_cmp(&many[i].abs()).then(i.cmp(&j)));
        assert_eq!(by_magnitude_descending(&many), want);
    }
}

#[cfg(test)]
mod nearest_tests {
    use super::{nearest_code, nearest_codes};
    use crate::Method;

    #[test]
    fn the_fixed_size_scan_assigns_what_the_slice_scan_assigns() {
        for method in [
            Method::Laq {
                bits: 2,
                log: false,
            },
            Method::Laq {
                bits: 3,
                log: false,
            },
            Method::Laq {
                bits: 4,
                log: false,
            },
            Method::Laq { bits: 3, log: true },
            Method::Laq { bits: 4, log: true },
        ] {
            let levels: Vec<f64> = (0..=method.max_code())
                .map(|k| method.level(k) as f64)
                .collect();
            let alpha = 0.75f64;
            // Every level and every midpoint between two (exact ties), a
            // hair either side of them, zero of both signs, values past ±α.
            let mut w = vec![0.0f32, -0.0, 0.9, -0.9, 3.0, -3.0];
            for pair in levels.windows(2) {
                for v in [pair[0], pair[1], (pair[0] + pair[1]) / 2.0] {
                    let x = (v * alpha) as f32;
                    for y in [
                        x,
                        f32::from_bits(x.to_bits() + 1),
                        f32::from_bits(x.to_bits().max(1) - 1),
                    ] {
                        w.extend([y, -y]);
                    }
                }
            }
            let mut state = 3u64;
            w.extend((0..2000).map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            }));
            let want: Vec<i8> = w
                .iter()
                .map(|&x| nearest_code(&levels, (x as f64 / alpha).clamp(-1.0, 1.0)))
                .collect();
            let got = match levels.len() {
                2 => nearest_codes::<2>(&levels, &w, alpha),
                4 => nearest_codes::<4>(&levels, &w, alpha),
                8 => nearest_codes::<8>(&levels, &w, alpha),
                n => panic!("{n} levels"),
            };
            assert_eq!(got, want, "{method:?}");
        }
    }
}

/// `max |x|` of finite values (`quantize` rejects others), as an integer
/// maximum over the magnitude bits: for finite floats their order is the
/// numeric one, and unlike a float `max` fold (whose NaN rule keeps it one
/// dependent chain) it vectorises.
fn max_abs(w: &[f32]) -> f32 {
    f32::from_bits(w.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff)))
}

/// The codes of [`Method::Uniform`] with `n = max_code`: the nearest level
/// `k/n` of `t = min(|x|/α, 1)·n` (in f64), ties to the smaller magnitude,
/// signed like `x`. No search over up to 255 levels per weight, every step.
fn uniform_codes(w: &[f32], alpha: f32, n: i8) -> Vec<i8> {
    match n {
        1 => uniform_codes_counted::<1>(w, alpha),
        3 => uniform_codes_counted::<3>(w, alpha),
        7 => uniform_codes_counted::<7>(w, alpha),
        _ => {
            let (alpha, n) = (f64::from(alpha), f64::from(n));
            w.iter()
                .map(|&x| {
                    let t = (f64::from(x).abs() / alpha).min(1.0) * n;
                    let mut k = t.floor();
                    if t - k > 0.5 {
                        k += 1.0;
                    }
                    signed_code(k as i8, x)
                })
                .collect()
        }
    }
}

/// [`uniform_codes`] for `N` = 1, 3 or 7 (2, 3 and 4 bits) as a count of
/// thresholds: the code's magnitude is the number of midpoints `j − 0.5`
/// (`j` in `1..=N`) below `t`, since `floor(t) + [t − floor(t) > 0.5]`
/// counts exactly those (`t − floor(t)` is exact by Sterbenz's lemma, and
/// `floor(t) + 0.5` is exact). And `t` is a non-decreasing function of `|x|`
/// (a rounded division and product by positive constants, and a `min`), so
/// `t > j − 0.5` holds exactly from some `|x| = T_j` on: found once per
/// tensor by bisection over the f32 bit patterns, the thresholds turn every
/// element into `N` f32 comparisons — the same codes as the f64 rule,
/// without its division per weight, and in a loop that vectorises.
fn uniform_codes_counted<const N: usize>(w: &[f32], alpha: f32) -> Vec<i8> {
    let (alpha64, n) = (f64::from(alpha), N as f64);
    let t = |a: f32| (f64::from(a) / alpha64).min(1.0) * n;
    let thresholds: [f32; N] = std::array::from_fn(|j| {
        let midpoint = j as f64 + 0.5;
        first_true(|a| t(a) > midpoint)
    });
    let code = |x: f32| {
        let a = x.abs();
        let k = thresholds.iter().map(|&m| i8::from(a >= m)).sum::<i8>();
        signed_code(k, x)
    };
    crate::par_map(w, code)
}

/// The smallest non-negative f32 at which `holds` is true, for a predicate
/// that is false and then true as its argument grows and that holds at +∞
/// (bisection over the bit patterns, whose order is the values' order).
fn first_true(holds: impl Fn(f32) -> bool) -> f32 {
    if holds(0.0) {
        return 0.0;
    }
    // holds(lo) is false, holds(hi) true.
    let (mut lo, mut hi) = (0u32, f32::INFINITY.to_bits());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if holds(f32::from_bits(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    f32::from_bits(hi)
}

fn signed_code(k: i8, x: f32) -> i8 {
    if x < 0.0 {
        -k
    } else {
        k
    }
}

#[cfg(test)]
mod uniform_tests {
    use super::{signed_code, uniform_codes, uniform_codes_counted};

    /// The rule as first written: the floor, then up past the midpoint.
    fn by_floor(w: &[f32], alpha: f32, n: i8) -> Vec<i8> {
        let (a, nf) = (f64::from(alpha), f64::from(n));
        w.iter()
            .map(|&x| {
                let t = (f64::from(x).abs() / a).min(1.0) * nf;
                let mut k = t.floor();
                if t - k > 0.5 {
                    k += 1.0;
                }
                signed_code(k as i8, x)
            })
            .collect()
    }

    #[test]
    fn counted_midpoints_give_the_floor_rules_codes() {
        for alpha in [1.0f32, 0.37, 3.0e-3, 1.0e-40, 3.0e38, 0.1] {
            for n in [1i8, 3, 7] {
                // Every level and midpoint times α (exact ties where the
                // arithmetic allows), a hair either side, zeros of both
                // signs, α itself and values past it.
                let mut w = vec![0.0f32, -0.0, alpha, -alpha, 2.0 * alpha, -5.0 * alpha];
                for half in 0..=2 * i32::from(n) {
                    let x = (f64::from(half) / 2.0 / f64::from(n) * f64::from(alpha)) as f32;
                    for y in [
                        x,
                        f32::from_bits(x.to_bits() + 1),
                        f32::from_bits(x.to_bits().max(1) - 1),
                    ] {
                        w.extend([y, -y]);
                    }
                }
                let mut state = 11u64;
                w.extend((0..3000).map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.5 * alpha
                }));
                let want = by_floor(&w, alpha, n);
                let got = match n {
                    1 => uniform_codes_counted::<1>(&w, alpha),
                    3 => uniform_codes_counted::<3>(&w, alpha),
                    _ => uniform_codes_counted::<7>(&w, alpha),
                };
                assert_eq!(got, want, "n {n}, alpha {alpha}");
                assert_eq!(uniform_codes(&w, alpha, n), want);
            }
        }
        // Long enough for the parallel chunks: the same codes.
        let long: Vec<f32> = (0..200_003)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        assert_eq!(uniform_codes(&long, 0.9, 3), by_floor(&long, 0.9, 3));
        // An exact midpoint rounds down (ties to the smaller magnitude).
        assert_eq!(uniform_codes(&[0.5, -0.5, 0.75], 1.0, 1), vec![0, 0, 1]);
        // The wide widths keep the floor rule.
        let w = [0.3f32, -0.71, 0.5 / 127.0];
        assert_eq!(uniform_codes(&w, 1.0, 127), by_floor(&w, 1.0, 127));
    }
}
