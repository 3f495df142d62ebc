//! End-to-end tests of the `qgrad` binary on the shipped MNIST subset: the
//! happy path (train → quantize → eval/inspect agree) and the failure paths
//! (bad options exit 2, bad files exit 3, never a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn qgrad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(args)
        .output()
        .expect("the qgrad binary runs")
}

fn mini() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini")
}

/// A short `quantize loss-aware` run on the shipped subset (one epoch of
/// batches of 50, 300 test images, JSON out) with `extra` options.
fn loss_aware_quick(data: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "quantize",
        "loss-aware",
        "--data",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "50",
        "--lr",
        "0.005",
        "--test-limit",
        "300",
        "--no-progress",
        "--json",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    qgrad(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_clean_failure(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// `qgrad repack FILE --out OUT EXTRA... --json`, which must succeed; its
/// JSON document.
fn repack_json(file: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "repack",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = qgrad(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `qgrad eval FILE` on the first 300 test images (plus `extra`), which
/// must succeed; its JSON document.
fn eval_300(file: &Path, data: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "eval",
        file.to_str().unwrap(),
        "--data",
        data,
        "--test-limit",
        "300",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = qgrad(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `qgrad quantize post` at widths 8,4,0 with `--json` (plus `extra`),
/// which must succeed; its JSON document.
fn quantize_post_json(ck: &Path, data: &str, file: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "quantize",
        "post",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        data,
        "--out",
        file.to_str().unwrap(),
        "--widths",
        "8,4,0",
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = qgrad(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn help_is_available_everywhere() {
    for args in [
        vec!["--help"],
        vec!["train", "--help"],
        vec!["quantize", "--help"],
        vec!["quantize", "post", "--help"],
        vec!["quantize", "in-training", "--help"],
        vec!["quantize", "combined", "--help"],
        vec!["eval", "--help"],
        vec!["inspect", "--help"],
    ] {
        let o = qgrad(&args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("Usage"), "{args:?}");
    }
    let o = qgrad(&["quantize", "post", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Exit codes"));
}

#[test]
fn bad_options_are_usage_errors() {
    let cases: [(&[&str], &str); 6] = [
        (&["frobnicate"], "unrecognized subcommand"),
        (
            &[
                "quantize",
                "post",
                "--checkpoint",
                "x",
                "--out",
                "y",
                "--widths",
                "4,x",
            ],
            "not a bit width",
        ),
        (
            &[
                "quantize",
                "post",
                "--checkpoint",
                "x",
                "--out",
                "y",
                "--cluster",
                "median",
            ],
            "kmeans",
        ),
        (
            &["quantize", "in-training", "--out", "y", "--fraction", "0.3"],
            "(0.5, 1)",
        ),
        (
            &["quantize", "in-training", "--out", "y", "--model", "resnet"],
            "unknown model",
        ),
        (
            &["quantize", "combined", "--out", "y", "--act-bits", "40"],
            "40",
        ),
    ];
    for (args, needle) in cases {
        assert_clean_failure(&qgrad(args), 2, needle);
    }
    // Consistent-looking values that contradict each other are usage errors too.
    let o = qgrad(&[
        "quantize",
        "in-training",
        "--out",
        "y",
        "--low-bits",
        "1",
        "--data",
        mini().to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 2, "low bit width");
    let data = mini();
    let data = data.to_str().unwrap();
    let spacing = ["--split-every", "0", "--data", data];
    let o = qgrad(&[&["quantize", "combined", "--out", "y"], &spacing[..]].concat());
    assert_clean_failure(&o, 2, "1 epoch apart");
    let decay = ["--weight-decay=-0.1", "--data", data];
    let o = qgrad(&[&["train", "--out", "y"], &decay[..]].concat());
    assert_clean_failure(&o, 2, "weight decay");
}

#[test]
fn missing_and_corrupt_files_exit_with_3() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.qgz");
    let garbage = dir.path().join("garbage.qgz");
    std::fs::write(&garbage, b"QGRADCSR this is not a model at all").unwrap();
    for file in [&missing, &garbage] {
        let f = file.to_str().unwrap();
        assert_clean_failure(&qgrad(&["eval", f]), 3, "error:");
        assert_clean_failure(&qgrad(&["inspect", f]), 3, "cannot read");
    }
    let o = qgrad(&[
        "quantize",
        "post",
        "--checkpoint",
        garbage.to_str().unwrap(),
        "--out",
        dir.path().join("o.qgz").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 3, "checkpoint");
    let o = qgrad(&[
        "train",
        "--data",
        dir.path().to_str().unwrap(),
        "--out",
        dir.path().join("ck").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, 3, "MNIST");
}

#[test]
fn train_quantize_eval_and_inspect_agree() {
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let data = data.to_str().unwrap();
    let ck = dir.path().join("ck");
    let o = qgrad(&[
        "train",
        "--data",
        data,
        "--out",
        ck.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-batches",
        "30",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--test-limit",
        "300",
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = dir.path().join("post.qgz");
    let q = quantize_post_json(
        &ck,
        data,
        &file,
        &["--cluster", "quantiles:0.1,0.3,0.6", "--test-limit", "300"],
    );
    assert_eq!(q["mismatches"], 0);
    assert_eq!(q["quantized_accuracy"], q["file_accuracy"]);
    assert!(q["float_accuracy"].as_f64().unwrap() > 0.5, "{q}");
    let bytes = std::fs::metadata(&file).unwrap().len();
    assert_eq!(q["file_bytes"], bytes);
    let ratio = q["ratio"].as_f64().unwrap();
    assert!((ratio - 32.0 * 266_610.0 / (8.0 * bytes as f64)).abs() < 1e-9);

    let e = eval_300(&file, data, &["--compare-candle"]);
    assert_eq!(e["accuracy"], q["file_accuracy"]);
    assert_eq!(e["mismatches"], 0);

    let o = qgrad(&["inspect", file.to_str().unwrap()]);
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "fc1.weight",
        "fc3.bias",
        "total",
        "lenet-300-100",
        "post-training",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    // Output into a pipe whose reader is gone (`qgrad inspect f | head`) ends
    // the process quietly, never with a panic.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(["inspect", file.to_str().unwrap()])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert!(!o.status.success(), "nothing could be written");
    // A truncated copy of a valid file is rejected with exit code 3.
    let cut = dir.path().join("cut.qgz");
    let full = std::fs::read(&file).unwrap();
    std::fs::write(&cut, &full[..full.len() / 2]).unwrap();
    assert_clean_failure(
        &qgrad(&["eval", cut.to_str().unwrap(), "--data", data]),
        3,
        "error:",
    );

    // A checkpoint with one flipped bit in its tensor data is refused with
    // exit code 3 and a message naming the file, whichever command reads it.
    let bad_ck = dir.path().join("bad.safetensors");
    let mut bytes = std::fs::read(ck.join("checkpoint.safetensors")).unwrap();
    let at = bytes.len() - 1000;
    bytes[at] ^= 0x10;
    std::fs::write(&bad_ck, &bytes).unwrap();
    let bad = bad_ck.to_str().unwrap();
    let out = dir.path().join("never.qgz");
    let out = out.to_str().unwrap();
    for args in [
        vec![
            "quantize",
            "post",
            "--checkpoint",
            bad,
            "--data",
            data,
            "--out",
            out,
        ],
        vec![
            "quantize",
            "in-training",
            "--init",
            bad,
            "--data",
            data,
            "--out",
            out,
            "--epochs",
            "1",
        ],
    ] {
        let o = qgrad(&args);
        assert_clean_failure(&o, 3, "bad.safetensors");
        assert_clean_failure(&o, 3, "checksum");
    }
    assert!(
        !Path::new(out).exists(),
        "nothing is written from a corrupt checkpoint"
    );

    // In-training and combined from the trained checkpoint, one short epoch.
    for method in ["in-training", "combined"] {
        let out = dir.path().join(format!("{method}.qgz"));
        let o = qgrad(&[
            "quantize",
            method,
            "--init",
            ck.to_str().unwrap(),
            "--data",
            data,
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "1",
            "--max-batches",
            "10",
            "--batch-size",
            "32",
            "--fraction",
            "0.8",
            "--low-bits",
            "2",
            "--test-limit",
            "200",
            "--no-progress",
            "--json",
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["mismatches"], 0, "{method}: {r}");
        assert_eq!(r["splits"].as_array().unwrap().len(), 1);
        let hist = r["summary"]["width_histogram"].to_string();
        if method == "in-training" {
            assert!(hist.contains("[32,"), "{hist}");
        } else {
            assert!(!hist.contains("[32,"), "{hist}");
        }
    }
}

#[test]
fn cifar_models_train_quantize_and_run_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = qgrad_models::data::cifar::write_synthetic(&dir.path().join("cifar"), 16).unwrap();
    let data = data.to_str().unwrap();
    let ck = dir.path().join("alexnet");
    let o = qgrad(&[
        "train",
        "--model",
        "alexnet",
        "--data",
        data,
        "--out",
        ck.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--no-progress",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let file = dir.path().join("alexnet.qgz");
    let q = quantize_post_json(&ck, data, &file, &[]);
    assert_eq!(q["mismatches"], 0, "{q}");
    assert_eq!(q["quantized_accuracy"], q["file_accuracy"]);
    assert_eq!(q["parameters"], 2_472_266);
    let o = qgrad(&["eval", file.to_str().unwrap(), "--data", data, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"], q["file_accuracy"]);

    // A missing CIFAR-10 folder is a clear input error, not a panic.
    let missing = dir.path().join("nowhere");
    assert_clean_failure(
        &qgrad(&[
            "train",
            "--model",
            "vgg-16",
            "--data",
            missing.to_str().unwrap(),
            "--out",
            dir.path().join("v").to_str().unwrap(),
        ]),
        3,
        "CIFAR-10",
    );
}

#[test]
fn in_training_checkpoints_resume_and_refuse_other_options() {
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let ck = dir.path().join("run");
    let run = |low_bits: &str, out: &str| {
        qgrad(&[
            "quantize",
            "in-training",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "2",
            "--max-batches",
            "5",
            "--batch-size",
            "32",
            "--test-limit",
            "200",
            "--fraction",
            "0.7",
            "--low-bits",
            low_bits,
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--no-progress",
            "--json",
            "--out",
            dir.path().join(out).to_str().unwrap(),
        ])
    };
    let first = run("3", "a.qgz");
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(ck.join("checkpoint.safetensors").is_file());
    // Run again: everything comes from the checkpoint, same file contents.
    let again = run("3", "b.qgz");
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(stderr(&again).contains("resuming"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read(dir.path().join("a.qgz")).unwrap(),
        std::fs::read(dir.path().join("b.qgz")).unwrap()
    );
    assert_clean_failure(&run("4", "c.qgz"), 2, "other options");
    assert!(!dir.path().join("c.qgz").exists());
}

#[test]
fn loss_aware_training_writes_a_file_that_eval_and_inspect_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let data = data.to_str().unwrap();
    let file = dir.path().join("lab.qgz");
    let o = loss_aware_quick(data, &file, &["--quantizer", "lab", "--max-batches", "20"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["method"], "loss-aware:lab");
    assert_eq!(r["options"]["optimizer"], "adam");
    assert!(r["ratio"].as_f64().unwrap() > 25.0, "{r}");
    assert!(r["file_accuracy"].as_f64().unwrap() > 0.5, "{r}");
    let o = qgrad(&[
        "eval",
        file.to_str().unwrap(),
        "--data",
        data,
        "--test-limit",
        "300",
        "--compare-candle",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"], r["file_accuracy"]);
    assert_eq!(e["mismatches"], 0);
    let o = qgrad(&["inspect", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("fc1.weight"), "{table}");
    // A loss-aware quantizer with SGD is refused as a usage error.
    let o = qgrad(&[
        "quantize",
        "loss-aware",
        "--quantizer",
        "lab",
        "--optimizer",
        "sgd",
        "--data",
        data,
        "--out",
        file.to_str().unwrap(),
        "--epochs",
        "1",
    ]);
    assert_clean_failure(&o, 2, "adam");
    assert_clean_failure(
        &qgrad(&[
            "quantize",
            "loss-aware",
            "--quantizer",
            "laq9",
            "--out",
            "x.qgz",
        ]),
        2,
        "laq",
    );
}

#[test]
fn a_non_zero_budget_gives_a_sparse_file_that_runs_like_candle() {
    // Joint quantization and sparsification (METHOD §13): binary weights
    // under a 5 % budget are ±α or 0, stored as sparse ternary codes.
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let data = data.to_str().unwrap();
    let file = dir.path().join("sparse.qgz");
    let run = |kappa: &str, importance: &str, out: &Path| {
        loss_aware_quick(
            data,
            out,
            &[
                "--quantizer",
                "lab",
                "--kappa",
                kappa,
                "--kappa-ramp",
                "0.5",
                "--importance",
                importance,
                "--max-batches",
                "20",
            ],
        )
    };
    let o = run("0.05", "curvature", &file);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["options"]["sparsity"]["kappa"], 0.05, "{r}");
    assert!(r["file_accuracy"].as_f64().unwrap() > 0.5, "{r}");
    // Dense binary is ~32x; a twentieth of the weights in CSR (1 code bit
    // and a 10-bit column index each) is beyond it.
    assert!(r["ratio"].as_f64().unwrap() > 45.0, "{r}");
    let o = qgrad(&[
        "eval",
        file.to_str().unwrap(),
        "--data",
        data,
        "--test-limit",
        "300",
        "--compare-candle",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["mismatches"], 0);
    // The degree distributions of the pruned layers (METHOD §14).
    let o = qgrad(&["analyze", file.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers = a["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6, "three weight layers, in and out: {a}");
    assert_eq!(layers[0]["tensor"], "fc1.weight");
    assert_eq!(layers[0]["degrees"].as_array().unwrap().len(), 300);
    let in_degrees: u64 = layers[0]["degrees"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .sum();
    assert_eq!(in_degrees, 235_200 / 20, "κ 0.05 of fc1's 235,200 weights");
    assert!(
        layers[0]["fit"]["power_law"]["gamma"].is_number(),
        "{}",
        layers[0]
    );
    assert!(qgrad(&["analyze", file.to_str().unwrap()]).status.success());
    // Repacking: the same tensors in another layout, and back.
    let plain = dir.path().join("plain.qgz");
    let back = dir.path().join("back.qgz");
    let grows = |p: &serde_json::Value| {
        assert!(
            p["after"]["file_bytes"].as_u64() > p["before"]["file_bytes"].as_u64(),
            "{p}"
        )
    };
    grows(&repack_json(&file, &plain, &["--layout", "csr"]));
    repack_json(&plain, &back, &[]);
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&file).unwrap());
    assert_eq!(eval_300(&plain, data, &[])["accuracy"], r["file_accuracy"]);
    // Layout 3 (block-sparse rows, format version 4) on request: the same
    // model, run from the file to the same accuracy.
    let blocks = dir.path().join("blocks.qgz");
    repack_json(&file, &blocks, &["--layout", "block"]);
    assert_eq!(&std::fs::read(&blocks).unwrap()[8..12], &4u32.to_le_bytes());
    let o = qgrad(&["inspect", blocks.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"Block\""));
    assert_eq!(eval_300(&blocks, data, &[])["accuracy"], r["file_accuracy"]);
    // The file is version 5 (layout 4 holds the sparse weights); held to
    // version 4 for an older reader it takes layout 2 instead, is larger,
    // and runs to the same accuracy.
    assert_eq!(&std::fs::read(&file).unwrap()[8..12], &5u32.to_le_bytes());
    let old = dir.path().join("v4.qgz");
    grows(&repack_json(&file, &old, &["--format-version", "4"]));
    let bytes = std::fs::read(&old).unwrap();
    assert!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()) <= 4);
    assert_eq!(eval_300(&old, data, &[])["accuracy"], r["file_accuracy"]);
    let (file_s, back_s) = (file.to_str().unwrap(), back.to_str().unwrap());
    for (args, code, says) in [
        (vec!["--format-version", "1"], 2, "needs version 2"),
        (vec!["--format-version", "7"], 2, "does not exist"),
        (
            vec!["--format-version", "3", "--layout", "flat-gaps"],
            2,
            "needs version 5",
        ),
    ] {
        let mut all = vec!["repack", file_s, "--out", back_s];
        all.extend(args);
        assert_clean_failure(&qgrad(&all), code, says);
    }
    assert_clean_failure(
        &qgrad(&["repack", file_s, "--out", file_s]),
        2,
        "input file",
    );
    let missing = dir.path().join("missing.qgz");
    assert_clean_failure(
        &qgrad(&["repack", missing.to_str().unwrap(), "--out", back_s]),
        3,
        "missing.qgz",
    );
    let o = run("0.1", "accumulated-gradient", &dir.path().join("a.qgz"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_clean_failure(&run("1.5", "curvature", &dir.path().join("b.qgz")), 2, "κ");
    // A layer's own budget, and 8-bit biases: the file holds both, and runs
    // as candle does.
    let layered = dir.path().join("layered.qgz");
    let o = loss_aware_quick(
        data,
        &layered,
        &[
            "--quantizer",
            "lat-e",
            "--kappa",
            "0.05",
            "--kappa-layer",
            "fc3=0.5",
            "--bias-bits",
            "8",
            "--max-batches",
            "10",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["options"]["sparsity"]["layers"]["fc3"], 0.5, "{r}");
    assert_eq!(r["options"]["bias_bits"], 8, "{r}");
    let o = qgrad(&["inspect", layered.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let i: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tensors = i["size"]["tensors"].as_array().unwrap();
    let nnz = |name: &str| {
        let t = tensors.iter().find(|t| t["name"] == name).unwrap();
        t["nnz"].as_u64().unwrap()
    };
    assert!(nnz("fc3.weight") > 50 && nnz("fc3.weight") <= 500, "{i}");
    assert!(nnz("fc2.weight") <= 1500, "{i}");
    for t in tensors
        .iter()
        .filter(|t| t["name"].as_str().unwrap().ends_with(".bias"))
    {
        let widths: Vec<u64> = t["width_histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w[0].as_u64().unwrap())
            .collect();
        assert!(widths.iter().all(|&w| w == 0 || w == 8), "{t}");
    }
    for (args, needle) in [
        (["--kappa-layer", "fc9=0.5", "--kappa", "0.1"], "fc9"),
        (["--kappa-layer", "fc3=2", "--kappa", "0.1"], "κ"),
        (["--kappa-layer", "fc3", "--kappa", "0.1"], "LAYER=FRACTION"),
        (["--bias-bits", "1", "--kappa", "0.1"], "bias"),
    ] {
        let mut full = vec![
            "quantize",
            "loss-aware",
            "--quantizer",
            "lat-e",
            "--data",
            data,
            "--epochs",
            "1",
            "--max-batches",
            "2",
            "--no-progress",
            "--out",
        ];
        let out = dir.path().join("refused.qgz");
        full.push(out.to_str().unwrap());
        full.extend(args);
        assert_clean_failure(&qgrad(&full), 2, needle);
        assert!(!out.exists());
    }
    // The reference recipes' step schedules; a malformed one is a usage error.
    let stepped = dir.path().join("step.qgz");
    let o = qgrad(&[
        "quantize",
        "loss-aware",
        "--quantizer",
        "twn",
        "--data",
        data,
        "--epochs",
        "2",
        "--max-batches",
        "5",
        "--batch-size",
        "50",
        "--lr",
        "0.01",
        "--lr-schedule",
        "multistep:1:0.1",
        "--test-limit",
        "100",
        "--no-progress",
        "--json",
        "--out",
        stepped.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let lrs: Vec<f64> = r["training"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(lrs.len(), 2);
    assert!(
        (lrs[0] - 0.01).abs() < 1e-12 && (lrs[1] - 0.001).abs() < 1e-9,
        "{lrs:?}"
    );
    for bad in ["step:0:0.5", "step:15:-1", "multistep:a:0.1", "warmup"] {
        assert_clean_failure(
            &qgrad(&[
                "quantize",
                "loss-aware",
                "--quantizer",
                "twn",
                "--lr-schedule",
                bad,
                "--out",
                "x.qgz",
            ]),
            2,
            "schedule",
        );
    }
    assert!(!dir.path().join("b.qgz").exists());
}

#[test]
fn a_state_dict_round_trips_through_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let data = data.to_str().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let o = qgrad(&[
        "train",
        "--model",
        "lenet-300-100",
        "--data",
        data,
        "--epochs",
        "1",
        "--max-batches",
        "5",
        "--test-limit",
        "200",
        "--no-progress",
        "--out",
        &p("trained"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = qgrad(&[
        "export",
        &p("trained"),
        "--safetensors",
        &p("a.safetensors"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Import without fine-tuning, export again: the same bytes.
    let o = qgrad(&[
        "import",
        "--model",
        "lenet-300-100",
        "--from",
        &p("a.safetensors"),
        "--out",
        &p("imported"),
        "--fine-tune-epochs",
        "0",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["accgrad"], "zero");
    let o = qgrad(&[
        "export",
        &p("imported"),
        "--safetensors",
        &p("b.safetensors"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(p("a.safetensors")).unwrap(),
        std::fs::read(p("b.safetensors")).unwrap()
    );
    // With a short fine-tuning the accuracy before and after is reported, and
    // post-training quantization runs on the result.
    let o = qgrad(&[
        "import",
        "--model",
        "lenet-300-100",
        "--from",
        &p("a.safetensors"),
        "--out",
        &p("tuned"),
        "--data",
        data,
        "--test-limit",
        "200",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["accgrad"], "fine-tuned");
    assert!(r["accuracy_before"].as_f64().unwrap() > 0.3, "{r}");
    assert!(r["accuracy_after"].as_f64().unwrap() > 0.3, "{r}");
    let o = qgrad(&[
        "quantize",
        "post",
        "--checkpoint",
        &p("tuned"),
        "--widths",
        "8,4,0",
        "--data",
        data,
        "--test-limit",
        "200",
        "--out",
        &p("post.qgz"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A compressed file exports too.
    let o = qgrad(&[
        "export",
        &p("post.qgz"),
        "--safetensors",
        &p("c.safetensors"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Bad input: nothing is written, exit 3; an existing checkpoint, exit 2.
    std::fs::write(p("junk.safetensors"), b"junk").unwrap();
    assert_clean_failure(
        &qgrad(&[
            "import",
            "--model",
            "lenet-300-100",
            "--from",
            &p("junk.safetensors"),
            "--out",
            &p("bad"),
        ]),
        3,
        "safetensors",
    );
    assert!(!dir.path().join("bad").exists());
    assert_clean_failure(
        &qgrad(&[
            "import",
            "--model",
            "lenet-5",
            "--from",
            &p("a.safetensors"),
            "--out",
            &p("bad"),
        ]),
        3,
        "missing tensor 'conv1.weight'",
    );
    assert!(!dir.path().join("bad").exists());
    assert_clean_failure(
        &qgrad(&[
            "import",
            "--model",
            "lenet-300-100",
            "--from",
            &p("a.safetensors"),
            "--out",
            &p("imported"),
        ]),
        2,
        "already holds a checkpoint",
    );
}

#[test]
fn structured_training_writes_a_block_sparse_low_bit_file_that_eval_runs() {
    // METHOD §9: 1-bit weights under 4x block masks (binary codes in layout
    // 3) and 2-bit PACT activations, run from the file like candle.
    let dir = tempfile::tempdir().unwrap();
    let data = mini();
    let data = data.to_str().unwrap();
    let file = dir.path().join("s.qgz");
    let o = qgrad(&[
        "quantize",
        "structured",
        "--model",
        "mlp-128x2",
        "--weight-bits",
        "1",
        "--pact-bits",
        "2",
        "--compression",
        "4",
        "--block",
        "8x16",
        "--data",
        data,
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--test-limit",
        "300",
        "--no-progress",
        "--json",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["method"], "structured:w1-a2-c4");
    assert_eq!(r["pact_bits"], 2);
    // 1 bit per kept weight, a quarter kept (128x for the weights alone;
    // the float biases and the headers take their share).
    assert!(r["ratio"].as_f64().unwrap() > 60.0, "{r}");
    assert!(r["file_accuracy"].as_f64().unwrap() > 0.5, "{r}");
    let o = qgrad(&[
        "eval",
        file.to_str().unwrap(),
        "--data",
        data,
        "--test-limit",
        "300",
        "--compare-candle",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(e["accuracy"], r["file_accuracy"]);
    assert_eq!(e["mismatches"], 0);
    let o = qgrad(&["inspect", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("block"), "{table}");
    // Bad options are usage errors, and no file is written.
    let bad = dir.path().join("bad.qgz");
    for (flag, value, needle) in [
        ("--pact-bits", "5", "pact-bits"),
        ("--weight-bits", "5", "weight width"),
        ("--compression", "3", "compression"),
        ("--block", "0x4", "block"),
        ("--selection", "norm", "--init"),
        ("--clip", "nan", "clip"),
    ] {
        let o = qgrad(&[
            "quantize",
            "structured",
            flag,
            value,
            "--data",
            data,
            "--out",
            bad.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, 2, needle);
        assert!(!bad.exists());
    }
}
