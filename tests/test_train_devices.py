"""Tensors the trainer builds on the host meet model outputs on the model's device.

On CUDA the evaluation crashed (``groups[top]``: helper indices built on the CPU, model outputs on the
GPU). Without a GPU the same defect shows when the *default* device differs from the features' device:
under ``with torch.device("meta")`` every tensor created without ``device=`` is a meta tensor, so a
helper tensor that does not follow the features' device fails (a meta tensor has no values) while one
built with the features' device computes as before. These tests run the evaluation and metrics that
way; tests/test_gpu_trainer.py runs the trainer itself on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastclip.data import EvalSet
from fastclip.models import WordTokenizer
from fastclip.train import gradcache as gc_lib
from fastclip.train.evaluate import (
    encode_images,
    encode_texts,
    evaluate,
    evaluate_sets,
    retrieval_recall,
    topk_accuracy,
)
from fastclip.train.rank_state import RankStateError, load_rank_state, rank_file, save_rank_state

WORDS = ["red", "blue", "green", "circle", "square", "a", "photo", "of", "the"]


def _features(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(n, d, generator=g), dim=-1)
    return img, txt


# ---- metrics --------------------------------------------------------------------------------------


def test_retrieval_recall_builds_its_groups_on_the_features_device():
    img, txt = _features()
    groups = torch.tensor([0, 1, 1, 2, 3, 4])
    expected = retrieval_recall(img, txt)
    expected_grouped = retrieval_recall(img, txt, groups)
    with torch.device("meta"):  # a tensor made without device= is a meta tensor in here
        got = retrieval_recall(img, txt)
        got_grouped = retrieval_recall(img, txt, groups)
    assert got == expected and got_grouped == expected_grouped
    assert expected_grouped["i2t_r1"] >= expected["i2t_r1"]


def test_retrieval_recall_takes_groups_from_another_device():
    """Groups given on another device than the features (the trainer's CPU groups beside CUDA features)
    are moved to the features' device, not indexed across devices."""
    img, txt = _features()
    groups = torch.tensor([0, 1, 1, 2, 3, 4])
    seen = []
    real_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        if self is groups:
            seen.append((args, kwargs))
        return real_to(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", spy_to)
        r = retrieval_recall(img, txt, groups)
    assert seen, "groups must be moved to the features' device"
    assert r == retrieval_recall(img, txt, groups)


def test_topk_accuracy_follows_the_scores_device():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    labels = torch.tensor([0, 0, 2])
    expected = topk_accuracy(scores, labels, ks=(1, 2))
    with torch.device("meta"):
        assert topk_accuracy(scores, labels, ks=(1, 2)) == expected
    assert expected == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda img, txt: retrieval_recall(img.numpy(), txt), TypeError, "image_f"),
        (lambda img, txt: retrieval_recall(img, txt[:, :2]), ValueError, "text_f: expected feature dim 4"),
        (lambda img, txt: retrieval_recall(img[0], txt), ValueError, "image_f: expected a 2-D tensor"),
        (lambda img, txt: retrieval_recall(img, txt, torch.zeros(5, dtype=torch.long)), ValueError, "groups"),
        (lambda img, txt: retrieval_recall(img, txt, [0, 1, 2, 3, 4, 5]), TypeError, "groups"),
        (lambda img, txt: retrieval_recall(img, txt, ks=(0,)), ValueError, "ks"),
        (lambda img, txt: retrieval_recall(img, txt, ks=()), ValueError, "ks"),
        (lambda img, txt: retrieval_recall(img, txt, ks=(True,)), TypeError, "ks"),
        (lambda img, txt: topk_accuracy(img, torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        (lambda img, txt: topk_accuracy(img, torch.zeros(6)), TypeError, "labels"),
        (lambda img, txt: topk_accuracy(img[0], torch.zeros(6, dtype=torch.long)), ValueError, "scores"),
        (lambda img, txt: topk_accuracy(img, torch.zeros(6, dtype=torch.long), ks=(1.5,)), TypeError, "ks"),
        (lambda img, txt: encode_images(None, img, 4, "cpu", torch.float32), ValueError, "images"),
        (
            lambda img, txt: encode_images(None, img[:, :, None, None], 0, "cpu", torch.float32),
            ValueError,
            "batch_size",
        ),
        (lambda img, txt: encode_texts(None, None, "a caption", 4, "cpu"), ValueError, "texts"),
        (lambda img, txt: encode_texts(None, None, [], 4, "cpu"), ValueError, "texts"),
    ],
)
def test_metric_inputs_are_checked(call, error, match):
    img, txt = _features()
    with pytest.raises(error, match=match):
        call(img, txt)


# ---- evaluate -------------------------------------------------------------------------------------


class _TinyModel(torch.nn.Module):
    """A model following the fastclip contract closely enough for evaluate(): pixels and token ids
    mapped linearly to 4-D features."""

    def __init__(self, vocab: int, pixels: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.img = torch.nn.Parameter(torch.randn(pixels, 4, generator=g))
        self.tok = torch.nn.Parameter(torch.randn(vocab, 4, generator=g))

    def encode_image(self, images, normalize=False):
        x = images.flatten(1) @ self.img
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids, normalize=False):
        x = self.tok[ids].sum(dim=1)
        return F.normalize(x, dim=-1) if normalize else x


class _HostTokenizer(WordTokenizer):
    """Token ids are host data, made on the CPU whatever the default device (as a tokenizer's are)."""

    def __call__(self, texts):
        with torch.device("cpu"):
            return super().__call__(texts)


def _eval_set(name="heldout"):
    g = torch.Generator().manual_seed(2)
    captions = ["red circle", "blue square", "green circle", "red circle", "blue circle", "green square"]
    images = torch.randn(len(captions), 3, 2, 2, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 3, 4])
    classnames = ["red circle", "blue square", "green circle", "blue circle", "green square"]
    return EvalSet(name, images, captions, labels, classnames, ["a photo of the {}", "{}"])


