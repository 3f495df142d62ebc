//! Version-3 files stay readable under the newest reader:
//! `fixtures/v3.qgz` was written by the version-3 encoder (commit 7298e9c,
//! before layout 3 existed) from the inputs rebuilt below: a sparse ternary
//! tensor in layout 2 (Rice-coded gaps), a dense binary tensor with one
//! scale per row, and a fixed-point tensor. It must decode to those inputs;
//! the current writer held to version 3 or 4 must write the same bytes
//! again, and unbounded it writes version 5 (layout 4 for the sparse
//! tensor), smaller, with the same tensors.

mod common;

use common::{fixture_fixed as fixed, fixture_ternary as ternary};
use qgrad_csr::{
    encode_tensors, CompressedModel, EncodeOptions, Layout, LevelKind, ScaledTensorData,
    TensorData, TensorInput,
};

fn at_most(max_version: Option<u32>) -> EncodeOptions {
    EncodeOptions {
        max_version,
        ..Default::default()
    }
}

const V3: &[u8] = include_bytes!("fixtures/v3.qgz");

fn binary() -> Vec<i8> {
    (0..24).map(|i| if i % 3 == 0 { -1 } else { 1 }).collect()
}

#[test]
fn the_fixture_is_a_version_3_file_with_a_layout_2_tensor() {
    assert_eq!(V3.len(), 139);
    assert_eq!(u32::from_le_bytes(V3[8..12].try_into().unwrap()), 3);
    assert_eq!(&V3[135..], &[0x04, 0x8f, 0x05, 0x43]);
    let m = CompressedModel::from_bytes(V3).unwrap();
    let layouts: Vec<Layout> = m.tensors.iter().map(|t| t.layout).collect();
    assert_eq!(layouts[0], Layout::CsrRice);
    assert!(layouts.iter().all(|&l| l != Layout::Block));
}

#[test]
fn version_3_decodes_to_its_inputs_and_the_writer_writes_it_again() {
    let m = CompressedModel::from_bytes(V3).unwrap();
    assert_eq!(m.tensors[0].codes().unwrap(), ternary());
    assert_eq!(m.tensors[0].scales(), &[0.5]);
    assert_eq!(m.tensors[1].codes().unwrap(), binary());
    assert_eq!(m.tensors[1].scales(), &[0.25, 0.5, 0.75, 1.0]);
    let (values, widths) = fixed();
    let e = m.tensors[2].exponent;
    assert_eq!(
        m.tensors[2].dequantize(),
        qgrad_fixed::fake_quantize(&values, &widths, e).unwrap()
    );
    let (t, b) = (ternary(), binary());
    let inputs = [
        TensorInput::Scaled(ScaledTensorData {
            name: "t",
            shape: &[6, 200],
            codes: &t,
            levels: LevelKind::Linear,
            max_code: 1,
            groups: 1,
            two_sided: false,
            scales: &[0.5],
        }),
        TensorInput::Scaled(ScaledTensorData {
            name: "b",
            shape: &[4, 6],
            codes: &b,
            levels: LevelKind::Binary,
            max_code: 1,
            groups: 4,
            two_sided: false,
            scales: &[0.25, 0.5, 0.75, 1.0],
        }),
        TensorInput::Fixed(TensorData {
            name: "f",
            shape: &[3, 4],
            values: &values,
            widths: &widths,
            exponent: None,
        }),
    ];
    for max in [3, 4] {
        assert_eq!(encode_tensors(&inputs, &at_most(Some(max))).unwrap(), V3);
    }
    let newest = encode_tensors(&inputs, &at_most(None)).unwrap();
    assert_eq!(u32::from_le_bytes(newest[8..12].try_into().unwrap()), 5);
    assert!(newest.len() < V3.len());
    let n = CompressedModel::from_bytes(&newest).unwrap();
    assert_eq!(n.tensors[0].layout, Layout::FlatGaps);
    for (a, b) in n.tensors.iter().zip(&m.tensors) {
        assert_eq!(a.dequantize(), b.dequantize());
        assert_eq!(a.scales(), b.scales());
    }
    // Version 2 has no layout 2: the sparse tensor goes to layout 0.
    let v2 = encode_tensors(&inputs, &at_most(Some(2))).unwrap();
    assert_eq!(u32::from_le_bytes(v2[8..12].try_into().unwrap()), 2);
    let m2 = CompressedModel::from_bytes(&v2).unwrap();
    assert_eq!(m2.tensors[0].layout, Layout::Csr);
    // Version 1 cannot hold scaled tensors, and there is no version 7.
    let e = encode_tensors(&inputs, &at_most(Some(1))).unwrap_err();
    assert!(
        e.to_string()
            .contains("the scaled tensor `t` needs version 2"),
        "{e}"
    );
    assert!(encode_tensors(&inputs, &at_most(Some(7))).is_err());
    assert!(encode_tensors(&inputs, &at_most(Some(0))).is_err());
}
