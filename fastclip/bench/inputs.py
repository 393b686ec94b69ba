"""The loss benchmark's inputs: unit-norm random features, and the cache that shares one (batch, dim,
dtype)'s features between the providers of a configuration."""

from __future__ import annotations

import torch

from fastclip.bench.oom import cleanup


def make_inputs(batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Unit-norm random image/text features (B, D) that require grad, as a model's heads produce them."""
    # Generated where they are used: at B = 2**20 a CPU generator and a copy would take seconds.
    g = torch.Generator(device=device).manual_seed(seed)
    feats = []
    for _ in range(2):
        t = torch.randn(batch, dim, generator=g, dtype=torch.float32, device=device)
        t = torch.nn.functional.normalize(t, dim=-1).to(dtype)
        feats.append(t.requires_grad_(True))
    return feats[0], feats[1]


class InputCache:
    """The features of the current (batch, dim, dtype), shared by the providers that run on them."""

    def __init__(self, device: torch.device):
        self.device, self.key, self.tensors = device, None, None

    def get(self, batch: int, dim: int, dtype: torch.dtype):
        if self.key != (batch, dim, dtype):
            self.drop()
            self.tensors = make_inputs(batch, dim, dtype, self.device)
            self.key = (batch, dim, dtype)
        for t in self.tensors:
            t.grad = None
        return self.tensors

    def drop(self) -> None:
        self.key, self.tensors = None, None
        cleanup(self.device)
