//! The in-process group and the exchange on it: collectives are right,
//! waits are bounded, mismatched settings fail on every rank.

use std::time::Duration;

use qgrad_collective::{
    agree, exchange, Collective, CollectiveError, ExchangeBuffers, GradientExchange, Solo,
    StochasticQuantizer, ThreadGroup,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Runs `f` on each rank of a group of `n` threads; results in rank order.
fn on_ranks<T: Send>(n: usize, f: impl Fn(&mut dyn Collective) -> T + Sync) -> Vec<T> {
    let ranks = ThreadGroup::ranks(n, Duration::from_secs(20));
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut rank| {
                let f = &f;
                s.spawn(move || f(&mut rank))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn all_gather_and_all_reduce() {
    let out = on_ranks(3, |g| {
        let r = g.rank() as u8;
        let mut recv = Vec::new();
        g.all_gather(&[r, r + 10], &mut recv).unwrap();
        let mut sum = vec![g.rank() as f32, 1.0, -0.0];
        g.all_reduce_sum(&mut sum).unwrap();
        (recv, sum, g.traffic())
    });
    for (recv, sum, traffic) in out {
        assert_eq!(recv, vec![0, 10, 1, 11, 2, 12]);
        assert_eq!(sum[..2], [3.0, 3.0]);
        assert!(sum[2].is_sign_negative(), "-0 + -0 + -0 keeps its sign");
        assert_eq!(traffic.calls, 2);
        assert_eq!(traffic.bytes_sent, 2 + 12);
    }
}

#[test]
fn a_missing_rank_ends_in_a_timeout_and_a_departed_one_in_an_error() {
    let mut ranks = ThreadGroup::ranks(2, Duration::from_millis(100));
    let mut recv = Vec::new();
    let err = ranks[0].all_gather(&[1], &mut recv).unwrap_err();
    assert!(
        matches!(err, CollectiveError::Timeout { rank: 0, .. }),
        "{err}"
    );
    let mut ranks = ThreadGroup::ranks(2, Duration::from_secs(30));
    let second = ranks.pop().unwrap();
    let mut first = ranks.pop().unwrap();
    let waiter = std::thread::spawn(move || {
        let mut recv = Vec::new();
        first.all_gather(&[1], &mut recv)
    });
    std::thread::sleep(Duration::from_millis(50));
    drop(second);
    let err = waiter.join().unwrap().unwrap_err();
    assert!(
        matches!(err, CollectiveError::PeerLost { rank: 0, peer: 1 }),
        "{err}"
    );
}

#[test]
fn different_settings_fail_on_every_rank_naming_the_others() {
    let out = on_ranks(3, |g| {
        let mine = if g.rank() == 2 {
            "bits=2"
        } else {
            "bits=3 d=512"
        };
        agree(g, mine).map_err(|e| e.to_string())
    });
    assert!(out.iter().all(|r| r.is_err()));
    assert!(out[0].as_ref().unwrap_err().contains("rank 2: bits=2"));
    assert!(out[2]
        .as_ref()
        .unwrap_err()
        .contains("rank 0: bits=3 d=512"));
    let same = on_ranks(2, |g| agree(g, "same").is_ok());
    assert_eq!(same, vec![true, true]);
}

fn rank_gradients(rank: usize) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(rank as u64 + 100);
    use rand::Rng;
    vec![
        (0..1000).map(|_| rng.random_range(-1.0f32..1.0)).collect(),
        (0..7).map(|_| rng.random_range(-0.01f32..0.01)).collect(),
    ]
}

#[test]
fn the_float_exchange_is_the_weighted_mean_and_the_quantized_one_agrees_on_every_rank() {
    let weights = [3.0f32, 5.0];
    let float = on_ranks(2, |g| {
        let r = g.rank();
        let mut t = rank_gradients(r);
        let loss = exchange(
            g,
            &GradientExchange::Float,
            &mut t,
            r as f32 + 1.0,
            weights[r],
            &mut ChaCha8Rng::seed_from_u64(0),
            &mut ExchangeBuffers::default(),
        )
        .unwrap();
        (loss, t)
    });
    let (a, b) = (rank_gradients(0), rank_gradients(1));
    assert!((float[0].0 - (3.0 + 10.0) / 8.0).abs() < 1e-6);
    for k in 0..2 {
        for i in 0..a[k].len() {
            let want = (3.0 * a[k][i] + 5.0 * b[k][i]) / 8.0;
            assert!((float[0].1[k][i] - want).abs() < 1e-6);
        }
    }
    assert_eq!(float[0].1, float[1].1);
    for bits in [2u8, 3, 8] {
        let how = GradientExchange::Quantized(StochasticQuantizer::new(bits, 64, None).unwrap());
        let quantized = on_ranks(2, |g| {
            let r = g.rank();
            let mut t = rank_gradients(r);
            let mut rng = ChaCha8Rng::seed_from_u64(7 + r as u64);
            exchange(
                g,
                &how,
                &mut t,
                1.0,
                weights[r],
                &mut rng,
                &mut ExchangeBuffers::default(),
            )
            .unwrap();
            (t, g.traffic())
        });
        assert_eq!(
            quantized[0].0, quantized[1].0,
            "every rank applies the same update"
        );
        let sent = quantized[0].1.bytes_sent as usize;
        assert_eq!(sent, how.message_len(&[1000, 7]));
        // Within one level step of the float average (two ranks' rounding).
        let l = ((1u32 << (bits - 1)) - 1) as f32;
        let err = quantized[0].0[0]
            .iter()
            .zip(&float[0].1[0])
            .map(|(q, f)| (q - f).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= 1.0 / l + 1e-5, "{bits} bits: {err}");
    }
}

#[test]
fn two_bits_at_512_cross_the_wire_in_at_least_15_times_fewer_bytes() {
    let how = GradientExchange::Quantized(StochasticQuantizer::new(2, 512, None).unwrap());
    let sizes = [431_080usize, 500, 10, 1];
    let ratio = GradientExchange::Float.message_len(&sizes) as f64 / how.message_len(&sizes) as f64;
    assert!(ratio >= 15.0, "{ratio}");
    assert!((how.bits_per_element() - 2.0625).abs() < 1e-12);
}

#[test]
fn solo_is_the_identity_and_a_divergence_stops_every_rank() {
    let mut solo = Solo::default();
    let mut t = vec![vec![0.5f32, -1.0]];
    let loss = exchange(
        &mut solo,
        &GradientExchange::Float,
        &mut t,
        2.0,
        10.0,
        &mut ChaCha8Rng::seed_from_u64(0),
        &mut ExchangeBuffers::default(),
    )
    .unwrap();
    assert_eq!((loss, t[0].clone()), (2.0, vec![0.5, -1.0]));
    let how = GradientExchange::Quantized(StochasticQuantizer::new(4, 8, None).unwrap());
    let out = on_ranks(2, |g| {
        let mut t = vec![vec![if g.rank() == 1 { f32::INFINITY } else { 1.0 }; 3]];
        exchange(
            g,
            &how,
            &mut t,
            1.0,
            1.0,
            &mut ChaCha8Rng::seed_from_u64(0),
            &mut ExchangeBuffers::default(),
        )
        .map_err(|e| e.to_string())
    });
    for r in out {
        assert!(r.unwrap_err().contains("gradient of rank 1 is not finite"));
    }
}
