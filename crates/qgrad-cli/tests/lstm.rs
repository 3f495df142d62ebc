//! `qgrad train-lstm`, `qgrad eval` and `qgrad generate` on the shipped War
//! and Peace slice: the file's test BPC equals the training run's, progress
//! goes to stderr epoch by epoch, sampling is deterministic for a seed, and
//! bad input exits with a clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mini() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/war-and-peace-mini/input.txt")
}

fn qgrad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(args)
        .output()
        .expect("run qgrad")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "qgrad failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

#[test]
fn train_eval_generate() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ternary.qgrad");
    let text = mini();
    let out = qgrad(&[
        "train-lstm",
        "--text",
        text.to_str().unwrap(),
        "--hidden",
        "24",
        "--batch",
        "16",
        "--epochs",
        "2",
        "--train-batches",
        "8",
        "--norm",
        "weight",
        "--weights",
        "twn",
        "--out",
        file.to_str().unwrap(),
        "--json",
    ]);
    let trained = json(&out);
    // Progress on stderr as it happens, even with --json: a start line, then
    // one line per epoch with that epoch's validation BPC.
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines[0].starts_with("training char-lstm (twn-weight) for 2 epochs: 8 batches of 16 x 100"),
        "{log}"
    );
    for (e, record) in trained["records"].as_array().unwrap().iter().enumerate() {
        let valid = format!("valid {:.3} bpc", record["valid_bpc"].as_f64().unwrap());
        let line = lines[1 + e];
        assert!(
            line.starts_with(&format!("epoch {:>3}", e + 1)) && line.contains(&valid),
            "{log}"
        );
    }
    assert_eq!(lines.len(), 3, "{log}");
    let bpc = trained["test_bpc"].as_f64().unwrap();
    assert_eq!(trained["file"]["test_bpc"].as_f64().unwrap(), bpc);
    let eval = json(&qgrad(&[
        "eval",
        file.to_str().unwrap(),
        "--text",
        text.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(eval["test_bpc"].as_f64().unwrap(), bpc);
    assert_eq!(eval["model"], "char-lstm");
    let gen = |seed: &str| {
        let out = qgrad(&[
            "generate",
            file.to_str().unwrap(),
            "--prompt",
            "Pierre ",
            "--chars",
            "50",
            "--seed",
            seed,
        ]);
        assert!(out.status.success());
        out.stdout
    };
    let a = gen("1");
    assert_eq!(a, gen("1"));
    assert!(a.starts_with(b"Pierre "));
    // Bad input: a prompt character the corpus never had (exit 2), a
    // truncated file (exit 3), a missing corpus (exit 3), bad options (2).
    let out = qgrad(&["generate", file.to_str().unwrap(), "--prompt", "~"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never had"));
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.qgrad");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(
        qgrad(&["generate", cut.to_str().unwrap()]).status.code(),
        Some(3)
    );
    let out = qgrad(&["train-lstm", "--text", "/nonexistent/corpus.txt"]);
    assert_eq!(out.status.code(), Some(3));
    let out = qgrad(&["train-lstm", "--norm", "group"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown normalisation"));
}
