//! The integer kernels of scaled tensors: bit for bit the formula of the
//! `kernel` module docs ("Scaled tensors"), and within one output rounding
//! step of the f64 product of the dequantized operands (plus the f32
//! rounding of `s·k/n` in `dequantize` for linear codes with `n >= 3`).

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{CompressedTensor, FixedActivations, LayoutChoice, LevelKind};

fn ulp(v: f64) -> f64 {
    let f = (v as f32).abs();
    if f == 0.0 {
        f32::from_bits(1) as f64
    } else {
        let next = f32::from_bits(f.to_bits() + 1);
        (next - f) as f64
    }
}

/// The documented formula, written from the docs: `q(c)` is the integer
/// activation at column `c` of row `row`'s patch, `f` its fractional bits.
fn formula(t: &OwnedScaled, row: usize, cols: usize, q: impl Fn(usize) -> i32, f: i32) -> f32 {
    let n = t.max_code;
    let l = |m: u8| -> i128 {
        match t.levels {
            LevelKind::Binary => 1,
            LevelKind::Linear => m as i128,
            LevelKind::Log => 1i128 << (m - 1),
        }
    };
    let den = match t.levels {
        LevelKind::Binary => 1.0,
        LevelKind::Linear => n as f64,
        LevelKind::Log => 2f64.powi(n as i32 - 1),
    };
    let mut total = 0.0f64;
    if cols > 0 {
        let gs = t.codes.len() / t.groups;
        let (first, last) = (row * cols / gs, (row * cols + cols - 1) / gs);
        let spg = if t.two_sided { 2 } else { 1 };
        for g in first..=last {
            let (mut p, mut neg) = (0i128, 0i128);
            for c in 0..cols {
                let i = row * cols + c;
                if i / gs != g {
                    continue;
                }
                let k = t.codes[i];
                if k > 0 {
                    p += l(k as u8) * q(c) as i128;
                } else if k < 0 {
                    neg += l(k.unsigned_abs()) * q(c) as i128;
                }
            }
            let s_pos = t.scales[g * spg] as f64;
            if t.two_sided {
                let s_neg = t.scales[g * spg + 1] as f64;
                total += s_pos * p as f64;
                total -= s_neg * neg as f64;
            } else {
                total += s_pos * (p - neg) as f64;
            }
        }
    }
    ((total * 2f64.powi(-f)) / den) as f32
}

/// Tolerance against the dequantized product.
fn tolerance(t: &OwnedScaled, exact: f64, magnitude: f64) -> f64 {
    let n = t.max_code;
    // Levels k/n that are not all powers of two (n >= 3): dequantize rounds
    // each s·level to f32; the kernel uses the exact s·k/n.
    let weight_rounding = t.levels == LevelKind::Linear && n >= 3;
    ulp(exact)
        + magnitude
            * if weight_rounding {
                2f64.powi(-22)
            } else {
                2f64.powi(-40)
            }
}

fn decode_one(t: &OwnedScaled, layout: LayoutChoice) -> CompressedTensor {
    let mut m = decode(&encode_scaled(std::slice::from_ref(t), layout));
    m.tensors.remove(0)
}

fn check_matmul(
    t: &OwnedScaled,
    w: &CompressedTensor,
    xa: &FixedActivations,
    bit_exact: bool,
) -> Result<(), TestCaseError> {
    let (rows, cols) = (w.rows(), w.cols());
    let batch = xa.rows;
    let y = w.matmul(xa).unwrap();
    prop_assert_eq!(y.len(), batch * rows);
    let (xd, wd) = (xa.dequantize(), w.dequantize());
    for b in 0..batch {
        for r in 0..rows {
            let got = y[b * rows + r];
            if bit_exact {
                let want = formula(t, r, cols, |c| xa.values[b * cols + c], xa.frac_bits[b]);
                prop_assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "row {} sample {}: {} vs formula {}",
                    r,
                    b,
                    got,
                    want
                );
            }
            let (mut exact, mut mag) = (0f64, 0f64);
            for c in 0..cols {
                let p = f64::from(wd[r * cols + c]) * f64::from(xd[b * cols + c]);
                exact += p;
                mag += p.abs();
            }
            let tol = tolerance(t, exact, mag);
            prop_assert!(
                (f64::from(got) - exact).abs() <= tol,
                "row {} sample {}: got {} exact {} tol {}",
                r,
                b,
                got,
                exact,
                tol
            );
            // Against the exact weights s·level(k) (in f64): one rounding step.
            let (mut exact, mut mag) = (0f64, 0f64);
            for c in 0..cols {
                let i = r * cols + c;
                let p =
                    t.scale_of(i) as f64 * exact_level(t, t.codes[i]) * f64::from(xd[b * cols + c]);
                exact += p;
                mag += p.abs();
            }
            let tol = ulp(exact) + mag * 2f64.powi(-40);
            prop_assert!(
                (f64::from(got) - exact).abs() <= tol,
                "row {} sample {}: got {} exact weights {} tol {}",
                r,
                b,
                got,
                exact,
                tol
            );
        }
    }
    Ok(())
}

