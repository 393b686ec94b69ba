"""open_clip's training step with fastclip's losses patched in, step for step against open_clip's.

``open_clip_train`` cannot be imported here (it imports torchvision, which fails with the CPU torch),
so ``_train_step`` is a faithful minimal copy of its ``train_one_epoch`` step (``accum_freq=1``):
the model's forward and the loss under ``get_autocast(precision)``, ``sum(losses.values())``,
``backward`` outside the autocast block, the optimizer step and the ``logit_scale`` clamp; the losses
are built as open_clip's ``create_loss`` builds them (``cache_labels=True`` for ClipLoss), the model
is wrapped in DistributedDataParallel on several ranks. Both runs start from the same weights and see
the same batches; per-step losses must agree within fp32 rounding (fp32) or the bf16 budget
(``amp_bf16``, open_clip's default precision, where open_clip computes its logits in bf16 and fastclip
accumulates in fp32).
"""

from __future__ import annotations

import json
import math
import os
import traceback
from contextlib import suppress
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import load_open_clip_loss

open_clip_loss = load_open_clip_loss()
pytestmark = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")

STEPS = 4
BATCH = 8  # per rank
TOL = {"fp32": 2e-5, "amp_bf16": 3e-2}  # relative, per step


class TinyClip(torch.nn.Module):
    """open_clip's model interface: ``forward(images, texts)`` -> dict of normalized features and the
    exponentiated ``logit_scale`` (+ ``logit_bias`` for SigLIP)."""

    def __init__(self, siglip: bool):
        super().__init__()
        self.visual = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        self.token_embedding = torch.nn.Embedding(40, 24)
        self.text_projection = torch.nn.Linear(24, 16)
        init = (math.log(10.0), -10.0) if siglip else (math.log(1 / 0.07), None)
        self.logit_scale = torch.nn.Parameter(torch.tensor(init[0]))
        self.logit_bias = torch.nn.Parameter(torch.tensor(init[1])) if siglip else None

    def forward(self, images, texts):
        image_features = F.normalize(self.visual(images), dim=-1)
        text_features = F.normalize(self.text_projection(self.token_embedding(texts).mean(1)), dim=-1)
        out = {"image_features": image_features, "text_features": text_features}
        out["logit_scale"] = self.logit_scale.exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def get_autocast(precision, device_type="cpu"):
    """open_clip_train.precision.get_autocast."""
    if precision == "amp":
        amp_dtype = torch.float16
    elif precision in ("amp_bfloat16", "amp_bf16"):
        amp_dtype = torch.bfloat16
    else:
        return suppress
    return partial(torch.amp.autocast, device_type=device_type, dtype=amp_dtype)


def create_loss(
    module, kind, rank, world, local_loss=False, gather_with_grad=False, dist_impl=None, fastclip_ring=False
):
    """open_clip.factory.create_loss, for the module (open_clip's loss.py or fastclip.loss);
    ``fastclip_ring``: fastclip's ClipLoss passes features around the ring instead of gathering."""
    if kind == "siglip":
        return module.SigLipLoss(rank=rank, world_size=world, dist_impl=dist_impl)
    extra = {"dist_impl": "ring"} if fastclip_ring and module.__name__ == "fastclip.loss" else {}
    return module.ClipLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank, world_size=world,
        **extra,
    )  # fmt: skip


def _train_step(model, images, texts, loss, optimizer, autocast):
    optimizer.zero_grad()
    with autocast():
        model_out = model(images, texts)
        losses = loss(**model_out, output_dict=True)
        total_loss = sum(losses.values())
    total_loss.backward()
    optimizer.step()
    unwrapped = model.module if hasattr(model, "module") else model
    with torch.no_grad():
        unwrapped.logit_scale.clamp_(0, math.log(100))
    return float(total_loss.detach())


