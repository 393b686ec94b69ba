"""Config: files, overrides, unknown keys with close matches, bad values; the command line's --help."""

from __future__ import annotations

import argparse
import json

import pytest

from fastclip.train.config import Config, ConfigError, all_keys, load_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    assert cfg.model.name == "tiny" and cfg.data.kind == "synthetic"
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(path)).to_dict() == cfg.to_dict()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  lr: 1.0e-4\n  betas: [0.9, 0.95]\ntrain:\n  steps: 20\n  micro_batch_size: 16\n"
    )
    cfg = load_config(str(path), {"train.steps": "30", "log.tensorboard": "true", "output_dir": "x"})
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == [0.9, 0.95]
    assert cfg.train.steps == 30 and cfg.train.micro_batch_size == 16
    assert cfg.log.tensorboard is True and cfg.output_dir == "x"


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"optim.lrr": 1}, r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        ({"train.stepz": 1}, r"did you mean 'train.steps'"),
        ({"trian.steps": 1}, r"did you mean 'train.steps'"),
        ({"train.steps": 0}, r"train.steps: expected an int >= 1, got 0"),
        ({"train.steps": "ten"}, r"train.steps: expected an int, got 'ten'"),
        ({"train.steps": 2.5}, r"train.steps: expected an int, got 2.5"),
        (
            {"train.precision": "bf61"},
            r"expected one of \['fp32', 'bf16', 'fp16'\], got 'bf61' \(did you mean 'bf16'\?\)",
        ),
        ({"train.zero_stage": 4}, r"train.zero_stage: expected one of \[0, 1, 2, 3\], got 4"),
        ({"optim.lr": -1.0}, r"optim.lr: expected a finite number > 0, got -1.0"),
        ({"optim.lr": float("nan")}, r"optim.lr: expected a finite number > 0"),
        ({"optim.betas": [0.9]}, r"optim.betas: expected two numbers in \[0, 1\)"),
        ({"log.plot": "maybe"}, r"log.plot: expected true or false, got 'maybe'"),
        ({"data.kind": "parquet"}, r"data.kind: expected one of"),
        ({"data.kind": "csv"}, r"data.train: expected a path for data.kind='csv'"),
        ({"data.train": "x.csv"}, r"synthetic dataset takes no paths"),
        (
            {"eval.templates": ["no placeholder"]},
            r"eval.templates: expected a non-empty list of strings with '\{\}'",
        ),
        ({"model.overrides": "patch_size=8"}, r"model.overrides: expected a mapping"),
    ],
)
def test_bad_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'optimizer' \(did you mean 'optim'\?\)"):
        load_config(str(unknown))
    flat = tmp_path / "flat.yaml"
    flat.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="train: expected a mapping of keys"):
        load_config(str(flat))


def test_batch_split_between_ranks():
    cfg = load_config(None, {"train.batch_size": 64, "train.micro_batch_size": 8})
    assert cfg.check_world(2) == (32, 8, 4)
    assert cfg.check_world(1) == (64, 8, 8)
    with pytest.raises(ConfigError, match="train.batch_size: expected a multiple of the world size 3"):
        cfg.check_world(3)
    cfg.set("train.micro_batch_size", 12)
    with pytest.raises(
        ConfigError, match="train.micro_batch_size: expected a divisor of the per-rank batch 32"
    ):
        cfg.check_world(2)


def _parser():
    from fastclip.train import cli

    p = argparse.ArgumentParser(prog="fastclip train")
    cli.add_arguments(p)
    return p, cli


def test_every_key_is_a_command_line_option():
    p, cli = _parser()
    argv = []
    for key in all_keys():
        if key != "output_dir":
            argv += [f"--{key}", "none"]
    args = p.parse_args(argv)
    assert set(cli.overrides_from_args(args)) == set(all_keys()) - {"output_dir"}
    args = p.parse_args(
        [
            "--optim.lr",
            "1e-4",
            "--train.batch-size",
            "64",
            "--model.overrides",
            "{patch_size: 8}",
            "--output-dir",
            "d",
        ]
    )
    cfg = load_config(None, cli.overrides_from_args(args))
    assert cfg.optim.lr == 1e-4 and cfg.train.batch_size == 64 and cfg.output_dir == "d"
    assert cfg.model.overrides == {"patch_size": 8}


def test_help_reads_well(capsys):
    p, _ = _parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for piece in (
        "--output-dir DIR",
        "--optim.lr VALUE",
        "Global batch",
        "train options",
        "examples:",
        "torchrun",
        "(default: 0.003)",
    ):
        assert piece in text, piece


def test_cli_errors_are_clear(tmp_path, capsys):
    from fastclip.cli import main

    with pytest.raises(SystemExit):  # argparse rejects unknown options itself
        main(["train", "--optim.lrr", "1"])
    assert "unrecognized arguments: --optim.lrr" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path), "--train.steps", "0"]) == 2
    assert "train.steps: expected an int >= 1, got 0" in capsys.readouterr().err
    assert main(["train", "--print-config", "--train.steps", "7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["train", "--train.steps", "3"]) == 2
    assert "--output-dir DIR" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "--output-dir",
                str(tmp_path),
                "--data.kind",
                "csv",
                "--data.train",
                str(tmp_path / "nope.csv"),
            ]
        )
        == 2
    )
    assert "data file not found" in capsys.readouterr().err
    if not torch_cuda():
        assert main(["train", "--output-dir", str(tmp_path), "--train.precision", "fp16"]) == 2
        assert "'fp16' needs a CUDA device" in capsys.readouterr().err
    import torch.distributed as dist

    assert not dist.is_initialized(), "bad data paths must be reported before any process group starts"


