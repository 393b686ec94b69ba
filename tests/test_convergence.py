"""A tiny two-tower model trained with the fused loss and with the reference loss: same loss curve."""

import pytest
import torch
from torch import nn

from fastclip import ClipLoss, SigLipLoss


def _train(loss_fn, steps=30, siglip=False):
    torch.manual_seed(0)
    image_tower, text_tower = (
        nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 16)),
        nn.Linear(10, 16),
    )
    scale = nn.Parameter(torch.tensor([2.0]))
    bias = nn.Parameter(torch.tensor([-2.0]))
    params = [*image_tower.parameters(), *text_tower.parameters(), scale] + ([bias] if siglip else [])
    opt = torch.optim.AdamW(params, lr=3e-2)
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(12, 10, generator=gen)
    curve = []
    for _ in range(steps):
        images = torch.randn(48, 12, generator=gen)
        texts = images @ mix + 0.3 * torch.randn(48, 10, generator=gen)  # paired views of one latent
        x = nn.functional.normalize(image_tower(images), dim=-1)
        y = nn.functional.normalize(text_tower(texts), dim=-1)
        loss = loss_fn(x, y, scale.exp(), bias) if siglip else loss_fn(x, y, scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return torch.tensor(curve)


@pytest.mark.parametrize("cls,siglip", [(ClipLoss, False), (SigLipLoss, True)])
def test_fused_and_reference_losses_train_alike(cls, siglip):
    fused = _train(cls(impl="torch", chunk_size=7), siglip=siglip)
    reference = _train(cls(impl="reference"), siglip=siglip)
    assert fused[-5:].mean() < 0.6 * fused[:5].mean()  # it learns
    torch.testing.assert_close(fused, reference, rtol=1e-3, atol=1e-4)
