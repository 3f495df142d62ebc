//! Shared generators for the integration tests.
#![allow(dead_code)]

use proptest::prelude::*;
use qgrad_csr::{CompressedModel, EncodeOptions, LayoutChoice, TensorData};

/// Every width the format stores.
pub const ALL_WIDTHS: [u8; 17] = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 32];

/// An owned tensor to encode.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
    pub widths: Vec<u8>,
}

impl OwnedTensor {
    pub fn data(&self) -> TensorData<'_> {
        TensorData {
            name: &self.name,
            shape: &self.shape,
            values: &self.values,
            widths: &self.widths,
            exponent: None,
        }
    }
}

pub fn shapes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        (1usize..40).prop_map(|n| vec![n]),
        (1usize..9, 1usize..40).prop_map(|(r, c)| vec![r, c]),
        (1usize..5, 1usize..4, 1usize..4).prop_map(|(o, c, k)| vec![o, c, k, k]),
        Just(vec![]),
    ]
}

/// A value: mostly small, sometimes exactly zero, sometimes large.
pub fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => -1.0f32..1.0,
        1 => Just(0.0f32),
        1 => -300.0f32..300.0,
        1 => -1e-4f32..1e-4,
    ]
}

/// A tensor whose widths are drawn from a random non-empty subset of the widths.
pub fn tensor(name: String) -> impl Strategy<Value = OwnedTensor> {
    (
        shapes(),
        proptest::sample::subsequence(ALL_WIDTHS.to_vec(), 1..=ALL_WIDTHS.len()),
    )
        .prop_flat_map(move |(shape, mix)| {
            let n: usize = shape.iter().product();
            let name = name.clone();
            (
                proptest::collection::vec(value(), n),
                proptest::collection::vec(proptest::sample::select(mix), n),
            )
                .prop_map(move |(values, widths)| OwnedTensor {
                    name: name.clone(),
                    shape: shape.clone(),
                    values,
                    widths,
                })
        })
}

pub fn model() -> impl Strategy<Value = Vec<OwnedTensor>> {
    (1usize..4).prop_flat_map(|k| {
        (0..k)
            .map(|i| tensor(format!("layer{i}.weight")))
            .collect::<Vec<_>>()
    })
}

pub fn layout_choice() -> impl Strategy<Value = LayoutChoice> {
    prop_oneof![
        Just(LayoutChoice::Auto),
        Just(LayoutChoice::Csr),
        Just(LayoutChoice::Dense),
        Just(LayoutChoice::CsrRice),
        Just(LayoutChoice::Block),
        Just(LayoutChoice::FlatGaps)
    ]
}

pub fn encode(tensors: &[OwnedTensor], layout: LayoutChoice) -> Vec<u8> {
    let data: Vec<TensorData> = tensors.iter().map(OwnedTensor::data).collect();
    qgrad_csr::encode(
        &data,
        &EncodeOptions {
            layout,
            metadata: vec![("model".into(), "test".into())],
            ..Default::default()
        },
    )
    .expect("valid input encodes")
}

/// The exponent the encoder must use: that of the non-pruned values.
pub fn expected_exponent(t: &OwnedTensor) -> i32 {
    let kept: Vec<f32> = t
        .values
        .iter()
        .zip(&t.widths)
        .filter(|(_, &w)| w != 0)
        .map(|(&v, _)| v)
        .collect();
    qgrad_fixed::tensor_exponent(&kept).unwrap()
}

/// A deterministic sparse tensor with the given widths for tests that need a fixed file.
pub fn sample_tensor(
    name: &str,
    rows: usize,
    cols: usize,
    widths: &[u8],
    seed: u64,
) -> OwnedTensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = rows * cols;
    let values = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    let widths = (0..n)
        .map(|_| widths[rng.random_range(0..widths.len())])
        .collect();
    OwnedTensor {
        name: name.into(),
        shape: vec![rows, cols],
        values,
        widths,
    }
}

pub fn decode(bytes: &[u8]) -> CompressedModel {
    CompressedModel::from_bytes(bytes).expect("valid file decodes")
}

// ---------------------------------------------------------------- scaled tensors

use qgrad_csr::{LevelKind, ScaledTensorData, TensorInput};

