//! The fast ops against candle's own (`qgrad_ops::reference`): outputs and
//! every gradient, on random shapes, strides, paddings, batch sizes and
//! channel counts, plus the edge cases and the error paths.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::values;
use proptest::prelude::*;
use qgrad_ops::reference;

fn tensor(seed: u64, dims: &[usize]) -> Tensor {
    let len = dims.iter().product();
    Tensor::from_vec(values(seed, len), dims, &Device::Cpu).unwrap()
}

fn var(seed: u64, dims: &[usize]) -> Var {
    Var::from_tensor(&tensor(seed, dims)).unwrap()
}

/// Largest |a - b| relative to the larger magnitude of the two tensors.
fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * scale,
            "{what}[{i}]: got {g}, candle {w} (scale {scale})"
        );
    }
}

/// A scalar loss with a non-uniform gradient: `Σ y ⊙ r`.
fn weighted_sum(y: &Tensor, seed: u64) -> Tensor {
    let r = tensor(seed, y.dims());
    (y * r).unwrap().sum_all().unwrap()
}

/// candle's conv2d, written so that candle can differentiate it for every
/// geometry: candle 0.11.1's conv2d backward fails ("shape mismatch in add")
/// when the stride leaves trailing input rows or columns unused. Padding
/// explicitly and cutting the input to exactly the extent the windows cover
/// gives the same output, and candle's pad/narrow gradients route zeros to
/// the unused inputs.
fn differentiable_reference_conv(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Tensor {
    let (_, _, kh, kw) = w.dims4().unwrap();
    let padded = x
        .pad_with_zeros(2, padding, padding)
        .unwrap()
        .pad_with_zeros(3, padding, padding)
        .unwrap();
    let (_, _, ph, pw) = padded.dims4().unwrap();
    let used_h = (ph - kh) / stride * stride + kh;
    let used_w = (pw - kw) / stride * stride + kw;
    let cut = padded
        .narrow(2, 0, used_h)
        .unwrap()
        .narrow(3, 0, used_w)
        .unwrap();
    reference::conv2d(&cut, w, bias, stride, 0).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn check_conv(
    seed: u64,
    n: usize,
    c: usize,
    o: usize,
    hw: (usize, usize),
    k: (usize, usize),
    stride: usize,
    padding: usize,
    with_bias: bool,
    input_needs_grad: bool,
) {
    let x_var = var(seed, &[n, c, hw.0, hw.1]);
    let x_const = x_var.as_tensor().detach();
    let x = if input_needs_grad {
        x_var.as_tensor()
    } else {
        &x_const
    };
    let w = var(seed + 1, &[o, c, k.0, k.1]);
    let b = var(seed + 2, &[o]);
    let bias = with_bias.then(|| b.as_tensor());

    let fast = qgrad_ops::conv2d(x, &w, bias, stride, padding).unwrap();
    assert_close(
        "conv2d output",
        &fast,
        &reference::conv2d(x, &w, bias, stride, padding).unwrap(),
    );
    let slow = differentiable_reference_conv(x, &w, bias, stride, padding);
    assert_close("conv2d output (padded reference)", &fast, &slow);

    let fast_grads = weighted_sum(&fast, seed + 3).backward().unwrap();
    let slow_grads = weighted_sum(&slow, seed + 3).backward().unwrap();
    let mut params = vec![("weight", w.as_tensor())];
    if with_bias {
        params.push(("bias", b.as_tensor()));
    }
    if input_needs_grad {
        params.push(("input", x));
    } else {
        assert!(
            fast_grads.get(x).is_none(),
            "a constant input got a gradient"
        );
    }
    for (name, t) in params {
        assert_close(
            &format!("conv2d {name} gradient"),
            fast_grads.get(t).expect("missing gradient"),
            slow_grads.get(t).expect("missing candle gradient"),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn conv2d_matches_candle(
        seed in any::<u64>(),
        n in 1usize..5,
        c in 1usize..5,
        o in 1usize..6,
        kh in 1usize..6,
        kw in 1usize..6,
        extra_h in 0usize..8,
        extra_w in 0usize..8,
        stride in 1usize..4,
        padding in 0usize..3,
        with_bias in any::<bool>(),
        input_needs_grad in any::<bool>(),
    ) {
        // The unpadded input is at least as large as the kernel, so every
        // output window overlaps real input.
        let hw = (kh + extra_h, kw + extra_w);
        check_conv(seed, n, c, o, hw, (kh, kw), stride, padding, with_bias, input_needs_grad);
    }

    #[test]
    fn linear_matches_candle(
        seed in any::<u64>(),
        n in 1usize..40,
        inputs in 1usize..70,
        outputs in 1usize..40,
        with_bias in any::<bool>(),
        input_needs_grad in any::<bool>(),
    ) {
        check_linear(seed, n, inputs, outputs, with_bias, input_needs_grad);
    }

    #[test]
    fn batch_norm_train_matches_candle(
        seed in any::<u64>(),
        n in 1usize..5,
        c in 1usize..6,
        h in 1usize..6,
        w in 1usize..6,
        rank4 in any::<bool>(),
        input_needs_grad in any::<bool>(),
    ) {
        let dims = if rank4 { vec![n, c, h, w] } else { vec![n, c] };
        check_batch_norm_train(seed, &dims, input_needs_grad);
    }

    #[test]
    fn batch_norm_eval_matches_candle(
        seed in any::<u64>(),
        n in 1usize..5,
        c in 1usize..6,
        h in 1usize..6,
        w in 1usize..6,
        rank4 in any::<bool>(),
    ) {
        let dims = if rank4 { vec![n, c, h, w] } else { vec![n, c] };
        check_batch_norm_eval(seed, &dims);
    }

    #[test]
    fn max_pool2d_matches_candle(
        seed in any::<u64>(),
        n in 1usize..4,
        c in 1usize..4,
        size in 1usize..4,
        oh in 1usize..6,
        ow in 1usize..6,
        levels in prop_oneof![Just(0u32), 2u32..5],
    ) {
        check_pool(seed, &[n, c, oh * size, ow * size], size, levels);
    }
}

fn check_linear(
    seed: u64,
    n: usize,
    inputs: usize,
    outputs: usize,
    with_bias: bool,
    input_needs_grad: bool,
) {
    let x_var = var(seed, &[n, inputs]);
    let x_const = x_var.as_tensor().detach();
    let x = if input_needs_grad {
        x_var.as_tensor()
    } else {
        &x_const
    };
    let w = var(seed + 1, &[outputs, inputs]);
    let b = var(seed + 2, &[outputs]);
    let bias = with_bias.then(|| b.as_tensor());
    let fast = qgrad_ops::linear(x, &w, bias).unwrap();
    let slow = reference::linear(x, &w, bias).unwrap();
    assert_close("linear output", &fast, &slow);
    let fast_grads = weighted_sum(&fast, seed + 3).backward().unwrap();
    let slow_grads = weighted_sum(&slow, seed + 3).backward().unwrap();
    let mut params = vec![("weight", w.as_tensor())];
    if with_bias {
        params.push(("bias", b.as_tensor()));
    }
    if input_needs_grad {
        params.push(("input", x));
    } else {
        assert!(
            fast_grads.get(x).is_none(),
            "a constant input got a gradient"
        );
    }
    for (name, t) in params {
        assert_close(
            &format!("linear {name} gradient"),
            fast_grads.get(t).expect("missing gradient"),
            slow_grads.get(t).expect("missing candle gradient"),
        );
    }
}

const BN_EPS: f64 = 1e-5;

/// Output, batch statistics and the gradients for `x` (when it is a
/// variable), γ and β, against the composition of candle ops.
fn check_batch_norm_train(seed: u64, dims: &[usize], input_needs_grad: bool) {
    let x_var = var(seed, dims);
    let x_const = x_var.as_tensor().detach();
    let x = if input_needs_grad {
        x_var.as_tensor()
    } else {
        &x_const
    };
    let gamma = var(seed + 1, &[dims[1]]);
    let beta = var(seed + 2, &[dims[1]]);
    let (fast, fast_mean, fast_var) =
        qgrad_ops::batch_norm_train(x, &gamma, &beta, BN_EPS).unwrap();
    let (slow, slow_mean, slow_var) =
        reference::batch_norm_train(x, &gamma, &beta, BN_EPS).unwrap();
    assert_close("batch norm output", &fast, &slow);
    assert_close("batch norm mean", &fast_mean, &slow_mean);
    assert_close("batch norm variance", &fast_var, &slow_var);
    assert_eq!(fast_mean.dims(), &[dims[1]]);
    assert!(!fast_mean.track_op() && !fast_var.track_op());

    let fast_grads = weighted_sum(&fast, seed + 3).backward().unwrap();
    let slow_grads = weighted_sum(&slow, seed + 3).backward().unwrap();
    let mut params = vec![("weight", gamma.as_tensor()), ("bias", beta.as_tensor())];
    if input_needs_grad {
        params.push(("input", x));
    } else {
        assert!(
            fast_grads.get(x).is_none(),
            "a constant input got a gradient"
        );
    }
    for (name, t) in params {
        assert_close(
            &format!("batch norm {name} gradient"),
            fast_grads.get(t).expect("missing gradient"),
            slow_grads.get(t).expect("missing candle gradient"),
        );
    }
}

/// Evaluation mode: output and the gradients for `x`, γ and β.
fn check_batch_norm_eval(seed: u64, dims: &[usize]) {
    let c = dims[1];
    let x = var(seed, dims);
    let gamma = var(seed + 1, &[c]);
    let beta = var(seed + 2, &[c]);
    let running_mean = tensor(seed + 3, &[c]);
    // Positive variances, some below eps's scale.
    let running_var = tensor(seed + 4, &[c]).sqr().unwrap();
    let fast =
        qgrad_ops::batch_norm_eval(&x, &gamma, &beta, &running_mean, &running_var, BN_EPS).unwrap();
    let slow =
        reference::batch_norm_eval(&x, &gamma, &beta, &running_mean, &running_var, BN_EPS).unwrap();
    assert_close("batch norm (eval) output", &fast, &slow);
    let fast_grads = weighted_sum(&fast, seed + 5).backward().unwrap();
    let slow_grads = weighted_sum(&slow, seed + 5).backward().unwrap();
    for (name, t) in [
        ("input", x.as_tensor()),
        ("weight", &gamma),
        ("bias", &beta),
    ] {
        assert_close(
            &format!("batch norm (eval) {name} gradient"),
            fast_grads.get(t).expect("missing gradient"),
            slow_grads.get(t).expect("missing candle gradient"),
        );
    }
}

#[test]
fn batch_norm_edge_cases() {
    // One value per channel (variance 0, only eps keeps 1/sqrt finite), a
    // 1x1 plane, many channels with tiny planes (several channels per task),
    // a large plane (several planes per sample, the lane tails), rank 2 wide.
    let shapes: &[&[usize]] = &[
        &[1, 3, 1, 1],
        &[1, 4],
        &[5, 2, 1, 1],
        &[16, 64, 2, 2],
        &[3, 5, 33, 31],
        &[32, 300],
    ];
    for (i, dims) in shapes.iter().enumerate() {
        for input_needs_grad in [false, true] {
            check_batch_norm_train(200 + i as u64, dims, input_needs_grad);
        }
        check_batch_norm_eval(300 + i as u64, dims);
    }
}

#[test]
fn batch_norm_statistics_with_a_large_mean() {
    // A channel far from 0 with a small spread: the two-pass f64 statistics
    // match the exact values computed on the host in f64.
    let dims = [4, 2, 3, 3];
    let raw = values(9, 72);
    let x: Vec<f32> = raw
        .iter()
        .enumerate()
        .map(|(i, v)| if (i / 9) % 2 == 1 { 1000.0 + v } else { *v })
        .collect();
    let xt = Tensor::from_vec(x.clone(), &dims, &Device::Cpu).unwrap();
    let ones = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
    let (y, mean, var) = qgrad_ops::batch_norm_train(&xt, &ones, &zeros, BN_EPS).unwrap();
    let mean: Vec<f32> = mean.to_vec1().unwrap();
    let var: Vec<f32> = var.to_vec1().unwrap();
    for c in 0..2 {
        let vals: Vec<f64> = (0..x.len())
            .filter(|i| (i / 9) % 2 == c)
            .map(|i| f64::from(x[i]))
            .collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
        assert_eq!(mean[c], m as f32, "mean of channel {c}");
        assert_eq!(var[c], v as f32, "variance of channel {c}");
    }
    // Normalised output: zero mean and unit variance per channel.
    let (_, y_mean, y_var) = reference::batch_norm_train(&y, &ones, &zeros, BN_EPS).unwrap();
    for (m, v) in y_mean
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .zip(y_var.to_vec1::<f32>().unwrap())
    {
        assert!(
            m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3,
            "mean {m}, var {v}"
        );
    }
}

#[test]
fn batch_norm_bad_arguments_and_other_dtypes() {
    let x = tensor(1, &[2, 3, 4, 4]);
    let g = tensor(2, &[3]);
    let b = tensor(3, &[3]);
    assert!(qgrad_ops::batch_norm_train(&tensor(4, &[2, 3, 4]), &g, &b, BN_EPS).is_err());
    assert!(qgrad_ops::batch_norm_train(&x, &tensor(5, &[4]), &b, BN_EPS).is_err());
    assert!(qgrad_ops::batch_norm_train(&x, &g, &tensor(5, &[2]), BN_EPS).is_err());
    let empty = Tensor::zeros((0, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(qgrad_ops::batch_norm_train(&empty, &g, &b, BN_EPS).is_err());
    assert!(qgrad_ops::batch_norm_eval(&x, &g, &b, &tensor(6, &[2]), &g, BN_EPS).is_err());
    // f64 and a non-contiguous input take candle's path / a copy.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (y64, m64, _) = qgrad_ops::batch_norm_train(
        &x64,
        &g.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
        BN_EPS,
    )
    .unwrap();
    assert_eq!((y64.dtype(), m64.dtype()), (DType::F64, DType::F64));
    let xt = x.transpose(2, 3).unwrap();
    assert_close(
        "transposed batch norm input",
        &qgrad_ops::batch_norm_train(&xt, &g, &b, BN_EPS).unwrap().0,
        &reference::batch_norm_train(&xt, &g, &b, BN_EPS).unwrap().0,
    );
}

/// The max-pool gradient computed on the host: each window's gradient goes
/// to the first position (row-major) holding the window's maximum.
fn host_pool_grad(x: &[f32], dims: &[usize], size: usize, dy: &[f32]) -> Vec<f32> {
    let (h, w) = (dims[2], dims[3]);
    let (oh, ow) = (h / size, w / size);
    let mut dx = vec![0.0; x.len()];
    for plane in 0..dims[0] * dims[1] {
        for i in 0..oh {
            for j in 0..ow {
                let mut best = plane * h * w + i * size * w + j * size;
                for m in 0..size {
                    for k in 0..size {
                        let at = plane * h * w + (i * size + m) * w + j * size + k;
                        if x[best] < x[at] {
                            best = at;
                        }
                    }
                }
                dx[best] = dy[plane * oh * ow + i * ow + j];
            }
        }
    }
    dx
}

/// `levels > 0` rounds the input to that many values per unit, which makes
/// ties inside windows common (as after a ReLU).
fn check_pool(seed: u64, dims: &[usize], size: usize, levels: u32) {
    let raw = tensor(seed, dims);
    let x = if levels > 0 {
        let l = f64::from(levels);
        raw.affine(l, 0.0)
            .unwrap()
            .round()
            .unwrap()
            .affine(1.0 / l, 0.0)
            .unwrap()
    } else {
        raw
    };
    let x = Var::from_tensor(&x).unwrap();
    let fast = qgrad_ops::max_pool2d(&x, size).unwrap();
    let slow = reference::max_pool2d(&x, size).unwrap();
    assert_close("max_pool2d output", &fast, &slow);
    let r = tensor(seed + 1, fast.dims());
    let grads = (&fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let x_host: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let r_host: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
    let want = Tensor::from_vec(
        host_pool_grad(&x_host, dims, size, &r_host),
        dims,
        &Device::Cpu,
    )
    .unwrap();
    assert_close("max_pool2d input gradient", grads.get(&x).unwrap(), &want);
}

#[test]
fn max_pool2d_gradient_is_the_true_derivative() {
    // One 2x2 window with a unique maximum: d max / d x is 1 there, 0 elsewhere.
    // (candle 0.11.1's own gradient gives 0.25 here: see pool.rs.)
    let x = Var::from_tensor(
        &Tensor::from_vec(vec![0.1f32, 0.7, -0.3, 0.2], (1, 1, 2, 2), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let grads = qgrad_ops::max_pool2d(&x, 2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dx: Vec<f32> = grads
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(dx, vec![0.0, 1.0, 0.0, 0.0]);
    // A tie (all zeros, as after a ReLU): the whole gradient goes to the first.
    let z =
        Var::from_tensor(&Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let grads = qgrad_ops::max_pool2d(&z, 2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dz: Vec<f32> = grads
        .get(&z)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(dz, vec![1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn conv2d_edge_cases() {
    // 1×1 kernel (the pointwise path), one channel, 1×1 output, a kernel as
    // large as the padded input, stride larger than the kernel, large batch
    // with tiny outputs (multi-sample chunks) and large outputs (one sample
    // per chunk).
    // (batch, in channels, out channels, input hw, kernel hw, stride, padding)
    type Case = (
        usize,
        usize,
        usize,
        (usize, usize),
        (usize, usize),
        usize,
        usize,
    );
    let cases: &[Case] = &[
        (3, 4, 5, (6, 6), (1, 1), 1, 0),
        (2, 1, 1, (5, 7), (1, 1), 1, 0),
        (2, 1, 3, (5, 5), (5, 5), 1, 0),
        (1, 2, 2, (3, 3), (5, 5), 1, 1),
        (4, 3, 2, (1, 1), (1, 1), 1, 0),
        (3, 2, 3, (9, 9), (2, 2), 4, 0),
        (2, 2, 3, (6, 6), (1, 1), 2, 1),
        (17, 8, 16, (2, 2), (3, 3), 1, 1),
        // AlexNet's second layer: a 5×5 kernel with padding 2 on a 4×4 map
        // (by classes of taps, each larger than the map's half).
        (9, 6, 7, (4, 4), (5, 5), 1, 2),
        (3, 2, 3, (5, 3), (5, 3), 2, 2),
        (5, 3, 4, (24, 24), (1, 1), 1, 0),
        (3, 3, 4, (32, 32), (11, 11), 4, 5),
    ];
    for (i, &(n, c, o, hw, k, stride, padding)) in cases.iter().enumerate() {
        for with_bias in [false, true] {
            for input_needs_grad in [false, true] {
                check_conv(
                    100 + i as u64,
                    n,
                    c,
                    o,
                    hw,
                    k,
                    stride,
                    padding,
                    with_bias,
                    input_needs_grad,
                );
            }
        }
    }
}

#[test]
fn linear_edge_cases() {
    // Single sample, single feature, and a product large enough for the
    // multi-threaded GEMM.
    check_linear(1, 1, 1, 1, true, true);
    check_linear(2, 1, 7, 3, false, true);
    check_linear(3, 128, 784, 300, true, false);
    check_linear(4, 128, 300, 100, true, true);
}

#[test]
fn max_pool2d_odd_sizes_drop_the_remainder() {
    // candle's output rounds down; its backward only supports exact multiples,
    // so the gradient is checked by hand here: every element of a window whose
    // maximum is unique gets dy at the maximum and 0 elsewhere.
    let x = Var::from_tensor(&tensor(7, &[1, 2, 5, 7])).unwrap();
    let fast = qgrad_ops::max_pool2d(&x, 2).unwrap();
    let slow = reference::max_pool2d(&x, 2).unwrap();
    assert_eq!(fast.dims(), &[1, 2, 2, 3]);
    assert_close("max_pool2d output", &fast, &slow);
    let grads = fast.sum_all().unwrap().backward().unwrap();
    let dx: Vec<f32> = grads
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // Each of the 12 windows passes exactly 1.0 to its (unique) maximum; the
    // dropped last row and column get nothing.
    assert_eq!(dx.iter().filter(|&&v| v == 1.0).count(), 12);
    assert_eq!(dx.iter().filter(|&&v| v == 0.0).count(), 70 - 12);
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    let x = tensor(1, &[2, 3, 8, 8]);
    let w = tensor(2, &[4, 3, 3, 3]);
    // channel mismatch, kernel too large, zero stride, wrong rank, wrong bias
    assert!(qgrad_ops::conv2d(&x, &tensor(3, &[4, 2, 3, 3]), None, 1, 0).is_err());
    assert!(qgrad_ops::conv2d(&x, &tensor(3, &[4, 3, 9, 9]), None, 1, 0).is_err());
    assert!(qgrad_ops::conv2d(&x, &w, None, 0, 0).is_err());
    assert!(qgrad_ops::conv2d(&tensor(4, &[3, 8, 8]), &w, None, 1, 0).is_err());
    assert!(qgrad_ops::conv2d(&x, &w, Some(&tensor(5, &[3])), 1, 0).is_err());
    assert!(qgrad_ops::linear(&tensor(6, &[2, 5]), &tensor(7, &[3, 4]), None).is_err());
    assert!(qgrad_ops::linear(
        &tensor(6, &[2, 4]),
        &tensor(7, &[3, 4]),
        Some(&tensor(8, &[4]))
    )
    .is_err());
    assert!(qgrad_ops::max_pool2d(&x, 0).is_err());
    assert!(qgrad_ops::max_pool2d(&x, 9).is_err());
    assert!(qgrad_ops::max_pool2d(&tensor(9, &[8, 8]), 2).is_err());
}

#[test]
fn non_contiguous_inputs_and_other_dtypes() {
    // A transposed input goes through .contiguous(); f64 falls back to candle.
    let x = tensor(11, &[2, 3, 6, 6]).transpose(2, 3).unwrap();
    let w = tensor(12, &[4, 3, 3, 3]);
    assert_close(
        "transposed input",
        &qgrad_ops::conv2d(&x, &w, None, 1, 1).unwrap(),
        &reference::conv2d(&x, &w, None, 1, 1).unwrap(),
    );
    let x64 = x.to_dtype(DType::F64).unwrap();
    let w64 = w.to_dtype(DType::F64).unwrap();
    let y64 = qgrad_ops::conv2d(&x64, &w64, None, 1, 1).unwrap();
    assert_eq!(y64.dtype(), DType::F64);
    let lin_x = tensor(13, &[5, 4]).t().unwrap();
    let lin_w = tensor(14, &[3, 5]);
    assert_close(
        "transposed linear input",
        &qgrad_ops::linear(&lin_x, &lin_w, None).unwrap(),
        &reference::linear(&lin_x, &lin_w, None).unwrap(),
    );
}
