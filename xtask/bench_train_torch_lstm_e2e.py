#!/usr/bin/env python3
"""PyTorch side of `cargo xtask bench-train --end-to-end` for character LSTMs.

Trains the character LSTM of METHOD.md section 11 on a real corpus for whole
epochs the way `qgrad train-lstm` does, as a plain PyTorch user writes it:
the file read as bytes over its own sorted byte vocabulary and cut into
chunks exactly as qgrad-data's text module lays them out (batch rows of
consecutive text, chunk k the seq_len columns k*seq_len.. of every row, the
first 80 % of the chunks for training, the next 10 % for validation, the
rest for testing), nn.LSTM over one-hot characters with a linear softmax
layer, the forget-gate bias at 1, Adam at 0.002 (x 0.98 per epoch after
epoch 10), the global gradient norm clipped at 5, the state carried from one
chunk to the next (detached), the validation bits per character after every
epoch (state carried, no gradient), a checkpoint written atomically after
every epoch, and the test bits per character at the end. Prints one JSON
line.

PyTorch is a measurement tool only, never a dependency of qgrad (see
bench_train_torch.py for how to point bench-train at an interpreter).
"""

import argparse
import json
import math
import os
import resource
import sys
import time


def split(tokens, batch, seq_len):
    """The train, validation and test parts as lists of (inputs, targets)
    chunks, each a [seq_len, batch] (time-major) pair of token lists."""
    per_chunk = batch * seq_len
    n = len(tokens) // per_chunk
    if n < 10:
        raise SystemExit(f"a corpus of {len(tokens)} tokens holds {n} chunks; 10 are needed")
    used, row_len = n * per_chunk, n * seq_len
    last = tokens[used] if used < len(tokens) else tokens[0]
    shifted = tokens[1:used] + [last]

    def chunk(k):
        starts = [r * row_len + k * seq_len for r in range(batch)]
        x = [[tokens[s + t] for s in starts] for t in range(seq_len)]
        y = [[shifted[s + t] for s in starts] for t in range(seq_len)]
        return x, y

    n_train, n_valid = n * 8 // 10, n // 10
    chunks = [chunk(k) for k in range(n)]
    return chunks[:n_train], chunks[n_train:n_train + n_valid], chunks[n_train + n_valid:]


def main():
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with open(args.text, "rb") as f:
        data = f.read()
    vocab = sorted(set(data))
    index = {b: i for i, b in enumerate(vocab)}
    tokens = [index[b] for b in data]
    train, valid, test = split(tokens, args.batch, args.seq_len)
    train = [(torch.tensor(x), torch.tensor(y)) for x, y in train]
    valid = [(torch.tensor(x), torch.tensor(y)) for x, y in valid]
    test = [(torch.tensor(x), torch.tensor(y)) for x, y in test]
    v, h = len(vocab), args.hidden
    rnn = nn.LSTM(v, h)
    out = nn.Linear(h, v)
    with torch.no_grad():
        # Gate order i, f, g, o: the forget gate's bias starts at 1.
        rnn.bias_ih_l0[h:2 * h].fill_(1.0)
        rnn.bias_hh_l0[h:2 * h].fill_(0.0)
    params = list(rnn.parameters()) + list(out.parameters())
    optimizer = torch.optim.Adam(params, lr=0.002)
    ready = time.perf_counter()
    # bench-train times the loop from this line on, as it does qgrad's.
    print(f"training lstm-{h} for {args.epochs} epochs: {len(train)} batches of "
          f"{args.batch} x {args.seq_len} characters an epoch", file=sys.stderr, flush=True)

    def forward(x, state):
        hs, (hn, cn) = rnn(nn.functional.one_hot(x, v).float(), state)
        return out(hs.reshape(-1, h)), (hn.detach(), cn.detach())

    def bpc(chunks):
        state, total = None, 0.0
        with torch.no_grad():
            for x, y in chunks:
                logits, state = forward(x, state)
                total += float(nn.functional.cross_entropy(logits, y.reshape(-1)))
        return total / max(len(chunks), 1) / math.log(2)

    epochs = []
    for epoch in range(args.epochs):
        lr = 0.002 * 0.98 ** max(0, epoch + 1 - 10)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        state, loss_sum = None, 0.0
        for x, y in train:
            logits, state = forward(x, state)
            loss = nn.functional.cross_entropy(logits, y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optimizer.step()
            loss_sum += float(loss)
        seconds = time.perf_counter() - t0
        valid_bpc = bpc(valid)
        tmp = args.out + ".tmp"
        torch.save({"rnn": rnn.state_dict(), "out": out.state_dict(),
                    "optimizer": optimizer.state_dict(), "epoch": epoch + 1}, tmp)
        os.replace(tmp, args.out)
        epochs.append({"epoch": epoch, "seconds": seconds,
                       "train_bpc": loss_sum / len(train) / math.log(2),
                       "valid_bpc": valid_bpc,
                       "chars_per_second": len(train) * args.batch * args.seq_len / seconds})
        # As qgrad train-lstm's epoch line: after validation and the checkpoint.
        print(f"epoch {epoch + 1:3}  train {epochs[-1]['train_bpc']:.3f} bpc  "
              f"valid {valid_bpc:.3f} bpc  {epochs[-1]['chars_per_second']:.0f} chars/s",
              file=sys.stderr, flush=True)
    print(json.dumps({
        "side": "pytorch",
        "net": f"lstm-{h}",
        "version": torch.__version__,
        "threads": torch.get_num_threads(),
        "startup_seconds": ready - started,
        "loop_seconds": time.perf_counter() - ready,
        "test_bpc": bpc(test),
        "records": epochs,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
