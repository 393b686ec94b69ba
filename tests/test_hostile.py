"""Hostile inputs: what a crafted or damaged file, a misused output directory or a bad option does to the
trainer. Nothing from a checkpoint runs code; damage and tampering are refused with one-line errors
that name the file, key or value; runs are never mixed. Budget: under 60 s on the CI machine.

Other areas append their own reproducers at the end of this module.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from utils import train_cli

from fastclip.train import checkpoint as ckpt

MODEL = json.dumps({"patch_size": 8, "vision_depth": 1, "text_depth": 1})
BASE = ["--smoke", "--train.batch_size", "16", "--train.threads", "1", "--model.overrides", MODEL]
BASE += ["--log.progress", "false", "--log.plot", "false", "--data.eval_size", "32"]


def _cli(args, timeout=180):
    return train_cli(args, timeout)


def _one_line_error(p, rc=2):
    """The command failed with ``rc`` and one error line on stderr (no traceback)."""
    assert p.returncode == rc, (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("fastclip train: error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (ZeRO 0, fp32)."""
    out = str(tmp_path_factory.mktemp("hostile") / "run")
    p = _cli(["--output-dir", out, *BASE, "--train.steps", "4", "--checkpoint.every", "2"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out


def _copy(run4, tmp_path, name="copy"):
    out = str(tmp_path / name)
    shutil.copytree(run4, out)
    return out, os.path.join(out, "checkpoints")


class _Payload:
    """Unpickling this with full pickle creates ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(path, marker, wrap=lambda x: x):
    torch.save(wrap(_Payload(marker)), path)


# ---- code in checkpoint files -------------------------------------------------------------------


def test_crafted_deepspeed_file_runs_nothing_on_resume(run4, tmp_path):
    out, root = _copy(run4, tmp_path)
    step2 = os.path.join(root, "step_00000002")
    marker = str(tmp_path / "MARK")
    _plant(os.path.join(step2, "ds", "mp_rank_00_model_states.pt"), marker, lambda x: {"module": x})
    ckpt.write_manifest(step2)  # whoever can write the file can rewrite its hash
    open(os.path.join(root, "latest"), "w").write("step_00000002\n")
    p = _cli(["--output-dir", out, *BASE, "--train.steps", "4", "--checkpoint.every", "2"])
    line = _one_line_error(p)
    assert "mp_rank_00_model_states.pt: refused to load" in line and "Unsupported global: GLOBAL" in line
    assert not os.path.exists(marker), "unpickling ran code from the checkpoint"


@pytest.mark.parametrize("zero", [False, True])
def test_crafted_files_run_nothing_on_export(run4, tmp_path, zero, capsys):
    from fastclip.cli import main

    out, root = _copy(run4, tmp_path)
    step4 = os.path.join(root, "step_00000004")
    marker = str(tmp_path / "MARK")
    ds = os.path.join(step4, "ds")
    if zero:  # a ZeRO checkpoint goes through DeepSpeed's zero_to_fp32, which reads *_model_states.pt first
        os.remove(os.path.join(ds, "mp_rank_00_model_states.pt"))
        _plant(
            os.path.join(ds, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
            marker,
            lambda x: {"optimizer_state_dict": x},
        )
        _plant(
            os.path.join(ds, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
            marker,
            lambda x: {"buffer_names": x},
        )
    else:
        _plant(os.path.join(ds, "mp_rank_00_model_states.pt"), marker, lambda x: {"module": x})
    ckpt.write_manifest(step4)
    assert main(["train", "--export", root, str(tmp_path / "w.safetensors")]) == 2
    assert "model_states.pt: refused to load" in capsys.readouterr().err
    assert not os.path.exists(marker), "unpickling ran code from the checkpoint"
    assert not os.path.exists(tmp_path / "w.safetensors")


def test_rank_state_is_not_a_pickle(run4, tmp_path):
    out, root = _copy(run4, tmp_path)
    step4 = os.path.join(root, "step_00000004")
    marker = str(tmp_path / "MARK")
    _plant(os.path.join(step4, "rank_00000.safetensors"), marker, lambda x: {"rng": x})
    ckpt.write_manifest(step4)
    with pytest.raises(ckpt.CheckpointError, match="rank_00000.safetensors: not a readable safetensors file"):
        ckpt.load(None, step4, 0, 1, 0)
    assert not os.path.exists(marker)


# ---- manifests and `latest` ------------------------------------------------------------------------


def _manifest(step):
    with open(os.path.join(step, "MANIFEST.json")) as f:
        return json.load(f)


def _write_manifest(step, data):
    with open(os.path.join(step, "MANIFEST.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


@pytest.mark.parametrize(
    "entry", ["../../../etc/hostname", "/etc/hostname", "ds/../../step_00000002/trainer.json"]
)
def test_manifest_entries_stay_inside_the_step_dir(run4, tmp_path, entry):
    _, root = _copy(run4, tmp_path)
    step = os.path.join(root, "step_00000004")
    m = _manifest(step)
    m["files"][entry] = {"size": 1, "sha256": "0" * 64}
    _write_manifest(step, m)
    with pytest.raises(
        ckpt.CheckpointError, match=r"expected a plain relative name inside the step directory"
    ):
        ckpt.verify(step)


def test_manifest_must_list_every_file(run4, tmp_path):
    _, root = _copy(run4, tmp_path)
    step = os.path.join(root, "step_00000004")
    target = os.path.join(step, "ds", "mp_rank_00_model_states.pt")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flipped model byte ...
    open(target, "wb").write(bytes(data))
    _write_manifest(step, {"files": {}})  # ... behind an empty manifest
    with pytest.raises(
        ckpt.CheckpointError, match="files not listed in MANIFEST.json: .*mp_rank_00_model_states.pt"
    ):
        ckpt.verify(step)


def test_manifest_entry_may_not_be_a_link(run4, tmp_path):
    _, root = _copy(run4, tmp_path)
    step = os.path.join(root, "step_00000004")
    outside = tmp_path / "outside.json"
    shutil.copy(os.path.join(step, "trainer.json"), outside)
    os.remove(os.path.join(step, "trainer.json"))
    os.symlink(outside, os.path.join(step, "trainer.json"))
    ckpt.write_manifest(step)
    with pytest.raises(ckpt.CheckpointError, match="trainer.json: a link"):
        ckpt.verify(step)


@pytest.mark.parametrize(
    "manifest,match",
    [
        ("[1, 2]", r"expected an object with key 'files'"),
        ('{"files": []}', r"expected an object with key 'files'"),
        ('{"nope": {}}', r"expected an object with key 'files'"),
        ('{"files": {"trainer.json": 5}}', r"entry 'trainer.json': expected \{'size': int"),
        (
            '{"files": {"trainer.json": {"size": "x", "sha256": "0"}}}',
            r"key 'size': expected an int >= 0, got 'x'",
        ),
        ('{"files": {"trainer.json": {"size": 3, "sha256": "zz"}}}', r"key 'sha256': expected 64 hex digits"),
    ],
)
def test_malformed_manifests_are_one_line_errors(run4, tmp_path, manifest, match):
    _, root = _copy(run4, tmp_path)
    step = os.path.join(root, "step_00000004")
    _write_manifest(step, manifest)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.verify(step)


def test_malformed_trainer_json(run4, tmp_path):
    _, root = _copy(run4, tmp_path)
    step = os.path.join(root, "step_00000004")
    path = os.path.join(step, "trainer.json")
    meta = json.load(open(path))
    meta["step"] = "four"
    json.dump(meta, open(path, "w"))
    ckpt.write_manifest(step)
    with pytest.raises(
        ckpt.CheckpointError, match=r"trainer.json: key 'step': expected an int >= 0, got 'four'"
    ):
        ckpt.verify(step)


@pytest.mark.parametrize("name", ["../../other_run/checkpoints/step_00000002", "/tmp", "step_2", "latest"])
def test_latest_must_name_a_sibling_step_dir(run4, tmp_path, name):
    _, root = _copy(run4, tmp_path)
    _copy(run4, tmp_path, "other_run")
    open(os.path.join(root, "latest"), "w").write(name + "\n")
    with pytest.raises(ckpt.CheckpointError, match="expected the name of a step directory next to it"):
        ckpt.find_latest(root)


def test_the_planted_payload_is_live(tmp_path):
    """The reproducers above are real: full pickle of a planted file does create the marker."""
    marker = str(tmp_path / "MARK")
    _plant(str(tmp_path / "x.pt"), marker, lambda x: {"module": x})
    torch.load(str(tmp_path / "x.pt"), weights_only=False)
    assert os.path.exists(marker)


# ---- one-line errors before anything starts -----------------------------------------------------


def test_output_dir_that_is_a_file(tmp_path, capsys):
    from fastclip.cli import main

    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["train", "--output-dir", str(f)]) == 2
    assert f"output_dir: expected a directory, got '{f}', which is a file" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(f / "run")]) == 2
    assert "cannot be created" in capsys.readouterr().err


def test_unknown_model_name(tmp_path, capsys):
    from fastclip.cli import main

    assert main(["train", "--output-dir", str(tmp_path / "r"), "--model.name", "tiny-siglp"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "model.name: unknown model 'tiny-siglp' (did you mean 'tiny-siglip'" in err
    )


def test_missing_tokenizer_is_a_one_line_error(tmp_path, capsys):
    from fastclip.cli import main

    argv = ["train", "--output-dir", str(tmp_path / "r"), "--data.tokenizer", str(tmp_path / "no.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastclip train: error: data.tokenizer: ")
    import torch.distributed as dist

    assert not dist.is_initialized(), "a failed set-up must not leave the trainer's process group behind"


def test_dist_impl_is_validated_with_the_config():
    from fastclip.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.dist_impl: 'bogus' is not a strategy of model.loss='auto'"):
        load_config(None, {"model.dist_impl": "bogus"})
    with pytest.raises(ConfigError, match="model.dist_impl: 'ring' is not a strategy of model.loss='siglip'"):
        load_config(None, {"model.dist_impl": "ring", "model.loss": "siglip"})
    assert load_config(None, {"model.dist_impl": "ring", "model.loss": "clip"}).model.dist_impl == "ring"


def test_config_change_on_resume_is_refused(run4, tmp_path, capsys):
    from fastclip.cli import main

    out, _ = _copy(run4, tmp_path)
    args = ["train", "--output-dir", out, *BASE, "--train.steps", "4", "--checkpoint.every", "2"]
    assert main([*args, "--train.batch_size", "32"]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size: 16 in the checkpoint, 32 now" in err
    assert "--checkpoint.allow_config_change train.batch_size" in err
    assert main([*args, "--model.overrides", '{"patch_size": 8, "vision_depth": 2, "text_depth": 1}']) == 2
    assert "model.overrides: " in capsys.readouterr().err
    import torch.distributed as dist

    assert not dist.is_initialized(), "the config is compared before any process group starts"


# ---- a full disk during a save ------------------------------------------------------------------


class _FullDiskEngine:
    def __init__(self, how):
        self.how = how

    def save_checkpoint(self, path, tag, save_latest):
        os.makedirs(os.path.join(path, tag))
        if self.how == "oserror":  # a plain write on a full device: OSError(ENOSPC)
            with open("/dev/full", "wb") as f:
                f.write(b"x" * 4096)
                f.flush()
        else:  # torch.save's C++ writer on a path: a RuntimeError without errno
            torch.save({"w": torch.zeros(1000)}, "/dev/full")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("how,free,match", [
    ("oserror", None, "disk full while saving checkpoint at step 4; previous checkpoint kept"),
    ("torch", 0, "disk full while saving checkpoint at step 4; previous checkpoint kept"),
    ("torch", 10**12, r"write error \(.*\) while saving checkpoint at step 4; previous checkpoint kept"),
])  # fmt: skip
def test_disk_full_during_save_keeps_the_previous_checkpoint(run4, tmp_path, monkeypatch, how, free, match):
    _, root = _copy(run4, tmp_path)
    shutil.rmtree(os.path.join(root, "step_00000004"))
    open(os.path.join(root, "latest"), "w").write("step_00000002\n")
    if free is not None:
        monkeypatch.setattr(ckpt, "_free_bytes", lambda path: free)
    with pytest.raises(ckpt.CheckpointWriteError, match=match):
        ckpt.save(_FullDiskEngine(how), root, 4, 0, 1, {"kind": "synthetic", "position": 4}, {},
                  barrier=lambda: None, any_rank=bool, keep=2)  # fmt: skip
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"], "the partial save is removed"
    assert ckpt.find_latest(root).endswith("step_00000002")
    ckpt.verify(ckpt.find_latest(root))


# ---- data: shard names, CSV paths, empty captions, corrupt images ---------------------------------


def _data_table(folder, n=16, bad_caption_row=None, corrupt=None):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        path = folder / f"{i}.png"
        if i == corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG signature, then garbage
        else:
            Image.new("RGB", (20, 16), (15 * i % 256, 90, 200)).save(path)
        rows.append(f"{i}.png,{'' if i == bad_caption_row else f'a picture number {i}'}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "train.csv")


def test_shard_named_like_a_pipe_url_is_only_read(tmp_path, monkeypatch):
    """A glob match named 'pipe:touch MARK;cat shard1.tar;#.tar' is a local file, never a command."""
    from fastclip.data import WebDatasetStream, expand_shards
    from fastclip.data.write import write_shards
    from fastclip.train.data import check_paths

    table = _data_table(tmp_path / "src", n=8)
    write_shards(table, str(tmp_path / "shards"), 4)
    shards = tmp_path / "shards"
    os.rename(shards / "00000.tar", shards / "shard1.tar")
    os.rename(shards / "00001.tar", shards / "pipe:touch MARK;cat shard1.tar;#.tar")
    monkeypatch.chdir(shards)  # where the command would have written MARK
    names = expand_shards("*.tar")
    assert names == sorted(str(p) for p in shards.iterdir()) and all(os.path.isabs(n) for n in names)
    dc = type("DC", (), {"kind": "webdataset", "train": "*.tar", "eval": None, "root": None})()
    check_paths(dc)
    cfg = type("C", (), {"image_key": "image", "caption_key": "caption", "workers": 0, "shuffle_buffer": 0})()
    stream = WebDatasetStream("*.tar", cfg, 8, 4, 0, 1, seed=0)
    captions = sum((stream.next_batch()[1] for _ in range(2)), [])
    assert sorted(captions) == sorted(f"a picture number {i}" for i in range(8))  # both shards were read
    assert not (shards / "MARK").exists() and not (tmp_path / "MARK").exists()


def test_csv_paths_confined_by_data_root(tmp_path):
    from fastclip.data import CsvStream, DataError

    table = _data_table(tmp_path / "d", n=4)
    with open(table, "a") as f:
        f.write("/etc/passwd,an absolute path\n../d/0.png,fine: resolves inside\n")
    cfg = type("C", (), {"image_key": "image", "caption_key": "caption", "delimiter": None, "workers": 0})()
    cfg.root = str(tmp_path / "d")
    with pytest.raises(DataError, match=r"train.csv: row 6: image '/etc/passwd' lies outside data.root"):
        CsvStream(table, cfg, 8, 4, 0, 1, seed=0)


def test_empty_caption_is_a_one_line_error(tmp_path):
    table = _data_table(tmp_path / "d", bad_caption_row=1)
    p = _cli(["--output-dir", str(tmp_path / "run"), *BASE, "--data.kind", "csv", "--data.train", table])
    line = _one_line_error(p)
    assert "train.csv: row 3: empty 'caption' (caption)" in line, line


def test_corrupt_image_mid_run_is_skipped_and_counted(tmp_path):
    table = _data_table(tmp_path / "d", corrupt=5)  # 16 rows = the batch: every step meets it
    out = tmp_path / "run"
    p = _cli(["--output-dir", str(out), *BASE, "--data.kind", "csv", "--data.train", table])
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "5.png: unreadable image" in p.stderr and "Traceback" not in p.stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert rows and rows[-1]["data_skipped"] >= 6  # counted in the logs, one per step here
