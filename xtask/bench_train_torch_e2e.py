#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench-train --end-to-end`.

Trains an MNIST or CIFAR-10 network of METHOD.md section 7 on the real data
set for whole epochs the way `qgrad train` does, as a plain PyTorch user writes
it: the four IDX files (MNIST) or the six binary batches (CIFAR-10) loaded once
as uint8, each batch gathered and normalised from a seeded permutation (MNIST:
mean 0.1307, std 0.3081; CIFAR-10: the training set's per-channel mean and
standard deviation, as qgrad computes them, after zero padding by 4 pixels, a
random 32x32 crop and a horizontal flip with probability 1/2 per image, drawn
per batch in one indexing operation), SGD with momentum 0.9 and
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

With --quantizer structured it is the loop of METHOD.md section 9 instead,
as `qgrad quantize structured` runs it for an MLP (Linear, ReLU and batch-norm
layers; with --optimizer adam --lr 0.002 --weight-decay 0 --batch 100):
every weight matrix gets a random block mask (--block ROWSxCOLS blocks,
ceil(block columns / --compression) of them kept in every block row) that
zeroes it once and then again after every update, with the masked gradients
zeroed before the optimizer (no momentum on them); the forward pass uses the
weights at --weight-bits (2..8: symmetric uniform levels alpha * k / n with
n = 2^(bits-1) - 1, alpha = max |W|, nearest level with ties to the smaller
magnitude; 1: alpha * sign(W) on the kept weights with alpha their mean |W|;
32: float) with a straight-through gradient; the input of every linear layer
but the first goes through PACT at --pact-bits (clipped to [0, beta] and
rounded to 2^bits - 1 steps, beta a learned parameter per layer starting at
2.0, used as max(beta, 1e-3)); the image is rounded to 8-bit fixed point
with one power-of-two exponent per image. The test set is evaluated the same
way (the quantized network).

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


def is_cifar(net):
    """The networks of METHOD.md section 7 that train on CIFAR-10."""
    return net in ("alexnet", "vgg-16") or net.startswith("cnn-")


def read_cifar(torch, root):
    """The five training batches and the test batch of the binary CIFAR-10
    (records of a label byte and 3x32x32 pixels), from the folder itself or
    its cifar-10-batches-bin/ or cifar10/cifar-10-batches-bin/, as qgrad
    looks for them; uint8 images and int64 labels."""
    for folder in (root, os.path.join(root, "cifar-10-batches-bin"),
                   os.path.join(root, "cifar10", "cifar-10-batches-bin")):
        if os.path.exists(os.path.join(folder, "test_batch.bin")):
            break
    else:
        raise SystemExit(f"no cifar-10-batches-bin/test_batch.bin in {root}")

    def load(names):
        raw = bytearray()
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                raw += f.read()
        if len(raw) % 3073:
            raise SystemExit(f"{folder}: {len(raw)} bytes is not whole 3073-byte records")
        records = torch.frombuffer(raw, dtype=torch.uint8).reshape(-1, 3073)
        return records[:, 1:].reshape(-1, 3, 32, 32).contiguous(), records[:, 0].long()

    train = load([f"data_batch_{i}.bin" for i in range(1, 6)])
    return train + load(["test_batch.bin"])


