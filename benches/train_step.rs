//! Training throughput and the cost of the accumulated-gradient bookkeeping.
//!
//! For LeNet-300-100 and LeNet-5 at batch 128 on the CPU:
//! - `step/<arch>`: one full training step (forward, cross-entropy, backward,
//!   `A += |g|`, SGD with momentum); throughput in images/s.
//! - `accumulate/<arch>`: only `A += |g|` for every parameter tensor, on a
//!   gradient store computed once. Its time divided by `step`'s is the share of
//!   a step spent on bookkeeping (target ≤ 3 %).
//!
//! Runs with the process settings of the training binaries
//! (`qgrad_ops::prepare_cpu_training_process`).
//!
//! Short run: `cargo bench --bench train_step -- --warm-up-time 1 --measurement-time 3`.

use std::hint::black_box;
use std::path::Path;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgrad_models::data::{epoch_rng, mnist::load_mnist, Augment, Dataset, Normalization};
use qgrad_models::{Arch, TrainConfig, TrainState};

const BATCH: usize = 128;

/// A batch of real digits from the shipped subset, or synthetic pixels if it is absent.
fn batch(device: &Device) -> (Tensor, Tensor) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/mnist-mini");
    let data = match load_mnist(&dir) {
        Ok((train, _)) => train,
        Err(_) => Dataset {
            images: (0..BATCH * 784).map(|i| (i * 37 % 256) as u8).collect(),
            labels: (0..BATCH).map(|i| (i % 10) as u8).collect(),
            shape: [1, 28, 28],
            num_classes: 10,
        },
    };
    let norm = Normalization {
        mean: vec![0.1307],
        std: vec![0.3081],
    };
    let idx: Vec<usize> = (0..BATCH).collect();
    let mut buf = Vec::new();
    let labels = data.gather(
        &idx,
        &norm,
        Augment::None,
        &mut epoch_rng(0, 0, 1),
        &mut buf,
    );
    (
        Tensor::from_vec(buf, (BATCH, 1, 28, 28), device).unwrap(),
        Tensor::from_vec(labels, BATCH, device).unwrap(),
    )
}

fn bench_train_step(c: &mut Criterion) {
    let device = Device::Cpu;
    let (x, y) = batch(&device);
    for arch in [Arch::Lenet300100, Arch::Lenet5] {
        let config = TrainConfig::default_for(arch);
        let mut state = TrainState::new(arch, &device, &config).unwrap();
        let mut group = c.benchmark_group(format!("train_step/{arch}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("step", |b| {
            b.iter(|| black_box(state.train_step(&x, &y, 0.01).unwrap()))
        });
        let logits = state.network.forward(&x, true).unwrap();
        let grads = candle_nn::loss::cross_entropy(&logits, &y)
            .unwrap()
            .backward()
            .unwrap();
        group.bench_function("accumulate", |b| {
            b.iter(|| state.accum.accumulate(black_box(&grads)).unwrap())
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    // The process settings the `qgrad` and `xtask` binaries train with, made
    // before the first candle op reads them.
    config = {
        qgrad_ops::prepare_cpu_training_process();
        Criterion::default()
    };
    targets = bench_train_step
}
criterion_main!(benches);
