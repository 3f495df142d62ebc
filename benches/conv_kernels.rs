//! Convolution kernels, qgrad-ops against candle's own, on layers of the
//! networks qgrad trains (batch 32 to keep a run short; the per-image cost is
//! what matters).
//!
//! - `conv_forward/*`: the forward pass alone.
//! - `conv_backward/*`: forward + backward of `Σ y ⊙ r` for the input and
//!   weight gradients (the input as a variable, as for every layer but the
//!   first) and the bias gradient.
//! - `batch_norm_forward/*`, `batch_norm_backward/*`: training-mode batch norm
//!   (`qgrad_ops::batch_norm_train`, one custom op on the CPU, against its
//!   composition from candle ops) on VGG-16 activations at batch 128, forward
//!   alone and forward + backward for the input, γ and β gradients.
//!
//! Short run: `cargo bench --bench conv_kernels -- --warm-up-time 1 --measurement-time 3`
//! (append a filter, e.g. `batch_norm`, before the options to run one group).

use candle_core::{Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

struct Layer {
    name: &'static str,
    batch: usize,
    in_channels: usize,
    size: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

const LAYERS: &[Layer] = &[
    Layer {
        name: "lenet5-conv2",
        batch: 32,
        in_channels: 20,
        size: 12,
        out_channels: 50,
        kernel: 5,
        stride: 1,
        padding: 0,
    },
    Layer {
        name: "alexnet-conv1",
        batch: 32,
        in_channels: 3,
        size: 32,
        out_channels: 64,
        kernel: 11,
        stride: 4,
        padding: 5,
    },
    Layer {
        name: "vgg-conv 128@16x16",
        batch: 32,
        in_channels: 128,
        size: 16,
        out_channels: 128,
        kernel: 3,
        stride: 1,
        padding: 1,
    },
    Layer {
        name: "vgg-conv 512@2x2",
        batch: 32,
        in_channels: 512,
        size: 2,
        out_channels: 512,
        kernel: 3,
        stride: 1,
        padding: 1,
    },
];

/// Deterministic values in [-1, 1).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

type ConvFn = fn(&Tensor, &Tensor, Option<&Tensor>, usize, usize) -> candle_core::Result<Tensor>;

const IMPLS: [(&str, ConvFn); 2] = [
    ("qgrad", qgrad_ops::conv2d),
    ("candle", qgrad_ops::reference::conv2d),
];

fn tensors(l: &Layer) -> (Var, Var, Var, Tensor) {
    let dev = Device::Cpu;
    let x = Tensor::from_vec(
        values(1, l.batch * l.in_channels * l.size * l.size),
        (l.batch, l.in_channels, l.size, l.size),
        &dev,
    )
    .unwrap();
    let w = Tensor::from_vec(
        values(2, l.out_channels * l.in_channels * l.kernel * l.kernel),
        (l.out_channels, l.in_channels, l.kernel, l.kernel),
        &dev,
    )
    .unwrap();
    let b = Tensor::from_vec(values(3, l.out_channels), l.out_channels, &dev).unwrap();
    let out = (l.size + 2 * l.padding - l.kernel) / l.stride + 1;
    let r = Tensor::from_vec(
        values(4, l.batch * l.out_channels * out * out),
        (l.batch, l.out_channels, out, out),
        &dev,
    )
    .unwrap();
    (
        Var::from_tensor(&x).unwrap(),
        Var::from_tensor(&w).unwrap(),
        Var::from_tensor(&b).unwrap(),
        r,
    )
}

fn conv_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_forward");
    group.sample_size(10);
    for l in LAYERS {
        let (x, w, b, _) = tensors(l);
        let x = x.as_tensor().detach();
        for (name, conv) in IMPLS {
            group.bench_function(BenchmarkId::new(name, l.name), |bench| {
                bench.iter(|| conv(&x, &w, Some(&b), l.stride, l.padding).unwrap())
            });
        }
    }
    group.finish();
}

fn conv_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("conv_backward");
    group.sample_size(10);
    for l in LAYERS {
        let (x, w, b, r) = tensors(l);
        for (name, conv) in IMPLS {
            group.bench_function(BenchmarkId::new(name, l.name), |bench| {
                bench.iter(|| {
                    let y = conv(&x, &w, Some(&b), l.stride, l.padding).unwrap();
                    (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
                })
            });
        }
    }
    group.finish();
}

/// Batch-norm inputs `[n, c, h, w]` of VGG-16 at batch 128: the first block
/// (largest activation) and the last (most channels, 2×2 planes).
const BN_SHAPES: &[(&str, [usize; 4])] = &[
    ("vgg-bn 64@32x32", [128, 64, 32, 32]),
    ("vgg-bn 512@2x2", [128, 512, 2, 2]),
];

type BatchNormFn =
    fn(&Tensor, &Tensor, &Tensor, f64) -> candle_core::Result<(Tensor, Tensor, Tensor)>;

const BN_IMPLS: [(&str, BatchNormFn); 2] = [
    ("qgrad", qgrad_ops::batch_norm_train),
    ("candle", qgrad_ops::reference::batch_norm_train),
];

fn bn_tensors(dims: [usize; 4]) -> (Var, Var, Var, Tensor) {
    let dev = Device::Cpu;
    let len = dims.iter().product();
    let t = |seed, len, shape: &[usize]| Tensor::from_vec(values(seed, len), shape, &dev).unwrap();
    (
        Var::from_tensor(&t(1, len, &dims)).unwrap(),
        Var::from_tensor(&t(2, dims[1], &[dims[1]])).unwrap(),
        Var::from_tensor(&t(3, dims[1], &[dims[1]])).unwrap(),
        t(4, len, &dims),
    )
}

fn batch_norm_forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_norm_forward");
    group.sample_size(10);
    for &(label, dims) in BN_SHAPES {
        let (x, gamma, beta, _) = bn_tensors(dims);
        let x = x.as_tensor().detach();
        for (name, bn) in BN_IMPLS {
            group.bench_function(BenchmarkId::new(name, label), |bench| {
                bench.iter(|| bn(&x, &gamma, &beta, 1e-5).unwrap())
            });
        }
    }
    group.finish();
}

fn batch_norm_backward(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch_norm_backward");
    group.sample_size(10);
    for &(label, dims) in BN_SHAPES {
        let (x, gamma, beta, r) = bn_tensors(dims);
        for (name, bn) in BN_IMPLS {
            group.bench_function(BenchmarkId::new(name, label), |bench| {
                bench.iter(|| {
                    let (y, _, _) = bn(&x, &gamma, &beta, 1e-5).unwrap();
                    (y * &r).unwrap().sum_all().unwrap().backward().unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    conv_forward,
    conv_backward,
    batch_norm_forward,
    batch_norm_backward
);
criterion_main!(benches);
