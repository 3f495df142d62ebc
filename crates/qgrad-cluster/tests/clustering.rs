//! Tests of the sort, the exact k-means and the width assignment.

use proptest::prelude::*;
use qgrad_cluster::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn sse(values: &[f64]) -> f64 {
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    values.iter().map(|x| (x - mean) * (x - mean)).sum()
}

/// Minimum SSE over every split of `sorted` into at most `k` contiguous,
/// non-empty groups (ties may be split here: the optimum must not need it).
fn brute_force(sorted: &[f64], k: usize) -> f64 {
    fn rec(rest: &[f64], k: usize) -> f64 {
        if rest.is_empty() {
            return 0.0;
        }
        if k == 1 {
            return sse(rest);
        }
        (1..=rest.len())
            .map(|cut| sse(&rest[..cut]) + rec(&rest[cut..], k - 1))
            .fold(f64::INFINITY, f64::min)
    }
    rec(sorted, k)
}

fn check_structure(sorted: &[f64], k: usize, c: &Clustering) {
    let distinct = 1 + sorted.windows(2).filter(|w| w[0] != w[1]).count();
    assert_eq!(c.starts.len(), k.min(distinct));
    assert_eq!(c.centres.len(), c.starts.len());
    assert_eq!(c.starts[0], 0);
    for w in c.starts.windows(2) {
        assert!(w[0] < w[1]);
    }
    for w in c.centres.windows(2) {
        assert!(w[0] < w[1]);
    }
    for &s in &c.starts[1..] {
        assert!(sorted[s - 1] < sorted[s], "tie split at {s}");
    }
}

#[test]
fn ckmeans_known_example() {
    let data = [1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 30.0];
    let c = ckmeans_1d(&data, 3).unwrap();
    assert_eq!(c.starts, vec![0, 3, 6]);
    assert_eq!(c.centres, vec![2.0, 11.0, 30.0]);
    assert!((c.withinss - 4.0).abs() < 1e-12);
    let one = ckmeans_1d(&data, 1).unwrap();
    assert_eq!(one.starts, vec![0]);
    assert!((one.withinss - sse(&data)).abs() < 1e-9);
}

#[test]
fn ckmeans_edge_cases() {
    assert_eq!(ckmeans_1d(&[], 3).unwrap().starts, Vec::<usize>::new());
    assert_eq!(ckmeans_1d(&[1.0], 0), Err(ClusterError::ZeroClusters(0)));
    assert_eq!(
        ckmeans_1d(&[1.0, 0.5], 2),
        Err(ClusterError::NotSorted { index: 1 })
    );
    assert!(matches!(
        ckmeans_1d(&[1.0, f64::NAN], 2),
        Err(ClusterError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        ckmeans_1d(&[f64::NEG_INFINITY, 1.0], 2),
        Err(ClusterError::NonFinite { index: 0, .. })
    ));
    // Fewer distinct values than clusters: one cluster per value.
    let c = ckmeans_1d(&[2.0, 2.0, 5.0, 5.0, 5.0], 4).unwrap();
    assert_eq!(c.starts, vec![0, 2]);
    assert_eq!(c.centres, vec![2.0, 5.0]);
    assert_eq!(c.withinss, 0.0);
    let constant = ckmeans_1d(&[3.0; 6], 3).unwrap();
    assert_eq!(constant.starts, vec![0]);
}

#[test]
fn par_sort_matches_total_order_sort() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for &n in &[0usize, 1, 7, 1000, 40_000, 300_000] {
        let mut values: Vec<f32> = (0..n)
            .map(|i| match i % 13 {
                0 => 0.0,
                1 => -0.0,
                2 => f32::NAN,
                3 => -f32::NAN,
                4 => f32::INFINITY,
                5 => (rng.random::<f32>() * 8.0).round(), // duplicates
                6 => f32::from_bits(rng.random::<u32>()), // any pattern
                _ => (rng.random::<f32>() - 0.5) * 1e3,
            })
            .collect();
        let mut expected = values.clone();
        expected.sort_by(f32::total_cmp);
        par_sort_f32(&mut values);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&values), bits(&expected), "n = {n}");
    }
    // Input concentrated in one most-significant digit bucket.
    let mut narrow: Vec<f32> = (0..100_000)
        .map(|i| 1.0 + (i % 977) as f32 * 1e-6)
        .collect();
    let mut expected = narrow.clone();
    expected.sort_by(f32::total_cmp);
    par_sort_f32(&mut narrow);
    assert_eq!(narrow, expected);
}

