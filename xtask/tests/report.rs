//! The Pareto front, results.json/CSV, REPORT.md and the plots on a small
//! synthetic result set.

use xtask::results::{mark_pareto, pareto_front, Baseline, Method, ResultPoint, Role, RunRecord};

fn point(
    model: &str,
    method: Method,
    role: Role,
    ratio: f64,
    acc: f64,
    label: &str,
) -> ResultPoint {
    ResultPoint {
        model: model.into(),
        method,
        role,
        label: label.into(),
        options: serde_json::json!({ "label": label }),
        params: 266_610,
        file_bytes: (266_610.0 * 4.0 / ratio) as u64,
        ratio,
        accuracy: acc,
        file_accuracy: Some(acc),
        float_accuracy: 0.982,
        seconds: 1.5,
        file: format!("models/{model}/{label}.qgz"),
        pareto: false,
    }
}

fn synthetic() -> RunRecord {
    let mut points = vec![
        point(
            "lenet-300-100",
            Method::PostTraining,
            Role::Main,
            8.1,
            0.979,
            "widths 16,8,4,2,0, kmeans",
        ),
        point(
            "lenet-300-100",
            Method::InTraining,
            Role::Main,
            21.5,
            0.980,
            "p 0.9, 4 bits",
        ),
        point(
            "lenet-300-100",
            Method::Combined,
            Role::Main,
            55.0,
            0.975,
            "p 0.9, then 8,4,2,0",
        ),
        point(
            "lenet-300-100",
            Method::PostTraining,
            Role::Sweep,
            12.0,
            0.970,
            "widths 8,4,2,0",
        ),
        point(
            "lenet-300-100",
            Method::PostTraining,
            Role::Sweep,
            6.0,
            0.981,
            "widths 16,8,0",
        ),
        point(
            "lenet-300-100",
            Method::PostTraining,
            Role::Sweep,
            30.0,
            0.40,
            "widths 2,0, quantiles",
        ),
        point(
            "lenet-300-100",
            Method::Combined,
            Role::Sweep,
            70.0,
            0.960,
            "label, with \"quotes\"",
        ),
        point(
            "lenet-5",
            Method::PostTraining,
            Role::Main,
            11.0,
            0.990,
            "widths 16,8,4,2,0",
        ),
    ];
    mark_pareto(&mut points);
    RunRecord {
        qgrad_version: "0.1.0".into(),
        git_commit: "abc1234".into(),
        command: "cargo xtask reproduce --quick".into(),
        started_unix: 1_700_000_000,
        elapsed_seconds: 95.3,
        seed: 42,
        threads: 2,
        device: "cpu".into(),
        config: serde_json::json!({ "quick": true }),
        baselines: vec![
            Baseline {
                model: "lenet-300-100".into(),
                dataset_dir: "datasets/mnist-mini".into(),
                train_images: 6000,
                test_images: 1000,
                params: 266_610,
                epochs: 3,
                epoch_accuracy: vec![0.95, 0.97, 0.982],
                float_accuracy: 0.982,
                train_seconds: 12.0,
                train_config: serde_json::json!({}),
            },
            Baseline {
                model: "lenet-5".into(),
                dataset_dir: "datasets/mnist-mini".into(),
                train_images: 6000,
                test_images: 1000,
                params: 431_080,
                epochs: 3,
                epoch_accuracy: vec![0.97, 0.98, 0.991],
                float_accuracy: 0.991,
                train_seconds: 40.0,
                train_config: serde_json::json!({}),
            },
        ],
        points,
    }
}

#[test]
fn pareto_front_of_known_points() {
    // (ratio, accuracy): 0 and 2 dominate 1; 3 is dominated by 2 (equal
    // ratio, lower accuracy); 4 duplicates 0; 5 is NaN.
    let pts = [
        (10.0, 0.9),
        (5.0, 0.85),
        (20.0, 0.95),
        (20.0, 0.5),
        (10.0, 0.9),
        (f64::NAN, 1.0),
        (40.0, 0.2),
    ];
    assert_eq!(pareto_front(&pts), vec![2, 6]);
    let pts = [(1.0, 0.99), (2.0, 0.98), (3.0, 0.97), (2.5, 0.96)];
    assert_eq!(pareto_front(&pts), vec![0, 1, 2]);
    assert!(pareto_front(&[]).is_empty());
}

