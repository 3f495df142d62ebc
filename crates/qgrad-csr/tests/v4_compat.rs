//! Version-4 files stay readable under the version-5 reader:
//! `fixtures/v4.qgz` was written by the version-4 encoder (commit 3d0968f,
//! before layout 4 existed) from the inputs rebuilt below: a sparse ternary
//! tensor in layout 2 (Rice-coded column gaps), a 3-bit tensor of 4 × 4
//! blocks in layout 3 with one scale per row, and a fixed-point tensor. It
//! must decode to those inputs; the current writer held to version 4 must
//! write the same bytes again, and unbounded it writes version 5 with the
//! same tensors.

mod common;

use common::{fixture_fixed as fixed, fixture_ternary as ternary};
use qgrad_csr::{
    encode_tensors, CompressedModel, EncodeOptions, Layout, LevelKind, ScaledTensorData,
    TensorData, TensorInput,
};

const V4: &[u8] = include_bytes!("fixtures/v4.qgz");

/// 8 × 16 codes: the 4 × 4 blocks with an even block-row plus block-column
/// are kept, their codes cycling through ±1, ±2, ±3.
fn blocks() -> Vec<i8> {
    (0..128)
        .map(|i| {
            let (r, c) = (i / 16, i % 16);
            if (r / 4 + c / 4) % 2 == 0 {
                [1i8, -2, 3, -1, 2, -3][i % 6]
            } else {
                0
            }
        })
        .collect()
}

const BLOCK_SCALES: [f32; 8] = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0];

fn version(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes[8..12].try_into().unwrap())
}

#[test]
fn the_fixture_is_a_version_4_file_with_layouts_2_and_3() {
    assert_eq!(V4.len(), 189);
    assert_eq!(version(V4), 4);
    assert_eq!(&V4[185..], &[0x4b, 0xe8, 0x52, 0xc2]);
    let m = CompressedModel::from_bytes(V4).unwrap();
    let layouts: Vec<Layout> = m.tensors.iter().map(|t| t.layout).collect();
    assert_eq!(layouts, [Layout::CsrRice, Layout::Block, Layout::Dense]);
    assert_eq!(m.tensors[1].block_shape(), Some((4, 4)));
}

#[test]
fn version_4_decodes_to_its_inputs_and_the_writer_writes_it_again() {
    let m = CompressedModel::from_bytes(V4).unwrap();
    assert_eq!(m.tensors[0].codes().unwrap(), ternary());
    assert_eq!(m.tensors[0].scales(), &[0.5]);
    assert_eq!(m.tensors[1].codes().unwrap(), blocks());
    assert_eq!(m.tensors[1].scales(), &BLOCK_SCALES);
    let (values, widths) = fixed();
    let e = m.tensors[2].exponent;
    assert_eq!(
        m.tensors[2].dequantize(),
        qgrad_fixed::fake_quantize(&values, &widths, e).unwrap()
    );
    let (t, b) = (ternary(), blocks());
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
            name: "blk",
            shape: &[8, 16],
            codes: &b,
            levels: LevelKind::Linear,
            max_code: 3,
            groups: 8,
            two_sided: false,
            scales: &BLOCK_SCALES,
        }),
        TensorInput::Fixed(TensorData {
            name: "f",
            shape: &[3, 4],
            values: &values,
            widths: &widths,
            exponent: None,
        }),
    ];
    let v4 = EncodeOptions {
        max_version: Some(4),
        ..Default::default()
    };
    assert_eq!(encode_tensors(&inputs, &v4).unwrap(), V4);
    // Re-encoding the decoded file for a version-4 reader gives it back too.
    assert_eq!(
        qgrad_csr::reencode_up_to(&m, qgrad_csr::LayoutChoice::Auto, Some(4)).unwrap(),
        V4
    );
    let newest = encode_tensors(&inputs, &EncodeOptions::default()).unwrap();
    assert_eq!(version(&newest), 5);
    assert!(newest.len() < V4.len());
    let n = CompressedModel::from_bytes(&newest).unwrap();
    assert_eq!(n.tensors[0].layout, Layout::FlatGaps);
    assert_eq!(n.tensors[1].layout, Layout::Block);
    for (a, b) in n.tensors.iter().zip(&m.tensors) {
        assert_eq!(a.dequantize(), b.dequantize());
        assert_eq!(a.scales(), b.scales());
    }
    // Layout 3 asked for, in a file held to version 3: a clear error.
    let v3_block = EncodeOptions {
        layout: qgrad_csr::LayoutChoice::Block,
        max_version: Some(3),
        ..Default::default()
    };
    let e = encode_tensors(&inputs, &v3_block).unwrap_err();
    assert!(e.to_string().contains("needs version 4"), "{e}");
}