def _run(kind, precision, rank, world, flags, *, compile_loss=False):
    """Per-step losses of open_clip's loss and of fastclip's, same model init, same data."""
    import fastclip.loss as fastclip_loss

    out = {}
    for name, module in (("open_clip", open_clip_loss), ("fastclip", fastclip_loss)):
        torch.manual_seed(0)
        model = TinyClip(siglip=kind == "siglip")
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        loss = create_loss(module, kind, rank, world, **flags)
        if compile_loss and name == "fastclip":
            loss = torch.compile(loss)
        g = torch.Generator().manual_seed(1000 + rank)
        steps = []
        for _ in range(STEPS):
            images = torch.randn(BATCH, 12, generator=g)
            texts = torch.randint(0, 40, (BATCH, 5), generator=g)
            steps.append(_train_step(model, images, texts, loss, optimizer, get_autocast(precision)))
        out[name] = steps
    return out


def _assert_steps_equal(name, got, want, tol):
    for step, (a, w) in enumerate(zip(got, want)):
        assert math.isfinite(a), f"{name}: step {step} loss {a}"
        assert abs(a - w) <= tol * max(1.0, abs(w)), f"{name}: step {step}: fastclip {a} vs open_clip {w}"


CASES = [
    ("clip", {}),
    ("siglip", {}),
]


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
@pytest.mark.parametrize("kind,flags", CASES)
def test_one_process_steps_equal_open_clip(kind, flags, precision):
    res = _run(kind, precision, 0, 1, flags)
    _assert_steps_equal(f"{kind} {precision}", res["fastclip"], res["open_clip"], TOL[precision])


# ---------------------------------------------------------------------------------------------------
# two processes (gloo): one spawned world runs every case

WORLD_CASES = [
    ("clip", {"local_loss": False, "gather_with_grad": False}),
    ("clip", {"local_loss": True, "gather_with_grad": True}),
    ("clip", {"local_loss": True, "gather_with_grad": False, "fastclip_ring": True}),
    ("siglip", {"dist_impl": "bidir"}),
    ("siglip", {"dist_impl": "gather"}),
]


def _get_logits_diffs(rank, world):
    """max |fastclip - open_clip| of ``ClipLoss.get_logits`` and ``get_ground_truth`` on this rank, per flags."""
    import fastclip.loss as fastclip_loss

    g = torch.Generator().manual_seed(rank)
    x, y = (F.normalize(torch.randn(BATCH, 16, generator=g), dim=-1) for _ in range(2))
    out = {}
    for ll in (False, True):
        for gg in (False, True):
            kw = dict(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
            ours, theirs = fastclip_loss.ClipLoss(**kw), open_clip_loss.ClipLoss(**kw)
            got, want = ours.get_logits(x, y, 10.0, 1.0), theirs.get_logits(x, y, torch.tensor(10.0), 1.0)
            labels = ours.get_ground_truth(x.device, got[0].shape[0])
            diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
            same_labels = torch.equal(labels, theirs.get_ground_truth(x.device, want[0].shape[0]))
            out[f"local_loss={ll} gather_with_grad={gg}"] = diff if same_labels else float("inf")
    return out


def _worker(rank, world, tmpdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["FASTCLIP_TEST_PORT"])
    torch.set_num_threads(1)
    result = {"runs": {}, "error": None}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for kind, flags in WORLD_CASES:
            for precision in ("fp32", "amp_bf16"):
                key = f"{kind} {json.dumps(flags)} {precision}"
                result["runs"][key] = _run(kind, precision, rank, world, flags)
        result["get_logits"] = _get_logits_diffs(rank, world)
        # torch.compile of the loss module in a multi-process run (graph breaks allowed at collectives)
        for kind in ("clip", "siglip"):
            result["runs"][f"{kind} compiled fp32"] = _run(kind, "fp32", rank, world, {}, compile_loss=True)
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["error"] = traceback.format_exc()
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_process_steps_equal_open_clip(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["FASTCLIP_TEST_PORT"] = str(sock.getsockname()[1])
    mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            res = json.load(f)
        assert res["error"] is None, f"rank {rank}:\n{res['error']}"
        assert len(res["runs"]) == 2 * len(WORLD_CASES) + 2
        assert len(res["get_logits"]) == 4 and all(d <= 1e-6 for d in res["get_logits"].values()), res[
            "get_logits"
        ]
        for key, runs in res["runs"].items():
            tol = TOL["amp_bf16" if "amp_bf16" in key else "fp32"]
            _assert_steps_equal(f"rank {rank} {key}", runs["fastclip"], runs["open_clip"], tol)
