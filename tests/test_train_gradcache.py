"""GradCache: the cached-gradient step equals one large-batch step (float64), randomness replayed,
logit_scale/bias gradients counted once; and inside DeepSpeed (micro-batches as gradient-accumulation
steps) the optimizer sees the same gradient as the direct step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastclip import clip_loss, siglip_loss
from fastclip.train.gradcache import gradcache_step


class StandIn(nn.Module):
    """A two-tower model with dropout on both towers (its masks must be replayed)."""

    def __init__(self, siglip=False, d=12):
        super().__init__()
        self.img = nn.Sequential(
            nn.Flatten(), nn.Linear(3 * 4 * 4, 20), nn.GELU(), nn.Dropout(0.3), nn.Linear(20, d)
        )
        self.emb = nn.Embedding(30, 16)
        self.txt = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, d))
        self.logit_scale = nn.Parameter(torch.full((1,), 2.0))
        self.logit_bias = nn.Parameter(torch.full((1,), -3.0)) if siglip else None

    def forward(self, images, texts):
        out = {
            "image_features": F.normalize(self.img(images), dim=-1),
            "text_features": F.normalize(self.txt(self.emb(texts).mean(1)), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def _loss(siglip):
    if siglip:
        return lambda **o: siglip_loss(
            o["image_features"], o["text_features"], o["logit_scale"], o["logit_bias"]
        )
    return lambda **o: clip_loss(o["image_features"], o["text_features"], o["logit_scale"])


def _direct_grads(model, loss_fn, images, texts, micro):
    """The reference: the same micro-batch forwards (same dropout draws), all kept in one graph."""
    outs = [model(i, t) for i, t in zip(images.split(micro), texts.split(micro))]
    merged = {
        "image_features": torch.cat([o["image_features"] for o in outs]),
        "text_features": torch.cat([o["text_features"] for o in outs]),
        "logit_scale": outs[0]["logit_scale"],
    }
    if "logit_bias" in outs[0]:
        merged["logit_bias"] = outs[0]["logit_bias"]
    loss = loss_fn(**merged)
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("siglip", [False, True])
@pytest.mark.parametrize("batch,micro", [(24, 8), (23, 5), (7, 7), (9, 1)])
def test_gradcache_equals_large_batch(siglip, batch, micro):
    torch.manual_seed(0)
    model = StandIn(siglip).double().train()
    images = torch.randn(batch, 3, 4, 4, dtype=torch.float64)
    texts = torch.randint(0, 30, (batch, 5))
    loss_fn = _loss(siglip)
    torch.manual_seed(123)
    ref_loss, ref = _direct_grads(model, loss_fn, images, texts, micro)
    after_ref = torch.rand(3)
    torch.manual_seed(123)
    model.zero_grad()
    loss = gradcache_step(model, loss_fn, images, texts, micro)
    after = torch.rand(3)
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-12), (loss, ref_loss)
    for name, p in model.named_parameters():
        err = float((p.grad - ref[name]).abs().max())
        assert err <= 1e-10 * max(1.0, float(ref[name].abs().max())), f"{name}: max |diff| {err:.3e}"
    assert torch.equal(after, after_ref), "the RNG must end where one pass leaves it"


def test_gradcache_without_replay_would_differ():
    """Sanity of the test above: a different dropout draw in the second pass changes the gradient."""
    torch.manual_seed(0)
    model = StandIn().double().train()
    images, texts = torch.randn(16, 3, 4, 4, dtype=torch.float64), torch.randint(0, 30, (16, 5))
    torch.manual_seed(5)
    _, ref = _direct_grads(model, _loss(False), images, texts, 4)
    torch.manual_seed(6)
    _, other = _direct_grads(model, _loss(False), images, texts, 4)
    assert float((ref["img.1.weight"] - other["img.1.weight"]).abs().max()) > 1e-6


def test_gradcache_bad_input():
    model = StandIn()
    images, texts = torch.randn(4, 3, 4, 4), torch.randint(0, 30, (4, 5))
    with pytest.raises(ValueError, match="batch size"):
        gradcache_step(model, _loss(False), images, texts[:3], 2)
    with pytest.raises(ValueError, match="micro_batch"):
        gradcache_step(model, _loss(False), images, texts, 0)
    with pytest.raises(TypeError, match="micro_batch"):
        gradcache_step(model, _loss(False), images, texts, 2.0)
    with pytest.raises(TypeError, match="forward"):
        gradcache_step(lambda i, t: (i, t), _loss(False), images, texts, 2)

    def nan_loss(**o):
        return clip_loss(**o) * float("nan")

    model.zero_grad()
    with pytest.raises(FloatingPointError, match="not finite"):
        gradcache_step(model, nan_loss, images, texts, 2)
    assert all(p.grad is None for p in model.parameters()), "no gradient may be applied after a NaN loss"
    # check_finite=False: no host read of the loss; the caller gets the NaN loss (the trainer records it)
    loss = gradcache_step(model, nan_loss, images, texts, 2, check_finite=False)
    assert torch.isnan(loss)
    with pytest.raises(TypeError, match="check_finite: expected a bool"):
        gradcache_step(model, _loss(False), images, texts, 2, check_finite=None)


# ---- inside DeepSpeed -------------------------------------------------------------------------


def _ds_worker(out_path):
    """Run in a subprocess: the optimizer's gradient of a GradCache step (2 micro-batches) and of the
    direct step, ZeRO 0 fp32, same initialisation and data."""
    from fastclip.train.config import load_config
    from fastclip.train.trainer import Trainer

    grads = {}
    for micro in (16, 8):
        cfg = load_config(
            None,
            {
                "output_dir": out_path + f".{micro}",
                "train.batch_size": 16,
                "train.micro_batch_size": micro,
                "optim.grad_clip": 0.0,
                "checkpoint.resume": "never",
                "model.overrides": {"patch_size": 8, "vision_depth": 1, "text_depth": 1},
            },
        )
        trainer = Trainer(cfg)
        engine = trainer.engine
        captured = {}
        inner = engine.optimizer.step

        def step(*a, _inner=inner, _captured=captured, _module=engine.module, **k):
            for n, p in _module.named_parameters():
                _captured[n] = p.grad.detach().clone().tolist()
            return _inner(*a, **k)

        engine.optimizer.step = step
        images, captions = trainer.stream.next_batch()
        loss = trainer._train_step(images, trainer.tokenizer(captions))
        grads[micro] = {"loss": float(loss), "grads": captured, "steps": engine.global_steps}
    with open(out_path, "w") as f:
        json.dump(grads, f)


@pytest.mark.slow
def test_gradcache_in_deepspeed_equals_direct(tmp_path):
    out = str(tmp_path / "grads.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, __file__, out], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        res = json.load(f)
    direct, cached = res["16"], res["8"]
    assert direct["steps"] == cached["steps"] == 1, "one optimizer step per global batch"
    assert abs(direct["loss"] - cached["loss"]) < 1e-6
    assert direct["grads"].keys() == cached["grads"].keys()
    for name in direct["grads"]:
        a, b = torch.tensor(direct["grads"][name]), torch.tensor(cached["grads"][name])
        err = float((a - b).abs().max())
        assert err <= 2e-5 * max(1.0, float(a.abs().max())), f"{name}: max |diff| {err:.3e}"
        assert float(a.abs().max()) > 0 or "bias" in name


if __name__ == "__main__":
    _ds_worker(sys.argv[1])
