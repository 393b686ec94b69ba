"""fastclip.integrations.open_clip (patch/unpatch) and the open_clip_train launcher.

The default suite tests patch() against the real open_clip package installed beside the CPU torch.
That package imports torchvision and ftfy at import time, and neither imports here (the index's
torchvision is a CUDA build that fails with the CPU torch; open_clip_torch is installed without its
dependencies), so the fixture below puts stand-ins in sys.modules for the ones that are missing:
patch() only reads and replaces the loss names, and open_clip's ``create_loss`` and losses run for
real. open_clip_train itself (data, DDP, its training loop) cannot import here; the launcher is tested
against a stand-in trainer, and against the real open_clip_train by the slow test at the end, which
runs benchmarks/open_clip_train_check.sh when its venv (torch 2.14.1 + torchvision) exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

import fastclip
from fastclip.integrations import open_clip as integration
from fastclip.integrations import open_clip_train as launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = {
    "ClipLoss": fastclip.ClipLoss,
    "SigLipLoss": fastclip.SigLipLoss,
    "DistillClipLoss": fastclip.DistillClipLoss,
    "CoCaLoss": fastclip.CoCaLoss,
}
MODULES = ("open_clip.factory", "open_clip.loss", "open_clip")


class _Anything(type):
    """A stand-in class whose every attribute is another stand-in (torchvision.transforms.X.Y ...)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})


def _stand_in(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []

    def getattr_(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Anything(attr, (), {})

    module.__getattr__ = getattr_
    return module


def _reset_integration():
    """Undo whatever a failed test left patched; True when something was left."""
    leaked = integration.is_patched()
    if leaked:
        integration._restore()
        integration._handles = 0
    return leaked


@pytest.fixture(scope="module")
def open_clip():
    """The real open_clip package, imported with stand-ins for its missing import-time dependencies."""
    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed")
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        for top, subs in (
            ("torchvision", ("ops", "ops.misc", "transforms", "transforms.functional")),
            ("ftfy", ()),
        ):
            if importlib.util.find_spec(top) is None:
                for name in (top, *(f"{top}.{s}" for s in subs)):
                    mp.setitem(sys.modules, name, _stand_in(name))
        for optional in ("transformers", "timm"):  # open_clip imports them inside try/except ImportError
            if optional not in sys.modules:
                mp.setitem(sys.modules, optional, None)
        try:
            module = importlib.import_module("open_clip")
            importlib.import_module("open_clip.factory")
        except Exception as exc:  # e.g. a torchvision that is installed but broken
            pytest.skip(f"open_clip does not import here: {type(exc).__name__}: {exc}")
        yield module
        for name in set(sys.modules) - before:
            if name == "open_clip" or name.startswith("open_clip."):
                del sys.modules[name]


@pytest.fixture
def clean():
    yield
    assert not _reset_integration(), "a patch was left active"


@pytest.fixture
def no_open_clip(monkeypatch):
    """Hide an already-imported open_clip for the length of one test (restored afterwards)."""
    for name in [n for n in sys.modules if n == "open_clip" or n.startswith("open_clip.")]:
        monkeypatch.delitem(sys.modules, name)


def _names(open_clip):
    """{(module name, loss name): the object the module defines under that name, or None}."""
    mods = {"open_clip": open_clip, "open_clip.factory": open_clip.factory, "open_clip.loss": open_clip.loss}
    return {(m, n): vars(mods[m]).get(n) for m in MODULES for n in integration.LOSS_NAMES}, mods


def test_patch_replaces_each_name_where_open_clip_defines_it_and_unpatch_restores(open_clip, clean):
    before, mods = _names(open_clip)
    assert before[("open_clip.factory", "ClipLoss")] is open_clip.loss.ClipLoss  # create_loss's lookup
    assert all(before[("open_clip.factory", n)] is not None for n in OURS)
    with integration.patch() as handle:
        assert handle.active and integration.is_patched()
        for (m, n), original in before.items():
            if original is None:  # e.g. the package open_clip does not export SigLipLoss: not added
                assert n not in vars(mods[m]), (m, n)
            else:
                assert getattr(mods[m], n) is OURS[n], (m, n)
        assert sorted(handle.replaced) == sorted(f"{m}.{n}" for (m, n), o in before.items() if o is not None)
    assert not handle.active and not integration.is_patched() and handle.replaced == ()
    assert _names(open_clip)[0] == before


def _create_loss_args(kind: str) -> argparse.Namespace:
    return argparse.Namespace(
        distill=kind == "distill",
        model="coca_ViT-B-32" if kind == "coca" else "ViT-B-32",
        siglip=kind == "siglip",
        local_loss=False,
        gather_with_grad=False,
        rank=0,
        world_size=1,
        horovod=False,
        loss_dist_impl=None,
        coca_caption_loss_weight=2.0,
        coca_contrastive_loss_weight=1.0,
    )


@pytest.mark.parametrize(
    "kind, name",
    [("clip", "ClipLoss"), ("siglip", "SigLipLoss"), ("distill", "DistillClipLoss"), ("coca", "CoCaLoss")],
)
def test_create_loss_builds_fastclip_losses_with_open_clips_numbers(open_clip, clean, kind, name):
    args = _create_loss_args(kind)
    reference = open_clip.create_loss(args)  # what open_clip_train.main calls
    assert type(reference) is getattr(open_clip.loss, name)
    g = torch.Generator().manual_seed(0)
    x, y, tx, ty = (F.normalize(torch.randn(12, 16, generator=g), dim=-1) for _ in range(4))
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    if kind == "siglip":
        inputs = dict(image_features=x, text_features=y, logit_scale=scale, logit_bias=bias)
    elif kind == "distill":
        inputs = dict(image_features=x, text_features=y, logit_scale=scale, dist_image_features=tx,
                      dist_text_features=ty, dist_logit_scale=torch.tensor(20.0))  # fmt: skip
    elif kind == "coca":
        logits = torch.randn(12, 7, 50, generator=g)
        labels = torch.randint(0, 50, (12, 7), generator=g)
        inputs = dict(image_features=x, text_features=y, logits=logits, labels=labels, logit_scale=scale)
    else:
        inputs = dict(image_features=x, text_features=y, logit_scale=scale)
    with integration.patch():
        loss = open_clip.create_loss(args)
        assert type(loss) is OURS[name]
        got = loss(**inputs, output_dict=True)
    want = reference(**inputs, output_dict=True)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k].float(), rtol=1e-5, atol=1e-6, msg=k)
    assert type(open_clip.create_loss(args)) is getattr(open_clip.loss, name)  # unpatched again