def test_evaluate_builds_every_tensor_on_the_features_device():
    tok = _HostTokenizer(WORDS, 6)
    model = _TinyModel(tok.vocab_size, 12)
    eval_set = _eval_set()  # host data, made before the default device changes
    expected = evaluate(model, tok, eval_set, batch_size=4)
    with torch.device("meta"):
        got = evaluate(model, tok, eval_set, batch_size=4)
    assert got == expected
    assert set(expected) >= {"zeroshot_top1", "zeroshot_top5", "zeroshot_chance", "i2t_r1", "t2i_r10"}
    # captions 0 and 3 are identical: they form one group, so retrieving either one counts
    assert all(0.0 <= v <= 1.0 for k, v in expected.items() if k != "zeroshot_chance")
    merged = evaluate_sets(
        model, tok, [_eval_set(), _eval_set("seen")], batch_size=4, device=None, dtype=torch.float32
    )
    assert merged["i2t_r1"] == expected["i2t_r1"] and merged["seen_i2t_r1"] == expected["i2t_r1"]


def test_evaluate_checks_its_arguments():
    tok = _HostTokenizer(WORDS, 6)
    model = _TinyModel(tok.vocab_size, 12)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tok, _eval_set(), batch_size=0)
    with pytest.raises(TypeError, match="dtype"):
        evaluate(model, tok, _eval_set(), dtype="bf16")
    short = _eval_set()
    short.captions = short.captions[:4]
    with pytest.raises(ValueError, match="eval_set"):
        evaluate(model, tok, short)
    with pytest.raises(TypeError, match="eval_sets"):
        evaluate_sets(model, tok, _eval_set(), batch_size=4, device=None, dtype=torch.float32)


# ---- gradient caching: the RNG replayed is the one the model draws from ------------------------------


