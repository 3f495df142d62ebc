//! Layout 3, block-sparse rows (format version 4, FORMAT.md §7.7): exact
//! round trips of block-sparse scaled tensors, the encoder's choice of block
//! shape and layout, the integer kernel on the decoded tensor, and every
//! class of bad block payload.

mod common;

use common::*;
use proptest::prelude::*;
use qgrad_csr::{
    encode_tensors, CompressedModel, CsrError, EncodeOptions, FixedActivations, Layout,
    LayoutChoice, LevelKind, ScaledTensorData, TensorInput,
};
use rand::{Rng, SeedableRng};

/// A `rows × cols` tensor of block shape `block` where every block row keeps
/// `keep` of its blocks (chosen at random), with random non-zero codes in
/// them (binary: ±1; otherwise a `zero_inside` share of zeros as well).
fn block_sparse(
    (rows, cols): (usize, usize),
    block: (usize, usize),
    keep: usize,
    levels: LevelKind,
    max_code: u8,
    zero_inside: f64,
    seed: u64,
) -> Vec<i8> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (gr, gc) = (rows.div_ceil(block.0), cols.div_ceil(block.1));
    let mut codes = vec![0i8; rows * cols];
    for i in 0..gr {
        let mut js: Vec<usize> = (0..gc).collect();
        for k in 0..keep.min(gc) {
            let pick = rng.random_range(k..gc);
            js.swap(k, pick);
        }
        for &j in &js[..keep.min(gc)] {
            for r in i * block.0..((i + 1) * block.0).min(rows) {
                for c in j * block.1..((j + 1) * block.1).min(cols) {
                    let zero = levels != LevelKind::Binary && rng.random_bool(zero_inside);
                    let m = rng.random_range(1..=max_code as i32) as i8;
                    codes[r * cols + c] = match (zero, rng.random_bool(0.5)) {
                        (true, _) => 0,
                        (false, true) => m,
                        (false, false) => -m,
                    };
                }
            }
        }
    }
    codes
}

/// Binary (kind 0), linear or log `bits`-bit levels.
fn levels_of(kind: u8, bits: u8) -> (LevelKind, u8) {
    match kind {
        0 => (LevelKind::Binary, 1),
        1 => (LevelKind::Linear, (1u8 << (bits - 1)) - 1),
        _ => (LevelKind::Log, (1u8 << (bits - 1)) - 1),
    }
}

fn encode_one(t: ScaledTensorData, layout: LayoutChoice) -> Result<Vec<u8>, CsrError> {
    encode_tensors(
        &[TensorInput::Scaled(t)],
        &EncodeOptions {
            layout,
            ..Default::default()
        },
    )
}

fn tensor<'a>(
    shape: &'a [usize],
    codes: &'a [i8],
    levels: LevelKind,
    max_code: u8,
    scales: &'a [f32],
) -> ScaledTensorData<'a> {
    ScaledTensorData {
        name: "w",
        shape,
        codes,
        levels,
        max_code,
        groups: 1,
        two_sided: false,
        scales,
    }
}

#[test]
fn a_block_sparse_tensor_takes_layout_3_and_beats_element_csr() {
    // 2-bit weights (max_code 1) and 4x block compression, 8 x 8 blocks:
    // METHOD §9's headline design on a 256 x 784 layer.
    let shape = [256usize, 784];
    let codes = block_sparse((256, 784), (8, 8), 25, LevelKind::Linear, 1, 0.3, 1);
    let t = tensor(&shape, &codes, LevelKind::Linear, 1, &[0.5]);
    let auto = encode_one(t, LayoutChoice::Auto).unwrap();
    assert_eq!(&auto[8..12], &4u32.to_le_bytes(), "version 4");
    let m = CompressedModel::from_bytes(&auto).unwrap();
    assert_eq!(m.tensors[0].layout, Layout::Block);
    assert_eq!(m.tensors[0].codes().unwrap(), codes);
    let csr = encode_one(t, LayoutChoice::Csr).unwrap();
    let rice = encode_one(t, LayoutChoice::CsrRice).unwrap();
    let dense = encode_one(t, LayoutChoice::Dense).unwrap();
    for other in [&csr, &rice, &dense] {
        assert!(
            auto.len() < other.len(),
            "{} vs {}",
            auto.len(),
            other.len()
        );
        let o = CompressedModel::from_bytes(other).unwrap();
        assert_eq!(o.tensors[0].dequantize(), m.tensors[0].dequantize());
    }
    // 25 of 98 blocks per block row, 2 bits per kept weight: about 0.51 bit
    // per weight plus the indices (one 7-bit column per 64 weights).
    let kept = 32 * 25 * 64;
    let bits = m.tensors[0].field_bits();
    assert_eq!(bits.values, kept as u64 * 2);
    assert_eq!(bits.col_idx, 32 * 25 * 7);
    let report = m.size_report();
    let tensor_bits: u64 = report.tensors.iter().map(|t| t.bits.total()).sum();
    assert_eq!(report.overhead_bits + tensor_bits, 8 * auto.len() as u64);
}