def test_patch_is_idempotent_and_handles_are_counted(open_clip, clean):
    original = open_clip.factory.ClipLoss
    outer = integration.patch()
    inner = integration.patch()  # replaces nothing again: never fastclip's class around itself
    assert open_clip.factory.ClipLoss is fastclip.ClipLoss and open_clip.loss.ClipLoss is fastclip.ClipLoss
    assert inner.replaced == outer.replaced
    inner.unpatch()
    inner.unpatch()  # a second unpatch of one handle does nothing
    assert open_clip.factory.ClipLoss is fastclip.ClipLoss and integration.is_patched()
    outer.unpatch()
    assert open_clip.factory.ClipLoss is original and not integration.is_patched()
    outer.unpatch()
    assert open_clip.factory.ClipLoss is original
    with integration.patch():
        with integration.patch():
            pass
        assert open_clip.factory.SigLipLoss is fastclip.SigLipLoss  # the outer block still holds it
    assert open_clip.factory.SigLipLoss is open_clip.loss.SigLipLoss is not fastclip.SigLipLoss


def test_unpatch_leaves_a_name_replaced_after_patch_and_says_so(open_clip, clean):
    original = open_clip.factory.ClipLoss
    theirs = type("TheirClipLoss", (), {})
    handle = integration.patch()
    open_clip.factory.ClipLoss = theirs
    try:
        with pytest.warns(RuntimeWarning, match=r"open_clip\.factory\.ClipLoss was replaced .*TheirClipLoss"):
            handle.unpatch()
        assert open_clip.factory.ClipLoss is theirs
        assert (
            open_clip.loss.ClipLoss is original and open_clip.factory.SigLipLoss is open_clip.loss.SigLipLoss
        )
    finally:
        open_clip.factory.ClipLoss = original


def test_patch_without_open_clip_says_what_to_install(monkeypatch, no_open_clip, clean):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # what an uninstalled package looks like to find_spec
    with pytest.raises(
        ModuleNotFoundError, match=r"needs open_clip, which is not installed \(pip install open_clip_torch\)"
    ):
        integration.patch()
    assert not integration.is_patched()


