"""open_clip's training step with fastclip's ``DistillClipLoss`` and ``CoCaLoss`` patched in, step for step
against open_clip's own, 1 and 2 processes, fp32 and ``amp_bf16``.

A faithful minimal copy of ``open_clip_train.train.train_one_epoch``'s step (``accum_freq=1``; the
package itself cannot be imported here, see tests/test_open_clip_step.py, whose tiny model and
``get_autocast`` copy this file reuses): the model forward, for distillation the teacher's forward
under ``torch.no_grad()`` with its outputs added as ``dist_*`` keys, ``loss(**model_out,
output_dict=True)`` and ``sum(losses.values())`` inside the autocast block, ``backward`` outside it,
the optimizer step and the ``logit_scale`` clamp. Losses are built as open_clip's ``create_loss``
builds them (``cache_labels=True``).
"""

from __future__ import annotations

import json
import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_open_clip_step import TinyClip, get_autocast
from utils import load_open_clip_loss

open_clip_loss = load_open_clip_loss()
pytestmark = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")

STEPS = 4
BATCH = 8  # per rank
TOL = {"fp32": 2e-5, "amp_bf16": 3e-2}  # relative, per step (as tests/test_open_clip_step.py)
VOCAB, PAD = 40, 0


class TinyCoCa(TinyClip):
    """TinyClip plus a captioning head: ``logits (B, T-1, V)`` of the next token and ``labels (B, T-1)``,
    as open_clip's CoCa returns them (token 0 is the pad id and is ignored by the caption loss)."""

    def __init__(self):
        super().__init__(siglip=False)
        self.decoder = torch.nn.Linear(24 + 16, VOCAB)

    def forward(self, images, texts):
        out = super().forward(images, texts)
        tokens = self.token_embedding(texts[:, :-1])  # (B, T-1, 24)
        img = out["image_features"][:, None, :].expand(-1, tokens.shape[1], -1)
        out["logits"] = self.decoder(torch.cat([tokens, img], dim=-1))
        out["labels"] = texts[:, 1:]
        return out


def create_loss(module, kind, rank, world, local_loss=False, gather_with_grad=False):
    """open_clip.factory.create_loss's distill and CoCa branches (``module``: open_clip's loss.py or
    fastclip's classes)."""
    common = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank,
                  world_size=world)  # fmt: skip
    if kind == "distill":
        return module.DistillClipLoss(**common)
    return module.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0, **common)


def _train_step(model, dist_model, images, texts, loss, optimizer, autocast):
    optimizer.zero_grad()
    with autocast():
        model_out = model(images, texts)
        if dist_model is not None:
            with torch.no_grad():
                dist_model_out = dist_model(images, texts)
            model_out.update({f"dist_{k}": v for k, v in dist_model_out.items()})
        losses = loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
    total_loss.backward()
    optimizer.step()
    unwrapped = model.module if hasattr(model, "module") else model
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, math.log(100))
    return [float(total_loss.detach()), sorted(losses)]


def _run(kind, precision, rank, world, flags):
    import fastclip.losses_distill as fastclip_losses

    out = {}
    for name, module in (("open_clip", open_clip_loss), ("fastclip", fastclip_losses)):
        torch.manual_seed(0)
        model = TinyCoCa() if kind == "coca" else TinyClip(siglip=False)
        dist_model = None
        if kind == "distill":
            torch.manual_seed(1)
            dist_model = TinyClip(siglip=False).eval()
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        loss = create_loss(module, kind, rank, world, **flags)
        g = torch.Generator().manual_seed(1000 + rank)
        steps = []
        for _ in range(STEPS):
            images = torch.randn(BATCH, 12, generator=g)
            texts = torch.randint(0, VOCAB, (BATCH, 6), generator=g)
            steps.append(
                _train_step(model, dist_model, images, texts, loss, optimizer, get_autocast(precision))
            )
        out[name] = steps
    return out


def _assert_steps_equal(name, got, want, tol):
    for step, ((a, keys_a), (w, keys_w)) in enumerate(zip(got, want)):
        assert keys_a == keys_w, f"{name}: step {step}: loss keys {keys_a} vs open_clip's {keys_w}"
        assert math.isfinite(a), f"{name}: step {step} loss {a}"
        assert abs(a - w) <= tol * max(1.0, abs(w)), f"{name}: step {step}: fastclip {a} vs open_clip {w}"


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
@pytest.mark.parametrize("kind", ["distill", "coca"])
def test_one_process_steps_equal_open_clip(kind, precision):
    res = _run(kind, precision, 0, 1, {})
    assert len(res["fastclip"]) == STEPS
    _assert_steps_equal(f"{kind} {precision}", res["fastclip"], res["open_clip"], TOL[precision])


WORLD_CASES = [
    ("distill", {"local_loss": False, "gather_with_grad": False}),
    ("distill", {"local_loss": True, "gather_with_grad": True}),
    ("distill", {"local_loss": True, "gather_with_grad": False}),
    ("coca", {"local_loss": False, "gather_with_grad": False}),
    ("coca", {"local_loss": True, "gather_with_grad": True}),
]


def _worker(rank, world, tmpdir):
    torch.set_num_threads(1)
    result = {"runs": {}, "error": None}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
        )
        for kind, flags in WORLD_CASES:
            for precision in ("fp32", "amp_bf16"):
                result["runs"][f"{kind} {json.dumps(flags)} {precision}"] = _run(
                    kind, precision, rank, world, flags
                )
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_steps_equal_open_clip(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            res = json.load(f)
        assert res["error"] is None, f"rank {rank}:\n{res['error']}"
        assert len(res["runs"]) == 2 * len(WORLD_CASES)
        for key, runs in res["runs"].items():
            tol = TOL["amp_bf16" if "amp_bf16" in key else "fp32"]
            _assert_steps_equal(f"rank {rank} {key}", runs["fastclip"], runs["open_clip"], tol)


def test_caption_labels_hit_the_pad_id():
    """The synthetic captions of the runs above contain the pad id, so the caption loss's ignore_index
    path is exercised (same generator sequence as ``_run`` on rank 0)."""
    g = torch.Generator().manual_seed(1000)
    hits = 0
    for _ in range(STEPS):
        torch.randn(BATCH, 12, generator=g)
        texts = torch.randint(0, VOCAB, (BATCH, 6), generator=g)
        hits += int((texts[:, 1:] == PAD).sum())
    assert hits > 0
