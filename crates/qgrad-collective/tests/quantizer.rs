//! The stochastic gradient quantizer: unbiased, within its variance bound,
//! and its packed form round-trips for every width and bucket remainder.

use proptest::prelude::*;
use qgrad_collective::{CollectiveError, StochasticQuantizer};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The exact mean and variance of one element's `ĝ` (module docs of
/// `quantize`): `x = L·g/s`, `ĝ ∈ {⌊x⌋, ⌊x⌋+1}·s/L` with `P(up) = x − ⌊x⌋`.
fn moments(q: &StochasticQuantizer, g: f32, bound: Option<f32>, s: f32) -> (f64, f64) {
    let l = q.max_level() as f32;
    let g = bound.map_or(g, |b| g.clamp(-b, b));
    if s == 0.0 {
        return (0.0, 0.0);
    }
    let x = (g / s) * l;
    let p = f64::from(x - x.floor());
    let step = f64::from(s) / f64::from(l);
    (
        (f64::from(x.floor()) + p) * step,
        step * step * p * (1.0 - p),
    )
}

fn gradient() -> impl Strategy<Value = Vec<f32>> {
    prop::collection::vec((-1000i32..=1000).prop_map(|v| v as f32 / 997.0), 1..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// The mean over many draws is within five standard errors of the
    /// (clipped) gradient, and the sample variance is within its bound.
    #[test]
    fn unbiased_and_within_the_variance_bound(
        g in gradient(),
        bits in 2u8..=8,
        bucket in 1usize..17,
        clip in prop::option::of(1u8..4),
        seed in 0u64..1000,
    ) {
        let q = StochasticQuantizer::new(bits, bucket, clip.map(|c| f32::from(c) * 0.75)).unwrap();
        let draws = 3000;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sum = vec![0.0f64; g.len()];
        let mut sum_sq = vec![0.0f64; g.len()];
        for _ in 0..draws {
            let h = q.quantize(&g, &mut rng).unwrap();
            for (i, v) in h.iter().enumerate() {
                sum[i] += f64::from(*v);
                sum_sq[i] += f64::from(*v).powi(2);
            }
        }
        for (b, chunk) in g.chunks(bucket).enumerate() {
            let (bound, s) = q.bucket_scale(chunk);
            for (j, &gi) in chunk.iter().enumerate() {
                let i = b * bucket + j;
                let (mean, var) = moments(&q, gi, bound, s);
                let n = f64::from(draws);
                let got_mean = sum[i] / n;
                let got_var = sum_sq[i] / n - got_mean * got_mean;
                let tol = 5.0 * (var / n).sqrt() + 1e-6;
                prop_assert!((got_mean - mean).abs() <= tol,
                    "element {i}: mean {got_mean} vs {mean} (tolerance {tol})");
                // The exact variance never exceeds the bound; the sample
                // variance stays within sampling error of both.
                prop_assert!(var <= q.variance_bound(s) * (1.0 + 1e-5) + 1e-12);
                prop_assert!(got_var <= q.variance_bound(s) * 1.25 + 1e-9,
                    "element {i}: variance {got_var} above the bound {}", q.variance_bound(s));
                if let Some(b) = bound {
                    prop_assert!(b <= chunk.iter().fold(0.0f32, |m, v| m.max(v.abs())));
                }
            }
        }
    }

    /// Encoding then decoding gives levels `s·q/L` next to `g`, the length
    /// of the formula, and errors on any truncation.
    #[test]
    fn the_packed_form_round_trips(
        g in gradient(),
        bits in 2u8..=8,
        bucket in 1usize..50,
        seed in 0u64..1000,
    ) {
        let q = StochasticQuantizer::new(bits, bucket, None).unwrap();
        let mut bytes = Vec::new();
        q.encode(&g, &mut ChaCha8Rng::seed_from_u64(seed), &mut bytes);
        prop_assert_eq!(bytes.len(), q.encoded_len(g.len()));
        prop_assert_eq!(
            bytes.len(),
            4 * g.len().div_ceil(bucket) + (g.len() * bits as usize).div_ceil(8)
        );
        let mut out = vec![0.0f32; g.len()];
        q.decode_accumulate(&bytes, 1.0, 0, &mut out).unwrap();
        let l = q.max_level() as f32;
        for (b, chunk) in g.chunks(bucket).enumerate() {
            let (_, s) = q.bucket_scale(chunk);
            for (j, &gi) in chunk.iter().enumerate() {
                let h = out[b * bucket + j];
                prop_assert!((h - gi).abs() <= s / l * 1.0001 + 1e-7, "{h} vs {gi}");
                let level = h / s * l;
                if s > 0.0 {
                    prop_assert!((level - level.round()).abs() < 1e-3);
                }
            }
        }
        // The same generator state gives the same bytes.
        let mut again = Vec::new();
        q.encode(&g, &mut ChaCha8Rng::seed_from_u64(seed), &mut again);
        prop_assert_eq!(&again, &bytes);
        for cut in [1usize, bytes.len()] {
            let short = &bytes[..bytes.len() - cut];
            let mut out = vec![0.0f32; g.len()];
            let truncated = matches!(
                q.decode_accumulate(short, 1.0, 0, &mut out),
                Err(CollectiveError::Truncated { .. })
            );
            prop_assert!(truncated);
        }
    }
}

#[test]
fn every_width_and_remainder_round_trips_exactly_at_the_levels() {
    // Values on the grid are sent as themselves (p = 0 up to rounding: no randomness).
    for bits in 2u8..=8 {
        let q = StochasticQuantizer::new(bits, 7, None).unwrap();
        let l = q.max_level() as i32;
        for n in 1..=22 {
            let g: Vec<f32> = (0..n)
                .map(|i| ((i * 5) % (2 * l + 1) - l) as f32 / l as f32)
                .collect();
            // Every bucket's max |g| must be 1 for the levels to be k/L: set it.
            let mut g = g;
            for chunk in g.chunks_mut(7) {
                chunk[0] = 1.0;
            }
            let h = q
                .quantize(&g, &mut ChaCha8Rng::seed_from_u64(n as u64))
                .unwrap();
            for (a, b) in h.iter().zip(&g) {
                // (s/L)·q and q/L differ in the last bit; a level step is >= 1/127.
                assert!(
                    (a - b).abs() <= 1e-6,
                    "{bits} bits, {n} elements: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn zero_and_non_finite_buckets() {
    let q = StochasticQuantizer::new(3, 4, Some(2.0)).unwrap();
    let h = q
        .quantize(&[0.0; 9], &mut ChaCha8Rng::seed_from_u64(1))
        .unwrap();
    assert_eq!(h, vec![0.0; 9]);
    // A one-element bucket (σ = 0) is not clipped away.
    let h = q
        .quantize(
            &[0.5, 0.5, 0.5, 0.5, -0.3],
            &mut ChaCha8Rng::seed_from_u64(1),
        )
        .unwrap();
    assert_eq!(h, vec![0.5, 0.5, 0.5, 0.5, -0.3]);
    let mut bytes = Vec::new();
    q.encode(
        &[1.0, f32::NAN, 0.0, 2.0, 1.0],
        &mut ChaCha8Rng::seed_from_u64(1),
        &mut bytes,
    );
    let mut out = vec![0.0; 5];
    assert!(matches!(
        q.decode_accumulate(&bytes, 1.0, 3, &mut out),
        Err(CollectiveError::NonFinite { rank: 3 })
    ));
}

#[test]
fn clipping_bounds_every_value_by_c_sigma() {
    let q = StochasticQuantizer::new(4, 64, Some(2.0)).unwrap();
    let mut g: Vec<f32> = (0..64)
        .map(|i| ((i * 37) % 19) as f32 / 100.0 - 0.09)
        .collect();
    g[5] = 40.0; // one outlier
    let (bound, s) = q.bucket_scale(&g);
    let b = bound.expect("the outlier is clipped");
    assert_eq!(s, b);
    assert!(b < 40.0);
    let h = q.quantize(&g, &mut ChaCha8Rng::seed_from_u64(2)).unwrap();
    assert!(h.iter().all(|v| v.abs() <= b * 1.0001));
}

#[test]
fn bad_settings_are_errors() {
    for (bits, bucket, clip) in [
        (1u8, 8usize, None),
        (9, 8, None),
        (3, 0, None),
        (3, 8, Some(0.0)),
        (3, 8, Some(f32::NAN)),
    ] {
        assert!(matches!(
            StochasticQuantizer::new(bits, bucket, clip),
            Err(CollectiveError::InvalidQuantizer(_))
        ));
    }
}

#[test]
fn a_code_above_the_levels_is_an_error() {
    let q = StochasticQuantizer::new(2, 4, None).unwrap();
    // One scale, then four 2-bit codes all 3 (above 2L = 2).
    let mut bytes = 1.0f32.to_le_bytes().to_vec();
    bytes.push(0xff);
    let mut out = vec![0.0; 4];
    assert!(matches!(
        q.decode_accumulate(&bytes, 1.0, 1, &mut out),
        Err(CollectiveError::BadCode {
            rank: 1,
            code: 3,
            max: 2
        })
    ));
}
