//! End to end through the umbrella crate, on the shipped MNIST subset: train
//! a little, run each method, write the compressed file, read it back, and
//! check that integer inference from the file equals the candle evaluation
//! of the quantized model image for image, and that the ratio is the file's.

use std::path::Path;

use qgrad::csr::LayoutChoice;
use qgrad::data::Dataset;
use qgrad::models::methods::{FractionSchedule, InTrainingOptions, PostTrainingOptions};
use qgrad::models::{Arch, TrainConfig};
use qgrad::pipeline::data::load_datasets;
use qgrad::pipeline::in_training::{run_in_training, InTrainingRun, Start};
use qgrad::pipeline::{
    compress_combined, compress_in_training, compress_post_training, default_device,
    export_and_evaluate, train_float, AccumStart, Compressed, ExportOptions,
};

fn mini(arch: Arch) -> (Dataset, Dataset) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/mnist-mini");
    let (train, test) = load_datasets(arch, &dir, Some(2000), Some(300)).unwrap();
    (train, test)
}

fn quick_config(arch: Arch, epochs: usize) -> TrainConfig {
    let mut config = TrainConfig::default_for(arch);
    config.epochs = epochs;
    config.batch_size = 64;
    config.max_batches_per_epoch = Some(20);
    config.progress = false;
    config
}

/// Writes `model`, runs the file and checks it against candle.
fn check_file(model: &Compressed, dir: &Path, test: &Dataset) -> f64 {
    let path = dir.join(format!("{}.qgz", model.method));
    let export = ExportOptions {
        act_bits: 12,
        layout: LayoutChoice::Auto,
        device: default_device(),
        run_file: true,
    };
    let out = export_and_evaluate(model, &path, test, &export).unwrap();
    let file = out.file.as_ref().unwrap();
    assert_eq!(file.total, test.len());
    assert_eq!(out.mismatches(), Some(0), "{}", model.method);
    // Every weight is fixed point or pruned, so the logits agree to the bit.
    if model
        .params
        .iter()
        .all(|t| t.widths.iter().all(|&w| w <= 16))
    {
        assert_eq!(file.logits, out.candle.logits, "{}", model.method);
    }
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert_eq!(out.size.file_bytes, bytes);
    let params = model.arch.num_parameters() as f64;
    assert!((out.size.ratio - 32.0 * params / (8.0 * bytes as f64)).abs() < 1e-9);
    out.size.ratio
}

#[test]
fn each_method_writes_a_file_that_runs_like_candle() {
    for arch in [Arch::Lenet300100, Arch::Lenet5] {
        let (train, test) = mini(arch);
        let dir = tempfile::tempdir().unwrap();
        let mut config = quick_config(arch, 2);
        config.checkpoint_dir = Some(dir.path().join("float"));
        let device = default_device();
        let trained =
            train_float(arch, &config, &device, (&train, &test), &mut [], |_| {}).unwrap();
        let norm = trained.normalization(&train);
        assert!(trained.accuracy(&test, &norm).unwrap() > 0.5, "{arch}");

        let host = trained.to_host(norm).unwrap();
        let post = PostTrainingOptions {
            widths: vec![8, 4, 0],
            ..Default::default()
        };
        let model = compress_post_training(&host, &post, serde_json::json!({}), Some(1)).unwrap();
        let post_ratio = check_file(&model, dir.path(), &test);
        assert!(post_ratio > 5.0, "{arch}: {post_ratio}");

        let run = InTrainingRun {
            arch,
            config: quick_config(arch, 2),
            options: InTrainingOptions {
                fraction: FractionSchedule::PerSplit(vec![0.6, 0.6]),
                low_bits: 2,
                ..Default::default()
            },
            start: Start::Checkpoint {
                path: &dir.path().join("float"),
                accum: AccumStart::Carry,
                evaluate: true,
            },
            device: device.clone(),
        };
        let result = run_in_training(run, (&train, &test), &mut []).unwrap();
        assert!(result.float_accuracy.is_some());
        // A carried on: the baseline's 40 steps plus the fine-tuning's 40.
        assert_eq!(result.state.accum.steps(), 80);
        let frozen = result.state.history.last().unwrap().frozen_fraction;
        assert!((frozen - 0.84).abs() < 0.01, "{arch}: {frozen}");
        let model = compress_in_training(&result, serde_json::json!({})).unwrap();
        let in_training_ratio = check_file(&model, dir.path(), &test);
        let remainder = PostTrainingOptions {
            widths: vec![8, 4],
            ..Default::default()
        };
        let model = compress_combined(&result, &remainder, serde_json::json!({})).unwrap();
        let combined_ratio = check_file(&model, dir.path(), &test);
        // The remainder, f32 in the in-training file, is 8 or 4 bits here.
        assert!(
            combined_ratio > 1.5 * in_training_ratio,
            "{arch}: {combined_ratio} vs {in_training_ratio}"
        );
    }
}

