//! The fused LSTM recurrence against the step-by-step composition of candle
//! ops (`qgrad_ops::reference::lstm_sequence`): hidden states, final state,
//! batch statistics and every gradient, for every normalisation of the
//! recurrent term, on random sizes that include one hidden unit, one step
//! and one row; plus the shape errors.

use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qgrad_ops::{lstm_sequence, reference, LstmState, RecurrentNorm};

/// Deterministic values in [-1, 1) (splitmix64).
fn values(seed: u64, len: usize) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(seed: u64, dims: &[usize], scale: f32) -> Tensor {
    let len = dims.iter().product();
    let v: Vec<f32> = values(seed, len).iter().map(|x| x * scale).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, reference {w} (scale {scale})"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    None,
    Layer,
    BatchTrain,
    BatchEvalPerStep,
    BatchEvalShared,
}

/// Runs the fused op and the reference on the same inputs and compares the
/// outputs and the gradients of `Σ h ⊙ r`.
fn check(steps: usize, batch: usize, hidden: usize, mode: Mode, with_init: bool, seed: u64) {
    let g4 = 4 * hidden;
    let xproj = Var::from_tensor(&tensor(seed, &[steps, batch, g4], 1.5)).unwrap();
    let wh = Var::from_tensor(&tensor(seed + 1, &[g4, hidden], 0.8)).unwrap();
    let gain = Var::from_tensor(&(tensor(seed + 2, &[g4], 0.5) + 1.0).unwrap()).unwrap();
    let stat_rows = match mode {
        Mode::BatchEvalShared => 1,
        _ => steps.div_ceil(2).max(1),
    };
    let mean = tensor(seed + 3, &[stat_rows, g4], 0.3);
    let var = (tensor(seed + 4, &[stat_rows, g4], 0.4) + 0.6).unwrap();
    let init = with_init.then(|| LstmState {
        h: tensor(seed + 5, &[batch, hidden], 0.9),
        c: tensor(seed + 6, &[batch, hidden], 2.0),
    });
    let norm = match mode {
        Mode::None => RecurrentNorm::None,
        Mode::Layer => RecurrentNorm::Layer {
            gain: gain.as_tensor(),
            eps: 1e-5,
        },
        Mode::BatchTrain => RecurrentNorm::BatchTrain {
            gain: gain.as_tensor(),
            eps: 1e-5,
        },
        Mode::BatchEvalPerStep | Mode::BatchEvalShared => RecurrentNorm::BatchEval {
            gain: gain.as_tensor(),
            mean: &mean,
            var: &var,
            eps: 1e-5,
        },
    };
    let fast = lstm_sequence(xproj.as_tensor(), wh.as_tensor(), init.as_ref(), norm).unwrap();
    let slow =
        reference::lstm_sequence(xproj.as_tensor(), wh.as_tensor(), init.as_ref(), norm).unwrap();
    // Batch norm over a single row is degenerate (â = 0); still compared.
    let tol = 2e-4;
    assert_close("hidden", &fast.hidden, &slow.hidden, tol);
    assert_close("last h", &fast.last.h, &slow.last.h, tol);
    assert_close("last c", &fast.last.c, &slow.last.c, tol);
    match (&fast.step_stats, &slow.step_stats) {
        (Some((fm, fv)), Some((sm, sv))) => {
            assert_close("step mean", fm, sm, tol);
            assert_close("step var", fv, sv, tol);
        }
        (None, None) => {}
        _ => panic!("one path reported batch statistics, the other not"),
    }
    let r = tensor(seed + 7, &[steps, batch, hidden], 1.0);
    let loss = |s: &qgrad_ops::LstmSequence| (&s.hidden * &r).unwrap().sum_all().unwrap();
    let gf = loss(&fast).backward().unwrap();
    let gs = loss(&slow).backward().unwrap();
    for (name, v) in [("dxproj", &xproj), ("dwh", &wh)] {
        assert_close(name, gf.get(v).unwrap(), gs.get(v).unwrap(), 5e-4);
    }
    if !matches!(mode, Mode::None) {
        assert_close(
            "dgain",
            gf.get(&gain).unwrap(),
            gs.get(&gain).unwrap(),
            5e-4,
        );
    } else {
        assert!(gf.get(&gain).is_none());
    }
}

#[test]
fn every_mode_on_fixed_sizes() {
    for mode in [
        Mode::None,
        Mode::Layer,
        Mode::BatchTrain,
        Mode::BatchEvalPerStep,
        Mode::BatchEvalShared,
    ] {
        for &(t, b, h) in &[(1, 1, 1), (1, 3, 2), (5, 4, 3), (7, 2, 1), (3, 1, 4)] {
            if matches!(mode, Mode::BatchTrain) && b == 1 {
                continue; // one row has no batch variance: covered below
            }
            check(t, b, h, mode, true, 11);
            check(t, b, h, mode, false, 12);
        }
    }
}

#[test]
fn batch_norm_of_one_row_standardises_to_zero() {
    // One row: â = 0, so the recurrent term vanishes on both paths.
    check(4, 1, 3, Mode::BatchTrain, true, 5);
}

#[test]
fn large_sizes_take_the_threaded_paths() {
    // 64 rows × 4·96 gates crosses the parallel thresholds.
    check(3, 64, 96, Mode::None, true, 21);
    check(3, 64, 96, Mode::Layer, false, 22);
    check(2, 64, 96, Mode::BatchTrain, true, 23);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn fused_equals_reference(
        steps in 1usize..8,
        batch in 1usize..6,
        hidden in 1usize..7,
        mode in 0usize..5,
        with_init: bool,
        seed in 0u64..1_000_000,
    ) {
        let mode = [Mode::None, Mode::Layer, Mode::BatchTrain, Mode::BatchEvalPerStep,
                    Mode::BatchEvalShared][mode];
        check(steps, batch, hidden, mode, with_init, seed);
    }
}

#[test]
fn shape_errors_are_errors_not_panics() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 3, 8), candle_core::DType::F32, &dev).unwrap();
    let wh = Tensor::zeros((8, 2), candle_core::DType::F32, &dev).unwrap();
    let bad_wh = Tensor::zeros((8, 3), candle_core::DType::F32, &dev).unwrap();
    assert!(lstm_sequence(&x, &bad_wh, None, RecurrentNorm::None).is_err());
    let flat = Tensor::zeros((6, 8), candle_core::DType::F32, &dev).unwrap();
    assert!(lstm_sequence(&flat, &wh, None, RecurrentNorm::None).is_err());
    let empty = Tensor::zeros((0, 3, 8), candle_core::DType::F32, &dev).unwrap();
    assert!(lstm_sequence(&empty, &wh, None, RecurrentNorm::None).is_err());
    let gain = Tensor::ones(7, candle_core::DType::F32, &dev).unwrap();
    let ln = RecurrentNorm::Layer {
        gain: &gain,
        eps: 1e-5,
    };
    assert!(lstm_sequence(&x, &wh, None, ln).is_err());
    let h = Tensor::zeros((3, 3), candle_core::DType::F32, &dev).unwrap();
    let init = LstmState { h: h.clone(), c: h };
    assert!(lstm_sequence(&x, &wh, Some(&init), RecurrentNorm::None).is_err());
    assert!(lstm_sequence(&x, &wh, None, RecurrentNorm::None).is_ok());
}