#[test]
fn parse_and_display_methods() {
    assert_eq!(
        "kmeans".parse::<ClusterMethod>().unwrap(),
        ClusterMethod::KMeans
    );
    assert_eq!(
        " Log-KMeans ".parse::<ClusterMethod>().unwrap(),
        ClusterMethod::LogKMeans
    );
    let q: ClusterMethod = "quantiles:0.05,0.15,0.3,0.5".parse().unwrap();
    assert_eq!(
        q,
        ClusterMethod::Quantiles {
            fractions: vec![0.05, 0.15, 0.3, 0.5]
        }
    );
    for m in [ClusterMethod::KMeans, ClusterMethod::LogKMeans, q] {
        assert_eq!(m.to_string().parse::<ClusterMethod>().unwrap(), m);
    }
    assert!(matches!(
        "kmedians".parse::<ClusterMethod>(),
        Err(ClusterError::Parse { .. })
    ));
    assert!(matches!(
        "quantiles:0.5,x".parse::<ClusterMethod>(),
        Err(ClusterError::Parse { .. })
    ));
    assert!(matches!(
        "quantiles:0.5,0.6".parse::<ClusterMethod>(),
        Err(ClusterError::BadFractions { .. })
    ));
    assert!(matches!(
        "quantiles:1.5,-0.5".parse::<ClusterMethod>(),
        Err(ClusterError::BadFractions { .. })
    ));
    assert!(matches!(
        "quantiles:".parse::<ClusterMethod>(),
        Err(ClusterError::Parse { .. })
    ));
}

