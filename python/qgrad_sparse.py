"""Read a sparse export of qgrad (``qgrad export FILE.qgz --sparse``) in PyTorch.

The file is safetensors in the layout ``sparse-csr-v1`` (its metadata key
``qgrad.layout``; the layout is documented in qgrad_pipeline::interchange):
each weight ``N`` of shape ``[d0, d1, ...]`` is four tensors ``N.crow_indices``,
``N.col_indices``, ``N.values`` and ``N.size`` holding the compressed sparse
rows of its matrix view ``[d0, d1*d2*...]`` (``weight.flatten(1)``); biases
and batch norm are dense under their own names.

    from qgrad_sparse import load_csr, load_dense

    csr, sizes = load_csr("model-q.sparse.safetensors")
    y = torch.sparse.mm(csr["fc1.weight"], x.T).T + csr["fc1.bias"]

    model.load_state_dict(load_dense("model-q.sparse.safetensors"))
"""

import json
import struct

import torch
from safetensors.torch import load_file

LAYOUT_KEY = "qgrad.layout"
SPARSE_CSR_V1 = "sparse-csr-v1"
_PARTS = ("crow_indices", "col_indices", "values", "size")


def _layout(path):
    # safetensors: 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header.get("__metadata__", {}).get(LAYOUT_KEY)


def load_csr(path, device="cpu"):
    """Returns ``(tensors, sizes)``: each weight as a 2-D
    ``torch.sparse_csr_tensor`` of its matrix view, every other tensor dense;
    ``sizes[name]`` is a weight's original shape."""
    layout = _layout(path)
    if layout != SPARSE_CSR_V1:
        raise ValueError(
            f"{path}: layout {layout!r}, expected {SPARSE_CSR_V1!r} "
            "(write it with qgrad export --sparse)"
        )
    flat = load_file(path, device=device)
    weights = {k.rsplit(".", 1)[0] for k in flat if k.endswith(".crow_indices")}
    tensors, sizes = {}, {}
    for name in sorted(weights):
        missing = [p for p in _PARTS if f"{name}.{p}" not in flat]
        if missing:
            raise ValueError(f"{path}: weight {name!r} lacks {missing}")
        size = torch.Size(flat[f"{name}.size"].tolist())
        rows = size[0]
        cols = 1
        for d in size[1:]:
            cols *= d
        tensors[name] = torch.sparse_csr_tensor(
            flat[f"{name}.crow_indices"],
            flat[f"{name}.col_indices"],
            flat[f"{name}.values"],
            size=(rows, cols),
            # A corrupt file is a clear error here, not a crash later.
            check_invariants=True,
        )
        sizes[name] = size
    parts = {f"{w}.{p}" for w in weights for p in _PARTS}
    for k, v in flat.items():
        if k not in parts:
            tensors[k] = v
    return tensors, sizes


def load_dense(path, device="cpu"):
    """The state dict with every weight dense in its original shape, for
    ``model.load_state_dict``."""
    tensors, sizes = load_csr(path, device)
    return {
        k: (v.to_dense().reshape(sizes[k]) if k in sizes else v)
        for k, v in tensors.items()
    }
