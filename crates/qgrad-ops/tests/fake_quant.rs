//! `straight_through` and `pact` against their candle compositions
//! (`qgrad_ops::reference`): the same values and gradients exactly, not
//! within a tolerance, on random shapes (dimensions of 1 included), widths,
//! clips and inputs that sit on the clip, on 0 and on the rounding steps.

mod common;
use candle_core::{Device, Tensor, Var};
use proptest::prelude::*;
use qgrad_ops::reference;

/// Inputs around `[0, β]` from a seed (splitmix64): negative values, exact
/// 0 and β, exact steps of β / levels and their midpoints, and values past β.
fn inputs(seed: u64, len: usize, beta: f32, levels: u32) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            let z = common::splitmix64(&mut state);
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            match z % 8 {
                0 => 0.0,
                1 => beta,
                2 => beta * ((z >> 8) % u64::from(2 * levels + 1)) as f32 / (2 * levels) as f32,
                3 => -u,
                _ => u * 1.5 * beta,
            }
        })
        .collect()
}

/// Values equal (`==`: zeros of either sign agree) element for element.
fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "{what}[{i}]: got {g:e}, candle {w:e}");
    }
}

fn check_pact(seed: u64, dims: &[usize], bits: u8, beta: f32) {
    let len = dims.iter().product();
    let x = Var::from_vec(inputs(seed, len, beta, (1 << bits) - 1), dims, &Device::Cpu).unwrap();
    let clip = Var::from_vec(vec![beta], 1, &Device::Cpu).unwrap();
    let r = Tensor::from_vec(inputs(seed ^ 1, len, 1.0, 3), dims, &Device::Cpu).unwrap();
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
        let y = f(x.as_tensor(), clip.as_tensor()).unwrap();
        let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap().clone();
        let dclip = grads.get(&clip).unwrap().clone();
        (y, dx, dclip)
    };
    let (y, dx, dclip) = run(&|x, c| qgrad_ops::pact(x, c, bits));
    let (ry, rdx, rdclip) = run(&|x, c| reference::pact(x, c, bits));
    assert_same("pact", &y, &ry);
    assert_same("pact dx", &dx, &rdx);
    assert_same("pact dclip", &dclip, &rdclip);
    // Every output is a step of β / levels inside [0, β].
    let levels = ((1u32 << bits) - 1) as f32;
    for v in y.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        let k = (v / beta * levels).round();
        assert!((0.0..=levels).contains(&k), "{v} outside [0, {beta}]");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn pact_equals_candles_composition(
        seed in any::<u64>(),
        n in 1usize..6,
        c in 1usize..40,
        hw in prop::sample::select(vec![0usize, 1, 3]),
        bits in 1u8..=8,
        beta in prop::sample::select(vec![1e-3f32, 0.37, 1.0, 2.0, 6.5]),
    ) {
        if hw == 0 {
            check_pact(seed, &[n, c], bits, beta);
        } else {
            check_pact(seed, &[n, c, hw, hw], bits, beta);
        }
    }

    #[test]
    fn straight_through_equals_candles_composition(
        seed in any::<u64>(),
        rows in 1usize..20,
        cols in 1usize..30,
    ) {
        let len = rows * cols;
        let w = Var::from_vec(inputs(seed, len, 1.0, 3), (rows, cols), &Device::Cpu).unwrap();
        let hat: Vec<f32> = inputs(seed ^ 7, len, 0.5, 1);
        let r = Tensor::from_vec(inputs(seed ^ 3, len, 1.0, 3), (rows, cols), &Device::Cpu).unwrap();
        let run = |f: &dyn Fn(&Tensor, Vec<f32>) -> candle_core::Result<Tensor>| {
            let y = f(w.as_tensor(), hat.clone()).unwrap();
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(&w).unwrap().clone())
        };
        let (y, dw) = run(&|w, v| qgrad_ops::straight_through(w, v));
        let (ry, rdw) = run(&|w, v| reference::straight_through(w, v));
        assert_same("straight-through", &y, &ry);
        assert_same("straight-through dw", &dw, &rdw);
        assert_same("straight-through values", &y, &Tensor::from_vec(hat.clone(), (rows, cols), &Device::Cpu).unwrap());
    }
}

#[test]
fn bad_arguments_are_errors() {
    let x = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let clip = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    assert!(qgrad_ops::pact(&x, &clip, 0).is_err());
    assert!(qgrad_ops::pact(&x, &clip, 17).is_err());
    let two = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    assert!(qgrad_ops::pact(&x, &two, 2).is_err());
    assert!(qgrad_ops::straight_through(&x, vec![0.0; 5]).is_err());
    // Not f32: candle's composition, the same numbers.
    let x64 = Tensor::new(&[[-1.0f64, 0.5, 5.0]], &Device::Cpu).unwrap();
    let clip64 = Tensor::new(&[2.0f64], &Device::Cpu).unwrap();
    let y = qgrad_ops::pact(&x64, &clip64, 2).unwrap();
    assert_eq!(y.to_vec2::<f64>().unwrap(), vec![vec![0.0, 2.0 / 3.0, 2.0]]);
}
