//! Exact round trips against qgrad-fixed, layout choice, size accounting.

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{compression_ratio, CompressedModel, Layout, LayoutChoice};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Decoding gives exactly fake_quantize of the input, for every width mix
    /// and layout, and the report accounts for every bit of the file.
    #[test]
    fn round_trip_is_exact(tensors in model(), layout in layout_choice()) {
        let bytes = encode(&tensors, layout);
        let m = decode(&bytes);
        prop_assert_eq!(m.tensors.len(), tensors.len());
        prop_assert_eq!(m.metadata_value("model"), Some("test"));
        for t in &tensors {
            let d = m.tensor(&t.name).unwrap();
            let e = expected_exponent(t);
            prop_assert_eq!(d.exponent, e);
            prop_assert_eq!(&d.shape, &t.shape);
            let expected = qgrad_fixed::fake_quantize(&t.values, &t.widths, e).unwrap();
            let got = d.dequantize();
            prop_assert_eq!(got.len(), expected.len());
            for (i, (g, x)) in got.iter().zip(&expected).enumerate() {
                // == treats -0.0 and 0.0 alike: a stored zero decodes as +0.0.
                prop_assert!(g == x, "element {}: decoded {} expected {}", i, g, x);
            }
            let widths = d.widths();
            for i in 0..expected.len() {
                let w = if expected[i] == 0.0 { 0 } else { t.widths[i] };
                prop_assert_eq!(widths[i], w);
            }
            let nnz = expected.iter().filter(|v| **v != 0.0).count();
            prop_assert_eq!(d.nnz(), nnz);
            let hist_total: usize = d.width_histogram().iter().map(|(_, n)| n).sum();
            prop_assert_eq!(hist_total, expected.len());
            match layout {
                LayoutChoice::Csr => prop_assert_eq!(d.layout, Layout::Csr),
                LayoutChoice::CsrRice => prop_assert_eq!(d.layout, Layout::CsrRice),
                LayoutChoice::FlatGaps => {
                    prop_assert!(matches!(d.layout, Layout::FlatGaps | Layout::CsrRice))
                }
                LayoutChoice::Dense if nnz > 0 => prop_assert_eq!(d.layout, Layout::Dense),
                _ => {}
            }
        }
        let report = m.size_report();
        let tensor_bits: u64 = report.tensors.iter().map(|t| t.bits.total()).sum();
        prop_assert_eq!(report.overhead_bits + tensor_bits, 8 * bytes.len() as u64);
        prop_assert_eq!(report.file_bytes, bytes.len() as u64);
    }

    /// Auto picks the smallest of the four layouts (the file with layout 2
    /// or 4 is version 3 or 5, whose header has one more byte per tensor).
    /// Layout 4 where admissible, that is.
    #[test]
    fn auto_layout_is_never_larger(t in tensor("w".into())) {
        let ts = [t];
        let auto = encode(&ts, LayoutChoice::Auto).len();
        let csr = encode(&ts, LayoutChoice::Csr).len();
        let dense = encode(&ts, LayoutChoice::Dense).len();
        let rice = encode(&ts, LayoutChoice::CsrRice).len();
        let flat = encode(&ts, LayoutChoice::FlatGaps).len();
        prop_assert_eq!(
            auto,
            csr.min(dense).min(rice).min(flat),
            "csr {} dense {} rice {} flat {}", csr, dense, rice, flat
        );
    }
}

