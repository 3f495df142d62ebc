//! Every class of bad file gives its named error, and no mutation of a valid
//! file panics. The hostile files are written from FORMAT.md with mirror
//! structs, which also checks that the specification matches the code.
// Binary literals below are grouped by field (value | column | pointers), not by nibble.
#![allow(clippy::unusual_byte_groupings)]

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{CompressedModel, CsrError, LayoutChoice};
use serde::Serialize;

/// FORMAT.md's version-2 header, transcribed.
#[derive(Serialize)]
struct Header {
    metadata: Vec<(String, String)>,
    tensors: Vec<Entry>,
}

/// FORMAT.md's version-1 header.
#[derive(Serialize)]
struct HeaderV1 {
    metadata: Vec<(String, String)>,
    tensors: Vec<Tensor>,
}

/// A version-2 tensor entry: the variant index, then the fields.
#[derive(Serialize)]
enum Entry {
    Fixed(Tensor),
    Scaled(Scaled),
}

/// FORMAT.md §7.1, with the enums and the bool as plain integers so that
/// invalid values can be written.
#[derive(Serialize, Clone)]
struct Scaled {
    name: String,
    shape: Vec<u64>,
    layout: u32,
    levels: u32,
    max_code: u8,
    two_sided: u8, // postcard writes a bool as one byte 0 or 1
    groups: u64,
    nnz: u64,
    payload_bytes: u64,
}

#[derive(Serialize)]
struct Tensor {
    name: String,
    shape: Vec<u64>,
    exponent: i32,
    layout: u32, // postcard writes an enum variant as a varint, like a u32
    width_table: Vec<u8>,
    nnz: u64,
    payload_bytes: u64,
}

/// Assembles a version-2 file exactly as FORMAT.md says, with a valid checksum.
fn assemble(header: &Header, payload: &[u8]) -> Vec<u8> {
    assemble_raw(2, &postcard::to_allocvec(header).unwrap(), payload)
}

/// The same for a version-1 header.
fn assemble_v1(header: &HeaderV1, payload: &[u8]) -> Vec<u8> {
    assemble_raw(1, &postcard::to_allocvec(header).unwrap(), payload)
}