def test_gradcache_replays_the_rng_of_the_model_device_not_only_the_images(monkeypatch):
    """A forward that moves CPU images to the model's device draws its dropout masks from that device's
    generator: its state must be recorded and restored too. Simulated on CPU by reporting the CUDA
    generator functions' calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_rng_state",
        lambda device="cuda": calls.append(("get", str(device))) or torch.zeros(4, dtype=torch.uint8),
    )
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set", str(device)))
    )
    state = gc_lib._rng_state(torch.device("cpu"))
    gc_lib._set_rng_state(state, torch.device("cpu"))
    assert ("get", "cuda:0") in calls and ("set", "cuda:0") in calls, calls


# ---- the trainer's divergence check: recorded on the device, read once, the first bad tensor named ---


def test_divergence_guard_records_the_first_non_finite_input_and_passes_finite_ones():
    from fastclip.train.step_checks import StepChecks

    seen = []
    checks = StepChecks()
    guard = checks.guard(lambda *a, **kw: seen.append((a, kw)) or torch.tensor(1.0), step=7)
    img, txt = _features()
    scale = torch.tensor([10.0])
    assert float(guard(img, txt, scale)) == 1.0 and len(seen) == 1
    checks.check()  # nothing recorded
    negatives = torch.zeros(6, 2, 4)
    negatives[3, 1, 2] = float("inf")
    negatives[4, 0, 0] = float("nan")  # later in row-major order: the inf is named
    guard(img, txt, scale, negative_features=negatives)
    assert len(seen) == 2, "the loss is still computed: the step reads nothing on the host"
    # a later failure (step 8, the logit scale) leaves the first one recorded
    checks.guard(lambda *a, **kw: torch.tensor(1.0), step=8)(img, txt, torch.tensor([float("nan")]))
    checks.note_loss(8, torch.tensor(float("nan")))
    with pytest.raises(
        FloatingPointError, match=r"^step 7: the model diverged \(negative_features holds inf\); stopping"
    ):
        checks.check()
    values, failure = checks.read(torch.tensor(2.5), 3)
    assert values == [2.5, 3.0] and (failure.step, failure.name, failure.value) == (
        7,
        "negative_features",
        float("inf"),
    )


def test_divergence_guard_names_the_first_input_then_the_loss():
    """At one step the inputs are named in the guard's order (logit scale first), the loss after them;
    in a transposed (non-contiguous) tensor the first non-finite element in row-major order."""
    from fastclip.train.step_checks import StepChecks

    img, txt = _features()
    checks = StepChecks("cpu")
    bad_txt = txt.clone()
    bad_txt[2, 1], bad_txt[1, 3] = float("-inf"), float("nan")
    checks.note_inputs(4, text_features=bad_txt.t(), logit_scale=torch.tensor([float("inf")]))
    checks.note_loss(4, torch.tensor(float("nan")))
    assert checks.read()[1].message() == (
        "step 4: the model diverged (logit_scale holds inf); stopping (lower optim.lr?)"
    )
    checks = StepChecks("cpu")
    checks.note_inputs(5, image_features=img, text_features=bad_txt.t(), logit_scale=torch.tensor([1.0]))
    assert checks.read()[1].message().startswith("step 5: the model diverged (text_features holds -inf)")
    checks = StepChecks("cpu")
    checks.note_inputs(6, image_features=img, text_features=txt, logit_scale=torch.tensor([1.0]))
    checks.note_loss(6, torch.tensor(float("-inf")))
    assert checks.read()[1].message() == "step 6: the loss is -inf; stopping (lower optim.lr?)"
    with pytest.raises(ValueError, match="note_inputs: expected names"):
        checks.note_inputs(6, features=img)


# ---- the training-step benchmark on cuda:N ------------------------------------------------------------


def test_train_bench_makes_its_device_current(monkeypatch):
    """Triton launches on the current CUDA device: ``--device cuda:1`` must make cuda:1 current for the
    run, or the loss kernels run on cuda:0 with pointers into cuda:1. (Simulated: no GPU needed.)"""
    import contextlib

    from fastclip.bench import timing
    from fastclip.bench import train as bench_train

    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(str(device))
        yield

    monkeypatch.setattr(timing, "resolve_device", lambda name: torch.device(name))
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(
        bench_train,
        "_run_train_bench",
        lambda cfg, device, log: {"ran_on": str(device), "current": list(entered)},
    )
    doc = bench_train.run_train_bench(bench_train.TrainBench(model="tiny", device="cuda:1"))
    assert doc == {"ran_on": "cuda:1", "current": ["cuda:1"]}
    entered.clear()
    assert bench_train.run_train_bench(bench_train.TrainBench(model="tiny", device="cpu"))["current"] == []


# ---- DeepSpeed's accelerator is the run's device ------------------------------------------------------


class _FakeAccelerator:
    def __init__(self, name):
        self.name = name

    def device_name(self, device_index=None):
        return self.name


@pytest.mark.parametrize("device, accelerator", [("cpu", "cuda"), ("cuda", "cpu")])
def test_comm_refuses_a_deepspeed_accelerator_other_than_the_device(monkeypatch, device, accelerator):
    """DeepSpeed moves the model to its accelerator's device, which it picks once per process (CUDA
    wherever a GPU is visible): a CPU run on a GPU machine (or a CUDA run after DeepSpeed chose its
    CPU accelerator) would put the model and the batches on different devices. Comm.setup asks for the
    CPU accelerator before DeepSpeed is imported and refuses a mismatch before any process group."""
    import types

    import deepspeed
    import deepspeed.accelerator

    from fastclip.train.config import ConfigError
    from fastclip.train.parallel import Comm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as far as setup can tell
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a: pytest.fail("set_device before the check"))
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: _FakeAccelerator(accelerator))
    monkeypatch.setenv("DS_ACCELERATOR", "")  # so that the test's end restores the variable as it was
    monkeypatch.delenv("DS_ACCELERATOR")
    monkeypatch.setattr(
        deepspeed, "init_distributed", lambda *a, **kw: pytest.fail("a process group before the check")
    )
    tc = types.SimpleNamespace(device=device, threads=1, backend="auto")
    dc = types.SimpleNamespace(timeout_s=30)
    with pytest.raises(
        ConfigError, match=rf"train.device: '{device}', but DeepSpeed's accelerator .* is '{accelerator}'"
    ):
        Comm.setup(tc, dc)
    assert os.environ.get("DS_ACCELERATOR") == ("cpu" if device == "cpu" else None)


# ---- DeepSpeed: nothing to compile on CUDA ------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_asks_for_torch_adamw(stage, precision):
    """DeepSpeed picks its FusedAdam (a CUDA extension built with nvcc at first use) on CUDA unless
    ``torch_adam`` is set; the GPU image carries DeepSpeed without built ops, so every stage and
    precision must ask for torch's AdamW (tests/test_gpu_trainer.py checks the optimizer on CUDA)."""
    from fastclip.train.config import load_config
    from fastclip.train.engine import ds_config

    cfg = load_config(None, {"train.zero_stage": stage, "train.precision": precision})
    conf = ds_config(cfg, micro=cfg.train.batch_size, chunks=1)
    assert conf["optimizer"]["type"] == "AdamW" and conf["optimizer"]["params"]["torch_adam"] is True
    assert "offload_optimizer" not in conf["zero_optimization"], "CPU offload would build DeepSpeedCPUAdam"


# ---- checkpoints: the CUDA generator state in a rank file ------------------------------------------


def test_rank_state_refuses_a_malformed_cuda_rng_state(tmp_path):
    from safetensors import safe_open

    path = rank_file(str(tmp_path), 0)
    save_rank_state(path, step=3, data={"kind": "synthetic", "position": 3})
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["rng.cuda"] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, path, metadata=meta)
    assert torch.equal(load_rank_state(path)["rng"]["cuda"], torch.zeros(16, dtype=torch.uint8))
    tensors["rng.cuda"] = torch.zeros(16, dtype=torch.float32)
    save_file(tensors, path, metadata=meta)
    with pytest.raises(RankStateError, match="rng.cuda"):
        load_rank_state(path)