#[test]
fn ratio_equals_the_real_file_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qgz");
    let tensors = [
        sample_tensor(
            "fc1.weight",
            300,
            784,
            &[[0u8; 18].as_slice(), &[4, 8]].concat(),
            1,
        ),
        sample_tensor("fc1.bias", 1, 300, &[8, 16, 32], 2),
    ];
    let data: Vec<_> = tensors.iter().map(|t| t.data()).collect();
    let report = qgrad_csr::write_file(&path, &data, &Default::default()).unwrap();
    let on_disk = std::fs::metadata(&path).unwrap().len();
    let params = 300 * 784 + 300;
    assert_eq!(report.file_bytes, on_disk);
    assert_eq!(report.parameters, params);
    assert_eq!(report.ratio, 32.0 * params as f64 / (8.0 * on_disk as f64));
    assert_eq!(report.ratio, compression_ratio(params, on_disk));
    let m = CompressedModel::read_file(&path).unwrap();
    assert_eq!(m.size_report(), report);
    // About 90 % pruned: the gaps (mean ~10) Rice-code in ~5 bits, half of
    // layout 0's 10-bit column indices, and layout 4 needs no row pointers.
    assert!(report.ratio > 8.0, "ratio {}", report.ratio);
    let fc1 = &report.tensors[0];
    assert_eq!(fc1.layout, Layout::FlatGaps);
    assert_eq!(fc1.bits.row_ptr, 0);
    assert!(
        fc1.bits.col_idx < fc1.nnz * 7,
        "{} gap bits for {} non-zeros",
        fc1.bits.col_idx,
        fc1.nnz
    );
    assert_eq!(fc1.bits.tags, fc1.nnz, "two widths need a 1-bit tag");
    // Layout 0 spends 10 bits per column index on 784 columns.
    let csr_opts = qgrad_csr::EncodeOptions {
        layout: qgrad_csr::LayoutChoice::Csr,
        ..Default::default()
    };
    let csr = CompressedModel::from_bytes(&qgrad_csr::encode(&data, &csr_opts).unwrap()).unwrap();
    let csr_fc1 = &csr.size_report().tensors[0];
    assert_eq!(csr_fc1.layout, Layout::Csr);
    assert_eq!(
        csr_fc1.bits.col_idx,
        fc1.nnz * 10,
        "784 columns need 10 bits"
    );
    assert!(csr.size_report().file_bytes > report.file_bytes);
    // What layout 4 saves: layout 0's (and 2's) 301 row pointers.
    assert_eq!(
        csr_fc1.bits.row_ptr,
        301 * (64 - fc1.nnz.leading_zeros() as u64)
    );
    let bias = &report.tensors[1];
    assert_eq!(
        bias.bits.row_ptr + bias.bits.col_idx,
        0,
        "a dense bias has no index fields"
    );
    assert_eq!(bias.layout, Layout::Dense);
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"ratio\""));
}

#[test]
fn field_widths_follow_the_method() {
    // One row of 5 columns, two non-zeros of widths 4 and 8.
    let t = OwnedTensor {
        name: "w".into(),
        shape: vec![1, 5],
        values: vec![0.5, 0.0, 0.0, -0.25, 0.0],
        widths: vec![4, 8, 8, 8, 0],
    };
    let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Csr));
    let b = m.tensors[0].field_bits();
    assert_eq!(b.row_ptr, 2 * 2, "2 pointers of ceil(log2(2+1)) = 2 bits");
    assert_eq!(b.col_idx, 2 * 3, "ceil(log2 5) = 3 bits per column");
    assert_eq!(b.tags, 2, "two widths: 1-bit tags");
    assert_eq!(b.values, 4 + 8);
    assert_eq!(b.padding, 0, "4 + 6 + 2 + 12 = 24 bits fill 3 bytes");
    assert_eq!(m.tensors[0].width_histogram(), vec![(0, 3), (4, 1), (8, 1)]);
}

#[test]
fn an_all_pruned_tensor_is_a_few_bytes() {
    let t = OwnedTensor {
        name: "zeros".into(),
        shape: vec![10, 10],
        values: vec![1.0; 100],
        widths: vec![0; 100],
    };
    let m = decode(&encode(std::slice::from_ref(&t), LayoutChoice::Dense));
    let d = &m.tensors[0];
    assert_eq!(d.layout, Layout::Csr, "a tensor without non-zeros is CSR");
    assert_eq!(d.nnz(), 0);
    assert!(d.dequantize().iter().all(|&v| v == 0.0));
    assert_eq!(d.field_bits().row_ptr, 11);
}

