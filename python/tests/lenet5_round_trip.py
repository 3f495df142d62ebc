"""A LeNet-5 (METHOD §7, Caffe's: no non-linearity after the convolutions)
trained in PyTorch for qgrad import, and any LeNet-5 state dict evaluated.

    lenet5_round_trip.py train PYTHON_DIR OUT_DIR MNIST_DIR
        trains 60 steps with qgrad_accgrad recording; writes OUT_DIR/m.safetensors
        and OUT_DIR/a.safetensors
    lenet5_round_trip.py eval PYTHON_DIR STATE_DICT MNIST_DIR [--sparse]
        loads the state dict strictly (a --sparse export through qgrad_sparse)

Both print {"correct": ..., "images": ...} on the MNIST test images as JSON.
Run by crates/qgrad-cli/tests/python_helper.rs.
"""

import gzip
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
import safetensors.torch


class LeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 20, 5)
        self.conv2 = torch.nn.Conv2d(20, 50, 5)
        self.fc1 = torch.nn.Linear(800, 500)
        self.fc2 = torch.nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def mnist(folder, part):
    with gzip.open(f"{folder}/{part}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(f"{folder}/{part}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    # qgrad's MNIST normalisation.
    x = (torch.tensor(images, dtype=torch.float32) / 255 - 0.1307) / 0.3081
    return x, torch.tensor(labels, dtype=torch.int64)


def correct(model, folder):
    x, y = mnist(folder, "t10k")
    model.eval()
    with torch.no_grad():
        return {"correct": int((model(x).argmax(1) == y).sum()), "images": len(y)}


def main():
    mode, python_dir, path, folder = sys.argv[1:5]
    sys.path.insert(0, python_dir)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LeNet5()
    if mode == "train":
        from qgrad_accgrad import AccumulatedGradients

        x, y = mnist(folder, "train")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        acc = AccumulatedGradients(model)
        for step in range(60):
            i = torch.randint(0, len(y), (64,))
            loss = F.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            acc.step()
            opt.step()
        acc.save(f"{path}/a.safetensors")
        safetensors.torch.save_file(model.state_dict(), f"{path}/m.safetensors")
    elif "--sparse" in sys.argv[5:]:
        from qgrad_sparse import load_dense

        model.load_state_dict(load_dense(path))
    else:
        model.load_state_dict(safetensors.torch.load_file(path))
    print(json.dumps(correct(model, folder)))


main()
