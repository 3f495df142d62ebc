//! The PyTorch helper (python/qgrad_accgrad.py) end to end: trains a few steps
//! of a LeNet-300-100 in PyTorch with it, then imports the state dict and the
//! accumulated gradients with `qgrad import`. Skipped, with a message, where
//! PyTorch or safetensors is not installed.

use std::path::Path;
use std::process::Command;

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

#[test]
fn the_pytorch_helper_records_what_qgrad_import_reads() {
    let probe = Command::new("python3")
        .args(["-c", "import torch, safetensors"])
        .output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!(
            "skipped: python3 with torch and safetensors is not installed \
             (pip install torch safetensors to run this test)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let o = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(&python)
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(env!("CARGO_BIN_EXE_qgrad"))
        .args(["import", "--model", "lenet-300-100", "--json", "--from"])
        .arg(dir.path().join("m.safetensors"))
        .arg("--accgrad")
        .arg(dir.path().join("a.safetensors"))
        .arg("--out")
        .arg(dir.path().join("imported"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["accgrad"], "imported");
}
