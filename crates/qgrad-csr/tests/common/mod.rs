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
        Just(LayoutChoice::Dense)
    ]
}

pub fn encode(tensors: &[OwnedTensor], layout: LayoutChoice) -> Vec<u8> {
    let data: Vec<TensorData> = tensors.iter().map(OwnedTensor::data).collect();
    qgrad_csr::encode(
        &data,
        &EncodeOptions {
            layout,
            metadata: vec![("model".into(), "test".into())],
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
