//! Scaled tensors (format version 2): exact round trips of every level kind,
//! group layout and storage layout, the size targets, input validation and
//! the FORMAT.md example.

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{
    encode_tensors, CompressedModel, CsrError, EncodeOptions, Layout, LayoutChoice, LevelKind,
    ScaledInfo, ScaledTensorData, TensorInput, TensorKind, FORMAT_VERSION,
};

/// Checks one decoded scaled tensor against its input, element for element.
fn check_scaled(t: &OwnedScaled, m: &CompressedModel) -> Result<(), TestCaseError> {
    let d = m.tensor(&t.name).unwrap();
    let info = ScaledInfo {
        levels: t.levels,
        max_code: t.max_code,
        groups: t.groups,
        two_sided: t.two_sided,
    };
    prop_assert_eq!(d.kind(), TensorKind::Scaled(info));
    prop_assert_eq!(d.scaled_info(), Some(info));
    prop_assert_eq!(&d.shape, &t.shape);
    prop_assert_eq!(d.exponent, 0);
    prop_assert_eq!(d.codes().unwrap(), t.codes.clone());
    let stored: Vec<u32> = d.scales().iter().map(|s| s.to_bits()).collect();
    let given: Vec<u32> = t.scales.iter().map(|s| (s + 0.0).to_bits()).collect();
    prop_assert_eq!(stored, given);
    let expected = t.expected_values();
    let got = d.dequantize();
    prop_assert_eq!(got.len(), expected.len());
    for (i, (g, x)) in got.iter().zip(&expected).enumerate() {
        // Bit for bit, except that a zero decodes as +0.0.
        prop_assert!(
            g.to_bits() == x.to_bits() || (*g == 0.0 && *x == 0.0),
            "element {}: decoded {} expected {} (code {})",
            i,
            g,
            x,
            t.codes[i]
        );
    }
    let nnz = t.codes.iter().filter(|&&c| c != 0).count();
    prop_assert_eq!(d.nnz(), nnz);
    let code_bits = info.code_bits();
    let widths = d.widths();
    for (i, &c) in t.codes.iter().enumerate() {
        prop_assert_eq!(widths[i], if c == 0 { 0 } else { code_bits });
    }
    let hist = d.width_histogram();
    prop_assert_eq!(hist.iter().map(|(_, n)| n).sum::<usize>(), t.codes.len());
    let b = d.field_bits();
    prop_assert_eq!(b.scales, 32 * t.scales.len() as u64);
    prop_assert_eq!(b.tags, 0);
    match d.layout {
        Layout::Dense => {
            prop_assert_eq!(b.values, t.codes.len() as u64 * u64::from(code_bits));
            prop_assert_eq!(b.row_ptr + b.col_idx, 0);
        }
        Layout::Csr | Layout::CsrRice => {
            prop_assert_eq!(b.values, nnz as u64 * u64::from(info.nonzero_code_bits()));
        }
        // No row pointers: the rows follow from the row-major gaps.
        Layout::FlatGaps => {
            prop_assert_eq!(b.values, nnz as u64 * u64::from(info.nonzero_code_bits()));
            prop_assert_eq!(b.row_ptr, 0);
        }
        // Every element of a kept block is stored, zero or not.
        Layout::Block => {
            prop_assert!(b.values >= nnz as u64 * u64::from(code_bits));
            prop_assert_eq!(b.values % u64::from(code_bits), 0);
        }
    }
    Ok(())
}

fn check_report(m: &CompressedModel, bytes: &[u8]) -> Result<(), TestCaseError> {
    let report = m.size_report();
    let tensor_bits: u64 = report.tensors.iter().map(|t| t.bits.total()).sum();
    prop_assert_eq!(report.overhead_bits + tensor_bits, 8 * bytes.len() as u64);
    prop_assert_eq!(report.file_bytes, bytes.len() as u64);
    for (t, d) in report.tensors.iter().zip(&m.tensors) {
        prop_assert_eq!(t.kind, d.kind());
        prop_assert_eq!(t.layout, d.layout);
        let hist: u64 = t.width_histogram.iter().map(|(_, n)| n).sum();
        prop_assert_eq!(hist, t.parameters);
    }
    Ok(())
}

