"""The trainer's host synchronisations and its finiteness checks (issue 29, item 3).

A read of a device tensor on the host (``.item()``, ``bool(t)``, ``float(t)``, ``t.tolist()``) waits
for the GPU to finish all queued work. The trainer makes one such read per log interval: the
finiteness record of the steps (``fastclip.train.step_checks``) is read with the loss and logit
scale of the metrics row. Counted here on CPU, where the same reads dispatch to the same ATen ops:
``aten._local_scalar_dense`` (what ``item``/``bool``/``float`` of a tensor become), ``aten.equal``
and ``aten.nonzero`` (both read on the host on CUDA), and ``Tensor.tolist``/``numpy``/``cpu`` (a
device-to-host copy on CUDA, no ATen op on CPU). A divergence is still reported with the step where
it happened, before any checkpoint could hold it, and with several ranks on every rank at once.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from utils import torchrun_two

import fastclip
from fastclip.train import checkpoint as ckpt
from fastclip.train.config import load_config

TINY = {"patch_size": 8, "vision_depth": 1, "text_depth": 1}
_TORCH = os.path.dirname(torch.__file__) + os.sep
_TRAIN = os.path.join(os.path.dirname(fastclip.__file__), "train") + os.sep
_FASTCLIP = os.path.dirname(fastclip.__file__) + os.sep
_MODELS = os.path.join(os.path.dirname(fastclip.__file__), "models") + os.sep
_READ_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
}
_READ_METHODS = {"tolist", "numpy", "cpu"}


def _config(out, **extra):
    ov = {
        "output_dir": str(out), "train.steps": 7, "train.batch_size": 8, "log.every": 3, "eval.every": 0,
        "data.eval_size": 10, "data.workers": 0, "train.threads": 1, "log.progress": False,
        "log.plot": False, "checkpoint.export": False, "checkpoint.resume": "never", "model.overrides": TINY,
    }  # fmt: skip
    ov.update(extra)
    return load_config(None, ov)


def _trainers_read() -> str | None:
    """Where a host read comes from when it is the trainer's own: code in fastclip/train, or a DeepSpeed
    call it makes outside the engine's forward, backward and step (the logit-scale master clamp, the
    ZeRO-3 gather); None for the model's and loss's input checks and DeepSpeed's own step."""
    frames = [f for f in traceback.extract_stack() if f.filename != __file__]
    if any(f.name == "check_batch_on_host" for f in frames):
        return None  # the batch's host tensors, read before the copy to the device
    outer = [f for f in frames if not f.filename.startswith(_TORCH)]
    if not outer:
        return None
    inner = outer[-1]
    if "deepspeed" + os.sep in inner.filename:
        caller = next((f for f in reversed(outer) if f.filename.startswith(_FASTCLIP)), None)
        if caller is None or caller.filename != os.path.join(_TRAIN, "engine.py"):
            return None
        inner = caller
    if inner.filename.startswith(_MODELS):  # the towers' input checks, inside a training step
        return f"{os.path.relpath(inner.filename, _FASTCLIP)}:{inner.lineno} {inner.name}"
    if not inner.filename.startswith(_TRAIN):
        return None
    return f"{os.path.relpath(inner.filename, _FASTCLIP)}:{inner.lineno} {inner.name}"


