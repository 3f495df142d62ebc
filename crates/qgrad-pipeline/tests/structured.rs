//! Structured sparsity with low-bit weights and PACT activations (METHOD §9),
//! end to end on the shipped MNIST subset: trained, written, run from the
//! file with the integer kernels, equal to candle image for image.

use std::path::Path;

use qgrad_csr::{CompressedModel, LayoutChoice};
use qgrad_data::mnist::load_mnist;
use qgrad_models::methods::{BlockSelection, BlockSparsityOptions, StructuredOptions, WeightScale};
use qgrad_models::net::PactConfig;
use qgrad_models::train::OptimizerKind;
use qgrad_models::{Arch, TrainConfig};
use qgrad_pipeline::{
    compress_structured, export_and_evaluate, run_structured, ExportOptions, MethodRun, Start,
};

fn mini() -> (qgrad_data::Dataset, qgrad_data::Dataset) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
    let (train, test) = load_mnist(&dir).unwrap();
    (train.take(1500), test.take(300))
}

#[test]
fn a_structured_design_runs_from_its_file_as_in_candle() {
    let (train_set, test_set) = mini();
    let arch: Arch = "mlp-128x2".parse().unwrap();
    for (weight_bits, act_bits, compression) in [(2u8, 2u8, 4usize), (1, 3, 2), (32, 32, 4)] {
        let mut config = TrainConfig::default_for(arch);
        (config.epochs, config.batch_size, config.lr, config.progress) = (2, 50, 0.003, false);
        config.optimizer = OptimizerKind::ADAM;
        config.weight_decay = 0.0;
        config.pact = (act_bits < 32).then_some(PactConfig {
            bits: act_bits,
            clip: 4.0,
            learned: true,
            input_bits: 8,
        });
        let options = StructuredOptions {
            weight_bits,
            blocks: Some(BlockSparsityOptions {
                block: (16, 16),
                compression,
                selection: BlockSelection::Random { seed: 3 },
                dense_first_last: false,
            }),
            scale: WeightScale::LeastSquares,
        };
        let run = MethodRun {
            arch,
            config,
            options,
            start: Start::Scratch,
            device: qgrad_pipeline::default_device(),
        };
        let out = run_structured(run, (&train_set, &test_set), &mut []).unwrap();
        let last = out.state.history.last().unwrap().clone();
        assert!(
            last.test_accuracy > 0.5,
            "{weight_bits}/{act_bits}: {last:?}"
        );
        // Masked weights are exactly zero; the clips moved (learned).
        for m in out.hook.masks() {
            let w: Vec<f32> = out
                .state
                .network
                .parameter(&m.name)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(w.iter().zip(&m.keep).all(|(v, k)| *k || v.to_bits() == 0));
        }
        if act_bits < 32 {
            let clips = out.state.network.activation_clips().unwrap();
            assert_eq!(clips.len(), 2);
            assert!(clips.iter().any(|c| c.values[0] != 4.0), "{clips:?}");
        }
        let model = compress_structured(&out, serde_json::json!({})).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("design.qgz");
        let export = ExportOptions {
            act_bits: 16,
            layout: LayoutChoice::Auto,
            device: qgrad_pipeline::default_device(),
            run_file: true,
        };
        let exported = export_and_evaluate(&model, &path, &test_set, &export).unwrap();
        assert_eq!(exported.mismatches(), Some(0), "{weight_bits}/{act_bits}");
        let file = exported.file.as_ref().unwrap();
        assert_eq!(
            file.logits, exported.candle.logits,
            "{weight_bits}/{act_bits}"
        );
        // The accuracy seen in training is close to the file's (the file's
        // first-layer input is 8-bit).
        assert!((file.accuracy - last.test_accuracy).abs() < 0.05);
        // Quantized block-sparse weights are stored in blocks.
        let decoded = CompressedModel::read_file(&path).unwrap();
        if weight_bits < 32 {
            // Binary codes under a block mask stay 1 bit per kept weight,
            // in blocks (ternary CSR of the same codes is larger).
            if weight_bits == 1 {
                for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
                    let t = decoded.tensor(name).unwrap();
                    assert!(t.block_shape().is_some(), "{name}");
                }
            }
            let float_bytes = 4 * (784 * 128 + 128 * 128 + 128 * 10);
            assert!(
                exported.size.file_bytes * 8 < float_bytes as u64,
                "{:?}",
                exported.size.file_bytes
            );
        }
    }
}
