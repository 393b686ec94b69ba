"""The built-in demo with a tiny step count (one process, no launcher), its outputs, the safetensors
export, and checkpoints that are corrupted, partial or mismatched: clear errors, nothing loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from utils import train_cli

from fastclip.train import checkpoint as ckpt
from fastclip.train.export import export_safetensors

MODEL = {"patch_size": 8, "vision_depth": 1, "text_depth": 1}


def _cli(args, timeout=300):
    return train_cli(args, timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "run")
    args = ["--output-dir", out, "--smoke", "--train.batch_size", "32", "--checkpoint.every", "3"]
    p = _cli(args + ["--model.overrides", json.dumps(MODEL), "--train.threads", "1"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out, p


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_demo_smoke_outputs(demo):
    out, p = demo
    assert "zero-shot top-1 on held-out colour-shape pairs" in p.stdout and "x chance" in p.stdout
    rows = _rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["lr"] > 0 and 1.0 <= r["logit_scale"] <= 100.0 for r in train_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    (ev,) = [r for r in rows if "zeroshot_top1" in r]
    for key in (
        "zeroshot_top1",
        "zeroshot_top5",
        "zeroshot_chance",
        "i2t_r1",
        "i2t_r5",
        "i2t_r10",
        "t2i_r1",
        "seen_zeroshot_top1",
    ):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["step"] == 6 and ev["zeroshot_chance"] == pytest.approx(1 / 48)
    for name in ("curves.png", "model.safetensors", "config.yaml", "vocab.txt", "model_config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_00000003", "step_00000006"]
    assert ckpt.find_latest(root).endswith("step_00000006")
    assert ckpt.verify(ckpt.find_latest(root))["step"] == 6


@pytest.mark.slow
def test_exported_weights_reproduce_the_final_evaluation(demo, tmp_path):
    from safetensors.torch import load_file

    from fastclip.models import WordTokenizer, create_model
    from fastclip.train.data import SyntheticShapes, synthetic_eval_sets
    from fastclip.train.evaluate import evaluate

    out, _ = demo
    from fastclip.cli import main

    again = str(tmp_path / "again.safetensors")
    assert main(["train", "--export", os.path.join(out, "checkpoints"), again]) == 0
    weights, weights2 = load_file(os.path.join(out, "model.safetensors")), load_file(again)
    assert weights.keys() == weights2.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)
    with open(os.path.join(out, "vocab.txt")) as f:
        tok = WordTokenizer(f.read().split(), 16)
    model = create_model("tiny", vocab_size=tok.vocab_size, **MODEL)
    model.load_state_dict(weights, strict=True)
    ds = SyntheticShapes(32, seed=0)
    metrics = evaluate(model, tok, synthetic_eval_sets(ds, 64)[0], batch_size=64)
    (ev,) = [r for r in _rows(out) if "zeroshot_top1" in r]
    assert metrics["zeroshot_top1"] == pytest.approx(ev["zeroshot_top1"], abs=1e-9)
    assert metrics["i2t_r1"] == pytest.approx(ev["i2t_r1"], abs=1e-9)


def _copy(demo, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(demo[0], out)
    return out, os.path.join(out, "checkpoints", "step_00000006")


def _a_ds_file(step_dir):
    ds = os.path.join(step_dir, "ds")
    return os.path.join(ds, sorted(os.listdir(ds))[0])


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "no_manifest", "bad_manifest", "rank_file"])
def test_corrupted_checkpoints_are_refused(demo, tmp_path, damage):
    out, step = _copy(demo, tmp_path)
    target = _a_ds_file(step)
    if damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(target, "wb").write(bytes(data))
        match = "content differs from the manifest"
    elif damage == "truncate":
        open(target, "r+b").truncate(100)
        match = "bytes, expected"
    elif damage == "delete":
        os.remove(target)
        match = "missing"
    elif damage == "no_manifest":
        os.remove(os.path.join(step, "MANIFEST.json"))
        match = "incomplete"
    elif damage == "bad_manifest":
        open(os.path.join(step, "MANIFEST.json"), "w").write("{not json")
        match = "unreadable manifest"
    else:
        os.remove(os.path.join(step, "rank_00000.safetensors"))
        match = "rank_00000.safetensors: missing"
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.verify(step)
    with pytest.raises(ckpt.CheckpointError, match=match):
        export_safetensors(os.path.join(out, "checkpoints"), str(tmp_path / "w.safetensors"))
    assert not os.path.exists(tmp_path / "w.safetensors")


def test_latest_marker_problems(demo, tmp_path):
    out, step = _copy(demo, tmp_path)
    root = os.path.join(out, "checkpoints")
    os.makedirs(os.path.join(root, "step_00000009.partial", "ds"))  # an interrupted save
    assert ckpt.find_latest(root) == os.path.join(root, "step_00000006"), "a partial save is never picked"
    with pytest.raises(ckpt.CheckpointError, match="no MANIFEST.json; the checkpoint is incomplete"):
        ckpt.verify(os.path.join(root, "step_00000009.partial"))
    open(os.path.join(root, "latest"), "w").write("step_00000042\n")
    with pytest.raises(ckpt.CheckpointError, match="points at 'step_00000042', which does not exist"):
        ckpt.find_latest(root)
    with pytest.raises(ckpt.CheckpointError, match="checkpoint not found"):
        ckpt.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(ckpt.CheckpointError, match="neither a checkpoint"):
        ckpt.resolve(str(tmp_path))
    assert ckpt.find_latest(str(tmp_path)) is None  # no marker: a fresh run


def test_mismatched_world_or_stage_is_refused(demo):
    step = os.path.join(demo[0], "checkpoints", "step_00000006")
    with pytest.raises(ckpt.CheckpointError, match="saved with world size 1, resuming with 2"):
        ckpt.load(None, step, 0, 2, 0)
    with pytest.raises(ckpt.CheckpointError, match="saved with ZeRO stage 0, resuming with stage 2"):
        ckpt.load(None, step, 0, 1, 2)


@pytest.mark.slow
def test_trainer_refuses_to_resume_from_a_corrupted_checkpoint(demo, tmp_path):
    out, step = _copy(demo, tmp_path)
    target = _a_ds_file(step)
    open(target, "r+b").truncate(64)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    p = _cli(
        [
            "--output-dir",
            out,
            "--smoke",
            "--train.steps",
            "8",
            "--train.batch_size",
            "32",
            "--model.overrides",
            json.dumps(MODEL),
        ]
    )
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert "corrupted checkpoint, nothing loaded" in p.stderr
    assert open(os.path.join(out, "metrics.jsonl")).read() == before, "nothing was trained or logged"


@pytest.mark.slow
def test_siglip_bf16_zero1_clamps_the_fp32_master_logit_scale(tmp_path):
    """bf16 at ZeRO 1 keeps fp32 masters in the optimizer: the clamp to [0, ln 100] must reach them
    (the exported weights come from the fp32 master partitions of the checkpoint)."""
    import math

    from safetensors.torch import load_file

    out = str(tmp_path / "siglip")
    model = {**MODEL, "init_logit_scale": 5.0}  # above ln 100 = 4.605
    args = [
        "--output-dir",
        out,
        "--smoke",
        "--train.steps",
        "3",
        "--train.batch_size",
        "16",
        "--train.threads",
        "1",
    ]
    args += ["--model.name", "tiny-siglip", "--model.overrides", json.dumps(model)]
    args += ["--train.precision", "bf16", "--train.zero_stage", "1", "--train.micro_batch_size", "8"]
    p = _cli(args)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rows = [r for r in _rows(out) if "loss" in r]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["logit_scale"] <= 100.0 * (1 + 1e-2) for r in rows), [r["logit_scale"] for r in rows]
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert weights["logit_scale"].dtype == torch.float32
    assert float(weights["logit_scale"].reshape(())) <= math.log(100.0) + 1e-6
    assert "logit_bias" in weights
    # resuming this ZeRO checkpoint goes through DeepSpeed's engine loader: a planted pickle payload in
    # its optimizer partition is refused (restricted unpickling), the marker never appears
    step = os.path.join(out, "checkpoints", "step_00000003")
    (optim,) = [n for n in os.listdir(os.path.join(step, "ds")) if n.endswith("optim_states.pt")]
    marker = str(tmp_path / "MARK")
    state = torch.load(os.path.join(step, "ds", optim), weights_only=False)
    state["optimizer_state_dict"]["extra"] = _OpenOnUnpickle(marker)
    torch.save(state, os.path.join(step, "ds", optim))
    ckpt.write_manifest(step)
    extend = ["--train.steps", "4", "--checkpoint.allow_config_change", "train.steps"]
    p = _cli(args + extend)
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert f"{optim}: refused to load" in p.stderr and "Unsupported global" in p.stderr
    assert not os.path.exists(marker)


class _OpenOnUnpickle:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ---- runs never mixed, metrics never lost ---------------------------------------------------------

SMALL = [
    "--smoke",
    "--train.batch_size",
    "32",
    "--train.threads",
    "1",
    "--model.overrides",
    json.dumps(MODEL),
]
SMALL += ["--log.progress", "false", "--log.plot", "false"]


def _train_rows(out):
    return [r["step"] for r in _rows(out) if "loss" in r]


@pytest.mark.slow
def test_a_new_run_moves_an_earlier_longer_run_aside(demo, tmp_path):
    out, _ = _copy(demo, tmp_path)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    p = _cli(
        [
            "--output-dir",
            out,
            *SMALL,
            "--train.steps",
            "2",
            "--checkpoint.every",
            "1",
            "--checkpoint.resume",
            "never",
        ]
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    (prev,) = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert "earlier run's files were moved to" in p.stderr and prev in p.stderr
    assert open(os.path.join(out, prev, "metrics.jsonl")).read() == before, "the earlier run is kept whole"
    assert sorted(os.listdir(os.path.join(out, prev, "checkpoints"))) == [
        "latest",
        "step_00000003",
        "step_00000006",
    ]
    assert _train_rows(out) == [1, 2], "metrics of the two runs are not interleaved"
    root = os.path.join(out, "checkpoints")
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]
    assert ckpt.verify(ckpt.find_latest(root))["step"] == 2


@pytest.mark.slow
def test_torn_metrics_line_and_an_explicit_earlier_resume(demo, tmp_path):
    out, _ = _copy(demo, tmp_path)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "loss": 2.')  # a disk that filled during an append
    step3 = os.path.join(out, "checkpoints", "step_00000003")
    p = _cli(["--output-dir", out, *SMALL, "--checkpoint.every", "3", "--checkpoint.resume", step3])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "resumed from" in p.stderr and "at step 3" in p.stderr
    # rows of steps 4-6 and the step-6 evaluation row, and the torn line
    assert "moved 4 row(s) after step 3 and 1 unreadable line(s)" in p.stderr, p.stderr[-2000:]
    assert _train_rows(out) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in _rows(out) if "zeroshot_top1" in r] == [6]
    with open(os.path.join(out, "metrics.jsonl.bak")) as f:
        bak = f.read().splitlines()
    assert [json.loads(b)["step"] for b in bak[:-1]] == [4, 5, 6, 6] and bak[-1] == '{"step": 7, "loss": 2.'
    # the abandoned step-6 checkpoint is set aside, not overwritten or pruned
    (prev,) = [n for n in os.listdir(out) if n.startswith("previous-")]
    assert os.listdir(os.path.join(out, prev, "checkpoints")) == ["step_00000006"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == [
        "latest",
        "step_00000003",
        "step_00000006",
    ]


@pytest.mark.slow
def test_resuming_a_finished_run_is_a_no_op(demo, tmp_path):
    out, _ = _copy(demo, tmp_path)
    before = open(os.path.join(out, "metrics.jsonl")).read()
    p = _cli(["--output-dir", out, *SMALL, "--checkpoint.every", "3"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "is complete (checkpoint at step 6, train.steps 6); nothing to do" in p.stderr
    assert open(os.path.join(out, "metrics.jsonl")).read() == before, "no second evaluation row"
    assert "zero-shot top-1 on held-out colour-shape pairs" in p.stdout  # the final numbers, from the log


@pytest.mark.slow
def test_allowed_config_change_extends_a_run(demo, tmp_path):
    out, _ = _copy(demo, tmp_path)
    args = ["--output-dir", out, *SMALL, "--checkpoint.every", "3", "--train.steps", "7"]
    p = _cli(args)
    assert p.returncode == 2 and "--checkpoint.allow_config_change train.steps" in p.stderr
    p = _cli([*args, "--checkpoint.allow_config_change", "train.steps"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "resuming with changed config: train.steps: 6 -> 7" in p.stderr
    assert _train_rows(out) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.slow
def test_a_diverging_run_stops_with_the_step(tmp_path):
    p = _cli(
        ["--output-dir", str(tmp_path / "div"), *SMALL, "--optim.lr", "1e6", "--optim.warmup_steps", "0"]
    )
    assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr
    (line,) = [x for x in p.stderr.splitlines() if x.startswith("fastclip train: error:")]
    assert "fastclip train: error: step " in line and "diverged" in line and "lower optim.lr" in line


def test_rank_state_round_trip(tmp_path):
    """RNG states (torch, numpy, python) and the data position survive the safetensors file exactly."""
    import random

    import numpy as np

    from fastclip.train.rank_state import RankStateError, load_rank_state, save_rank_state, set_rng_state

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.normal()  # a cached gaussian in numpy's state
    path = str(tmp_path / "rank_00000.safetensors")
    save_rank_state(path, step=7, data={"kind": "synthetic", "position": 7})
    expected = (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), np.random.normal())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    state = load_rank_state(path)
    assert state["step"] == 7 and state["data"] == {"kind": "synthetic", "position": 7}
    set_rng_state(state["rng"])
    assert (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        random.random(),
        np.random.normal(),
    ) == expected
    with pytest.raises(TypeError, match="data: expected a JSON-serialisable data-stream state"):
        save_rank_state(path, step=1, data={"position": object()})
    from safetensors.torch import save_file

    save_file({"rng.torch": torch.zeros(3, dtype=torch.uint8)}, path, metadata={"fastclip": '{"step": 1}'})
    with pytest.raises(RankStateError, match="key 'data': expected the data stream's state"):
        load_rank_state(path)


# ---- issue 28 #7: one line, not a traceback, and nothing left behind ---------------------------------


def _forge_rank_state(step, kind):
    """Rewrite rank_00000.safetensors of ``step`` (a forgery: the manifest is re-signed to match)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = os.path.join(step, "rank_00000.safetensors")
    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata()["fastclip"], {k: f.get_tensor(k) for k in f.keys()}
    if kind == "position":
        state = json.loads(meta)
        state["data"]["position"] = 10**30
        meta = json.dumps(state)
    elif kind == "deep":
        meta = "[" * 100_000 + "]" * 100_000
    else:
        tensors["rng.torch"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    save_file(tensors, path, metadata={"fastclip": meta})
    ckpt.write_manifest(step)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, match",
    [
        (
            "position",
            r"key 'data.position': expected an int in \[0, 2\*\*53\], got 1000000000000000000000000000000",
        ),
        ("deep", r"metadata 'fastclip': JSON nested too deeply"),
        ("rng", r"tensor 'rng.torch': not a usable RNG state \(.*size 5056"),
    ],
)
def test_forged_rank_state_is_one_line_and_nothing_is_loaded(demo, tmp_path, kind, match):
    """A data position of 1e30 (was: 'Overflow when unpacking'), 100k-deep metadata JSON (RecursionError),
    a 3-byte torch RNG state (RuntimeError): each a CheckpointError naming the file and the key, found by
    verify() before anything starts; the resume and the export stop with one line and change nothing."""
    import re

    out, step = _copy(demo, tmp_path)
    path = _forge_rank_state(step, kind)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(path) + ": " + match):
        ckpt.verify(step)
    before = {n: open(os.path.join(out, n), "rb").read() for n in ("metrics.jsonl", "config.yaml")}
    listing = sorted(os.listdir(out))
    p = _cli(
        [*SMALL, "--output-dir", out, "--train.steps", "8", "--checkpoint.allow_config_change", "train.steps"]
    )
    err = [line for line in p.stderr.splitlines() if "[WARNING]" not in line]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0].startswith("fastclip train: error: ") and re.search(match, err[0]), err
    assert "rank_00000.safetensors" in err[0]
    assert sorted(os.listdir(out)) == listing
    assert all(open(os.path.join(out, n), "rb").read() == b for n, b in before.items())
    weights = str(tmp_path / "w.safetensors")
    p = _cli(["--export", os.path.join(out, "checkpoints"), weights])
    err = [line for line in p.stderr.splitlines() if "[WARNING]" not in line]
    assert p.returncode == 2 and len(err) == 1 and re.search(match, err[0]), p.stderr[-3000:]
    assert os.listdir(tmp_path) == ["copy"]


