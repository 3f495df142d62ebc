//! Version-1 files stay readable: `fixtures/v1.qgz` was written by the
//! version-1 encoder (before scaled tensors existed) and must decode to
//! exactly what it decoded to then: values, widths, layouts, field bits and
//! integer products.

use qgrad_csr::{CompressedModel, FieldBits, FixedActivations, Layout, TensorKind};

const V1: &[u8] = include_bytes!("fixtures/v1.qgz");

fn bits(
    header: u64,
    row_ptr: u64,
    col_idx: u64,
    values: u64,
    tags: u64,
    padding: u64,
) -> FieldBits {
    FieldBits {
        header,
        row_ptr,
        col_idx,
        values,
        tags,
        scales: 0,
        padding,
    }
}

#[test]
fn the_fixture_is_a_version_1_file() {
    assert_eq!(V1.len(), 170);
    assert_eq!(&V1[..8], b"QGRADCSR");
    assert_eq!(u32::from_le_bytes(V1[8..12].try_into().unwrap()), 1);
    // The stored CRC32 (the file's last 4 bytes) pins the fixture's content.
    assert_eq!(&V1[166..], &[0x51, 0x80, 0xbe, 0xf2]);
}

#[test]
fn version_1_decodes_exactly_as_before() {
    let m = CompressedModel::from_bytes(V1).unwrap();
    assert_eq!(
        m.metadata,
        vec![
            ("arch".to_string(), "fixture".to_string()),
            ("qgrad_version".to_string(), "0.1.0".to_string())
        ]
    );
    assert_eq!(m.file_bytes(), 170);
    let names: Vec<&str> = m.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["fc.weight", "fc.bias", "conv.weight", "pruned"]);

    let fc = m.tensor("fc.weight").unwrap();
    assert_eq!(fc.shape, vec![3, 4]);
    assert_eq!(fc.kind(), TensorKind::Fixed { exponent: 2 });
    assert_eq!(fc.layout, Layout::Csr);
    assert_eq!(fc.width_table(), &[4, 8, 16, 32]);
    assert_eq!(
        fc.dequantize(),
        vec![0.5, 0.0, -0.5, 0.125, 1.5, -3.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    );
    assert_eq!(fc.widths(), vec![8, 0, 4, 8, 16, 32, 0, 4, 0, 0, 0, 8]);
    assert_eq!(fc.field_bits(), bits(176, 12, 14, 80, 14, 0));

    let bias = m.tensor("fc.bias").unwrap();
    assert_eq!(bias.kind(), TensorKind::Fixed { exponent: -1 });
    assert_eq!(bias.layout, Layout::Csr);
    assert_eq!(bias.dequantize(), vec![0.25, -0.5, 0.0]);
    assert_eq!(bias.field_bits(), bits(128, 4, 4, 16, 0, 0));

    let conv = m.tensor("conv.weight").unwrap();
    assert_eq!(conv.shape, vec![2, 1, 2, 2]);
    assert_eq!(conv.kind(), TensorKind::Fixed { exponent: 1 });
    assert_eq!(conv.layout, Layout::Dense);
    assert_eq!(conv.width_table(), &[0, 4, 8, 32]);
    assert_eq!(
        conv.dequantize(),
        vec![0.5, -0.5, 0.25, 0.0, 0.1, -0.75, 0.0, 0.375]
    );
    assert_eq!(conv.widths(), vec![4, 4, 4, 0, 32, 4, 0, 8]);
    assert_eq!(conv.field_bits(), bits(208, 0, 0, 56, 16, 0));

    let pruned = m.tensor("pruned").unwrap();
    assert_eq!(pruned.nnz(), 0);
    assert_eq!(pruned.dequantize(), vec![0.0; 6]);
    assert_eq!(pruned.field_bits(), bits(120, 3, 0, 0, 0, 5));

    let report = m.size_report();
    assert_eq!(report.overhead_bits, 504);
    let total: u64 = report.tensors.iter().map(|t| t.bits.total()).sum();
    assert_eq!(total + report.overhead_bits, 8 * 170);
    assert_eq!(report.ratio, 32.0 * 29.0 / (8.0 * 170.0));

    let x = FixedActivations::quantize(&[1.0, -0.5, 0.25, 2.0], 1, 4, 8).unwrap();
    assert_eq!(fc.matmul(&x).unwrap(), vec![0.6230469, 4.984375, -1.984375]);
}

/// Re-encoding a version-1 model's fixed tensor writes version 1 again (no
/// tensor needs version 2), with the same tensor and header bits.
#[test]
fn re_encoding_fixed_tensors_writes_version_1() {
    let m = CompressedModel::from_bytes(V1).unwrap();
    let fc = m.tensor("fc.weight").unwrap();
    let values = fc.dequantize();
    let widths = fc.widths();
    let t = qgrad_csr::TensorData {
        name: "fc.weight",
        shape: &fc.shape,
        values: &values,
        widths: &widths,
        exponent: Some(fc.exponent),
    };
    let bytes = qgrad_csr::encode(&[t], &Default::default()).unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    let again = CompressedModel::from_bytes(&bytes).unwrap();
    assert_eq!(again.tensors[0].dequantize(), values);
    assert_eq!(again.tensors[0].field_bits(), fc.field_bits());
}

#[test]
fn a_version_1_file_re_encodes_to_the_same_tensors() {
    let old = CompressedModel::from_bytes(V1).unwrap();
    for layout in [
        qgrad_csr::LayoutChoice::Auto,
        qgrad_csr::LayoutChoice::CsrRice,
        qgrad_csr::LayoutChoice::Csr,
    ] {
        let bytes = qgrad_csr::reencode(&old, layout).unwrap();
        let new = CompressedModel::from_bytes(&bytes).unwrap();
        assert_eq!(new.metadata, old.metadata);
        assert_eq!(new.tensors.len(), old.tensors.len());
        for (a, b) in new.tensors.iter().zip(&old.tensors) {
            assert_eq!(
                (&a.name, &a.shape, a.exponent),
                (&b.name, &b.shape, b.exponent)
            );
            assert_eq!(a.widths(), b.widths());
            assert_eq!(a.dequantize(), b.dequantize());
        }
        if layout == qgrad_csr::LayoutChoice::Auto {
            // Either layout 2 made it smaller (version 3), or it is the very
            // file the version-1 writer wrote.
            if bytes[8..12] == 1u32.to_le_bytes() {
                assert_eq!(bytes, V1);
            } else {
                assert!(bytes.len() < V1.len());
            }
        }
    }
}
