#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench-train --end-to-end`.

Trains an MNIST network of METHOD.md section 7 on the real data set for whole
epochs the way `qgrad train` does, as a plain PyTorch user writes it: the four
IDX files loaded once as uint8, each batch gathered and normalised (mean
0.1307, std 0.3081) from a seeded permutation, SGD with momentum 0.9 and
weight decay 5e-4, the learning rate on a per-epoch cosine from --lr to 0, the
accumulated |gradient| of every parameter (METHOD section 1) added after every
backward pass, the whole test set evaluated after every epoch (batches of
1000), and a checkpoint (weights, optimizer state, accumulated gradients)
written atomically after every epoch. Prints one JSON line.

With --quantizer lab it is the loss-aware binary loop of METHOD.md section
10 instead, as `qgrad quantize loss-aware --quantizer lab` runs it (with
--optimizer adam --lr 0.005 --weight-decay 0 --batch 100): every weight
tensor (the parameters of two or more dimensions; biases stay float) is
replaced for the forward and backward pass by alpha * sign(W), sign(0) = +1,
alpha = sum(D |W|) / sum(D) with D = sqrt(v) + 1e-8 and v Adam's second
moment without bias correction (zero before the first step, so the first
step is BWN's); the gradient of the binary weights updates the float W
(straight through), W is clipped to [-1, 1] after each update, and the test
set is evaluated with the binary weights.

PyTorch is a measurement tool only, never a dependency of qgrad (see
bench_train_torch.py for how to point bench-train at an interpreter).
"""

import argparse
import gzip
import json
import math
import os
import resource
import sys
import time

from bench_train_torch import build

MEAN, STD = 0.1307, 0.3081


def read_idx(torch, folder, stem):
    """One IDX file, gzipped or not, as a uint8 tensor."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rb") as f:
                data = f.read()
            dims = data[3]
            shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
            return torch.frombuffer(bytearray(data), dtype=torch.uint8,
                                    offset=4 + 4 * dims).reshape(shape)
    raise SystemExit(f"no {stem}[.gz] in {folder}")


def main():
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--quantizer", choices=["none", "lab"], default="none")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_x = read_idx(torch, args.data, "train-images-idx3-ubyte")
    train_y = read_idx(torch, args.data, "train-labels-idx1-ubyte").long()
    test_x = read_idx(torch, args.data, "t10k-images-idx3-ubyte")
    test_y = read_idx(torch, args.data, "t10k-labels-idx1-ubyte").long()
    model, _ = build(args.net, nn)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr,
                                     weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                                    weight_decay=args.weight_decay)
    accgrad = [torch.zeros_like(p) for p in model.parameters()]
    binary = [p for p in model.parameters() if p.dim() > 1] if args.quantizer == "lab" else []

    def binarize():
        """LAB: the float weights saved, alpha * sign(W) in their place."""
        saved = []
        with torch.no_grad():
            for p in binary:
                saved.append(p.detach().clone())
                v = optimizer.state.get(p, {}).get("exp_avg_sq")
                d = v.sqrt() + 1e-8 if v is not None else torch.full_like(p, 1e-8)
                alpha = (d * p.abs()).sum() / d.sum()
                p.copy_(torch.where(p >= 0, alpha, -alpha))
        return saved

    def restore(saved):
        with torch.no_grad():
            for p, w in zip(binary, saved):
                p.copy_(w)
    generator = torch.Generator().manual_seed(args.seed)
    ready = time.perf_counter()
    # bench-train times the loop from this line on, as it does qgrad train's.
    print(f"training {args.net} for {args.epochs} epochs on {train_x.shape[0]} images",
          file=sys.stderr, flush=True)

    def images(x):
        return x.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)

    epochs = []
    for epoch in range(args.epochs):
        lr = 0.5 * args.lr * (1.0 + math.cos(math.pi * epoch / args.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(train_x.shape[0], generator=generator)
        loss_sum = torch.zeros(())
        for start in range(0, len(order), args.batch):
            idx = order[start:start + args.batch]
            x, y = images(train_x[idx]), train_y[idx]
            saved = binarize()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            restore(saved)
            with torch.no_grad():
                for a, p in zip(accgrad, model.parameters()):
                    a.add_(p.grad.abs())
            optimizer.step()
            if binary:
                with torch.no_grad():
                    for p in binary:
                        p.clamp_(-1.0, 1.0)
            loss_sum += loss.detach() * len(idx)
        model.eval()
        correct = 0
        saved = binarize()
        with torch.no_grad():
            for start in range(0, test_x.shape[0], 1000):
                logits = model(images(test_x[start:start + 1000]))
                correct += int((logits.argmax(1) == test_y[start:start + 1000]).sum())
        restore(saved)
        tmp = args.out + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "accgrad": accgrad, "epoch": epoch + 1}, tmp)
        os.replace(tmp, args.out)
        epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0,
                       "train_loss": float(loss_sum) / train_x.shape[0],
                       "test_accuracy": correct / test_x.shape[0]})
        # As qgrad train's epoch line: after the evaluation and the checkpoint.
        print(f"epoch {epoch + 1:3}: loss {epochs[-1]['train_loss']:.4f}  "
              f"test accuracy {100 * epochs[-1]['test_accuracy']:.2f} %",
              file=sys.stderr, flush=True)
    print(json.dumps({
        "side": "pytorch",
        "net": args.net,
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "startup_seconds": ready - started,
        "loop_seconds": time.perf_counter() - ready,
        "test_accuracy": epochs[-1]["test_accuracy"] if epochs else None,
        "epochs": epochs,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