#[test]
fn assign_widths_rejects_bad_input() {
    let km = ClusterMethod::KMeans;
    assert_eq!(
        assign_widths(&[1.0], &[8, 8], &km),
        Err(ClusterError::BadWidths(vec![8, 8]))
    );
    assert_eq!(
        assign_widths(&[1.0], &[4, 8], &km),
        Err(ClusterError::BadWidths(vec![4, 8]))
    );
    assert_eq!(
        assign_widths(&[1.0], &[], &km),
        Err(ClusterError::BadWidths(vec![]))
    );
    assert!(matches!(
        assign_widths(&[1.0, f32::NAN], &[8, 0], &km),
        Err(ClusterError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        assign_widths(&[f32::INFINITY], &[8, 0], &ClusterMethod::LogKMeans),
        Err(ClusterError::NonFinite { index: 0, .. })
    ));
    assert!(matches!(
        assign_widths(&[1.0, -1.0], &[8, 0], &ClusterMethod::LogKMeans),
        Err(ClusterError::NegativeImportance { index: 1, .. })
    ));
    let q = ClusterMethod::Quantiles {
        fractions: vec![0.5, 0.5],
    };
    assert!(matches!(
        assign_widths(&[1.0], &[16, 8, 0], &q),
        Err(ClusterError::BadFractions { .. })
    ));
    let q = ClusterMethod::Quantiles {
        fractions: vec![0.5, f64::NAN],
    };
    assert!(matches!(
        assign_widths(&[1.0], &[16, 0], &q),
        Err(ClusterError::BadFractions { .. })
    ));
    assert_eq!(assign_widths(&[], &[8, 0], &km).unwrap(), Vec::<u8>::new());
}

#[test]
fn assign_widths_examples() {
    let widths = [16u8, 8, 4, 2, 0];
    let a = [0.1f32, 5.0, 0.11, 5.2, 0.09, 2.0, 0.0];
    let w = assign_widths(&a, &[16, 4, 0], &ClusterMethod::KMeans).unwrap();
    assert_eq!(w, vec![0, 16, 0, 16, 0, 4, 0]);
    // Fewer distinct values than widths: the highest widths are used.
    let w = assign_widths(&[1.0, 2.0, 1.0, 2.0], &widths, &ClusterMethod::KMeans).unwrap();
    assert_eq!(w, vec![8, 16, 8, 16]);
    // Constant importance (including all-zero A): everything gets widths[0].
    for m in [
        ClusterMethod::KMeans,
        ClusterMethod::LogKMeans,
        ClusterMethod::Quantiles {
            fractions: vec![0.1, 0.2, 0.3, 0.2, 0.2],
        },
    ] {
        assert_eq!(assign_widths(&[0.0; 5], &widths, &m).unwrap(), vec![16; 5]);
        assert_eq!(assign_widths(&[3.5; 4], &widths, &m).unwrap(), vec![16; 4]);
    }
    // -0.0 and +0.0 are the same importance.
    let w = assign_widths(&[-0.0, 0.0, 1.0], &[8, 0], &ClusterMethod::KMeans).unwrap();
    assert_eq!(w, vec![0, 0, 8]);
    // Log k-means separates orders of magnitude that plain k-means lumps together.
    let a = [1e-6f32, 1.1e-6, 1e-3, 1.1e-3, 1.0, 1.1];
    let plain = assign_widths(&a, &[8, 4, 0], &ClusterMethod::KMeans).unwrap();
    let log = assign_widths(&a, &[8, 4, 0], &ClusterMethod::LogKMeans).unwrap();
    assert_eq!(log, vec![0, 0, 4, 4, 8, 8]);
    assert_eq!(plain[0], plain[2]);
    // Zeros (no gradient ever) sit far below everything in log space.
    let w = assign_widths(
        &[0.0, 0.0, 1e-9, 2e-9, 1.0],
        &[8, 4, 0],
        &ClusterMethod::LogKMeans,
    )
    .unwrap();
    assert_eq!(w, vec![0, 0, 4, 4, 8]);
}

#[test]
fn quantiles_give_requested_shares() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let a: Vec<f32> = (0..1000).map(|_| rng.random::<f32>()).collect();
    let distinct = {
        let mut s = a.clone();
        s.sort_by(f32::total_cmp);
        s.dedup();
        s.len()
    };
    assert_eq!(distinct, 1000);
    let widths = [16u8, 8, 4, 0];
    let m = ClusterMethod::Quantiles {
        fractions: vec![0.05, 0.15, 0.3, 0.5],
    };
    let w = assign_widths(&a, &widths, &m).unwrap();
    let count = |b| w.iter().filter(|&&x| x == b).count();
    assert_eq!(
        [count(16), count(8), count(4), count(0)],
        [50, 150, 300, 500]
    );
    // The 50 highest importances got 16 bits.
    let mut order: Vec<usize> = (0..a.len()).collect();
    order.sort_by(|&i, &j| a[j].total_cmp(&a[i]));
    assert!(order[..50].iter().all(|&i| w[i] == 16));
    // A zero fraction leaves its width unused.
    let m = ClusterMethod::Quantiles {
        fractions: vec![0.1, 0.0, 0.9],
    };
    let w = assign_widths(&a, &[16, 8, 0], &m).unwrap();
    assert_eq!(w.iter().filter(|&&x| x == 8).count(), 0);
    assert_eq!(w.iter().filter(|&&x| x == 16).count(), 100);
}

