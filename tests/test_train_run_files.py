"""The files a run leaves in its output directory (issue 28 #15): a run that fails during its set-up
leaves none of them; the word vocabulary it saves (vocab.txt) is read back by fastclip.get_tokenizer."""

from __future__ import annotations

import json
import os

import pytest
from utils import train_cli

MODEL = json.dumps({"patch_size": 8, "vision_depth": 1, "text_depth": 1})
BASE = ["--smoke", "--train.batch_size", "16", "--train.threads", "1", "--model.overrides", MODEL]
BASE += ["--log.progress", "false", "--log.plot", "false", "--data.eval_size", "32"]


def _cli(args, timeout=300):
    return train_cli(args, timeout)


def _table(folder, n=16):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        Image.new("RGB", (20, 16), (15 * i % 256, 90, 200)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,a {'blue' if i % 2 else 'green'} picture number {i}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "train.csv")


def test_a_run_that_fails_in_its_set_up_leaves_no_vocab(tmp_path):
    """A CSV run stopped after its tokenizer was built (here: a softmax loss on a SigLIP model) left
    vocab.txt behind; now the vocabulary is written with config.yaml when training starts."""
    out = tmp_path / "run"
    table = _table(tmp_path / "d")
    p = _cli(["--output-dir", str(out), *BASE, "--data.kind", "csv", "--data.train", table,
              "--model.name", "tiny-siglip", "--model.loss", "clip"])  # fmt: skip
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert "model.loss: 'clip' is a softmax loss" in p.stderr
    assert sorted(os.listdir(out)) == [".fastclip.lock"], os.listdir(out)


@pytest.mark.slow
def test_get_tokenizer_of_a_csv_run_directory(tmp_path):
    """fastclip.get_tokenizer(run_dir) failed for a model trained on CSV data (no tokenizer.json)."""
    import torch

    import fastclip
    from fastclip.models import WordTokenizer, load_pretrained

    out = tmp_path / "run"
    table = _table(tmp_path / "d")
    p = _cli(["--output-dir", str(out), *BASE, "--data.kind", "csv", "--data.train", table])
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    tok = fastclip.get_tokenizer(str(out))
    model = load_pretrained(str(out))
    assert isinstance(tok, WordTokenizer)
    assert tok.context_length == model.config.text.context_length
    assert tok.vocab_size == model.config.text.vocab_size
    ids = tok(["a blue picture number 3", "a green picture number 12"])
    assert tok.decode(ids[0]) == "a blue picture number 3" and tok.unk_id not in ids[1].tolist()
    with torch.no_grad():
        assert model.encode_text(ids).shape[0] == 2
    assert fastclip.get_tokenizer(str(out), context_length=8).context_length == 8
