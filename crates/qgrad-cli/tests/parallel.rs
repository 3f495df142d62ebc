//! `qgrad train-parallel` end to end on the shipped MNIST subset: ranks as
//! threads (always), and with the `mpi` feature under `mpirun -np 2`,
//! which must give the threads' weights bit for bit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn mini() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini")
}

/// A short run's arguments (LeNet-300-100, 12 steps of 64 images).
fn short_run(engine: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train-parallel",
        "--engine",
        engine,
        "--data",
        mini().to_str().unwrap(),
        "--epochs",
        "2",
        "--max-batches",
        "6",
        "--batch-size",
        "64",
        "--test-limit",
        "200",
        "--no-progress",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn qgrad(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("the qgrad binary runs")
}

fn json_of(o: &Output) -> serde_json::Value {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "stderr: {err}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {err}"))
}

fn assert_usage_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

#[test]
fn simulated_ranks_train_report_and_repeat_their_bits() {
    let q = ["--grad-bits", "2", "--bucket", "512", "--clip", "2.5"];
    let a = json_of(&qgrad(&short_run("threads:2", &q)));
    let b = json_of(&qgrad(&short_run("threads:2", &q)));
    assert_eq!(a["weights_sha256"], b["weights_sha256"]);
    assert_eq!(a["ranks"], 2);
    assert_eq!(a["steps"], 12);
    let measured = a["bytes_per_step_measured"].as_f64().unwrap();
    assert_eq!(measured, a["bytes_per_step_format"].as_f64().unwrap());
    let f32_bytes = a["f32_bytes_per_step"].as_f64().unwrap();
    assert!(f32_bytes / measured >= 15.0, "{f32_bytes} / {measured}");
    assert!(a["test_accuracy"].as_f64().unwrap() > 0.3);
    // Loss-aware weights train on the ranks too, and go into a file that
    // runs with the integer kernels.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.qgz");
    let lab = json_of(&qgrad(&short_run(
        "threads:2",
        &[
            "--weights",
            "lab",
            "--grad-bits",
            "3",
            "--out",
            file.to_str().unwrap(),
        ],
    )));
    assert_eq!(lab["weights"], "lab");
    assert!(lab["test_accuracy"].as_f64().unwrap() > 0.2);
    let written = &lab["file"];
    assert_eq!(
        written["bytes"].as_u64().unwrap(),
        std::fs::metadata(&file).unwrap().len()
    );
    assert!(written["ratio"].as_f64().unwrap() > 20.0, "{written}");
    let (candle, from_file) = (
        written["candle_accuracy"].as_f64().unwrap(),
        written["file_accuracy"].as_f64().unwrap(),
    );
    assert!(
        (candle - from_file).abs() <= 0.01,
        "{candle} vs {from_file}"
    );
    assert!((candle - lab["test_accuracy"].as_f64().unwrap()).abs() <= 0.02);
}

#[test]
fn bad_options_are_usage_errors() {
    assert_usage_error(
        &qgrad(&short_run("threads:2", &["--grad-bits", "9"])),
        "2..=8",
    );
    assert_usage_error(&qgrad(&short_run("threads:2", &["--clip", "2"])), "--clip");
    assert_usage_error(&qgrad(&short_run("threads:0", &[])), "threads:N");
    assert_usage_error(
        &qgrad(&short_run("threads:2", &["--weights", "lab7"])),
        "--weights",
    );
    assert_usage_error(
        &qgrad(&short_run("threads:2", &["--out", "x.qgz"])),
        "--out writes quantized weights",
    );
    let mut one = short_run("threads:2", &[]);
    let at = one.iter().position(|a| a == "64").unwrap();
    one[at] = "1".into();
    assert_usage_error(&qgrad(&one), "cannot be split over 2 ranks");
    #[cfg(not(feature = "mpi"))]
    assert_usage_error(&qgrad(&short_run("mpi", &[])), "built without MPI");
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;

    /// `mpirun` with the settings OpenMPI needs in CI containers (as root,
    /// more ranks than cores); MPICH ignores them.
    fn mpirun(args: &[&str]) -> Output {
        Command::new("mpirun")
            .args(args)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .expect("mpirun runs (install an MPI: apt-get install openmpi-bin libopenmpi-dev)")
    }

    fn on_mpi(ranks: &str, extra: &[&str]) -> Output {
        let run = short_run("mpi", extra);
        let mut args = vec!["-np", ranks, env!("CARGO_BIN_EXE_qgrad")];
        args.extend(run.iter().map(String::as_str));
        mpirun(&args)
    }

    #[test]
    fn mpirun_np_2_equals_two_threads_bit_for_bit() {
        for extra in [
            &["--grad-bits", "32"][..],
            &["--grad-bits", "3", "--clip", "2.5"],
        ] {
            let threads = json_of(&qgrad(&short_run("threads:2", extra)));
            let mpi = json_of(&on_mpi("2", extra));
            assert!(mpi["engine"].as_str().unwrap().starts_with("MPI, 2 ranks"));
            assert_eq!(
                mpi["weights_sha256"], threads["weights_sha256"],
                "{extra:?}"
            );
            // Timings differ; losses and accuracies must not.
            for key in ["train_loss", "test_accuracy", "test_loss"] {
                let of = |v: &serde_json::Value| -> Vec<serde_json::Value> {
                    v["epochs"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|e| e[key].clone())
                        .collect()
                };
                assert_eq!(of(&mpi), of(&threads), "{key}, {extra:?}");
            }
            assert_eq!(
                mpi["bytes_per_step_measured"],
                threads["bytes_per_step_measured"]
            );
        }
    }

    #[test]
    fn ranks_started_differently_or_failing_alone_end_the_job_with_an_error() {
        let exe = env!("CARGO_BIN_EXE_qgrad");
        let a = short_run("mpi", &["--grad-bits", "3"]);
        let b = short_run("mpi", &["--grad-bits", "2"]);
        let mut args = vec!["-np", "1", exe];
        args.extend(a.iter().map(String::as_str));
        args.extend([":", "-np", "1", exe]);
        args.extend(b.iter().map(String::as_str));
        let o = mpirun(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("rank 0 of 2") && err.contains("rank 1 of 2"),
            "{err}"
        );
        assert!(err.contains("different settings"), "{err}");
        // One rank without its data: the job ends (no hang) with its error.
        let mut bad = short_run("mpi", &["--grad-bits", "3"]);
        let at = bad.iter().position(|a| a == "--data").unwrap();
        bad[at + 1] = "/nonexistent/mnist".into();
        let mut args = vec!["-np", "1", exe];
        args.extend(a.iter().map(String::as_str));
        args.extend([":", "-np", "1", exe]);
        args.extend(bad.iter().map(String::as_str));
        let o = mpirun(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(
            err.contains("rank 1 of 2") && err.contains("/nonexistent/mnist"),
            "{err}"
        );
    }
}
