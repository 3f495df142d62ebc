//! The layering promises of ARCHITECTURE.md, checked on the real dependency
//! graph: the deployment side never depends on candle.

use std::process::Command;

/// The crates `cargo tree -e normal -p <krate>` lists (names only).
fn normal_dependencies(krate: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            krate,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_runtime_and_its_layers_do_not_link_candle() {
    for krate in [
        "qgrad-fixed",
        "qgrad-cluster",
        "qgrad-scaled",
        "qgrad-csr",
        "qgrad-data",
        "qgrad-runtime",
        "qgrad-powerlaw",
        "qgrad-collective",
        "qgrad-design",
    ] {
        let deps = normal_dependencies(krate);
        assert!(deps.iter().any(|d| d == krate), "{krate}: {deps:?}");
        let candle: Vec<_> = deps.iter().filter(|d| d.starts_with("candle")).collect();
        assert!(candle.is_empty(), "{krate} depends on {candle:?}");
    }
    // The training side does (a check that the test can fail).
    assert!(normal_dependencies("qgrad-models")
        .iter()
        .any(|d| d == "candle-core"));
}
