//! `cargo xtask reproduce --smoke` end to end (a few hundred images of the
//! shipped MNIST subset, one epoch): every output is written, every ratio is
//! the one of the file on disk, and a second run resumes from the cache.

use std::path::Path;
use std::process::Command;

use xtask::results::{Method, Role, RunRecord};

fn reproduce(out: &Path, extra: &[&str]) -> std::process::Output {
    reproduce_model(out, "lenet-300-100", extra)
}

fn reproduce_model(out: &Path, model: &str, extra: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "reproduce",
            "--smoke",
            "--quiet",
            "--models",
            model,
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .expect("the xtask binary runs");
    assert!(
        out.status.success(),
        "reproduce failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn smoke_reproduction_writes_every_output_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    reproduce(dir.path(), &[]);
    for f in [
        "REPORT.md",
        "results.json",
        "results.csv",
        "plots/accuracy_vs_compression_lenet-300-100.png",
        "plots/accuracy_vs_compression_lenet-300-100.svg",
        "powerlaw/POWERLAW.md",
        "powerlaw/powerlaw.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    // One CCDF plot per headline file.
    let ccdfs = std::fs::read_dir(dir.path().join("powerlaw"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.starts_with("ccdf_lenet-300-100_") && name.ends_with(".png")
        })
        .count();
    assert!(ccdfs >= 3, "{ccdfs} CCDF plots");
    let record = RunRecord::read(&dir.path().join("results.json")).unwrap();
    assert_eq!(record.baselines.len(), 1);
    assert_eq!(record.baselines[0].params, 266_610);
    for m in Method::ALL {
        assert!(
            record
                .points
                .iter()
                .any(|p| p.method == m && p.role == Role::Main),
            "no headline point for {}",
            m.name()
        );
    }
    for p in &record.points {
        let bytes = std::fs::metadata(dir.path().join(&p.file)).unwrap().len();
        assert_eq!(bytes, p.file_bytes, "{}", p.file);
        let ratio = 32.0 * p.params as f64 / (8.0 * bytes as f64);
        assert!(
            (ratio - p.ratio).abs() < 1e-9,
            "{}: {} vs {}",
            p.file,
            ratio,
            p.ratio
        );
        assert!((0.0..=1.0).contains(&p.accuracy));
        if p.role == Role::Main {
            // The file, run with the integer kernels, gives the same accuracy.
            assert_eq!(p.file_accuracy, Some(p.accuracy), "{}", p.label);
        }
    }
    assert!(record.points.iter().any(|p| p.pareto));
    let report = std::fs::read_to_string(dir.path().join("REPORT.md")).unwrap();
    let main = record
        .points
        .iter()
        .find(|p| p.method == Method::PostTraining && p.role == Role::Main)
        .unwrap();
    assert!(report.contains(&format!("{:.2}x", main.ratio)), "{report}");
    assert!(report.contains("7.62x"), "the thesis ratio is beside ours");
    let csv = std::fs::read_to_string(dir.path().join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + record.points.len());

    // A second run takes every point from the cache: identical records,
    // down to the measured seconds of each point.
    reproduce(dir.path(), &[]);
    let again = RunRecord::read(&dir.path().join("results.json")).unwrap();
    assert_eq!(again.points, record.points);
    assert_eq!(again.baselines, record.baselines);
}

#[test]
fn bad_options_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .output()
            .expect("the xtask binary runs")
    };
    let out = run(&["reproduce", "--smoke", "--methods", "magic"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown method"));
    let missing = dir.path().join("nothing-here");
    let out = run(&[
        "reproduce",
        "--smoke",
        "--quiet",
        "--data",
        missing.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cargo xtask download"), "{err}");
}

#[test]
fn cifar_smoke_reproduction_runs_alexnet_through_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let data = qgrad_models::data::cifar::write_synthetic(&dir.path().join("cifar"), 8).unwrap();
    let out = dir.path().join("out");
    reproduce_model(
        &out,
        "alexnet",
        &["--cifar-data", data.to_str().unwrap(), "--no-sweep"],
    );
    let record = RunRecord::read(&out.join("results.json")).unwrap();
    assert_eq!(record.baselines.len(), 1);
    assert_eq!(record.baselines[0].params, 2_472_266);
    assert_eq!(record.baselines[0].train_images, 40);
    for m in Method::ALL {
        let p = record
            .points
            .iter()
            .find(|p| p.method == m && p.role == Role::Main)
            .unwrap_or_else(|| panic!("no headline point for {}", m.name()));
        // Convolutions run from the file with the integer kernels too.
        assert_eq!(p.file_accuracy, Some(p.accuracy), "{}", p.label);
    }
    let report = std::fs::read_to_string(out.join("REPORT.md")).unwrap();
    assert!(report.contains("6.39x"), "the thesis ratio is beside ours");
}
