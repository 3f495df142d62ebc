"""Record qgrad's accumulated gradients (METHOD §1) during PyTorch training.

qgrad ranks each parameter by A = sum over every optimizer step of |dL/dθ|.
Wrap a model before training, call ``step()`` after every ``loss.backward()``
(before ``optimizer.zero_grad()``), and save::

    from qgrad_accgrad import AccumulatedGradients

    acc = AccumulatedGradients(model)
    for x, y in loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        acc.step()            # A += |grad| for every parameter
        optimizer.step()
    acc.save("model.accgrad.safetensors")
    safetensors.torch.save_file(model.state_dict(), "model.safetensors")

then ``qgrad import --model lenet-300-100 --from model.safetensors
--accgrad model.accgrad.safetensors --out runs/imported``. The file holds one
f32 tensor ``<parameter name>.accgrad`` per parameter, under the names of
``model.named_parameters()`` (so ``--map`` applies to both files alike).
"""

import torch
from safetensors.torch import save_file


class AccumulatedGradients:
    """Sums |grad| of every parameter of ``model`` at each ``step()``."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())
        self.sums = {
            name: torch.zeros_like(p, dtype=torch.float32, device=p.device)
            for name, p in self.params.items()
        }
        self.steps = 0

    @torch.no_grad()
    def step(self):
        for name, p in self.params.items():
            if p.grad is not None:
                self.sums[name] += p.grad.detach().abs().float()
        self.steps += 1

    def save(self, path: str):
        tensors = {f"{name}.accgrad": s.cpu().contiguous() for name, s in self.sums.items()}
        save_file(tensors, path, metadata={"steps": str(self.steps)})
