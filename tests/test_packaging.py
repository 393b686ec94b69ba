"""The built wheel, not the editable install: every module of the source tree is in it and imports
from it alone (the device check and `pip install .` users run the wheel; the tests otherwise see
the tree through the editable install, which once hid two subpackages missing from the wheel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_modules() -> set[str]:
    mods = set()
    for top, pkg in (("fastclip", "fastclip"), ("kernels", "fastclip.kernels")):
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, top))
            prefix = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    mods.add(prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}")
    return mods


def _build_wheel(tmp_path):
    """The wheel of a clean copy of the checkout (setuptools packs whatever a checkout's build/lib
    still holds from earlier builds), named after the distribution, fastclip-contrastive."""
    src = tmp_path / "src"
    junk = shutil.ignore_patterns(
        "build", "dist", ".venv*", ".git", "*.egg-info", "__pycache__", "runs", "results", ".whl"
    )
    shutil.copytree(ROOT, src, ignore=junk)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(wheels)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (whl,) = wheels.glob("*.whl")
    assert whl.name.startswith("fastclip_contrastive-"), whl.name  # the distribution name, normalized
    return whl


@pytest.mark.slow
def test_wheel_holds_every_module_and_imports_alone(tmp_path):
    whl = _build_wheel(tmp_path)
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        z.extractall(site)
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    missing = sorted(_tree_modules() - in_wheel)
    assert not missing, f"modules of the tree missing from the wheel: {missing}"
    assert "fastclip/py.typed" in names
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)
    # -S: no site processing, so the editable install's finder (a .pth hook) is not loaded; the
    # third-party packages come from site-packages added by hand, after the unpacked wheel.
    code = (
        "import importlib, sys\n"
        f"sys.path[:0] = [{str(site)!r}]\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        f"sys.path.append({sysconfig.get_paths()['platlib']!r})\n"
        "import fastclip\n"
        f"assert fastclip.__file__.startswith({str(site)!r}), fastclip.__file__\n"
        f"for m in {sorted(in_wheel)!r}:\n"
        "    importlib.import_module(m)\n"
        "from fastclip.ops.dispatch import KERNELS_INSTALLED\n"
        "assert KERNELS_INSTALLED\n"
        "print('imported', len(sys.modules))\n"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_the_wheel_installs_in_a_clean_venv_with_the_command_and_imports(tmp_path):
    """The distribution is fastclip-contrastive (the index's "fastclip" is another project): its wheel,
    pip-installed into a new venv, gives `import fastclip` from that venv and the `fastclip` command.
    The venv borrows torch & co. through PYTHONPATH (no .pth processing there: the checkout's editable
    install stays out)."""
    import venv

    whl = _build_wheel(tmp_path)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)  # ensurepip: pip from the Python install, offline
    py = env_dir / "bin" / "python"
    target = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    inst = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    env = {
        "PATH": f"{env_dir / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(
            [target, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        ),
        "HOME": str(tmp_path),
    }
    meta = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m, fastclip; print(m.version('fastclip-contrastive'), fastclip.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert meta.returncode == 0, meta.stderr[-3000:]
    version, where = meta.stdout.split()
    assert version == "0.1.0" and where.startswith(target), meta.stdout
    cmd = subprocess.run(
        ["fastclip", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert cmd.returncode == 0 and "fastclip" in cmd.stdout, cmd.stdout + cmd.stderr[-2000:]
    assert (env_dir / "bin" / "fastclip").read_text().startswith(f"#!{py}"), (
        "the command runs the venv's python"
    )
