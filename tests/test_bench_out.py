"""``fastclip bench loss`` without --out (issue 28 #15): results go to ./fastclip-bench/ (named in the
output), never a ./benchmarks/results/ tree made wherever it was run; the "% matmul" column says what it
is a percentage of, and why a value can pass 100 %."""

from __future__ import annotations

import os

from fastclip.bench.cli import matmul_note
from fastclip.cli import main


def test_default_out_is_a_named_folder_in_the_cwd(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", "loss", "--device", "cpu", "--providers", "fastclip-torch", "--batch", "16",
               "--dim", "8", "--loss", "clip", "--repeats", "1", "--no-progress", "--no-plot", "--name", "run"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["fastclip-bench"], os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / "fastclip-bench")) == ["run.csv", "run.json"]
    assert f"(in {tmp_path / 'fastclip-bench'})" in out
    assert "% matmul: TFLOP/s (the loss's FLOP floor" in out and "fp32 2048x2048 matmul rate" in out


def test_matmul_note_explains_values_above_100_percent():
    rec = {"matmul_frac": 1.4}
    note = matmul_note([rec], 0.031, "cpu")
    assert "percentage of the fp32 2048x2048 matmul rate measured once at the start of this run" in note
    assert "(0.031 TFLOP/s)" in note and "Above 100 %" in note
    assert "Above 100 %" not in matmul_note([{"matmul_frac": 0.4}], 0.031, "cpu")
    assert "bf16 8192x8192" in matmul_note([rec], 700.0, "cuda")