#[test]
fn pareto_marks_are_per_model_and_never_dominated() {
    let r = synthetic();
    let lenet: Vec<&ResultPoint> = r
        .points
        .iter()
        .filter(|p| p.model == "lenet-300-100")
        .collect();
    for p in &lenet {
        let dominated = lenet.iter().any(|q| {
            q.ratio >= p.ratio
                && q.accuracy >= p.accuracy
                && (q.ratio > p.ratio || q.accuracy > p.accuracy)
        });
        assert_eq!(p.pareto, !dominated, "{}", p.label);
    }
    // The only lenet-5 point is on its own front, whatever lenet-300-100 has.
    assert!(
        r.points
            .iter()
            .find(|p| p.model == "lenet-5")
            .unwrap()
            .pareto
    );
}

#[test]
fn json_round_trip_and_csv() {
    let r = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("results.json");
    r.write_json(&json).unwrap();
    assert_eq!(RunRecord::read(&json).unwrap(), r);

    let csv = r.to_csv();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + r.points.len());
    let header: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(header[0], "model");
    // The quoted label keeps its comma and quotes inside one field.
    assert!(csv.contains("\"label, with \"\"quotes\"\"\""), "{csv}");
    // The thesis ratio is filled for headline rows only.
    let post_main = lines
        .iter()
        .find(|l| l.starts_with("lenet-300-100,post-training,main"))
        .unwrap();
    assert!(post_main.contains(",7.62,"), "{post_main}");
    assert!(post_main.contains(",8.100,"), "{post_main}");
    assert!(post_main.contains(",97.90,"), "{post_main}");
}

#[test]
fn report_has_the_thesis_table_and_pareto_lists() {
    let r = synthetic();
    let md = xtask::report::render(&r, "plots");
    assert!(md.contains("cargo xtask reproduce --quick"));
    assert!(md.contains("abc1234"));
    assert!(md.contains("2023-11-14 22:13 UTC"), "{md}");
    // Thesis beside ours.
    assert!(md.contains("| lenet-300-100 | post-training | 7.62x | 8.10x | 97.90 % | 97.90 % | 98.20 % | -0.30 pt |"), "{md}");
    assert!(
        md.contains("| lenet-5 | in-training | 21.05x | not run |"),
        "{md}"
    );
    assert!(md.contains("plots/accuracy_vs_compression_lenet-300-100.png"));
    // Pareto list of lenet-300-100: 6.0 (0.981) and 21.5 (0.980) and 55 and 70 and 30 (0.40)…
    let section = md
        .split("### lenet-300-100")
        .nth(1)
        .unwrap()
        .split("###")
        .next()
        .unwrap();
    for ratio in ["6.00x", "21.50x", "55.00x", "70.00x"] {
        assert!(
            section.contains(&format!("| {ratio} |")),
            "{ratio} missing in {section}"
        );
    }
    assert!(
        !section.contains("| 8.10x |"),
        "8.1x at 97.9 % is dominated by 21.5x at 98.0 %"
    );
    assert!(
        !section.contains("| 30.00x |"),
        "30x at 40 % is dominated by 55x at 97.5 %"
    );
}

#[test]
fn plots_are_written_as_png_and_svg() {
    let r = synthetic();
    let dir = tempfile::tempdir().unwrap();
    let written = xtask::plot::write_plots(&r, dir.path()).unwrap();
    assert_eq!(written.len(), 4);
    let png = dir.path().join("accuracy_vs_compression_lenet-300-100.png");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(dir.path().join("accuracy_vs_compression_lenet-300-100.svg"))
        .unwrap();
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("Pareto front"), "legend text is drawn");
    assert!(
        svg.contains("1 point below the axis"),
        "the 40 % point is reported as hidden"
    );
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
}