def channel_statistics(torch, images):
    """Per-channel mean and standard deviation of pixel / 255 over the
    training images (qgrad-data's channel_statistics: f64 sums, the
    variance floored at 1e-12, both rounded to f32), from a histogram of
    each channel's bytes."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean, std = [], []
    for ch in range(images.shape[1]):
        hist = torch.bincount(images[:, ch].flatten(), minlength=256).double()
        m = float((hist * values).sum()) / count
        sq = float((hist * values * values).sum()) / count
        mean.append(m)
        std.append(math.sqrt(max(sq - m * m, 1e-12)))
    return (torch.tensor(mean, dtype=torch.float32),
            torch.tensor(std, dtype=torch.float32))


def crop_flip(torch, batch, pad, generator):
    """qgrad's Augment::CropFlip: every image shifted by (dy, dx) drawn
    uniformly from [-pad, pad], its columns mirrored with probability 1/2,
    zeros (black, before normalisation) where the shift leaves the image."""
    n, _, h, w = batch.shape
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad))
    dy = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    dx = torch.randint(-pad, pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    ys, xs = torch.arange(h).unsqueeze(0), torch.arange(w).unsqueeze(0)
    rows = ys + dy + pad
    cols = torch.where(flip, w - 1 - xs, xs) + dx + pad
    return padded[torch.arange(n)[:, None, None, None],
                  torch.arange(batch.shape[1])[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class Structured:
    """The structured loop's layers (module docstring): block masks, k_w-bit
    weights, PACT activations and the 8-bit input, around an MLP."""

    def __init__(self, args, model, torch, nn):
        self.args, self.torch, self.F, self.Linear = args, torch, nn.functional, nn.Linear
        self.layers = list(model)
        self.linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        unsupported = [m for m in self.layers
                       if not isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU, nn.BatchNorm1d))]
        if unsupported:
            raise SystemExit(f"--quantizer structured covers MLPs; {args.net} has {unsupported[0]}")
        rows, cols = (int(v) for v in args.block.split("x"))
        generator = torch.Generator().manual_seed(args.seed)
        self.masks = [self.block_mask(m.weight, rows, cols, generator) for m in self.linears]
        self.apply_masks()
        self.clips = [nn.Parameter(torch.full((1,), 2.0)) for _ in self.linears[1:]]

    def block_mask(self, weight, br, bc, generator):
        """ceil(block columns / c) random blocks kept in every block row."""
        torch = self.torch
        rows, cols = weight.shape
        brows, bcols = -(-rows // br), -(-cols // bc)
        keep = -(-bcols // self.args.compression)
        chosen = torch.rand(brows, bcols, generator=generator).topk(keep, dim=1).indices
        blocks = torch.zeros(brows, bcols).scatter_(1, chosen, 1.0)
        return blocks.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols].contiguous()

    def apply_masks(self):
        with self.torch.no_grad():
            for m, mask in zip(self.linears, self.masks):
                m.weight.mul_(mask)

    def mask_gradients(self):
        for m, mask in zip(self.linears, self.masks):
            m.weight.grad.mul_(mask)

    def weights(self, w, mask):
        """The k_w-bit weights, straight through to w."""
        bits, torch = self.args.weight_bits, self.torch
        if bits == 32:
            return w
        with torch.no_grad():
            if bits == 1:
                alpha = (w.abs() * mask).sum() / mask.sum()
                q = torch.where(w >= 0, alpha, -alpha) * mask
            else:
                n = 2 ** (bits - 1) - 1
                step = w.abs().max() / n
                q = torch.ceil(w.abs() / step - 0.5).clamp_(0, n).mul_(step).mul_(w.sign())
        return w + (q - w).detach()

    def pact(self, x, beta):
        b = beta.clamp_min(1e-3)
        y = self.F.relu(x) - self.F.relu(x - b)
        levels = 2 ** self.args.pact_bits - 1
        with self.torch.no_grad():
            q = self.torch.round(y / b * levels) / levels * b
        return y + (q - y).detach()

    def image(self, x, bits=8):
        """8-bit fixed point, one power-of-two exponent per image."""
        torch = self.torch
        flat = x.flatten(1)
        top = flat.abs().amax(1, keepdim=True)
        e = torch.where(top > 0, torch.ceil(torch.log2(top)), torch.zeros_like(top))
        up = torch.exp2(bits - 1 - e)
        return (flat * up).round_().clamp_(-2 ** (bits - 1), 2 ** (bits - 1) - 1).div_(up)

    def forward(self, x):
        h, index = x, 0
        for m in self.layers:
            if isinstance(m, self.Linear):
                h = self.image(h) if index == 0 else self.pact(h, self.clips[index - 1])
                h = self.F.linear(h, self.weights(m.weight, self.masks[index]), m.bias)
                index += 1
            else:
                h = m(h)
        return h


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
    parser.add_argument("--quantizer", choices=["none", "lab", "structured"], default="none")
    parser.add_argument("--weight-bits", type=int, choices=[1, 2, 3, 4, 8, 32], default=2)
    parser.add_argument("--pact-bits", type=int, choices=[2, 3, 4, 8], default=2)
    parser.add_argument("--compression", type=int, default=4)
    parser.add_argument("--block", default="16x16")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="stop each epoch after this many batches (qgrad's --max-batches)")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cifar = is_cifar(args.net)
    if cifar and args.quantizer != "none":
        raise SystemExit(f"--quantizer {args.quantizer} covers the MNIST networks")
    if cifar:
        train_x, train_y, test_x, test_y = read_cifar(torch, args.data)
    else:
        train_x = read_idx(torch, args.data, "train-images-idx3-ubyte")
        train_y = read_idx(torch, args.data, "train-labels-idx1-ubyte").long()
        test_x = read_idx(torch, args.data, "t10k-images-idx3-ubyte")
        test_y = read_idx(torch, args.data, "t10k-labels-idx1-ubyte").long()
    model, _ = build(args.net, nn)
    structured = Structured(args, model, torch, nn) if args.quantizer == "structured" else None
    params = list(model.parameters()) + (structured.clips if structured else [])
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9,
                                    weight_decay=args.weight_decay)
    forward = structured.forward if structured else model
    accgrad = [torch.zeros_like(p) for p in params]
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

    if cifar:
        # After the `training` line, as qgrad train computes them.
        mean, std = channel_statistics(torch, train_x)
        scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
        shift = (mean / std).reshape(1, -1, 1, 1)
        augment = torch.Generator().manual_seed(args.seed + 1)

        def images(x, train=False):
            if train:
                x = crop_flip(torch, x, 4, augment)
            return x.float().mul_(scale).sub_(shift)
    else:
        def images(x, train=False):
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
        seen = 0
        for start in range(0, len(order), args.batch)[:args.max_batches]:
            idx = order[start:start + args.batch]
            x, y = images(train_x[idx], train=True), train_y[idx]
            saved = binarize()
            loss = nn.functional.cross_entropy(forward(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            restore(saved)
            with torch.no_grad():
                if structured:
                    structured.mask_gradients()
                for a, p in zip(accgrad, params):
                    a.add_(p.grad.abs())
            optimizer.step()
            if structured:
                structured.apply_masks()
            if binary:
                with torch.no_grad():
                    for p in binary:
                        p.clamp_(-1.0, 1.0)
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
        model.eval()
        correct = 0
        saved = binarize()
        with torch.no_grad():
            for start in range(0, test_x.shape[0], 1000):
                logits = forward(images(test_x[start:start + 1000]))
                correct += int((logits.argmax(1) == test_y[start:start + 1000]).sum())
        restore(saved)
        tmp = args.out + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "accgrad": accgrad, "epoch": epoch + 1,
                    "clips": structured.clips if structured else [],
                    "masks": structured.masks if structured else []}, tmp)
        os.replace(tmp, args.out)
        epochs.append({"epoch": epoch, "seconds": time.perf_counter() - t0,
                       "train_loss": float(loss_sum) / max(seen, 1),
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