#[test]
fn binary_weights_with_pruned_blocks_cost_one_bit_per_kept_weight() {
    let shape = [64usize, 100];
    let codes = block_sparse((64, 100), (4, 10), 3, LevelKind::Binary, 1, 0.0, 2);
    let t = tensor(&shape, &codes, LevelKind::Binary, 1, &[0.25]);
    // Only layout 3 can hold binary codes with zeros, whatever is asked.
    for choice in [LayoutChoice::Auto, LayoutChoice::Csr, LayoutChoice::Dense] {
        let bytes = encode_one(t, choice).unwrap();
        let m = CompressedModel::from_bytes(&bytes).unwrap();
        assert_eq!(m.tensors[0].layout, Layout::Block, "{choice:?}");
        assert_eq!(m.tensors[0].codes().unwrap(), codes);
        assert_eq!(m.tensors[0].field_bits().values, 16 * 3 * 40);
    }
}

#[test]
fn the_kernel_runs_a_block_tensor_as_its_csr_twin() {
    let shape = [40usize, 70];
    let codes = block_sparse((40, 70), (4, 7), 3, LevelKind::Linear, 7, 0.2, 3);
    let t = ScaledTensorData {
        groups: 40,
        two_sided: true,
        scales: &(0..80).map(|i| 0.01 * (i + 1) as f32).collect::<Vec<_>>(),
        ..tensor(&shape, &codes, LevelKind::Linear, 7, &[])
    };
    let block = CompressedModel::from_bytes(&encode_one(t, LayoutChoice::Block).unwrap()).unwrap();
    let csr = CompressedModel::from_bytes(&encode_one(t, LayoutChoice::Csr).unwrap()).unwrap();
    assert_eq!(block.tensors[0].layout, Layout::Block);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let x: Vec<f32> = (0..3 * 70).map(|_| rng.random_range(-1.0..1.0)).collect();
    let x = FixedActivations::quantize(&x, 3, 70, 8).unwrap();
    let a = block.tensors[0].matmul(&x).unwrap();
    let b = csr.tensors[0].matmul(&x).unwrap();
    assert_eq!(
        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn older_layouts_are_unchanged_when_no_block_pays() {
    // Random element sparsity: blocks do not pay, the file holds no layout 3
    // (version 5 for layout 4, which beats layout 2 here).
    let t = OwnedScaled::sample(
        "w",
        vec![30, 40],
        LevelKind::Linear,
        1,
        0.5,
        Groups::One,
        false,
        4,
    );
    let bytes = encode_one(t.data(), LayoutChoice::Auto).unwrap();
    let m = CompressedModel::from_bytes(&bytes).unwrap();
    assert_eq!(m.tensors[0].layout, Layout::FlatGaps);
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 5);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    /// Any block-sparse tensor, any block shape (edge blocks included),
    /// decodes exactly in layout 3 and under `Auto`.
    #[test]
    fn block_layout_round_trips_exactly(
        rows in 1usize..40,
        cols in 1usize..40,
        br in 1usize..9,
        bc in 1usize..9,
        keep in 0usize..5,
        kind in 0u8..3,
        bits in 2u8..5,
        zero_inside in 0.0f64..0.5,
        seed in any::<u64>(),
    ) {
        let (levels, max_code) = levels_of(kind, bits);
        let codes = block_sparse((rows, cols), (br, bc), keep, levels, max_code, zero_inside, seed);
        let shape = [rows, cols];
        let t = tensor(&shape, &codes, levels, max_code, &[0.75]);
        for choice in [LayoutChoice::Block, LayoutChoice::Auto] {
            let bytes = match encode_one(t, choice) {
                Ok(b) => b,
                // A binary tensor whose every block plan is too small for
                // its row count (FORMAT.md §7.7) is refused, never mis-stored.
                Err(CsrError::CodeOutOfRange { code: 0, .. }) => {
                    prop_assert_eq!(levels, LevelKind::Binary);
                    continue;
                }
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            let m = CompressedModel::from_bytes(&bytes).unwrap();
            prop_assert_eq!(m.tensors[0].codes().unwrap(), codes.clone());
            let version = m.tensors[0].layout.min_version().max(2);
            prop_assert_eq!(&bytes[8..12], &version.to_le_bytes());
        }
    }
}

// ---- bad payloads, written from FORMAT.md §7.7 -------------------------

/// A little-endian bit writer (FORMAT.md §5), for hand-made payloads.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    len: usize,
}

impl Bits {
    fn put(&mut self, value: u64, bits: u32) -> &mut Self {
        for b in 0..bits {
            if self.len.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if value >> b & 1 == 1 {
                *self.bytes.last_mut().unwrap() |= 1 << (self.len % 8);
            }
            self.len += 1;
        }
        self
    }
}

/// Version-4 file with one scaled ternary tensor `[rows, cols]` in layout
/// 3, `nnz` declared, and `payload`.
fn file(version: u32, shape: [u64; 2], levels: u32, nnz: u64, payload: &[u8]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Header {
        metadata: Vec<(String, String)>,
        tensors: Vec<Entry>,
    }
    #[derive(serde::Serialize)]
    enum Entry {
        #[allow(dead_code)]
        Fixed,
        Scaled(Scaled),
    }
    #[derive(serde::Serialize)]
    struct Scaled {
        name: String,
        shape: Vec<u64>,
        layout: u32,
        levels: u32,
        max_code: u8,
        two_sided: u8,
        groups: u64,
        nnz: u64,
        payload_bytes: u64,
    }
    let header = Header {
        metadata: vec![],
        tensors: vec![Entry::Scaled(Scaled {
            name: "w".into(),
            shape: shape.to_vec(),
            layout: 3,
            levels,
            max_code: 1,
            two_sided: 0,
            groups: 1,
            nnz,
            payload_bytes: payload.len() as u64,
        })],
    };
    let h = postcard::to_allocvec(&header).unwrap();
    let len = 24 + h.len() + payload.len() + 4;
    let mut out = b"QGRADCSR".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The payload of a `[4, 6]` ternary tensor in 2 x 3 blocks (grid 2 x 2)
/// keeping blocks `kept[i]` of block row `i`, every kept code +1.
fn payload(block: (u64, u64), count: u64, ptrs: &[u64], cols: &[u64], codes: usize) -> Vec<u8> {
    let mut b = Bits::default();
    b.put(block.0 - 1, 16).put(block.1 - 1, 16).put(count, 32);
    let ptr_bits = (64 - count.leading_zeros()).max(1);
    for &p in ptrs {
        b.put(p, ptr_bits);
    }
    for &c in cols {
        b.put(c, 1); // grid of 2 block columns: 1 bit each
    }
    for _ in 0..codes {
        b.put(0b01, 2); // ternary +1
    }
    b.put(0.5f32.to_bits() as u64, 32);
    b.bytes
}

fn err(bytes: &[u8]) -> String {
    CompressedModel::from_bytes(bytes)
        .expect_err("a bad file must be refused")
        .to_string()
}

#[test]
fn the_hand_written_payload_decodes_as_format_md_says() {
    // Block row 0 keeps block column 1, block row 1 keeps 0 and 1.
    let p = payload((2, 3), 3, &[0, 1, 3], &[1, 0, 1], 18);
    let m = CompressedModel::from_bytes(&file(4, [4, 6], 1, 18, &p)).unwrap();
    let v = m.tensors[0].dequantize();
    #[rustfmt::skip]
    let expected = [
        0.0, 0.0, 0.0, 0.5, 0.5, 0.5,
        0.0, 0.0, 0.0, 0.5, 0.5, 0.5,
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
        0.5, 0.5, 0.5, 0.5, 0.5, 0.5,
    ];
    assert_eq!(v, expected);
}

#[test]
fn bad_block_payloads_are_refused_with_their_reason() {
    let ok = payload((2, 3), 3, &[0, 1, 3], &[1, 0, 1], 18);
    // Layout 3 in a version-3 file.
    assert!(err(&file(3, [4, 6], 1, 18, &ok)).contains("needs version 4"));
    // More kept blocks than the grid has.
    let p = payload((2, 3), 5, &[0, 1, 3], &[1, 0, 1], 18);
    assert!(err(&file(4, [4, 6], 1, 18, &p)).contains("kept blocks declared"));
    // Pointers out of order, or not ending at the count.
    let p = payload((2, 3), 3, &[0, 2, 1], &[1, 0, 1], 18);
    assert!(err(&file(4, [4, 6], 1, 18, &p)).contains("block row pointer"));
    let p = payload((2, 3), 3, &[0, 1, 2], &[1, 0, 1], 18);
    assert!(err(&file(4, [4, 6], 1, 18, &p)).contains("block row pointer"));
    // Block columns not increasing within a block row.
    let p = payload((2, 3), 3, &[0, 1, 3], &[1, 1, 0], 18);
    assert!(err(&file(4, [4, 6], 1, 18, &p)).contains("block column"));
    // Too few codes for the kept blocks: the declared sizes do not fit.
    let p = payload((2, 3), 3, &[0, 1, 3], &[1, 0, 1], 4);
    assert!(err(&file(4, [4, 6], 1, 18, &p)).contains("needs"));
    // A wrong non-zero count.
    assert!(err(&file(4, [4, 6], 1, 17, &ok)).contains("non-zero"));
    // Binary: the kept blocks must hold exactly the non-zeros.
    assert!(err(&file(4, [4, 6], 0, 17, &ok)).contains("binary"));
    // Rows beyond the payload's bits (FORMAT.md: rows + 1 <= 8 · payload bytes).
    let p = payload((2, 3), 0, &[0; 2], &[], 0);
    let e = err(&file(4, [1 << 20, 6], 1, 0, &p));
    assert!(e.contains("needs"), "{e}");
}

#[test]
fn no_mutation_of_a_block_file_panics() {
    let ok = file(
        4,
        [4, 6],
        1,
        18,
        &payload((2, 3), 3, &[0, 1, 3], &[1, 0, 1], 18),
    );
    let header_end = ok.len() - 4 - payload((2, 3), 3, &[0, 1, 3], &[1, 0, 1], 18).len();
    for i in 24..ok.len() - 4 {
        for bit in 0..8 {
            let mut b = ok.clone();
            b[i] ^= 1 << bit;
            // Re-checksum so that the mutation reaches the decoder.
            let n = b.len() - 4;
            let crc = crc32fast::hash(&b[..n]);
            b[n..].copy_from_slice(&crc.to_le_bytes());
            let _ = CompressedModel::from_bytes(&b);
        }
    }
    assert!(header_end > 24);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// One sample through the block mat-vec (layout 3, one-sided scales)
    /// equals the element-CSR kernel of the same tensor bit for bit.
    #[test]
    fn the_block_matvec_equals_the_csr_kernel(
        rows in 1usize..50,
        cols in 1usize..50,
        br in 1usize..9,
        bc in 1usize..9,
        keep in 1usize..4,
        kind in 0u8..3,
        bits in 2u8..5,
        per_row in any::<bool>(),
        act_bits in 2u8..17,
        seed in any::<u64>(),
    ) {
        let (levels, max_code) = levels_of(kind, bits);
        let codes = block_sparse((rows, cols), (br, bc), keep, levels, max_code, 0.2, seed);
        let shape = [rows, cols];
        let scales: Vec<f32> = (0..if per_row { rows } else { 1 })
            .map(|i| 0.01 + 0.37 * i as f32)
            .collect();
        let t = ScaledTensorData {
            groups: scales.len(),
            ..tensor(&shape, &codes, levels, max_code, &scales)
        };
        let Ok(block) = encode_one(t, LayoutChoice::Block) else {
            return Ok(()); // a binary tensor no block plan can hold
        };
        let block = CompressedModel::from_bytes(&block).unwrap();
        if block.tensors[0].layout != Layout::Block {
            return Ok(());
        }
        prop_assert!(block.tensors[0].block_shape().is_some());
        let twin = TensorInput::Scaled(ScaledTensorData { ..t });
        let csr = encode_tensors(
            &[twin],
            &EncodeOptions { layout: LayoutChoice::Csr, ..Default::default() },
        );
        let Ok(csr) = csr else { return Ok(()) };
        let csr = CompressedModel::from_bytes(&csr).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 1);
        let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-3.0..3.0)).collect();
        let x = FixedActivations::quantize(&x, 1, cols, act_bits).unwrap();
        let a = block.tensors[0].matmul(&x).unwrap();
        let b = csr.tensors[0].matmul(&x).unwrap();
        prop_assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
}