@pytest.mark.slow
def test_export_onto_a_directory_is_one_line_and_leaves_no_tmp(demo, tmp_path):
    """Was: '[Errno 21] Is a directory' after writing NAME.tmp (left behind)."""
    target = tmp_path / "weights"
    target.mkdir()
    p = _cli(["--export", os.path.join(demo[0], "checkpoints"), str(target)])
    err = [line for line in p.stderr.splitlines() if "[WARNING]" not in line]
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    assert err[0] == (
        f"fastclip train: error: {target}: is a directory; expected the path of the file to write, "
        f"e.g. {target / 'model.safetensors'}"
    )
    assert sorted(os.listdir(tmp_path)) == ["weights"] and not os.listdir(target)


@pytest.mark.slow
def test_export_to_a_read_only_filesystem_is_one_line(demo, tmp_path):
    """Was: a SafetensorError traceback. A real read-only mount when root may mount (chmod otherwise)."""
    d = tmp_path / "ro"
    d.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here")
        os.chmod(d, 0o555)
    try:
        for out in (d / "w.safetensors", d / "sub" / "w.safetensors"):
            with pytest.raises(
                OSError, match=rf"^cannot write {out}: (Read-only file system|Permission denied)$"
            ):
                export_safetensors(os.path.join(demo[0], "checkpoints"), str(out))
            p = _cli(["--export", os.path.join(demo[0], "checkpoints"), str(out)])
            err = [line for line in p.stderr.splitlines() if "[WARNING]" not in line]
            assert p.returncode == 1 and len(err) == 1, p.stderr[-3000:]
            assert err[0].startswith(f"fastclip train: error: cannot write {out}: "), err
            assert os.listdir(d) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], capture_output=True)
        else:
            os.chmod(d, 0o755)


