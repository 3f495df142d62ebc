//! Decode (and encode) throughput of a compressed LeNet-300-100 in MB/s of
//! file: 266,610 parameters, 90 % pruned, the rest at 16/8/4 bits.
//!
//! cargo bench --bench csr_decode -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgrad::csr::{encode, CompressedModel, EncodeOptions, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Owned {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
    widths: Vec<u8>,
}

fn lenet_300_100() -> Vec<Owned> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let layers = [(300, 784), (100, 300), (10, 100)];
    let mut out = Vec::new();
    for (i, (o, n)) in layers.into_iter().enumerate() {
        for (suffix, shape) in [("weight", vec![o, n]), ("bias", vec![o])] {
            let len: usize = shape.iter().product();
            let values = (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let widths = (0..len)
                .map(|_| match rng.random_range(0..100) {
                    0..90 => 0,
                    90..92 => 16,
                    92..96 => 8,
                    _ => 4,
                })
                .collect();
            out.push(Owned {
                name: format!("fc{}.{suffix}", i + 1),
                shape,
                values,
                widths,
            });
        }
    }
    out
}

fn decode_bench(c: &mut Criterion) {
    let owned = lenet_300_100();
    let tensors: Vec<TensorData> = owned
        .iter()
        .map(|t| TensorData {
            name: &t.name,
            shape: &t.shape,
            values: &t.values,
            widths: &t.widths,
            exponent: None,
        })
        .collect();
    let options = EncodeOptions::default();
    let bytes = encode(&tensors, &options).expect("encode");
    let mut group = c.benchmark_group("csr_file");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("decode_lenet_300_100", |b| {
        b.iter(|| black_box(CompressedModel::from_bytes(black_box(&bytes)).expect("decode")))
    });
    group.bench_function("encode_lenet_300_100", |b| {
        b.iter(|| black_box(encode(black_box(&tensors), &options).expect("encode")))
    });
    group.finish();
}

criterion_group!(benches, decode_bench);
criterion_main!(benches);