/// An owned scaled tensor to encode.
#[derive(Clone, Debug)]
pub struct OwnedScaled {
    pub name: String,
    pub shape: Vec<usize>,
    pub codes: Vec<i8>,
    pub levels: LevelKind,
    pub max_code: u8,
    pub groups: usize,
    pub two_sided: bool,
    pub scales: Vec<f32>,
}

impl OwnedScaled {
    pub fn data(&self) -> ScaledTensorData<'_> {
        ScaledTensorData {
            name: &self.name,
            shape: &self.shape,
            codes: &self.codes,
            levels: self.levels,
            max_code: self.max_code,
            groups: self.groups,
            two_sided: self.two_sided,
            scales: &self.scales,
        }
    }

    /// The level of a code, written from qgrad-scaled's `Method::level`
    /// independently of the crate.
    pub fn level(&self, code: i8) -> f32 {
        let n = self.max_code as i32;
        let k = code as i32;
        match self.levels {
            LevelKind::Binary => k as f32,
            LevelKind::Linear => k as f32 / n as f32,
            LevelKind::Log if k == 0 => 0.0,
            LevelKind::Log => (k.signum() as f32) * 2f32.powi(k.abs() - n),
        }
    }

    /// The scale of element `i`.
    pub fn scale_of(&self, i: usize) -> f32 {
        let per = self.codes.len() / self.groups;
        let spg = if self.two_sided { 2 } else { 1 };
        let side = usize::from(self.two_sided && self.codes[i] < 0);
        self.scales[(i / per) * spg + side]
    }

    /// `scale · level(code)` per element, as qgrad-scaled computes `values`.
    pub fn expected_values(&self) -> Vec<f32> {
        (0..self.codes.len())
            .map(|i| self.scale_of(i) * self.level(self.codes[i]))
            .collect()
    }

    pub fn rows_cols(&self) -> (usize, usize) {
        if self.shape.len() <= 1 {
            (1, self.shape.first().copied().unwrap_or(1))
        } else {
            (self.shape[0], self.shape[1..].iter().product())
        }
    }

    /// A deterministic scaled tensor from a seed.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        name: &str,
        shape: Vec<usize>,
        levels: LevelKind,
        max_code: u8,
        zero_fraction: f64,
        groups: Groups,
        two_sided: bool,
        seed: u64,
    ) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let e: usize = if shape.is_empty() {
            1
        } else {
            shape.iter().product()
        };
        let codes: Vec<i8> = (0..e)
            .map(|_| {
                if levels == LevelKind::Binary {
                    if rng.random_bool(0.5) {
                        1
                    } else {
                        -1
                    }
                } else if rng.random_bool(zero_fraction) {
                    0
                } else {
                    let m = rng.random_range(1..=max_code as i32) as i8;
                    if rng.random_bool(0.5) {
                        m
                    } else {
                        -m
                    }
                }
            })
            .collect();
        let rows = if shape.len() <= 1 { 1 } else { shape[0] };
        let groups = match groups {
            Groups::One => 1,
            Groups::Rows if e > 0 => rows,
            Groups::Rows => 1,
            Groups::Divisor(d) => {
                let divisors: Vec<usize> =
                    (1..=e.max(1)).filter(|g| e.is_multiple_of(*g)).collect();
                if e == 0 {
                    1
                } else {
                    divisors[d % divisors.len()]
                }
            }
        };
        let spg = if two_sided { 2 } else { 1 };
        let scales = (0..groups * spg)
            .map(|_| {
                if rng.random_bool(0.1) {
                    0.0
                } else {
                    rng.random_range(0.0f32..2.0)
                }
            })
            .collect();
        OwnedScaled {
            name: name.into(),
            shape,
            codes,
            levels,
            max_code,
            groups,
            two_sided,
            scales,
        }
    }
}

/// How a sample tensor's scale groups are chosen.
#[derive(Clone, Copy, Debug)]
pub enum Groups {
    One,
    Rows,
    /// The `d`-th divisor of the element count (mod their number).
    Divisor(usize),
}

