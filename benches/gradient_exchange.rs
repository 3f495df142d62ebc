//! The per-step cost of the data-parallel gradient exchange (METHOD §12) on
//! one rank, for LeNet-5's 431,080 gradient elements: stochastic m-bit
//! encoding (with and without clipping), decoding two ranks' messages, and
//! the whole exchange of two in-process ranks against the f32 all-reduce.
//! The processor model is printed first: machines here differ day to day.
//!
//! cargo bench --bench gradient_exchange -- --warm-up-time 1 --measurement-time 3

mod common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgrad::collective::{
    exchange, ExchangeBuffers, GradientExchange, StochasticQuantizer, ThreadGroup,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ELEMENTS: usize = 431_080;

fn gradient(seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..ELEMENTS)
        .map(|_| rng.random_range(-1.0f32..1.0) * rng.random_range(0.0f32..0.01))
        .collect()
}

fn codec(c: &mut Criterion) {
    eprintln!("processor: {}", common::processor());
    let g = gradient(1);
    let mut group = c.benchmark_group("gradient codec");
    group.throughput(Throughput::Elements(ELEMENTS as u64));
    for (bits, clip) in [(2u8, None), (2, Some(2.5f32)), (3, Some(2.5)), (8, None)] {
        let q = StochasticQuantizer::new(bits, 512, clip).unwrap();
        let label = format!("{bits}-bit{}", if clip.is_some() { " clip" } else { "" });
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut bytes = Vec::new();
        group.bench_function(format!("encode {label}"), |b| {
            b.iter(|| {
                bytes.clear();
                q.encode(black_box(&g), &mut rng, &mut bytes);
            })
        });
        let mut out = vec![0.0f32; ELEMENTS];
        group.bench_function(format!("decode {label}"), |b| {
            b.iter(|| {
                q.decode_accumulate(black_box(&bytes), 0.5, 0, &mut out)
                    .unwrap()
            })
        });
    }
    group.finish();
}

/// One whole exchange on two thread ranks (both ranks' work per iteration:
/// each thread encodes, sends and decodes).
fn two_ranks(c: &mut Criterion) {
    let mut group = c.benchmark_group("exchange, 2 in-process ranks");
    group.throughput(Throughput::Elements(ELEMENTS as u64));
    for how in [
        GradientExchange::Float,
        GradientExchange::Quantized(StochasticQuantizer::new(2, 512, None).unwrap()),
        GradientExchange::Quantized(StochasticQuantizer::new(3, 512, Some(2.5)).unwrap()),
    ] {
        group.bench_function(how.describe(), |b| {
            b.iter_custom(|iters| {
                let ranks = ThreadGroup::ranks(2, Duration::from_secs(60));
                let times: Vec<Duration> = std::thread::scope(|s| {
                    let handles: Vec<_> = ranks
                        .into_iter()
                        .enumerate()
                        .map(|(r, mut rank)| {
                            s.spawn(move || {
                                let mut t = vec![gradient(r as u64)];
                                let mut rng = ChaCha8Rng::seed_from_u64(r as u64);
                                let mut buffers = ExchangeBuffers::default();
                                let start = std::time::Instant::now();
                                for _ in 0..iters {
                                    exchange(
                                        &mut rank,
                                        &how,
                                        &mut t,
                                        1.0,
                                        50.0,
                                        &mut rng,
                                        &mut buffers,
                                    )
                                    .unwrap();
                                }
                                start.elapsed()
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                times.into_iter().max().unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, codec, two_ranks);
criterion_main!(benches);
