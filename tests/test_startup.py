"""Start-up cost: ``fastclip --help``, ``fastclip data ...`` and ``import fastclip`` import no more than they need.

Checked by the modules a fresh interpreter holds afterwards (not by timing, which depends on the machine's
load). ``torch._dynamo`` alone costs over a second to import (it brings sympy and triton); ``fastclip.comm``
pulled it in through ``@torch.compiler.disable`` at import time.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "triton")


def _modules_after(code: str) -> set:
    """The names in ``sys.modules`` of a fresh interpreter after running ``code``."""
    script = "import sys\n" + code + "\nimport json, sys\nprint('\\n' + json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _cli(argv) -> str:
    return (
        f"import sys\nfrom fastclip.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    )


@pytest.mark.parametrize(
    "argv",
    [["--help"], [], ["data", "--help"], ["data", "shards", "--help"], ["convert", "--help"]],
    ids=lambda a: " ".join(a) or "(none)",
)
def test_cli_help_does_not_import_torch(argv):
    loaded = _modules_after(_cli(argv))
    assert "fastclip.cli" in loaded
    assert "torch" not in loaded, f"fastclip {' '.join(argv)} imported torch"


def test_import_fastclip_does_not_import_torch():
    loaded = _modules_after("import fastclip")
    assert "torch" not in loaded


@pytest.mark.parametrize(
    "code",
    [
        "from fastclip import ClipLoss, SigLipLoss, clip_loss\n"
        "from fastclip.loss import ClipLoss, SigLipLoss, DistillClipLoss, CoCaLoss\n"
        "assert 'fastclip.comm' in sys.modules",
        "from fastclip.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["drop-in", "train --help"],
)
def test_no_compiler_stack_at_import(code):
    loaded = _modules_after(code)
    assert "torch" in loaded
    assert not [m for m in HEAVY if m in loaded], f"imported {[m for m in HEAVY if m in loaded]}"


def test_lazy_names_resolve_to_their_definitions():
    import fastclip
    import fastclip.data
    import fastclip.models

    for package in (fastclip, fastclip.data, fastclip.models):
        for name in package.__all__:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
        assert set(package.__all__) <= set(dir(package))
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            package.nope  # noqa: B018
    from fastclip.losses import ClipLoss

    assert fastclip.ClipLoss is ClipLoss


def test_differentiable_gather_is_still_compile_disabled():
    """The lazy form keeps ``all_gather_with_grad`` out of compiled graphs (tests/test_compile.py checks
    the fullgraph refusal); here: the mark dynamo reads, with dynamo not yet imported."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, json, inspect\nfrom fastclip.comm import all_gather_with_grad as f\n"
            "print(json.dumps([inspect.getattr_static(f, '_torchdynamo_disable', False), "
            "'torch._dynamo' in sys.modules]))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [True, False]


def test_import_after_torch_registers_the_custom_ops():
    """``import torch, fastclip`` registers ``torch.ops.fastclip.*`` as the eager import did (torch.compile
    users and ``torch.library.opcheck`` reach them directly), still without the compiler stack."""
    code = (
        "import torch\nimport fastclip\n"
        "assert hasattr(torch.ops.fastclip, 'clip_lse') and hasattr(torch.ops.fastclip, 'siglip_block')"
    )
    loaded = _modules_after(code)
    assert "fastclip.ops.library" in loaded
    assert not [m for m in HEAVY if m in loaded], f"imported {[m for m in HEAVY if m in loaded]}"
