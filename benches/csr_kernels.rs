//! Sparse fixed-point kernels from a compressed file versus dense f32 candle
//! matmul, on a LeNet-300-100 first layer (300×784) at 90 % and 97 %
//! sparsity, for one sample (mat-vec) and a batch of 128 (mat-mat), with
//! 8-bit activations and with 16-bit ones.
//!
//! cargo bench --bench csr_kernels -- --warm-up-time 1 --measurement-time 3
//!
//! The processor model is printed first.

mod common;

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qgrad::csr::{encode, CompressedModel, EncodeOptions, FixedActivations, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ROWS: usize = 300;
const COLS: usize = 784;

/// A 300×784 weight with the given fraction of pruned elements; the rest are
/// 8-bit (two thirds) or 4-bit, away from zero so that they stay non-zero.
fn layer(sparsity: f64, seed: u64) -> (Vec<f32>, CompressedModel) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..ROWS * COLS)
        .map(|_| {
            let m = rng.random_range(0.25f32..1.0);
            if rng.random_bool(0.5) {
                m
            } else {
                -m
            }
        })
        .collect();
    let widths: Vec<u8> = (0..ROWS * COLS)
        .map(|_| {
            if rng.random_bool(sparsity) {
                0
            } else if rng.random_bool(2.0 / 3.0) {
                8
            } else {
                4
            }
        })
        .collect();
    let bytes = encode(
        &[TensorData {
            name: "fc1.weight",
            shape: &[ROWS, COLS],
            values: &values,
            widths: &widths,
            exponent: None,
        }],
        &EncodeOptions::default(),
    )
    .expect("encode");
    let model = CompressedModel::from_bytes(&bytes).expect("decode");
    let dense = model.tensors[0].dequantize();
    (dense, model)
}

fn kernels(c: &mut Criterion) {
    eprintln!("processor: {}", common::processor());
    let device = Device::Cpu;
    let mut group = c.benchmark_group("csr_kernels");
    for sparsity in [0.90, 0.97] {
        let (dense, model) = layer(sparsity, 42);
        let w = &model.tensors[0];
        w.kernel(); // built once, outside the timing, as a deployment would
                    // Dense baseline: y = x · Wᵀ with Wᵀ materialised contiguous.
        let wt = Tensor::from_vec(dense, (ROWS, COLS), &device)
            .and_then(|t| t.t())
            .and_then(|t| t.contiguous())
            .expect("weight tensor");
        for batch in [1usize, 128] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let x: Vec<f32> = (0..batch * COLS)
                .map(|_| rng.random_range(0.0f32..1.0))
                .collect();
            let xq = FixedActivations::quantize(&x, batch, COLS, 8).expect("quantize");
            let xt = Tensor::from_vec(x.clone(), (batch, COLS), &device).expect("x tensor");
            let label = format!("{}%/batch{batch}", (sparsity * 100.0).round());
            group.bench_with_input(BenchmarkId::new("sparse_fixed", &label), &xq, |b, xq| {
                b.iter(|| black_box(w.matmul(black_box(xq)).expect("matmul")))
            });
            // 16-bit activations, the CLI's default (`--act-bits 16`): the
            // sums need f64 accumulators.
            let xq16 = FixedActivations::quantize(&x, batch, COLS, 16).expect("quantize");
            group.bench_with_input(
                BenchmarkId::new("sparse_fixed_a16", &label),
                &xq16,
                |b, xq| b.iter(|| black_box(w.matmul(black_box(xq)).expect("matmul"))),
            );
            group.bench_with_input(
                BenchmarkId::new("sparse_fixed_incl_quantize", &label),
                &x,
                |b, x| {
                    b.iter(|| {
                        let xq = FixedActivations::quantize(black_box(x), batch, COLS, 8)
                            .expect("quantize");
                        black_box(w.matmul(&xq).expect("matmul"))
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new("dense_candle_f32", &label),
                &xt,
                |b, xt| b.iter(|| black_box(xt.matmul(black_box(&wt)).expect("candle matmul"))),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, kernels);
criterion_main!(benches);