def torch_cuda():
    import torch

    return torch.cuda.is_available()


def test_config_object_api():
    cfg = Config()
    cfg.set("train.steps", 5)
    with pytest.raises(ConfigError, match="unknown config key"):
        cfg.set("train", 5)
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        Config.from_dict([1, 2])


def test_example_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paths = sorted(glob.glob(os.path.join(root, "*.yaml")))
    assert len(paths) >= 4
    for path in paths:
        cfg = load_config(path)
        assert cfg.train.steps >= 1, path
    demo = load_config(os.path.join(root, "tiny-synthetic.yaml"))
    default = load_config()
    default.model.overrides = {"patch_size": 8}  # what None resolves to for the tiny models
    assert demo.to_dict() == default.to_dict(), "configs/tiny-synthetic.yaml must spell out the defaults"


def test_weight_decay_groups_follow_the_model():
    """Parameter groups come from model.no_weight_decay(): the patch-embedding conv and the token
    embedding are decayed; biases, norms, position embeddings and logit scale/bias are not."""
    import torch

    from fastclip.models import create_model
    from fastclip.train.optim import param_groups

    model = create_model("tiny-siglip", patch_size=8, vision_depth=1, text_depth=1)
    decay, exempt = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in exempt["params"]}
    assert decayed | skipped == set(names.values()) and not decayed & skipped
    assert {"visual.patch_embed.weight", "text.token_embed.weight"} <= decayed
    assert {
        "logit_scale",
        "logit_bias",
        "visual.pos_embed",
        "text.pos_embed",
        "visual.norm.weight",
    } <= skipped
    assert all(p.ndim >= 2 for p in decay["params"])

    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))  # no no_weight_decay()
    decay, exempt = param_groups(plain, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)] and len(exempt["params"]) == 3


def test_lr_schedule():
    from fastclip.train.optim import lr_factor

    assert [lr_factor(s, 4, 10, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 10, 0.0) == 1.0 and abs(lr_factor(10, 4, 10, 0.1) - 0.1) < 1e-12


def test_config_file_not_utf8_is_one_line(tmp_path, capsys):
    """issue 28 #7: a config file in another encoding is a one-line error naming the file, not a traceback."""
    from fastclip.cli import main

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  steps: 5\nmodel:\n  name: 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml'?: not UTF-8 text \(byte 0xe9 at line 4\)"):
        load_config(str(bad))
    assert main(["train", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastclip train: error:" in err and "latin1.yaml" in err, err


@pytest.mark.parametrize("text, name", [("null", "n.json"), ("null\n", "n.yaml"), ("~\n", "t.yaml")])
def test_null_config_is_refused_like_a_list(tmp_path, text, name):
    """issue 28 #8: a JSON/YAML null is not "no config" (that started the 1000-step demo)."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"expected a mapping of sections, got null"):
        load_config(str(path))
    listed = tmp_path / ("l" + name)
    listed.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"expected a mapping of sections, got list"):
        load_config(str(listed))


def test_empty_yaml_file_is_still_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set here\n---\n")
    assert load_config(str(empty)).train.steps == Config().train.steps


@pytest.mark.parametrize(
    "name, meant",
    [
        ("optim.learning_rate", "optim.lr"),
        ("max_steps", "train.steps"),
        ("train.lr", "optim.lr"),
        ("optim.lrr", "optim.lr"),
        ("train.num_workers", "data.workers"),
        ("num_workers", "data.workers"),
    ],
)
def test_one_suggestion_for_files_and_options(tmp_path, capsys, name, meant):
    """issue 28 #15: the YAML reader and `fastclip train --NAME` suggest the same key (before, the CLI said
    '--optim.min_lr_ratio, --optim.lr, ...' and a top-level max_steps in YAML got no hint)."""
    import yaml

    from fastclip.cli import main

    section, _, key = name.rpartition(".")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({section: {key: 1}} if section else {name: 1}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert f"(did you mean {meant!r}?)" in str(info.value), str(info.value)
    with pytest.raises(SystemExit):
        main(["train", f"--{name}", "1"])
    assert f"--{name} (did you mean --{meant}?)" in capsys.readouterr().err


@pytest.mark.parametrize("loss", ["clip", "info_nce"])
def test_softmax_losses_on_a_model_with_logit_bias_are_refused_alike(loss):
    """issue 28 #10: tiny-siglip with model.loss clip trained and left the logit_bias untrained, while
    info_nce on the same model was refused for that reason. One rule in build_loss for both."""
    import types

    import torch

    from fastclip.train.build import build_loss

    cfg = load_config(None, {"model.name": "tiny-siglip", "model.loss": loss})
    siglip_model = types.SimpleNamespace(logit_bias=torch.zeros(1))
    with pytest.raises(
        ConfigError,
        match=rf"^model.loss: '{loss}' is a softmax loss and would leave the logit_bias of 'tiny-siglip' untrained",
    ):
        build_loss(cfg, siglip_model, 0, 1)
    assert build_loss(load_config(None, {"model.name": "tiny-siglip"}), siglip_model, 0, 1)[1] == "siglip"
    assert build_loss(cfg, types.SimpleNamespace(logit_bias=None), 0, 1)[1] == loss
