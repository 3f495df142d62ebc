//! Property tests of the quantizers against brute force (METHOD §10).

use proptest::prelude::*;

use super::*;

fn weights(max_len: usize) -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec(-1.0f32..1.0, 1..=max_len)
}

/// Weights with curvature, of one length.
fn weights_and_curvature(max_len: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (1..=max_len).prop_flat_map(|n| {
        (
            prop::collection::vec(-1.0f32..1.0, n),
            // 0.01 ..= 10.0 in steps of 0.01: proptest 1.12's f32 range
            // sampler trips its own assertion on `0.01f32..10.0` now and then.
            prop::collection::vec((1u32..=1000).prop_map(|k| k as f32 / 100.0), n),
        )
    })
}

fn distinct(values: &[f32]) -> usize {
    let mut v: Vec<u32> = values.iter().map(|x| x.to_bits()).collect();
    v.sort();
    v.dedup();
    v.len()
}

/// The objective of ternary codes `b = sign(W)·[|W| > Δ]` with their optimal
/// scale, for every threshold Δ in {0} ∪ {|W_i|}: the exhaustive search.
fn exhaustive_ternary(w: &[f32], d: &[f32]) -> f64 {
    let mut thresholds: Vec<f64> = w.iter().map(|x| (*x as f64).abs()).collect();
    thresholds.push(0.0);
    thresholds
        .iter()
        .map(|&delta| {
            let b: Vec<f64> = w
                .iter()
                .map(|&x| {
                    if (x as f64).abs() > delta {
                        (x as f64).signum()
                    } else {
                        0.0
                    }
                })
                .collect();
            let num: f64 = b
                .iter()
                .zip(w)
                .zip(d)
                .map(|((b, &w), &d)| d as f64 * b * w as f64)
                .sum();
            let den: f64 = b.iter().zip(d).map(|(b, &d)| d as f64 * b * b).sum();
            let alpha = if den > 0.0 { num / den } else { 0.0 };
            b.iter()
                .zip(w)
                .zip(d)
                .map(|((b, &w), &d)| d as f64 * (alpha * b - w as f64).powi(2))
                .sum::<f64>()
        })
        .fold(f64::INFINITY, f64::min)
}

proptest! {
    #[test]
    fn lab_alpha_is_the_minimiser_and_bwn_with_constant_curvature((w, d) in weights_and_curvature(40)) {
        let lab = quantize(Method::Lab, &w, Some(&d), 1, None).unwrap();
        let alpha = lab.scales[0] as f64;
        let f = |a: f64| -> f64 {
            w.iter().zip(&d).map(|(&w, &d)| {
                let b = if w < 0.0 { -1.0 } else { 1.0 };
                d as f64 * (w as f64 - a * b).powi(2)
            }).sum()
        };
        // No scale on a fine grid around it does better (f is a parabola).
        for k in -50..=50 {
            let other = alpha * (1.0 + k as f64 / 100.0);
            prop_assert!(f(alpha) <= f(other) + 1e-9, "{} vs {} at {}", f(alpha), f(other), other);
        }
        let ones = vec![1f32; w.len()];
        let lab1 = quantize(Method::Lab, &w, Some(&ones), 1, None).unwrap();
        let bwn = quantize(Method::Bwn, &w, None, 1, None).unwrap();
        prop_assert!((lab1.scales[0] - bwn.scales[0]).abs() <= 1e-6 * bwn.scales[0].max(1.0));
        prop_assert!(distinct(&lab.values) <= 2);
    }

    #[test]
    fn exact_lat_equals_the_exhaustive_search_and_beats_the_others((w, d) in weights_and_curvature(12)) {
        let exact = quantize(Method::LatExact, &w, Some(&d), 1, None).unwrap();
        let e = objective(&w, Some(&d), &exact.values);
        let brute = exhaustive_ternary(&w, &d);
        prop_assert!((e - brute).abs() <= 1e-5 * brute.max(1e-3), "exact {e} vs exhaustive {brute}");
        for other in [Method::LatApprox, Method::Twn] {
            let q = quantize(other, &w, Some(&d), 1, None).unwrap();
            let o = objective(&w, Some(&d), &q.values);
            prop_assert!(e <= o + 1e-6 * o.max(1e-3), "{other}: {o} < exact {e}");
        }
        prop_assert!(distinct(&exact.values) <= 3);
    }

    #[test]
    fn two_sided_ternary_is_never_worse_than_one_scale((w, d) in weights_and_curvature(12)) {
        let one = quantize(Method::LatExact, &w, Some(&d), 1, None).unwrap();
        let two = quantize(Method::Lat2Exact, &w, Some(&d), 1, None).unwrap();
        let (o1, o2) = (objective(&w, Some(&d), &one.values), objective(&w, Some(&d), &two.values));
        prop_assert!(o2 <= o1 + 1e-6 * o1.max(1e-3), "{o2} > {o1}");
        prop_assert!(distinct(&two.values) <= 3);
        prop_assert_eq!(two.scales.len(), 2);
    }

    #[test]
    fn every_method_keeps_to_its_levels(w in weights(64), groups in 1usize..4) {
        let n = w.len() - w.len() % groups;
        prop_assume!(n > 0);
        let w = &w[..n];
        for method in Method::all() {
            let q = quantize(method, w, None, groups, None).unwrap();
            prop_assert_eq!(q.values.len(), n);
            prop_assert_eq!(q.scales.len(), groups * method.scales_per_group());
            let per = n / groups;
            for g in 0..groups {
                let vals = &q.values[g * per..(g + 1) * per];
                let limit = match method {
                    m if m.binary() => 2,
                    Method::Laq { bits, .. } => (1usize << bits) - 1,
                    _ => 3,
                };
                prop_assert!(distinct(vals) <= limit, "{method}: {} values", distinct(vals));
            }
            for (i, (&c, &v)) in q.codes.iter().zip(&q.values).enumerate() {
                prop_assert!(c.unsigned_abs() as i32 <= method.max_code() as i32);
                if method.binary() {
                    prop_assert!(c != 0);
                }
                // A code never points against its weight's sign.
                prop_assert!(c == 0 || (c > 0) == (w[i] >= 0.0), "{method}");
                prop_assert!(v.is_finite());
            }
            prop_assert!(q.scales.iter().all(|s| *s >= 0.0));
        }
    }

    #[test]
    fn laq_never_loses_to_its_own_start((w, d) in weights_and_curvature(30), bits in 2u8..=4, log in any::<bool>()) {
        let method = Method::Laq { bits, log };
        let q = quantize(method, &w, Some(&d), 1, None).unwrap();
        // The scale is optimal for the codes it returns.
        let f = |a: f64| -> f64 {
            w.iter().zip(&d).zip(&q.codes).map(|((&w, &d), &c)| {
                d as f64 * (a * method.level(c) as f64 - w as f64).powi(2)
            }).sum()
        };
        let a = q.scales[0] as f64;
        for k in [-0.05, -0.01, 0.01, 0.05] {
            prop_assert!(f(a) <= f(a * (1.0 + k)) + 1e-9);
        }
        // And 2-bit LAQ with linear levels is ternary.
        if bits == 2 {
            prop_assert!(distinct(&q.values) <= 3);
        }
    }
}