class _HostReads(TorchDispatchMode):
    """Records (trainer step, where) of every host read the trainer makes inside the block."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.reads = trainer, []
        outer = self

        class Methods(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if getattr(func, "__name__", "") in _READ_METHODS:
                    outer._note(f"Tensor.{func.__name__}")
                return func(*args, **(kwargs or {}))

        self._methods = Methods()

    def _note(self, what: str) -> None:
        where = _trainers_read()
        if where is not None:
            self.reads.append((self.trainer.step, f"{what} at {where}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READ_OPS:
            self._note(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._methods.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._methods.__exit__(*exc)


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [{}, {"train.precision": "bf16", "train.zero_stage": 1, "train.micro_batch_size": 4}],
    ids=["fp32-zero0", "bf16-zero1-gradcache"],
)
def test_the_trainer_reads_the_device_once_per_log_interval(tmp_path, extra):
    """7 steps, log.every 3: the trainer reads the device at the log steps 3 and 6 (once each: the
    finiteness record, the loss and the logit scale in one copy) and never during a step. Step 7 (the
    last) is left out: its log read comes with the evaluation's and the checkpoint's host reads.

    Measured before the trainer's change: 2 reads per step in fp32 (the divergence guard's ``bool``, the loss's
    ``bool``) and 2 more per log step (``float`` of the mean loss, of the logit scale): 4 at steps 3 and
    6; with bf16 at ZeRO 1 and GradCache 4 per step (plus GradCache's loss ``bool`` and the logit-scale
    clamp's ``torch.equal`` on the fp32 master) and 6 per log step. Not counted (not the trainer's):
    the CPU torch loss's backward (one ``_local_scalar_dense``, from ``torch.vdot`` on CPU),
    and DeepSpeed's step (torch AdamW's CPU step counters; at ZeRO 1 bf16 also its overflow and
    grad-norm checks).

    The towers' input checks (``_check_image``'s ``bool``, ``check_ids``' ``tolist``: one each per
    forward, on the device) are counted too and must be gone from the steps: the trainer checks the
    batch's host tensors before the copy (``check_batch_on_host``) and runs the step inside
    ``values_checked_on_host``. Before that they added 2 reads per step (more with GradCache)."""
    from fastclip.train.trainer import Trainer

    trainer = Trainer(_config(tmp_path / "run", **extra))
    counter = _HostReads(trainer)
    with counter:
        trainer.fit()
    per_step = collections.Counter(step for step, _ in counter.reads if step < 7)
    detail = "\n".join(f"after step {s}: {w}" for s, w in counter.reads)
    assert dict(per_step) == {3: 1, 6: 1}, detail
    assert all("step_checks.py" in w and "Tensor.tolist" in w for s, w in counter.reads if s < 7), detail


def _inject(trainer, step: int, key: str) -> None:
    """From ``step`` on (1-based, as the messages count), make the model output ``key`` NaN."""
    inner = trainer._forward

    def forward(images, texts):
        out = dict(inner(images, texts))
        if trainer.step + 1 >= step:
            out[key] = out[key] * float("nan")
        return out

    trainer._forward = forward


def _train_rows(out) -> list:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(x)["step"] for x in f if '"loss"' in x]


@pytest.mark.slow
def test_divergence_names_its_step_and_no_checkpoint_holds_it(tmp_path):
    """Text features turn NaN at step 4; the next read is the checkpoint of step 6 (log.every 10: no
    log step before the last): it raises naming step 4, before writing the checkpoint. The step-3
    checkpoint (read before its save, still finite) is kept and is the latest."""
    from fastclip.train.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(_config(out, **{"train.steps": 8, "log.every": 10, "checkpoint.every": 3}))
    _inject(trainer, 4, "text_features")
    with pytest.raises(FloatingPointError) as info:
        trainer.fit()
    assert (
        str(info.value) == "step 4: the model diverged (text_features holds nan); stopping (lower optim.lr?)"
    )
    assert trainer.step == 6, "found by the read before the step-6 checkpoint"
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", ckpt.step_name(3)]
    assert ckpt.verify(ckpt.find_latest(root))["step"] == 3
    assert _train_rows(out) == []


@pytest.mark.slow
def test_a_non_finite_loss_through_gradcache_names_its_step_at_the_next_log_step(tmp_path):
    """GradCache (2 micro-batches): a NaN loss at step 2 (finite inputs) is reported at the log step 3
    with step 2 and the trainer's message; no row is written for step 3."""
    from fastclip.train.trainer import Trainer

    out = tmp_path / "run"
    trainer = Trainer(_config(out, **{"train.micro_batch_size": 4, "log.every": 3}))
    inner = trainer.loss

    def loss(*args, **kwargs):
        value = inner(*args, **kwargs)
        return value * float("nan") if trainer.step + 1 == 2 else value

    trainer.loss = loss
    with pytest.raises(FloatingPointError) as info:
        trainer.fit()
    assert str(info.value) == "step 2: the loss is nan; stopping (lower optim.lr?)"
    assert trainer.step == 3 and _train_rows(out) == []


# ---- two ranks: the same error on both, at the same step ------------------------------------------


def _rank_worker(out: str) -> None:
    """Under torchrun: rank 1's image features turn NaN at step 2 (rank 0's own stay finite, its loss
    turns NaN through the gathered features). Each rank writes what it raised and at which step."""
    from fastclip.train.trainer import Trainer

    trainer = Trainer(
        _config(out, **{"train.steps": 6, "train.batch_size": 8, "log.every": 3, "checkpoint.every": 0})
    )
    if trainer.rank == 1:
        _inject(trainer, 2, "image_features")
    try:
        trainer.fit()
        result = {"error": None}
    except FloatingPointError as exc:
        result = {"error": str(exc)}
    result["step"] = trainer.step
    with open(os.path.join(out, f"rank{trainer.rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_stop_together_with_the_earliest_failure(tmp_path):
    """Before, rank 1 raised at step 2 inside its step and left; rank 0, in the loss's all-gather, died
    with gloo's "Connection closed by peer" traceback (measured on CPU). Now both read at the log step
    3, agree, and raise the same message: the earliest failure of any rank (rank 0 recorded the NaN
    loss of step 2, rank 1 its NaN features: the loss's inputs come before the loss)."""
    out = str(tmp_path / "run")
    p = torchrun_two(__file__, out)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    expected = "step 2: the model diverged (image_features holds nan); stopping (lower optim.lr?)"
    assert results == [{"error": expected, "step": 3}] * 2, results


if __name__ == "__main__":
    _rank_worker(sys.argv[1])
