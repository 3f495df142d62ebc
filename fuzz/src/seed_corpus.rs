//! Writes a few valid compressed files (mode byte 1 prepended) into
//! `corpus/decode/` as the fuzzer's starting points.

use qgrad_csr::{
    encode, encode_tensors, EncodeOptions, LayoutChoice, LevelKind, ScaledTensorData, TensorData,
    TensorInput,
};

fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/decode");
    std::fs::create_dir_all(&dir).expect("create corpus dir");
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mixes: [&[u8]; 5] = [
        &[8],
        &[0, 0, 0, 4],
        &[0, 2, 8, 16],
        &[0, 32, 6],
        &[3, 5, 7, 9, 11, 13, 15],
    ];
    for (i, mix) in mixes.iter().enumerate() {
        for layout in [
            LayoutChoice::Csr,
            LayoutChoice::Dense,
            LayoutChoice::CsrRice,
            LayoutChoice::FlatGaps,
        ] {
            let (rows, cols) = (1 + i, 3 + 2 * i);
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            let widths: Vec<u8> = (0..rows * cols)
                .map(|_| mix[(next() % mix.len() as u64) as usize])
                .collect();
            let shape = [rows, cols];
            let bias = vec![0.5f32; rows];
            let bias_w = vec![8u8; rows];
            let tensors = [
                TensorData {
                    name: "w",
                    shape: &shape,
                    values: &values,
                    widths: &widths,
                    exponent: None,
                },
                TensorData {
                    name: "b",
                    shape: &[rows],
                    values: &bias,
                    widths: &bias_w,
                    exponent: None,
                },
            ];
            let options = EncodeOptions {
                layout,
                metadata: vec![("seed".into(), i.to_string())],
                ..Default::default()
            };
            let mut file = vec![1u8];
            file.extend(encode(&tensors, &options).expect("valid input"));
            std::fs::write(dir.join(format!("seed_{i}_{layout:?}")), file).expect("write seed");
        }
    }
    // Scaled tensors (format version 2): binary, ternary (sparse and dense,
    // two-sided), 3-bit linear per row, 4-bit log; in both layouts.
    let kinds: [(LevelKind, u8, bool, u64); 5] = [
        (LevelKind::Binary, 1, false, 0),
        (LevelKind::Linear, 1, true, 4),
        (LevelKind::Linear, 1, false, 1),
        (LevelKind::Linear, 3, false, 3),
        (LevelKind::Log, 7, true, 2),
    ];
    for (i, (levels, max_code, two_sided, zero_every)) in kinds.into_iter().enumerate() {
        for layout in [
            LayoutChoice::Csr,
            LayoutChoice::Dense,
            LayoutChoice::CsrRice,
            LayoutChoice::FlatGaps,
        ] {
            let (rows, cols) = (2 + i, 5 + 3 * i);
            let codes: Vec<i8> = (0..rows * cols)
                .map(|_| {
                    let r = next();
                    if levels != LevelKind::Binary && zero_every > 0 && r % zero_every != 0 {
                        return 0;
                    }
                    let m = (1 + (r >> 8) % u64::from(max_code)) as i8;
                    if (r >> 16) & 1 == 0 {
                        m
                    } else {
                        -m
                    }
                })
                .collect();
            let groups = if i % 2 == 0 { 1 } else { rows };
            let per_group = if two_sided { 2 } else { 1 };
            let scales: Vec<f32> = (0..groups * per_group)
                .map(|_| (next() % 1000) as f32 / 500.0)
                .collect();
            let shape = [rows, cols];
            let bias = vec![0.25f32; rows];
            let bias_w = vec![8u8; rows];
            let tensors = [
                TensorInput::Scaled(ScaledTensorData {
                    name: "w",
                    shape: &shape,
                    codes: &codes,
                    levels,
                    max_code,
                    groups,
                    two_sided,
                    scales: &scales,
                }),
                TensorInput::Fixed(TensorData {
                    name: "b",
                    shape: &[rows],
                    values: &bias,
                    widths: &bias_w,
                    exponent: None,
                }),
            ];
            let options = EncodeOptions {
                layout,
                metadata: vec![("seed".into(), format!("scaled-{i}"))],
                ..Default::default()
            };
            let mut file = vec![1u8];
            file.extend(encode_tensors(&tensors, &options).expect("valid input"));
            std::fs::write(dir.join(format!("seed_scaled_{i}_{layout:?}")), file)
                .expect("write seed");
        }
    }
    // Split weights (format version 6): ternary codes and their high-width
    // part, `w_high`, under the metadata key `high_weights`.
    let (rows, cols) = (3, 7);
    let codes: Vec<i8> = (0..rows * cols).map(|i| [0, 1, -1][i % 3]).collect();
    let high: Vec<f32> = (0..rows * cols)
        .map(|i| if i % 3 == 0 { 0.5 - i as f32 / 64.0 } else { 0.0 })
        .collect();
    let high_w: Vec<u8> = high.iter().map(|&v| if v != 0.0 { 8 } else { 0 }).collect();
    let shape = [rows, cols];
    let tensors = [
        TensorInput::Scaled(ScaledTensorData {
            name: "w",
            shape: &shape,
            codes: &codes,
            levels: LevelKind::Linear,
            max_code: 1,
            groups: 1,
            two_sided: false,
            scales: &[0.25],
        }),
        TensorInput::Fixed(TensorData {
            name: "w_high",
            shape: &shape,
            values: &high,
            widths: &high_w,
            exponent: None,
        }),
    ];
    let options = EncodeOptions {
        metadata: vec![(qgrad_csr::HIGH_WEIGHTS.into(), "8".into())],
        ..Default::default()
    };
    let mut file = vec![1u8];
    file.extend(encode_tensors(&tensors, &options).expect("valid input"));
    std::fs::write(dir.join("seed_split"), file).expect("write seed");
}