#[test]
fn laq_levels_are_those_of_method_section_10() {
    let linear = Method::Laq {
        bits: 3,
        log: false,
    }
    .levels();
    let third = 1.0 / 3.0;
    assert_eq!(
        linear,
        vec![-1.0, -2.0 * third, -third, 0.0, third, 2.0 * third, 1.0]
    );
    let log = Method::Laq { bits: 3, log: true }.levels();
    assert_eq!(log, vec![-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0]);
    let four = Method::Laq { bits: 4, log: true }.levels();
    assert_eq!(four.len(), 15);
    assert_eq!(four[8], 2f32.powi(-6));
    assert_eq!(
        Method::Laq {
            bits: 2,
            log: false
        }
        .levels(),
        vec![-1.0, 0.0, 1.0]
    );
    assert_eq!(Method::Lab.levels(), vec![-1.0, 1.0]);
    assert_eq!(Method::Twn.levels(), vec![-1.0, 0.0, 1.0]);
}

#[test]
fn names_round_trip_and_bad_input_is_an_error() {
    for m in Method::all() {
        assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
    }
    for (long, short) in [
        ("lat-approx", Method::LatApprox),
        ("lat-exact", Method::LatExact),
        ("lat2-approx", Method::Lat2Approx),
        ("LAT2_EXACT", Method::Lat2Exact),
    ] {
        assert_eq!(long.parse::<Method>().unwrap(), short);
    }
    assert!("laq9".parse::<Method>().is_err());
    assert!("lqa".parse::<Method>().is_err());
    assert!(quantize(Method::Lab, &[f32::NAN], None, 1, None).is_err());
    assert!(quantize(Method::Lab, &[1.0, 2.0], Some(&[1.0]), 1, None).is_err());
    assert!(quantize(Method::Lab, &[1.0, 2.0], Some(&[1.0, -1.0]), 1, None).is_err());
    assert!(quantize(Method::Lab, &[1.0, 2.0, 3.0], None, 2, None).is_err());
}

