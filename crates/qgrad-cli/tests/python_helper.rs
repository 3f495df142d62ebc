//! The PyTorch helpers end to end. python/qgrad_accgrad.py: trains a few
//! steps of a LeNet-300-100 in PyTorch with it, then imports the state dict
//! and the accumulated gradients with `qgrad import`. python/qgrad_sparse.py:
//! a pruned qgrad file exported dense and `--sparse` is read back in
//! PyTorch, loaded into an `nn.Module` and evaluated there as qgrad evaluates
//! it. Skipped, with a message, where PyTorch, safetensors or numpy is not
//! installed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = r#"
import sys, torch, safetensors.torch
sys.path.insert(0, sys.argv[1])
from qgrad_accgrad import AccumulatedGradients
torch.manual_seed(0)
class LeNet300(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 300)
        self.fc2 = torch.nn.Linear(300, 100)
        self.fc3 = torch.nn.Linear(100, 10)
    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
model = LeNet300()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
acc = AccumulatedGradients(model)
for _ in range(3):
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); acc.step(); opt.step()
acc.save(sys.argv[2] + "/a.safetensors")
safetensors.torch.save_file(model.state_dict(), sys.argv[2] + "/m.safetensors")
"#;

fn pytorch_is_installed() -> bool {
    let probe = Command::new("python3")
        .args(["-c", "import torch, safetensors, numpy"])
        .output();
    let ok = matches!(&probe, Ok(o) if o.status.success());
    if !ok {
        eprintln!(
            "skipped: python3 with torch, safetensors and numpy is not installed \
             (pip install torch safetensors numpy to run this test)"
        );
    }
    ok
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python")
}

fn qgrad(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(args)
        .output()
        .unwrap()
}

/// `qgrad export FILE --safetensors OUT [--sparse]`, which must succeed.
fn export(file: &OsStr, out: &OsStr, sparse: bool) {
    let mut args: Vec<&OsStr> = vec!["export".as_ref(), file, "--safetensors".as_ref(), out];
    if sparse {
        args.push("--sparse".as_ref());
    }
    ok(qgrad(&args));
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

#[test]
fn the_pytorch_helper_records_what_qgrad_import_reads() {
    if !pytorch_is_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    ok(Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(python_dir())
        .arg(dir.path())
        .output()
        .unwrap());
    let o = ok(qgrad(&[
        "import".as_ref(),
        "--model".as_ref(),
        "lenet-300-100".as_ref(),
        "--json".as_ref(),
        "--from".as_ref(),
        dir.path().join("m.safetensors").as_os_str(),
        "--accgrad".as_ref(),
        dir.path().join("a.safetensors").as_os_str(),
        "--out".as_ref(),
        dir.path().join("imported").as_os_str(),
    ]));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["accgrad"], "imported");
}

#[test]
fn a_sparse_export_runs_in_pytorch_as_the_file_runs_in_qgrad() {
    if !pytorch_is_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).into_os_string();
    let mini = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
    let mini = mini.as_os_str();
    let s = |x: &'static str| -> &'static OsStr { x.as_ref() };
    ok(qgrad(&[
        s("train"),
        s("--model"),
        s("lenet-300-100"),
        s("--data"),
        mini,
        s("--epochs"),
        s("1"),
        s("--max-batches"),
        s("20"),
        s("--test-limit"),
        s("200"),
        s("--no-progress"),
        s("--out"),
        &p("trained"),
    ]));
    // Post-training quantization with a 0-bit class: most weights pruned.
    ok(qgrad(&[
        s("quantize"),
        s("post"),
        s("--checkpoint"),
        &p("trained"),
        s("--widths"),
        s("8,4,0"),
        s("--data"),
        mini,
        s("--test-limit"),
        s("200"),
        s("--out"),
        &p("post.qgz"),
    ]));
    let o = ok(qgrad(&[
        s("eval"),
        &p("post.qgz"),
        s("--data"),
        mini,
        s("--compare-candle"),
        s("--json"),
    ]));
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (name, sparse) in [("dense.safetensors", false), ("sparse.safetensors", true)] {
        export(&p("post.qgz"), &p(name), sparse);
    }
    let sparse_bytes = std::fs::metadata(p("sparse.safetensors")).unwrap().len();
    let dense_bytes = std::fs::metadata(p("dense.safetensors")).unwrap().len();
    assert!(
        sparse_bytes * 2 < dense_bytes,
        "{sparse_bytes} vs {dense_bytes}"
    );
    let o = ok(Command::new("python3")
        .arg(python_dir().join("tests/check_sparse_export.py"))
        .arg(python_dir())
        .arg(p("dense.safetensors"))
        .arg(p("sparse.safetensors"))
        .arg(mini)
        .output()
        .unwrap());
    let torch: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(torch["images"], eval["test_images"]);
    // qgrad's candle evaluation quantizes activations to 16 bits, PyTorch
    // runs them in f32: at most a couple of the 1,000 images may differ.
    let (a, b) = (
        torch["correct"].as_i64().unwrap(),
        eval["correct"].as_i64().unwrap(),
    );
    assert!((a - b).abs() <= 2, "PyTorch {a} correct, qgrad {b}");
    assert!(eval["accuracy"].as_f64().unwrap() > 0.5, "{eval}");
    // A dense export is not a sparse one: the helper refuses it clearly.
    let o = Command::new("python3")
        .args([
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); \
             from qgrad_sparse import load_csr; load_csr(sys.argv[2])",
        ])
        .arg(python_dir())
        .arg(p("dense.safetensors"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("expected 'sparse-csr-v1'"), "{err}");
}