#[test]
fn a_zero_start_ranks_by_the_fine_tuning_alone() {
    let arch = Arch::Lenet300100;
    let (train, test) = mini(arch);
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(arch, 1);
    config.checkpoint_dir = Some(dir.path().to_path_buf());
    let device = default_device();
    train_float(arch, &config, &device, (&train, &test), &mut [], |_| {}).unwrap();
    let run = |accum| InTrainingRun {
        arch,
        config: quick_config(arch, 1),
        options: InTrainingOptions::default(),
        start: Start::Checkpoint {
            path: dir.path(),
            accum,
            evaluate: false,
        },
        device: device.clone(),
    };
    let zero = run_in_training(run(AccumStart::Zero), (&train, &test), &mut []).unwrap();
    let carry = run_in_training(run(AccumStart::Carry), (&train, &test), &mut []).unwrap();
    assert_eq!(zero.state.accum.steps(), 20);
    assert_eq!(carry.state.accum.steps(), 40);
}

/// A short loss-aware run (8 batches of Adam at lr 0.002) with `options`,
/// written to `path` with 16-bit activations, run from the file and checked
/// against candle: the logits agree bit for bit, and the run's reported
/// accuracy is the quantized network's. Returns the model and the export.
fn loss_aware_checked(
    arch: Arch,
    options: qgrad::models::methods::LossAwareOptions,
    (train, test): (&Dataset, &Dataset),
    path: &Path,
) -> (Compressed, qgrad::pipeline::Exported) {
    use qgrad::models::train::OptimizerKind;
    use qgrad::pipeline::{compress_loss_aware, run_loss_aware, LossAwareRun};
    let mut config = quick_config(arch, 1);
    config.max_batches_per_epoch = Some(8);
    config.optimizer = OptimizerKind::ADAM;
    config.lr = 0.002;
    let run = LossAwareRun {
        arch,
        config,
        options,
        start: Start::Scratch,
        device: default_device(),
    };
    let outcome = run_loss_aware(run, (train, test), &mut []).unwrap();
    let model = compress_loss_aware(&outcome, serde_json::json!({})).unwrap();
    let export = ExportOptions {
        act_bits: 16,
        layout: LayoutChoice::Auto,
        device: default_device(),
        run_file: true,
    };
    let out = export_and_evaluate(&model, path, test, &export).unwrap();
    let file = out.file.as_ref().unwrap();
    assert_eq!(out.mismatches(), Some(0), "{}", path.display());
    assert_eq!(file.logits, out.candle.logits, "{}", path.display());
    let trained = outcome.state.history.last().unwrap().test_accuracy;
    assert!(
        (trained - out.candle.accuracy).abs() < 0.02,
        "{}",
        path.display()
    );
    (model, out)
}