#[test]
fn the_baselines_follow_their_definitions() {
    let w = [0.9f32, -0.2, 0.05, -0.7, 0.6, 0.3];
    let bc = quantize(Method::BinaryConnect, &w, None, 1, None).unwrap();
    assert_eq!(bc.values, vec![1.0, -1.0, 1.0, -1.0, 1.0, 1.0]);
    let tc = quantize(Method::TerConnect, &w, None, 1, None).unwrap();
    assert_eq!(tc.values, vec![1.0, 0.0, 0.0, -1.0, 1.0, 0.0]);
    // TWN: Δ = 0.7 · mean |W| = 0.7 · 0.4583 = 0.3208; α = mean(0.9, 0.7, 0.6).
    let twn = quantize(Method::Twn, &w, None, 1, None).unwrap();
    assert_eq!(twn.codes, vec![1, 0, 0, -1, 1, 0]);
    assert!((twn.scales[0] - 0.7333333).abs() < 1e-6);
    // Per-group scales: two rows, each its own α.
    let rows = quantize(Method::Bwn, &w, None, 2, None).unwrap();
    assert_eq!(rows.scales.len(), 2);
    assert!((rows.scales[0] - (0.9 + 0.2 + 0.05) / 3.0).abs() < 1e-6);
    // The warm start is used: LAT approximate from the previous codes.
    let warm = quantize(Method::LatApprox, &w, None, 1, Some(&twn)).unwrap();
    assert!(objective(&w, None, &warm.values) <= objective(&w, None, &twn.values) + 1e-9);
}

proptest! {
    #[test]
    fn sparse_quantization_keeps_the_budget_and_the_top_scores(
        (w, d) in weights_and_curvature(40),
        kappa in 0.05f64..1.0,
        per_channel in any::<bool>(),
    ) {
        let groups = if per_channel && w.len() % 2 == 0 { 2 } else { 1 };
        let score = curvature_score(&w, Some(&d)).unwrap();
        let keep = kept_count(kappa, w.len()).unwrap();
        prop_assert!(keep >= 1 && keep <= w.len());
        prop_assert!(keep as f64 <= (kappa * w.len() as f64).max(1.0));
        for method in Method::all() {
            let q = quantize_sparse(method, &w, Some(&d), groups, keep, &score, None).unwrap();
            let nonzero: Vec<usize> = (0..w.len()).filter(|&i| q.codes[i] != 0).collect();
            prop_assert!(nonzero.len() <= keep, "{method}: {} non-zeros > {keep}", nonzero.len());
            // Every non-zero is among the kept: its score is at least the
            // keep-th largest.
            let mut sorted = score.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let threshold = sorted[keep - 1];
            for &i in &nonzero {
                prop_assert!(score[i] >= threshold, "{method}: element {i} was not kept");
            }
            // Values follow codes and scales, zeros are exactly 0.
            for i in 0..w.len() {
                if q.codes[i] == 0 {
                    prop_assert_eq!(q.values[i], 0.0);
                }
            }
            let n = method.max_code() as usize;
            prop_assert!(distinct(&q.values) <= (2 * n + 1) * groups * method.scales_per_group());
            // The binary methods put ±α on every kept element.
            if method.binary() {
                prop_assert_eq!(nonzero.len(), keep);
            }
        }
    }

    #[test]
    fn the_full_budget_is_the_dense_quantizer((w, d) in weights_and_curvature(30)) {
        let score = curvature_score(&w, Some(&d)).unwrap();
        for method in Method::all() {
            let dense = quantize(method, &w, Some(&d), 1, None).unwrap();
            let sparse = quantize_sparse(method, &w, Some(&d), 1, w.len(), &score, None).unwrap();
            prop_assert_eq!(dense, sparse);
        }
    }

    #[test]
    fn sparse_lat_solves_the_kept_elements_exactly((w, d) in weights_and_curvature(12), kappa in 0.1f64..1.0) {
        // On the kept elements exact LAT equals the exhaustive search.
        let score = curvature_score(&w, Some(&d)).unwrap();
        let keep = kept_count(kappa, w.len()).unwrap();
        let q = quantize_sparse(Method::LatExact, &w, Some(&d), 1, keep, &score, None).unwrap();
        let mut order: Vec<usize> = (0..w.len()).collect();
        order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
        let kept: Vec<usize> = order[..keep].to_vec();
        let wk: Vec<f32> = kept.iter().map(|&i| w[i]).collect();
        let dk: Vec<f32> = kept.iter().map(|&i| d[i]).collect();
        let vk: Vec<f32> = kept.iter().map(|&i| q.values[i]).collect();
        let got = objective(&wk, Some(&dk), &vk);
        let best = exhaustive_ternary(&wk, &dk);
        prop_assert!(got <= best + 1e-6 * (1.0 + best), "{got} > {best}");
    }
}

