//! The integer kernels against the f64 product of the dequantized operands:
//! equal within one output rounding step.

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{FixedActivations, LayoutChoice};

/// One f32 rounding step at `v`: the gap between adjacent f32s around it.
fn ulp(v: f64) -> f64 {
    let f = (v as f32).abs();
    if f == 0.0 {
        f32::from_bits(1) as f64
    } else {
        let next = f32::from_bits(f.to_bits() + 1);
        (next - f) as f64
    }
}

/// `|got - exact| <= one rounding step`, plus a slack for the f64 summation of
/// f32 weights (relative 2^-40 of the sum of magnitudes).
fn check(got: f32, exact: f64, magnitude: f64) -> Result<(), TestCaseError> {
    let tol = ulp(exact) + magnitude * 2f64.powi(-40);
    prop_assert!(
        (f64::from(got) - exact).abs() <= tol,
        "got {} exact {} tol {}",
        got,
        exact,
        tol
    );
    Ok(())
}

fn activations() -> impl Strategy<Value = (Vec<f32>, u8)> {
    (proptest::collection::vec(value(), 1..400), 2u8..=16)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(120))]

    #[test]
    fn matmul_equals_the_dequantized_product(
        t in tensor("w".into()),
        batch in 1usize..6,
        x_values in proptest::collection::vec(value(), 1..1000),
        bits in 2u8..=16,
    ) {
        let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Auto));
        let w = &m.tensors[0];
        let (rows, cols) = (w.rows(), w.cols());
        let x: Vec<f32> = (0..batch * cols).map(|i| x_values[i % x_values.len()]).collect();
        let xa = FixedActivations::quantize(&x, batch, cols, bits).unwrap();
        let xd = xa.dequantize();
        let wd = w.dequantize();
        let y = w.matmul(&xa).unwrap();
        prop_assert_eq!(y.len(), batch * rows);
        for b in 0..batch {
            for r in 0..rows {
                let (mut exact, mut mag) = (0f64, 0f64);
                for c in 0..cols {
                    let p = f64::from(wd[r * cols + c]) * f64::from(xd[b * cols + c]);
                    exact += p;
                    mag += p.abs();
                }
                check(y[b * rows + r], exact, mag)?;
            }
        }
    }

    /// The batch kernels (slices of 16 samples for ≤ 8-bit-sized integers,
    /// the transposed kernel for wider ones) give every sample the bits
    /// that the one-sample kernel gives it: across slice boundaries, with
    /// f32 weights, and at output scales outside f32's normal range (where
    /// the sliced kernel falls back to f64 scaling).
    #[test]
    fn a_batch_equals_its_samples_one_by_one(
        rows in 1usize..40,
        cols in 1usize..120,
        batch in 2usize..41,
        seed in any::<u64>(),
        mix in proptest::sample::subsequence(vec![0u8, 2, 4, 6, 8, 12, 16, 32], 1..=4),
        (xs, bits) in activations(),
        magnitude in prop_oneof![Just(1.0f32), Just(1e-30), Just(1e25), Just(3e-4)],
    ) {
        let t = sample_tensor("w", rows, cols, &mix, seed);
        let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Auto));
        let w = &m.tensors[0];
        let x: Vec<f32> = (0..batch * cols)
            .map(|i| xs[i % xs.len()] * magnitude * if i % 7 == 0 { 0.0 } else { 1.0 })
            .collect();
        let xa = FixedActivations::quantize(&x, batch, cols, bits).unwrap();
        let y = w.matmul(&xa).unwrap();
        for b in 0..batch {
            let one = FixedActivations::quantize(&x[b * cols..(b + 1) * cols], 1, cols, bits).unwrap();
            prop_assert_eq!(&one.values[..], &xa.values[b * cols..(b + 1) * cols]);
            let y1 = w.matmul(&one).unwrap();
            for r in 0..rows {
                prop_assert_eq!(
                    y[b * rows + r].to_bits(),
                    y1[r].to_bits(),
                    "sample {} row {}: {} against {}",
                    b, r, y[b * rows + r], y1[r]
                );
            }
        }
    }

    #[test]
    fn conv2d_equals_the_direct_convolution(
        o in 1usize..5,
        c in 1usize..4,
        k in 1usize..4,
        hw in (1usize..9, 1usize..9),
        stride in 1usize..4,
        padding in 0usize..3,
        samples in 1usize..4,
        seed in any::<u64>(),
        mix in proptest::sample::subsequence(ALL_WIDTHS.to_vec(), 1..=ALL_WIDTHS.len()),
        (xs, bits) in activations(),
    ) {
        let (h, wd_) = hw;
        prop_assume!(h + 2 * padding >= k && wd_ + 2 * padding >= k);
        let mut t = sample_tensor("conv", o, c * k * k, &mix, seed);
        t.shape = vec![o, c, k, k];
        let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Auto));
        let w = &m.tensors[0];
        let image = c * h * wd_;
        let x: Vec<f32> = (0..samples * image).map(|i| xs[i % xs.len()]).collect();
        let xa = FixedActivations::quantize(&x, samples, image, bits).unwrap();
        let xd = xa.dequantize();
        let wd = w.dequantize();
        let (y, [oc, oh, ow]) = w.conv2d(&xa, [c, h, wd_], k, stride, padding).unwrap();
        prop_assert_eq!(oc, o);
        prop_assert_eq!(oh, (h + 2 * padding - k) / stride + 1);
        prop_assert_eq!(ow, (wd_ + 2 * padding - k) / stride + 1);
        prop_assert_eq!(y.len(), samples * o * oh * ow);
        // Every output has the bits of the one-sample kernel on its patch.
        let patch = c * k * k;
        for s in 0..samples {
            for oy in 0..oh {
                for ox in 0..ow {
                    let row: Vec<i32> = (0..patch)
                        .map(|col| {
                            let (ci, ki, kj) = (col / (k * k), (col / k) % k, col % k);
                            let iy = (oy * stride + ki) as isize - padding as isize;
                            let ix = (ox * stride + kj) as isize - padding as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd_ as isize {
                                0
                            } else {
                                xa.values[s * image + ci * h * wd_ + iy as usize * wd_ + ix as usize]
                            }
                        })
                        .collect();
                    let one = FixedActivations { values: row, rows: 1, cols: patch, frac_bits: vec![xa.frac_bits[s]] };
                    let y1 = w.matmul(&one).unwrap();
                    for f in 0..o {
                        let got = y[((s * o + f) * oh + oy) * ow + ox];
                        prop_assert_eq!(got.to_bits(), y1[f].to_bits(), "sample {} filter {}: {} against {}", s, f, got, y1[f]);
                    }
                }
            }
        }
        for s in 0..samples {
            for f in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for ci in 0..c {
                            for ki in 0..k {
                                for kj in 0..k {
                                    let iy = (oy * stride + ki) as isize - padding as isize;
                                    let ix = (ox * stride + kj) as isize - padding as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd_ as isize {
                                        continue;
                                    }
                                    let xv = xd[s * image + ci * h * wd_ + iy as usize * wd_ + ix as usize];
                                    let wv = wd[f * c * k * k + ci * k * k + ki * k + kj];
                                    let p = f64::from(wv) * f64::from(xv);
                                    exact += p;
                                    mag += p.abs();
                                }
                            }
                        }
                        check(y[((s * o + f) * oh + oy) * ow + ox], exact, mag)?;
                    }
                }
            }
        }
    }
}