/// Whether a decoded file holds a scaled tensor.
fn m_has_scaled(bytes: &[u8]) -> bool {
    decode(bytes)
        .tensors
        .iter()
        .any(|t| matches!(t.kind(), TensorKind::Scaled(_)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Models mixing both kinds decode exactly, in every layout policy.
    #[test]
    fn mixed_round_trip_is_exact(tensors in mixed_model(), layout in layout_choice()) {
        let bytes = encode_mixed(&tensors, layout);
        // Version 2 only when a tensor needs it (FORMAT.md §11).
        let any_scaled = m_has_scaled(&bytes);
        let newest_layout = decode(&bytes)
            .tensors
            .iter()
            .map(|t| t.layout.min_version())
            .max()
            .unwrap_or(1);
        let version: u32 = if any_scaled { newest_layout.max(2) } else { newest_layout };
        prop_assert_eq!(&bytes[8..12], &version.to_le_bytes());
        prop_assert_eq!(FORMAT_VERSION, 6);
        if layout == LayoutChoice::CsrRice {
            prop_assert_eq!(version, 3);
        }
        let m = decode(&bytes);
        prop_assert_eq!(m.tensors.len(), tensors.len());
        for (t, d) in tensors.iter().zip(&m.tensors) {
            prop_assert_eq!(t.name(), d.name.as_str());
            match t {
                Owned::Scaled(t) => {
                    check_scaled(t, &m)?;
                    match layout {
                        LayoutChoice::Csr => prop_assert_eq!(d.layout, Layout::Csr),
                        LayoutChoice::CsrRice => prop_assert_eq!(d.layout, Layout::CsrRice),
                        LayoutChoice::Dense => prop_assert_eq!(d.layout, Layout::Dense),
                        // Block when some block shape holds it, else CSR.
                        LayoutChoice::Block => {
                            prop_assert!(matches!(d.layout, Layout::Block | Layout::Csr))
                        }
                        // Layout 4 where the payload bounds the rows, else layout 2.
                        LayoutChoice::FlatGaps => prop_assert!(matches!(
                            d.layout,
                            Layout::FlatGaps | Layout::CsrRice
                        )),
                        LayoutChoice::Auto => {}
                    }
                }
                Owned::Fixed(t) => {
                    let e = expected_exponent(t);
                    prop_assert_eq!(d.kind(), TensorKind::Fixed { exponent: e });
                    prop_assert!(d.scales().is_empty() && d.codes().is_none());
                    let expected = qgrad_fixed::fake_quantize(&t.values, &t.widths, e).unwrap();
                    prop_assert_eq!(d.dequantize(), expected);
                }
            }
        }
        check_report(&m, &bytes)?;
        // Re-encoding gives the same tensors, never a larger file under Auto.
        let again = qgrad_csr::reencode(&m, LayoutChoice::Auto).unwrap();
        let m2 = decode(&again);
        for (a, b) in m2.tensors.iter().zip(&m.tensors) {
            prop_assert_eq!(a.dequantize(), b.dequantize());
            prop_assert_eq!(a.codes(), b.codes());
            prop_assert_eq!(a.scales(), b.scales());
        }
        if layout == LayoutChoice::Auto {
            prop_assert_eq!(again.len(), bytes.len());
        }
    }

    /// Auto keeps the smallest layout of a scaled tensor (layout 3 aside,
    /// which `tests/block.rs` covers).
    #[test]
    fn auto_layout_is_never_larger(t in scaled_tensor("w".into())) {
        let ts = [t];
        let auto = encode_scaled(&ts, LayoutChoice::Auto).len();
        let csr = encode_scaled(&ts, LayoutChoice::Csr).len();
        let dense = encode_scaled(&ts, LayoutChoice::Dense).len();
        let rice = encode_scaled(&ts, LayoutChoice::CsrRice).len();
        let flat = encode_scaled(&ts, LayoutChoice::FlatGaps).len();
        let block = encode_scaled(&ts, LayoutChoice::Block).len();
        prop_assert_eq!(
            auto,
            csr.min(dense).min(rice).min(flat).min(block),
            "csr {} dense {} rice {} flat {} block {}", csr, dense, rice, flat, block
        );
    }
}

/// Every level kind, both layouts, every group layout, on fixed seeds
/// (including the largest codes and an empty tensor).
#[test]
fn every_kind_and_layout_round_trips() {
    let kinds = [
        (LevelKind::Binary, 1),
        (LevelKind::Linear, 1),
        (LevelKind::Linear, 3),
        (LevelKind::Linear, 127),
        (LevelKind::Log, 1),
        (LevelKind::Log, 7),
        (LevelKind::Log, 127),
    ];
    let mut seed = 0;
    for (levels, n) in kinds {
        for shape in [
            vec![5, 12],
            vec![3, 2, 2, 2],
            vec![7],
            vec![],
            vec![0],
            vec![4, 0],
        ] {
            for groups in [
                Groups::One,
                Groups::Rows,
                Groups::Divisor(1),
                Groups::Divisor(99),
            ] {
                for two_sided in [false, true] {
                    for zeros in [0.0, 0.8, 1.0] {
                        seed += 1;
                        let t = OwnedScaled::sample(
                            "w",
                            shape.clone(),
                            levels,
                            n,
                            zeros,
                            groups,
                            two_sided,
                            seed,
                        );
                        for layout in [
                            LayoutChoice::Csr,
                            LayoutChoice::Dense,
                            LayoutChoice::CsrRice,
                            LayoutChoice::Auto,
                        ] {
                            let bytes = encode_scaled(std::slice::from_ref(&t), layout);
                            let m = decode(&bytes);
                            check_scaled(&t, &m).unwrap();
                            check_report(&m, &bytes).unwrap();
                        }
                    }
                }
            }
        }
    }
}

/// Codes at the extremes of every width, and every code of a 3-bit tensor,
/// in both layouts.
#[test]
fn extreme_codes_round_trip() {
    for n in [1u8, 2, 3, 7, 15, 31, 63, 64, 100, 127] {
        let n_i = n as i8;
        let codes = vec![n_i, -n_i, 0, 1, -1, n_i, 0, -n_i];
        for levels in [LevelKind::Linear, LevelKind::Log] {
            let t = OwnedScaled {
                name: "x".into(),
                shape: vec![2, 4],
                codes: codes.clone(),
                levels,
                max_code: n,
                groups: 2,
                two_sided: true,
                scales: vec![1.0, 0.5, 0.25, 2.0],
            };
            for layout in [
                LayoutChoice::Csr,
                LayoutChoice::Dense,
                LayoutChoice::CsrRice,
            ] {
                let m = decode(&encode_scaled(std::slice::from_ref(&t), layout));
                check_scaled(&t, &m).unwrap();
            }
        }
    }
}

fn bits_per_weight(
    levels: LevelKind,
    n: u8,
    zeros: f64,
    groups: Groups,
) -> (Layout, f64, qgrad_csr::FieldBits, f64) {
    let t = OwnedScaled::sample(
        "fc1.weight",
        vec![784, 2048],
        levels,
        n,
        zeros,
        groups,
        false,
        5,
    );
    let bytes = encode_scaled(std::slice::from_ref(&t), LayoutChoice::Auto);
    let report = decode(&bytes).size_report();
    let ts = &report.tensors[0];
    let file_bpw = 8.0 * bytes.len() as f64 / ts.parameters as f64;
    (ts.layout, ts.bits_per_parameter(), ts.bits, file_bpw)
}

/// The size targets: a 784 × 2048 binary tensor takes at most 1.01 bits per
/// weight including its scale and header entry; ternary dense at most 2;
/// 3-bit dense 3; sparse ternary goes to CSR with Rice-coded gaps below 2.
#[test]
fn size_targets() {
    let (layout, bpw, bits, file) = bits_per_weight(LevelKind::Binary, 1, 0.0, Groups::One);
    println!("binary, 1 scale:       {layout} {bpw:.5} bits/weight (file {file:.5}) {bits:?}");
    assert_eq!(layout, Layout::Dense);
    assert!(bpw <= 1.01, "{bpw}");
    assert!(file <= 1.01, "{file}");
    assert_eq!(bits.values, 784 * 2048);
    assert_eq!(bits.scales, 32);

    let (layout, bpw, bits, _) = bits_per_weight(LevelKind::Binary, 1, 0.0, Groups::Rows);
    println!("binary, 784 scales:    {layout} {bpw:.5} bits/weight {bits:?}");
    assert_eq!(bits.scales, 784 * 32);
    assert!(
        bpw <= 1.0 + 784.0 * 32.0 / (784.0 * 2048.0) + 0.001,
        "{bpw}"
    );

    for zeros in [0.0, 0.5] {
        let (layout, bpw, bits, _) = bits_per_weight(LevelKind::Linear, 1, zeros, Groups::One);
        println!("ternary, {zeros} zeros:    {layout} {bpw:.5} bits/weight {bits:?}");
        if zeros == 0.0 {
            assert_eq!(layout, Layout::Dense);
        }
        // Half zeros: Rice-coded gaps (about 2 bits) and a 1-bit code per
        // non-zero already beat 2 bits per weight.
        assert!(bpw <= 2.001, "{bpw}");
    }
    let (layout, bpw, bits, _) = bits_per_weight(LevelKind::Linear, 1, 0.95, Groups::One);
    println!("ternary, 0.95 zeros:   {layout} {bpw:.5} bits/weight {bits:?}");
    // Uniformly scattered zeros: Rice-coded row-major gaps, no row pointers.
    assert_eq!(layout, Layout::FlatGaps);
    assert!(bpw < 0.45, "about 7 bits per non-zero at 5 %: {bpw}");

    let (layout, bpw, bits, _) = bits_per_weight(LevelKind::Linear, 3, 0.2, Groups::One);
    println!("3-bit linear:          {layout} {bpw:.5} bits/weight {bits:?}");
    assert_eq!(layout, Layout::Dense);
    assert!(bpw <= 3.001, "{bpw}");
    let (layout, bpw, bits, _) = bits_per_weight(LevelKind::Log, 3, 0.2, Groups::Rows);
    println!("3-bit log, per row:    {layout} {bpw:.5} bits/weight {bits:?}");
    assert!(bpw <= 3.02, "{bpw}");
}

fn scaled<'a>(codes: &'a [i8], scales: &'a [f32]) -> ScaledTensorData<'a> {
    ScaledTensorData {
        name: "s",
        shape: &[2, 3],
        codes,
        levels: LevelKind::Linear,
        max_code: 1,
        groups: 1,
        two_sided: false,
        scales,
    }
}

fn encode_err(t: ScaledTensorData) -> CsrError {
    encode_tensors(&[TensorInput::Scaled(t)], &EncodeOptions::default())
        .expect_err("invalid input must be refused")
}

#[test]
fn bad_scaled_input_is_a_typed_error() {
    let ok_codes = [1i8, 0, -1, 0, 1, 1];
    assert!(encode_tensors(&[scaled(&ok_codes, &[1.0]).into()], &Default::default()).is_ok());
    // A code beyond max_code.
    let e = encode_err(scaled(&[1, 0, 2, 0, 0, 0], &[1.0]));
    assert!(
        matches!(
            e,
            CsrError::CodeOutOfRange {
                index: 2,
                code: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("-1..=1"), "{e}");
    let e = encode_err(scaled(&[1, 0, -128, 0, 0, 0], &[1.0]));
    assert!(
        matches!(e, CsrError::CodeOutOfRange { code: -128, .. }),
        "{e}"
    );
    // A zero code in a binary tensor: only the block layout (version 4)
    // holds it, as a pruned element; the older layouts refuse it.
    let mut b = scaled(&ok_codes, &[1.0]);
    b.levels = LevelKind::Binary;
    let bytes = qgrad_csr::encode_tensors(
        &[qgrad_csr::TensorInput::Scaled(b)],
        &qgrad_csr::EncodeOptions::default(),
    )
    .unwrap();
    let m = CompressedModel::from_bytes(&bytes).unwrap();
    assert_eq!(m.tensors[0].layout, Layout::Block);
    assert_eq!(m.tensors[0].codes().unwrap(), ok_codes.to_vec());
    // max_code not allowed for the levels.
    for (levels, n) in [
        (LevelKind::Binary, 3),
        (LevelKind::Linear, 0),
        (LevelKind::Log, 128),
        (LevelKind::Linear, 255),
    ] {
        let mut t = scaled(&ok_codes, &[1.0]);
        t.levels = levels;
        t.max_code = n;
        let e = encode_err(t);
        assert!(matches!(e, CsrError::InvalidMaxCode { .. }), "{e}");
    }
    // Groups: zero, not a divisor.
    for g in [0, 4, 7] {
        let mut t = scaled(&ok_codes, &[1.0; 7]);
        t.groups = g;
        let e = encode_err(t);
        assert!(
            matches!(e, CsrError::InvalidGroups { .. }),
            "groups {g}: {e}"
        );
    }
    // Scale count: one-sided, two-sided, per-row.
    let e = encode_err(scaled(&ok_codes, &[1.0, 2.0]));
    assert!(
        matches!(
            e,
            CsrError::ScaleCount {
                found: 2,
                expected: 1,
                ..
            }
        ),
        "{e}"
    );
    let mut t = scaled(&ok_codes, &[1.0, 2.0, 3.0]);
    t.two_sided = true;
    t.groups = 2;
    let e = encode_err(t);
    assert!(
        matches!(
            e,
            CsrError::ScaleCount {
                found: 3,
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    let e = encode_err(scaled(&ok_codes, &[]));
    assert!(matches!(e, CsrError::ScaleCount { .. }), "{e}");
    // Scales: negative, NaN, infinite.
    for s in [-1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-40] {
        let e = encode_err(scaled(&ok_codes, &[s]));
        assert!(
            matches!(e, CsrError::InvalidScale { index: 0, .. }),
            "{s}: {e}"
        );
    }
    // Wrong number of codes, and a name used by a fixed and a scaled tensor.
    let e = encode_err(scaled(&ok_codes[..5], &[1.0]));
    assert!(e.to_string().contains("5 codes"), "{e}");
    let values = [1.0f32; 2];
    let fixed = qgrad_csr::TensorData {
        name: "s",
        shape: &[2],
        values: &values,
        widths: &[8, 8],
        exponent: None,
    };
    let e = encode_tensors(
        &[fixed.into(), scaled(&ok_codes, &[1.0]).into()],
        &Default::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("twice"), "{e}");
    // -0.0 is a valid scale, stored as +0.0.
    let bytes = encode_tensors(&[scaled(&ok_codes, &[-0.0]).into()], &Default::default()).unwrap();
    let m = decode(&bytes);
    assert_eq!(m.tensors[0].scales()[0].to_bits(), 0);
    assert!(m.tensors[0].dequantize().iter().all(|&v| v == 0.0));
}

#[test]
fn write_file_tensors_is_atomic_and_reports_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qgz");
    let w = OwnedScaled::sample(
        "fc.weight",
        vec![30, 40],
        LevelKind::Linear,
        1,
        0.5,
        Groups::Rows,
        true,
        3,
    );
    let b = sample_tensor("fc.bias", 1, 30, &[8], 4);
    let inputs = [TensorInput::Scaled(w.data()), TensorInput::Fixed(b.data())];
    let report = qgrad_csr::write_file_tensors(&path, &inputs, &Default::default()).unwrap();
    let on_disk = std::fs::metadata(&path).unwrap().len();
    assert_eq!(report.file_bytes, on_disk);
    assert_eq!(report.parameters, 30 * 40 + 30);
    let m = CompressedModel::read_file(&path).unwrap();
    assert_eq!(m.size_report(), report);
    check_scaled(&w, &m).unwrap();
    let before = std::fs::read(&path).unwrap();
    // A failing encode leaves the file as it was.
    let mut bad = w.clone();
    bad.codes[0] = 5;
    let inputs = [TensorInput::Scaled(bad.data())];
    assert!(qgrad_csr::write_file_tensors(&path, &inputs, &Default::default()).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file is left behind");
    // The JSON report names the kind.
    let json = serde_json::to_string(&report).unwrap();
    assert!(
        json.contains("\"Scaled\"") && json.contains("\"Fixed\""),
        "{json}"
    );
}

/// FORMAT.md §10, byte for byte.
#[test]
fn format_md_scaled_example_is_byte_exact() {
    let b = ScaledTensorData {
        name: "b",
        shape: &[4],
        codes: &[1, -1, -1, 1],
        levels: LevelKind::Binary,
        max_code: 1,
        groups: 1,
        two_sided: false,
        scales: &[0.25],
    };
    let mut codes = [0i8; 16];
    codes[5] = -1;
    codes[12] = 1;
    let t = ScaledTensorData {
        name: "t",
        shape: &[16],
        codes: &codes,
        levels: LevelKind::Linear,
        max_code: 1,
        groups: 1,
        two_sided: true,
        scales: &[0.5, 0.75],
    };
    let bytes = encode_tensors(&[b.into(), t.into()], &Default::default()).unwrap();
    let hex = "51 47 52 41 44 43 53 52  02 00 00 00  1a 00 00 00  45 00 00 00 00 00 00 00
               00 02 01 01 62 01 04 01 00 01 00 01 04 05 01 01 74 01 10 00 01 01 01 01 02 0a
               06 00 00 e8 03
               58 1c 00 00 c0 0f 00 00 d0 0f
               32 ea 9f 2f";
    let expected: Vec<u8> = hex
        .split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(bytes, expected);
    let m = decode(&bytes);
    assert_eq!(m.tensors[0].dequantize(), vec![0.25, -0.25, -0.25, 0.25]);
    assert_eq!(m.tensors[0].layout, Layout::Dense);
    assert_eq!(m.tensors[1].layout, Layout::Csr);
    let mut values = vec![0.0f32; 16];
    values[5] = -0.75;
    values[12] = 0.5;
    assert_eq!(m.tensors[1].dequantize(), values);
}