/// `level(k)` in f64 (exact for binary, ternary and log; `k/n` rounded once).
fn exact_level(t: &OwnedScaled, k: i8) -> f64 {
    let n = t.max_code as i32;
    let k = k as i32;
    match t.levels {
        LevelKind::Binary => k as f64,
        LevelKind::Linear => k as f64 / n as f64,
        LevelKind::Log if k == 0 => 0.0,
        LevelKind::Log => k.signum() as f64 * 2f64.powi(k.abs() - n),
    }
}

fn small_shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (1usize..60).prop_map(|n| vec![n]),
        (1usize..9, 1usize..60).prop_map(|(r, c)| vec![r, c]),
        (1usize..5, 1usize..4, 1usize..4).prop_map(|(o, c, k)| vec![o, c, k, k]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every level kind (log up to 5 bits, where the sums are exact
    /// integers), every group layout, both storage layouts.
    #[test]
    fn matmul_is_the_formula_and_the_dequantized_product(
        t in scaled_tensor_with("w".into(), small_shapes(), 5),
        layout in layout_choice(),
        // Past 16: the sliced batch kernel's slice boundaries.
        batch in prop_oneof![1usize..6, 15usize..40],
        x_values in proptest::collection::vec(value(), 1..400),
        bits in 2u8..=16,
    ) {
        let w = decode_one(&t, layout);
        let cols = w.cols();
        let x: Vec<f32> = (0..batch * cols).map(|i| x_values[i % x_values.len()]).collect();
        let xa = FixedActivations::quantize(&x, batch, cols, bits).unwrap();
        check_matmul(&t, &w, &xa, true)?;
    }

    #[test]
    fn conv2d_is_the_formula_and_the_direct_convolution(
        o in 1usize..5,
        c in 1usize..4,
        k in 1usize..4,
        hw in (1usize..9, 1usize..9),
        stride in 1usize..4,
        padding in 0usize..3,
        samples in 1usize..4,
        (levels, n) in level_kind(5),
        zeros in prop_oneof![Just(0.0), Just(0.5), Just(0.9)],
        groups in groups(),
        two_sided in any::<bool>(),
        seed in any::<u64>(),
        xs in proptest::collection::vec(value(), 1..400),
        bits in 2u8..=16,
    ) {
        let (h, wd_) = hw;
        prop_assume!(h + 2 * padding >= k && wd_ + 2 * padding >= k);
        let t = OwnedScaled::sample("conv", vec![o, c, k, k], levels, n, zeros, groups, two_sided, seed);
        let w = decode_one(&t, LayoutChoice::Auto);
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
        let patch = c * k * k;
        for s in 0..samples {
            for f in 0..o {
                for oy in 0..oh {
                    for ox in 0..ow {
                        // Patch column (ci, ki, kj) -> image index, if inside.
                        let at = |col: usize| -> Option<usize> {
                            let (ci, ki, kj) = (col / (k * k), (col / k) % k, col % k);
                            let iy = (oy * stride + ki) as isize - padding as isize;
                            let ix = (ox * stride + kj) as isize - padding as isize;
                            (iy >= 0 && ix >= 0 && iy < h as isize && ix < wd_ as isize)
                                .then(|| s * image + ci * h * wd_ + iy as usize * wd_ + ix as usize)
                        };
                        let got = y[((s * o + f) * oh + oy) * ow + ox];
                        let want = formula(&t, f, patch, |col| at(col).map_or(0, |i| xa.values[i]), xa.frac_bits[s]);
                        prop_assert_eq!(got.to_bits(), want.to_bits(), "got {} formula {}", got, want);
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for col in 0..patch {
                            if let Some(i) = at(col) {
                                let p = f64::from(wd[f * patch + col]) * f64::from(xd[i]);
                                exact += p;
                                mag += p.abs();
                            }
                        }
                        let tol = tolerance(&t, exact, mag);
                        prop_assert!((f64::from(got) - exact).abs() <= tol, "got {} exact {} tol {}", got, exact, tol);
                    }
                }
            }
        }
    }
}

fn activations(batch: usize, cols: usize, bits: u8, seed: usize) -> FixedActivations {
    let x: Vec<f32> = (0..batch * cols)
        .map(|i| (((i + seed) * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    FixedActivations::quantize(&x, batch, cols, bits).unwrap()
}

/// Batches wider than a tile, and enough work for the parallel path; every
/// kind, one-sided and two-sided, per-tensor and per-row scales.
#[test]
fn large_batches_take_the_tiled_parallel_path() {
    let kinds = [
        (LevelKind::Binary, 1),
        (LevelKind::Linear, 1),
        (LevelKind::Linear, 3),
        (LevelKind::Log, 7),
    ];
    for (i, (levels, n)) in kinds.into_iter().enumerate() {
        for (two_sided, groups) in [(false, Groups::One), (true, Groups::Rows)] {
            let t = OwnedScaled::sample(
                "w",
                vec![64, 300],
                levels,
                n,
                0.3,
                groups,
                two_sided,
                i as u64,
            );
            let w = decode_one(&t, LayoutChoice::Auto);
            let xa = activations(333, 300, 8, i);
            check_matmul(&t, &w, &xa, true).unwrap();
            let xa = activations(1, 300, 16, i);
            check_matmul(&t, &w, &xa, true).unwrap();
        }
    }
}

/// 16-bit activations with large codes force the i64 and i128
/// accumulators (still bit for bit the formula); log codes with `n = 127`
/// exceed even i128 and fall back to an f64 sum, still close.
#[test]
fn wide_accumulators() {
    // Linear 127 and log 31: i64; log 80: i128.
    for (levels, n, exact) in [
        (LevelKind::Linear, 127u8, true),
        (LevelKind::Log, 31, true),
        (LevelKind::Log, 80, true),
        (LevelKind::Log, 127, false),
    ] {
        for two_sided in [false, true] {
            let mut t = OwnedScaled::sample(
                "w",
                vec![5, 700],
                levels,
                n,
                0.1,
                Groups::Rows,
                two_sided,
                9,
            );
            // Scales with few significant bits keep log-127 values exact
            // (no subnormal rounding in dequantize).
            for (i, s) in t.scales.iter_mut().enumerate() {
                *s = [1.0, 0.75, 0.5, 1.5][i % 4];
            }
            // The largest codes on some elements, to push the bound.
            for i in (0..t.codes.len()).step_by(3) {
                t.codes[i] = if i % 2 == 0 { n as i8 } else { -(n as i8) };
            }
            let w = decode_one(&t, LayoutChoice::Dense);
            for batch in [1, 40] {
                let xa = activations(batch, 700, 16, 3);
                check_matmul(&t, &w, &xa, exact).unwrap();
            }
        }
    }
}

#[test]
fn shape_errors_and_empty_tensors() {
    let t = OwnedScaled::sample(
        "w",
        vec![3, 4],
        LevelKind::Linear,
        1,
        0.5,
        Groups::One,
        false,
        1,
    );
    let w = decode_one(&t, LayoutChoice::Auto);
    let x = FixedActivations::quantize(&[1.0; 10], 2, 5, 8).unwrap();
    assert!(w.matmul(&x).unwrap_err().to_string().contains("5 columns"));
    let x = FixedActivations::quantize(&[1.0; 4], 1, 4, 8).unwrap();
    assert!(
        w.conv2d(&x, [1, 2, 2], 2, 1, 0).is_err(),
        "a 2-D weight is no conv kernel"
    );
    // An all-zero tensor and an empty one multiply to zeros.
    let z = OwnedScaled::sample(
        "z",
        vec![3, 4],
        LevelKind::Linear,
        1,
        1.0,
        Groups::Rows,
        true,
        2,
    );
    let w = decode_one(&z, LayoutChoice::Auto);
    assert_eq!(w.matmul(&x).unwrap(), vec![0.0; 3]);
    let e = OwnedScaled::sample(
        "e",
        vec![3, 0],
        LevelKind::Linear,
        1,
        0.5,
        Groups::One,
        false,
        2,
    );
    let w = decode_one(&e, LayoutChoice::Auto);
    let x0 = FixedActivations::quantize(&[], 2, 0, 8).unwrap();
    assert_eq!(w.matmul(&x0).unwrap(), vec![0.0; 6]);
    // All-zero activations with the largest log codes (shifts by 126 bits).
    let big = OwnedScaled::sample(
        "b",
        vec![2, 5],
        LevelKind::Log,
        127,
        0.0,
        Groups::One,
        true,
        3,
    );
    let w = decode_one(&big, LayoutChoice::Auto);
    for batch in [1, 9] {
        let zeros = FixedActivations::quantize(&vec![0.0; 5 * batch], batch, 5, 8).unwrap();
        assert_eq!(w.matmul(&zeros).unwrap(), vec![0.0; 2 * batch]);
    }
    // A zero batch.
    let w = decode_one(&t, LayoutChoice::Auto);
    let none = FixedActivations::quantize(&[], 0, 4, 8).unwrap();
    assert!(w.matmul(&none).unwrap().is_empty());
}