#[test]
fn loss_aware_files_run_like_candle_for_every_code_kind() {
    use qgrad::models::methods::LossAwareOptions;
    use qgrad::scaled::Method;
    let (train, test) = mini(Arch::Lenet5);
    let dir = tempfile::tempdir().unwrap();
    let methods = [
        (Method::Lab, false),
        (Method::LatExact, true),
        (Method::Lat2Approx, false),
        (
            Method::Laq {
                bits: 3,
                log: false,
            },
            true,
        ),
        (Method::Laq { bits: 3, log: true }, false),
    ];
    for arch in [Arch::Lenet300100, Arch::Lenet5] {
        for (method, per_channel) in methods {
            let mut options = LossAwareOptions::new(method);
            options.per_channel = per_channel;
            let path = dir.path().join(format!("{arch}-{method}.qgz"));
            let (_, out) = loss_aware_checked(arch, options, (&train, &test), &path);
            if method == Method::Lab && arch == Arch::Lenet300100 {
                // About one bit per weight, plus the float biases.
                assert!(out.size.ratio > 25.0, "{}", out.size.ratio);
            }
        }
    }
}

#[test]
fn split_weights_run_like_candle_and_count_each_parameter_once() {
    // Loss-aware codes with the weights of largest accumulated gradient kept
    // at 8 bits (two tensors per layer in the file): the file's logits are
    // candle's bit for bit, the ratio counts every parameter once, ternary
    // codes leave the high part's elements at 0 (binary ones keep their
    // signs under a residual), and the PyTorch export holds the sum.
    use qgrad::models::methods::{ImportantWeights, LossAwareOptions, HIGH_SUFFIX};
    use qgrad::scaled::Method;
    let dir = tempfile::tempdir().unwrap();
    for (arch, method) in [
        (Arch::Lenet5, Method::LatExact),
        (Arch::Lenet300100, Method::Lab),
    ] {
        let (train, test) = mini(arch);
        let mut options = LossAwareOptions::new(method);
        options.important = Some(ImportantWeights {
            fraction: 0.05,
            bits: 8,
        });
        let path = dir.path().join(format!("{arch}-split.qgz"));
        let (model, out) = loss_aware_checked(arch, options, (&train, &test), &path);
        let bytes = std::fs::metadata(&path).unwrap().len() as f64;
        let params = arch.num_parameters() as f64;
        assert!((out.size.ratio - 32.0 * params / (8.0 * bytes)).abs() < 1e-9);
        if method.binary() {
            // One bit a weight plus 5 % of them at 8 bits with their
            // positions, not the 2 bits of ternary codes.
            assert!(out.size.ratio > 15.0, "{}", out.size.ratio);
        }

        let decoded = qgrad::csr::CompressedModel::read_file(&path).unwrap();
        let state_dict = qgrad::pipeline::interchange::export_state_dict(
            &decoded,
            qgrad::pipeline::interchange::ExportLayout::Dense,
        )
        .unwrap();
        let exported =
            candle_core::safetensors::load_buffer(&state_dict, &candle_core::Device::Cpu).unwrap();
        let mut split = 0;
        for w in &model.scaled {
            let high = model
                .params
                .iter()
                .find(|p| p.name == format!("{}{HIGH_SUFFIX}", w.name))
                .unwrap();
            let n = w.quantized.codes.len();
            let kept = high.widths.iter().filter(|&&b| b == 8).count();
            assert!(kept > 0 && kept <= (0.05 * n as f64).floor().max(1.0) as usize);
            let codes = decoded.tensor(&w.name).unwrap().dequantize();
            let highs = decoded.tensor(&high.name).unwrap().dequantize();
            let torch: Vec<f32> = exported[&w.name].flatten_all().unwrap().to_vec1().unwrap();
            for i in 0..n {
                if method.binary() {
                    // Dense sign codes; the high part is a residual on top.
                    assert_ne!(codes[i], 0.0, "{} {i}", w.name);
                } else {
                    assert!(codes[i] == 0.0 || highs[i] == 0.0, "{} {i}", w.name);
                }
                assert_eq!(torch[i], codes[i] + highs[i], "{} {i}", w.name);
            }
            assert!(!exported.contains_key(&high.name));
            split += 1;
        }
        assert_eq!(split, model.scaled.len());
    }
}
