#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench-train`.

Trains one network of METHOD.md section 7 for a fixed number of steps on random
data (SGD with momentum and weight decay, cross-entropy, training mode), or the
character LSTM lstm-<hidden> of section 11, with the same batch size and thread
count as the qgrad side, and prints one JSON line: images (characters) per
second over the timed steps and the process's peak RSS.

PyTorch is a measurement tool only, never a dependency of qgrad: install it in
a virtual environment outside the repository, e.g.
    python3 -m venv ~/venv-torch && ~/venv-torch/bin/pip install torch
    QGRAD_BENCH_PYTHON=~/venv-torch/bin/python cargo xtask bench-train
"""

import argparse
import json
import resource
import sys
import time


def conv_bn_relu_stack(widths, nn):
    """3x3 convolutions (padding 1) with batch norm and ReLU from 3 input
    channels; a width of 0 is a 2x2 max pool (qgrad's conv_bn_relu_stack)."""
    layers, channels = [], 3
    for width in widths:
        if width == 0:
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, width, 3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return layers


def build(net, nn):
    if net == "lenet-300-100":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300), nn.ReLU(),
            nn.Linear(300, 100), nn.ReLU(),
            nn.Linear(100, 10),
        ), (1, 28, 28)
    if net == "lenet-5":
        # Caffe's LeNet-5: no non-linearity after the convolutions.
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, 500), nn.ReLU(),
            nn.Linear(500, 10),
        ), (1, 28, 28)
    if net == "alexnet":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(256, 10),
        ), (3, 32, 32)
    if net == "vgg-16":
        layers = conv_bn_relu_stack([64, 64, 0, 128, 128, 0, 256, 256, 256, 0,
                                     512, 512, 512, 0, 512, 512, 512, 0], nn)
        layers += [nn.Flatten(), nn.Linear(512, 512), nn.ReLU(),
                   nn.Dropout(0.5), nn.Linear(512, 10)]
        return nn.Sequential(*layers), (3, 32, 32)
    if net.startswith("mlp-"):
        # qgrad's mlp-<width>x<depth>[-bn]: depth hidden layers of width
        # units with ReLU, then 10 outputs; -bn puts batch norm after every
        # linear layer, the output layer's included.
        spec = net[4:]
        bn = spec.endswith("-bn")
        width, depth = (int(v) for v in spec.removesuffix("-bn").split("x"))
        layers, inputs = [nn.Flatten()], 784
        for i in range(depth + 1):
            outputs = 10 if i == depth else width
            layers.append(nn.Linear(inputs, outputs))
            if bn:
                layers.append(nn.BatchNorm1d(outputs))
            if i < depth:
                layers.append(nn.ReLU())
            inputs = outputs
        return nn.Sequential(*layers), (1, 28, 28)
    if net.startswith("cnn-"):
        # qgrad's cnn-<c>: 2xcC3-MP2-2x2cC3-MP2-2x4cC3-MP2-8c-8c-10, batch
        # norm after every layer but the last.
        c = int(net[4:])
        layers = conv_bn_relu_stack([c, c, 0, 2 * c, 2 * c, 0, 4 * c, 4 * c, 0], nn)
        layers += [nn.Flatten(),
                   nn.Linear(4 * c * 16, 8 * c), nn.BatchNorm1d(8 * c), nn.ReLU(),
                   nn.Linear(8 * c, 8 * c), nn.BatchNorm1d(8 * c), nn.ReLU(),
                   nn.Linear(8 * c, 10)]
        return nn.Sequential(*layers), (3, 32, 32)
    raise SystemExit(f"unknown network {net!r}")


SEQ_LEN = 100
VOCAB = 87


def lstm(args, torch, nn):
    """The character LSTM of METHOD section 11 as a PyTorch user writes it:
    nn.LSTM over one-hot characters, a linear softmax layer, Adam at 0.002,
    the global gradient norm clipped at 5, the state carried (detached)."""
    hidden = int(args.net.split("-", 1)[1])
    rnn = nn.LSTM(VOCAB, hidden)
    out = nn.Linear(hidden, VOCAB)
    params = list(rnn.parameters()) + list(out.parameters())
    optimizer = torch.optim.Adam(params, lr=0.002)
    x = torch.randint(0, VOCAB, (SEQ_LEN, args.batch))
    y = torch.randint(0, VOCAB, (SEQ_LEN, args.batch))
    state = [None]

    def step():
        optimizer.zero_grad(set_to_none=True)
        onehot = torch.nn.functional.one_hot(x, VOCAB).float()
        h, (hn, cn) = rnn(onehot, state[0])
        state[0] = (hn.detach(), cn.detach())
        logits = out(h.reshape(SEQ_LEN * args.batch, hidden))
        loss = torch.nn.functional.cross_entropy(logits, y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        optimizer.step()
        return loss.item()

    return measure(args, torch, step, SEQ_LEN * args.batch)


def measure(args, torch, step, items_per_step):
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    loss = float("nan")
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "side": "pytorch",
        "net": args.net,
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "steps": args.steps,
        "seconds": seconds,
        "items_per_sec": items_per_step * args.steps / seconds,
        "peak_rss_kib": peak_kib,
        "final_loss": loss,
    }))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.net.startswith("lstm-"):
        return lstm(args, torch, nn)
    model, shape = build(args.net, nn)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, *shape)
    y = torch.randint(0, 10, (args.batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return measure(args, torch, step, args.batch)

if __name__ == "__main__":
    sys.exit(main())
