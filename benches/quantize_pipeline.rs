//! Post-training quantization of a VGG-16-sized parameter set (15 M f32):
//! assign widths from the importances (sort + cluster), take the tensor
//! exponent, quantize with per-element widths, and bit-pack the non-zero
//! integers of every width. Target: ≤ 0.5 s on 2 cores with quantile splits
//! that prune about 90 % of the values.
//!
//! Run: `cargo bench --bench quantize_pipeline -- --warm-up-time 1 --measurement-time 5`
//! (`QGRAD_BENCH_N` overrides the number of values).

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use qgrad::cluster::{assign_widths, par_sort_f32, ClusterMethod};
use qgrad::fixed::{pack_signed, quantize_values, tensor_exponent, PRUNED};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const WIDTHS: [u8; 5] = [16, 8, 4, 2, 0];
const SEED: u64 = 2020;

fn value_count() -> usize {
    std::env::var("QGRAD_BENCH_N")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15_000_000)
}

/// Seeded synthetic weights (approximately normal, σ ≈ 0.05) and importances
/// (log-normal, heavy-tailed like accumulated |gradients|), generated in
/// fixed chunks so the data does not depend on the thread count.
fn synthetic(n: usize) -> (Vec<f32>, Vec<f32>) {
    const CHUNK: usize = 1 << 16;
    let chunks: Vec<(Vec<f32>, Vec<f32>)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ (c as u64).wrapping_mul(0x9E37_79B9));
            let len = CHUNK.min(n - c * CHUNK);
            let mut values = Vec::with_capacity(len);
            let mut importance = Vec::with_capacity(len);
            for _ in 0..len {
                // Irwin–Hall(4): mean 2, variance 1/3.
                let normal = |rng: &mut ChaCha8Rng| {
                    ((0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0) * 3f32.sqrt()
                };
                values.push(0.05 * normal(&mut rng));
                importance.push((1.5 * normal(&mut rng) - 6.0).exp());
            }
            (values, importance)
        })
        .collect();
    let mut values = Vec::with_capacity(n);
    let mut importance = Vec::with_capacity(n);
    for (v, a) in chunks {
        values.extend(v);
        importance.extend(a);
    }
    (values, importance)
}

/// Packed non-zero integers of one width, with their count.
struct PackedWidth {
    bits: u8,
    count: usize,
    bytes: Vec<u8>,
}

/// The pipeline under test; returns the packed groups.
fn pipeline(values: &[f32], importance: &[f32], method: &ClusterMethod) -> Vec<PackedWidth> {
    let widths = assign_widths(importance, &WIDTHS, method).expect("valid importances");
    let exponent = tensor_exponent(values).expect("finite values");
    let ints = quantize_values(values, &widths, exponent).expect("valid widths");
    pack_by_width(&ints, &widths)
}

fn pack_by_width(ints: &[i32], widths: &[u8]) -> Vec<PackedWidth> {
    WIDTHS
        .par_iter()
        .filter(|&&b| b != PRUNED)
        .map(|&bits| {
            let selected: Vec<i32> = ints
                .iter()
                .zip(widths)
                .filter(|&(&q, &w)| w == bits && q != 0)
                .map(|(&q, _)| q)
                .collect();
            PackedWidth {
                bits,
                count: selected.len(),
                bytes: pack_signed(&selected, u32::from(bits)),
            }
        })
        .collect()
}

/// One timed pass through every stage, printed once, to show where time goes.
fn breakdown(values: &[f32], importance: &[f32], method: &ClusterMethod) {
    let t = Instant::now();
    let mut sorted = importance.to_vec();
    par_sort_f32(&mut sorted);
    let sort = t.elapsed();
    drop(sorted);
    let t = Instant::now();
    let widths = assign_widths(importance, &WIDTHS, method).expect("valid importances");
    let assign = t.elapsed();
    let t = Instant::now();
    let exponent = tensor_exponent(values).expect("finite values");
    let ints = quantize_values(values, &widths, exponent).expect("valid widths");
    let quantize = t.elapsed();
    let t = Instant::now();
    let packed = pack_by_width(&ints, &widths);
    let pack = t.elapsed();
    let shares: Vec<String> = WIDTHS
        .iter()
        .map(|&b| {
            let n = widths.iter().filter(|&&w| w == b).count();
            format!("{b}b {:.1}%", 100.0 * n as f64 / widths.len() as f64)
        })
        .collect();
    let stored: Vec<String> = packed
        .iter()
        .map(|p| format!("{}b: {} nz / {} B", p.bits, p.count, p.bytes.len()))
        .collect();
    eprintln!(
        "[{method}] n={} sort {:.0} ms | assign_widths (incl. sort) {:.0} ms | exponent+quantize {:.0} ms | pack {:.0} ms\n  widths: {}\n  packed: {}",
        values.len(),
        sort.as_secs_f64() * 1e3,
        assign.as_secs_f64() * 1e3,
        quantize.as_secs_f64() * 1e3,
        pack.as_secs_f64() * 1e3,
        shares.join(", "),
        stored.join(", "),
    );
}

fn bench(c: &mut Criterion) {
    let n = value_count();
    let (values, importance) = synthetic(n);
    let quantiles = ClusterMethod::Quantiles {
        fractions: vec![0.01, 0.02, 0.03, 0.04, 0.90],
    };
    let methods = [
        ("quantiles", quantiles),
        ("log_kmeans", ClusterMethod::LogKMeans),
        ("kmeans", ClusterMethod::KMeans),
    ];
    let mut group = c.benchmark_group("quantize_pipeline");
    group.sample_size(10);
    for (name, method) in &methods {
        breakdown(&values, &importance, method);
        group.bench_function(format!("{name}_{n}"), |b| {
            b.iter(|| black_box(pipeline(black_box(&values), black_box(&importance), method)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
