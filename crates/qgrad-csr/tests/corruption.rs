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

/// FORMAT.md's header, transcribed.
#[derive(Serialize)]
struct Header {
    metadata: Vec<(String, String)>,
    tensors: Vec<Tensor>,
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

/// Assembles a file exactly as FORMAT.md says, with a valid checksum.
fn assemble(header: &Header, payload: &[u8]) -> Vec<u8> {
    let h = postcard::to_allocvec(header).unwrap();
    let len = 24 + h.len() + payload.len() + 4;
    let mut out = b"QGRADCSR".to_vec();
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&h);
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

fn valid_file() -> Vec<u8> {
    let t = [
        sample_tensor("a", 6, 20, &[0, 0, 4, 8, 32], 7),
        sample_tensor("b", 1, 9, &[8], 8),
    ];
    encode(&t, LayoutChoice::Auto)
}

fn err(bytes: &[u8]) -> CsrError {
    CompressedModel::from_bytes(bytes).expect_err("corrupt file must not decode")
}

#[test]
fn the_mirror_structs_write_a_file_the_reader_accepts() {
    // One row of 3 columns holding 5 (4-bit) at column 2, exponent 3: value 5 · 2^0.
    // Bits: row_ptr 0,1 (1 bit each) | col 2 (2 bits) | value 0101 (4 bits) = 8 bits.
    let payload = [0b0101_10_1_0u8];
    let header = Header {
        metadata: vec![("k".into(), "v".into())],
        tensors: vec![Tensor {
            name: "w".into(),
            shape: vec![3],
            exponent: 3,
            layout: 0,
            width_table: vec![4],
            nnz: 1,
            payload_bytes: 1,
        }],
    };
    let m = CompressedModel::from_bytes(&assemble(&header, &payload)).unwrap();
    assert_eq!(m.metadata_value("k"), Some("v"));
    assert_eq!(m.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
    // The same tensor in dense layout: tags 1 bit (table [0, 4]).
    // Elements: tag0 | tag0 | tag1 value 0101 = 0,0,1,1010 -> bits 0..7.
    let dense = [0b0_0101_1_0_0u8];
    let header = Header {
        metadata: vec![],
        tensors: vec![Tensor {
            name: "w".into(),
            shape: vec![3],
            exponent: 3,
            layout: 1,
            width_table: vec![0, 4],
            nnz: 1,
            payload_bytes: 1,
        }],
    };
    let m = CompressedModel::from_bytes(&assemble(&header, &dense)).unwrap();
    assert_eq!(m.tensors[0].dequantize(), vec![0.0, 0.0, 5.0]);
}

#[test]
fn truncated_files_say_truncated() {
    let bytes = valid_file();
    for cut in [3, 8, 20, 27, bytes.len() / 2, bytes.len() - 1] {
        let e = err(&bytes[..cut]);
        assert!(matches!(e, CsrError::Truncated { .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
    assert!(matches!(err(&[]), CsrError::Truncated { .. }));
}

#[test]
fn wrong_magic() {
    let mut bytes = valid_file();
    bytes[0] = b'P';
    let e = err(&bytes);
    assert!(matches!(e, CsrError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("not a qgrad compressed model"));
    assert!(matches!(err(b"PK\x03\x04"), CsrError::BadMagic { .. }));
}

#[test]
fn future_and_zero_versions() {
    let mut bytes = valid_file();
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = err(&bytes);
    assert_eq!(
        e.to_string(),
        "format version 2 is newer than this reader (1)"
    );
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(err(&bytes), CsrError::InvalidVersion { found: 0 }));
}

#[test]
fn every_single_bit_flip_is_caught() {
    let bytes = valid_file();
    for i in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[i / 8] ^= 1 << (i % 8);
        let e = err(&b);
        let ok = match i / 8 {
            0..8 => matches!(e, CsrError::BadMagic { .. }),
            8..12 => matches!(
                e,
                CsrError::UnsupportedVersion { .. } | CsrError::InvalidVersion { .. }
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

#[test]
fn trailing_bytes() {
    let mut bytes = valid_file();
    bytes.push(0);
    assert!(matches!(
        err(&bytes),
        CsrError::TrailingBytes { extra: 1, .. }
    ));
}

fn hostile(shape: Vec<u64>, layout: u32, table: Vec<u8>, nnz: u64, payload: &[u8]) -> CsrError {
    let header = Header {
        metadata: vec![],
        tensors: vec![Tensor {
            name: "evil".into(),
            shape,
            exponent: 0,
            layout,
            width_table: table,
            nnz,
            payload_bytes: payload.len() as u64,
        }],
    };
    err(&assemble(&header, payload))
}

#[test]
fn hostile_declared_sizes_are_refused_before_allocating() {
    // 4 billion rows of an empty CSR tensor in 2 bytes of payload.
    let e = hostile(vec![u32::MAX as u64 - 1, 1], 0, vec![], 0, &[0, 0]);
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    assert!(e.to_string().contains("evil"), "{e}");
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
        tensors: vec![Tensor {
            name: "evil".into(),
            shape: vec![4],
            exponent: 0,
            layout: 0,
            width_table: vec![],
            nnz: 0,
            payload_bytes: u64::MAX,
        }],
    };
    let e = err(&assemble(&header, &[0]));
    assert!(matches!(e, CsrError::DeclaredSizeTooLarge { .. }), "{e}");
    // A header length beyond the file (with a valid checksum).
    let mut bytes = valid_file();
    bytes[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    fix_checksum(&mut bytes);
    assert!(matches!(err(&bytes), CsrError::CorruptHeader(_)));
    // A metadata vector declaring 2^60 entries.
    let mut h = vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10];
    h.push(0);
    let len = 24 + h.len() + 4;
    let mut bytes = b"QGRADCSR".to_vec();
    bytes.extend_from_slice(&1u32.to_le_bytes());
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
        tensors: vec![Tensor {
            name: "evil".into(),
            shape: vec![1],
            exponent: 1000,
            layout: 0,
            width_table: vec![],
            nnz: 0,
            payload_bytes: 1,
        }],
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
            if t.num_elements() < 1 << 20 {
                let _ = t.dequantize();
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
}

#[test]
fn format_md_example_is_byte_exact() {
    let t = OwnedTensor {
        name: "w".into(),
        shape: vec![3],
        values: vec![0.0, 0.0, 5.0],
        widths: vec![4, 4, 4],
    };
    let bytes = qgrad_csr::encode(&[t.data()], &Default::default()).unwrap();
    let mut expected = b"QGRADCSR".to_vec();
    expected.extend_from_slice(&[1, 0, 0, 0, 0x0c, 0, 0, 0, 0x29, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend_from_slice(&[
        0x00, 0x01, 0x01, 0x77, 0x01, 0x03, 0x06, 0x00, 0x01, 0x04, 0x01, 0x01,
    ]); // H = 12 header bytes, the last two being nnz and payload_bytes
    expected.push(0x5a);
    let crc = crc32fast::hash(&expected);
    expected.extend_from_slice(&crc.to_le_bytes());
    assert_eq!(bytes, expected);
}
