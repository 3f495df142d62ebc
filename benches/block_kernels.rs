//! METHOD §9's storage on the CPU: a 1024×1024 layer of 2-bit (ternary)
//! weights with 8×8 block sparsity at 4x and 8x compression, run from the
//! compressed file in layout 3 (the block mat-vec), the same tensor in
//! element CSR (the gather kernel), and the dense f32 product of its
//! dequantized weights in candle, for one sample and a batch of 128.
//! Target (#14): at 4x, the block kernel at least 2x faster than dense f32
//! at batch 1. The processor model is printed first.
//!
//! cargo bench --bench block_kernels -- --warm-up-time 1 --measurement-time 3

mod common;

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qgrad::csr::{
    encode_tensors, CompressedModel, EncodeOptions, FixedActivations, Layout, LayoutChoice,
    LevelKind, ScaledTensorData, TensorInput,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: usize = 1024;
const BLOCK: usize = 8;

/// Ternary codes keeping `1/compression` of the 8×8 blocks of every block
/// row (the same count per block row, METHOD §9), a third of the kept
/// codes zero.
fn codes(compression: usize, seed: u64) -> Vec<i8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let g = N / BLOCK;
    let keep = g / compression;
    let mut out = vec![0i8; N * N];
    for i in 0..g {
        let mut js: Vec<usize> = (0..g).collect();
        for k in 0..keep {
            let pick = rng.random_range(k..g);
            js.swap(k, pick);
        }
        for &j in &js[..keep] {
            for r in i * BLOCK..(i + 1) * BLOCK {
                for c in j * BLOCK..(j + 1) * BLOCK {
                    out[r * N + c] = [-1, 0, 1][rng.random_range(0..3)];
                }
            }
        }
    }
    out
}

fn model(codes: &[i8], layout: LayoutChoice) -> CompressedModel {
    let t = ScaledTensorData {
        name: "fc.weight",
        shape: &[N, N],
        codes,
        levels: LevelKind::Linear,
        max_code: 1,
        groups: 1,
        two_sided: false,
        scales: &[0.05],
    };
    let bytes = encode_tensors(
        &[TensorInput::Scaled(t)],
        &EncodeOptions {
            layout,
            ..Default::default()
        },
    )
    .expect("encode");
    CompressedModel::from_bytes(&bytes).expect("decode")
}

fn kernels(c: &mut Criterion) {
    eprintln!("processor: {}", common::processor());
    let device = Device::Cpu;
    let mut group = c.benchmark_group("block_kernels");
    for compression in [4usize, 8] {
        let codes = codes(compression, 42);
        let block = model(&codes, LayoutChoice::Block);
        let csr = model(&codes, LayoutChoice::Csr);
        assert_eq!(block.tensors[0].layout, Layout::Block);
        assert_eq!(csr.tensors[0].layout, Layout::Csr);
        let (bw, cw) = (&block.tensors[0], &csr.tensors[0]);
        bw.kernel(); // built once, outside the timing, as a deployment would
        cw.kernel();
        let wt = Tensor::from_vec(bw.dequantize(), (N, N), &device)
            .and_then(|t| t.t())
            .and_then(|t| t.contiguous())
            .expect("weight tensor");
        for batch in [1usize, 128] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let x: Vec<f32> = (0..batch * N)
                .map(|_| rng.random_range(0.0f32..1.0))
                .collect();
            // 2-bit activations (METHOD §9's k_a = 2), as the designs run.
            let xq = FixedActivations::quantize(&x, batch, N, 2).expect("quantize");
            let xt = Tensor::from_vec(xq.dequantize(), (batch, N), &device).expect("x tensor");
            let label = format!("{compression}x/batch{batch}");
            group.bench_with_input(BenchmarkId::new("block_layout3", &label), &xq, |b, xq| {
                b.iter(|| black_box(bw.matmul(black_box(xq)).expect("matmul")))
            });
            group.bench_with_input(BenchmarkId::new("element_csr", &label), &xq, |b, xq| {
                b.iter(|| black_box(cw.matmul(black_box(xq)).expect("matmul")))
            });
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
