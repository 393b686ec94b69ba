"""The checkout's top-level ``kernels/`` folder (installed as ``fastclip.kernels``) must never stand in
for the installed package of the same name (Hugging Face's ``kernels``, which transformers imports)
when Python starts in the repository root, as `python -m pytest`, `python -m fastclip.cli`,
`torchrun -m` and `python -c` all do."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, *, extra_path: str | None = None, no_site: bool = False) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin"}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    cmd = [sys.executable, *(["-S"] if no_site else []), "-c", code]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_an_installed_kernels_package_wins_over_the_roots_folder(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARKER = 'installed'\n")
    # -S: no site-packages, so the stand-in is the only other `kernels`; PYTHONPATH comes after the
    # root ('' from -c) on sys.path, the order that shadowed the real package.
    r = _run(
        "import sys, kernels; assert sys.path[0] == '', sys.path; print(kernels.MARKER, kernels.__file__)",
        extra_path=str(tmp_path / "site"),
        no_site=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "installed"
    assert str(ROOT / "kernels") not in r.stdout


def test_without_an_installed_kernels_the_import_fails_as_if_the_folder_were_absent():
    r = _run("import kernels", no_site=True)
    assert r.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in r.stderr


def test_fastclip_kernels_still_comes_from_the_folder():
    r = _run("import fastclip.kernels.config as c; print(c.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().parent == (ROOT / "kernels").resolve()


def test_transformers_imports_from_the_root():
    """What failed on a fresh clone: transformers >= 5.25 imports Hugging Face's `kernels`."""
    pytest.importorskip("transformers")
    r = _run("import transformers.integrations.hub_kernels, kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(ROOT / "kernels") not in r.stdout