fn assemble_raw(version: u32, h: &[u8], payload: &[u8]) -> Vec<u8> {
    let len = 24 + h.len() + payload.len() + 4;
    let mut out = b"QGRADCSR".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn fix_checksum(bytes: &mut [u8]) {
    if bytes.len() >= 4 {
        let end = bytes.len() - 4;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The same tensors in the newest file and in a version-4 file.
fn valid_files() -> Vec<Vec<u8>> {
    let t = [
        Owned::Fixed(sample_tensor("a", 6, 20, &[0, 0, 4, 8, 32], 7)),
        Owned::Fixed(sample_tensor("b", 1, 9, &[8], 8)),
        Owned::Scaled(OwnedScaled::sample(
            "c",
            vec![3, 7],
            qgrad_csr::LevelKind::Linear,
            3,
            0.3,
            Groups::Rows,
            true,
            9,
        )),
        Owned::Scaled(OwnedScaled::sample(
            "d",
            vec![4, 20],
            qgrad_csr::LevelKind::Linear,
            1,
            0.9,
            Groups::One,
            false,
            10,
        )),
        Owned::Scaled(OwnedScaled::sample(
            "e",
            vec![2, 9],
            qgrad_csr::LevelKind::Binary,
            1,
            0.0,
            Groups::One,
            false,
            11,
        )),
    ];
    // The sparse ternary tensor takes layout 4 (row-major gaps) in the
    // newest file and layout 2 (Rice-coded column gaps) in a version-4 file,
    // so that the corruption tests below cover both.
    let newest = encode_mixed(&t, LayoutChoice::Auto);
    let m = decode(&newest);
    assert_eq!(
        m.tensors[3].layout,
        qgrad_csr::Layout::FlatGaps,
        "sparse ternary"
    );
    assert_eq!(m.tensors[2].layout, qgrad_csr::Layout::Dense);
    let inputs: Vec<_> = t.iter().map(Owned::input).collect();
    let v4 = qgrad_csr::encode_tensors(
        &inputs,
        &qgrad_csr::EncodeOptions {
            max_version: Some(4),
            ..Default::default()
        },
    )
    .unwrap();
    let m = decode(&v4);
    assert_eq!(
        m.tensors[3].layout,
        qgrad_csr::Layout::CsrRice,
        "sparse ternary"
    );
    vec![newest, v4]
}

fn err(bytes: &[u8]) -> CsrError {
    CompressedModel::from_bytes(bytes).expect_err("corrupt file must not decode")
}

#[test]
fn the_mirror_structs_write_a_file_the_reader_accepts() {
    // One row of 3 columns holding 5 (4-bit) at column 2, exponent 3: value 5 · 2^0.
    // Bits: row_ptr 0,1 (1 bit each) | col 2 (2 bits) | value 0101 (4 bits) = 8 bits.
    let payload = [0b0101_10_1_0u8];
    let tensor = || Tensor {
        name: "w".into(),
        shape: vec![3],
        exponent: 3,
        layout: 0,
        width_table: vec![4],
        nnz: 1,
        payload_bytes: 1,
    };
    let header = Header {
        metadata: vec![("k".into(), "v".into())],
        tensors: vec![Entry::Fixed(tensor())],
    };
    let m = CompressedModel::from_bytes(&assemble(&header, &payload)).unwrap();
    assert_eq!(m.metadata_value("k"), Some("v"));
    assert_eq!(m.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
    // The same tensor in a version-1 file (no kind in the entry).
    let v1 = HeaderV1 {
        metadata: vec![("k".into(), "v".into())],
        tensors: vec![tensor()],
    };
    let m1 = CompressedModel::from_bytes(&assemble_v1(&v1, &payload)).unwrap();
    assert_eq!(m1.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
    assert_eq!(
        m1.tensors[0].field_bits().header + 8,
        m.tensors[0].field_bits().header
    );
    // A version-2 entry read as version 1, and the reverse, are refused.
    let h2 = postcard::to_allocvec(&header).unwrap();
    assert!(CompressedModel::from_bytes(&assemble_raw(1, &h2, &payload)).is_err());
    let h1 = postcard::to_allocvec(&v1).unwrap();
    assert!(CompressedModel::from_bytes(&assemble_raw(2, &h1, &payload)).is_err());
    // The same tensor in dense layout: tags 1 bit (table [0, 4]).
    // Elements: tag0 | tag0 | tag1 value 0101 = 0,0,1,1010 -> bits 0..7.
    let dense = [0b0_0101_1_0_0u8];
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Fixed(Tensor {
            name: "w".into(),
            shape: vec![3],
            exponent: 3,
            layout: 1,
            width_table: vec![0, 4],
            nnz: 1,
            payload_bytes: 1,
        })],
    };
    let m = CompressedModel::from_bytes(&assemble(&header, &dense)).unwrap();
    assert_eq!(m.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
}

#[test]
fn truncated_files_say_truncated() {
    for bytes in valid_files() {
        for cut in [3, 8, 20, 27, bytes.len() / 2, bytes.len() - 1] {
            let e = err(&bytes[..cut]);
            assert!(matches!(e, CsrError::Truncated { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("truncated"), "{e}");
        }
        assert!(matches!(err(&[]), CsrError::Truncated { .. }));
    }
}

#[test]
fn wrong_magic() {
    for mut bytes in valid_files() {
        bytes[0] = b'P';
        let e = err(&bytes);
        assert!(matches!(e, CsrError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("not a qgrad compressed model"));
        assert!(matches!(err(b"PK\x03\x04"), CsrError::BadMagic { .. }));
    }
}

#[test]
fn future_and_zero_versions() {
    for mut bytes in valid_files() {
        bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = err(&bytes);
        assert_eq!(
            e.to_string(),
            "format version 7 is newer than this reader (6)"
        );
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(err(&bytes), CsrError::InvalidVersion { found: 0 }));
    }
}

#[test]
fn every_single_bit_flip_is_caught() {
    for bytes in valid_files() {
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            let e = err(&b);
            let ok = match i / 8 {
                0..8 => matches!(e, CsrError::BadMagic { .. }),
                // A flip to another supported version is caught by the checksum.
                8..12 => matches!(
                    e,
                    CsrError::UnsupportedVersion { .. }
                        | CsrError::InvalidVersion { .. }
                        | CsrError::ChecksumMismatch { .. }
                ),
                16..24 => matches!(
                    e,
                    CsrError::Truncated { .. } | CsrError::TrailingBytes { .. }
                ),
                _ => matches!(e, CsrError::ChecksumMismatch { .. }),
            };
            assert!(ok, "bit {i}: {e}");
        }
    }
}

#[test]
fn trailing_bytes() {
    for mut bytes in valid_files() {
        bytes.push(0);
        assert!(matches!(
            err(&bytes),
            CsrError::TrailingBytes { extra: 1, .. }
        ));
    }
}

fn hostile(shape: Vec<u64>, layout: u32, table: Vec<u8>, nnz: u64, payload: &[u8]) -> CsrError {
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Fixed(Tensor {
            name: "evil".into(),
            shape,
            exponent: 0,
            layout,
            width_table: table,
            nnz,
            payload_bytes: payload.len() as u64,
        })],
    };
    // The newest version, which admits every layout.
    err(&assemble_raw(
        qgrad_csr::FORMAT_VERSION,
        &postcard::to_allocvec(&header).unwrap(),
        payload,
    ))
}

#[test]
fn hostile_declared_sizes_are_refused_before_allocating() {
    // 4 billion rows of an empty CSR tensor in 2 bytes of payload.
    let e = hostile(vec![u32::MAX as u64 - 1, 1], 0, vec![], 0, &[0, 0]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("evil"), "{e}");
    // The same in layout 4, which has no row pointers: its row count is
    // bounded by the payload's bits all the same.
    let e = hostile(vec![u32::MAX as u64 - 1, 1], 4, vec![], 0, &[0, 0]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    let e = hostile(vec![1 << 15, 1 << 15], 4, vec![8], 1 << 30, &[0; 16]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // Layout 4 in a version-4 file.
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Fixed(Tensor {
            name: "w".into(),
            shape: vec![3],
            exponent: 3,
            layout: 4,
            width_table: vec![],
            nnz: 0,
            payload_bytes: 1,
        })],
    };
    let h = postcard::to_allocvec(&header).unwrap();
    assert!(CompressedModel::from_bytes(&assemble_raw(5, &h, &[0])).is_ok());
    let e = err(&assemble_raw(4, &h, &[0]));
    assert!(e.to_string().contains("needs version 5"), "{e}");
    // A billion non-zeros.
    let e = hostile(vec![1 << 15, 1 << 15], 0, vec![8], 1 << 30, &[0; 16]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // A dense tensor of 2^31 8-bit elements in 16 bytes.
    let e = hostile(vec![1 << 16, 1 << 15], 1, vec![8], 1 << 31, &[0; 16]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // Beyond the format's element limit; and a shape whose product overflows.
    let e = hostile(vec![1 << 20, 1 << 20], 0, vec![], 0, &[0]);
    assert!(e.to_string().contains("limit"), "{e}");
    let e = hostile(vec![1 << 40, 1 << 40, 1 << 40], 0, vec![], 0, &[0]);
    assert!(e.to_string().contains("overflows"), "{e}");
    // A payload length beyond the file.
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Fixed(Tensor {
            name: "evil".into(),
            shape: vec![4],
            exponent: 0,
            layout: 0,
            width_table: vec![],
            nnz: 0,
            payload_bytes: u64::MAX,
        })],
    };
    let e = err(&assemble(&header, &[0]));
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // A header length beyond the file (with a valid checksum).
    let mut bytes = valid_files().remove(0);
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_checksum(&mut bytes);
    assert!(matches!(err(&bytes), CsrError::CorruptHeader(_)));
    // A metadata vector declaring 2^60 entries.
    let mut h = vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
    h.push(0);
    let len = 24 + h.len() + 4;
    let mut bytes = b"QGRADCSR".to_vec();
    bytes.extend_from_slice(&2u32.to_le_bytes());
    bytes.extend_from_slice(&(h.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(len as u64).to_le_bytes());
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(&[0; 4]);
    fix_checksum(&mut bytes);
    assert!(matches!(err(&bytes), CsrError::CorruptHeader(_)));
}

#[test]
fn inconsistent_tensors_are_named() {
    // Row pointer decreasing: rows 2, nnz 1 (1-bit pointers 0,1,0).
    let e = hostile(vec![2, 2], 0, vec![4], 1, &[0b0000_0_0_1_0, 0]);
    assert!(e.to_string().contains("row pointer"), "{e}");
    // Column index out of range: 1 row of 3 columns, col 3.
    let e = hostile(vec![3], 0, vec![4], 1, &[0b0101_11_1_0]);
    assert!(e.to_string().contains("column index 3"), "{e}");
    // A stored zero value.
    let e = hostile(vec![3], 0, vec![4], 1, &[0b0000_10_1_0]);
    assert!(e.to_string().contains("stored value is 0"), "{e}");
    // Non-zero padding: 1 row of 1 column, col bits 0; 1+1 pointer bits + 4 value bits.
    let e = hostile(vec![1], 0, vec![4], 1, &[0b11_0101_1_0]);
    assert!(e.to_string().contains("padding"), "{e}");
    // Bad widths in the table, unsorted table, dense table without non-zeros.
    let e = hostile(vec![3], 0, vec![1], 1, &[0xff; 2]);
    assert!(e.to_string().contains("width table has width 1"), "{e}");
    let e = hostile(vec![3], 0, vec![8, 4], 1, &[0xff; 2]);
    assert!(e.to_string().contains("ascending"), "{e}");
    let e = hostile(vec![3], 1, vec![0], 0, &[0]);
    assert!(e.to_string().contains("dense"), "{e}");
    // Exponent out of range.
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Fixed(Tensor {
            name: "evil".into(),
            shape: vec![1],
            exponent: 1000,
            layout: 0,
            width_table: vec![],
            nnz: 0,
            payload_bytes: 1,
        })],
    };
    let e = err(&assemble(&header, &[0]));
    assert!(e.to_string().contains("exponent 1000"), "{e}");
    // Unknown layout variant.
    let e = hostile(vec![1], 7, vec![], 0, &[0]);
    assert!(matches!(e, CsrError::CorruptHeader(_)), "{e}");
}

/// A mutated file: decoding returns Ok or Err, never panics; if it decodes,
/// using it does not panic either.
fn exercise(bytes: &[u8]) {
    if let Ok(m) = CompressedModel::from_bytes(bytes) {
        let _ = m.size_report();
        for t in &m.tensors {
            let _ = (t.kind(), t.scales());
            if t.num_elements() < 1 << 20 {
                let _ = t.dequantize();
                let _ = t.codes();
                let _ = t.widths();
                let x = qgrad_csr::FixedActivations::quantize(&vec![0.5; t.cols()], 1, t.cols(), 8)
                    .unwrap();
                let _ = t.matmul(&x).unwrap();
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let n = bytes.len();
    match *m {
        Mutation::Flip(i, mask) => bytes[i % n] ^= mask,
        Mutation::Set(i, v) => bytes[i % n] = v,
        Mutation::Insert(i, v) => bytes.insert(i % (n + 1), v),
        Mutation::Remove(i) => {
            bytes.remove(i % n);
        }
        Mutation::Truncate(i) => bytes.truncate(i % n),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Raw mutations (mostly stopped by the checksum) and mutations with the
    /// checksum and declared length repaired (which reach the header and
    /// payload validation) never panic.
    #[test]
    fn mutated_files_never_panic(
        tensors in model(),
        layout in layout_choice(),
        mutations in proptest::collection::vec(mutation(), 1..6),
        repair in any::<bool>(),
    ) {
        let mut bytes = encode(&tensors, layout);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if repair && bytes.len() >= 28 {
            let len = bytes.len() as u64;
            bytes[16..24].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut bytes);
        }
        exercise(&bytes);
    }

    /// The same for models with scaled tensors.
    #[test]
    fn mutated_scaled_files_never_panic(
        tensors in mixed_model(),
        layout in layout_choice(),
        mutations in proptest::collection::vec(mutation(), 1..6),
        repair in any::<bool>(),
    ) {
        let mut bytes = encode_mixed(&tensors, layout);
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if repair && bytes.len() >= 28 {
            let len = bytes.len() as u64;
            bytes[16..24].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut bytes);
        }
        exercise(&bytes);
    }
}

#[test]
fn format_md_example_is_byte_exact() {
    let t = OwnedTensor {
        name: "w".into(),
        shape: vec![3],
        values: vec![0.0, 0.0, 5.0],
        widths: vec![4, 4, 4],
    };
    // Fixed tensors only: the writer writes version 1 (FORMAT.md §9).
    let bytes = qgrad_csr::encode(&[t.data()], &Default::default()).unwrap();
    let mut expected = b"QGRADCSR".to_vec();
    expected.extend_from_slice(&[1, 0, 0, 0, 0x0c, 0, 0, 0, 0x29, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[
        0x00, 0x01, 0x01, 0x77, 0x01, 0x03, 0x06, 0x00, 0x01, 0x04, 0x01, 0x01,
    ]); // H = 12 header bytes
    expected.push(0x5a);
    let crc = crc32fast::hash(&expected);
    expected.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(bytes, expected);
    // The version-2 bytes FORMAT.md §9 prints decode to the same tensor.
    let mut v2 = b"QGRADCSR".to_vec();
    v2.extend_from_slice(&[2, 0, 0, 0, 0x0d, 0, 0, 0, 0x2a, 0, 0, 0, 0, 0, 0, 0]);
    v2.extend_from_slice(&[
        0x00, 0x01, 0x00, 0x01, 0x77, 0x01, 0x03, 0x06, 0x00, 0x01, 0x04, 0x01, 0x01, 0x5a,
    ]);
    v2.extend_from_slice(&[0x2b, 0x6a, 0xba, 0x8b]);
    assert_eq!(
        crc32fast::hash(&v2[..38]).to_le_bytes(),
        [0x2b, 0x6a, 0xba, 0x8b]
    );
    let a = qgrad_csr::CompressedModel::from_bytes(&bytes).unwrap();
    let b = qgrad_csr::CompressedModel::from_bytes(&v2).unwrap();
    assert_eq!(a.tensors[0].dequantize(), b.tensors[0].dequantize());
    assert_eq!(b.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
}

// ------------------------------------------------------------ scaled tensors

/// Packs `(value, bits)` fields LSB first, as FORMAT.md §5 says.
fn pack(fields: &[(u64, u32)]) -> Vec<u8> {
    let mut w = qgrad_fixed::BitWriter::new();
    for &(v, b) in fields {
        w.write_bits(v, b);
    }
    w.finish()
}

const F_HALF: u64 = 0x3f00_0000; // 0.5f32

/// A scaled entry: `layout` 0 CSR / 1 dense, `levels` 0 binary / 1 linear / 2 log.
fn entry(shape: Vec<u64>, layout: u32, levels: u32, max_code: u8, nnz: u64) -> Scaled {
    Scaled {
        name: "evil".into(),
        shape,
        layout,
        levels,
        max_code,
        two_sided: 0,
        groups: 1,
        nnz,
        payload_bytes: 0,
    }
}

fn scaled_file(mut s: Scaled, payload: &[u8]) -> Vec<u8> {
    s.payload_bytes = payload.len() as u64;
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Scaled(s)],
    };
    assemble_raw(
        qgrad_csr::FORMAT_VERSION,
        &postcard::to_allocvec(&header).unwrap(),
        payload,
    )
}

fn hostile_scaled(s: Scaled, payload: &[u8]) -> CsrError {
    err(&scaled_file(s, payload))
}

#[test]
fn the_mirror_structs_write_scaled_files_the_reader_accepts() {
    // Ternary dense [3]: +1, 0, -1 as 01, 00, 11; then one scale 0.5.
    let payload = pack(&[(0b01, 2), (0b00, 2), (0b11, 2), (F_HALF, 32)]);
    let m = decode(&scaled_file(entry(vec![3], 1, 1, 1, 2), &payload));
    assert_eq!(m.tensors[0].dequantize(), vec![0.5, 0.0, -0.5]);
    assert_eq!(m.tensors[0].codes(), Some(vec![1, 0, -1]));
    // The same in CSR: pointers 0, 2 (2 bits), columns 0, 2 (2 bits), codes 0, 1 (1 bit).
    let payload = pack(&[(0, 2), (2, 2), (0, 2), (2, 2), (0, 1), (1, 1), (F_HALF, 32)]);
    let m = decode(&scaled_file(entry(vec![3], 0, 1, 1, 2), &payload));
    assert_eq!(m.tensors[0].dequantize(), vec![0.5, 0.0, -0.5]);
    // 3-bit linear (n = 3) dense: +3 = 011, -1 = 101; CSR: +3 = 010, -1 = 100.
    let payload = pack(&[(0b011, 3), (0b101, 3), (F_HALF, 32)]);
    let m = decode(&scaled_file(entry(vec![2], 1, 1, 3, 2), &payload));
    assert_eq!(m.tensors[0].codes(), Some(vec![3, -1]));
    assert_eq!(m.tensors[0].dequantize(), vec![0.5, 0.5 * (-1.0f32 / 3.0)]);
    let payload = pack(&[
        (0, 2),
        (2, 2),
        (0, 1),
        (1, 1),
        (0b010, 3),
        (0b100, 3),
        (F_HALF, 32),
    ]);
    let m = decode(&scaled_file(entry(vec![2], 0, 1, 3, 2), &payload));
    assert_eq!(m.tensors[0].codes(), Some(vec![3, -1]));
    // Log, n = 3, two-sided: +2 -> 0.5 · 2^-1, -3 -> 0.25 (negative scale) · -1.
    let mut s = entry(vec![2], 1, 2, 3, 2);
    s.two_sided = 1;
    let payload = pack(&[(0b010, 3), (0b111, 3), (F_HALF, 32), (0x3e80_0000, 32)]);
    let m = decode(&scaled_file(s, &payload));
    assert_eq!(m.tensors[0].dequantize(), vec![0.25, -0.25]);
    // Binary dense: 0 = +1, 1 = -1.
    let payload = pack(&[(0, 1), (1, 1), (1, 1), (F_HALF, 32)]);
    let m = decode(&scaled_file(entry(vec![3], 1, 0, 1, 3), &payload));
    assert_eq!(m.tensors[0].dequantize(), vec![0.5, -0.5, -0.5]);
}

#[test]
fn scaled_codes_out_of_range_are_refused() {
    // Ternary dense "-0" (10).
    let payload = pack(&[(0b10, 2), (0b00, 2), (0b01, 2), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![3], 1, 1, 1, 1), &payload);
    assert!(e.to_string().contains("code field"), "{e}");
    // n = 2, dense (3 bits): magnitude 3 > 2.
    let payload = pack(&[(0b011, 3), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![1], 1, 1, 2, 1), &payload);
    assert!(e.to_string().contains("-2..=2"), "{e}");
    // n = 3, dense "-0" (100).
    let payload = pack(&[(0b100, 3), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![1], 1, 2, 3, 0), &payload);
    assert!(e.to_string().contains("code field"), "{e}");
    // n = 3, CSR (3 bits): |k| - 1 = 3, i.e. |k| = 4.
    let payload = pack(&[(0, 1), (1, 1), (0b011, 3), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![1], 0, 1, 3, 1), &payload);
    assert!(e.to_string().contains("code field"), "{e}");
    // max_code not allowed for the levels.
    for (levels, n) in [(0, 2), (1, 0), (2, 128), (1, 255)] {
        let payload = pack(&[(0, 8), (F_HALF, 32)]);
        let e = hostile_scaled(entry(vec![1], 1, levels, n, 1), &payload);
        assert!(e.to_string().contains("max_code"), "{levels} {n}: {e}");
    }
}

#[test]
fn bad_scales_and_scale_counts_are_refused() {
    let codes = [(0b01u64, 2u32), (0b11, 2)];
    let with_scales = |scales: &[u64]| {
        let mut f = codes.to_vec();
        f.extend(scales.iter().map(|&s| (s, 32)));
        pack(&f)
    };
    for bad in [
        f32::NAN.to_bits(),
        (-1.0f32).to_bits(),
        (-0.0f32).to_bits(),
        f32::INFINITY.to_bits(),
        0xff80_0001, // a NaN with the sign bit set
    ] {
        let e = hostile_scaled(entry(vec![2], 1, 1, 1, 2), &with_scales(&[u64::from(bad)]));
        assert!(e.to_string().contains("scale 0"), "{bad:#x}: {e}");
    }
    // Two-sided declared, one scale present.
    let mut s = entry(vec![2], 1, 1, 1, 2);
    s.two_sided = 1;
    let e = hostile_scaled(s.clone(), &with_scales(&[F_HALF]));
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // One-sided declared, two scales present: bytes beyond the stream.
    let e = hostile_scaled(entry(vec![2], 1, 1, 1, 2), &with_scales(&[F_HALF, F_HALF]));
    assert!(e.to_string().contains("beyond the end"), "{e}");
    // Groups: 0, not a divisor, more than the elements.
    for g in [0, 3, 8] {
        let mut s = entry(vec![4], 1, 1, 1, 0);
        s.groups = g;
        let e = hostile_scaled(
            s,
            &pack(&[(0, 8), (F_HALF, 32), (F_HALF, 32), (F_HALF, 32)]),
        );
        assert!(e.to_string().contains("groups"), "groups {g}: {e}");
    }
    // Per-row groups declared with one scale.
    let mut s = entry(vec![2, 2], 1, 1, 1, 0);
    s.groups = 2;
    let e = hostile_scaled(s, &pack(&[(0, 8), (F_HALF, 32)]));
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // The two-sided bool is one byte, 0 or 1.
    let mut s = entry(vec![2], 1, 1, 1, 2);
    s.two_sided = 2;
    let e = hostile_scaled(s, &with_scales(&[F_HALF, F_HALF]));
    assert!(matches!(e, CsrError::CorruptHeader(_)), "{e}");
}

#[test]
fn inconsistent_scaled_tensors_are_named() {
    // Binary with fewer non-zeros than elements.
    let e = hostile_scaled(entry(vec![3], 1, 0, 1, 2), &pack(&[(0, 3), (F_HALF, 32)]));
    assert!(e.to_string().contains("binary"), "{e}");
    // Dense: declared nnz disagrees with the codes (both ways).
    let payload = pack(&[(0b01, 2), (0b00, 2), (0b11, 2), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![3], 1, 1, 1, 3), &payload);
    assert!(e.to_string().contains("2 non-zero codes found"), "{e}");
    let e = hostile_scaled(entry(vec![3], 1, 1, 1, 1), &payload);
    assert!(e.to_string().contains("more non-zero codes"), "{e}");
    // nnz beyond the elements.
    let e = hostile_scaled(entry(vec![3], 1, 1, 1, 4), &payload);
    assert!(e.to_string().contains("4 non-zeros"), "{e}");
    // CSR: a column out of range, a decreasing row pointer.
    let payload = pack(&[(0, 2), (2, 2), (0, 2), (3, 2), (0, 1), (1, 1), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![3], 0, 1, 1, 2), &payload);
    assert!(e.to_string().contains("column index 3"), "{e}");
    let payload = pack(&[(0, 1), (1, 1), (0, 1), (0, 1), (F_HALF, 32)]);
    let e = hostile_scaled(entry(vec![2, 1], 0, 1, 1, 1), &payload);
    assert!(e.to_string().contains("row pointer"), "{e}");
    // Non-zero padding.
    let mut payload = pack(&[(0b01, 2), (F_HALF, 32)]);
    *payload.last_mut().unwrap() |= 0x80;
    let e = hostile_scaled(entry(vec![1], 1, 1, 1, 1), &payload);
    assert!(e.to_string().contains("padding"), "{e}");
    // Unknown layout and level variants are header errors.
    let payload = pack(&[(0b01, 2), (F_HALF, 32)]);
    for (layout, levels) in [(5, 1), (1, 3)] {
        let e = hostile_scaled(entry(vec![1], layout, levels, 1, 1), &payload);
        assert!(matches!(e, CsrError::CorruptHeader(_)), "{e}");
    }
    // An unknown tensor kind.
    let mut h = postcard::to_allocvec(&Header {
        metadata: vec![],
        tensors: vec![Entry::Scaled(Scaled {
            payload_bytes: payload.len() as u64,
            ..entry(vec![1], 1, 1, 1, 1)
        })],
    })
    .unwrap();
    assert_eq!(
        h[2], 1,
        "the kind follows the metadata and the tensor count"
    );
    h[2] = 2;
    let e = err(&assemble_raw(2, &h, &payload));
    assert!(matches!(e, CsrError::CorruptHeader(_)), "{e}");
}

#[test]
fn hostile_scaled_sizes_are_refused_before_allocating() {
    // 2^31 binary elements in 16 bytes.
    let e = hostile_scaled(entry(vec![1 << 16, 1 << 15], 1, 0, 1, 1 << 31), &[0; 16]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // 4 billion rows of an empty CSR tensor.
    let e = hostile_scaled(entry(vec![u32::MAX as u64 - 1, 1], 0, 1, 1, 0), &[0; 8]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // The same in layout 4 (no row pointers, rows bounded all the same).
    let e = hostile_scaled(entry(vec![u32::MAX as u64 - 1, 1], 4, 1, 1, 0), &[0; 8]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    let e = hostile_scaled(entry(vec![1 << 15, 1 << 15], 4, 1, 3, 1 << 30), &[0; 16]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // A scale per element of a 2^32 - 1 element tensor.
    let mut s = entry(vec![u32::MAX as u64], 0, 1, 1, 0);
    s.groups = u32::MAX as u64;
    let e = hostile_scaled(s, &[0; 8]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // Beyond the element limit; a shape whose product overflows.
    let e = hostile_scaled(entry(vec![1 << 20, 1 << 20], 1, 1, 1, 0), &[0; 8]);
    assert!(e.to_string().contains("limit"), "{e}");
    let e = hostile_scaled(entry(vec![1 << 40, 1 << 40, 1 << 40], 1, 1, 1, 0), &[0; 8]);
    assert!(e.to_string().contains("overflows"), "{e}");
}

/// Every cut of a valid file with scaled tensors is an error, also with its
/// declared length and checksum repaired; every single-bit flip of its
/// payload with the checksum repaired decodes or fails, never panics.
#[test]
fn scaled_truncations_and_repaired_flips() {
    for bytes in valid_files() {
        for cut in 0..bytes.len() {
            let e = err(&bytes[..cut]);
            assert!(
                matches!(e, CsrError::Truncated { .. } | CsrError::BadMagic { .. }),
                "cut {cut}: {e}"
            );
            if cut >= 28 {
                let mut b = bytes[..cut].to_vec();
                b[16..24].copy_from_slice(&(cut as u64).to_le_bytes());
                fix_checksum(&mut b);
                assert!(
                    CompressedModel::from_bytes(&b).is_err(),
                    "cut {cut} repaired"
                );
            }
        }
        let header_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        let mut refused = 0;
        for i in (24 + header_len) * 8..(bytes.len() - 4) * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            fix_checksum(&mut b);
            if CompressedModel::from_bytes(&b).is_err() {
                refused += 1;
            }
            exercise(&b);
        }
        assert!(refused > 0);
    }
}