def _fake_open_clip(tmp_path, monkeypatch, init: str, factory: str = "") -> None:
    pkg = tmp_path / "open_clip"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(init))
    (pkg / "factory.py").write_text(textwrap.dedent(factory))
    (pkg / "loss.py").write_text("class ClipLoss:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_patch_names_why_an_installed_open_clip_does_not_import(tmp_path, monkeypatch, no_open_clip, clean):
    _fake_open_clip(tmp_path, monkeypatch, "raise ModuleNotFoundError(\"No module named 'torchvision'\")\n")
    with pytest.raises(
        ImportError, match=r"open_clip is installed but does not import: ModuleNotFoundError: .*torchvision"
    ):
        integration.patch()
    assert not integration.is_patched()


def test_patch_refuses_an_open_clip_without_create_loss(tmp_path, monkeypatch, no_open_clip, clean):
    _fake_open_clip(tmp_path, monkeypatch, "__version__ = '0.1'\n", "from .loss import ClipLoss\n")
    with pytest.raises(ImportError, match=r"define create_loss .* got open_clip 0\.1"):
        integration.patch()
    assert not integration.is_patched()


@pytest.fixture
def trainer(monkeypatch, open_clip):
    """A stand-in open_clip_train.main: records argv and which ClipLoss create_loss would build."""
    seen = {}
    module = types.ModuleType("open_clip_train.main")

    def main(argv):
        seen["argv"] = argv
        seen["loss"] = type(open_clip.create_loss(_create_loss_args("clip")))
        if seen.get("raise"):
            raise RuntimeError("training failed")
        return seen.get("result")

    module.main = main
    package = types.ModuleType("open_clip_train")
    package.__path__ = []
    package.main = module
    monkeypatch.setitem(sys.modules, "open_clip_train", package)
    monkeypatch.setitem(sys.modules, "open_clip_train.main", module)
    return seen


def test_launcher_runs_the_trainer_patched_and_unpatches(trainer, open_clip, monkeypatch, capsys, clean):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    assert launcher.main(["--", "--logs", "x", "--siglip"]) == 0
    assert trainer["argv"] == ["--logs", "x", "--siglip"]  # one leading "--" dropped, the rest unchanged
    assert trainer["loss"] is fastclip.ClipLoss
    assert open_clip.factory.ClipLoss is open_clip.loss.ClipLoss is not fastclip.ClipLoss
    err = capsys.readouterr().err
    assert (
        err
        == "fastclip: open_clip_train runs with fastclip's ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss\n"
    )

    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks patch too, silently
    trainer["result"] = -1  # open_clip_train's main returns -1 when it refuses (an existing experiment)
    assert launcher.main(["--lr", "1"]) == 1
    assert trainer["argv"] == ["--lr", "1"] and trainer["loss"] is fastclip.ClipLoss
    assert capsys.readouterr().err == ""

    trainer["raise"] = True
    with pytest.raises(RuntimeError, match="training failed"):
        launcher.main([])
    assert not integration.is_patched()


def test_launcher_checks_its_arguments(clean):
    with pytest.raises(TypeError, match=r"argv: expected a list of str .* got '--lr 1'"):
        launcher.main("--lr 1")
    with pytest.raises(TypeError, match=r"argv: expected a list of str .* got \['--lr', 1\]"):
        launcher.main(["--lr", 1])


def test_launcher_without_open_clip_train_says_what_to_install(open_clip, monkeypatch, clean):
    monkeypatch.setitem(sys.modules, "open_clip_train", None)
    with pytest.raises(
        ImportError, match=r"needs open_clip_train, which did not import .*pip install open_clip_torch"
    ):
        launcher.main([])
    assert not integration.is_patched()


def test_imports_stay_light_and_the_command_fails_in_one_line():
    """import fastclip and the integrations never import open_clip; `python -m ...` without it: one line."""
    code = textwrap.dedent(
        """
        import runpy, sys
        import fastclip, fastclip.integrations
        import fastclip.integrations.open_clip, fastclip.integrations.open_clip_train
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "open_clip_train"))
        print("loaded:", loaded, flush=True)
        sys.modules["open_clip"] = None  # as if open_clip_torch were not installed
        del sys.modules["fastclip.integrations.open_clip_train"]  # run afresh as __main__, as python -m does
        sys.argv = ["open_clip_train", "--help"]
        try:
            runpy.run_module("fastclip.integrations.open_clip_train", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            print("exit:", exc.code)
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded: []" in run.stdout and "exit: 1" in run.stdout, run.stdout + run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: fastclip.integrations.open_clip.patch() needs open_clip, which is not installed "
        "(pip install open_clip_torch)"
    ], run.stderr[-3000:]


OCT_VENV = os.environ.get("FASTCLIP_OCT_VENV", os.path.join(ROOT, ".venv-oct"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(
    not os.path.exists(os.path.join(OCT_VENV, ".fastclip-oct-ready")),
    reason=f"no open_clip_train venv at {OCT_VENV}: run benchmarks/open_clip_train_check.sh once to create it "
    "(torch 2.14.1 + torchvision 0.29.1 + open_clip_torch 3.3.0, about 5.5 GB)",
)
def test_real_open_clip_train_matches_per_step_through_the_launcher():
    """The real open_clip_train, 1 process and 2 (torchrun, gloo): open_clip's losses against the launcher's."""
    # CLIP only, to stay near a minute and a half on 2 cores; the script's default runs every kind.
    cmd = ["bash", os.path.join(ROOT, "benchmarks", "open_clip_train_check.sh"),
           "--kinds", "clip", "--procs", "1,2", "--steps", "3"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "2 passed, 0 failed" in run.stdout, run.stdout[-4000:]
