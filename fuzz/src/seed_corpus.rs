//! Writes a few valid compressed files (mode byte 1 prepended) into
//! `corpus/decode/` as the fuzzer's starting points.

use qgrad_csr::{encode, EncodeOptions, LayoutChoice, TensorData};

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
        for layout in [LayoutChoice::Csr, LayoutChoice::Dense] {
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
            };
            let mut file = vec![1u8];
            file.extend(encode(&tensors, &options).expect("valid input"));
            std::fs::write(dir.join(format!("seed_{i}_{layout:?}")), file).expect("write seed");
        }
    }
}