@pytest.mark.slow
def test_exported_weights_have_the_mode_of_the_other_run_files(demo, tmp_path):
    """issue 28 #15: model.safetensors was 0600 (safetensors' temporary file) beside 0644 run files."""
    import stat

    mask = os.umask(0)
    os.umask(mask)
    out = demo[0]
    want = 0o666 & ~mask
    for name in ("model.safetensors", "config.yaml", "metrics.jsonl"):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == want, name
    again = str(tmp_path / "again.safetensors")
    export_safetensors(os.path.join(out, "checkpoints"), again)
    assert stat.S_IMODE(os.stat(again).st_mode) == want


def test_a_step_directory_that_is_a_link_is_named_as_a_link(demo, tmp_path):
    """issue 28 #12: `latest` naming a step directory that is a symbolic link said 'does not exist'."""
    out, step = _copy(demo, tmp_path)
    root = os.path.join(out, "checkpoints")
    elsewhere = str(tmp_path / "elsewhere")
    shutil.move(step, elsewhere)
    os.symlink(elsewhere, step)
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"points at 'step_00000006', which is a link to '{elsewhere}'; expected a step directory",
    ):
        ckpt.find_latest(root)
    os.remove(step)
    open(step, "w").close()
    with pytest.raises(ckpt.CheckpointError, match="points at 'step_00000006', which is not a directory"):
        ckpt.find_latest(root)


def test_data_state_numbers_are_bounded():
    """The generic check behind the forged-position case: ints within [0, 2**53] (a seed: any int64),
    finite floats; the message names the key path."""
    ckpt._check_json_numbers("f", "data", {"seed": -5, "readers": [{"epoch": 1, "sample": 2**53}]})
    ckpt._check_json_numbers("f", "data", {"seed": 2**60})
    for bad, key in (
        ({"position": -1}, "data.position"),
        ({"readers": [{"sample": 2**54}]}, r"data.readers\[0\].sample"),
        ({"seed": 2**64}, "data.seed"),
        ({"skipped": float("nan")}, "data.skipped"),
    ):
        with pytest.raises(ckpt.CheckpointError, match=rf"^f: key '{key}': expected"):
            ckpt._check_json_numbers("f", "data", bad)