#[test]
fn quantile_boundary_moves_out_of_ties() {
    // Ten values: 0,1,1,1,1,1,1,2,3,4; the run of 1s occupies positions 1..7.
    let a = [0.0f32, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0];
    let m = ClusterMethod::Quantiles {
        fractions: vec![0.5, 0.5],
    };
    let w = assign_widths(&a, &[8, 0], &m).unwrap();
    // Boundary at 5 is inside the run 1..7; 7 is nearer (2 < 4): the 1s are low.
    assert_eq!(w, vec![0, 0, 0, 0, 0, 0, 0, 8, 8, 8]);
    let m = ClusterMethod::Quantiles {
        fractions: vec![0.7, 0.3],
    };
    // Boundary at 3: start 1 is nearer (2 < 4): the 1s are high.
    let w = assign_widths(&a, &[8, 0], &m).unwrap();
    assert_eq!(w, vec![0, 8, 8, 8, 8, 8, 8, 8, 8, 8]);
}

fn data_with_ties() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(
        prop_oneof![(0i32..8).prop_map(f64::from), -50.0f64..50.0],
        1..10,
    )
    .prop_map(|mut v| {
        v.sort_by(f64::total_cmp);
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn ckmeans_equals_brute_force(sorted in data_with_ties(), k in 1usize..5) {
        let c = ckmeans_1d(&sorted, k).unwrap();
        check_structure(&sorted, k, &c);
        let best = brute_force(&sorted, k);
        prop_assert!((c.withinss - best).abs() <= 1e-9 * (1.0 + best), "ckmeans {} brute {}", c.withinss, best);
        // The reported SSE is that of the reported clusters.
        let mut total = 0.0;
        for (ci, &s) in c.starts.iter().enumerate() {
            let e = c.starts.get(ci + 1).copied().unwrap_or(sorted.len());
            total += sse(&sorted[s..e]);
            let mean = sorted[s..e].iter().sum::<f64>() / (e - s) as f64;
            prop_assert!((mean - c.centres[ci]).abs() <= 1e-9 * (1.0 + mean.abs()));
        }
        prop_assert!((total - c.withinss).abs() <= 1e-9 * (1.0 + total));
    }

    #[test]
    fn assignment_is_monotone_and_keeps_ties(
        raw in prop::collection::vec(prop_oneof![(0u8..6).prop_map(f32::from), 0.0f32..100.0, (0.0f32..1.0).prop_map(|x| x * x * x * 1e-3)], 0..60),
        method in prop_oneof![
            Just(ClusterMethod::KMeans),
            Just(ClusterMethod::LogKMeans),
            Just(ClusterMethod::Quantiles { fractions: vec![0.1, 0.2, 0.3, 0.4] }),
            Just(ClusterMethod::Quantiles { fractions: vec![0.0, 0.5, 0.0, 0.5] }),
        ],
    ) {
        let widths = [16u8, 8, 2, 0];
        let w = assign_widths(&raw, &widths, &method).unwrap();
        prop_assert_eq!(w.len(), raw.len());
        for i in 0..raw.len() {
            prop_assert!(widths.contains(&w[i]));
            for j in 0..raw.len() {
                if raw[i] == raw[j] {
                    prop_assert_eq!(w[i], w[j]);
                } else if raw[i] < raw[j] {
                    prop_assert!(w[i] <= w[j], "{} < {} but width {} > {}", raw[i], raw[j], w[i], w[j]);
                }
            }
        }
        // The most important element always gets the most bits.
        if let Some(max) = raw.iter().copied().reduce(f32::max) {
            let i = raw.iter().position(|&x| x == max).unwrap();
            if !matches!(method, ClusterMethod::Quantiles { .. }) {
                prop_assert_eq!(w[i], widths[0]);
            }
        }
    }

    #[test]
    fn kmeans_assignment_matches_ckmeans(raw in prop::collection::vec(0.0f32..10.0, 1..40)) {
        let widths = [16u8, 8, 4];
        let w = assign_widths(&raw, &widths, &ClusterMethod::KMeans).unwrap();
        let mut sorted: Vec<f64> = raw.iter().map(|&x| f64::from(x)).collect();
        sorted.sort_by(f64::total_cmp);
        let c = ckmeans_1d(&sorted, 3).unwrap();
        let k = c.starts.len();
        for (i, &a) in raw.iter().enumerate() {
            let cluster = c.starts.iter().rposition(|&s| sorted[s] <= f64::from(a)).unwrap();
            prop_assert_eq!(w[i], widths[k - 1 - cluster]);
        }
    }

    #[test]
    fn log_kmeans_is_scale_invariant(raw in prop::collection::vec(0.0f32..10.0, 1..40), p in -10i32..10) {
        let scale = 2f32.powi(p);
        let scaled: Vec<f32> = raw.iter().map(|&x| x * scale).collect();
        let widths = [8u8, 4, 0];
        prop_assert_eq!(
            assign_widths(&raw, &widths, &ClusterMethod::LogKMeans).unwrap(),
            assign_widths(&scaled, &widths, &ClusterMethod::LogKMeans).unwrap()
        );
    }
}

#[test]
fn large_input_uses_radix_sort_and_parallel_dp() {
    // Big enough for the radix sort and the parallel divide and conquer.
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let a: Vec<f32> = (0..200_000)
        .map(|_| (rng.random::<f32>() * 6.0 - 3.0).exp())
        .collect();
    let widths = [16u8, 8, 4, 2, 0];
    let w = assign_widths(&a, &widths, &ClusterMethod::LogKMeans).unwrap();
    let mut pairs: Vec<(f32, u8)> = a.iter().copied().zip(w.iter().copied()).collect();
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
    assert!(pairs.windows(2).all(|p| p[0].1 <= p[1].1));
    // log of a log-uniform sample is uniform: five clusters of about equal size.
    for &b in &widths {
        let share = w.iter().filter(|&&x| x == b).count() as f64 / a.len() as f64;
        assert!((share - 0.2).abs() < 0.03, "width {b}: share {share}");
    }
    // Optimality at scale (brute force is out of reach): no single-element
    // move of a boundary lowers the SSE.
    let mut sorted: Vec<f64> = a.iter().map(|&x| f64::from(x.ln())).collect();
    sorted.sort_by(f64::total_cmp);
    let c = ckmeans_1d(&sorted, 5).unwrap();
    let mut tweaked = c.clone();
    // Moving any boundary by one element must not decrease the SSE.
    for b in 1..c.starts.len() {
        for delta in [-1isize, 1] {
            tweaked.starts = c.starts.clone();
            tweaked.starts[b] = (c.starts[b] as isize + delta) as usize;
            let mut total = 0.0;
            for (ci, &s) in tweaked.starts.iter().enumerate() {
                let e = tweaked.starts.get(ci + 1).copied().unwrap_or(sorted.len());
                total += sse(&sorted[s..e]);
            }
            assert!(
                total >= c.withinss * (1.0 - 1e-12),
                "boundary {b} moved by {delta}"
            );
        }
    }
}

#[test]
fn runs_of_ties_across_chunks_cluster_like_one_sequential_pass() {
    // 300,000 values from 700 distinct ones: every run of ties crosses the
    // 65,536-value chunks of the parallel merge somewhere. The widths must be
    // those of `ckmeans_1d` on the whole sorted data (its own sequential
    // merge of ties).
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let raw: Vec<f32> = (0..300_000)
        .map(|_| f32::from(rng.random_range(0u16..700)).powi(2) * 0.25)
        .collect();
    let widths = [16u8, 8, 4, 2, 0];
    let w = assign_widths(&raw, &widths, &ClusterMethod::KMeans).unwrap();
    let mut sorted: Vec<f64> = raw.iter().map(|&x| f64::from(x)).collect();
    sorted.sort_by(f64::total_cmp);
    let c = ckmeans_1d(&sorted, 5).unwrap();
    assert_eq!(c.starts.len(), 5);
    for (i, &a) in raw.iter().enumerate() {
        let cluster = c
            .starts
            .iter()
            .rposition(|&s| sorted[s] <= f64::from(a))
            .unwrap();
        assert_eq!(w[i], widths[4 - cluster], "value {a}");
    }
}
