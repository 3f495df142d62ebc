"""Checks a dense and a sparse export of the same qgrad LeNet-300-100 file in
PyTorch: the sparse one rebuilt by qgrad_sparse equals the dense one bit for
bit, the dense one loads strictly into an nn.Module, a sparse product equals
the dense layer, and the module is evaluated on the MNIST test images.

Usage: check_sparse_export.py PYTHON_DIR DENSE SPARSE MNIST_DIR; prints JSON.
Run by crates/qgrad-cli/tests/python_helper.rs.
"""

import sys, gzip, json, numpy as np, torch, safetensors.torch
sys.path.insert(0, sys.argv[1])
from qgrad_sparse import load_csr, load_dense
dense_path, sparse_path, mnist = sys.argv[2], sys.argv[3], sys.argv[4]
class LeNet300(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 300)
        self.fc2 = torch.nn.Linear(300, 100)
        self.fc3 = torch.nn.Linear(100, 10)
    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
dense = safetensors.torch.load_file(dense_path)
rebuilt = load_dense(sparse_path)
assert dense.keys() == rebuilt.keys(), (dense.keys(), rebuilt.keys())
for k in dense:
    assert torch.equal(dense[k], rebuilt[k]), k
model = LeNet300()
model.load_state_dict(dense)  # strict: every name and shape matches
model.eval()
with gzip.open(f"{mnist}/t10k-images-idx3-ubyte.gz") as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
with gzip.open(f"{mnist}/t10k-labels-idx1-ubyte.gz") as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
x = (torch.tensor(images, dtype=torch.float32) / 255 - 0.1307) / 0.3081
y = torch.tensor(labels, dtype=torch.int64)
with torch.no_grad():
    logits = model(x)
    # The same first layer as sparse products: torch.sparse.mm on the CSR.
    csr, sizes = load_csr(sparse_path)
    h = torch.sparse.mm(csr["fc1.weight"], x.T).T + csr["fc1.bias"]
    assert torch.allclose(h, model.fc1(x), atol=1e-4), (h - model.fc1(x)).abs().max()
    nnz = {k: v.values().numel() for k, v in csr.items() if k in sizes}
print(json.dumps({"correct": int((logits.argmax(1) == y).sum()), "images": len(y), "nnz": nnz}))