/// `(levels, max_code)`: binary, ternary, m-bit linear, m-bit log (`m <= max_bits`).
pub fn level_kind(max_bits: u8) -> impl Strategy<Value = (LevelKind, u8)> {
    let m_bit = move |log: bool| {
        (2u8..=max_bits).prop_map(move |m| {
            let n = ((1u32 << (m - 1)) - 1) as u8;
            (
                if log {
                    LevelKind::Log
                } else {
                    LevelKind::Linear
                },
                n,
            )
        })
    };
    prop_oneof![
        Just((LevelKind::Binary, 1u8)),
        Just((LevelKind::Linear, 1u8)),
        m_bit(false),
        m_bit(true),
        (1u8..=127).prop_map(|n| (LevelKind::Linear, n)),
    ]
}

pub fn groups() -> impl Strategy<Value = Groups> {
    prop_oneof![
        Just(Groups::One),
        Just(Groups::Rows),
        any::<usize>().prop_map(Groups::Divisor),
    ]
}

pub fn scaled_tensor_with(
    name: String,
    shape: impl Strategy<Value = Vec<usize>>,
    max_bits: u8,
) -> impl Strategy<Value = OwnedScaled> {
    (
        shape,
        level_kind(max_bits),
        prop_oneof![Just(0.0), Just(0.3), Just(0.9), Just(1.0)],
        groups(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(move |(shape, (levels, n), zeros, g, two, seed)| {
            OwnedScaled::sample(&name, shape, levels, n, zeros, g, two, seed)
        })
}

pub fn scaled_tensor(name: String) -> impl Strategy<Value = OwnedScaled> {
    scaled_tensor_with(name, shapes(), 8)
}

/// Either kind, owned.
#[derive(Clone, Debug)]
pub enum Owned {
    Fixed(OwnedTensor),
    Scaled(OwnedScaled),
}

impl Owned {
    pub fn input(&self) -> TensorInput<'_> {
        match self {
            Owned::Fixed(t) => TensorInput::Fixed(t.data()),
            Owned::Scaled(t) => TensorInput::Scaled(t.data()),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Owned::Fixed(t) => &t.name,
            Owned::Scaled(t) => &t.name,
        }
    }
}

/// A model of 1..4 tensors, each fixed or scaled.
pub fn mixed_model() -> impl Strategy<Value = Vec<Owned>> {
    (1usize..4).prop_flat_map(|k| {
        (0..k)
            .map(|i| {
                let name = format!("layer{i}.weight");
                prop_oneof![
                    1 => tensor(name.clone()).prop_map(Owned::Fixed),
                    2 => scaled_tensor(name).prop_map(Owned::Scaled),
                ]
            })
            .collect::<Vec<_>>()
    })
}

pub fn encode_mixed(tensors: &[Owned], layout: LayoutChoice) -> Vec<u8> {
    let inputs: Vec<TensorInput> = tensors.iter().map(Owned::input).collect();
    qgrad_csr::encode_tensors(
        &inputs,
        &EncodeOptions {
            layout,
            metadata: vec![("model".into(), "test".into())],
            ..Default::default()
        },
    )
    .expect("valid input encodes")
}

pub fn encode_scaled(tensors: &[OwnedScaled], layout: LayoutChoice) -> Vec<u8> {
    let inputs: Vec<TensorInput> = tensors
        .iter()
        .map(|t| TensorInput::Scaled(t.data()))
        .collect();
    qgrad_csr::encode_tensors(
        &inputs,
        &EncodeOptions {
            layout,
            metadata: vec![],
            ..Default::default()
        },
    )
    .expect("valid input encodes")
}

/// The sparse ternary codes (6 × 200) of the compatibility fixtures
/// (`fixtures/v3.qgz`, `fixtures/v4.qgz`): +1 every 61st element, -1 every
/// 97th, else 0.
pub fn fixture_ternary() -> Vec<i8> {
    (0..1200)
        .map(|i| {
            if i % 61 == 0 {
                1
            } else if i % 97 == 0 {
                -1
            } else {
                0
            }
        })
        .collect()
}

/// The fixed-point tensor (3 × 4 values and widths 0, 4, 8) of the
/// compatibility fixtures.
pub fn fixture_fixed() -> (Vec<f32>, Vec<u8>) {
    (
        (0..12).map(|i| (i as f32 - 5.5) * 0.25).collect(),
        (0..12).map(|i| [0u8, 4, 8][i % 3]).collect(),
    )
}