#[test]
fn bad_input_is_an_error() {
    let ok = OwnedTensor {
        name: "w".into(),
        shape: vec![2, 2],
        values: vec![1.0; 4],
        widths: vec![8; 4],
    };
    let mut bad_width = ok.clone();
    bad_width.widths[1] = 1;
    let mut nan = ok.clone();
    nan.values[2] = f32::NAN;
    let mut wrong_len = ok.clone();
    wrong_len.values.pop();
    let mut huge = ok.clone();
    huge.values[0] = f32::MAX;
    huge.widths[0] = 32;
    for (t, needle) in [
        (bad_width, "width 1"),
        (nan, "not finite"),
        (wrong_len, "3 values"),
        (huge, "exponent"),
    ] {
        let err = qgrad_csr::encode(&[t.data()], &Default::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
    let twice = qgrad_csr::encode(&[ok.data(), ok.data()], &Default::default()).unwrap_err();
    assert!(twice.to_string().contains("twice"), "{twice}");
    // A NaN in a pruned element is irrelevant: it is not stored.
    let mut pruned_nan = ok;
    pruned_nan.values[0] = f32::NAN;
    pruned_nan.widths[0] = 0;
    assert!(qgrad_csr::encode(&[pruned_nan.data()], &Default::default()).is_ok());
}

#[test]
fn failed_writes_leave_the_previous_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qgz");
    let good = sample_tensor("w", 4, 4, &[0, 8], 3);
    qgrad_csr::write_file(&path, &[good.data()], &Default::default()).unwrap();
    let before = std::fs::read(&path).unwrap();

    // The encoder fails: nothing is written.
    let mut bad = good.clone();
    bad.values[0] = f32::INFINITY;
    bad.widths[0] = 8;
    assert!(qgrad_csr::write_file(&path, &[bad.data()], &Default::default()).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // The rename fails (the target is a non-empty directory): the temporary file is removed.
    let blocker = dir.path().join("blocked");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), b"x").unwrap();
    let err = qgrad_csr::write_file(&blocker, &[good.data()], &Default::default()).unwrap_err();
    assert!(matches!(err, qgrad_csr::CsrError::Io { .. }), "{err}");
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["blocked", "model.qgz"],
        "no temporary file is left behind"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // A directory that does not exist: an I/O error naming the path, no file.
    let missing = dir.path().join("no/such/dir/model.qgz");
    let err = qgrad_csr::write_file(&missing, &[good.data()], &Default::default()).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
    assert!(!missing.exists());
}

/// A tensor quantized during training keeps its exponent in the file: values
/// already on the grid of exponent `e` must decode unchanged even when the
/// exponent re-derived from them would be smaller (here 0.5 → -1, which would
/// saturate 0.5 to 0.25 at 2 bits).
#[test]
fn an_explicit_exponent_is_kept() {
    let values = [0.5f32, -0.5, 0.0, 0.5];
    let widths = [2u8, 2, 2, 2];
    let tensor = |exponent| qgrad_csr::TensorData {
        name: "t",
        shape: &[4],
        values: &values,
        widths: &widths,
        exponent,
    };
    let options = qgrad_csr::EncodeOptions::default();
    let kept = qgrad_csr::encode(&[tensor(Some(0))], &options).unwrap();
    let model = qgrad_csr::CompressedModel::from_bytes(&kept).unwrap();
    assert_eq!(model.tensors[0].exponent, 0);
    assert_eq!(model.tensors[0].dequantize(), values.to_vec());
    let derived = qgrad_csr::encode(&[tensor(None)], &options).unwrap();
    let model = qgrad_csr::CompressedModel::from_bytes(&derived).unwrap();
    assert_eq!(model.tensors[0].exponent, -1);
    assert_eq!(model.tensors[0].dequantize(), vec![0.25, -0.5, 0.0, 0.25]);
}

/// A written file gets the permissions any file the user creates gets
/// (`0o666` less the umask), not a temporary file's private `0o600`.
#[cfg(unix)]
#[test]
fn written_files_have_the_usual_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::File::create(&plain).unwrap();
    let path = dir.path().join("model.qgz");
    let t = sample_tensor("w", 2, 3, &[8], 1);
    qgrad_csr::write_file(&path, &[t.data()], &Default::default()).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), mode(&plain));
}