/// Wide batches take the tiled path with several tiles; 16-bit operands
/// force the i64 accumulator; the result is still exact.
#[test]
fn large_batch_and_wide_operands() {
    let t = sample_tensor("w", 7, 300, &[0, 16, 12, 32], 11);
    let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Csr));
    let w = &m.tensors[0];
    let batch = 600;
    let x: Vec<f32> = (0..batch * 300)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let xa = FixedActivations::quantize(&x, batch, 300, 16).unwrap();
    let y = w.matmul(&xa).unwrap();
    let (xd, wd) = (xa.dequantize(), w.dequantize());
    for b in (0..batch).step_by(37) {
        for r in 0..7 {
            let exact: f64 = (0..300)
                .map(|c| f64::from(wd[r * 300 + c]) * f64::from(xd[b * 300 + c]))
                .sum();
            assert!((f64::from(y[b * 7 + r]) - exact).abs() <= ulp(exact) + exact.abs() * 1e-12);
        }
    }
}

#[test]
fn shape_errors() {
    let t = sample_tensor("w", 3, 4, &[8], 1);
    let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Auto));
    let w = &m.tensors[0];
    let x = FixedActivations::quantize(&[1.0; 10], 2, 5, 8).unwrap();
    assert!(w.matmul(&x).unwrap_err().to_string().contains("5 columns"));
    let mut broken = FixedActivations::quantize(&[1.0; 8], 2, 4, 8).unwrap();
    broken.frac_bits.pop();
    assert!(w.matmul(&broken).is_err());
    broken.values.pop();
    assert!(w.matmul(&broken).is_err());
    assert!(FixedActivations::quantize(&[1.0; 8], 2, 4, 1).is_err());
    assert!(FixedActivations::quantize(&[1.0; 7], 2, 4, 8).is_err());
    assert!(FixedActivations::quantize(&[f32::NAN; 8], 2, 4, 8).is_err());
    // conv2d on a 2-D weight, a zero stride, a kernel larger than the input.
    let x = FixedActivations::quantize(&[1.0; 4], 1, 4, 8).unwrap();
    assert!(w.conv2d(&x, [1, 2, 2], 2, 1, 0).is_err());
    let mut c = sample_tensor("c", 2, 4, &[8], 2);
    c.shape = vec![2, 1, 2, 2];
    let m = decode(&encode(std::slice::from_ref(&c), LayoutChoice::Auto));
    let cw = &m.tensors[0];
    assert!(cw.conv2d(&x, [1, 2, 2], 2, 0, 0).is_err());
    let one = FixedActivations::quantize(&[1.0], 1, 1, 8).unwrap();
    assert!(cw.conv2d(&one, [1, 1, 1], 2, 1, 0).is_err());
    assert!(cw.conv2d(&x, [1, 2, 2], 2, 1, usize::MAX / 2).is_err());
    assert!(cw.conv2d(&x, [1, 2, 2], 2, 1, 0).is_ok());
}