#[test]
fn the_budget_schedule_falls_from_one_to_the_target() {
    assert_eq!(budget_at(0.1, 0.0, 4.0), 1.0);
    assert!((budget_at(0.1, 2.0, 4.0) - (0.1 + 0.9 * 0.125)).abs() < 1e-12);
    assert_eq!(budget_at(0.1, 4.0, 4.0), 0.1);
    assert_eq!(budget_at(0.1, 9.0, 4.0), 0.1);
    assert_eq!(budget_at(0.3, 0.0, 0.0), 0.3);
    let mut last = 1.0;
    for step in 0..=40 {
        let k = budget_at(0.05, step as f64 / 10.0, 4.0);
        assert!(k <= last && k >= 0.05);
        last = k;
    }
    assert!(kept_count(0.0, 10).is_err());
    assert!(kept_count(1.5, 10).is_err());
    assert_eq!(kept_count(0.01, 10).unwrap(), 1);
    assert_eq!(kept_count(0.5, 0).unwrap(), 0);
}

proptest! {
    /// METHOD §9: `α = max |W|`, levels `α·{−n … n}/n`, each weight on its
    /// nearest level, so at most `2^k − 1` distinct values (≤ 2^k).
    #[test]
    fn uniform_weights_sit_on_the_nearest_of_their_levels(w in weights(64), bits in 2u8..=8) {
        let m = Method::Uniform { bits };
        let q = quantize(m, &w, None, 1, None).unwrap();
        let alpha = w.iter().fold(0f32, |a, x| a.max(x.abs()));
        prop_assert_eq!(q.scales.clone(), vec![alpha]);
        let n = (1i32 << (bits - 1)) - 1;
        prop_assert!(distinct(&q.values) < 1usize << bits);
        for ((&x, &c), &v) in w.iter().zip(&q.codes).zip(&q.values) {
            prop_assert!((c as i32).abs() <= n);
            prop_assert_eq!(v, alpha * m.level(c));
            // No level is nearer (up to rounding of the level values).
            let step = alpha as f64 / n as f64;
            prop_assert!(((x - v) as f64).abs() <= step / 2.0 + 1e-6, "{} -> {}", x, v);
        }
    }

    /// A mask zeroes what it masks, binary codes included, and the scale is
    /// that of the kept weights alone.
    #[test]
    fn a_mask_zeroes_the_masked_weights(
        (w, kept) in (1usize..48).prop_flat_map(|n| (
            prop::collection::vec(-1.0f32..1.0, n),
            prop::collection::vec(any::<bool>(), n),
        )),
        bits in 1u8..=4,
    ) {
        let m = if bits == 1 { Method::Bwn } else { Method::Uniform { bits } };
        let q = quantize_masked(m, &w, None, 1, &kept, None).unwrap();
        let kept_w: Vec<f32> = w.iter().zip(&kept).filter(|(_, &k)| k).map(|(&x, _)| x).collect();
        for (i, &k) in kept.iter().enumerate() {
            if !k {
                prop_assert_eq!(q.codes[i], 0);
                prop_assert_eq!(q.values[i], 0.0);
            }
        }
        if !kept_w.is_empty() && kept.iter().any(|k| !k) {
            let alone = quantize(m, &kept_w, None, 1, None).unwrap();
            prop_assert_eq!(q.scales.clone(), alone.scales);
        }
    }
}

#[test]
fn uniform_names_and_widths() {
    for bits in 2..=8 {
        let m = Method::Uniform { bits };
        assert_eq!(m.to_string().parse::<Method>().unwrap(), m);
        assert!(!m.loss_aware() && !m.binary());
    }
    assert_eq!(
        "uniform-3".parse::<Method>().unwrap(),
        Method::Uniform { bits: 3 }
    );
    assert!("uniform1".parse::<Method>().is_err());
    assert!("uniform9".parse::<Method>().is_err());
    assert!("uniformx".parse::<Method>().is_err());
    // Two bits: ternary with threshold α/2.
    let q = quantize(
        Method::Uniform { bits: 2 },
        &[1.0, 0.49, -0.51, 0.0],
        None,
        1,
        None,
    )
    .unwrap();
    assert_eq!(q.codes, vec![1, 0, -1, 0]);
    assert!(quantize_masked(Method::Bwn, &[1.0], None, 1, &[true, false], None).is_err());
}

#[test]
fn the_vectorised_input_checks_say_what_the_direct_ones_say() {
    let edge = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    for &x in &edge {
        for &y in &edge {
            let v = [0.5, x, 2.0, y, 0.25];
            assert_eq!(
                super::all_finite(&v),
                v.iter().all(|x| x.is_finite()),
                "{x} {y}"
            );
            assert_eq!(
                super::all_finite_non_negative(&v),
                v.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{x} {y}"
            );
        }
    }
    assert!(super::all_finite(&[]) && super::all_finite_non_negative(&[]));
}
