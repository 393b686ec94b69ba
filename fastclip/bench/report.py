"""Result files and printed tables: JSON (the result document), CSV beside it, text tables, ratios, targets.

The JSON document is ``{"device", "torch", "triton", "fastclip", "date", "matmul_tflops", "records"}``;
the CSV has one row per record with the record's fields as columns (empty where a value is null).
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Iterable

DOC_KEYS = ("device", "torch", "triton", "fastclip", "date", "matmul_tflops", "records")
REQUIRED_RECORD_KEYS = (
    "loss",
    "provider",
    "batch",
    "dim",
    "dtype",
    "fwd_ms",
    "bwd_ms",
    "fwd_bwd_ms",
    "fwd_bwd_ms_min",
    "fwd_bwd_ms_max",
    "peak_mem_bytes",
    "tflops",
    "status",
)
STATUSES = ("ok", "oom", "error", "skipped")  # skipped: not started, the reason in "message"
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def validate_document(doc) -> None:
    """Raise ValueError naming the first field that breaks the result-file schema."""
    if not isinstance(doc, dict):
        raise TypeError(f"doc: expected a dict, got {type(doc).__name__}")
    if set(doc) != set(DOC_KEYS):
        raise ValueError(f"doc: expected exactly the keys {DOC_KEYS}, got {tuple(doc)}")
    if not isinstance(doc["records"], list):
        raise ValueError(f"doc['records']: expected a list, got {type(doc['records']).__name__}")
    for i, rec in enumerate(doc["records"]):
        missing = [k for k in REQUIRED_RECORD_KEYS if k not in rec]
        if missing:
            raise ValueError(f"doc['records'][{i}]: missing keys {missing}")
        if rec["status"] not in STATUSES:
            raise ValueError(
                f"doc['records'][{i}]['status']: expected one of {STATUSES}, got {rec['status']!r}"
            )


def result_stem(kind: str, tag: str, date: str) -> str:
    """``loss_2026-11-25_2105_cpu`` from kind "loss", tag "cpu" and an ISO date."""
    m = re.match(r"(\d{4}-\d{2}-\d{2})T(\d{2}):(\d{2})", date)
    when = f"{m.group(1)}_{m.group(2)}{m.group(3)}" if m else re.sub(r"[^0-9A-Za-z-]", "", date)
    return f"{kind}_{when}_{tag}"


def write_json(doc: dict, path: str) -> str:
    validate_document(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return path


def write_csv(records: list[dict], path: str, extra: dict | None = None) -> str:
    """One row per record; ``extra`` columns (e.g. device, date) are repeated on every row."""
    extra = extra or {}
    fields = list(extra) + list(REQUIRED_RECORD_KEYS)
    for rec in records:
        fields += [k for k in rec if k not in fields]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for rec in records:
            w.writerow({**extra, **{k: ("" if v is None else v) for k, v in rec.items()}})
    return path


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def records_table(records: list[dict], matmul_tflops: float | None = None) -> str:
    header = ["loss", "dtype", "D", "B", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", "min-max", "peak MiB",
              "TFLOP/s", "% matmul", "status"]  # fmt: skip
    rows = []
    for r in records:
        frac = r.get("matmul_frac")
        rows.append([
            r["loss"], SHORT_DTYPE.get(r["dtype"], r["dtype"]), r["dim"], r["batch"], r["provider"],
            _fmt(r["fwd_ms"], ".1f"), _fmt(r["bwd_ms"], ".1f"), _fmt(r["fwd_bwd_ms"], ".1f"),
            "-" if r["fwd_bwd_ms_min"] is None else f"{r['fwd_bwd_ms_min']:.1f}-{r['fwd_bwd_ms_max']:.1f}",
            _mib(r["peak_mem_bytes"]), _fmt(r["tflops"], ".3f"), "-" if frac is None else f"{100 * frac:.0f}%",
            r["status"] if r["status"] == "ok" else f"{r['status']} ({r.get('message') or ''})"[:60],
        ])  # fmt: skip
    return format_table(rows, header)


def _index(records: Iterable[dict]) -> dict:
    return {(r["loss"], r["dtype"], r["dim"], r["batch"], r["provider"]): r for r in records}


def ratio_rows(records: list[dict], baseline: str = "reference") -> list[dict]:
    """For every ok record of a provider other than ``baseline`` whose baseline record is ok too:
    time and peak-memory ratios provider / baseline."""
    idx = _index(records)
    out = []
    for r in records:
        if r["provider"] == baseline or r["status"] != "ok":
            continue
        b = idx.get((r["loss"], r["dtype"], r["dim"], r["batch"], baseline))
        if b is None or b["status"] != "ok":
            continue
        out.append({
            "loss": r["loss"], "dtype": r["dtype"], "dim": r["dim"], "batch": r["batch"], "provider": r["provider"],
            "time_ratio": r["fwd_bwd_ms"] / b["fwd_bwd_ms"] if b["fwd_bwd_ms"] else None,
            "mem_ratio": r["peak_mem_bytes"] / b["peak_mem_bytes"] if b["peak_mem_bytes"] else None,
            "ms": r["fwd_bwd_ms"], "base_ms": b["fwd_bwd_ms"],
            "mem": r["peak_mem_bytes"], "base_mem": b["peak_mem_bytes"],
        })  # fmt: skip
    return out


def ratio_table(records: list[dict], baseline: str = "reference") -> str:
    rows = [
        [
            q["loss"], SHORT_DTYPE.get(q["dtype"], q["dtype"]), q["dim"], q["batch"], f"{q['provider']}/{baseline}",
            f"{q['ms']:.1f} / {q['base_ms']:.1f}", _fmt(q["time_ratio"], ".2f") + "x",
            f"{_mib(q['mem'])} / {_mib(q['base_mem'])}", _fmt(q["mem_ratio"], ".3f") + "x",
        ]
        for q in ratio_rows(records, baseline)
    ]  # fmt: skip
    if not rows:
        return ""
    header = ["loss", "dtype", "D", "B", "ratio", "fwd+bwd ms", "time", "peak MiB", "memory"]
    return format_table(rows, header)


# The project's speed and memory targets, checked wherever the records to judge them exist.
# Each line says "met" or "short" and the measured figure against the target.
def target_checks(records: list[dict], matmul_tflops: float | None = None) -> list[str]:
    lines = []
    idx = _index(records)
    ratios = {(q["loss"], q["dtype"], q["dim"], q["batch"], q["provider"]): q for q in ratio_rows(records)}
    # CPU target (chunked torch): B=16384, D=256, fp32: extra memory <= 10% and time <= 1.3x reference.
    for loss in ("clip", "siglip"):
        q = ratios.get((loss, "float32", 256, 16384, "fastclip-torch"))
        if q is not None and q["time_ratio"] is not None and q["mem_ratio"] is not None:
            ok = q["mem_ratio"] <= 0.10 and q["time_ratio"] <= 1.3
            lines.append(
                f"[{'met' if ok else 'short'}] CPU target, {loss}, B=16384 D=256 fp32, fastclip-torch vs reference: "
                f"memory {q['mem_ratio']:.3f}x (target <= 0.10), time {q['time_ratio']:.2f}x (target <= 1.3)"
            )
    # GPU targets (fused kernels): bf16, D=768.
    for loss in ("clip", "siglip"):
        q = ratios.get((loss, "bfloat16", 768, 32768, "fastclip-triton"))
        if q is not None and q["time_ratio"] is not None and q["mem_ratio"] is not None:
            ok = q["time_ratio"] <= 1.0 and q["mem_ratio"] <= 0.05
            lines.append(
                f"[{'met' if ok else 'short'}] GPU target, {loss}, B=32768 D=768 bf16, fastclip-triton vs reference: "
                f"time {q['time_ratio']:.2f}x (target <= 1.0), memory {q['mem_ratio']:.3f}x (target <= 0.05)"
            )
        ok_recs = [r for r in records if r["provider"] == "fastclip-triton" and r["loss"] == loss
                   and r["dtype"] == "bfloat16" and r["dim"] == 768 and r["status"] == "ok"]  # fmt: skip
        if ok_recs and matmul_tflops:
            best = max(ok_recs, key=lambda r: r["tflops"])
            frac = best["tflops"] / matmul_tflops
            lines.append(
                f"[{'met' if frac >= 0.6 else 'short'}] GPU target, {loss}, fastclip-triton best throughput "
                f"{best['tflops']:.1f} TFLOP/s at B={best['batch']} = {100 * frac:.0f}% of the bf16 matmul rate "
                f"(target >= 60%)"
            )
        big = idx.get((loss, "bfloat16", 768, 2**20, "fastclip-triton"))
        if big is not None:
            lines.append(
                f"[{'met' if big['status'] == 'ok' else 'short'}] GPU target, {loss}, B=1048576 D=768 bf16 "
                f"fastclip-triton: {big['status']}"
                + (f" in {big['fwd_bwd_ms'] / 1e3:.1f} s" if big["status"] == "ok" else "")
            )
    for r in records:
        if r["provider"] != "inf_cl" or r["status"] != "ok" or r["loss"] != "clip":
            continue
        f = idx.get(("clip", r["dtype"], r["dim"], r["batch"], "fastclip-triton"))
        if f is not None and f["status"] == "ok" and r["dtype"] == "bfloat16" and r["dim"] == 768:
            speedup = r["fwd_bwd_ms"] / f["fwd_bwd_ms"]
            lines.append(
                f"[{'met' if speedup >= 2 else 'short'}] GPU target, clip, B={r['batch']} D=768 bf16: fastclip-triton "
                f"{speedup:.2f}x faster than inf_cl (target >= 2x)"
            )
    return lines


def markdown_summary(doc: dict, baseline: str = "reference") -> str:
    """A Markdown table of each provider against ``baseline`` (time, peak extra memory, ratios), with
    the device and date, for a README results section."""
    rows = ratio_rows(doc["records"], baseline)
    lines = [
        f"Device: {doc['device']}; torch {doc['torch']}, fastclip {doc['fastclip']}; {doc['date']}; "
        f"matmul rate {doc['matmul_tflops']:.3g} TFLOP/s "
        + ("(bf16)" if not str(doc["device"]).startswith("cpu") else "(fp32, CPU)"),
        "",
        f"| loss | dtype | D | B | provider | fwd+bwd ms | {baseline} ms | time ratio | peak extra MiB "
        f"| {baseline} MiB | memory ratio |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for q in rows:
        lines.append(
            f"| {q['loss']} | {SHORT_DTYPE.get(q['dtype'], q['dtype'])} | {q['dim']} | {q['batch']} | {q['provider']} "
            f"| {q['ms']:.0f} | {q['base_ms']:.0f} | {_fmt(q['time_ratio'], '.2f')}x | {_mib(q['mem'])} "
            f"| {_mib(q['base_mem'])} | {_fmt(q['mem_ratio'], '.3f')}x |"
        )
    return "\n".join(lines)


def load_document(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    validate_document(doc)
    return doc
