//! `cargo xtask curve` on two hand-made LeNet-300-100 files and the shipped
//! MNIST subset: every point is its file's size and the accuracy the integer
//! kernels give it, and a file that cannot run is an error, not a point.

use std::path::{Path, PathBuf};

use qgrad_runtime::Arch;
use xtask::curve::{run, Series};

/// A LeNet-300-100 file whose weights are `scale` times a fixed pattern, at
/// `bits` bits (every element kept).
fn file(dir: &Path, name: &str, scale: f32, bits: u8) -> PathBuf {
    let shapes = Arch::Lenet300100.parameter_shapes();
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .map(|(_, s)| {
            (0..s.iter().product::<usize>())
                .map(|i| scale * (((i * 7919) % 201) as f32 - 100.0) / 100.0)
                .collect()
        })
        .collect();
    let widths: Vec<Vec<u8>> = values.iter().map(|v| vec![bits; v.len()]).collect();
    let tensors: Vec<qgrad_csr::TensorData> = shapes
        .iter()
        .zip(values.iter().zip(&widths))
        .map(|((name, shape), (values, widths))| qgrad_csr::TensorData {
            name,
            shape,
            values,
            widths,
            exponent: None,
        })
        .collect();
    let metadata = [
        ("arch", "lenet-300-100"),
        ("act_bits", "8"),
        ("norm.mean", "[0.1307]"),
        ("norm.std", "[0.3081]"),
        ("method", "hand-made"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let options = qgrad_csr::EncodeOptions {
        metadata,
        ..Default::default()
    };
    let path = dir.join(name);
    qgrad_csr::write_bytes_atomically(&path, &qgrad_csr::encode(&tensors, &options).unwrap())
        .unwrap();
    path
}

#[test]
fn every_point_is_measured_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../datasets/mnist-mini");
    let a = file(dir.path(), "a.qgz", 0.05, 8);
    let b = file(dir.path(), "b.qgz", 0.05, 4);
    let series: Vec<Series> = vec![
        format!("eight bits={}", a.display()).parse().unwrap(),
        format!("four bits={}", b.display()).parse().unwrap(),
    ];
    let out = dir.path().join("curve");
    run(&series, &data, &out, "test").unwrap();
    let points: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("curve.json")).unwrap()).unwrap();
    let points = points.as_array().unwrap();
    assert_eq!(points.len(), 2);
    let (_, test) =
        qgrad_pipeline::data::load_datasets(Arch::Lenet300100, &data, Some(1), None).unwrap();
    for (p, path) in points.iter().zip([&a, &b]) {
        let bytes = std::fs::metadata(path).unwrap().len();
        assert_eq!(p["bytes"].as_u64(), Some(bytes));
        let model = qgrad_csr::CompressedModel::read_file(path).unwrap();
        let report = qgrad_runtime::FileModel::new(&model)
            .unwrap()
            .evaluate(&test, 500)
            .unwrap();
        assert_eq!(p["accuracy"].as_f64(), Some(report.accuracy));
        assert_eq!(p["test_images"].as_u64(), Some(test.len() as u64));
        assert_eq!(p["ratio"].as_f64(), Some(model.size_report().ratio));
    }
    // The 4-bit file is the smaller.
    assert!(points[1]["bytes"].as_u64() < points[0]["bytes"].as_u64());
    let md = std::fs::read_to_string(out.join("CURVE.md")).unwrap();
    assert!(md.contains("eight bits") && md.contains("four bits"));
    assert!(std::fs::metadata(out.join("curve.png")).unwrap().len() > 1000);

    // A file that is not a compressed model is an error naming it.
    let bad = dir.path().join("bad.qgz");
    std::fs::write(&bad, b"not a model").unwrap();
    let series: Vec<Series> = vec![format!("bad={}", bad.display()).parse().unwrap()];
    let err = run(&series, &data, &dir.path().join("bad"), "t").unwrap_err();
    assert!(format!("{err:#}").contains("bad.qgz"), "{err:#}");
}