fn python_json(args: &[&OsStr]) -> serde_json::Value {
    let o = ok(Command::new("python3").args(args).output().unwrap());
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn a_lenet5_trained_in_pytorch_comes_in_and_goes_back_out_evaluating_the_same() {
    if !pytorch_is_installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).into_os_string();
    let script = python_dir().join("tests/lenet5_round_trip.py");
    let (script, py) = (script.as_os_str(), python_dir().into_os_string());
    let mini = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/mnist-mini");
    let mini = mini.as_os_str();
    let s = |x: &'static str| -> &'static OsStr { x.as_ref() };
    let dir_os = dir.path().as_os_str();
    let trained = python_json(&[script, s("train"), &py, dir_os, mini]);
    // Imported with the helper's accumulated gradients, evaluated by qgrad
    // on the same images: PyTorch's accuracy (f32 convolutions in another
    // order may flip an image).
    let o = ok(qgrad(&[
        s("import"),
        s("--model"),
        s("lenet-5"),
        s("--from"),
        &p("m.safetensors"),
        s("--accgrad"),
        &p("a.safetensors"),
        s("--data"),
        mini,
        s("--out"),
        &p("imported"),
        s("--json"),
    ]));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let images = trained["images"].as_f64().unwrap();
    let torch_correct = trained["correct"].as_f64().unwrap();
    let qgrad_correct = r["accuracy_before"].as_f64().unwrap() * images;
    assert!(
        (torch_correct - qgrad_correct).abs() <= 1.5,
        "PyTorch {torch_correct}, qgrad {qgrad_correct}"
    );
    assert!(torch_correct > 0.8 * images, "{trained}");
    // Post-training quantization ranked by those gradients, half pruned.
    ok(qgrad(&[
        s("quantize"),
        s("post"),
        s("--checkpoint"),
        &p("imported"),
        s("--widths"),
        s("8,4,0"),
        s("--cluster"),
        s("quantiles:0.2,0.3,0.5"),
        s("--data"),
        mini,
        s("--out"),
        &p("post.qgz"),
    ]));
    let o = ok(qgrad(&[
        s("eval"),
        &p("post.qgz"),
        s("--data"),
        mini,
        s("--json"),
    ]));
    let eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let file_correct = eval["correct"].as_i64().unwrap();
    assert!(file_correct as f64 > 0.7 * images, "{eval}");
    for (name, sparse) in [("d.safetensors", false), ("s.safetensors", true)] {
        let out = p(name);
        export(&p("post.qgz"), &out, sparse);
        let mut args = vec![script, s("eval"), &py, &out, mini];
        if sparse {
            args.push(s("--sparse"));
        }
        let back = python_json(&args);
        let c = back["correct"].as_i64().unwrap();
        assert!(
            (c - file_correct).abs() <= 2,
            "{name}: PyTorch {c}, the file {file_correct}"
        );
    }
}
